"""``RayExecutor`` over a stand-in deployment handle (no Ray): what it sends, and when it cancels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from api.core.events import DoneEvent, ProgressEvent, StageEvent, event_to_dict
from api.core.executor import ExecutionRequest
from serve.executor import RayExecutor


class FakeResponse:
    """A streaming DeploymentResponseGenerator: async iteration plus ``cancel()``."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.canceled = False

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[dict[str, Any]]:
        for item in self.items:
            await asyncio.sleep(0)
            yield item

    def cancel(self) -> None:
        self.canceled = True


class FakeHandle:
    def __init__(self, response: FakeResponse) -> None:
        self.response = response
        self.payloads: list[dict[str, Any]] = []
        self.options_seen: list[dict[str, Any]] = []

    def options(self, **options: Any) -> FakeHandle:
        self.options_seen.append(options)
        return self

    @property
    def generate(self) -> FakeHandle:
        return self

    def remote(self, payload: dict[str, Any]) -> FakeResponse:
        self.payloads.append(payload)
        return self.response


def request(attempt: int = 1) -> ExecutionRequest:
    return ExecutionRequest(job_id="job_1", user_id="usr_1", model="tiny-sd", kind="image", task="t2i",
                            input={"prompt": "x"}, attempt=attempt, output_prefix="outputs/usr_1/job_1/")


STREAM = [event_to_dict(StageEvent("generating")), event_to_dict(ProgressEvent(1, 2)),
          event_to_dict(ProgressEvent(2, 2)), event_to_dict(DoneEvent({"seed": 1}))]


async def test_a_full_stream_is_passed_on_and_not_canceled() -> None:
    response = FakeResponse(STREAM)
    handle = FakeHandle(response)
    executor = RayExecutor({"tiny-sd": handle})
    events = [e async for e in executor.run(request(attempt=2))]
    assert [type(e).__name__ for e in events] == ["StageEvent", "ProgressEvent", "ProgressEvent", "DoneEvent"]
    assert not response.canceled and executor.jobs_ahead("tiny-sd") == 0
    assert handle.options_seen == [{"stream": True}]
    payload = handle.payloads[0]
    assert (payload["job_id"], payload["attempt"], payload["output_prefix"]) == ("job_1", 2, "outputs/usr_1/job_1/")


async def test_closing_the_stream_early_cancels_the_replica_request() -> None:
    """The runner closes the stream when it lost the job's lease: the replica must stop that request."""
    response = FakeResponse(STREAM)
    executor = RayExecutor({"tiny-sd": FakeHandle(response)})
    stream = executor.run(request())
    first = await anext(stream)
    assert isinstance(first, StageEvent) and executor.jobs_ahead("tiny-sd") == 1
    await stream.aclose()
    assert response.canceled
    assert executor.jobs_ahead("tiny-sd") == 0


async def test_cancel_reaches_the_running_request() -> None:
    response = FakeResponse(STREAM)
    executor = RayExecutor({"tiny-sd": FakeHandle(response)})
    stream = executor.run(request())
    await anext(stream)
    await executor.cancel("job_1")
    assert response.canceled
    await stream.aclose()
