"""Ending a job: terminal state plus exactly one settlement (capture or refund), or a requeue.

Used by the runner, by cancel (a queued job) and by maintenance (expired leases, stuck jobs).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from api.core import ledger
from api.core.events import ErrorEvent
from api.core.executor import REATTACH_KEY
from api.core.jobs import JobStatus, retry, transition
from api.core.public_errors import public_message
from api.db.engine import Database, is_postgres
from api.db.tables import Job, Lora, utcnow
from api.services.events import EventBus, record_event
from api.settings import Settings
from api.storage.base import Storage

logger = logging.getLogger(__name__)


def delete_job_outputs(storage: Storage, job: Job) -> int:
    removed = storage.delete_prefix(output_prefix(job.user_id, job.id))
    for out in job.outputs:
        for key in (out.get("key"), out.get("thumbnail_key")):
            if key and storage.exists(key):
                storage.delete(key)
                removed += 1
    return removed


def output_prefix(user_id: str, job_id: str) -> str:
    return f"outputs/{user_id}/{job_id}/"


def locked_job(session: Session, job_id: str) -> Job | None:
    """The job row, locked for update on PostgreSQL (SQLite already holds the write lock).

    ``populate_existing``: a row already in the session is reloaded, so what the caller sees is
    what the lock protects (after waiting for it, another transaction may have changed the row).
    """
    query = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    if is_postgres(session.get_bind()):
        query = query.with_for_update()
    return session.execute(query).scalars().first()


_ANNOUNCE = "cineweave_announce"  # session.info: what to publish on the bus once committed
Announcement = tuple[str, str, dict[str, Any]]


def announce_later(session: Session, job_id: str, type_: str, data: dict[str, Any]) -> None:
    """Queue a bus publication for a job this transaction changed besides the caller's own (a
    pipeline's parent, the steps it ended); the committer publishes them (:func:`publish_all`)."""
    session.info.setdefault(_ANNOUNCE, []).append((job_id, type_, data))


def take_announcements(session: Session) -> list[Announcement]:
    """The publications queued in this session (and forget them): call after the commit."""
    return list(session.info.pop(_ANNOUNCE, []))


def publish_all(bus: EventBus | None, announcements: list[Announcement]) -> None:
    """Publish committed changes; a failure is logged (listeners also poll)."""
    if bus is None:
        return
    for job_id, type_, data in announcements:
        try:
            bus.publish(job_id, type_, data)
        except Exception:  # noqa: BLE001 - listeners also poll; the change is committed
            logger.warning("announcing job %s failed", job_id, exc_info=True)


def reclaim_expired(db: Database, settings: Settings, storage: Storage, bus: EventBus,
                    metrics: Any = None) -> int:
    """Jobs whose runner vanished: retry them, or fail and refund when out of attempts.

    Each job is reclaimed in its own transaction; one that fails (a storage error, a bug) is
    logged and left for the next pass, so it never holds back the others.
    """
    now = utcnow()
    reclaimed = 0
    with db.read() as session:
        stale = session.execute(select(Job.id).where(
            Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)).scalars().all()
    for job_id in stale:
        try:
            others = _reclaim_one(db, settings, storage, job_id, now, metrics)
            if others is None:
                continue
        except Exception:  # noqa: BLE001 - one bad job must not stop the pass
            logger.exception("reclaiming job %s failed; trying again on the next pass", job_id)
            continue
        reclaimed += 1
        try:
            announce(db, bus, job_id)
        except Exception:  # noqa: BLE001 - listeners also poll; the reclaim is committed
            logger.warning("announcing reclaimed job %s failed", job_id, exc_info=True)
        publish_all(bus, others)  # a step's pipeline and the siblings its end ended
    return reclaimed


def _reclaim_one(db: Database, settings: Settings, storage: Storage, job_id: str, now: datetime,
                 metrics: Any) -> list[Announcement] | None:
    """Reclaim one expired job (if it still is); None when it was not, else what else to announce
    (a step's pipeline and siblings its end changed)."""
    with db.lease_session() as session:
        job = locked_job(session, job_id)
        if job is None or job.status != JobStatus.RUNNING or not job.lease_expires_at \
                or job.lease_expires_at >= now:
            return None
        logger.warning("lease of job %s (runner %s) expired; reclaiming", job.id, job.lease_owner)
        if job.cancel_requested:
            finish_job(session, storage, job, JobStatus.CANCELED, None, metrics)
        elif job.attempts < job.max_attempts:
            # Its outputs stay: the replica owns the run and may have stored them (with its
            # result.json) or still be storing them; the next attempt collects or overwrites them.
            requeue_job(session, settings, storage, job, "worker_lost", "the worker running this job stopped",
                        keep_outputs=True)
        else:
            finish_job(session, storage, job, JobStatus.FAILED,
                       ErrorEvent("worker_lost", "the worker running this job stopped", True), metrics)
        session.commit()
        return take_announcements(session)


def _reattach_where_it_ran(job: Job, run_goes_on: bool) -> None:
    """Tell the next attempt where the run it may attach to lives (``resume.reattach_route``).

    A job taken back from a runner that stopped or vanished still has its run going (or done) on
    the replica: the router must send the next attempt there, not overflow it to a provider
    because the queue looks long, which would pay for the same work twice. A job requeued after a
    real failure has no run to attach to and routes afresh.
    """
    resume = dict(job.resume or {})
    if run_goes_on and job.provider:
        resume[REATTACH_KEY] = job.provider
    else:
        resume.pop(REATTACH_KEY, None)
    job.resume = resume


def release_job(session: Session, job: Job) -> None:
    """A graceful handover (the API stops, e.g. for a deploy): back to the queue now, without
    consuming an attempt.

    ``attempts`` counts distinct runs, and this run goes on: the replica owns it, and the next
    claim attaches to it (with the same attempt number). Stored files stay; the recorded outputs
    are cleared, as the attached run replays them. The caller checked that it holds the lease.
    """
    now = utcnow()
    job.status = JobStatus.QUEUED.value
    job.stage = "queued"
    job.outputs = []
    job.attempts = max(0, job.attempts - 1)
    job.lease_owner = None
    job.lease_expires_at = None
    job.next_attempt_at = now
    job.updated_at = now
    _reattach_where_it_ran(job, True)
    record_event(session, job.id, "status", {"status": job.status, "stage": "handover",
                                             "attempt": job.attempts})
    logger.info("job %s handed back to the queue (its run continues on the replica)", job.id)


def requeue_job(session: Session, settings: Settings, storage: Storage, job: Job, code: str,
                message: str, *, trusted: bool = False, keep_outputs: bool = False) -> None:
    """Back to the queue after a retryable failure, with exponential backoff.

    ``keep_outputs``: leave the stored files (a reclaimed job whose replica may still deliver them);
    the job's recorded outputs are cleared either way.

    The event clients see carries the code's safe message (:mod:`api.core.public_errors`); the
    raw ``message`` goes to the log only.
    """
    status = retry(job.status, job.attempts, job.max_attempts)
    backoff = settings.retry_backoff_s * (2 ** max(0, job.attempts - 1))
    logger.warning("job %s attempt %d failed (%s: %s); retrying in %.1fs", job.id, job.attempts,
                   code, message, backoff)
    message = public_message(code, message, trusted=trusted)
    if not keep_outputs:
        delete_job_outputs(storage, job)
    job.status = status.value
    job.stage = "retrying"
    job.progress = 0.0
    job.outputs = []
    job.lease_owner = None
    job.lease_expires_at = None
    job.next_attempt_at = utcnow() + timedelta(seconds=backoff)
    job.updated_at = utcnow()
    _reattach_where_it_ran(job, keep_outputs)
    record_event(session, job.id, "status", {"status": job.status, "stage": job.stage,
                                             "error": {"code": code, "message": message},
                                             "attempt": job.attempts})

def finish_job(session: Session, storage: Storage, job: Job, status: JobStatus, error: ErrorEvent | None,
               metrics: Any = None, *, trusted: bool = False) -> None:
    """Terminal state plus exactly one settlement, in the caller's transaction.

    ``error`` is stored as its code and the code's safe message (the raw message is logged with
    the job id); ``trusted`` keeps the message of an allow-listed code our own validation wrote.
    """
    transition(job.status, status)
    now = utcnow()
    job.status = status.value
    job.stage = status.value
    job.completed_at = now
    job.updated_at = now
    job.lease_owner = None
    job.lease_expires_at = None
    if job.started_at is not None:
        job.run_s = round((now - job.started_at).total_seconds(), 3)
    if status is JobStatus.SUCCEEDED:
        job.progress = 1.0
        entry = ledger.capture(session, job.id)
        job.credits_charged = entry.amount
    else:
        entry = ledger.refund(session, job.id)
        job.credits_refunded = entry.amount
        # A refunded job (canceled, or failed on its last attempt) keeps no output: it delivered
        # nothing, and output expiry only sweeps succeeded jobs.
        delete_job_outputs(storage, job)
        job.outputs = []
    if error is not None:
        job.error_code = error.code
        job.error_message = public_message(error.code, error.message, trusted=trusted)
        if job.error_message != error.message:
            logger.warning("job %s failed: %s: %s", job.id, error.code, error.message)
    if job.lora_id:
        _settle_lora(session, job)
    record_event(session, job.id, "status", {"status": job.status, "stage": job.stage})
    record_event(session, job.id, "completed", {"status": job.status})
    logger.info("job %s %s (charged %d, refunded %d)", job.id, job.status, job.credits_charged,
                job.credits_refunded)
    if metrics is not None:
        metrics.finished(job)
    if job.parent_id is not None:
        # a pipeline's step: release the next steps or end the pipeline, in this transaction
        from api.services.pipelines import on_step_finished  # lazy: pipelines imports this module

        on_step_finished(session, storage, job, metrics)


def announce(db: Database, bus: EventBus, job_id: str) -> None:
    """Tell listeners (SSE, webhooks) about a committed status change."""
    with db.read() as session:
        job = session.get(Job, job_id)
        status = job.status if job else None
    type_ = "completed" if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED) else "status"
    bus.publish(job_id, type_, {"status": status})


def _settle_lora(session: Session, job: Job) -> None:
    """Copy a training job's outcome onto its LoRA."""
    lora = session.get(Lora, job.lora_id)
    if lora is None:
        return
    lora.status = job.status
    if job.status == JobStatus.SUCCEEDED:
        result = job.result or {}
        lora.weights_key = result.get("weights_key")
        lora.validation_key = result.get("validation_key")
        lora.summary = {k: result[k] for k in ("loss", "rank", "alpha", "steps") if k in result}
    session.add(lora)
