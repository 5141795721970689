"""Pipelines over HTTP: the request body, the answer shapes, and the views that build them.

A pipeline is a parent job (``kind == "pipeline"``) with one child job per step (see
api/services/pipelines.py). The views here read the parent and its children and present them as
one resource: the parent's ``waiting`` (no step started yet) is shown as ``queued``; ``stage``,
``progress``, ``credits`` and ``outputs`` are derived from the steps; every output URL is presigned
when the view is built (at send time for SSE and webhooks).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select

from api.core.jobs import JobStatus
from api.db.engine import Database
from api.db.tables import Job, WebhookDelivery
from api.http.schemas import JobCredits, JobError, OutputPublic, Public, QuoteBalance, iso, output_view
from api.services.teams import team_job_fields
from api.storage.base import Storage

POSTPROCESS_MODEL = "postprocess"
MAX_BODY_STEPS = 64
"""A bound on the body alone (the configured ``pipeline_max_steps``, default 8, is the service's
check and answers ``pipeline_too_many_steps``); this only stops a huge body before any work."""


# requests ----------------------------------------------------------------------------------
class PipelineStepIn(BaseModel):
    """One step: a generation (``model``: a catalog id, ``input`` as ``POST /v1/jobs`` takes it) or a
    post-processing operation (``op``). An input field may name an earlier step's output:
    ``"image": "step:still"``, ``"video": "step:motion"``, ``"videos": ["step:a", "step:b"]``."""

    # lenient on purpose: the pipeline validator checks names, keys and references and answers
    # 422 with ``details.step`` and ``details.field`` (a schema error here could not name the step)
    model_config = ConfigDict(extra="allow")

    name: str = Field(max_length=64, description="^[a-z][a-z0-9_-]{0,31}$, unique in the pipeline")
    model: str | None = Field(default=None, max_length=64, description="a catalog model id")
    op: str | None = Field(default=None, max_length=32,
                           description="upscale | interpolate | trim | loop | concat | watermark | audio | export")
    input: dict[str, Any] = Field(default_factory=dict)


class PipelineCreate(BaseModel):
    """``steps``, or a ``preset`` (its name) with its ``params``; never both."""

    model_config = ConfigDict(extra="forbid")

    steps: list[PipelineStepIn] | None = Field(default=None, min_length=1, max_length=MAX_BODY_STEPS)
    preset: str | None = Field(default=None, min_length=1, max_length=64)
    params: dict[str, Any] | None = None
    webhook: str | None = Field(default=None, max_length=2048)
    webhook_events_filter: list[str] | None = Field(
        default=None, description="start, output, logs, step.completed, step.failed, completed")
    team: str | None = Field(default=None, min_length=1, max_length=64)
    project: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _steps_or_preset(self) -> PipelineCreate:
        if (self.steps is None) == (self.preset is None):
            raise ValueError("give either steps or a preset (with its params), not both and not neither")
        if self.params is not None and self.preset is None:
            raise ValueError("params go with a preset")
        return self

    def step_dicts(self) -> list[dict[str, Any]] | None:
        """The steps as the service takes them (a step names ``model`` or ``op``, not both keys)."""
        if self.steps is None:
            return None
        return [step.model_dump(exclude_none=True) for step in self.steps]


# answers -----------------------------------------------------------------------------------
class PipelineStepError(JobError):
    step: str | None = Field(default=None, description="the step that failed")


class PipelineStepPublic(Public):
    name: str
    index: int
    job_id: str
    model: str | None = Field(default=None, description="a generation step's model")
    op: str | None = Field(default=None, description="a post-processing step's operation")
    kind: str = Field(description="what the step outputs: image | video")
    status: str = Field(description="waiting (its inputs are not ready) | queued | running | succeeded | "
                                    "failed | canceled")
    stage: str | None = None
    progress: float
    outputs: list[OutputPublic]
    credits: JobCredits
    error: JobError | None = None
    attempts: int
    depends_on: list[str] = Field(description="the steps whose outputs it takes")


class PipelinePublic(Public):
    id: str
    object: str = Field(description="always pipeline")
    status: str = Field(description="queued (no step started yet) | running | succeeded | failed | canceled")
    stage: str | None = Field(default=None, description="where it is, e.g. 'step 2/4: motion'")
    progress: float = Field(description="finished steps plus the running step's fraction, over the steps")
    preset: str | None = None
    preset_version: int | None = None
    params: dict[str, Any] | None = None
    project: str | None = None
    team: str | None = Field(default=None, description="the team whose credits pay for it")
    submitted_by: str | None = Field(default=None, description="the member who submitted it as the team")
    outputs: list[OutputPublic] = Field(description="the final step's outputs")
    thumbnail_url: str | None = None
    error: PipelineStepError | None = None
    credits: JobCredits = Field(description="sums over the steps")
    cancel_requested: bool
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    steps: list[PipelineStepPublic]


class PipelineEventStep(Public):
    """A ``step.completed`` (or ``step.failed``) webhook's step: the body is the pipeline plus this."""

    name: str
    job_id: str
    outputs: list[OutputPublic]
    status: str | None = None
    error: JobError | None = None
    credits: int | None = Field(default=None, description="what the step was charged")


class PipelineWebhookBody(PipelinePublic):
    event_step: PipelineEventStep | None = None


class PipelineList(Public):
    data: list[PipelinePublic]
    next_cursor: str | None = None


class PipelineStepQuote(Public):
    name: str
    index: int
    model: str | None = None
    op: str | None = None
    kind: str
    task: str | None = None
    credits: int
    output: dict[str, Any] = Field(description="what the step will produce: kind, width, height, num_frames, "
                                               "fps, duration_s")
    depends_on: list[str] = Field(default_factory=list)


class PipelineQuote(Public):
    """``POST /v1/pipelines/quote``: what ``POST /v1/pipelines`` with the same body would reserve."""

    steps: list[PipelineStepQuote]
    credits: int = Field(description="the total: what submitting reserves (each step charged when it succeeds)")
    preset: str | None = None
    preset_version: int | None = None
    output: dict[str, Any] | None = Field(default=None, description="what the final step will produce")
    balance: QuoteBalance
    affordable: bool
    reason: str | None = Field(default=None, description="insufficient_credits | account_in_debt | "
                                                         "member_cap_exceeded; null when affordable")


# views -------------------------------------------------------------------------------------
def _refs(value: Any) -> list[str]:
    """The step names a normalized input value refers to (``step:<name>``)."""
    if isinstance(value, str):
        return [value[5:]] if value.startswith("step:") else []
    if isinstance(value, list):
        return [name for item in value for name in _refs(item)]
    if isinstance(value, dict):
        return [name for item in value.values() for name in _refs(item)]
    return []


def depends_on(step: dict[str, Any]) -> list[str]:
    """The steps a normalized step (as the parent's ``input.steps`` stores it) takes outputs of."""
    given = step.get("depends_on")
    if isinstance(given, list):
        return [str(name) for name in given]
    seen: list[str] = []
    for name in _refs(step.get("input") or {}):
        if name not in seen:
            seen.append(name)
    return seen


def _credits(jobs: list[Job]) -> dict[str, int]:
    return {"reserved": sum(j.credits_reserved or 0 for j in jobs),
            "charged": sum(j.credits_charged or 0 for j in jobs),
            "refunded": sum(j.credits_refunded or 0 for j in jobs)}


def _error(job: Job) -> dict[str, Any] | None:
    return {"code": job.error_code, "message": job.error_message} if job.error_code else None


def step_view(child: Job, defined: dict[str, Any], storage: Storage, ttl_s: int) -> dict[str, Any]:
    view: dict[str, Any] = {"name": child.step_name, "index": child.step_index, "job_id": child.id}
    if child.model == POSTPROCESS_MODEL:
        view["op"] = child.task
    else:
        view["model"] = child.model
    view.update({
        "kind": child.kind, "status": child.status, "stage": child.stage, "progress": child.progress or 0.0,
        "outputs": presigned(child.outputs, storage, ttl_s),
        "credits": _credits([child]), "error": _error(child), "attempts": child.attempts,
        "depends_on": depends_on(defined),
    })
    return view


def _stage(children: list[Job]) -> str | None:
    """``step i/n: name`` of the step it is on: the first running one, else the first not finished."""
    total = len(children)
    current = next((c for c in children if c.status == JobStatus.RUNNING), None)
    if current is None:
        current = next((c for c in children if c.status in (JobStatus.QUEUED, JobStatus.WAITING)), None)
    if current is None:
        return None
    return f"step {(current.step_index or 0) + 1}/{total}: {current.step_name}"


def _progress(parent: Job, children: list[Job]) -> float:
    if parent.status == JobStatus.SUCCEEDED:
        return 1.0
    if not children:
        return 0.0
    done = sum(1 for c in children if c.status == JobStatus.SUCCEEDED)
    running = sum(min(1.0, max(0.0, c.progress or 0.0)) for c in children if c.status == JobStatus.RUNNING)
    return round(min(1.0, (done + running) / len(children)), 4)


def pipeline_view(parent: Job, children: list[Job], storage: Storage, ttl_s: int) -> dict[str, Any]:
    """The public pipeline: ``parent`` (a ``kind == "pipeline"`` job) and its step jobs (any order)."""
    children = sorted(children, key=lambda c: (c.step_index or 0, c.id))
    spec = parent.input or {}
    defined = {str(s.get("name")): s for s in spec.get("steps") or [] if isinstance(s, dict)}
    steps = [step_view(c, defined.get(c.step_name or "", {}), storage, ttl_s) for c in children]
    final = parent.outputs or []
    if not final and children and children[-1].status == JobStatus.SUCCEEDED:
        final = children[-1].outputs or []
    outputs = presigned(final, storage, ttl_s)
    thumbnail = next((o["thumbnail_url"] for o in outputs if o.get("thumbnail_url")), None)
    error = _error(parent)
    if error is not None:
        failed = next((c for c in children if c.status == JobStatus.FAILED), None)
        error["step"] = failed.step_name if failed is not None else None
    active = parent.status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
    return {
        "id": parent.id,
        "object": "pipeline",
        "status": JobStatus.QUEUED.value if parent.status == JobStatus.WAITING else parent.status,
        "stage": _stage(children) if active else None,
        "progress": _progress(parent, children),
        "preset": spec.get("preset"),
        "preset_version": spec.get("preset_version"),
        "params": spec.get("params") or None,
        "project": parent.project_id,
        **team_job_fields(parent),
        "outputs": outputs,
        "thumbnail_url": thumbnail,
        "error": error,
        "credits": _credits(children) if children else _credits([parent]),
        "cancel_requested": bool(parent.cancel_requested),
        "webhook": parent.webhook,
        "webhook_events_filter": parent.webhook_events_filter,
        "created_at": iso(parent.created_at),
        "started_at": iso(parent.started_at),
        "completed_at": iso(parent.completed_at),
        "steps": steps,
    }


def event_step_view(data: dict[str, Any], storage: Storage, ttl_s: int) -> dict[str, Any]:
    """A ``step.*`` event's step (``{"step" or "name", "job_id", "outputs": [storage output dicts]}``),
    its outputs presigned now."""
    view = {"name": data.get("step", data.get("name")), "job_id": data.get("job_id"),
            "outputs": presigned(data.get("outputs"), storage, ttl_s)}
    for extra in ("status", "error", "credits"):
        if data.get(extra) is not None:
            view[extra] = data[extra]
    return view


def presigned(outputs: Any, storage: Storage, ttl_s: int) -> list[dict[str, Any]]:
    """Stored output dicts (``key``...) as public outputs; an already public one (``url``) is kept."""
    views: list[dict[str, Any]] = []
    for out in outputs or []:
        if isinstance(out, dict) and out.get("key"):
            views.append(output_view(out, storage, ttl_s))
        elif isinstance(out, dict) and out.get("url"):
            views.append(out)
    return views


# reading for the views (SSE and webhooks render at send time) ---------------------------------
def load_steps(db: Database, parent_id: str) -> list[Job]:
    """A pipeline's step jobs, in step order."""
    with db.read() as session:
        return list(session.execute(select(Job).where(Job.parent_id == parent_id)
                                    .order_by(Job.step_index, Job.id)).scalars())


def pipeline_webhook_body(db: Database, storage: Storage, ttl_s: int, parent: Job,
                          row: WebhookDelivery | None) -> dict[str, Any]:
    """A pipeline's webhook body: the pipeline shape (the parent as it was at the event, its steps
    as they are now) and, for a ``step.*`` event, ``event_step`` (that step's outputs, presigned)."""
    body = pipeline_view(parent, load_steps(db, parent.id), storage, ttl_s)
    if row is not None and row.event.startswith("step."):
        data = (row.payload or {}).get("step_event")  # the step event's data, put there when queued
        if isinstance(data, dict):
            body["event_step"] = event_step_view(data, storage, ttl_s)
    return body


def quote_view(quote: Any) -> dict[str, Any]:
    """``POST /v1/pipelines/quote``'s answer from :class:`api.services.pipelines.PipelineQuote`."""
    steps = []
    for planned in quote.plan.steps:
        entry: dict[str, Any] = {"name": planned.name, "index": planned.step.index}
        if planned.step.is_generation:
            entry["model"] = planned.model
        else:
            entry["op"] = planned.task
        entry.update(kind=planned.kind, task=planned.task, credits=planned.price,
                     output=planned.output.model_dump(mode="json"), depends_on=list(planned.step.depends_on))
        steps.append(entry)
    return {"steps": steps, "credits": quote.total, "preset": quote.expanded.preset,
            "preset_version": quote.expanded.preset_version, "output": steps[-1]["output"] if steps else None,
            "balance": {"available": quote.balance.available, "reserved": quote.balance.reserved,
                        "debt": quote.debt},
            "affordable": quote.affordable, "reason": quote.reason}
