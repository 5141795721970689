"""The runner: claims queued jobs, drives an Executor, settles credits exactly once.

Safety rests on the database, not on this process staying alive:
- a claim is a conditional UPDATE (``status='queued'`` → ``running`` with a lease), so several
  runners never take the same job;
- every later write checks that this runner still holds the lease; a runner that lost its lease
  (it stalled, another runner reclaimed the job) stops and writes nothing more;
- an expired lease is reclaimed by any runner: the job is retried, or failed and refunded;
- capture and refund go through the ledger, which admits one settlement per job.

Nothing here blocks the event loop: every database call runs on the runner's own small thread
pool (not the loop's default executor, which other code shares: a burst of ``to_thread`` work
elsewhere must not delay a claim or a settlement), and lease renewals run on a second pool with
one thread per job slot, so a renewal never queues behind claims, records or other renewals.
A renewal that fails (a database error, or a call still blocked) is retried until the lease would
have expired; then the runner gives the job up (``LeaseLost``) and writes nothing more for it.

Wake-ups, not polling: the loop sleeps until something can be claimed. The one cross-process
signal (:mod:`api.services.notify`) says so: a job queued in this process wakes it right after the
commit (no round trip), one queued elsewhere through PostgreSQL ``LISTEN/NOTIFY``; a job requeued
with a backoff says when it is due and the loop wakes then; a job of this runner that ends frees
its slot and wakes the loop directly. ``runner_poll_s`` is only the safety net (a lost
notification, a lease that expired), and the sweep for expired leases runs at that pace, not on
every wake-up.

Fairness: the next job is taken from the user served least recently (round-robin across users
within a priority), so one user's burst does not starve the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import heapq
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session

from api.core.aio import wait_event
from api.core.errors import CineWeaveError
from api.core.events import (
    CheckpointEvent,
    DoneEvent,
    ErrorEvent,
    ExecutorEvent,
    LogEvent,
    OutputEvent,
    PreviewEvent,
    ProgressEvent,
    ProviderEvent,
    StageEvent,
    event_to_dict,
)
from api.core.executor import ExecutionRequest, Executor
from api.core.jobs import JobStatus
from api.db.engine import Database, DatabaseBusy
from api.db.tables import Job, User, utcnow
from api.runner.preview_notify import PreviewThrottle
from api.services.events import EventBus, record_event
from api.services.notify import MAX_PAYLOAD_BYTES, Notifier, call_on_loop
from api.services.settlement import (
    Announcement,
    announce,
    finish_job,
    locked_job,
    output_prefix,
    publish_all,
    reclaim_expired,
    release_job,
    requeue_job,
    take_announcements,
)
from api.settings import Settings
from api.storage.base import Storage

logger = logging.getLogger(__name__)

PROGRESS_MIN_INTERVAL_S = 0.2
DUE_EVENTS_AHEAD = 4
"""A write that is due waits for events already there (a stream item carries several): for at most
this many, so a steady flood of events still gets written at the pace above."""
MAX_DUE = 1024  # retry due times remembered for wake-ups (more: the safety poll finds them)
CLAIM_CANDIDATES = 8
DB_THREADS = 4  # claims, records and settlements; SQLite serialises writes anyway
WRITE_RETRY_S = 0.1
CANCEL_SENDS = 30  # cancels sent to a run that goes on after one (one per poll interval, times 4)
GIVEN_UP_KEPT = 256  # jobs remembered as given up (see Runner._given_up)

T = TypeVar("T")


class LeaseLost(Exception):
    """This runner no longer owns the job: another runner reclaimed it."""


Recorded = tuple[ExecutorEvent, str, dict[str, Any]]  # an event, and the type and data published for it


@dataclass(frozen=True)
class Settled:
    """What a settlement wrote: the job's new status, the events recorded with it, and for a
    requeued job when it is due again (epoch seconds)."""

    status: str
    recorded: list[Recorded]
    due: float | None = None
    others: list[Announcement] = field(default_factory=list)  # a step's pipeline, the siblings it ended


def coalesce(pending: list[ExecutorEvent], event: ExecutorEvent) -> None:
    """Buffer ``event``: a progress or stage event replaces a buffered one of the same stage (only
    the latest is worth writing); everything else is kept, in order."""
    if isinstance(event, ProgressEvent | StageEvent) and pending:
        last = pending[-1]
        if isinstance(last, ProgressEvent | StageEvent) and last.stage == event.stage and not (
                isinstance(last, ProgressEvent) and isinstance(event, StageEvent)):
            pending[-1] = event
            return
    pending.append(event)


def _fits_notify(notice: dict[str, Any]) -> bool:
    """Whether a notification carrying ``notice`` stays under PostgreSQL's payload limit (with room
    for the kind and the origin token ``notify`` adds)."""
    return len(json.dumps(notice, separators=(",", ":")).encode()) <= MAX_PAYLOAD_BYTES - 64


def database_unavailable(exc: BaseException) -> bool:
    """An error that says the database could not be reached or was busy (worth a retry), as
    opposed to one the same write would raise again (a bug, a constraint violation)."""
    if isinstance(exc, DatabaseBusy | OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


InputFn = Callable[[Job], dict[str, Any]]


class Runner:
    def __init__(self, db: Database, executor: Executor, settings: Settings, storage: Storage,
                 bus: EventBus | None = None, *, runner_id: str | None = None,
                 resolve_input: InputFn | None = None, metrics: Any = None,
                 notifier: Notifier | None = None) -> None:
        self.db = db
        self.executor = executor
        self.settings = settings
        self.storage = storage
        self.bus = bus or EventBus()
        self.id = runner_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.resolve_input = resolve_input
        self.metrics = metrics
        # bounded: at most runner_concurrency entries (a slot is freed when its task ends)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._lease_deadline: dict[str, float] = {}  # job id -> monotonic time its lease runs out
        # jobs this runner gave up (LeaseLost), newest last: a write still blocked on the database
        # when it gave up must not land once unblocked, even if the row's lease has a few ms left.
        # An id leaves when this runner claims the job again, or after GIVEN_UP_KEPT newer ones
        # (such a write is stuck for at most the busy timeout).
        self._given_up: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._stopping = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._db_pool: ThreadPoolExecutor | None = None
        self._lease_pool: ThreadPoolExecutor | None = None
        self.notifier = notifier
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()  # something may be claimable: run a tick now
        self._due: list[float] = []  # heap of epoch seconds at which a requeued job becomes due
        self._cancel_wakes: dict[str, asyncio.Event] = {}  # job id -> set when a cancel may be requested
        self._queued_behind: dict[str, int] = {}  # job id -> same-model jobs claimed right after it
        self._next_models: dict[str, list[str]] = {}  # job id -> models of the candidates behind its claim
        # cancel notices for jobs not (yet) watched: one may arrive between a claim's commit and the
        # watch's registration
        self._recent_cancels: collections.deque[str] = collections.deque(maxlen=256)
        self._listening = False
        self.ticks = 0  # ticks the loop has finished (tests wait for the first one before submitting)
        # queued-job notices heard, and how many of them a claim has since looked past: equal means
        # nothing new was queued since the queue was last seen empty (a freed slot needs no query)
        self._queued_seen = 0
        self._queued_claimed = -1
        # cross-process previews (PostgreSQL NOTIFY): paced per job, bounded in concurrency
        self.preview_throttle = PreviewThrottle(self._send_preview)

    # threads -----------------------------------------------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking (database) call on the runner's pool, off the event loop."""
        self._bind_bus()
        if self._db_pool is None:
            self._db_pool = ThreadPoolExecutor(DB_THREADS, thread_name_prefix=f"runner-db-{self.id}")
        return await asyncio.get_running_loop().run_in_executor(self._db_pool, functools.partial(fn, *args))

    async def _under_lease(self, job_id: str, fn: Callable[..., T], *args: Any, optional: bool = False) -> T | None:
        """A write for a job this runner holds.

        Only a database-availability error (busy, connection lost) is retried, and never longer
        than ``lease_s`` after the first failure nor past the lease (then the job is given up:
        LeaseLost); it is never mistaken for an executor failure, which would rerun the GPU work.
        Any other error (a bug, a constraint violation) is raised at once: retrying it would keep
        the job running forever while the heartbeat renews the lease. ``optional`` writes
        (progress, logs) are dropped on a database error. ``fn`` must do nothing but its
        transaction: side effects after the commit (publishes, metrics) belong to the caller, or
        a retry would repeat them.
        """
        first_failure: float | None = None
        while True:
            try:
                return await self._call(fn, *args)
            except LeaseLost:
                raise
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                if optional:
                    logger.warning("dropping an update of job %s: the database refused it", job_id, exc_info=True)
                    return None
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                deadline = min(self._lease_deadline.get(job_id, now), first_failure + self.settings.lease_s)
                if now + WRITE_RETRY_S >= deadline:
                    logger.warning("could not write job %s before its lease ran out; giving it up", job_id,
                                   exc_info=True)
                    raise LeaseLost(job_id) from None
                logger.warning("writing job %s failed; retrying", job_id, exc_info=True)
                await asyncio.sleep(WRITE_RETRY_S)

    def _lease_executor(self) -> ThreadPoolExecutor:
        if self._lease_pool is None:
            self._lease_pool = ThreadPoolExecutor(max(1, self.settings.runner_concurrency),
                                                  thread_name_prefix=f"runner-lease-{self.id}")
        return self._lease_pool

    def _bind_bus(self) -> None:
        """Publishes from the runner's threads must reach listeners on the loop (EventBus.bind)."""
        if getattr(self.bus, "_loop", None) is None:
            self.bus.bind(asyncio.get_running_loop())

    def _shutdown_pools(self) -> None:
        for pool in (self._db_pool, self._lease_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._db_pool = self._lease_pool = None

    # lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping.clear()
        self._bind_bus()
        self._listen()
        self._loop_task = asyncio.create_task(self.run_forever(), name=f"runner-{self.id}")

    def _listen(self) -> None:
        """Hear what makes a job claimable (notifications) and cancel requests (bus and notifications)."""
        self._loop = asyncio.get_running_loop()
        if self._listening:
            return
        self._listening = True
        self.bus.add_listener(self._on_bus)
        if self.notifier is not None:
            self.notifier.subscribe("events", self._on_notice)

    def _unlisten(self) -> None:
        if self.notifier is not None and self._listening:
            self.notifier.unsubscribe("events", self._on_notice)
        # the bus keeps its listener (it has no removal); _on_bus ignores jobs this runner does not hold

    # wake-ups ------------------------------------------------------------------------------
    def _on_threadsafe(self, fn: Callable[[], None]) -> None:
        call_on_loop(self._loop, fn)

    def wake(self) -> None:
        """Claim now (from any thread): something may have become claimable."""
        self._on_threadsafe(self._wake.set)

    def _on_notice(self, message: dict[str, Any]) -> None:
        """``notify`` subscriber (kind ``events``), on the loop: wake for a queued job (at once, or
        when its backoff ends) and wake the cancel watch of a job this runner drives."""
        type_ = message.get("type")
        job_id = message.get("job")
        if message.get("reconnected") or type_ is None:  # missed notifications, or a shrunk payload
            self._queued_seen += 1
            self._wake.set()
            for event in self._cancel_wakes.values():
                event.set()
            return
        if type_ == "status" and message.get("s") == "queued":
            at = message.get("at")
            if isinstance(at, int | float) and at > time.time():
                self._add_due(float(at))
            else:
                self._queued_seen += 1
                self._wake.set()
        elif type_ == "logs" and isinstance(job_id, str):
            self._cancel_notice(job_id)  # a cancel request is recorded as a log line

    def _on_bus(self, job_id: str, type_: str, _data: dict[str, Any]) -> None:
        """Bus listener: a cancel requested in this process (``JobService.cancel`` publishes it)."""
        if type_ == "cancel":
            self._cancel_notice(job_id)

    def _cancel_notice(self, job_id: str) -> None:
        wake = self._cancel_wakes.get(job_id)
        if wake is not None:
            wake.set()
        else:
            self._recent_cancels.append(job_id)

    def _add_due(self, at: float, *, wake: bool = True) -> None:
        if len(self._due) >= MAX_DUE or at in self._due:
            return
        earliest = not self._due or at < self._due[0]
        heapq.heappush(self._due, at)
        if wake and earliest:
            self._wake.set()  # the loop recomputes its wait: this one is the earliest

    def _wait_s(self, since_sweep_s: float) -> float:
        """Until the next safety-net sweep or the earliest retry due, whichever comes first."""
        wait = max(0.0, self.settings.runner_poll_s - since_sweep_s)
        if self._due:
            wait = min(wait, max(0.0, self._due[0] - time.time()))
        return wait

    async def stop(self, grace_s: float = 5.0, *, release_leases: bool = True) -> None:
        """Stop claiming; let running jobs finish for ``grace_s``, then abandon them.

        Abandoning a job only drops this runner's stream: the replica keeps generating (it owns
        the run). With ``release_leases`` (a graceful stop, e.g. a deploy) the abandoned jobs go
        straight back to the queue without consuming an attempt, so the next API claims them now
        and attaches to the replica's run instead of waiting ``lease_s``; without it (a simulated
        crash) they keep their lease until it expires, and the reclaim counts a lost worker.
        Either way stopping never loses or double-charges a job.
        """
        self._stopping.set()
        self._wake.set()
        self._unlisten()
        if self._loop_task:
            await asyncio.wait([self._loop_task], timeout=grace_s)
        tasks = list(self._tasks.items())
        if tasks:
            _, pending = await asyncio.wait([t for _, t in tasks], timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            abandoned = [job_id for job_id, task in tasks if task in pending]
            if abandoned and release_leases:
                with contextlib.suppress(Exception):  # best effort: the lease expires anyway
                    await asyncio.wait_for(self._call(self._release_leases, abandoned), timeout=5)
        if self._loop_task and not self._loop_task.done():
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._shutdown_pools()

    def _release_leases(self, job_ids: list[str]) -> int:
        """Hand ``job_ids`` (held by this runner) back to the queue at once, keeping their attempt:
        a graceful stop is no failure, and a job must survive any number of deploys."""
        released: list[str] = []
        for job_id in job_ids:
            with self.db.lease_session() as session:
                job = locked_job(session, job_id)
                if job is None or job.status != JobStatus.RUNNING or job.lease_owner != self.id:
                    continue
                release_job(session, job)
                session.commit()
            released.append(job_id)
        for job_id in released:
            with contextlib.suppress(Exception):  # listeners also poll
                self._announce(job_id)
        logger.info("runner %s handed %d abandoned job(s) back to the queue", self.id, len(released))
        return len(released)

    async def run_forever(self) -> None:
        """Tick when woken (a job queued or due, a slot freed) and, as a safety net, every
        ``runner_poll_s``; the sweep for expired leases runs only at that pace."""
        last_sweep: float | None = None
        while not self._stopping.is_set():
            self._wake.clear()  # before the tick: a wake-up during it runs another
            started_at, started_wall = time.monotonic(), time.time()
            sweep = last_sweep is None or started_at - last_sweep >= self.settings.runner_poll_s
            if self._due and self._due[0] <= started_wall:
                self._queued_seen += 1  # a backoff ended: a job is claimable
            try:
                await self.tick(sweep=sweep)
                if sweep:
                    last_sweep = started_at
            except Exception:  # noqa: BLE001 - the loop must survive a bad tick (db hiccup)
                logger.exception("runner tick failed")
                last_sweep = started_at  # a failing database: retry at the poll's pace, not in a spin
            while self._due and self._due[0] <= started_wall:
                heapq.heappop(self._due)  # due before this tick began: it has looked for them
            self.ticks += 1
            if self._stopping.is_set():
                break
            wait = self._wait_s(time.monotonic() - (last_sweep or started_at))
            await wait_event(self._wake, wait)

    async def tick(self, *, sweep: bool = True) -> int:
        """Claim and start jobs into free slots (first, with ``sweep``, reclaim expired leases and
        learn when the next requeued job is due). Returns jobs started."""
        if sweep:
            await self._call(self.reclaim_expired)
        started = 0
        # Woken by a freed slot with nothing queued since the queue was last seen empty: no query.
        # Without a notifier nothing says when a job is queued, so every tick looks.
        nothing_new = self.notifier is not None and self._queued_claimed == self._queued_seen
        while len(self._tasks) < self.settings.runner_concurrency and not self._stopping.is_set() \
                and (sweep or not nothing_new):
            seen = self._queued_seen
            job, more = await self._call(self._claim)
            if job is None or not more:
                self._queued_claimed = seen  # the queue held nothing more, as of the notices up to `seen`
            if job is None:
                break
            # the cancel watch's wake-up exists from the claim on: a cancel requested before the
            # watch starts is not missed (nor one requested before the claim committed)
            # followers announced to the replica: the same model's among the jobs this tick claims
            # next (as many as it has slots left), in the claim's order
            free_after = max(0, self.settings.runner_concurrency - len(self._tasks) - 1)
            following = self._next_models.pop(job.id, [])[:free_after]
            self._queued_behind[job.id] = sum(1 for model in following if model == job.model)
            wake = self._cancel_wakes.setdefault(job.id, asyncio.Event())
            if job.cancel_requested or job.id in self._recent_cancels:
                wake.set()
            task = asyncio.create_task(self._drive_guarded(job), name=f"job-{job.id}")
            self._tasks[job.id] = task
            task.add_done_callback(functools.partial(self._slot_freed, job.id))
            started += 1
            if not more:
                break  # nothing else was queued: no second query (a new job wakes the loop)
        if sweep and len(self._tasks) < self.settings.runner_concurrency:
            due = await self._call(self._next_due)
            if due is not None:
                self._add_due(due, wake=False)  # the loop computes its wait after this tick
        return started

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Tick until nothing is queued or running here (tests and `maintenance`)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            await self.tick()
            if not self._tasks and not await self._call(self._has_claimable):
                return
            await asyncio.sleep(self.settings.runner_poll_s)
        raise TimeoutError("runner did not drain in time")

    @property
    def active_job_ids(self) -> list[str]:
        return list(self._tasks)

    def _gave_up(self, job_id: str) -> None:
        """Remember that this runner gave the job up (see ``_given_up``; the oldest are forgotten)."""
        self._given_up[job_id] = None
        while len(self._given_up) > GIVEN_UP_KEPT:
            self._given_up.popitem(last=False)

    def _slot_freed(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self._lease_deadline.pop(job_id, None)
        self._cancel_wakes.pop(job_id, None)
        self._queued_behind.pop(job_id, None)
        self._wake.set()  # a free slot: claim the next queued job now

    # claiming ----------------------------------------------------------------------------
    def _has_claimable(self) -> bool:
        with self.db.read() as session:
            return session.execute(select(Job.id).where(
                Job.status == JobStatus.QUEUED.value)).first() is not None

    def claim_next(self) -> Job | None:
        """Claim one job (blocking; the loop calls it on the runner's pool)."""
        job = self._claim()[0]
        if job is not None:
            self._next_models.pop(job.id, None)  # not driven here: nothing follows it to a replica
        return job

    def _claim(self) -> tuple[Job | None, bool]:
        """Claim one job in one transaction; also say whether more may be claimable now.

        Round trips: the candidates, one ``UPDATE … RETURNING`` that claims the job and sets its
        start (no re-read), the user's turn, the status event; then the commit.
        """
        claimed_at = time.monotonic()  # the lease runs out lease_s after this, at the latest
        now = utcnow()
        with self.db.lease_session() as session:
            candidates = session.execute(
                select(Job.id, Job.user_id, Job.started_at, Job.created_at, Job.model)
                .join(User, User.id == Job.user_id)
                .where(Job.status == JobStatus.QUEUED.value,
                       (Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= now),
                       # a passed start deadline (Cancel-After): the deadline watcher aborts it
                       (Job.start_deadline_at.is_(None)) | (Job.start_deadline_at > now))
                .order_by(Job.priority.desc(), User.last_served_at.asc().nulls_first(), Job.created_at.asc())
                .limit(CLAIM_CANDIDATES)).all()
            for index, (job_id, user_id, started_at, created_at, _model) in enumerate(candidates):
                first = started_at is None
                values: dict[str, Any] = {
                    "status": JobStatus.RUNNING.value, "stage": "starting", "lease_owner": self.id,
                    "lease_expires_at": now + timedelta(seconds=self.settings.lease_s),
                    "attempts": Job.attempts + 1, "updated_at": now, "next_attempt_at": None}
                if first:  # started_at is only ever set by a claim, and this one is conditional on queued
                    values.update(started_at=now, queue_s=(now - created_at).total_seconds())
                job = session.execute(
                    update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
                    .values(**values).returning(Job)
                    .execution_options(synchronize_session=False, populate_existing=True)).scalars().first()
                if job is None:
                    continue  # another runner took it
                session.execute(update(User).where(User.id == user_id).values(last_served_at=now)
                                .execution_options(synchronize_session=False))
                if job.parent_id is not None:  # a pipeline's step: a waiting pipeline starts running
                    from api.services.pipelines import on_step_claimed  # lazy: keeps imports light

                    if not on_step_claimed(session, job):
                        # its pipeline ended (e.g. a sibling failed while it was requeued): never run
                        logger.warning("step %s claimed after its pipeline ended: canceled", job.id)
                        finish_job(session, self.storage, job, JobStatus.CANCELED, None, self.metrics)
                        session.commit()
                        publish_all(self.bus, [(job.id, "completed", {"status": job.status}),
                                               *take_announcements(session)])
                        continue
                data: dict[str, Any] = {"status": job.status, "stage": job.stage, "attempt": job.attempts}
                if not first:
                    data["resumed"] = True  # claimed before (a handover keeps attempt 1): no second "start"
                record_event(session, job.id, "status", data)
                session.commit()
                self._lease_deadline[job.id] = claimed_at + self.settings.lease_s
                self._given_up.pop(job.id, None)
                self.bus.publish(job.id, "start" if job.attempts == 1 and first else "status",
                                 {"status": job.status, "attempt": job.attempts})
                logger.info("runner %s claimed job %s (attempt %d)", self.id, job.id, job.attempts)
                more = index + 1 < len(candidates) or len(candidates) == CLAIM_CANDIDATES
                # the models of the claimable jobs right behind it: the tick claims them next, and
                # the replica's batch waits for the ones announced (ReplicaRequest.queued_behind)
                self._next_models[job.id] = [c[4] for c in candidates[index + 1:]]
                return job, more
        return None, False

    def _next_due(self) -> float | None:
        """When the earliest job requeued with a backoff becomes due (epoch seconds), if any."""
        with self.db.read() as session:
            due = session.execute(select(func.min(Job.next_attempt_at)).where(
                Job.status == JobStatus.QUEUED.value, Job.next_attempt_at > utcnow())).scalar()
        return due.timestamp() if due is not None else None

    def reclaim_expired(self) -> int:
        """Jobs whose runner vanished: retry them, or fail and refund when out of attempts."""
        return reclaim_expired(self.db, self.settings, self.storage, self.bus, self.metrics)

    # driving -----------------------------------------------------------------------------
    async def _drive_guarded(self, job: Job) -> None:
        try:
            await self.drive(job)
        except LeaseLost:
            self._gave_up(job.id)
            logger.warning("runner %s lost the lease of job %s; leaving it to its new owner", self.id, job.id)
        except asyncio.CancelledError:
            logger.warning("runner %s abandoned job %s (shutdown); its lease will expire", self.id, job.id)
            raise
        except Exception:  # noqa: BLE001 - a bug here must not kill the loop
            logger.exception("runner failed driving job %s", job.id)
        finally:
            self._lease_deadline.pop(job.id, None)

    def _request(self, job: Job) -> ExecutionRequest:
        data = dict(job.input)
        if self.resolve_input is not None:
            data = self.resolve_input(job)
        return ExecutionRequest(job_id=job.id, user_id=job.user_id, model=job.model, kind=job.kind,
                                task=job.task, input=data, attempt=job.attempts,
                                output_prefix=output_prefix(job.user_id, job.id), resume=dict(job.resume),
                                queued_behind=self._queued_behind.pop(job.id, 0))

    async def drive(self, job: Job) -> None:
        self._lease_deadline.setdefault(job.id, time.monotonic() + self.settings.lease_s)
        heartbeat = asyncio.create_task(self._heartbeat(job.id))
        try:
            # input resolution may read uploads or fetch a URL: off the loop, under the heartbeat
            request = await asyncio.to_thread(self._request, job)
        except CineWeaveError as exc:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            # our own validation wrote this message: it may reach the client as it is
            # ... and says itself whether a retry may help (a fetch that timed out)
            error = ErrorEvent(exc.code, exc.message, retryable=bool(getattr(exc, "retryable", False)))
            await self._settle(job.id, functools.partial(self._settle_error, job.id, error, trusted=True))
            return
        except BaseException:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            raise
        if heartbeat.done():
            heartbeat.result()  # raises LeaseLost
        cancel_watch = asyncio.create_task(self._watch_cancel(job.id))
        final: ExecutorEvent | None = None
        timer = getattr(self.metrics, "stage_timer", None)
        stages = timer(job.model) if timer is not None else None  # "starting" until the first stage
        loop = asyncio.get_running_loop()
        # Coalescing: progress, stages, logs and outputs are buffered and written together, at most
        # one write per PROGRESS_MIN_INTERVAL_S; a provider or checkpoint event is written at once
        # (with what is buffered, in order); a due write first takes the events already there
        # (DUE_EVENTS_AHEAD); what is still buffered at the end goes into the settlement's
        # transaction, so the last progress and every output are always written.
        # The local route too: a job taken back from a dead runner reattaches to its replica run
        # only if the job says where it ran (``settlement._reattach_where_it_ran``).
        pending: list[ExecutorEvent] = []
        late = 0  # events buffered while a write was due (the next one was ready at once)
        last_write = loop.time()  # the claim
        flush_at: list[float | None] = [None]  # when what is buffered must be written
        stream = self.executor.run(request)
        events = self._events(stream, heartbeat, lambda: flush_at[0])
        try:
            async for event in events:
                if heartbeat.done():
                    heartbeat.result()  # raises LeaseLost
                if event is None:  # the flush deadline passed with no event: write what is buffered
                    await self._write(job.id, pending)
                    pending, last_write, flush_at[0], late = [], loop.time(), None, 0
                    continue
                if isinstance(event, PreviewEvent):  # live only: never written, never a webhook
                    self._preview(job.id, event)
                    continue
                if stages is not None and isinstance(event, StageEvent | ProgressEvent):
                    stages.enter(event.stage)
                if isinstance(event, DoneEvent | ErrorEvent):
                    final = event
                    break
                coalesce(pending, event)
                # A due write (the flush time passed) waits for the events already there: the
                # replica sends what it has ready as one item, so a job's output and result come
                # together, and the output is written in the settlement's transaction.
                late += loop.time() - last_write >= PROGRESS_MIN_INTERVAL_S
                if isinstance(event, ProviderEvent | CheckpointEvent) or late > DUE_EVENTS_AHEAD:
                    await self._write(job.id, pending)
                    pending, last_write, flush_at[0], late = [], loop.time(), None, 0
                elif flush_at[0] is None:
                    flush_at[0] = last_write + PROGRESS_MIN_INTERVAL_S  # past, once due: written next
        except LeaseLost:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - an executor crash is a retryable failure
            logger.exception("executor failed on job %s", job.id)
            # the detail is logged here; settlement stores only the code's safe message
            final = ErrorEvent("executor_error", f"{type(exc).__name__}: {exc}", retryable=True)
        finally:
            if stages is not None:
                stages.close()
            with contextlib.suppress(Exception):
                await events.aclose()  # first: it cancels a read ahead still pending on the stream
            heartbeat.cancel()
            cancel_watch.cancel()
            await asyncio.gather(heartbeat, cancel_watch, return_exceptions=True)
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
        if final is None:
            final = ErrorEvent("incomplete", "the executor ended without a result", retryable=True)
        if isinstance(final, DoneEvent):
            await self._settle(job.id, functools.partial(self._settle_success, job.id, final, pending))
        else:
            await self._settle(job.id, functools.partial(self._settle_error, job.id, final, pending=pending))

    async def _write(self, job_id: str, events: list[ExecutorEvent]) -> None:
        """Record ``events`` in one transaction under the lease, then publish them. Only progress,
        stages and logs: dropped on a database error; with anything else: retried (``_under_lease``)."""
        if not events:
            return
        optional = all(isinstance(e, ProgressEvent | StageEvent | LogEvent) for e in events)
        recorded = await self._under_lease(job_id, self._record_many, job_id, events, optional=optional)
        for event, type_, data in recorded or ():
            self._after_record(job_id, event, type_, data)

    async def _settle(self, job_id: str, settle: Callable[[], Settled]) -> None:
        """Settle under the lease, then announce. A settlement that fails for another reason than
        the database (a bug) is replaced by a retryable ``executor_error``, so the job still ends
        (a retry, or a refund on its last attempt) instead of waiting for its lease to expire.

        The announcement needs no re-read: the settlement says the status it wrote."""
        try:
            settled = await self._under_lease(job_id, settle)
        except LeaseLost:
            raise
        except Exception as exc:  # noqa: BLE001 - logged; the job must still settle
            logger.exception("settling job %s failed; settling it as an executor error", job_id)
            settled = await self._under_lease(job_id, functools.partial(
                self._settle_error, job_id,
                ErrorEvent("executor_error", f"{type(exc).__name__}: {exc}", retryable=True)))
        if settled is None:
            return
        for event, type_, data in settled.recorded:
            self._after_record(job_id, event, type_, data)
        terminal = settled.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
        if terminal:
            self.preview_throttle.forget(job_id)  # a preview still waiting is of a finished job
        try:
            self.bus.publish(job_id, "completed" if terminal else "status", {"status": settled.status})
        except Exception:  # noqa: BLE001 - listeners also poll; the settlement is committed
            logger.warning("announcing job %s failed", job_id, exc_info=True)
        publish_all(self.bus, settled.others)
        if settled.due is not None:
            self._add_due(settled.due)  # its backoff: this runner wakes when it ends

    def _preview(self, job_id: str, event: PreviewEvent) -> None:
        """Hand a step preview to SSE subscribers, never blocking the job.

        In this process through the bus. On PostgreSQL also to the other API processes, as a NOTIFY
        (kind ``events``, type ``preview``) when it fits the payload limit, paced by
        :class:`~api.runner.preview_notify.PreviewThrottle` (at most one per job per 250 ms, the
        newest wins, a few at once). A preview too big for a notification reaches only this
        process's streams.
        """
        data = {"step": event.step, "total": event.total, "image": event.image,
                "width": event.width, "height": event.height}
        notifier = self.notifier
        notice = {"job": job_id, "type": "preview", "preview": data}
        if notifier is None or not notifier.postgres or not _fits_notify(notice):
            self.bus.publish_preview(job_id, data)
            return
        self.preview_throttle.offer(job_id, notice)

    async def _send_preview(self, job_id: str, notice: dict[str, Any]) -> None:
        """One preview NOTIFY (its own process hears it after the commit, the others through the
        server), off the event loop; on failure at least this process's streams get it."""
        notifier = self.notifier
        try:
            if notifier is None:
                raise RuntimeError("no notifier")
            await asyncio.to_thread(notifier.publish, "events", notice)
        except Exception as exc:  # noqa: BLE001 - at least this process's streams get it
            logger.debug("preview NOTIFY of job %s failed: %s", job_id, exc)
            self.bus.publish_preview(job_id, notice["preview"])

    def _after_record(self, job_id: str, event: ExecutorEvent, type_: str, data: dict[str, Any]) -> None:
        """Side effects of a committed record: never retried with the write, never failing the job."""
        try:
            if self.metrics is not None and isinstance(event, ProviderEvent):
                self.metrics.routed(job_id, event)
        except Exception:  # noqa: BLE001 - metrics must not fail a job
            logger.warning("metrics for job %s failed", job_id, exc_info=True)
        try:
            self.bus.publish(job_id, type_, data)
        except Exception:  # noqa: BLE001 - listeners also poll the database
            logger.warning("publishing an event of job %s failed", job_id, exc_info=True)

    @staticmethod
    async def _events(stream: Any, heartbeat: asyncio.Task[None],
                      flush_at: Callable[[], float | None] = lambda: None) -> Any:
        """The executor's events, until the heartbeat ends: a lost lease (LeaseLost) is raised at
        once, even while the executor is silent, and the stale run is no longer waited on.

        ``None`` is yielded when the loop time ``flush_at()`` passes with no event (the pending
        read goes on): the caller writes what it buffered.

        One event is read ahead (never past a result): while the caller records an event, the
        executor goes on, e.g. sends the request to the replica while the router's provider event
        is written, instead of waiting for that write. Closing this generator (the caller leaves)
        cancels a read still pending, before the caller closes the stream."""
        events = stream.__aiter__()
        loop = asyncio.get_running_loop()
        step: asyncio.Future[Any] | None = None
        try:
            while True:
                if step is None:
                    step = asyncio.ensure_future(events.__anext__())
                deadline = flush_at()
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait({step, heartbeat}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    if heartbeat.done():  # the lease is lost
                        heartbeat.result()  # raises LeaseLost (the pending read is cancelled below)
                        return
                    yield None  # the flush deadline
                    continue
                done, step = step, None
                try:
                    event = done.result()
                except StopAsyncIteration:
                    return
                if not isinstance(event, DoneEvent | ErrorEvent):
                    step = asyncio.ensure_future(events.__anext__())  # read ahead
                yield event
        finally:
            if step is not None and not step.done():
                step.cancel()  # the caller left, the lease is lost, or this task is being cancelled
                await asyncio.gather(step, return_exceptions=True)

    async def _heartbeat(self, job_id: str) -> None:
        """Renew the lease every ``lease_s / 3`` on the lease pool; raise LeaseLost when it is gone.

        A renewal that errors or hangs is retried until the lease would have run out: from then on
        another runner may hold the job, so this one gives it up (and writes nothing more).
        """
        interval = max(0.05, self.settings.lease_s / 3)
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._lease_deadline.get(job_id, time.monotonic() + self.settings.lease_s)
            await asyncio.sleep(max(0.0, min(interval, deadline - time.monotonic())))
            asked_at = time.monotonic()
            remaining = deadline - asked_at
            if remaining <= 0:
                logger.warning("runner %s could not renew the lease of job %s in time", self.id, job_id)
                raise LeaseLost(job_id)
            try:
                renewed = await asyncio.wait_for(
                    loop.run_in_executor(self._lease_executor(), self._renew, job_id), timeout=remaining)
            except TimeoutError:
                logger.warning("lease renewal of job %s still blocked when the lease ran out", job_id)
                raise LeaseLost(job_id) from None
            except Exception:  # noqa: BLE001 - a db hiccup: retry while the lease still holds
                logger.warning("lease renewal of job %s failed; retrying", job_id, exc_info=True)
                continue
            if not renewed:
                raise LeaseLost(job_id)
            self._lease_deadline[job_id] = asked_at + self.settings.lease_s

    def _renew(self, job_id: str) -> bool:
        now = utcnow()
        with self.db.lease_session() as session:
            renewed = session.execute(
                update(Job).where(Job.id == job_id, Job.lease_owner == self.id,
                                  Job.status == JobStatus.RUNNING.value)
                .values(lease_expires_at=now + timedelta(seconds=self.settings.lease_s))
                .execution_options(synchronize_session=False))
            session.commit()
        return renewed.rowcount == 1

    def _cancel_check_s(self) -> float:
        """How often a running job's cancel flag is read when nothing said it changed: the poll's
        pace with a notifier (a cancel anywhere wakes the watch), at most 2 s without one."""
        interval = max(self.settings.runner_poll_s, 0.05) * 4
        return interval if self.notifier is not None else min(interval, 2.0)

    async def _watch_cancel(self, job_id: str) -> None:
        """Read the job's cancel flag when woken by a cancel request (this process's bus, another
        process's notification) or, as a safety net, every ``_cancel_check_s``; not on every event
        of the job (its own progress would wake it for nothing)."""
        wake = self._cancel_wakes.setdefault(job_id, asyncio.Event())
        try:
            while True:
                # asyncio.wait, not wait_for: on Python 3.11 wait_for swallows a cancellation that
                # arrives as the event is set (a publish right before the job ends), and drive() would
                # then wait for this task forever.
                woken = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait({woken}, timeout=self._cancel_check_s())
                finally:
                    woken.cancel()
                wake.clear()
                if await self._call(self._cancel_requested, job_id):
                    await self._send_cancel(job_id)
                    return
        finally:
            if self._cancel_wakes.get(job_id) is wake:
                del self._cancel_wakes[job_id]

    async def _send_cancel(self, job_id: str) -> None:
        """Tell the executor to cancel, again every poll until drive() ends the run's stream (which
        cancels this task): one cancel can miss (the replica has not registered the run yet, a
        call fails in transit). At most CANCEL_SENDS of them."""
        interval = min(max(self.settings.runner_poll_s, 0.05) * 4, 2.0)
        for n in range(CANCEL_SENDS):
            if n == 0:
                logger.info("cancel of job %s requested; telling the executor", job_id)
            else:
                logger.info("job %s still running after a cancel; telling the executor again (%d)", job_id, n + 1)
            try:
                await self.executor.cancel(job_id)
            except Exception:  # noqa: BLE001 - the next send may get through
                logger.warning("cancelling job %s failed", job_id, exc_info=True)
            await asyncio.sleep(interval)
        logger.warning("job %s did not stop after %d cancels; leaving it to the executor", job_id, CANCEL_SENDS)

    def _cancel_requested(self, job_id: str) -> bool:
        with self.db.read() as session:
            return bool(session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar())

    # recording ---------------------------------------------------------------------------
    def _owned(self, session: Session, job_id: str) -> Job:
        """The job, locked, if this runner still holds a live lease on it; else LeaseLost.

        An expired lease counts as lost even before another runner reclaims it: from the moment
        it expires, a reclaim may run at any time, so nothing more is written under it. So does a
        lease this runner's own clock says has run out, or a job it gave up: its deadline is taken
        before the database's, so a write that waited out the lease on a locked database does not
        land in the few ms the row's lease still shows.
        """
        job = locked_job(session, job_id)  # on SQLite: after waiting for the write lock
        deadline = self._lease_deadline.get(job_id)
        if job_id in self._given_up or (deadline is not None and time.monotonic() >= deadline):
            raise LeaseLost(job_id)
        if job is None or job.status != JobStatus.RUNNING or job.lease_owner != self.id:
            raise LeaseLost(job_id)
        if job.lease_expires_at is not None and job.lease_expires_at < utcnow():
            raise LeaseLost(job_id)
        return job

    def _apply(self, session: Session, job: Job, event: ExecutorEvent) -> tuple[str, dict[str, Any]] | None:
        """Apply one event to the (locked, owned) job and store it; returns what to publish."""
        if isinstance(event, StageEvent):
            job.stage = event.stage
            type_, data = "progress", {"stage": event.stage, "progress": job.progress}
        elif isinstance(event, ProgressEvent):
            job.stage = event.stage
            job.progress = round(event.fraction, 4)
            type_, data = "progress", {"stage": event.stage, "progress": job.progress,
                                       "step": event.step, "total": event.total, **event.metrics}
        elif isinstance(event, OutputEvent):
            output = {k: v for k, v in event_to_dict(event).items() if k != "type" and v is not None}
            job.outputs = [*job.outputs, output]
            type_, data = "output", {"output": output}
        elif isinstance(event, ProviderEvent):
            job.provider = event.provider
            job.provider_job_id = event.provider_job_id or job.provider_job_id
            job.route_reason = event.reason or job.route_reason
            if event.cost_usd is not None:
                job.cost_usd = event.cost_usd
            type_, data = "provider", {"provider": event.provider, "reason": event.reason}
        elif isinstance(event, LogEvent):
            type_, data = "logs", {"message": event.message}
        elif isinstance(event, CheckpointEvent):
            job.resume = {"checkpoint_key": event.key, "step": event.step}
            type_, data = "logs", {"message": f"checkpoint at step {event.step}"}
        else:
            return None
        record_event(session, job.id, type_, data)
        return type_, data

    def _apply_all(self, session: Session, job: Job, events: list[ExecutorEvent]) -> list[Recorded]:
        recorded: list[Recorded] = []
        for event in events:
            applied = self._apply(session, job, event)
            if applied is not None:
                recorded.append((event, *applied))
        if recorded:
            job.updated_at = utcnow()
        return recorded

    def _record(self, job_id: str, event: ExecutorEvent) -> tuple[str, dict[str, Any]] | None:
        """Write one event; returns what to publish (the caller does, after the commit)."""
        recorded = self._record_many(job_id, [event])
        return (recorded[0][1], recorded[0][2]) if recorded else None

    def _record_many(self, job_id: str, events: list[ExecutorEvent]) -> list[Recorded]:
        """Write ``events`` in one transaction; returns what to publish (after the commit)."""
        with self.db.lease_session() as session:
            job = self._owned(session, job_id)
            recorded = self._apply_all(session, job, events)
            session.commit()
        return recorded

    def _settle_success(self, job_id: str, done: DoneEvent, pending: list[ExecutorEvent] | None = None) -> Settled:
        """Settle a delivered job, with the events still buffered, in one transaction."""
        with self.db.lease_session() as session:
            job = self._owned(session, job_id)
            recorded = self._apply_all(session, job, pending or [])
            if job.cancel_requested:
                finish_job(session, self.storage, job, JobStatus.CANCELED, None, self.metrics)
            else:
                job.result = dict(done.result)
                finish_job(session, self.storage, job, JobStatus.SUCCEEDED, None, self.metrics)
            session.commit()
            return Settled(job.status, recorded, others=take_announcements(session))

    def _settle_error(self, job_id: str, error: ErrorEvent, *, trusted: bool = False,
                      pending: list[ExecutorEvent] | None = None) -> Settled:
        """``trusted``: the message was written by our own validation and may reach the client."""
        with self.db.lease_session() as session:
            job = self._owned(session, job_id)
            # what was buffered still happened (a provider's log line, the last progress): kept in
            # order before the outcome; outputs are not (a failed attempt's files are discarded)
            recorded = self._apply_all(session, job, [e for e in pending or [] if not isinstance(e, OutputEvent)])
            due: float | None = None
            if job.cancel_requested or error.code == "canceled":
                finish_job(session, self.storage, job, JobStatus.CANCELED, None, self.metrics)
            elif error.retryable and job.attempts < job.max_attempts:
                requeue_job(session, self.settings, self.storage, job, error.code, error.message,
                            trusted=trusted)
                due = job.next_attempt_at.timestamp() if job.next_attempt_at is not None else None
            else:
                finish_job(session, self.storage, job, JobStatus.FAILED, error, self.metrics, trusted=trusted)
            session.commit()
            return Settled(job.status, recorded, due, take_announcements(session))

    def _announce(self, job_id: str) -> None:
        announce(self.db, self.bus, job_id)
