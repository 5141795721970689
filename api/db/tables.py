"""SQLModel tables. Times are aware UTC datetimes (sqlmodel stores them as UTC on every database)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: str = Field(default_factory=lambda: new_id("usr"), primary_key=True)
    email: str = Field(unique=True, index=True)
    plan: str = "free"
    is_admin: bool = False
    webhook_secret: str
    created_at: datetime = Field(default_factory=utcnow)
    last_served_at: datetime | None = None
    disabled: bool = False
    # "person" (signs in with an API key or a JWT) or "team" (a team's account: its balance,
    # plan and ledger; never authenticates; its id is the team's id)
    kind: str = Field(default="person", sa_column_kwargs={"server_default": "person"})


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(default_factory=lambda: new_id("key"), primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True)
    prefix: str = Field(unique=True)
    key_hash: str = Field(unique=True)
    name: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class Balance(SQLModel, table=True):
    """Current balance, kept in step with the ledger in the same transaction."""

    __tablename__ = "balances"
    __table_args__ = (
        CheckConstraint("available >= 0", name="ck_balance_available_nonneg"),
        CheckConstraint("reserved >= 0", name="ck_balance_reserved_nonneg"),
        CheckConstraint("debt >= 0", name="ck_balance_debt_nonneg"),
    )

    user_id: str = Field(foreign_key="users.id", primary_key=True)
    available: int = 0
    reserved: int = 0
    # credits refunded or disputed after they were spent: blocks new jobs until paid back
    debt: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    updated_at: datetime = Field(default_factory=utcnow)


class LedgerEntry(SQLModel, table=True):
    """Append-only. ``amount`` is always positive; ``kind`` says which way it moved."""

    __tablename__ = "ledger"
    __table_args__ = (
        UniqueConstraint("job_id", "kind", name="uq_ledger_job_kind"),
        CheckConstraint("amount >= 0", name="ck_ledger_amount_nonneg"),
    )

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True)
    kind: str
    amount: int
    job_id: str | None = Field(default=None, index=True)
    idempotency_key: str = Field(unique=True)
    note: str = ""
    available_after: int
    reserved_after: int
    created_at: datetime = Field(default_factory=utcnow)


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_jobs_user_idem"),
        Index("ix_jobs_claim", "status", "priority", "created_at"),
        Index("ix_jobs_user_created", "user_id", "created_at"),
    )

    id: str = Field(default_factory=lambda: new_id("job"), primary_key=True)
    user_id: str = Field(foreign_key="users.id")
    model: str
    kind: str
    task: str
    input: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = "queued"
    stage: str | None = "queued"
    progress: float = 0.0
    priority: int = 0
    attempts: int = 0
    max_attempts: int = 3
    next_attempt_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    provider: str | None = None
    provider_job_id: str | None = None
    route_reason: str | None = None
    cost_usd: float | None = None
    outputs: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    resume: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    result: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error_code: str | None = None
    error_message: str | None = None
    credits_reserved: int = 0
    credits_charged: int = 0
    credits_refunded: int = 0
    idempotency_key: str | None = None
    request_hash: str | None = None
    webhook: str | None = None
    webhook_events_filter: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    lora_id: str | None = Field(default=None, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    completed_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)
    queue_s: float | None = None
    run_s: float | None = None
    outputs_deleted_at: datetime | None = None
    # which API shape created the job (native | replicate | openai): webhooks and views follow it
    api_shape: str = Field(default="native", sa_column_kwargs={"server_default": "native"})
    # Replicate's Cancel-After: not started by then, aborted and refunded; running, canceled
    start_deadline_at: datetime | None = None
    # the member who submitted a job "as the team" (user_id is then the team's account); else None
    submitted_by: str | None = Field(default=None, index=True)
    # pipelines: a step job names its pipeline (the parent job, kind "pipeline"), its step name and
    # its position in the submitted order; None on every other job
    parent_id: str | None = Field(default=None, index=True)
    step_name: str | None = None
    step_index: int | None = None
    # the project a job (or a pipeline) was filed under; None: none
    project_id: str | None = Field(default=None, index=True)


class JobEvent(SQLModel, table=True):
    """Every change a subscriber may want, kept for SSE replay (``Last-Event-ID``)."""

    __tablename__ = "job_events"

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True)
    type: str
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class Upload(SQLModel, table=True):
    __tablename__ = "uploads"

    id: str = Field(default_factory=lambda: new_id("upl"), primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True)
    key: str
    filename: str = ""
    content_type: str
    size: int
    width: int | None = None
    height: int | None = None
    kind: str = "image"
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class PlanGrant(SQLModel, table=True):
    """One row per (user, period) a plan's credits were granted, so grants never repeat."""

    __tablename__ = "plan_grants"
    __table_args__ = (UniqueConstraint("user_id", "period", name="uq_plan_grant_period"),)

    id: int | None = Field(default=None, primary_key=True)
    user_id: str = Field(foreign_key="users.id")
    plan: str
    period: str
    amount: int
    created_at: datetime = Field(default_factory=utcnow)


class Lora(SQLModel, table=True):
    """A personal LoRA: trained by a ``training`` job, then usable in its owner's generations."""

    __tablename__ = "loras"

    id: str = Field(default_factory=lambda: new_id("lora"), primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True)
    name: str
    base_model: str
    trigger_word: str = "TOK"
    status: str = "queued"
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    job_id: str | None = None
    weights_key: str | None = None
    validation_key: str | None = None
    summary: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = None


class WebhookDelivery(SQLModel, table=True):
    """The webhook outbox: one row per client webhook, written in the transaction of its change.

    ``id`` is the ``webhook-id`` header (stable across retries). ``payload`` is a snapshot of the
    job's columns at the time of the event, rendered into the public job shape when it is sent
    (so presigned output URLs are fresh at every attempt). A deliverer in any API process claims
    a due row (``claimed_by`` until ``claim_expires_at``), posts it, and marks it delivered, failed
    for good, or due again at ``next_attempt_at``.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "delivered_at", "failed_at", "next_attempt_at"),
    )

    id: str = Field(default_factory=lambda: new_id("msg"), primary_key=True)
    job_id: str = Field(index=True)
    user_id: str
    event: str
    url: str
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    attempts: int = 0
    next_attempt_at: datetime = Field(default_factory=utcnow)
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None
    failed_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    claimed_by: str | None = None
    claim_expires_at: datetime | None = None


# ---- identity (JWT end users) ---------------------------------------------------------------


class Identity(SQLModel, table=True):
    """An end user known to a configured identity provider: (issuer, sub) -> one CineWeave user."""

    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("issuer", "subject", name="uq_identity_issuer_subject"),)

    id: str = Field(default_factory=lambda: new_id("idn"), primary_key=True)
    user_id: str = Field(foreign_key="users.id", index=True)
    issuer: str
    subject: str
    created_at: datetime = Field(default_factory=utcnow)
    last_seen_at: datetime | None = None


# ---- teams -----------------------------------------------------------------------------------


class Team(SQLModel, table=True):
    """A team; ``id`` is also the id of its account row in ``users`` (kind "team")."""

    __tablename__ = "teams"

    id: str = Field(foreign_key="users.id", primary_key=True)
    name: str
    created_by: str = Field(foreign_key="users.id")
    created_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = None


class TeamMember(SQLModel, table=True):
    __tablename__ = "team_members"
    __table_args__ = (UniqueConstraint("team_id", "user_id", name="uq_team_member"),)

    id: int | None = Field(default=None, primary_key=True)
    team_id: str = Field(foreign_key="teams.id", index=True)
    user_id: str = Field(foreign_key="users.id", index=True)
    role: str = "member"  # owner | admin | member
    # credits a member may spend from the team per calendar month (None: no cap)
    monthly_cap: int | None = None
    joined_at: datetime = Field(default_factory=utcnow)
    removed_at: datetime | None = None


class TeamInvitation(SQLModel, table=True):
    __tablename__ = "team_invitations"

    id: str = Field(default_factory=lambda: new_id("inv"), primary_key=True)
    team_id: str = Field(foreign_key="teams.id", index=True)
    email: str = Field(index=True)
    role: str = "member"
    token_hash: str = Field(unique=True)
    invited_by: str = Field(foreign_key="users.id")
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    accepted_at: datetime | None = None
    accepted_by: str | None = None
    revoked_at: datetime | None = None


# ---- billing (Stripe) ------------------------------------------------------------------------


class BillingCustomer(SQLModel, table=True):
    """The Stripe customer of an account (a person or a team)."""

    __tablename__ = "billing_customers"

    account_id: str = Field(foreign_key="users.id", primary_key=True)
    stripe_customer_id: str = Field(unique=True)
    created_at: datetime = Field(default_factory=utcnow)


class Subscription(SQLModel, table=True):
    """An account's Stripe subscription, as the newest applied event left it."""

    __tablename__ = "subscriptions"

    id: str = Field(primary_key=True)  # the Stripe subscription id
    account_id: str = Field(foreign_key="users.id", index=True)
    plan: str
    status: str
    stripe_price_id: str | None = None
    current_period_end: datetime | None = None
    cancel_at_period_end: bool = False
    # the Stripe ``created`` of the newest event applied, so an older event never overwrites it
    event_created: int = 0
    # a downgrade (or cancellation) keeps the paid plan until then; None: nothing pending
    downgrade_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class CreditPurchase(SQLModel, table=True):
    """Credits an account got for a payment (a pack or a paid invoice): what a refund claws back."""

    __tablename__ = "credit_purchases"

    id: int | None = Field(default=None, primary_key=True)
    account_id: str = Field(foreign_key="users.id", index=True)
    source: str  # pack | invoice
    stripe_object_id: str = Field(unique=True)  # checkout session or invoice id
    payment_intent: str | None = Field(default=None, index=True)
    charge_id: str | None = Field(default=None, index=True)
    credits: int
    amount_cents: int = 0
    # credits taken back so far by refunds and disputes (what was available plus what became debt)
    clawed_back: int = 0
    # the ledger entry that credited it (``stripe:{session}`` or ``plan:{account}:{period}``)
    ledger_key: str = Field(default="", sa_column_kwargs={"server_default": ""})
    created_at: datetime = Field(default_factory=utcnow)


class StripeEvent(SQLModel, table=True):
    """Every Stripe event applied (or deliberately ignored), once: the webhook's idempotency key."""

    __tablename__ = "stripe_events"

    id: str = Field(primary_key=True)  # evt_...
    type: str
    created: int
    result: str = ""
    applied_at: datetime = Field(default_factory=utcnow)
    # the payment a refund or dispute is about (payment intent, else charge id): one that arrives
    # before its purchase is applied when the purchase is
    ref: str | None = Field(default=None, index=True)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


# ---- pipelines: presets and projects ------------------------------------------------------------


class Preset(SQLModel, table=True):
    """One version of a named pipeline preset. A PATCH adds a version; the newest enabled one is used.

    ``definition`` holds the parameters a client may set and the step templates they fill
    (see :mod:`api.services.presets`)."""

    __tablename__ = "presets"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_preset_name_version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: int = 1
    title: str = ""
    description: str = ""
    definition: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    enabled: bool = True
    created_by: str | None = None  # the admin's user id; None: shipped with CineWeave (seeded)
    created_at: datetime = Field(default_factory=utcnow)


class Project(SQLModel, table=True):
    """A folder of work: jobs and pipelines may name one; listings filter by it."""

    __tablename__ = "projects"

    id: str = Field(default_factory=lambda: new_id("prj"), primary_key=True)
    # the account it belongs to (a person, or a team's account)
    account_id: str = Field(foreign_key="users.id", index=True)
    name: str
    description: str = ""
    created_by: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = None
