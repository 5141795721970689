"""Start deadlines (Replicate's Cancel-After): parsing, abort with a full refund, the claim filter,
the cancel of a job that started, and the watcher woken by a submission."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import update

from api.core.errors import InvalidInput
from api.db.engine import Database
from api.db.tables import Job, utcnow
from api.runner.runner import Runner
from api.services.deadlines import ABORT_CODE, DeadlineWatcher, is_aborted, parse_cancel_after
from api.services.events import EventBus
from api.services.jobs import JobService, Submission
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import add_user, balance, get_job, ledger_rows, wait_until


@pytest.fixture
def db(backend_db: Database) -> Database:
    """Every test here runs on SQLite and again on PostgreSQL (row locks, conditional claims)."""
    return backend_db


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("1m30s", 90), ("2h0m5s", 7205), (" 1s ", 1),
])
def test_parse_cancel_after_accepts(text: str, seconds: float) -> None:
    assert parse_cancel_after(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "90", "1m30", "90 s", "-5s", "0s", "1.5m", "5M", "30m1h", "1d",
                                  "5s5s", "abc", "999999h"])
def test_parse_cancel_after_rejects(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_cancel_after(text)
    assert info.value.details["field"] == "Cancel-After"


def _watcher(db: Database, settings: Settings, storage: LocalStorage, bus: EventBus,
             jobs: JobService) -> DeadlineWatcher:
    return DeadlineWatcher(db, settings, storage, bus, jobs)


def _set_deadline(db: Database, job_id: str, seconds_from_now: float) -> None:
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id)
                        .values(start_deadline_at=utcnow() + timedelta(seconds=seconds_from_now)))
        session.commit()


def test_submission_sets_the_deadline_from_creation(db: Database, settings: Settings, jobs: JobService) -> None:
    user = add_user(db, settings, credits=100)
    job, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": "a"}, api_shape="replicate", cancel_after_s=90))
    stored = get_job(db, job.id)
    assert stored.api_shape == "replicate"
    assert stored.start_deadline_at is not None
    assert (stored.start_deadline_at - stored.created_at).total_seconds() == pytest.approx(90)
    plain, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": "b"}))
    assert get_job(db, plain.id).start_deadline_at is None and get_job(db, plain.id).api_shape == "native"


def test_a_queued_job_past_its_deadline_is_aborted_and_refunded_in_full(
        db: Database, settings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService) -> None:
    user = add_user(db, settings, credits=100)
    job, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": "a"}, cancel_after_s=60))
    watcher = _watcher(db, settings, storage, bus, jobs)
    assert watcher.enforce_due() == 0  # not due yet
    assert get_job(db, job.id).status == "queued"
    assert balance(db, user.user.id).available == 100 - job.credits_reserved

    assert watcher.enforce_due(now=utcnow() + timedelta(seconds=61)) == 1
    done = get_job(db, job.id)
    assert done.status == "canceled" and done.error_code == ABORT_CODE and is_aborted(done)
    assert done.credits_refunded == done.credits_reserved > 0 and done.credits_charged == 0
    assert [(r.kind, r.amount) for r in ledger_rows(db, job_id=job.id)] == [
        ("reserve", done.credits_reserved), ("refund", done.credits_reserved)]
    view = balance(db, user.user.id)
    assert (view.available, view.reserved) == (100, 0)
    assert watcher.enforce_due(now=utcnow() + timedelta(seconds=120)) == 0  # settled once


async def test_the_runner_never_claims_a_job_whose_deadline_passed(
        db: Database, settings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService) -> None:
    user = add_user(db, settings, credits=100)
    late, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": "late"}, cancel_after_s=60))
    _set_deadline(db, late.id, -1)
    runner = Runner(db, FakeExecutor(storage=storage), settings, storage, bus)
    assert runner.claim_next() is None
    assert get_job(db, late.id).status == "queued"
    on_time, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": "on time"}, cancel_after_s=60))
    claimed = runner.claim_next()
    assert claimed is not None and claimed.id == on_time.id


async def test_a_running_job_at_its_deadline_is_canceled_not_aborted(
        db: Database, settings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService) -> None:
    user = add_user(db, settings, credits=100)
    job, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": "a"}, cancel_after_s=60))
    runner = Runner(db, FakeExecutor(storage=storage), settings, storage, bus)
    assert runner.claim_next() is not None  # running now: the claim won
    watcher = _watcher(db, settings, storage, bus, jobs)
    later = utcnow() + timedelta(seconds=61)
    assert watcher.abort(job.id, later) is False  # only a locked row still queued is aborted
    assert watcher.enforce_due(now=later) == 1
    running = get_job(db, job.id)
    assert running.status == "running" and running.cancel_requested  # the native cancel path
    assert running.error_code is None
    assert watcher.enforce_due(now=later) == 0  # acted on once


async def _asleep(watcher: DeadlineWatcher, db: Database, job_id: str) -> None:
    """Wait until the watcher has done its first round (it then sleeps for an hour), then move the
    job's deadline into the past behind its back."""
    await wait_until(lambda: watcher.rounds >= 1, timeout_s=10, what="the watcher's first round")
    _set_deadline(db, job_id, -1)
    assert watcher.rounds == 1 and get_job(db, job_id).status == "queued"


async def test_the_watcher_is_woken_by_a_submission(
        db: Database, settings: Settings, storage: LocalStorage, jobs: JobService) -> None:
    bus = EventBus()
    bus.bind(asyncio.get_running_loop())
    jobs.bus = bus
    # an hour's safety poll: only the bus can wake it in time
    watcher = _watcher(db, settings.model_copy(update={"deadline_poll_s": 3600.0}), storage, bus, jobs)
    user = add_user(db, settings, credits=100)
    job, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": "a"}, cancel_after_s=3600))
    watcher.start()
    try:
        await _asleep(watcher, db, job.id)
        other, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": "b"}))  # publishes: wakes it
        await wait_until(lambda: get_job(db, job.id).status == "canceled", timeout_s=10,
                         what="the watcher to abort the job")
        assert get_job(db, job.id).error_code == ABORT_CODE
        assert get_job(db, other.id).status == "queued"
    finally:
        await watcher.stop()


async def test_the_watcher_is_woken_by_another_process_queuing_a_job(
        db: Database, settings: Settings, storage: LocalStorage, jobs: JobService) -> None:
    bus = EventBus()
    bus.bind(asyncio.get_running_loop())
    watcher = _watcher(db, settings.model_copy(update={"deadline_poll_s": 3600.0}), storage, bus, jobs)
    user = add_user(db, settings, credits=100)
    job, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": "a"}, cancel_after_s=3600))
    watcher.start()
    try:
        await _asleep(watcher, db, job.id)  # nothing is published on this watcher's bus
        # on_notification is synchronous and nothing is awaited in between, so the watcher cannot have
        # taken a wake yet: its wake flag says at once whether the notification woke it
        watcher.on_notification({"job": "job_other", "type": "progress"})  # not a queued job: no wake
        assert not watcher._wake.is_set() and watcher.rounds == 1
        watcher.on_notification({"job": "job_other", "type": "status", "s": "queued"})
        assert watcher._wake.is_set()
        await wait_until(lambda: get_job(db, job.id).status == "canceled", timeout_s=10,
                         what="the watcher to abort the job")
    finally:
        await watcher.stop()


async def test_stop_ends_the_watcher_even_when_woken_as_it_is_canceled(
        db: Database, settings: Settings, storage: LocalStorage, jobs: JobService) -> None:
    """Shutdown: a job change wakes the watcher in the same step as stop() cancels it (the runner
    hands its jobs back just before); the cancel must not be lost, or the API's shutdown hangs."""
    bus = EventBus()
    bus.bind(asyncio.get_running_loop())
    watcher = _watcher(db, settings.model_copy(update={"deadline_poll_s": 3600.0}), storage, bus, jobs)
    watcher.start()
    await wait_until(lambda: watcher.rounds >= 1, timeout_s=10, what="the watcher's first round")
    for _ in range(3):
        await asyncio.sleep(0)  # it now sleeps on its wake event
    task = watcher._task
    assert task is not None
    watcher.wake()
    stopping = asyncio.create_task(watcher.stop())
    done, _ = await asyncio.wait([stopping], timeout=10)  # not wait_for: it would cancel stop() itself
    if not done:
        task.cancel()
    assert done == {stopping} and task.done(), "the watcher's loop lost the cancel and runs on"
