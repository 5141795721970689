"""Submitting, reading, canceling and deleting jobs: what the routes call.

Submission checks everything it can before the transaction (input against the spec, policy
words, references), then in one transaction checks the user's limits, reserves the credits and
inserts the job. A failure anywhere leaves no job and moves no credit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session

from api.core import ledger
from api.core.errors import (
    AccountInDebt,
    Conflict,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidInput,
    NotFound,
)
from api.core.jobs import ACTIVE, JobStatus
from api.core.limits import check_active_jobs, check_content_policy, check_rate
from api.core.pricing import price_generation
from api.core.requests import normalize_input
from api.db.engine import Database
from api.db.tables import Job, Lora, Project, Upload, User, utcnow
from api.services import teams
from api.services.egress import EgressPolicy, check_url
from api.services.events import EventBus, record_event
from api.services.settlement import delete_job_outputs, finish_job, locked_job
from api.settings import Settings
from api.storage.base import Storage
from models.catalog import Catalog
from models.spec import ModelSpec

logger = logging.getLogger(__name__)

WEBHOOK_EVENTS = ("start", "output", "logs", "completed")


@dataclass(frozen=True)
class Submission:
    model: str
    input: dict[str, Any]
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    priority: int = 0
    api_shape: str = "native"  # the API shape that submitted it (native | replicate | openai)
    cancel_after_s: float | None = None  # Replicate's Cancel-After, from submission
    team: str | None = None  # submit "as the team" (its id): charged to the team's account
    project: str | None = None  # file the job under this project of the account (its id)


@dataclass(frozen=True)
class Checked:
    """A submission checked against the model and priced: what ``submit`` and ``quote`` share."""

    spec: ModelSpec
    task: str
    input: dict[str, Any]  # normalized
    price: int
    max_active: int
    per_minute: int | None


@dataclass(frozen=True)
class Quote:
    """What a submission would cost, and whether the account can pay it now."""

    checked: Checked
    balance: ledger.BalanceView
    debt: int = 0  # owed back: while above 0 the account cannot submit (account_in_debt)
    refused: str | None = None  # the code of a spending check that submit would fail (member_cap_exceeded)

    @property
    def reason(self) -> str | None:
        """Why ``submit`` would refuse to pay for it (its error code, checked in submit's order), or None."""
        if self.debt > 0:
            return "account_in_debt"
        if self.refused is not None:
            return self.refused
        return "insufficient_credits" if self.balance.available < self.checked.price else None

    @property
    def affordable(self) -> bool:
        return self.reason is None


def request_hash(sub: Submission) -> str:
    body = {"model": sub.model, "input": sub.input, "webhook": sub.webhook,
            "webhook_events_filter": sub.webhook_events_filter}
    # The shape and Cancel-After change what the job is (its deadline, how it is shown), so a
    # replay with another shape or deadline is a conflict, not the old job. Left out when default,
    # so hashes of native jobs stored before this stay valid.
    if sub.api_shape != "native":
        body["api_shape"] = sub.api_shape
    if sub.cancel_after_s is not None:
        body["cancel_after_s"] = sub.cancel_after_s
    if sub.project is not None:
        body["project"] = sub.project
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def lock_user(session: Session, user_id: str) -> None:
    """Serialize a user's submissions (PostgreSQL row lock; SQLite already holds the write lock).

    The lock is taken on the balance row, which every credit movement locks first too, so a
    submission and a settlement of the same user's jobs always lock in the same order.
    """
    ledger.lock_balance(session, user_id)


class JobService:
    def __init__(self, db: Database, settings: Settings, catalog: Catalog, storage: Storage,
                 bus: EventBus, metrics: Any = None) -> None:
        self.db = db
        self.metrics = metrics
        self.settings = settings
        self.catalog = catalog
        self.storage = storage
        self.bus = bus
        self.egress = EgressPolicy.from_settings(settings)

    # submission ----------------------------------------------------------------------------
    def spec_for(self, model_id: str) -> ModelSpec:
        spec = self.catalog.get(model_id)
        if spec is None:
            raise InvalidInput(f"unknown model {model_id!r}", {"field": "model",
                               "models": [s.id for s in self.catalog.enabled()]})
        if not spec.enabled:
            raise InvalidInput(f"model {model_id!r} is disabled", {"field": "model"})
        return spec

    def _check_webhook(self, sub: Submission, allowed: tuple[str, ...] = WEBHOOK_EVENTS) -> None:
        """``allowed``: the webhook events the submission may filter on (a pipeline's add step events)."""
        if sub.webhook is not None:
            parsed = urlparse(sub.webhook)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise InvalidInput("webhook must be an http(s) URL", {"field": "webhook"})
        if sub.webhook_events_filter is not None:
            unknown = sorted(set(sub.webhook_events_filter) - set(allowed))
            if unknown:
                raise InvalidInput(f"unknown webhook events {unknown}",
                                   {"field": "webhook_events_filter", "allowed": list(allowed)})
        if sub.webhook is not None:
            check_url(self.egress, sub.webhook, field="webhook")  # re-checked at delivery (DNS changes)

    def _check_image(self, session: Session, user: User, spec: ModelSpec, ref: str) -> None:
        """The input image must be the caller's upload, the caller's finished image job, or a URL."""
        if ref.startswith("job:"):
            source = session.get(Job, ref[4:])
            if source is None or source.user_id != user.id:
                raise InvalidInput(f"input.image: job {ref[4:]} not found", {"field": "image"})
            if source.status != JobStatus.SUCCEEDED or source.kind != "image" or not source.outputs:
                raise InvalidInput(f"input.image: job {ref[4:]} is not a finished image job",
                                   {"field": "image", "status": source.status})
            return
        if ref.startswith(("http://", "https://")):
            return
        upload = session.get(Upload, ref)
        if upload is None or upload.user_id != user.id:
            raise InvalidInput(f"input.image: upload {ref} not found", {"field": "image"})
        if upload.kind != "image":
            raise InvalidInput(f"input.image: upload {ref} is not an image", {"field": "image"})

    def _check_loras(self, session: Session, user: User, spec: ModelSpec, refs: list[dict[str, Any]]) -> None:
        for ref in refs:
            lora = session.get(Lora, ref["id"])
            if lora is None or lora.user_id != user.id or lora.deleted_at is not None:
                raise NotFound(f"LoRA {ref['id']} not found", {"field": "loras"})
            if lora.base_model != spec.id:
                raise InvalidInput(f"LoRA {lora.id} was trained on {lora.base_model}, not {spec.id}",
                                   {"field": "loras", "base_model": lora.base_model})
            if lora.status != "succeeded" or not lora.weights_key:
                raise InvalidInput(f"LoRA {lora.id} is not trained yet (status {lora.status})",
                                   {"field": "loras", "status": lora.status})

    def _check(self, account: User, sub: Submission) -> Checked:
        """Every check made before the transaction, and the price: one method, so a quote and a
        submission of the same body cannot disagree. ``account`` sets the plan's limits."""
        spec = self.spec_for(sub.model)
        max_active, per_minute, max_chars = self.settings.limits_for(account.plan)
        task, normalized = normalize_input(spec, sub.input, max_chars)
        check_content_policy([normalized["prompt"], normalized.get("negative_prompt") or ""],
                             self.settings.content_policy_words)
        self._check_webhook(sub)
        image = normalized.get("image")
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            # Resolved here, outside the transaction; fetched (and checked again) by the runner.
            check_url(self.egress, image, field="input.image")
        price = price_generation(spec, normalized, self.settings)
        return Checked(spec, task, normalized, price, max_active, per_minute)

    def _check_references(self, session: Session, member: User, checked: Checked, *,
                          step_refs: bool = False) -> None:
        """The input image and the LoRAs are the caller's own (inside submit's transaction).

        ``step_refs``: a pipeline step's ``image`` may name another step (``step:<name>``), which
        the pipeline checks by kind instead."""
        image = checked.input.get("image")
        if step_refs and isinstance(image, str) and image.startswith("step:"):
            pass
        elif image:
            self._check_image(session, member, checked.spec, checked.input["image"])
        if checked.input.get("loras"):
            self._check_loras(session, member, checked.spec, checked.input["loras"])

    def quote(self, user: User, sub: Submission) -> Quote:
        """What ``submit`` would reserve for ``sub``, after the same checks. Creates no job, moves
        no credit and counts toward no limit (the active-job and per-minute limits are checked
        at submission, against what is running then). What the account cannot pay (too few
        credits, a debt, a team member's monthly cap) is ``affordable`` false with its reason
        code, not an error: the quote is still the price."""
        member, account = user, self.account_for(user, sub.team)
        checked = self._check(account, sub)
        refused = None
        with self.db.read() as session:
            self._check_references(session, member, checked)
            balance = ledger.get_balance(session, account.id)
            debt = ledger.get_debt(session, account.id)
            if member is not account:  # teams: the member's cap, as submit checks it
                try:
                    teams.check_member_cap(session, account.id, member.id, checked.price)
                except InsufficientCredits as exc:
                    refused = exc.code
        return Quote(checked, balance, debt, refused)

    def priority_for(self, user: User, sub: Submission) -> int:
        """The plan's tier (``plan_priority``); an explicit submission priority may only raise it."""
        return max(sub.priority, self.settings.plan_priority.get(user.plan, 0))

    def submit(self, user: User, sub: Submission, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Create a job. Returns ``(job, created)``; ``created`` is False for an idempotent replay."""
        digest = request_hash(sub)
        # teams: "as the team" acts on the team's account (its balance, plan, limits, idempotency
        # keys); ``member`` stays the caller (their own uploads and LoRAs, their cap, submitted_by)
        member, user = user, self.account_for(user, sub.team)
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 200:
                raise InvalidInput("Idempotency-Key must be 1–200 characters", {"field": "Idempotency-Key"})
            with self.db.read() as session:
                existing = self._by_idempotency_key(session, user.id, idempotency_key)
            if existing is not None:
                return self._replay(existing, digest), False
        checked = self._check(user, sub)
        spec, task, normalized, price = checked.spec, checked.task, checked.input, checked.price
        max_active, per_minute = checked.max_active, checked.per_minute
        job = Job(user_id=user.id, model=spec.id, kind=spec.kind, task=task, input=normalized,
                  priority=self.priority_for(user, sub), max_attempts=self.settings.max_attempts,
                  credits_reserved=price, idempotency_key=idempotency_key, request_hash=digest,
                  webhook=sub.webhook, webhook_events_filter=sub.webhook_events_filter,
                  api_shape=sub.api_shape, submitted_by=member.id if member is not user else None,
                  project_id=sub.project)
        if sub.cancel_after_s is not None:
            job.start_deadline_at = job.created_at + timedelta(seconds=sub.cancel_after_s)
        try:
            with self.db.session() as session:
                self._check_references(session, member, checked)
                check_project(session, user.id, sub.project)
                self.admit(session, user.id, max_active, per_minute)
                if member is not user:  # teams: still a member (under the team's lock), within the cap
                    teams.check_member_cap(session, user.id, member.id, price)
                session.add(job)
                session.flush()
                ledger.reserve(session, user.id, job.id, price)
                record_event(session, job.id, "status", {"status": job.status, "stage": job.stage})
                session.commit()
        except IntegrityError:
            # Same Idempotency-Key submitted concurrently: the other request created the job.
            if idempotency_key is None:
                raise
            with self.db.session() as session:
                existing = self._by_idempotency_key(session, user.id, idempotency_key)
            if existing is None:
                raise
            return self._replay(existing, digest), False
        self.bus.publish(job.id, "status", {"status": job.status})
        if self.metrics is not None:
            self.metrics.job_submitted(spec.id, spec.kind, price)
        logger.info("job %s queued: user=%s model=%s credits=%d", job.id, user.id, spec.id, price)
        return job, True

    def account_for(self, user: User, team: str | None) -> User:
        """The account a submission or a listing acts on: the caller's, or a team of theirs."""
        if team is None:
            return user
        with self.db.read() as session:
            return teams.account_for(session, user, team)

    def admit(self, session: Session, user_id: str, max_active: int, per_minute: int | None) -> None:
        """Limits checked inside the submitting transaction, with the user row locked."""
        lock_user(session, user_id)
        debt = ledger.get_debt(session, user_id)
        if debt > 0:
            raise AccountInDebt(f"this account owes {debt} credits (a refunded or disputed payment); "
                                "buy credits to pay it back first", {"debt": debt})
        # a pipeline counts once (its row), not once per step
        active = session.execute(select(func.count()).select_from(Job).where(
            Job.user_id == user_id, Job.parent_id.is_(None),
            Job.status.in_([s.value for s in ACTIVE]))).scalar_one()
        check_active_jobs(active, max_active)
        if per_minute is None:
            return
        since = utcnow() - timedelta(seconds=60)
        recent = session.execute(select(func.count()).select_from(Job).where(
            Job.user_id == user_id, Job.created_at >= since, Job.kind != "training",
            Job.parent_id.is_(None))).scalar_one()
        check_rate(recent, per_minute)

    @staticmethod
    def _by_idempotency_key(session: Session, user_id: str, key: str) -> Job | None:
        return session.execute(select(Job).where(Job.user_id == user_id, Job.idempotency_key == key)
                               ).scalars().first()

    @staticmethod
    def _replay(job: Job, digest: str) -> Job:
        if job.request_hash != digest:
            raise IdempotencyConflict("this Idempotency-Key was used with a different request",
                                      {"job_id": job.id})
        return job

    # reading ------------------------------------------------------------------------------
    def get(self, user: User | None, job_id: str) -> Job:
        """A job by id; another user's job is 'not found' (``user=None`` is the admin view)."""
        with self.db.read() as session:
            job = session.get(Job, job_id)
            # teams.may_act_on: the caller's own jobs, and their teams' (other jobs are not found)
            if job is None or (user is not None and not teams.may_act_on(session, user.id, job.user_id)):
                raise NotFound(f"job {job_id} not found")
        return job

    def list(self, user: User | None, *, status: str | None = None, kind: str | None = None,
             model: str | None = None, cursor: str | None = None, limit: int = 20,
             ascending: bool = False, exclude_kind: str | None = None,
             team: str | None = None, project: str | None = None,
             include_steps: bool = False) -> tuple[list[Job], str | None]:
        """Newest first (``ascending``: oldest first); ``cursor`` continues after a page's last job.
        ``team``: that team's jobs instead of the caller's own (a non-member's is not found).
        ``project``: only the jobs filed under it (an unknown or deleted one is not found).
        A pipeline's step jobs are listed only with ``include_steps`` (the pipeline itself is)."""
        query = select(Job)
        if not include_steps:
            query = query.where(Job.parent_id.is_(None))
        if user is not None:
            account = self.account_for(user, team)
            query = query.where(Job.user_id == account.id)
            if project is not None:
                with self.db.read() as session:
                    check_project(session, account.id, project)
        if project is not None:
            query = query.where(Job.project_id == project)
        if status:
            statuses = [s.strip() for s in status.split(",")]
            unknown = set(statuses) - {s.value for s in JobStatus}
            if unknown:
                raise InvalidInput(f"unknown status {sorted(unknown)}", {"field": "status"})
            query = query.where(Job.status.in_(statuses))
        if kind:
            query = query.where(Job.kind == kind)
        if exclude_kind:
            query = query.where(Job.kind != exclude_kind)
        if model:
            query = query.where(Job.model == model)
        if cursor:
            created, job_id = decode_cursor(cursor)
            if ascending:
                query = query.where(or_(Job.created_at > created,
                                        and_(Job.created_at == created, Job.id > job_id)))
            else:
                query = query.where(or_(Job.created_at < created,
                                        and_(Job.created_at == created, Job.id < job_id)))
        order = (Job.created_at.asc(), Job.id.asc()) if ascending else (Job.created_at.desc(), Job.id.desc())
        with self.db.read() as session:
            rows = list(session.execute(query.order_by(*order).limit(limit + 1)).scalars())
        next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
        return rows[:limit], next_cursor

    # changes -----------------------------------------------------------------------------
    def cancel(self, user: User | None, job_id: str) -> Job:
        """Queued: canceled and refunded now. Running: the runner stops it and refunds.

        The job row is locked first (PostgreSQL), as every writer of a job's events does: a job's
        events then commit in the order of their ids, so an SSE reader's cursor never skips one.
        A pipeline's cancel locks the pipeline and its steps, a step's settlement the step and then
        its pipeline: PostgreSQL may break such a lock cycle by failing one of them (the runner
        retries its settlement; a cancel is retried here, twice at most).
        """
        for attempt in range(3):
            try:
                return self._cancel(user, job_id)
            except OperationalError:
                if attempt == 2:
                    raise
                logger.warning("cancel of job %s hit a lock conflict; trying again", job_id, exc_info=True)
        raise AssertionError("unreachable")

    def _cancel(self, user: User | None, job_id: str) -> Job:
        with self.db.session() as session:
            job = locked_job(session, job_id)
            if job is None or (user is not None and not teams.may_act_on(session, user.id, job.user_id)):
                raise NotFound(f"job {job_id} not found")
            if job.kind == "pipeline" or job.parent_id is not None:
                # a pipeline, or one of its steps: the whole pipeline is canceled
                from api.services import pipelines  # lazy: pipelines imports this module

                return pipelines.cancel_locked(session, self, job)
            if job.status == JobStatus.QUEUED:
                finish_job(session, self.storage, job, JobStatus.CANCELED, None, self.metrics)
                session.commit()
                self.bus.publish(job.id, "completed", {"status": job.status})
            elif job.status == JobStatus.RUNNING and not job.cancel_requested:
                job.cancel_requested = True
                job.updated_at = utcnow()
                record_event(session, job.id, "logs", {"message": "cancel requested"})
                session.commit()
                self.bus.publish(job.id, "cancel", {})
            return job

    def delete_outputs(self, user: User | None, job_id: str) -> Job:
        """Remove a finished job's outputs from storage (the job and its ledger stay)."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None or (user is not None and not teams.may_act_on(session, user.id, job.user_id)):
                raise NotFound(f"job {job_id} not found")
            if user is not None:  # a team job's: its submitter and the team's owners and admins
                teams.check_may_delete_outputs(session, user.id, job)
            if job.status in ACTIVE:
                raise Conflict("the job is still active: cancel it first", {"status": job.status},
                               code="job_active")
            if job.parent_id is not None:  # a pipeline's step: later steps read its outputs
                parent = session.get(Job, job.parent_id)
                if parent is not None and parent.status in ACTIVE:
                    raise Conflict("the job's pipeline is still active (its outputs feed later steps): "
                                   "cancel it first", {"status": parent.status, "pipeline": parent.id},
                                   code="job_active")
                last = session.execute(select(func.max(Job.step_index)).where(
                    Job.parent_id == job.parent_id)).scalar()
                if parent is not None and job.step_index == last:  # the pipeline's outputs are these
                    parent.outputs = []
                    parent.outputs_deleted_at = utcnow()
                    session.add(parent)
            if job.kind == "pipeline":  # its outputs are its steps' (the last step's are its own)
                steps = session.execute(select(Job).where(Job.parent_id == job.id)).scalars().all()
                for step in steps:
                    if step.status in ACTIVE:
                        raise Conflict("a step of the pipeline is still active: cancel it first",
                                       {"status": step.status, "step": step.step_name}, code="job_active")
                for step in steps:
                    delete_job_outputs(self.storage, step)
                    step.outputs = []
                    step.outputs_deleted_at = utcnow()
                    session.add(step)
            delete_job_outputs(self.storage, job)
            job.outputs = []
            job.outputs_deleted_at = utcnow()
            session.add(job)
            session.commit()
            return job


def check_project(session: Session, account_id: str, project_id: str | None) -> None:
    """``project_id`` is a live project of the account (else not found, as another's is)."""
    if project_id is None:
        return
    project = session.get(Project, project_id)
    if project is None or project.account_id != account_id or project.deleted_at is not None:
        raise NotFound(f"project {project_id} not found", {"field": "project"})


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|", 1)
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None:  # ours always carry one; a naive time cannot be compared
            raise ValueError("naive timestamp")
        return created_at, job_id
    except Exception:  # noqa: BLE001 - any garbage is the same client error
        raise InvalidInput("cursor is not valid", {"field": "cursor"}) from None
