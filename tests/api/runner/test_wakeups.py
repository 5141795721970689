"""The runner is woken, not polled: with ``runner_poll_s`` at 60 s every job here still starts at
once (each wait is bounded to a few seconds, which a poll of 60 s would exceed).

The runner is first seen idle (its first tick done) before anything is submitted, so the start-up
tick cannot be what claims the job.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from api.core import ledger
from api.core.events import ErrorEvent
from api.db.engine import Database
from api.db.tables import Job, utcnow
from api.metrics import Metrics
from api.runner.runner import Runner
from api.services.events import EventBus, record_event
from api.services.jobs import JobService, Submission
from api.services.notify import Notifier
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from tests.fixtures.fake_executor import FakeExecutor, RoutedExecutor
from tests.fixtures.harness import add_user, get_job, wait_until

SLOW_POLL_S = 60.0
WAKE_WAIT_S = 5.0  # far below the poll: only a wake-up gets a job going this fast


@pytest.fixture
def wsettings(rsettings: Settings) -> Settings:
    return rsettings.model_copy(update={"runner_poll_s": SLOW_POLL_S, "lease_s": 30.0})


@pytest.fixture
async def notifier(rdb: Database) -> AsyncIterator[Notifier]:
    n = Notifier(rdb)
    await n.start()
    yield n
    await n.stop()


async def started_idle(runner: Runner) -> Runner:
    runner.start()
    await wait_until(lambda: runner.ticks >= 1, 10, what="the runner's first tick")
    return runner


def submit(jobs: JobService, user: NewUser, prompt: str = "a cat") -> str:
    job, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": prompt}))
    return job.id


def status(db: Database, job_id: str) -> str:
    return get_job(db, job_id).status


async def test_a_submitted_job_starts_at_once_without_a_poll(
        rdb: Database, wsettings: Settings, storage: LocalStorage, bus: EventBus, catalog: Catalog,
        notifier: Notifier, alice: NewUser) -> None:
    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"held": gate})
    runner = await started_idle(Runner(rdb, executor, wsettings, storage, bus, runner_id="r1",
                                       metrics=Metrics(), notifier=notifier))
    jobs = JobService(rdb, wsettings, catalog, storage, bus)
    try:
        job_id = await asyncio.to_thread(submit, jobs, alice, "held")
        await wait_until(lambda: status(rdb, job_id) == "running", WAKE_WAIT_S, what="the job to be claimed")
        gate.set()
        await wait_until(lambda: status(rdb, job_id) == "succeeded", WAKE_WAIT_S, what="the job to finish")
        assert get_job(rdb, job_id).queue_s < WAKE_WAIT_S
    finally:
        gate.set()
        await runner.stop()


async def test_a_freed_slot_claims_the_next_job_without_a_poll(
        rdb: Database, wsettings: Settings, storage: LocalStorage, bus: EventBus, catalog: Catalog,
        notifier: Notifier, alice: NewUser) -> None:
    first_gate, second_gate = threading.Event(), threading.Event()
    executor = FakeExecutor(storage=storage, gates={"first": first_gate, "second": second_gate})
    one_slot = wsettings.model_copy(update={"runner_concurrency": 1})
    runner = await started_idle(Runner(rdb, executor, one_slot, storage, bus, runner_id="r1",
                                       metrics=Metrics(), notifier=notifier))
    jobs = JobService(rdb, one_slot, catalog, storage, bus)
    try:
        first = await asyncio.to_thread(submit, jobs, alice, "first")
        await wait_until(lambda: status(rdb, first) == "running", WAKE_WAIT_S, what="the first job")
        ticks = runner.ticks
        second = await asyncio.to_thread(submit, jobs, alice, "second")
        await wait_until(lambda: runner.ticks > ticks, WAKE_WAIT_S, what="the tick the second submit woke")
        assert status(rdb, second) == "queued"  # woken, but no free slot
        first_gate.set()  # the first job ends: its slot frees, and that alone wakes the loop
        await wait_until(lambda: status(rdb, second) == "running", WAKE_WAIT_S, what="the second job")
        assert status(rdb, first) == "succeeded"
    finally:
        first_gate.set()
        second_gate.set()
        await runner.stop()


async def test_a_freed_slot_with_nothing_queued_makes_no_claim_query(
        rdb: Database, wsettings: Settings, storage: LocalStorage, bus: EventBus, catalog: Catalog,
        notifier: Notifier, alice: NewUser) -> None:
    gate = threading.Event()
    runner = Runner(rdb, FakeExecutor(storage=storage, gates={"held": gate}), wsettings, storage, bus,
                    runner_id="r1", metrics=Metrics(), notifier=notifier)
    claims: list[bool] = []
    real = runner._claim

    def counting() -> Any:
        job, more = real()
        claims.append(job is not None)
        return job, more

    runner._claim = counting  # type: ignore[method-assign]
    await started_idle(runner)
    jobs = JobService(rdb, wsettings, catalog, storage, bus)
    try:
        claims.clear()  # the start-up sweep's
        job_id = await asyncio.to_thread(submit, jobs, alice, "held")
        await wait_until(lambda: status(rdb, job_id) == "running", WAKE_WAIT_S, what="the job")
        ticks = runner.ticks
        gate.set()
        await wait_until(lambda: status(rdb, job_id) == "succeeded" and not runner.active_job_ids, WAKE_WAIT_S,
                         what="the job to end")
        await wait_until(lambda: runner.ticks > ticks, WAKE_WAIT_S, what="the tick its freed slot woke")
        assert claims == [True]  # the submission's claim only: the queue was seen empty by it
    finally:
        gate.set()
        await runner.stop()


async def test_a_retry_wakes_the_runner_when_its_backoff_ends(
        rdb: Database, wsettings: Settings, storage: LocalStorage, bus: EventBus, catalog: Catalog,
        alice: NewUser) -> None:
    """No notifier at all: the runner requeued the job itself and knows when it is due."""
    backoff = wsettings.model_copy(update={"retry_backoff_s": 0.3})
    executor = FakeExecutor(storage=storage, failures={"flaky": [ErrorEvent("busy", "try later", retryable=True)]})
    runner = await started_idle(Runner(rdb, executor, backoff, storage, bus, runner_id="r1", metrics=Metrics()))
    jobs = JobService(rdb, backoff, catalog, storage, bus)
    try:
        job_id = await asyncio.to_thread(submit, jobs, alice, "flaky")
        runner.wake()  # no notifier: tell it directly
        await wait_until(lambda: status(rdb, job_id) == "succeeded", WAKE_WAIT_S, what="the retried job")
        job = get_job(rdb, job_id)
        assert job.attempts == 2 and len(executor.runs) == 2
    finally:
        await runner.stop()


def _queue_due_later(db: Database, settings: Settings, user: NewUser, delay_s: float) -> str:
    """A queued job that becomes due in ``delay_s`` (as another process's reclaim leaves one),
    announced in its transaction like every status change."""
    with db.session() as session:
        job = Job(user_id=user.user.id, model="tiny-sd", kind="image", task="t2i", input={"prompt": "later"},
                  max_attempts=settings.max_attempts, credits_reserved=1,
                  next_attempt_at=utcnow() + timedelta(seconds=delay_s))
        session.add(job)
        session.flush()
        ledger.reserve(session, user.user.id, job.id, 1)
        record_event(session, job.id, "status", {"status": "queued", "stage": "retrying"})
        session.commit()
        return job.id


async def test_a_job_announced_due_later_wakes_the_runner_then(
        rdb: Database, wsettings: Settings, storage: LocalStorage, bus: EventBus, notifier: Notifier,
        alice: NewUser) -> None:
    executor = FakeExecutor(storage=storage)
    runner = await started_idle(Runner(rdb, executor, wsettings, storage, bus, runner_id="r1",
                                       metrics=Metrics(), notifier=notifier))
    try:
        ticks = runner.ticks
        job_id = await asyncio.to_thread(_queue_due_later, rdb, wsettings, alice, 0.5)
        await wait_until(lambda: status(rdb, job_id) == "succeeded", WAKE_WAIT_S, what="the job due later")
        assert runner.ticks > ticks
    finally:
        await runner.stop()


async def test_a_job_due_later_found_by_the_first_sweep_wakes_the_runner_then(
        rdb: Database, wsettings: Settings, storage: LocalStorage, bus: EventBus, alice: NewUser) -> None:
    """Queued before the runner started (its notification missed): the start-up sweep learns when
    it is due."""
    job_id = _queue_due_later(rdb, wsettings, alice, 0.5)
    runner = await started_idle(Runner(rdb, FakeExecutor(storage=storage), wsettings, storage, bus,
                                       runner_id="r1", metrics=Metrics()))
    try:
        assert status(rdb, job_id) == "queued"  # not due at the first tick
        await wait_until(lambda: status(rdb, job_id) == "succeeded", WAKE_WAIT_S, what="the job due later")
    finally:
        await runner.stop()


def recorded_writes(runner: Runner, written: asyncio.Event | None = None) -> list[list[Any]]:
    """The events of each write transaction the runner makes from now on (not its settlements);
    ``written`` is set (on the runner's loop) after each."""
    writes: list[list[Any]] = []
    real = runner._record_many
    loop = asyncio.get_running_loop()

    def counting(job_id: str, events: list[Any]) -> Any:
        writes.append(list(events))
        try:
            return real(job_id, events)
        finally:
            if written is not None:
                loop.call_soon_threadsafe(written.set)

    runner._record_many = counting  # type: ignore[method-assign]
    return writes


async def test_progress_writes_are_coalesced_and_the_last_is_always_written(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, catalog: Catalog,
        alice: NewUser) -> None:
    """Fifty progress steps in quick succession: a handful of writes, not fifty; the job still ends
    with its last progress and its output recorded."""
    from sqlalchemy import select

    from api.db.tables import JobEvent

    executor = FakeExecutor(storage=storage, steps=50)
    runner = Runner(rdb, executor, rsettings, storage, bus, runner_id="r1", metrics=Metrics())
    writes = recorded_writes(runner)
    jobs = JobService(rdb, rsettings, catalog, storage, bus)
    job_id = submit(jobs, alice)
    await runner.drain(timeout_s=20)
    job = get_job(rdb, job_id)
    assert (job.status, job.progress, len(job.outputs)) == ("succeeded", 1.0, 1)
    with rdb.read() as s:
        kinds = list(s.execute(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars())
    assert kinds.count("progress") < 10
    assert kinds.index("output") < kinds.index("completed")
    assert len(writes) < 5  # progress and output ride on few transactions (the rest with the settlement)


# PostgreSQL: the runner in one "process", the submission in another ---------------------------------
@pytest.mark.postgres
async def test_pg_a_job_submitted_by_another_process_starts_at_once(
        pg_url: str, settings: Settings, storage: LocalStorage, catalog: Catalog) -> None:
    pg = settings.model_copy(update={"database_url": pg_url, "runner_poll_s": SLOW_POLL_S, "lease_s": 30.0,
                                     "max_active_jobs": 50, "rate_limit_per_minute": 1000})
    db_runner, db_api = Database(pg), Database(pg)
    db_runner.migrate()
    notifier_runner, notifier_api = Notifier(db_runner), Notifier(db_api)
    await notifier_runner.start()
    await notifier_api.start()
    runner = await started_idle(Runner(db_runner, FakeExecutor(storage=storage), pg, storage, EventBus(),
                                       runner_id="pg-r1", metrics=Metrics(), notifier=notifier_runner))
    try:
        user = add_user(db_api, pg, credits=100)
        jobs = JobService(db_api, pg, catalog, storage, EventBus())
        job_id = await asyncio.to_thread(submit, jobs, user)
        await wait_until(lambda: status(db_api, job_id) == "succeeded", WAKE_WAIT_S,
                         what="the job submitted by the other process")
    finally:
        await runner.stop()
        await notifier_runner.stop()
        await notifier_api.stop()
        db_runner.dispose()
        db_api.dispose()


async def test_the_executor_goes_on_while_an_event_is_written(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, catalog: Catalog,
        alice: NewUser) -> None:
    """The router's provider event is written at once (a reclaim reattaches to the replica's run
    only if the job says where it ran), but the request does not wait for that write: the runner
    reads one event ahead, so the executor has already resumed (sent the request to its replica)
    while the write is still held."""
    from api.core.events import ProviderEvent

    resumed = threading.Event()

    class Held(Runner):
        seen_resumed: list[bool] = []

        def _record_many(self, job_id: str, events: list[Any]) -> Any:
            if any(isinstance(e, ProviderEvent) for e in events):
                self.seen_resumed.append(resumed.wait(timeout=5))  # on the runner's pool: may block
            return super()._record_many(job_id, events)

    routed = RoutedExecutor(storage=storage, after_route=resumed.set)  # next: start the local run
    runner = Held(rdb, routed, rsettings, storage, bus, runner_id="r1", metrics=Metrics())
    jobs = JobService(rdb, rsettings, catalog, storage, bus)
    job_id = submit(jobs, alice)
    await runner.drain(timeout_s=20)
    assert runner.seen_resumed == [True]
    job = get_job(rdb, job_id)
    assert (job.status, job.provider, len(job.outputs)) == ("succeeded", "local", 1)


async def test_a_due_write_takes_the_events_already_there_so_the_output_rides_on_the_settlement(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, catalog: Catalog,
        alice: NewUser, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write due at once (interval 0): events that arrive together (one stream item: the
    stage and a step; later the output and the result) are written together, the output in the
    settlement's transaction, not in a write of its own."""
    from api.core.events import DoneEvent, OutputEvent, ProgressEvent, StageEvent
    from api.runner import runner as runner_module

    monkeypatch.setattr(runner_module, "PROGRESS_MIN_INTERVAL_S", 0.0)

    written = asyncio.Event()

    class Together(FakeExecutor):
        async def run(self, request: Any) -> Any:
            yield StageEvent("generating")
            yield ProgressEvent(1, 1)  # ready at once, as the rest of one stream item is
            # the pipeline runs: nothing is ready, so the due write goes (held here until it did)
            await asyncio.wait_for(written.wait(), timeout=10)
            key = f"{request.output_prefix}0.png"
            storage.put_bytes(key, b"\x89PNG", "image/png")
            yield OutputEvent(key=key, content_type="image/png")
            yield DoneEvent({"seed": 1})

    runner = Runner(rdb, Together(storage=storage), rsettings, storage, bus, runner_id="r1", metrics=Metrics())
    writes = recorded_writes(runner, written)
    jobs = JobService(rdb, rsettings, catalog, storage, bus)
    job_id = submit(jobs, alice)
    await runner.drain(timeout_s=20)
    job = get_job(rdb, job_id)
    assert (job.status, len(job.outputs)) == ("succeeded", 1)
    assert [[type(e).__name__ for e in events] for events in writes] == [["ProgressEvent"]]  # one write (the stage coalesced into the step); the output: with the settlement


async def test_a_due_write_waits_for_a_few_ready_events_at_most(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, catalog: Catalog,
        alice: NewUser, monkeypatch: pytest.MonkeyPatch) -> None:
    """A steady flood of ready events (every write due: interval 0) is still written as it goes,
    every DUE_EVENTS_AHEAD + 1 events, not all left to the settlement."""
    from api.core.events import DoneEvent, LogEvent
    from api.runner import runner as runner_module

    monkeypatch.setattr(runner_module, "PROGRESS_MIN_INTERVAL_S", 0.0)
    per_write = runner_module.DUE_EVENTS_AHEAD + 1

    class Flood(FakeExecutor):
        async def run(self, request: Any) -> Any:
            for i in range(2 * per_write):
                yield LogEvent(f"line {i}")  # logs are not coalesced: each one counts
            yield DoneEvent({"seed": 1})

    runner = Runner(rdb, Flood(storage=storage), rsettings, storage, bus, runner_id="r1", metrics=Metrics())
    writes = recorded_writes(runner)
    job_id = submit(JobService(rdb, rsettings, catalog, storage, bus), alice)
    await runner.drain(timeout_s=20)
    assert get_job(rdb, job_id).status == "succeeded"
    assert [len(events) for events in writes] == [per_write, per_write]
