"""Job events: stored for replay (SSE ``Last-Event-ID``), announced, and turned into webhooks.

The database is the source of truth; the bus and the cross-process signal (``notify``) only wake
readers early. :func:`record_event` runs inside the transaction of the change it records, and in
that same transaction it queues the client's webhook (the outbox row) and the notification, so a
change, its webhook and its announcement commit together or not at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Column, DateTime, func, select
from sqlmodel import Session

from api.db.tables import Job, JobEvent, WebhookDelivery, utcnow
from api.services import notify
from api.services.notify import call_on_loop

logger = logging.getLogger(__name__)

Listener = Callable[[str, str, dict[str, Any]], None]


WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
# a pipeline's webhook also announces each step's end (api/services/pipelines.py)
STEP_WEBHOOK_EVENTS = ("step.completed", "step.failed")
PIPELINE_WEBHOOK_EVENTS = (*WEBHOOK_EVENTS, *STEP_WEBHOOK_EVENTS)
# Replicate sends ``output`` and ``logs`` webhooks at most once per 500 ms each (``start`` and
# ``completed`` always; the completed body carries every output and log line anyway)
THROTTLED_EVENTS = ("output", "logs")
REPLICATE_THROTTLE_S = 0.5
# job columns a webhook never carries (internal bookkeeping)
_PRIVATE_COLUMNS = frozenset({"lease_owner", "lease_expires_at", "request_hash", "idempotency_key", "resume",
                              "next_attempt_at", "priority"})


def webhook_event(type_: str, data: dict[str, Any]) -> str | None:
    """The client webhook event (Replicate's names) a stored job event announces, if any.

    ``start`` is the first claim of the job (a reclaimed attempt is a plain status change).
    """
    if type_ == "status":
        first = data.get("attempt") == 1 and not data.get("resumed")  # a handover keeps attempt 1
        return "start" if data.get("status") == "running" and first else None
    return type_ if type_ in ("output", "logs", "completed", *STEP_WEBHOOK_EVENTS) else None


def record_event(session: Session, job_id: str, type_: str, data: dict[str, Any]) -> JobEvent:
    """Store the event, queue its webhook and its notification, all in ``session``'s transaction."""
    event = JobEvent(job_id=job_id, type=type_, data=data)
    session.add(event)
    hook = webhook_event(type_, data)
    if hook is not None:
        enqueue_webhook(session, job_id, hook, data if hook in STEP_WEBHOOK_EVENTS else None)
    notify.signal(session, "events", _notice(session, job_id, type_, data))
    return event


def _notice(session: Session, job_id: str, type_: str, data: dict[str, Any]) -> dict[str, Any]:
    """The notification of a stored event: a status change also says the new status and, for a
    job queued with a backoff, when it is due (``at``, epoch seconds), so a runner wakes then."""
    notice: dict[str, Any] = {"job": job_id, "type": type_}
    if type_ == "status" and isinstance(data.get("status"), str):
        notice["s"] = data["status"]
        if data["status"] == "queued":
            job = session.get(Job, job_id)  # in the session already: the caller just changed it
            due = job.next_attempt_at if job is not None else None
            if due is not None:
                notice["at"] = round(due.timestamp(), 3)
    return notice


def enqueue_webhook(session: Session, job_id: str, event: str,
                    step: dict[str, Any] | None = None) -> WebhookDelivery | None:
    """An outbox row for the job's webhook, if it has one and its filter wants ``event``.

    ``step``: a pipeline's step event (``step.completed``/``step.failed``): its data rides in the
    payload as ``step_event`` (the renderer presigns its outputs).
    """
    job = session.get(Job, job_id)
    if job is None or not job.webhook:
        return None
    wanted = job.webhook_events_filter or list(PIPELINE_WEBHOOK_EVENTS if job.kind == "pipeline"
                                               else WEBHOOK_EVENTS)
    if event not in wanted:
        return None
    if job.api_shape == "replicate" and event in THROTTLED_EVENTS and _sent_recently(session, job.id, event):
        return None
    payload = job_snapshot(job)
    if step is not None:
        payload["step_event"] = step
    delivery = WebhookDelivery(job_id=job.id, user_id=job.user_id, event=event, url=job.webhook,
                               payload=payload)
    session.add(delivery)
    notify.signal(session, "webhooks", {"job": job_id})
    return delivery


def _sent_recently(session: Session, job_id: str, event: str) -> bool:
    since = utcnow() - timedelta(seconds=REPLICATE_THROTTLE_S)
    return session.execute(select(WebhookDelivery.id).where(
        WebhookDelivery.job_id == job_id, WebhookDelivery.event == event,
        WebhookDelivery.created_at >= since).limit(1)).first() is not None


def job_snapshot(job: Job) -> dict[str, Any]:
    """The job's columns as JSON (datetimes as ISO text): its state at the time of the event."""
    out: dict[str, Any] = {}
    for column in Job.__table__.columns:  # type: ignore[attr-defined]
        if column.name in _PRIVATE_COLUMNS:
            continue
        value = getattr(job, column.name)
        out[column.name] = value.isoformat() if isinstance(value, datetime) else value
    return out


def _is_datetime(column: Column[Any]) -> bool:
    kind = getattr(column.type, "impl", column.type)  # UTCDateTime decorates DateTime
    return isinstance(kind, DateTime)


def job_from_snapshot(snapshot: dict[str, Any]) -> Job:
    """A detached :class:`Job` rebuilt from :func:`job_snapshot` (for rendering only)."""
    values: dict[str, Any] = {}
    for column in Job.__table__.columns:  # type: ignore[attr-defined]
        if column.name not in snapshot:
            continue
        value = snapshot[column.name]
        if isinstance(value, str) and _is_datetime(column):
            value = datetime.fromisoformat(value)
        values[column.name] = value
    return Job(**values)


def events_after(session: Session, job_id: str, after_id: int, limit: int = 500) -> list[JobEvent]:
    return list(session.execute(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id).limit(limit)).scalars())


def events_of(session: Session, job_ids: list[str], types: tuple[str, ...],
              limit_per_job: int = 1000) -> dict[str, list[JobEvent]]:
    """The first ``limit_per_job`` events of ``types`` of each job, in one query (a page of jobs)."""
    if not job_ids:
        return {}
    rank = func.row_number().over(partition_by=JobEvent.job_id, order_by=JobEvent.id).label("rank")
    ranked = (select(JobEvent.id, rank)
              .where(JobEvent.job_id.in_(job_ids), JobEvent.type.in_(types)).subquery())
    rows = session.execute(select(JobEvent).join(ranked, ranked.c.id == JobEvent.id)
                           .where(ranked.c.rank <= limit_per_job).order_by(JobEvent.id)).scalars()
    out: dict[str, list[JobEvent]] = {job_id: [] for job_id in job_ids}
    for event in rows:
        out[event.job_id].append(event)
    return out


class Waiter(asyncio.Event):
    """A reader's wake-up for one job. ``changed``: set with it when something stored changed (an
    event here, or another process's announcement), not by a step preview alone; the reader clears
    it before it reads the table, so a wake by a preview alone needs no read."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = False

    def take_change(self) -> bool:
        """Whether a change came since the last call; clears the flag and the event (call before
        reading: what lands meanwhile sets them again)."""
        changed, self.changed = self.changed, False
        self.clear()
        return changed


PREVIEWS_KEPT = 1024
"""Jobs whose newest step preview the bus holds (one each; a job's goes when it completes)."""
COMPLETED_KEPT = 1024
"""Recently completed jobs the bus remembers, so a late preview of one (in flight from another
process when the job ended) is not held again."""
MAX_PREVIEW_BYTES = 64 * 1024
"""The largest preview the bus holds (its JSON): a step preview is a small JPEG of a few KB."""


class EventBus:
    """Wakes SSE streams and feeds outgoing webhooks after a change is committed.

    Step previews (:meth:`publish_preview`) are live only: the bus keeps the newest one per job
    (each with a sequence number) and wakes the job's streams; they are never stored, never given
    to listeners (so never to webhooks), and a stream sends only those newer than its start. A
    job's pending preview goes when the bus hears it completed (here or from another process), and
    later previews of it are ignored.
    """

    def __init__(self) -> None:
        self._waiters: dict[str, set[Waiter]] = defaultdict(set)
        self._listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previews: dict[str, tuple[int, dict[str, Any]]] = {}
        self._preview_seq = 0
        self._completed: OrderedDict[str, None] = OrderedDict()  # recent ids, oldest first

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop listeners live on; ``publish`` from a worker thread is handed to it."""
        self._loop = loop

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish(self, job_id: str, type_: str, data: dict[str, Any]) -> None:
        """Call after commit, from any thread. Never raises: a broken listener must not break the runner."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._publish_now, job_id, type_, data)
            return
        self._publish_now(job_id, type_, data)

    def _publish_now(self, job_id: str, type_: str, data: dict[str, Any]) -> None:
        if type_ == "completed":
            self._completed_now(job_id)
        self._wake(job_id, changed=True)
        for listener in self._listeners:
            try:
                listener(job_id, type_, data)
            except Exception:  # noqa: BLE001 - isolation is the point
                logger.exception("event listener failed for job %s", job_id)

    def wake(self, job_id: str | None = None) -> None:
        """Wake the waiters of one job (or all) without calling listeners: a change made elsewhere
        (another process, announced by ``notify``) that readers re-read from the table."""
        if job_id is not None:
            self._wake(job_id, changed=True)
            return
        for job in list(self._waiters):
            self._wake(job, changed=True)

    def _wake(self, job_id: str, *, changed: bool) -> None:
        for waiter in list(self._waiters.get(job_id, ())):
            if changed:
                waiter.changed = True
            waiter.set()

    def on_notification(self, message: dict[str, Any]) -> None:
        """``notify`` subscriber for kind ``events`` (runs on the bus's loop); a ``preview`` notice
        (another process's runner, see ``Runner._preview``) carries the preview itself."""
        job_id = message.get("job")
        preview = message.get("preview")
        if message.get("type") == "preview" and isinstance(job_id, str) and isinstance(preview, dict):
            self._preview_now(job_id, preview)
            return
        if message.get("type") == "completed" and isinstance(job_id, str):
            self._completed_now(job_id)
        self.wake(job_id if isinstance(job_id, str) else None)

    # step previews (live only, see the class doc) ------------------------------------------------
    def publish_preview(self, job_id: str, data: dict[str, Any]) -> bool:
        """Hold ``data`` as the job's newest preview (replacing an unsent one) and wake its streams;
        from any thread. False (nothing held) for a preview over :data:`MAX_PREVIEW_BYTES`."""
        size = len(json.dumps(data, separators=(",", ":")))
        if size > MAX_PREVIEW_BYTES:
            logger.warning("preview of job %s dropped: %d bytes (at most %d)", job_id, size, MAX_PREVIEW_BYTES)
            return False
        if self._loop is None:
            self._preview_now(job_id, data)
        else:
            call_on_loop(self._loop, self._preview_now, job_id, data)
        return True

    def _preview_now(self, job_id: str, data: dict[str, Any]) -> None:
        if job_id in self._completed:  # late (in flight when the job ended): nobody needs it
            return
        self._preview_seq += 1
        self._previews.pop(job_id, None)
        self._previews[job_id] = (self._preview_seq, data)
        while len(self._previews) > PREVIEWS_KEPT:
            del self._previews[next(iter(self._previews))]
        self._wake(job_id, changed=False)  # nothing stored changed: a stream need not read the table

    def _completed_now(self, job_id: str) -> None:
        self._previews.pop(job_id, None)
        self._completed.pop(job_id, None)
        self._completed[job_id] = None
        while len(self._completed) > COMPLETED_KEPT:
            self._completed.popitem(last=False)

    def preview_seq(self) -> int:
        """The sequence number of the newest preview so far (a stream sends only later ones)."""
        return self._preview_seq

    def preview(self, job_id: str, after: int) -> tuple[int, dict[str, Any]] | None:
        """The job's newest preview if its sequence number is above ``after``."""
        held = self._previews.get(job_id)
        return held if held is not None and held[0] > after else None

    def waiter(self, job_id: str) -> Waiter:
        event = Waiter()
        self._waiters[job_id].add(event)
        return event

    def release(self, job_id: str, event: Waiter) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(job_id, None)
