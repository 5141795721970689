"""Request bodies and the answer shapes clients rely on (see DESIGN.md; add fields, never rename)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.db.tables import Job, LedgerEntry, Lora, Upload, User
from api.services.queue import QueueEstimate
from api.services.teams import team_job_fields
from api.storage.base import Storage


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64)
    input: dict[str, Any]
    webhook: str | None = Field(default=None, max_length=2048)
    webhook_events_filter: list[str] | None = None
    # teams: submit as this team (or header X-CineWeave-Team): charged to the team's credits
    team: str | None = Field(default=None, min_length=1, max_length=64)
    # file the job under a project of the account (GET /v1/jobs?project= lists them)
    project: str | None = Field(default=None, min_length=1, max_length=64)


class CreditGrant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int = Field(gt=0, le=10_000_000)
    kind: str = Field(default="grant", pattern="^(grant|purchase|adjust)$")
    note: str = Field(default="", max_length=500)
    idempotency_key: str | None = Field(default=None, max_length=200)


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=254)
    plan: str | None = None
    credits: int | None = Field(default=None, ge=0, le=10_000_000)
    is_admin: bool = False


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str | None = None
    disabled: bool | None = None


class LoraCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    base_model: str = Field(min_length=1, max_length=64)
    images: list[str] | None = Field(default=None, max_length=100, description="upload ids of images")
    dataset: str | None = Field(default=None, max_length=64, description="upload id of a ZIP dataset")
    trigger_word: str = Field(default="TOK", min_length=1, max_length=32)
    steps: int = Field(default=1200, ge=1, le=100_000)
    rank: int = Field(default=16, ge=1, le=256)
    learning_rate: float = Field(default=1e-4, gt=0, le=1e-2)
    resolution: int | None = Field(default=None, ge=16, le=4096)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


class ModelSwap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: dict[str, Any] = Field(description="a catalog source: {path}, {s3}, {hf_repo, revision} or {tiny}")


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=100)


# answers ------------------------------------------------------------------------------------
# The shapes the views below produce, declared as response models so /openapi.json describes
# them. ``extra="allow"``: a field a view gains before its model does still reaches the client.
# Routes serialise with ``response_model_exclude_unset``, so a key a view leaves out (an output's
# ``role``) stays out: the answers are byte-for-byte what the views build.


class Public(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(Public):
    code: str = Field(description="stable, machine-readable: insufficient_credits, not_found, ...")
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(Public):
    error: ErrorBody


class OutputPublic(Public):
    url: str
    content_type: str | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: float | None = None
    duration_s: float | None = None
    thumbnail_url: str | None = Field(default=None, description="present when the output has a poster")
    role: str | None = Field(default=None, description="present when the output is not the main one")


class JobError(Public):
    code: str
    message: str | None = None


class JobCredits(Public):
    reserved: int
    charged: int
    refunded: int


class JobMetrics(Public):
    queue_s: float | None = None
    run_s: float | None = None


class JobPublic(Public):
    id: str
    model: str
    kind: str
    task: str
    status: str = Field(description="queued | running | succeeded | failed | canceled; a pipeline's step "
                                    "whose inputs are not ready yet: waiting")
    stage: str | None = None
    progress: float
    input: dict[str, Any]
    outputs: list[OutputPublic]
    thumbnail_url: str | None = None
    error: JobError | None = None
    credits: JobCredits
    provider: str | None = None
    route_reason: str | None = None
    attempts: int
    cancel_requested: bool
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    metrics: JobMetrics
    result: dict[str, Any] | None = None
    queue_position: int | None = Field(
        default=None, description="queued jobs of this model the runner starts before this one (0: next); "
                                  "null unless queued")
    eta_s: float | None = Field(
        default=None, description="seconds until the job should finish, from this model's measured run "
                                  "times (remaining time when running); null when unknown")
    # teams: present only on a job submitted as a team
    team: str | None = Field(default=None, description="the team whose credits pay for it")
    submitted_by: str | None = Field(default=None, description="the member who submitted it as the team")
    project: str | None = Field(default=None, description="the project it is filed under")
    pipeline: str | None = Field(default=None, description="a pipeline step's pipeline (its id)")
    step: str | None = Field(default=None, description="a pipeline step's name")


class JobList(Public):
    data: list[JobPublic]
    next_cursor: str | None = None


class QuoteBalance(Public):
    available: int
    reserved: int
    debt: int = Field(default=0, description="credits owed back; while above 0 no job can be submitted")


class JobQuote(Public):
    """``POST /v1/jobs/quote``: what ``POST /v1/jobs`` with the same body would reserve."""

    model: str
    kind: str
    task: str
    credits: int = Field(description="the price: what submitting this body reserves (and charges on success)")
    input: dict[str, Any] = Field(description="the input as the job would store it (defaults filled in)")
    balance: QuoteBalance = Field(description="the paying account's credits now")
    affordable: bool = Field(description="the available balance covers the price (and nothing is owed)")
    reason: str | None = Field(default=None, description="why it is not affordable, as the submission's error "
                               "code: insufficient_credits, account_in_debt or member_cap_exceeded; null when it is")


class LoraQuote(Public):
    """``POST /v1/loras/quote``: what ``POST /v1/loras`` with the same body would reserve."""

    base_model: str
    steps: int
    resolution: int
    images: int = Field(description="images the uploads hold (datasets expanded); 0 when none given yet")
    credits: int
    balance: QuoteBalance
    affordable: bool


class AdminJobPublic(JobPublic):
    user_id: str
    provider_job_id: str | None = None
    cost_usd: float | None = None


class AdminJobList(Public):
    data: list[AdminJobPublic]
    next_cursor: str | None = None


class CreditsPublic(Public):
    balance: int = Field(description="available credits")
    reserved: int = Field(description="held by active jobs")
    plan: str


class LedgerEntryPublic(Public):
    id: int
    kind: str
    amount: int
    job_id: str | None = None
    note: str | None = None
    balance: int
    reserved: int
    created_at: str | None = None


class LedgerList(Public):
    data: list[LedgerEntryPublic]
    next_cursor: str | None = None


class ApiKeyPublic(Public):
    id: str
    prefix: str
    name: str | None = None
    created_at: str | None = None
    revoked_at: str | None = None


class ApiKeyList(Public):
    data: list[ApiKeyPublic]


class ApiKeyCreated(Public):
    id: str
    prefix: str
    name: str | None = None
    api_key: str = Field(description="the key itself: shown once")


class ApiKeyRevoked(Public):
    id: str
    prefix: str
    revoked_at: str | None = None


class WebhookSecret(Public):
    webhook_secret: str = Field(description="shown once")


class UploadPublic(Public):
    id: str
    kind: str
    filename: str | None = None
    content_type: str | None = None
    size: int
    width: int | None = None
    height: int | None = None
    url: str
    meta: dict[str, Any] | None = None
    created_at: str | None = None


class UploadCreated(UploadPublic):
    data: list[UploadPublic] = Field(description="every upload created (the fields above are the first's)")


class UploadList(Public):
    data: list[UploadPublic]


class UserPublic(Public):
    id: str
    email: str
    plan: str
    is_admin: bool
    disabled: bool
    created_at: str | None = None


class UserBalance(Public):
    balance: int
    reserved: int


class AdminUserPublic(UserPublic):
    credits: UserBalance


class AdminUserList(Public):
    data: list[AdminUserPublic]


class UserCreated(UserPublic):
    api_key: str = Field(description="shown once")
    webhook_secret: str = Field(description="shown once")


class LoraPublic(Public):
    id: str
    name: str
    base_model: str
    trigger_word: str
    status: str
    stage: str | None = None
    progress: float | None = None
    params: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    job_id: str | None = None
    weights_url: str | None = None
    validation_url: str | None = None
    error: JobError | None = None
    credits: JobCredits | None = None
    created_at: str | None = None


class LoraCreated(LoraPublic):
    job: JobPublic


class LoraList(Public):
    data: list[LoraPublic]


class ModelPublic(Public):
    id: str
    name: str
    description: str | None = None
    kind: str
    tasks: list[str]
    family: str | None = None
    enabled: bool
    available: bool
    unavailable_reason: str | None = None
    remote_only: bool
    provider: str | None = None
    defaults: dict[str, Any]
    limits: dict[str, Any]
    pricing: dict[str, Any]
    trainable: bool


class ModelList(Public):
    data: list[ModelPublic]


class PlanLimitsPublic(Public):
    max_active_jobs: int
    rate_limit_per_minute: int
    max_prompt_chars: int


class PlanPublic(Public):
    id: str
    name: str
    price_usd: float
    monthly_credits: int
    one_time_credits: int
    limits: PlanLimitsPublic


class PlanPricing(Public):
    video_credits_per_second: float
    video_1080p_multiplier: float


class PlanList(Public):
    data: list[PlanPublic]
    pricing: PlanPricing


class Health(Public):
    status: str


class Readiness(Public):
    status: str = Field(description="ready | not_ready")
    checks: dict[str, str]


class ModelSwapResult(Public):
    model: str | None = None
    source: Any = None


class RouteStats(Public):
    provider: str | None = None
    reason: str | None = None
    jobs: int
    cost_usd: float


class CreditStats(Public):
    amount: int
    entries: int


class TimingStats(Public):
    avg_run_s: float | None = None
    avg_queue_s: float | None = None


class JobOutcomes(Public):
    total: int
    by_status: dict[str, int] = Field(description="status -> count, over every model")
    success_rate: float | None = Field(description="succeeded / (succeeded + failed); null before any finished")


class FailureStats(Public):
    model: str
    code: str = Field(description="the failed jobs' error code (unknown when none was recorded)")
    jobs: int


class OverflowStats(Public):
    jobs: int = Field(description="jobs run at a fallback provider instead of a local replica")
    by_provider: dict[str, int]
    by_reason: dict[str, int] = Field(description="remote_only | wait | capacity -> count")
    cost_usd: float


class AdminStats(Public):
    users: int
    jobs: dict[str, dict[str, int]] = Field(description="model -> status -> count")
    outcomes: JobOutcomes
    failures: list[FailureStats] = Field(description="failed jobs by model and error code, most first")
    overflow: OverflowStats
    routes: list[RouteStats]
    credits: dict[str, CreditStats] = Field(description="ledger kind -> totals")
    timings: dict[str, TimingStats] = Field(description="model -> averages of succeeded jobs")


class Accepted(Public):
    ok: bool


class QueueUpdate(Public):
    """The data of an SSE ``queue`` event."""

    queue_position: int | None = None
    eta_s: float | None = None


_ERROR_TEXT = {
    400: "bad request", 401: "unauthorized: missing or invalid API key", 402: "insufficient_credits",
    403: "forbidden", 404: "not_found (also for other users' resources)", 408: "the body did not arrive in time",
    409: "conflict (idempotency_conflict, job_active, ...)", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "invalid_input or content_policy", 429: "rate_limited or "
    "concurrency_limit (Retry-After says when to try again)", 503: "not ready",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries: these statuses answer the native error shape."""
    return {status: {"model": ErrorResponse, "description": _ERROR_TEXT.get(status, "error")}
            for status in statuses}


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def output_view(out: dict[str, Any], storage: Storage, ttl_s: int) -> dict[str, Any]:
    view = {
        "url": storage.url(out["key"], ttl_s),
        "content_type": out.get("content_type"),
        "width": out.get("width"),
        "height": out.get("height"),
        "num_frames": out.get("num_frames"),
        "fps": out.get("fps"),
        "duration_s": out.get("duration_s"),
    }
    if out.get("thumbnail_key"):
        view["thumbnail_url"] = storage.url(out["thumbnail_key"], ttl_s)
    if out.get("role") and out["role"] != "output":
        view["role"] = out["role"]
    return view


def job_view(job: Job, storage: Storage, ttl_s: int, queue: QueueEstimate | None = None) -> dict[str, Any]:
    outputs = [output_view(o, storage, ttl_s) for o in job.outputs]
    thumbnail = next((o["thumbnail_url"] for o in outputs if o.get("thumbnail_url")), None)
    return {
        "id": job.id,
        "model": job.model,
        "kind": job.kind,
        "task": job.task,
        "status": job.status,
        "stage": job.stage,
        "progress": job.progress,
        "input": job.input,
        "outputs": outputs,
        "thumbnail_url": thumbnail,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "credits": {"reserved": job.credits_reserved, "charged": job.credits_charged,
                    "refunded": job.credits_refunded},
        "provider": job.provider,
        "route_reason": job.route_reason,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "webhook": job.webhook,
        "webhook_events_filter": job.webhook_events_filter,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "metrics": {"queue_s": job.queue_s, "run_s": job.run_s},
        "result": job.result or None,
        "queue_position": queue.queue_position if queue is not None else None,
        "eta_s": queue.eta_s if queue is not None else None,
        **team_job_fields(job),  # teams: "team" and "submitted_by", on a team's jobs only
        **({"project": job.project_id} if job.project_id else {}),
        **({"pipeline": job.parent_id, "step": job.step_name} if job.parent_id else {}),
    }


def ledger_view(entry: LedgerEntry) -> dict[str, Any]:
    return {"id": entry.id, "kind": entry.kind, "amount": entry.amount, "job_id": entry.job_id,
            "note": entry.note, "balance": entry.available_after, "reserved": entry.reserved_after,
            "created_at": iso(entry.created_at)}


def upload_view(upload: Upload, storage: Storage, ttl_s: int) -> dict[str, Any]:
    return {"id": upload.id, "kind": upload.kind, "filename": upload.filename,
            "content_type": upload.content_type, "size": upload.size, "width": upload.width,
            "height": upload.height, "url": storage.url(upload.key, ttl_s), "meta": upload.meta or None,
            "created_at": iso(upload.created_at)}


def user_view(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "plan": user.plan, "is_admin": user.is_admin,
            "disabled": user.disabled, "created_at": iso(user.created_at)}


def lora_view(lora: Lora, job: Job | None, storage: Storage, ttl_s: int) -> dict[str, Any]:
    return {
        "id": lora.id, "name": lora.name, "base_model": lora.base_model, "trigger_word": lora.trigger_word,
        "status": job.status if job is not None else lora.status,
        "stage": job.stage if job is not None else None,
        "progress": job.progress if job is not None else None,
        "params": lora.params, "summary": lora.summary or None, "job_id": lora.job_id,
        "weights_url": storage.url(lora.weights_key, ttl_s) if lora.weights_key else None,
        "validation_url": storage.url(lora.validation_key, ttl_s) if lora.validation_key else None,
        "error": {"code": job.error_code, "message": job.error_message} if job is not None and job.error_code else None,
        "credits": {"reserved": job.credits_reserved, "charged": job.credits_charged,
                    "refunded": job.credits_refunded} if job is not None else None,
        "created_at": iso(lora.created_at),
    }
