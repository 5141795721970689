"""``GeneratorServer`` as a plain class (no Ray): how it forms batches, streams, cancels, and
keeps each job's run for callers that attach.

The pipeline is a stand-in that takes a short time per call and can be held after its first step
(``gate``), so a test acts while a batch runs without depending on the machine's speed; the real
pipeline and the real Serve path are covered by ``test_serving_ray.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from models.catalog import Catalog
from models.generator import GeneratedMedia, GenerationCanceled
from serve.generator import GeneratorServer

CALL_S = 0.3  # one pipeline call of the stand-in


class FakeGenerator:
    """``models.generator.Generator``'s surface: ``generate(batch, on_step, should_cancel, adapters)``."""

    device = "cpu"

    def __init__(self) -> None:
        self.call_s = CALL_S
        self.calls: list[int] = []
        self.gate = threading.Event()
        """Cleared: each call stops after its first step until the test sets it (bounded, 10 s)."""
        self.gate.set()
        self._lock = threading.Lock()

    def generate(self, batch: list[dict[str, Any]], on_step: Any = None, should_cancel: Any = None,
                 adapters: Any = None) -> list[GeneratedMedia]:
        with self._lock:
            self.calls.append(len(batch))
            for step in range(3):
                time.sleep(self.call_s / 3)
                if on_step:
                    on_step(step + 1, 3)
                if step == 0:
                    self.gate.wait(10)
                if should_cancel and should_cancel():
                    raise GenerationCanceled("canceled")
            return [GeneratedMedia(kind="image", width=8, height=8, seed=int(r.get("seed") or 0),
                                   prompt=r["prompt"], image=Image.new("RGB", (8, 8))) for r in batch]

    def close(self) -> None:
        pass


class Server(GeneratorServer):
    def _load(self, spec: Any) -> FakeGenerator:
        return FakeGenerator()


@pytest.fixture
def server(tmp_path: Path) -> Server:
    spec = Catalog.load().get("tiny-sd")
    assert spec is not None
    data = spec.model_dump(mode="json")
    data["serving"].update(max_batch_size=8, batch_wait_timeout_s=0.05)
    return Server(data, {"storage_url": f"file://{tmp_path / 'storage'}", "signing_secret": "s"})


def request(i: int, **extra: Any) -> dict[str, Any]:
    return {"job_id": f"job_{i}", "attempt": 1, "input": {"prompt": f"p{i}", "seed": i},
            "output_prefix": f"outputs/u/job_{i}/", "adapter_set": "", **extra}


async def collect(server: Server, req: dict[str, Any]) -> list[dict[str, Any]]:
    return [event async for event in server.generate(req)]


async def until(check: Any, timeout_s: float = 5.0) -> None:
    """Wait (bounded) until ``check()`` is true."""
    for _ in range(int(timeout_s / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def held_first(server: Server, req: dict[str, Any]) -> asyncio.Task[list[dict[str, Any]]]:
    """Start ``req`` with the pipeline held after its first step; returns once it is running."""
    server.generator.gate.clear()
    task = asyncio.create_task(collect(server, req))
    await until(lambda: server.generator.calls)
    return task


async def test_requests_arriving_while_a_batch_runs_form_one_batch(server: Server) -> None:
    """Ray's @serve.batch split these by arrival time (1, 1, 1, …); they must run as one batch."""
    first = await held_first(server, request(0))  # the first batch (of one) is running
    later = []
    for i in range(1, 7):  # spaced wider than batch_wait_timeout_s (the first batch is held meanwhile)
        later.append(asyncio.create_task(collect(server, request(i))))
        await asyncio.sleep(0.03 + 0.05)
    await until(lambda: server.stats()["queued"] == 6)
    server.generator.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *later), timeout=10)
    assert server.batch_sizes == [1, 6]
    assert server.generator.calls == [1, 6]
    for i, events in enumerate(results):
        types = [e["type"] for e in events]
        assert types[0] == "stage" and types[-2:] == ["output", "done"], types
        assert events[-2]["key"] == f"outputs/u/job_{i}/0.png"


async def test_a_burst_fills_batches_up_to_the_maximum(server: Server) -> None:
    server.max_batch_size = 4
    results = await asyncio.wait_for(asyncio.gather(*(collect(server, request(i)) for i in range(10))), timeout=10)
    assert server.batch_sizes == [4, 4, 2]
    assert all(events[-1]["type"] == "done" for events in results)


async def test_batches_hold_one_adapter_set(server: Server) -> None:
    server.adapter_set = _no_adapters  # type: ignore[method-assign]
    reqs = [request(i, adapter_set="" if i % 2 else '[["l1","k",1.0]]') for i in range(6)]
    await asyncio.wait_for(asyncio.gather(*(collect(server, r) for r in reqs)), timeout=10)
    assert sorted(server.batch_sizes) == [3, 3]


async def _no_adapters(set_id: str) -> list[Any]:
    return []


async def test_a_queued_job_canceled_explicitly_never_runs(server: Server) -> None:
    first = await held_first(server, request(0))
    queued = asyncio.create_task(collect(server, request(1)))
    await until(lambda: server.stats()["queued"] == 1)
    assert await server.cancel("job_1") is True
    server.generator.gate.set()
    events = await asyncio.wait_for(queued, timeout=5)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "canceled"
    await asyncio.wait_for(first, timeout=5)
    assert server.batch_sizes == [1]
    assert "job_1" in server.stats()["canceled"]
    assert await server.cancel("job_1") is False  # finished: nothing to cancel
    assert await server.cancel("job_unknown") is False


async def test_a_running_batch_stops_when_all_its_jobs_are_canceled(server: Server) -> None:
    task = await held_first(server, request(0))
    assert await server.cancel("job_0")
    server.generator.gate.set()
    events = await asyncio.wait_for(task, timeout=5)
    assert events[-1]["code"] == "canceled"
    assert server.generator.calls == [1]
    # the next request runs normally on the same loop
    events = await asyncio.wait_for(collect(server, request(2)), timeout=5)
    assert events[-1]["type"] == "done"
    server.check_health()


async def test_a_caller_that_goes_away_does_not_stop_the_run(server: Server) -> None:
    """Replica-owned: closing the stream (API restart, SIGKILL) only stops listening."""
    task = await held_first(server, request(0))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the job's next attempt attaches: it gets the rest and the result; the pipeline ran once
    retry = asyncio.create_task(collect(server, request(0, attempt=2)))
    await until(lambda: server.stats()["attaches"] == {"job_0": 1})
    server.generator.gate.set()
    events = await asyncio.wait_for(retry, timeout=5)
    types = [e["type"] for e in events]
    assert types[-2:] == ["output", "done"] and types.count("stage") >= 1, types
    assert server.generator.calls == [1]
    stats = server.stats()
    assert stats["runs_by_job"] == {"job_0": 1} and stats["attaches"] == {"job_0": 1}
    assert stats["jobs"]["job_0"]["attempts"] == [1, 2] and stats["canceled"] == []


async def test_an_attach_to_a_finished_run_gets_the_result_at_once(server: Server) -> None:
    first = await asyncio.wait_for(collect(server, request(0)), timeout=5)
    again = await asyncio.wait_for(collect(server, request(0, attempt=2)), timeout=5)
    assert [e for e in again if e["type"] in ("output", "done")] == first[-2:]
    assert len([e for e in again if e["type"] == "progress"]) <= 1  # progress collapsed to the latest
    assert server.generator.calls == [1]


async def test_a_failed_or_canceled_run_is_not_reused(server: Server) -> None:
    task = await held_first(server, request(0))
    await server.cancel("job_0")
    server.generator.gate.set()
    await asyncio.wait_for(task, timeout=5)
    events = await asyncio.wait_for(collect(server, request(0, attempt=2)), timeout=5)
    assert events[-1]["type"] == "done"
    assert server.stats()["runs_by_job"] == {"job_0": 2}


async def test_a_stored_result_is_collected_by_another_replica(server: Server, tmp_path: Path) -> None:
    """Another replica (or this one after a restart) finds ``result.json`` and runs nothing."""
    first = await asyncio.wait_for(collect(server, request(0)), timeout=5)
    assert server.storage.exists("outputs/u/job_0/result.json")
    other = Server(server.spec.model_dump(mode="json"), {"storage_url": server.runtime.storage_url,
                                                         "signing_secret": "s"})
    events = await asyncio.wait_for(collect(other, request(0, attempt=2)), timeout=5)
    assert [e["type"] for e in events] == ["output", "done"]
    assert events[0]["key"] == first[-2]["key"] and events[1]["result"] == first[-1]["result"]
    assert other.generator.calls == [] and other.stats()["attaches"] == {"job_0": 1}
    # outputs gone (deleted by a retry): the record is not trusted, the job runs again
    server.storage.delete("outputs/u/job_0/0.png")
    third = Server(server.spec.model_dump(mode="json"), {"storage_url": server.runtime.storage_url,
                                                         "signing_secret": "s"})
    events = await asyncio.wait_for(collect(third, request(0, attempt=3)), timeout=5)
    assert events[-1]["type"] == "done" and third.generator.calls == [1]


async def test_finished_runs_are_bounded(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import serve.generator as generator

    monkeypatch.setattr(generator, "FINISHED_KEPT", 3)
    server.generator.call_s = 0.0
    for i in range(6):
        await asyncio.wait_for(collect(server, request(i)), timeout=5)
    assert list(server.runs) == ["job_3", "job_4", "job_5"]


class SteppedGenerator(FakeGenerator):
    """Reports steps 1–3 of 4 at once, then waits for ``resume`` (bounded, 10 s) before step 4."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = threading.Event()

    def generate(self, batch: list[dict[str, Any]], on_step: Any = None, should_cancel: Any = None,
                 adapters: Any = None) -> list[GeneratedMedia]:
        for step in (1, 2, 3):
            on_step(step, 4)
        self.resume.wait(10)
        on_step(4, 4)
        return [GeneratedMedia(kind="image", width=8, height=8, seed=0, prompt=r["prompt"],
                               image=Image.new("RGB", (8, 8))) for r in batch]


class SteppedServer(GeneratorServer):
    def _load(self, spec: Any) -> SteppedGenerator:
        return SteppedGenerator()


def stepped_server(tmp_path: Path, interval_s: float) -> SteppedServer:
    spec = Catalog.load().get("tiny-sd")
    assert spec is not None
    server = SteppedServer(spec.model_dump(mode="json"), {"storage_url": f"file://{tmp_path / 'storage'}",
                                                           "signing_secret": "s"})
    server.progress_interval_s = interval_s
    return server


async def test_progress_on_the_stream_is_paced_the_first_and_last_step_always_go(tmp_path: Path) -> None:
    """Steps 2 and 3 come within the interval of step 1: the newest is held, and step 4 (the last)
    replaces it at once: the stream carries 1 and 4, each stream item being replica time."""
    server = stepped_server(tmp_path, interval_s=60.0)
    server.generator.resume.set()
    events = await asyncio.wait_for(collect(server, request(0)), timeout=10)
    assert [(e["step"], e["total"]) for e in events if e["type"] == "progress"] == [(1, 4), (4, 4)]
    assert [e["type"] for e in events][-2:] == ["output", "done"]


async def test_a_held_step_goes_when_its_interval_ends(tmp_path: Path) -> None:
    """A step held back is not kept until the next one: with the pipeline paused after step 3, step
    3 reaches the stream once the interval since step 1 ended, before step 4 exists."""
    server = stepped_server(tmp_path, interval_s=1.0)
    seen: list[dict[str, Any]] = []

    async def follow() -> None:
        async for event in server.generate(request(0)):
            seen.append(event)

    task = asyncio.create_task(follow())
    await until(lambda: any(e.get("step") == 3 for e in seen), timeout_s=10)
    assert not server.generator.resume.is_set()  # step 4 was not reported yet
    server.generator.resume.set()
    await asyncio.wait_for(task, timeout=10)
    assert [e["step"] for e in seen if e["type"] == "progress"] == [1, 3, 4]


async def test_a_caller_that_reads_event_batches_gets_what_is_ready_as_one_item(server: Server) -> None:
    """``stream_batches``: the output, the done and the stream's end are ready together: one item.
    Unpacked, the stream is the one a caller without it gets; without it, one event per item."""
    from serve.messages import EVENTS_ITEM, unpack_events

    server.generator.call_s = 0.0
    plain = await asyncio.wait_for(collect(server, request(0)), timeout=10)
    items = await asyncio.wait_for(collect(server, request(1, stream_batches=True)), timeout=10)
    assert all(item["type"] != EVENTS_ITEM for item in plain)
    assert items[-1]["type"] == EVENTS_ITEM
    assert [e["type"] for e in items[-1]["events"]] == ["output", "done"]
    unpacked = [e for item in items for e in unpack_events(item)]
    assert [e["type"] for e in unpacked] == [e["type"] for e in plain]
    assert len(items) < len(plain)
    # a caller attaching to the finished run gets its replay as one item too
    again = await asyncio.wait_for(collect(server, request(1, attempt=2, stream_batches=True)), timeout=10)
    assert len(again) == 1 and again[0]["events"][-1]["type"] == "done"


async def test_the_test_hook_holds_a_job_at_a_step_until_released(tmp_path: Path) -> None:
    spec = Catalog.load().get("tiny-sd")
    assert spec is not None
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    server = Server(spec.model_dump(mode="json"), {"storage_url": f"file://{tmp_path / 'storage'}",
                                                   "signing_secret": "s", "test_hooks_dir": str(hooks)})
    server.generator.call_s = 0.0
    server.progress_interval_s = 0.0  # every step on the stream (pacing has its own tests)
    (hooks / "tok-abcdefgh.hold").write_text("2")
    held = asyncio.create_task(collect(server, {**request(0), "input": {"prompt": "x tok-abcdefgh y"}}))
    for _ in range(200):  # bounded: 10 s
        if (hooks / "job_0.held").exists():
            break
        await asyncio.sleep(0.05)
    assert (hooks / "job_0.held").read_text() == "2"
    other = asyncio.create_task(collect(server, request(1)))  # queued behind the held batch
    for _ in range(100):
        if server.stats()["queued"] == 1:
            break
        await asyncio.sleep(0.05)
    assert server.stats()["queued"] == 1 and not held.done()
    (hooks / "job_0.release").write_text("")
    events = await asyncio.wait_for(held, timeout=5)
    assert (await asyncio.wait_for(other, timeout=5))[-1]["type"] == "done"
    assert events[-1]["type"] == "done"
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == [1, 2, 3]
    assert not (hooks / "job_1.held").exists()  # no token in its prompt: never held


async def test_drain_waits_for_the_runs_the_replica_owns(server: Server) -> None:
    """A replica being stopped first finishes its runs, even those whose caller went away."""
    task = await held_first(server, request(0))
    task.cancel()
    assert await server.drain(0.05) is False  # still running, caller gone
    server.generator.gate.set()
    assert await server.drain(5) is True
    assert server.stats()["jobs"]["job_0"]["state"] == "succeeded"


async def test_two_requests_for_one_job_arriving_together_start_one_run(server: Server) -> None:
    """Both look for an existing run (a thread hop each) before either registers one: the job's
    lock makes the second attach instead of starting the pipeline again."""
    first, second = await asyncio.wait_for(
        asyncio.gather(collect(server, request(0)), collect(server, request(0, attempt=2))), timeout=10)
    assert first[-1]["type"] == "done" and second[-1]["type"] == "done"
    assert [e for e in first if e["type"] == "output"] == [e for e in second if e["type"] == "output"]
    stats = server.stats()
    assert server.generator.calls == [1] and stats["runs_by_job"] == {"job_0": 1}
    assert stats["attaches"] == {"job_0": 1}
    assert server._job_locks == {}  # nothing left behind


async def test_a_cancel_that_comes_before_the_request_is_kept(server: Server) -> None:
    """The cancel reaches the replica before the job's request does: the request is answered
    canceled and the pipeline never runs it."""
    assert await server.cancel("job_0") is False  # nothing here yet (the executor tries again)
    events = await asyncio.wait_for(collect(server, request(0)), timeout=5)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "canceled"
    assert server.generator.calls == [] and "job_0" not in server.stats()["runs_by_job"]
    events = await asyncio.wait_for(collect(server, request(1)), timeout=5)  # others run as usual
    assert events[-1]["type"] == "done"
