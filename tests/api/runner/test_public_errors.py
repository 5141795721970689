"""Client-facing job errors carry a code and a safe message; the raw detail goes to the log."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from api.core.errors import InvalidInput
from api.core.events import ErrorEvent, ExecutorEvent, StageEvent
from api.core.executor import ExecutionRequest
from api.db.engine import Database
from api.db.tables import JobEvent
from api.http.schemas import job_view
from api.runner.runner import Runner
from api.services.events import EventBus
from api.services.jobs import JobService, Submission
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.api.runner.conftest import make_runner
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import get_job

SECRET = "postgresql://admin:hunter2@10.0.0.5:5432/prod"


class LeakyExecutor:
    """Crashes with an exception whose text carries a credential and an internal address."""

    def __init__(self, error: ErrorEvent | None = None) -> None:
        self.error = error
        self.runs = 0

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        self.runs += 1
        yield StageEvent("generating")
        if self.error is not None:
            yield self.error
            return
        raise RuntimeError(f"could not connect to {SECRET}")

    async def cancel(self, job_id: str) -> None:
        return None


def _public_text(db: Database, storage: LocalStorage, job_id: str) -> str:
    job = get_job(db, job_id)
    with db.read() as s:
        events = s.execute(select(JobEvent.data).where(JobEvent.job_id == job_id)).scalars().all()
    return json.dumps(job_view(job, storage, 60), default=str) + json.dumps(events, default=str)


@pytest.mark.parametrize("error", [None, ErrorEvent("gpu_busy", f"replica says: {SECRET}", retryable=False),
                                   ErrorEvent("out_of_memory", f"CUDA OOM at {SECRET}", retryable=False)])
async def test_internal_error_text_never_reaches_the_client_but_is_logged(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser, caplog: pytest.LogCaptureFixture, error: ErrorEvent | None) -> None:
    executor = LeakyExecutor(error)
    runner = make_runner(rdb, rsettings, storage, bus, executor)
    job, _ = jobs.submit(alice.user, Submission("tiny-sd", {"prompt": "a cat"}))
    with caplog.at_level(logging.WARNING):
        await runner.drain(timeout_s=20)
    done = get_job(rdb, job.id)
    assert done.status == "failed"
    expected = {None: ("executor_error", "generation failed"), "gpu_busy": ("gpu_busy", "generation failed"),
                "out_of_memory": ("out_of_memory", "the model ran out of GPU memory; try a smaller size, "
                                                   "fewer frames or fewer steps")}[error and error.code]
    assert (done.error_code, done.error_message) == expected
    public = _public_text(rdb, storage, job.id)
    assert "hunter2" not in public and "10.0.0.5" not in public
    assert any("hunter2" in r.getMessage() + (r.exc_text or "") and job.id in r.getMessage()
               for r in caplog.records)
    await runner.stop()


async def test_our_own_validation_message_is_kept(rdb: Database, rsettings: Settings, storage: LocalStorage,
                                                  bus: EventBus, jobs: JobService, alice: NewUser) -> None:
    def resolve(_job: Any) -> dict[str, Any]:
        raise InvalidInput("input.image: upload up_123 not found", {"field": "image"})

    runner = Runner(rdb, LeakyExecutor(), rsettings, storage, bus, runner_id="r1", resolve_input=resolve)
    job, _ = jobs.submit(alice.user, Submission("tiny-sd", {"prompt": "a cat"}))
    await runner.drain(timeout_s=20)
    done = get_job(rdb, job.id)
    assert (done.status, done.error_code, done.error_message) == (
        "failed", "invalid_input", "input.image: upload up_123 not found")
    await runner.stop()


async def test_an_input_fetch_that_timed_out_is_retried_not_failed(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    """The image URL timed out on the first attempt: a retryable failure; the next attempt runs."""
    from api.services.egress import UrlFetchFailed

    calls: list[int] = []

    def resolve(job: Any) -> dict[str, Any]:
        calls.append(job.attempts)
        if len(calls) == 1:
            raise UrlFetchFailed("input.image", "the URL took too long to answer", reason="timeout")
        return dict(job.input)

    executor = FakeExecutor(storage=storage)
    runner = Runner(rdb, executor, rsettings.model_copy(update={"retry_backoff_s": 0.0}), storage, bus,
                    runner_id="r1", resolve_input=resolve)
    job, _ = jobs.submit(alice.user, Submission("tiny-sd", {"prompt": "a cat"}))
    await runner.drain(timeout_s=20)
    await runner.stop()
    assert calls == [1, 2]
    assert len(executor.runs) == 1
    done = get_job(rdb, job.id)
    assert (done.status, done.attempts) == ("succeeded", 2)
