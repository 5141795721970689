"""Pipelines: a parent job (``kind="pipeline"``) with one child job per step.

Submission checks every step (a generation exactly as ``POST /v1/jobs`` checks and prices a job,
an operation through :mod:`models.postprocess`), orders and plans them (:mod:`api.core.pipelines`),
then in ONE transaction admits the account (limits count the pipeline once, debt), inserts the
parent and its steps and reserves each step's price: the whole price is held at once, and each
step settles like any job (capture on success, refund otherwise; exactly once by the ledger).
The parent has no ledger entry; its ``credits_*`` are kept equal to the sums over its steps.

A step that takes another step's output starts ``waiting``; when a step succeeds
(:func:`on_step_finished`, called by ``finish_job`` in the settlement's transaction) every waiting
step whose sources have all succeeded is released: its ``step:<name>`` references become
``job:<id>`` and it is queued. A step that fails or is canceled ends the pipeline (failed /
canceled) and every unfinished step is ended and refunded (waiting/queued now, running through
its cancel). Steps that finished stay charged, their outputs kept.

Lock order (PostgreSQL): a step's row, then its parent's, then the other steps'. Cancel starts
from the row it is asked for (the parent or a step), like every other cancel.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from api.core import ledger
from api.core.errors import CineWeaveError, InsufficientCredits, InvalidInput, NotFound
from api.core.jobs import ACTIVE, TERMINAL, JobStatus, transition
from api.core.limits import check_content_policy
from api.core.pipelines import (
    POSTPROCESS_MODEL,
    GenerationCheck,
    PipelinePlan,
    PlannedStep,
    Step,
    parse_steps,
    plan_pipeline,
    release_input,
    step_error,
    step_refs_of,
)
from api.db.tables import Job, Upload, User, utcnow
from api.services import teams
from api.services.events import PIPELINE_WEBHOOK_EVENTS, record_event
from api.services.inputs import output_media
from api.services.jobs import JobService, Submission, check_project
from api.services.settlement import announce_later, finish_job, locked_job, publish_all, take_announcements
from api.storage.base import Storage

logger = logging.getLogger(__name__)

PIPELINE_KIND = "pipeline"
# presets_expand(session, name, params) -> an object with .steps, .name, .version (and .params),
# or a (steps, name, version) tuple: api.services.presets.expand
PresetsExpand = Callable[[Session, str, dict[str, Any] | None], Any]
_ENDING = "cineweave_pipelines_ending"  # session.info: parents being ended in this transaction


@dataclass(frozen=True)
class PipelineSubmission:
    """The body of ``POST /v1/pipelines``: ``steps``, or a ``preset`` and its ``params``."""

    steps: list[dict[str, Any]] | None = None
    preset: str | None = None
    params: dict[str, Any] | None = None
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    project: str | None = None
    team: str | None = None
    priority: int = 0


@dataclass(frozen=True)
class Expanded:
    """The steps a submission runs (a preset's filled in), and the preset it came from."""

    steps: list[dict[str, Any]]
    preset: str | None = None
    preset_version: int | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineQuote:
    """What a pipeline would cost (per step and in all), and whether the account can pay it now."""

    plan: PipelinePlan
    expanded: Expanded
    balance: ledger.BalanceView
    debt: int = 0
    refused: str | None = None  # member_cap_exceeded

    @property
    def total(self) -> int:
        return self.plan.total

    @property
    def reason(self) -> str | None:
        """Why ``submit`` would refuse to pay (its error code, in submit's order), or None."""
        if self.debt > 0:
            return "account_in_debt"
        if self.refused is not None:
            return self.refused
        return "insufficient_credits" if self.balance.available < self.total else None

    @property
    def affordable(self) -> bool:
        return self.reason is None


def request_hash(sub: PipelineSubmission) -> str:
    """The whole body (steps or preset and params, webhook, filter, project): a replay of an
    Idempotency-Key with another body is a conflict."""
    body = {"kind": PIPELINE_KIND, "steps": sub.steps, "preset": sub.preset, "params": sub.params,
            "webhook": sub.webhook, "webhook_events_filter": sub.webhook_events_filter,
            "project": sub.project}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _media_from_output(source: Job) -> Any:
    """The MediaInfo of a finished job's output (:func:`api.services.inputs.output_media`), or None."""
    from models.postprocess import MediaInfo

    info = output_media(source)
    return MediaInfo(**info) if info is not None else None


class _Checker:
    """The :class:`api.core.pipelines.StepChecker` of one submission (a read session)."""

    def __init__(self, service: PipelineService, session: Session, account: User, member: User) -> None:
        self.service = service
        self.jobs = service.jobs
        self.session = session
        self.account = account
        self.member = member

    def generation(self, step: Step) -> GenerationCheck:
        assert step.model is not None
        checked = self.jobs._check(self.account, Submission(step.model, step.input))
        self.jobs._check_references(self.session, self.member, checked, step_refs=True)
        return GenerationCheck(checked.spec.id, checked.spec.kind, checked.task, checked.input, checked.price)

    def _owned(self, owner: str) -> bool:
        return owner in (self.account.id, self.member.id)

    def media(self, step: Step, field_: str, ref: str, kinds: str) -> Any:
        from models.postprocess import MediaInfo

        if ref.startswith("job:"):
            source = self.session.get(Job, ref[4:])
            if source is None or not self._owned(source.user_id):
                raise step_error(f"step {step.name!r}: input.{field_}: job {ref[4:]} not found", step.name, field_)
            if source.status != JobStatus.SUCCEEDED or not source.outputs:
                raise step_error(f"step {step.name!r}: input.{field_}: job {ref[4:]} is not a finished job "
                                 "with an output", step.name, field_, status=source.status)
            media = _media_from_output(source)
            if media is None:
                raise step_error(f"step {step.name!r}: input.{field_}: job {ref[4:]} ({source.kind}) has no "
                                 f"image or video output", step.name, field_, "pipeline_kind_mismatch",
                                 expected=kinds, got=source.kind)
            return media
        upload = self.session.get(Upload, ref)
        if upload is None or not self._owned(upload.user_id):
            raise step_error(f"step {step.name!r}: input.{field_}: upload {ref} not found", step.name, field_)
        meta = upload.meta or {}
        if upload.kind not in ("image", "video"):
            raise step_error(f"step {step.name!r}: input.{field_}: upload {ref} is {upload.kind}, not {kinds}",
                             step.name, field_, "pipeline_kind_mismatch", expected=kinds, got=upload.kind)
        return MediaInfo(kind=upload.kind, width=int(upload.width or meta.get("width") or 0),
                         height=int(upload.height or meta.get("height") or 0),
                         num_frames=meta.get("num_frames"), fps=meta.get("fps"),
                         duration_s=meta.get("duration_s"), has_audio=bool(meta.get("has_audio")),
                         format=upload.content_type.split("/")[-1] or None)

    def audio_seconds(self, step: Step, field_: str, ref: str) -> float | None:
        upload = self.session.get(Upload, ref)
        if upload is None or not self._owned(upload.user_id):
            raise step_error(f"step {step.name!r}: input.{field_}: upload {ref} not found", step.name, field_)
        if upload.kind != "audio":
            raise step_error(f"step {step.name!r}: input.{field_}: upload {ref} is not an audio upload",
                             step.name, field_, "pipeline_kind_mismatch", expected="audio", got=upload.kind)
        meta = upload.meta or {}
        value = meta.get("duration_s", meta.get("duration"))
        return float(value) if value is not None else None

    def operation_price(self, op: str, output: Any) -> int:
        from models.postprocess import load_operation_catalog, operation_price

        return int(operation_price(op, output, load_operation_catalog().prices))

    def check_text(self, step: Step, texts: list[str]) -> None:
        if texts:
            check_content_policy(texts, self.jobs.settings.content_policy_words)

    def upscaler(self, step: Step, model: str | None) -> str | None:
        upscalers = [s.id for s in self.jobs.catalog.enabled() if "upscale" in s.tasks]
        if model is not None:
            return model if model in upscalers else None
        return upscalers[0] if upscalers else None


class PipelineService:
    def __init__(self, jobs: JobService, presets_expand: PresetsExpand | None = None) -> None:
        self.jobs = jobs
        self.db = jobs.db
        self.settings = jobs.settings
        self.storage = jobs.storage
        self.bus = jobs.bus
        self.presets_expand = presets_expand

    # checking ----------------------------------------------------------------------------
    def _expand(self, session: Session, sub: PipelineSubmission) -> Expanded:
        if (sub.steps is None) == (sub.preset is None):
            raise InvalidInput("give either steps or a preset", {"field": "steps"})
        if sub.steps is not None:
            if sub.params:
                raise InvalidInput("params go with a preset", {"field": "params"})
            return Expanded(list(sub.steps))
        if self.presets_expand is None:
            raise NotFound(f"preset {sub.preset} not found", {"field": "preset"})
        got = self.presets_expand(session, sub.preset or "", sub.params)
        if isinstance(got, tuple):
            steps, name, version = got[:3]
            params = dict(sub.params or {})
        else:
            steps, name, version = got.steps, got.name, got.version
            params = dict(getattr(got, "params", None) or sub.params or {})
        return Expanded(list(steps), name, version, params)

    def _check_extras(self, sub: PipelineSubmission) -> None:
        self.jobs._check_webhook(Submission(PIPELINE_KIND, {}, webhook=sub.webhook,
                                            webhook_events_filter=sub.webhook_events_filter),
                                 allowed=PIPELINE_WEBHOOK_EVENTS)

    def _plan(self, account: User, member: User, sub: PipelineSubmission) -> tuple[Expanded, PipelinePlan]:
        """Every check made before the transaction, and the prices (quote and submit share it)."""
        self._check_extras(sub)
        with self.db.read() as session:
            expanded = self._expand(session, sub)
            steps = parse_steps(expanded.steps, self.settings.pipeline_max_steps)
            plan = plan_pipeline(steps, _Checker(self, session, account, member))
        return expanded, plan

    def quote(self, user: User, sub: PipelineSubmission) -> PipelineQuote:
        """The same checks as :meth:`submit`, no writes: per-step prices and outputs, the total,
        and whether the account can pay (``affordable``/``reason`` as ``JobService.quote``)."""
        member, account = user, self.jobs.account_for(user, sub.team)
        expanded, plan = self._plan(account, member, sub)
        refused = None
        with self.db.read() as session:
            check_project(session, account.id, sub.project)
            balance = ledger.get_balance(session, account.id)
            debt = ledger.get_debt(session, account.id)
            if member is not account:
                try:
                    teams.check_member_cap(session, account.id, member.id, plan.total)
                except InsufficientCredits as exc:
                    refused = exc.code
        return PipelineQuote(plan, expanded, balance, debt, refused)

    # submission ----------------------------------------------------------------------------
    def submit(self, user: User, sub: PipelineSubmission,
               idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Create the pipeline and its steps. Returns ``(parent, created)`` (False: a replay)."""
        digest = request_hash(sub)
        member, account = user, self.jobs.account_for(user, sub.team)
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 200:
                raise InvalidInput("Idempotency-Key must be 1–200 characters", {"field": "Idempotency-Key"})
            with self.db.read() as session:
                existing = self.jobs._by_idempotency_key(session, account.id, idempotency_key)
            if existing is not None:
                return self.jobs._replay(existing, digest), False
        expanded, plan = self._plan(account, member, sub)
        max_active, per_minute, _chars = self.settings.limits_for(account.plan)
        priority = self.jobs.priority_for(account, Submission(PIPELINE_KIND, {}, priority=sub.priority))
        submitted_by = member.id if member is not account else None
        parent = Job(user_id=account.id, model=PIPELINE_KIND, kind=PIPELINE_KIND,
                     task=expanded.preset or PIPELINE_KIND, status=JobStatus.WAITING.value, stage="waiting",
                     input={"steps": [s.as_dict() for s in plan.steps], "preset": expanded.preset,
                            "preset_version": expanded.preset_version, "params": expanded.params},
                     priority=priority, max_attempts=1, credits_reserved=plan.total,
                     idempotency_key=idempotency_key, request_hash=digest, webhook=sub.webhook,
                     webhook_events_filter=sub.webhook_events_filter, submitted_by=submitted_by,
                     project_id=sub.project)
        children = [self._child(parent, planned, priority) for planned in plan.steps]
        try:
            with self.db.session() as session:
                for planned in plan.steps:  # the references again, inside the transaction
                    if planned.step.is_generation and planned.model != POSTPROCESS_MODEL:
                        self._recheck_references(session, member, planned)
                check_project(session, account.id, sub.project)
                self.jobs.admit(session, account.id, max_active, per_minute)
                if member is not account:
                    teams.check_member_cap(session, account.id, member.id, plan.total)
                available = ledger.get_balance(session, account.id).available
                if available < plan.total:
                    raise InsufficientCredits(
                        f"this pipeline costs {plan.total} credits; {available} are available",
                        {"required": plan.total, "available": available,
                         "steps": {s.name: s.price for s in plan.steps}})
                session.add(parent)
                session.flush()
                record_event(session, parent.id, "status", {"status": parent.status, "stage": parent.stage})
                for child in children:
                    session.add(child)
                    session.flush()
                    ledger.reserve(session, account.id, child.id, child.credits_reserved)
                    record_event(session, child.id, "status", {"status": child.status, "stage": child.stage})
                session.commit()
        except IntegrityError:
            if idempotency_key is None:
                raise
            with self.db.session() as session:
                existing = self.jobs._by_idempotency_key(session, account.id, idempotency_key)
            if existing is None:
                raise
            return self.jobs._replay(existing, digest), False
        self.bus.publish(parent.id, "status", {"status": parent.status})
        for child in children:
            self.bus.publish(child.id, "status", {"status": child.status})
            if self.jobs.metrics is not None:
                self.jobs.metrics.job_submitted(child.model, child.kind, child.credits_reserved)
        logger.info("pipeline %s submitted: user=%s steps=%d credits=%d", parent.id, account.id,
                    len(children), plan.total)
        return parent, True

    def _recheck_references(self, session: Session, member: User, planned: PlannedStep) -> None:
        from api.services.jobs import Checked

        spec = self.jobs.spec_for(planned.model)
        checked = Checked(spec, planned.task, planned.input, planned.price, 0, None)
        try:
            self.jobs._check_references(session, member, checked, step_refs=True)
        except CineWeaveError as exc:
            exc.details.setdefault("step", planned.name)
            raise

    def _child(self, parent: Job, planned: PlannedStep, priority: int) -> Job:
        status = JobStatus.WAITING if planned.waits else JobStatus.QUEUED
        return Job(user_id=parent.user_id, model=planned.model, kind=planned.kind, task=planned.task,
                   input=planned.input, status=status.value, stage=status.value, priority=priority,
                   max_attempts=self.settings.max_attempts, credits_reserved=planned.price,
                   submitted_by=parent.submitted_by, project_id=parent.project_id, parent_id=parent.id,
                   step_name=planned.name, step_index=planned.step.index)

    # reading -------------------------------------------------------------------------------
    def get(self, user: User | None, pipeline_id: str) -> tuple[Job, list[Job]]:
        """The pipeline and its steps (submitted order); another account's is not found."""
        parent = self.jobs.get(user, pipeline_id)
        if parent.kind != PIPELINE_KIND:
            raise NotFound(f"pipeline {pipeline_id} not found")
        return parent, self.steps_of([parent.id])[parent.id]

    def steps_of(self, pipeline_ids: list[str]) -> dict[str, list[Job]]:
        """The steps of each pipeline, in submitted order (one query for a page)."""
        out: dict[str, list[Job]] = {pid: [] for pid in pipeline_ids}
        if not pipeline_ids:
            return out
        with self.db.read() as session:
            rows = session.execute(select(Job).where(Job.parent_id.in_(pipeline_ids))
                                   .order_by(Job.step_index)).scalars().all()
        for row in rows:
            out[row.parent_id or ""].append(row)
        return out

    def list(self, user: User | None, **filters: Any) -> tuple[list[Job], str | None]:
        """The account's pipelines, newest first (``JobService.list``'s filters and cursor)."""
        filters.pop("kind", None)
        return self.jobs.list(user, kind=PIPELINE_KIND, **filters)

    # changes -------------------------------------------------------------------------------
    def cancel(self, user: User | None, pipeline_id: str) -> Job:
        """Cancel the pipeline: unfinished steps ended and refunded (running ones through their
        cancel), finished ones kept and charged; the pipeline canceled."""
        parent = self.jobs.get(user, pipeline_id)
        if parent.kind != PIPELINE_KIND:
            raise NotFound(f"pipeline {pipeline_id} not found")
        return self.jobs.cancel(user, pipeline_id)


# in the caller's transaction ---------------------------------------------------------------
def _children(session: Session, parent_id: str) -> list[Job]:
    return list(session.execute(select(Job).where(Job.parent_id == parent_id)
                                .order_by(Job.step_index)).scalars())


def _ending(session: Session) -> set[str]:
    return session.info.setdefault(_ENDING, set())


def _sum_credits(parent: Job, children: list[Job]) -> None:
    parent.credits_charged = sum(c.credits_charged for c in children)
    parent.credits_refunded = sum(c.credits_refunded for c in children)
    done = sum(1 for c in children if c.status == JobStatus.SUCCEEDED)
    if children and parent.status not in TERMINAL:
        parent.progress = round(done / len(children), 4)
    parent.updated_at = utcnow()


def _step_event(session: Session, parent: Job, job: Job) -> None:
    data: dict[str, Any] = {"step": job.step_name, "job_id": job.id, "status": job.status}
    if job.status == JobStatus.SUCCEEDED:
        data.update(outputs=list(job.outputs), credits=job.credits_charged)
        record_event(session, parent.id, "step.completed", data)
        return
    data["error"] = ({"code": job.error_code, "message": job.error_message} if job.error_code
                     else {"code": "canceled", "message": "the step was canceled"})
    record_event(session, parent.id, f"step.{job.status}", data)


def end_parent(session: Session, parent: Job, status: JobStatus, children: list[Job],
               cause: Job | None = None) -> None:
    """The pipeline's own terminal change (never the ledger): outputs on success are the last
    step's; on failure the error is the failed step's (``result.failed_step`` names it)."""
    if parent.status == JobStatus.WAITING and status is JobStatus.SUCCEEDED:
        parent.status = JobStatus.RUNNING.value  # its steps ran without a claim seen (a safety net)
    transition(parent.status, status)
    now = utcnow()
    parent.status = status.value
    parent.stage = status.value
    parent.completed_at = now
    parent.updated_at = now
    if parent.started_at is not None:
        parent.run_s = round((now - parent.started_at).total_seconds(), 3)
    if status is JobStatus.SUCCEEDED:
        parent.progress = 1.0
        last = max(children, key=lambda c: c.step_index or 0)
        parent.outputs = list(last.outputs)
    elif cause is not None:
        if status is JobStatus.FAILED:
            parent.error_code = cause.error_code or "step_failed"
            parent.error_message = cause.error_message or f"step {cause.step_name} failed"
        parent.result = {**(parent.result or {}),
                         "failed_step" if status is JobStatus.FAILED else "canceled_step":
                             {"step": cause.step_name, "job_id": cause.id}}
    _sum_credits(parent, children)
    record_event(session, parent.id, "status", {"status": parent.status, "stage": parent.stage})
    record_event(session, parent.id, "completed", {"status": parent.status})
    announce_later(session, parent.id, "completed", {"status": parent.status})
    logger.info("pipeline %s %s (charged %d, refunded %d)", parent.id, parent.status,
                parent.credits_charged, parent.credits_refunded)


def _end_unfinished(session: Session, storage: Storage, children: list[Job], metrics: Any) -> list[str]:
    """End every unfinished step: waiting/queued canceled and refunded now, running ones asked to
    stop (their runner's settlement refunds them). Returns the ids asked to stop."""
    asked: list[str] = []
    for child in children:
        if child.status not in ACTIVE:
            continue
        # decide on the row as locked: read before the lock, a running step may have been
        # requeued (or ended) since by its runner's transaction
        locked = locked_job(session, child.id) or child
        if locked.status in (JobStatus.WAITING, JobStatus.QUEUED):
            finish_job(session, storage, locked, JobStatus.CANCELED, None, metrics)
            announce_later(session, locked.id, "completed", {"status": locked.status})
        elif locked.status == JobStatus.RUNNING and not locked.cancel_requested:
            locked.cancel_requested = True
            locked.updated_at = utcnow()
            record_event(session, locked.id, "logs", {"message": "cancel requested (the pipeline ended)"})
            announce_later(session, locked.id, "cancel", {})
            asked.append(locked.id)
    return asked


def on_step_finished(session: Session, storage: Storage, job: Job, metrics: Any = None) -> None:
    """A step reached a terminal status (its settlement's transaction, after its ledger entry).

    Success: ``step.completed`` on the parent, ready waiting steps released, the parent's credits
    and progress updated, and the parent succeeds when every step has. Failure or cancel: the
    parent fails or is canceled and every other unfinished step is ended (exactly once: each
    goes through ``finish_job``, whose ledger admits one settlement).
    """
    if job.parent_id is None:
        return
    parent = locked_job(session, job.parent_id)
    if parent is None:
        logger.warning("step %s names a missing pipeline %s", job.id, job.parent_id)
        return
    children = _children(session, parent.id)
    _step_event(session, parent, job)
    ending = _ending(session)
    if parent.status in TERMINAL or parent.id in ending:
        _sum_credits(parent, children)
        return
    if job.status == JobStatus.SUCCEEDED:
        release_ready(session, children)
        _sum_credits(parent, children)
        if all(c.status == JobStatus.SUCCEEDED for c in children):
            end_parent(session, parent, JobStatus.SUCCEEDED, children)
        return
    outcome = JobStatus.FAILED if job.status == JobStatus.FAILED else JobStatus.CANCELED
    ending.add(parent.id)
    try:
        _end_unfinished(session, storage, [c for c in children if c.id != job.id], metrics)
    finally:
        ending.discard(parent.id)
    end_parent(session, parent, outcome, children, cause=job)


def release_ready(session: Session, children: list[Job]) -> list[Job]:
    """Queue each waiting step whose referenced steps have all succeeded (refs → ``job:<id>``)."""
    succeeded = {c.step_name: c.id for c in children if c.status == JobStatus.SUCCEEDED and c.step_name}
    released: list[Job] = []
    for child in children:
        if child.status != JobStatus.WAITING:
            continue
        needs = step_refs_of(child.input)
        if not needs <= set(succeeded):
            continue
        now = utcnow()
        child.input = release_input(child.input, succeeded)
        transition(child.status, JobStatus.QUEUED)
        child.status = JobStatus.QUEUED.value
        child.stage = "queued"
        child.next_attempt_at = None
        child.updated_at = now
        session.add(child)
        record_event(session, child.id, "status", {"status": child.status, "stage": child.stage})
        released.append(child)
        logger.info("pipeline %s: step %s released (%s)", child.parent_id, child.step_name, child.id)
    return released


def on_step_claimed(session: Session, job: Job) -> bool:
    """A runner claimed a step (its claim's transaction): a waiting pipeline starts running.

    False when the step must not run: its pipeline has ended (or is gone), e.g. a step requeued
    after a retryable error while a sibling's failure ended the pipeline; the caller ends it
    canceled (refunded) instead of driving it.
    """
    if job.parent_id is None:
        return True
    parent = locked_job(session, job.parent_id)
    if parent is None or parent.status in TERMINAL:
        return False
    if parent.status != JobStatus.WAITING:
        return True
    now = utcnow()
    parent.status = JobStatus.RUNNING.value
    parent.stage = "running"
    parent.started_at = now
    parent.queue_s = (now - parent.created_at).total_seconds()
    parent.updated_at = now
    parent.attempts = 1
    record_event(session, parent.id, "status", {"status": "running", "stage": "running", "attempt": 1})
    return True


def cancel_locked(session: Session, jobs: JobService, job: Job) -> Job:
    """``JobService.cancel`` of a pipeline or of one of its steps (``job`` is locked, the caller
    authorized): the whole pipeline is canceled, then committed and announced."""
    parent = job if job.kind == PIPELINE_KIND else locked_job(session, job.parent_id or "")
    if parent is None or parent.status in TERMINAL:
        return job
    children = _children(session, parent.id)
    ending = _ending(session)
    ending.add(parent.id)
    try:
        asked = _end_unfinished(session, jobs.storage, children, jobs.metrics)
    finally:
        ending.discard(parent.id)
    end_parent(session, parent, JobStatus.CANCELED, children)
    session.commit()
    # the steps asked to stop ("cancel"), those ended now and the pipeline ("completed")
    publish_all(jobs.bus, take_announcements(session))
    logger.info("pipeline %s canceled (%d steps asked to stop)", parent.id, len(asked))
    return job


def reconcile(session: Session, parent: Job) -> bool:
    """A non-terminal pipeline whose steps are all terminal is ended (a safety net: the steps'
    settlements end it in their own transaction). True when it was."""
    if parent.status in TERMINAL:
        return False
    children = _children(session, parent.id)
    if not children or any(c.status in ACTIVE for c in children):
        return False
    failed = [c for c in children if c.status == JobStatus.FAILED]
    canceled = [c for c in children if c.status == JobStatus.CANCELED]
    if failed:
        end_parent(session, parent, JobStatus.FAILED, children, cause=failed[0])
    elif canceled:
        end_parent(session, parent, JobStatus.CANCELED, children, cause=canceled[0])
    else:
        end_parent(session, parent, JobStatus.SUCCEEDED, children)
    logger.warning("pipeline %s was left %s with every step ended: reconciled", parent.id, parent.status)
    return True


__all__ = ["PIPELINE_KIND", "Expanded", "PipelineQuote", "PipelineService", "PipelineSubmission",
           "cancel_locked", "end_parent", "on_step_claimed", "on_step_finished", "reconcile", "release_ready",
           "request_hash"]
