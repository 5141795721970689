"""The runner: claims, drives the executor, records, retries, settles exactly once, survives crashes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from api.core import ledger
from api.core.events import DoneEvent, ErrorEvent, ExecutorEvent, OutputEvent, ProgressEvent, StageEvent
from api.core.executor import ExecutionRequest
from api.db.engine import Database
from api.db.tables import Job, JobEvent, utcnow
from api.runner.runner import LeaseLost, Runner
from api.services.events import EventBus, webhook_event
from api.services.jobs import JobService, Submission
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.api.runner.conftest import make_runner
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import add_user, balance, get_job, ledger_rows, wait_job, wait_until


def submit(jobs: JobService, user: NewUser, prompt: str = "a cat", model: str = "tiny-sd", **input: Any) -> str:
    job, _ = jobs.submit(user.user, Submission(model, {"prompt": prompt, **input}))
    return job.id


SHORT_LEASE_S = 0.6  # for runners that die or stall: their lease runs out quickly


def settlements(rdb: Database, job_id: str) -> list[str]:
    return [e.kind for e in ledger_rows(rdb, job_id=job_id) if e.kind != "reserve"]


@dataclass
class ScriptedExecutor:
    """Runs a fixed list of events per job; ``"hang"`` waits until canceled; ``"raise"`` crashes."""

    storage: LocalStorage
    script: list[Any]
    runs: list[ExecutionRequest] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    _stop: dict[str, asyncio.Event] = field(default_factory=dict)

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        self.runs.append(request)
        stop = self._stop.setdefault(request.job_id, asyncio.Event())
        for item in self.script:
            if item == "hang":
                await asyncio.wait_for(stop.wait(), timeout=20)
                yield ErrorEvent("canceled", "canceled")
                return
            if item == "raise":
                raise RuntimeError("GPU fell off the bus")
            if item == "output":
                key = f"{request.output_prefix}0.png"
                self.storage.put_bytes(key, b"\x89PNG", "image/png")
                yield OutputEvent(key=key, content_type="image/png", width=64, height=64)
                continue
            yield item

    async def cancel(self, job_id: str) -> None:
        self.canceled.append(job_id)
        self._stop.setdefault(job_id, asyncio.Event()).set()


# the happy path --------------------------------------------------------------------------------
async def test_success_records_outputs_metrics_and_captures_once(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    executor = FakeExecutor(storage=storage, steps=4, step_s=0.01)
    runner = make_runner(rdb, rsettings, storage, bus, executor)
    job_id = submit(jobs, alice, width=128, height=64)
    await asyncio.sleep(0.05)  # a measurable queue time
    await runner.drain(timeout_s=10)
    job = get_job(rdb, job_id)
    assert (job.status, job.stage, job.progress, job.attempts) == ("succeeded", "succeeded", 1.0, 1)
    assert job.outputs == [{"key": f"outputs/{alice.user.id}/{job_id}/0.png", "content_type": "image/png",
                            "width": 128, "height": 64, "role": "output"}]
    assert storage.exists(job.outputs[0]["key"])
    assert job.result == {"seed": job.input["seed"]}
    assert job.queue_s is not None and job.queue_s >= 0.05
    assert job.run_s is not None and job.run_s >= 0.04  # four steps of 10 ms
    assert job.started_at is not None and job.completed_at is not None and job.lease_owner is None
    assert (job.credits_charged, job.credits_refunded) == (2, 0)
    assert settlements(rdb, job_id) == ["capture"]
    assert balance(rdb, alice.user.id) == ledger.BalanceView(998, 0)
    assert executor.runs[0].output_prefix == f"outputs/{alice.user.id}/{job_id}/"
    with rdb.read() as s:
        types = [e.type for e in s.execute(select(JobEvent).where(JobEvent.job_id == job_id)
                                           .order_by(JobEvent.id)).scalars()]
    assert types[0] == "status" and types[1] == "status"  # queued, then running
    assert "progress" in types and "output" in types
    assert types[-2:] == ["status", "completed"]


async def test_progress_is_recorded(rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus,
                                    jobs: JobService, alice: NewUser) -> None:
    executor = ScriptedExecutor(storage, [StageEvent("loading"), ProgressEvent(1, 4), ProgressEvent(4, 4),
                                          "output", DoneEvent()])
    runner = make_runner(rdb, rsettings, storage, bus, executor)
    job_id = submit(jobs, alice)
    await runner.drain(timeout_s=10)
    with rdb.read() as s:
        progress = [e.data for e in s.execute(select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.type == "progress").order_by(JobEvent.id)).scalars()]
    assert progress[0] == {"stage": "loading", "progress": 0.0}
    assert progress[-1]["progress"] == 1.0 and progress[-1]["step"] == 4


# failures and retries --------------------------------------------------------------------------
async def test_retries_with_backoff_then_succeeds_charged_once(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    flaky = ErrorEvent("gpu_busy", "try later", retryable=True)
    executor = FakeExecutor(storage=storage, failures={"flaky": [flaky, flaky]})
    runner = make_runner(rdb, rsettings, storage, bus, executor, retry_backoff_s=0.2)
    starts: list[float] = []
    original = executor.run

    def timed(request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        starts.append(time.monotonic())
        return original(request)

    executor.run = timed  # type: ignore[method-assign]
    job_id = submit(jobs, alice, prompt="flaky")
    await runner.drain(timeout_s=15)
    job = get_job(rdb, job_id)
    assert (job.status, job.attempts, job.credits_charged) == ("succeeded", 3, 1)
    assert [r.attempt for r in executor.runs] == [1, 2, 3]
    assert starts[1] - starts[0] >= 0.2 and starts[2] - starts[1] >= 0.4  # 0.2 s, then doubled
    assert settlements(rdb, job_id) == ["capture"]
    assert balance(rdb, alice.user.id) == ledger.BalanceView(999, 0)


async def test_retryable_errors_up_to_max_attempts_then_fail_and_refund(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    errors = [ErrorEvent("gpu_busy", f"busy {i}", retryable=True) for i in range(5)]
    executor = FakeExecutor(storage=storage, failures={"doomed": errors})
    runner = make_runner(rdb, rsettings, storage, bus, executor)
    job_id = submit(jobs, alice, prompt="doomed")
    await runner.drain(timeout_s=15)
    job = get_job(rdb, job_id)
    assert (job.status, job.attempts, job.error_code, job.error_message) == ("failed", 3, "gpu_busy", "generation failed")
    assert len(executor.runs) == 3
    assert (job.credits_charged, job.credits_refunded) == (0, 1)
    assert settlements(rdb, job_id) == ["refund"]
    assert balance(rdb, alice.user.id) == ledger.BalanceView(1000, 0)


async def test_non_retryable_error_fails_at_once(rdb: Database, rsettings: Settings, storage: LocalStorage,
                                                 bus: EventBus, jobs: JobService, alice: NewUser) -> None:
    executor = FakeExecutor(storage=storage, failures={"bad": [ErrorEvent("nsfw", "refused", retryable=False)]})
    runner = make_runner(rdb, rsettings, storage, bus, executor)
    job_id = submit(jobs, alice, prompt="bad")
    await runner.drain(timeout_s=10)
    job = get_job(rdb, job_id)
    assert (job.status, job.attempts, job.error_code) == ("failed", 1, "nsfw")
    assert settlements(rdb, job_id) == ["refund"]


@pytest.mark.parametrize(("script", "code"), [
    (["raise"], "executor_error"),
    ([StageEvent("generating")], "incomplete"),
])
async def test_executor_crash_or_silence_is_retried_then_refunded(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser, script: list[Any], code: str) -> None:
    executor = ScriptedExecutor(storage, script)
    runner = make_runner(rdb, rsettings, storage, bus, executor)
    job_id = submit(jobs, alice)
    await runner.drain(timeout_s=15)
    job = get_job(rdb, job_id)
    assert (job.status, job.attempts, job.error_code) == ("failed", 3, code)
    assert settlements(rdb, job_id) == ["refund"]
    assert balance(rdb, alice.user.id) == ledger.BalanceView(1000, 0)


async def test_retry_discards_outputs_of_the_failed_attempt(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    executor = ScriptedExecutor(storage, ["output", ErrorEvent("flaky", "x", retryable=True)])
    runner = make_runner(rdb, rsettings, storage, bus, executor, max_attempts=2)
    job_id = submit(jobs, alice)
    await runner.drain(timeout_s=10)
    job = get_job(rdb, job_id)
    assert job.status == "failed" and job.outputs == []


# cancel ------------------------------------------------------------------------------------------
async def test_cancel_queued_is_refunded_and_never_run(rdb: Database, rsettings: Settings, storage: LocalStorage,
                                                       bus: EventBus, jobs: JobService, alice: NewUser) -> None:
    executor = FakeExecutor(storage=storage)
    runner = make_runner(rdb, rsettings, storage, bus, executor)
    job_id = submit(jobs, alice, model="veo-3.1", duration=4)
    assert balance(rdb, alice.user.id) == ledger.BalanceView(960, 40)
    jobs.cancel(alice.user, job_id)
    assert balance(rdb, alice.user.id) == ledger.BalanceView(1000, 0)
    await runner.drain(timeout_s=5)
    assert executor.runs == []
    assert get_job(rdb, job_id).status == "canceled"


async def test_cancel_running_stops_the_executor_refunds_and_deletes_outputs(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    executor = ScriptedExecutor(storage, ["output", "hang"])
    runner = make_runner(rdb, rsettings, storage, bus, executor)
    job_id = submit(jobs, alice, width=128, height=128)
    await runner.tick()
    await wait_until(lambda: bool(get_job(rdb, job_id).outputs), 10, what="the first output")
    key = get_job(rdb, job_id).outputs[0]["key"]
    assert storage.exists(key)
    jobs.cancel(alice.user, job_id)
    job = await wait_job(rdb, job_id, timeout_s=10)
    await runner.stop(grace_s=5)
    assert set(executor.canceled) == {job_id}
    assert (job.status, job.outputs, job.credits_refunded, job.credits_charged) == ("canceled", [], 4, 0)
    assert not storage.exists(key) and storage.list(f"outputs/{alice.user.id}/{job_id}/") == []
    assert settlements(rdb, job_id) == ["refund"]
    assert balance(rdb, alice.user.id) == ledger.BalanceView(1000, 0)


@dataclass
class DeafExecutor(ScriptedExecutor):
    """Ignores the first ``deaf`` cancels (they reach the replica before its run is registered)."""

    deaf: int = 2

    async def cancel(self, job_id: str) -> None:
        self.canceled.append(job_id)
        if len(self.canceled) > self.deaf:
            self._stop.setdefault(job_id, asyncio.Event()).set()


async def test_cancel_is_sent_again_until_the_run_stops(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    executor = DeafExecutor(storage, ["hang"])
    runner = make_runner(rdb, rsettings, storage, bus, executor)
    job_id = submit(jobs, alice)
    await runner.tick()
    await wait_until(lambda: bool(executor.runs), 10, what="the run to start")
    jobs.cancel(alice.user, job_id)
    job = await wait_job(rdb, job_id, timeout_s=10)  # before: one cancel, lost; the run hung on
    await runner.stop(grace_s=5)
    assert job.status == "canceled" and settlements(rdb, job_id) == ["refund"]
    assert set(executor.canceled) == {job_id} and 3 <= len(executor.canceled) <= 4  # re-sent while it ran


async def test_cancel_requested_while_finishing_is_not_charged(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    """The executor delivers anyway, but the user canceled first: canceled and refunded."""
    runner = make_runner(rdb, rsettings, storage, bus, ScriptedExecutor(storage, []))
    job_id = submit(jobs, alice)
    job = runner.claim_next()
    assert job is not None and job.id == job_id
    jobs.cancel(alice.user, job_id)
    runner._settle_success(job_id, DoneEvent())
    done = get_job(rdb, job_id)
    assert done.status == "canceled" and settlements(rdb, job_id) == ["refund"]


# fairness ----------------------------------------------------------------------------------------
async def test_one_users_burst_does_not_starve_another(rdb: Database, rsettings: Settings, storage: LocalStorage,
                                                       bus: EventBus, jobs: JobService, alice: NewUser) -> None:
    bob = add_user(rdb, rsettings, credits=10)
    a_jobs = [submit(jobs, alice, prompt=f"a{i}") for i in range(10)]
    await asyncio.sleep(0.01)
    b_job = submit(jobs, bob, prompt="b")
    executor = FakeExecutor(storage=storage, steps=1)
    runner = make_runner(rdb, rsettings, storage, bus, executor, runner_concurrency=1)
    await runner.drain(timeout_s=20)
    order = [r.job_id for r in executor.runs]
    assert sorted(order) == sorted([*a_jobs, b_job])
    assert order.index(b_job) <= 1, order  # B goes second, not after A's whole burst
    assert order[0] == a_jobs[0]


async def test_priority_goes_first(rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus,
                                   jobs: JobService, alice: NewUser) -> None:
    low = submit(jobs, alice, prompt="low")
    high, _ = jobs.submit(alice.user, Submission("tiny-sd", {"prompt": "high"}, priority=5))
    runner = make_runner(rdb, rsettings, storage, bus, FakeExecutor(storage=storage))
    first = runner.claim_next()
    assert first is not None and first.id == high.id and low != high.id


# leases ------------------------------------------------------------------------------------------
async def test_lease_lost_runner_writes_nothing(rdb: Database, rsettings: Settings, storage: LocalStorage,
                                                bus: EventBus, jobs: JobService, alice: NewUser) -> None:
    runner = make_runner(rdb, rsettings, storage, bus, ScriptedExecutor(storage, []))
    job_id = submit(jobs, alice)
    job = runner.claim_next()
    assert job is not None
    # Another runner took the job over (its lease had expired and it was claimed again).
    with rdb.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_owner="r2", attempts=2))
        s.commit()
    before = get_job(rdb, job_id)
    with rdb.read() as s:
        events_before = len(s.execute(select(JobEvent.id).where(JobEvent.job_id == job_id)).all())
    for write in (lambda: runner._record(job_id, OutputEvent(key="outputs/x/0.png", content_type="image/png")),
                  lambda: runner._record(job_id, ProgressEvent(1, 2)),
                  lambda: runner._settle_success(job_id, DoneEvent()),
                  lambda: runner._settle_error(job_id, ErrorEvent("boom", "x"))):
        with pytest.raises(LeaseLost):
            write()
    after = get_job(rdb, job_id)
    assert (after.status, after.lease_owner, after.outputs, after.progress, after.attempts) == (
        before.status, "r2", [], before.progress, 2)
    with rdb.read() as s:
        assert len(s.execute(select(JobEvent.id).where(JobEvent.job_id == job_id)).all()) == events_before
    assert settlements(rdb, job_id) == []


@pytest.mark.parametrize("how", ["given up", "own deadline passed"])
async def test_a_runner_writes_nothing_once_its_own_clock_says_the_lease_is_gone(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser, how: str) -> None:
    """The row still shows this runner's live lease (the database's expiry is a few ms behind the
    runner's own deadline): a write that waited on a locked database past the runner's deadline,
    or after it gave the job up, must still not land."""
    runner = make_runner(rdb, rsettings, storage, bus, ScriptedExecutor(storage, []))
    job_id = submit(jobs, alice)
    assert runner.claim_next() is not None
    if how == "given up":
        runner._gave_up(job_id)
    else:
        runner._lease_deadline[job_id] = time.monotonic() - 0.001
    assert get_job(rdb, job_id).lease_owner == runner.id
    with pytest.raises(LeaseLost):
        runner._record(job_id, ProgressEvent(1, 2))
    with pytest.raises(LeaseLost):
        runner._settle_success(job_id, DoneEvent())
    assert get_job(rdb, job_id).progress == 0 and settlements(rdb, job_id) == []


async def test_a_runner_remembers_only_the_latest_jobs_it_gave_up(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus) -> None:
    from api.runner.runner import GIVEN_UP_KEPT

    runner = make_runner(rdb, rsettings, storage, bus, ScriptedExecutor(storage, []))
    for i in range(GIVEN_UP_KEPT + 1):
        runner._gave_up(f"job_{i}")
    assert len(runner._given_up) == GIVEN_UP_KEPT
    assert "job_0" not in runner._given_up and f"job_{GIVEN_UP_KEPT}" in runner._given_up


async def test_heartbeat_keeps_a_long_job_from_being_reclaimed(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    slow = FakeExecutor(storage=storage, steps=8, step_s=0.3)  # 2.4 s: three leases of 0.8 s
    r1 = make_runner(rdb, rsettings, storage, bus, slow, "r1", lease_s=0.8)
    r2 = make_runner(rdb, rsettings, storage, bus, FakeExecutor(storage=storage), "r2")
    job_id = submit(jobs, alice)
    await r1.tick()
    deadline = time.monotonic() + 15
    while get_job(rdb, job_id).status == "running" or get_job(rdb, job_id).status == "queued":
        await r2.tick()  # would reclaim the job if the lease were not renewed
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    job = get_job(rdb, job_id)
    assert (job.status, job.attempts) == ("succeeded", 1)
    assert len(slow.runs) == 1
    await r1.stop()
    await r2.stop()


async def _runner_dies_mid_job(rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus,
                               jobs: JobService, alice: NewUser, attempts_before: int) -> tuple[str, FakeExecutor]:
    hanging = FakeExecutor(storage=storage, hang={"slow"})
    r1 = make_runner(rdb, rsettings, storage, bus, hanging, "r1", lease_s=SHORT_LEASE_S)
    job_id = submit(jobs, alice, prompt="slow")
    if attempts_before:
        with rdb.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(attempts=attempts_before))
            s.commit()
    r1.start()
    await wait_until(lambda: bool(hanging.runs), 10, what="r1 to start the job")
    # r1 dies: its tasks are cancelled without any chance to settle or release the lease.
    await r1.stop(grace_s=0, release_leases=False)
    dead = get_job(rdb, job_id)
    assert (dead.status, dead.lease_owner) == ("running", "r1")
    healthy = FakeExecutor(storage=storage)
    r2 = make_runner(rdb, rsettings, storage, bus, healthy, "r2")
    r2.start()
    try:
        await wait_job(rdb, job_id, timeout_s=15)
    finally:
        await r2.stop()
    return job_id, healthy


async def test_dead_runner_job_is_reclaimed_and_succeeds_charged_once(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    job_id, healthy = await _runner_dies_mid_job(rdb, rsettings, storage, bus, jobs, alice, 0)
    job = get_job(rdb, job_id)
    assert (job.status, job.attempts, job.credits_charged) == ("succeeded", 2, 1)
    assert [r.job_id for r in healthy.runs] == [job_id]
    assert settlements(rdb, job_id) == ["capture"]
    assert balance(rdb, alice.user.id) == ledger.BalanceView(999, 0)


async def test_dead_runner_out_of_attempts_fails_and_refunds(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    job_id, healthy = await _runner_dies_mid_job(rdb, rsettings, storage, bus, jobs, alice, 2)
    job = get_job(rdb, job_id)
    assert (job.status, job.attempts, job.error_code) == ("failed", 3, "worker_lost")
    assert healthy.runs == []
    assert settlements(rdb, job_id) == ["refund"]
    assert balance(rdb, alice.user.id) == ledger.BalanceView(1000, 0)


class StalledRunner(Runner):
    """A runner whose lease renewal stopped (its process froze) while the executor went on."""

    async def _heartbeat(self, job_id: str) -> None:
        await asyncio.sleep(3600)


async def test_stalled_runner_finishing_late_writes_nothing_and_job_is_charged_once(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    slow = FakeExecutor(storage=storage, steps=6, step_s=0.3)  # finishes long after its short lease
    stalled = StalledRunner(rdb, slow, rsettings.model_copy(update={"lease_s": SHORT_LEASE_S}), storage, bus,
                            runner_id="stalled")
    job_id = submit(jobs, alice, prompt="p")
    await stalled.tick()
    r2_exec = FakeExecutor(storage=storage, steps=1)
    r2 = make_runner(rdb, rsettings, storage, bus, r2_exec, "r2")
    r2.start()
    try:
        await wait_until(lambda: not stalled.active_job_ids, 15, what="the stalled runner to give up")
        job = await wait_job(rdb, job_id, timeout_s=15)
    finally:
        await r2.stop()
        await stalled.stop(grace_s=1)
    assert len(slow.runs) == 1 and len(r2_exec.runs) == 1
    assert (job.status, job.lease_owner, job.attempts) == ("succeeded", None, 2)
    assert settlements(rdb, job_id) == ["capture"]
    assert balance(rdb, alice.user.id) == ledger.BalanceView(999, 0)


async def test_stop_lets_running_jobs_finish(rdb: Database, rsettings: Settings, storage: LocalStorage,
                                             bus: EventBus, jobs: JobService, alice: NewUser) -> None:
    executor = FakeExecutor(storage=storage, steps=3, step_s=0.05)
    runner = make_runner(rdb, rsettings, storage, bus, executor)
    job_id = submit(jobs, alice)
    runner.start()
    await wait_until(lambda: bool(executor.runs), 10, what="the job to start")
    await runner.stop(grace_s=5)
    assert get_job(rdb, job_id).status == "succeeded"


async def test_expired_queued_retry_waits_for_its_backoff(rdb: Database, rsettings: Settings,
                                                          storage: LocalStorage, bus: EventBus, jobs: JobService,
                                                          alice: NewUser) -> None:
    runner = make_runner(rdb, rsettings, storage, bus, FakeExecutor(storage=storage))
    job_id = submit(jobs, alice)
    with rdb.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(next_attempt_at=utcnow() + timedelta(seconds=60)))
        s.commit()
    assert runner.claim_next() is None
    with rdb.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    claimed = runner.claim_next()
    assert claimed is not None and claimed.id == job_id


async def test_lease_loss_is_noticed_while_the_executor_is_silent(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    """The executor hangs without a word; the job is taken over elsewhere. This runner must let go:
    free its slot, stop consuming the stale run, and write nothing."""
    hanging = FakeExecutor(storage=storage, hang={"stuck"})
    r1 = make_runner(rdb, rsettings, storage, bus, hanging, "r1", lease_s=SHORT_LEASE_S)
    job_id = submit(jobs, alice, prompt="stuck")
    await r1.tick()
    await wait_until(lambda: bool(hanging.runs), 10, what="the run to start")
    with rdb.session() as s:  # another runner reclaimed and claimed the job
        s.execute(update(Job).where(Job.id == job_id).values(lease_owner="r2", attempts=2))
        s.commit()
    await wait_until(lambda: not r1.active_job_ids, 5, what="r1 to let go of the job")
    job = get_job(rdb, job_id)
    assert (job.status, job.lease_owner, job.outputs) == ("running", "r2", [])
    assert settlements(rdb, job_id) == []
    await r1.stop(grace_s=1)


async def test_graceful_stop_releases_abandoned_leases_for_an_immediate_reclaim(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    """A deploy: the old API stops with a job in flight. The job goes straight back to the queue
    (keeping its attempt), so the new API takes it over now rather than after the (here
    10-minute) lease."""
    hanging = FakeExecutor(storage=storage, hang={"slow"})
    r1 = make_runner(rdb, rsettings, storage, bus, hanging, "r1", lease_s=600)
    job_id = submit(jobs, alice, prompt="slow")
    r1.start()
    await wait_until(lambda: bool(hanging.runs), 10, what="r1 to start the job")
    await r1.stop(grace_s=0)
    released = get_job(rdb, job_id)
    assert (released.status, released.lease_owner, released.lease_expires_at, released.attempts) == (
        "queued", None, None, 0)
    assert released.next_attempt_at is not None and released.next_attempt_at <= utcnow()
    healthy = FakeExecutor(storage=storage)
    r2 = make_runner(rdb, rsettings, storage, bus, healthy, "r2", lease_s=600)
    r2.start()
    try:
        done = await wait_job(rdb, job_id, timeout_s=30)
    finally:
        await r2.stop()
    assert (done.status, done.attempts) == ("succeeded", 1)
    assert [r.attempt for r in healthy.runs] == [1]  # the same attempt: it attaches to the same run
    assert settlements(rdb, job_id) == ["capture"]


async def test_three_graceful_restarts_during_one_job_use_no_attempt(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    """Three deploys while one long job runs (max_attempts=3): each graceful stop hands the job
    back without a failure, so the fourth API finishes it, charged once, announced started once."""
    job_id = submit(jobs, alice, prompt="slow")
    assert get_job(rdb, job_id).max_attempts == 3
    for n in range(1, 4):
        hanging = FakeExecutor(storage=storage, hang={"slow"})
        runner = make_runner(rdb, rsettings, storage, bus, hanging, f"r{n}", lease_s=600)
        runner.start()
        await wait_until(lambda h=hanging: bool(h.runs), 10, what=f"r{n} to start the job")  # type: ignore[misc]
        assert hanging.runs[0].attempt == 1
        await runner.stop(grace_s=0)
        assert (get_job(rdb, job_id).status, get_job(rdb, job_id).attempts) == ("queued", 0)
    healthy = FakeExecutor(storage=storage)
    last = make_runner(rdb, rsettings, storage, bus, healthy, "r4", lease_s=600)
    last.start()
    try:
        done = await wait_job(rdb, job_id, timeout_s=30)
    finally:
        await last.stop()
    assert (done.status, done.attempts, done.error_code) == ("succeeded", 1, None)
    assert settlements(rdb, job_id) == ["capture"]
    assert balance(rdb, alice.user.id) == ledger.BalanceView(999, 0)
    with rdb.read() as s:
        events = s.execute(select(JobEvent.type, JobEvent.data).where(JobEvent.job_id == job_id)).all()
    assert [webhook_event(t, d) for t, d in events].count("start") == 1
    assert sum(1 for t, d in events if t == "status" and d.get("stage") == "handover") == 3
