"""Which write errors the runner retries: only the database being unavailable, and side effects
of a committed write are never repeated."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session

from api.core.events import ExecutorEvent, OutputEvent, ProviderEvent
from api.db.engine import Database
from api.db.tables import Job, JobEvent
from api.runner.runner import Runner
from api.services.events import EventBus
from api.services.jobs import JobService, Submission
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.fake_executor import FakeExecutor, RoutedExecutor
from tests.fixtures.harness import get_job, ledger_rows


def submit(jobs: JobService, user: NewUser) -> str:
    job, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": "a cat"}))
    return job.id


class FlakyRecord(Runner):
    """Recording an output raises ``errors`` (one per call) inside its transaction (which the
    runner writes with the settlement: the output arrives right before the result)."""

    def __init__(self, *args: Any, errors: list[Exception], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors = errors
        self.output_writes = 0

    def _apply(self, session: Session, job: Job, event: ExecutorEvent) -> tuple[str, dict[str, Any]] | None:
        if isinstance(event, OutputEvent):
            self.output_writes += 1
            if self.errors:
                raise self.errors.pop(0)
        return super()._apply(session, job, event)


def _runner(cls: type[Runner], rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus,
            executor: FakeExecutor, **kwargs: Any) -> Any:
    return cls(rdb, executor, rsettings, storage, bus, runner_id="r1", **kwargs)


async def test_a_deterministic_write_error_settles_the_job_instead_of_retrying_forever(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    bug = IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))
    runner = _runner(FlakyRecord, rdb, rsettings, storage, bus, FakeExecutor(storage=storage),
                     errors=[bug] * 10)
    job_id = submit(jobs, alice)
    await runner.drain(timeout_s=20)  # before the fix: the write was retried while the lease lasted
    job = get_job(rdb, job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "executor_error", 3)
    assert runner.output_writes == 3  # once per attempt, never retried
    assert [e.kind for e in ledger_rows(rdb, job_id=job_id)] == ["reserve", "refund"]


async def test_a_database_outage_is_retried_and_the_output_is_recorded_once(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    outage = OperationalError("UPDATE", {}, Exception("database is locked"))
    runner = _runner(FlakyRecord, rdb, rsettings, storage, bus, FakeExecutor(storage=storage),
                     errors=[outage, outage])
    job_id = submit(jobs, alice)
    await runner.drain(timeout_s=20)
    job = get_job(rdb, job_id)
    assert (job.status, job.attempts, len(job.outputs)) == ("succeeded", 1, 1)
    assert runner.output_writes == 3


class FailingBus(EventBus):
    """The first publish of an ``output`` event raises (after the output was committed)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def publish(self, job_id: str, type_: str, data: dict[str, Any]) -> None:
        if type_ == "output" and not self.failed:
            self.failed = True
            raise RuntimeError("listener blew up")
        super().publish(job_id, type_, data)


class FailingMetrics:
    def __init__(self) -> None:
        self.routed_calls = 0

    def routed(self, job_id: str, event: Any) -> None:
        self.routed_calls += 1
        raise RuntimeError("metrics bug")

    def finished(self, job: Any) -> None:
        pass


async def test_side_effects_after_a_commit_are_not_retried_with_the_write(
        rdb: Database, rsettings: Settings, storage: LocalStorage, jobs: JobService, alice: NewUser) -> None:
    bus = FailingBus()
    metrics = FailingMetrics()
    routed = RoutedExecutor(storage=storage, route=ProviderEvent(provider="local", reason="test"))
    runner = Runner(rdb, routed, rsettings, storage, bus, runner_id="r1", metrics=metrics)
    job_id = submit(jobs, alice)
    await runner.drain(timeout_s=20)
    job = get_job(rdb, job_id)
    assert (job.status, job.attempts, len(job.outputs)) == ("succeeded", 1, 1)  # not recorded twice
    assert bus.failed and metrics.routed_calls == 1
    with rdb.read() as s:
        kinds = [t for t in s.execute(select(JobEvent.type).where(JobEvent.job_id == job_id)).scalars()]
    assert kinds.count("output") == 1 and kinds.count("provider") == 1
