"""``RayExecutor`` over a stand-in deployment handle (no Ray): what it sends, and how it cancels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

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


class FakeCall:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class FakeHandle:
    """A deployment handle: ``options(...).generate.remote(payload)`` and ``cancel.remote(job_id)``
    (which answers, call by call, whether the replica it reached owned the job)."""

    def __init__(self, response: FakeResponse, owners: list[bool] | None = None) -> None:
        self.response = response
        self.payloads: list[dict[str, Any]] = []
        self.options_seen: list[dict[str, Any]] = []
        self.cancels: list[str] = []
        self.owners = list(owners or [True])

    @property
    def cancel(self) -> FakeCall:
        async def remote(job_id: str) -> bool:
            self.cancels.append(job_id)
            return self.owners.pop(0) if self.owners else False

        return FakeCall(remote)

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


async def test_closing_the_stream_early_leaves_the_replica_run_going() -> None:
    """The runner closes the stream on shutdown or a lost lease: the replica owns the run and keeps
    it for the job's next attempt, so nothing is canceled."""
    handle = FakeHandle(FakeResponse(STREAM))
    executor = RayExecutor({"tiny-sd": handle})
    stream = executor.run(request())
    first = await anext(stream)
    assert isinstance(first, StageEvent) and executor.jobs_ahead("tiny-sd") == 1
    await stream.aclose()
    assert not handle.response.canceled and handle.cancels == []
    assert executor.jobs_ahead("tiny-sd") == 0


async def test_cancel_calls_the_deployments_cancel_until_a_replica_owns_the_job() -> None:
    handle = FakeHandle(FakeResponse(STREAM), owners=[False, False, True])
    executor = RayExecutor({"tiny-sd": handle})
    stream = executor.run(request())
    await anext(stream)
    await executor.cancel("job_1")
    assert handle.cancels == ["job_1"] * 3
    assert not handle.response.canceled  # the explicit cancel, not a dropped stream
    await stream.aclose()
    await executor.cancel("job_1")  # no longer streamed here: nothing to do
    assert len(handle.cancels) == 3


async def test_the_request_is_a_versioned_message_and_unknown_events_are_skipped() -> None:
    """A newer replica may add fields to events and new event types: consumed without error."""
    newer = [{"type": "stage", "stage": "generating", "v": 2, "eta_s": 3.5},
             {"type": "thinking", "v": 2, "about": "something new"},
             {"type": "progress", "step": 1, "total": 2, "stage": "generating", "gpu": "H200", "v": 2},
             {"type": "done", "result": {"seed": 1}, "v": 2, "cost": {"gpu_s": 1.0}}]
    handle = FakeHandle(FakeResponse(newer))
    events = [e async for e in RayExecutor({"tiny-sd": handle}).run(request())]
    assert events == [StageEvent("generating"), ProgressEvent(1, 2), DoneEvent({"seed": 1})]
    payload = handle.payloads[0]
    assert payload["v"] == 1 and payload["adapter_set"] == ""
    from serve.messages import ReplicaRequest

    # and a replica reading a request from a newer API ignores what it does not know
    parsed = ReplicaRequest.model_validate({**payload, "v": 2, "priority": "high"})
    assert parsed.job_id == "job_1" and not hasattr(parsed, "priority")


async def test_cancel_tries_are_spaced_not_back_to_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica that has not registered the request yet gets time to: a pause between tries."""
    import serve.executor as executor_module

    handle = FakeHandle(FakeResponse(STREAM), owners=[False, False, True])
    executor = RayExecutor({"tiny-sd": handle})
    stream = executor.run(request())
    await anext(stream)
    pauses: list[tuple[int, float]] = []  # (tries made so far, pause)
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        pauses.append((len(handle.cancels), delay))
        await real_sleep(0)

    monkeypatch.setattr(executor_module.asyncio, "sleep", recording_sleep)
    await executor.cancel("job_1")
    monkeypatch.undo()
    assert handle.cancels == ["job_1"] * 3
    assert pauses == [(1, executor_module.CANCEL_RETRY_S), (2, executor_module.CANCEL_RETRY_S)]
    await stream.aclose()


async def test_items_carrying_several_events_are_read_in_order() -> None:
    """It asks for ``stream_batches``; an ``events`` item (output and done ready together) yields
    each of its events, and a plain event item still works beside it (an older replica sends only those)."""
    from api.core.events import OutputEvent
    from serve.messages import pack_events

    output = event_to_dict(OutputEvent(key="outputs/usr_1/job_1/0.png", content_type="image/png"))
    items = [event_to_dict(StageEvent("generating")),
             pack_events([event_to_dict(ProgressEvent(2, 2)), event_to_dict(StageEvent("encoding"))]),
             pack_events([output, event_to_dict(DoneEvent({"seed": 1}))])]
    handle = FakeHandle(FakeResponse(items))
    events = [e async for e in RayExecutor({"tiny-sd": handle}).run(request())]
    assert [type(e).__name__ for e in events] == ["StageEvent", "ProgressEvent", "StageEvent", "OutputEvent",
                                                  "DoneEvent"]
    assert handle.payloads[0]["stream_batches"] is True
