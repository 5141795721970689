"""Start deadlines (Replicate's ``Cancel-After``): a job not started by its deadline is aborted and
refunded in full; one running at that time is canceled through the native cancel path.

A job with a deadline carries ``start_deadline_at``. Two things enforce it: the runner never
claims a queued job whose deadline passed (a filter in its claim), and the :class:`DeadlineWatcher`
of each API process sleeps until the earliest deadline, then settles the jobs that are due. It is
woken by this process's submissions (the event bus) and other processes' (the ``events``
notification of a queued job), and re-reads at least every ``deadline_poll_s`` as a safety net.

Race-free by locking: an abort takes the job row (``locked_job``) and acts only while it is still
``queued``; the runner's claim is a conditional update on ``queued``, so exactly one of them wins.
An aborted job is native ``canceled`` with ``error_code = start_deadline_exceeded`` (Replicate
shows it as ``aborted``); there is no new native status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from api.core.aio import wait_event
from api.core.errors import InvalidInput
from api.core.events import ErrorEvent
from api.core.jobs import JobStatus
from api.db.engine import Database
from api.db.tables import Job, utcnow
from api.services.events import EventBus
from api.services.jobs import JobService
from api.services.settlement import finish_job, locked_job
from api.settings import Settings
from api.storage.base import Storage

logger = logging.getLogger(__name__)

ABORT_CODE = "start_deadline_exceeded"
ABORT_MESSAGE = "the job did not start before its Cancel-After deadline"
MAX_CANCEL_AFTER_S = 7 * 24 * 3600.0
_DURATION = re.compile(r"^(?:(?P<h>\d{1,4})h)?(?:(?P<m>\d{1,5})m)?(?:(?P<s>\d{1,6})s)?$")


def parse_cancel_after(value: str) -> float:
    """Seconds of a ``Cancel-After`` value: ``90s``, ``5m``, ``1h30m`` (hours, minutes, seconds in
    that order, each at most once, integers). Anything else is a 422 ``invalid_input``."""
    text = value.strip()
    match = _DURATION.match(text)
    if not text or match is None or not any(match.groupdict().values()):
        raise InvalidInput(f"Cancel-After must be a duration such as 90s, 5m or 1h30m (got {value!r})",
                           {"field": "Cancel-After"})
    parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    seconds = parts.get("h", 0) * 3600.0 + parts.get("m", 0) * 60.0 + parts.get("s", 0)
    if not 1 <= seconds <= MAX_CANCEL_AFTER_S:
        raise InvalidInput(f"Cancel-After must be between 1s and {int(MAX_CANCEL_AFTER_S // 3600)}h",
                           {"field": "Cancel-After", "seconds": seconds})
    return seconds


def is_aborted(job: Job) -> bool:
    return job.status == JobStatus.CANCELED and job.error_code == ABORT_CODE


class DeadlineWatcher:
    """Settles jobs whose start deadline passed; one per API process."""

    def __init__(self, db: Database, settings: Settings, storage: Storage, bus: EventBus,
                 jobs: JobService, metrics: Any = None) -> None:
        self.db = db
        self.settings = settings
        self.storage = storage
        self.bus = bus
        self.jobs = jobs
        self.metrics = metrics
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0  # rounds done (tests wait for the watcher to be asleep)
        bus.add_listener(self._on_event)

    # lifecycle ----------------------------------------------------------------------------
    def _on_event(self, _job_id: str, type_: str, data: dict[str, Any]) -> None:
        if type_ == "status" and data.get("status") == JobStatus.QUEUED:
            self._wake.set()  # a submission (or a requeue) may carry an earlier deadline

    def on_notification(self, message: dict[str, Any]) -> None:
        """``notify`` subscriber for kind ``events``: another process queued a job (it may carry
        an earlier deadline than the one this watcher sleeps until)."""
        if message.get("type") == "status" and message.get("s") == JobStatus.QUEUED:
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_forever(), name="deadlines")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run_forever(self) -> None:
        while True:
            self._wake.clear()  # before the round: a wake during it is kept
            wait_s = self.settings.deadline_poll_s
            try:
                await asyncio.to_thread(self.enforce_due)
                soonest = await asyncio.to_thread(self.next_deadline)
                if soonest is not None:
                    wait_s = min(wait_s, max(0.0, (soonest - utcnow()).total_seconds()) + 0.01)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the database may be briefly away; try again later
                logger.exception("deadline watcher: a round failed")
            self.rounds += 1
            await wait_event(self._wake, wait_s)

    # one round ------------------------------------------------------------------------------
    def next_deadline(self) -> datetime | None:
        """The earliest deadline of an active job not yet acted on."""
        with self.db.read() as session:
            return session.execute(select(func.min(Job.start_deadline_at)).where(
                Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
                Job.start_deadline_at.is_not(None), Job.cancel_requested.is_(False))).scalar()

    def enforce_due(self, now: datetime | None = None) -> int:
        """Abort (never started) or cancel (started) every active job whose deadline passed."""
        now = now or utcnow()
        with self.db.read() as session:
            due = list(session.execute(select(Job.id).where(
                Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
                Job.start_deadline_at.is_not(None), Job.start_deadline_at <= now,
                Job.cancel_requested.is_(False)).order_by(Job.start_deadline_at)).scalars())
        acted = 0
        for job_id in due:
            try:
                if self.abort(job_id, now) or self._cancel(job_id):
                    acted += 1
            except Exception:  # noqa: BLE001 - one bad job must not hold back the others
                logger.exception("deadline of job %s: settling failed; trying again next round", job_id)
        return acted

    def abort(self, job_id: str, now: datetime | None = None) -> bool:
        """A queued job that never started: canceled with ``start_deadline_exceeded``, full refund.
        False when it is no longer queued-and-unstarted (the runner claimed it first)."""
        now = now or utcnow()
        with self.db.session() as session:
            job = locked_job(session, job_id)
            if job is None or job.status != JobStatus.QUEUED or job.started_at is not None \
                    or job.start_deadline_at is None or job.start_deadline_at > now:
                return False
            finish_job(session, self.storage, job, JobStatus.CANCELED, ErrorEvent(ABORT_CODE, ABORT_MESSAGE, False),
                       self.metrics)
            session.commit()
        self.bus.publish(job_id, "completed", {"status": JobStatus.CANCELED.value})
        logger.info("job %s aborted: not started before its deadline", job_id)
        return True

    def _cancel(self, job_id: str) -> bool:
        """A job that started (running, or queued again for a retry): the native cancel."""
        job = self.jobs.cancel(None, job_id)
        logger.info("job %s canceled at its deadline (was %s)", job_id, job.status)
        return True
