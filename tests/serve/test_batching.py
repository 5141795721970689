"""``GeneratorServer`` batching (no Ray): buckets by size/steps/guidance/LoRA set, FIFO by the oldest
head, the adaptive batch wait, and encoding/upload overlapped with the next batch's denoising.

The stand-in pipeline and its gate come from ``test_generator_server``; the held storage below
blocks chosen uploads until the test releases them, so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.catalog import Catalog
from models.generator import limit_threads
from serve.generator import GeneratorServer
from tests.serve.test_generator_server import FakeGenerator, Server, collect, held_first, until


def make_server(tmp_path: Path, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05,
                cls: type[GeneratorServer] = Server, **runtime: Any) -> Any:
    spec = Catalog.load().get("tiny-sd")
    assert spec is not None
    data = spec.model_dump(mode="json")
    data["serving"].update(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
    server = cls(data, {"storage_url": f"file://{tmp_path / 'storage'}", "signing_secret": "s", **runtime})
    if isinstance(server.generator, FakeGenerator):
        server.generator.call_s = 0.0
    return server


def req(i: int, **inp: Any) -> dict[str, Any]:
    return {"job_id": f"job_{i}", "attempt": 1, "input": {"prompt": f"p{i}", "seed": i, **inp},
            "output_prefix": f"outputs/u/job_{i}/", "adapter_set": ""}


async def queue_in_order(server: Any, reqs: list[dict[str, Any]]) -> list[asyncio.Task[list[dict[str, Any]]]]:
    """Start ``reqs`` one after another, each queued before the next starts (a request reaches the
    queue after a thread hop, so requests started together may queue in any order)."""
    tasks = []
    for r in reqs:
        queued = server.stats()["queued"]
        tasks.append(asyncio.create_task(collect(server, r)))
        await until(lambda q=queued: server.stats()["queued"] == q + 1)
    return tasks


class HeldStorage:
    """The server's storage, with every upload under a held job's prefix blocked until released."""

    def __init__(self, inner: Any, held: set[str]) -> None:
        self.inner = inner
        self.held = held
        self.release = threading.Event()
        self.blocked = threading.Event()
        """Set once a held upload is waiting."""
        self.stored: list[str] = []

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        if any(f"/{job}/" in key for job in self.held):
            self.blocked.set()
            assert self.release.wait(10), "the test never released the upload"
        self.inner.put_bytes(key, data, content_type)
        self.stored.append(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --- the adaptive batch wait --------------------------------------------------------------------

async def test_a_lone_request_starts_at_once_whatever_the_batch_wait(tmp_path: Path) -> None:
    """Nothing else is coming: the head does not wait the 60 s for companions."""
    server = make_server(tmp_path, batch_wait_timeout_s=60.0)
    events = await asyncio.wait_for(collect(server, req(0)), timeout=5)
    assert events[-1]["type"] == "done" and server.batch_sizes == [1]
    # and the next lone one too (the previous batch was not full)
    events = await asyncio.wait_for(collect(server, req(1)), timeout=5)
    assert events[-1]["type"] == "done" and server.batch_sizes == [1, 1]


async def test_requests_arriving_together_wait_for_each_other(tmp_path: Path) -> None:
    """Requests still inside ``generate`` (looking for a stored result) are known to be coming."""
    server = make_server(tmp_path, batch_wait_timeout_s=60.0)
    results = await asyncio.wait_for(asyncio.gather(*(collect(server, req(i)) for i in range(3))), timeout=10)
    assert all(events[-1]["type"] == "done" for events in results)
    assert server.batch_sizes == [3]


async def test_after_a_full_batch_the_next_one_waits_for_companions(tmp_path: Path) -> None:
    """A full batch says the replica is saturated: the next head waits (bounded) for company."""
    server = make_server(tmp_path, max_batch_size=2, batch_wait_timeout_s=60.0)
    server.generator.gate.clear()
    full = [asyncio.create_task(collect(server, req(i))) for i in range(2)]
    await until(lambda: server.generator.calls == [2])
    third = asyncio.create_task(collect(server, req(2)))
    await until(lambda: server.stats()["queued"] == 1)
    server.generator.gate.set()
    await asyncio.wait_for(asyncio.gather(*full), timeout=5)
    await until(lambda: server.stats()["finishing"] == 0)
    assert server.stats()["queued"] == 1 and server.generator.calls == [2]  # waiting for a companion
    fourth = asyncio.create_task(collect(server, req(3)))
    await asyncio.wait_for(asyncio.gather(third, fourth), timeout=5)
    assert server.batch_sizes == [2, 2]


async def test_requests_the_sender_announced_are_waited_for(tmp_path: Path) -> None:
    """``queued_behind``: the runner claimed several jobs at once and sends them one by one."""
    server = make_server(tmp_path, batch_wait_timeout_s=60.0)
    first = asyncio.create_task(collect(server, {**req(0), "queued_behind": 2}))
    await until(lambda: server.stats()["queued"] == 1)
    second = asyncio.create_task(collect(server, {**req(1), "queued_behind": 1}))
    await until(lambda: server.stats()["queued"] == 2)
    assert server.generator.calls == []  # still waiting for the third
    third = asyncio.create_task(collect(server, req(2)))
    await asyncio.wait_for(asyncio.gather(first, second, third), timeout=5)
    assert server.batch_sizes == [3]
    await asyncio.wait_for(collect(server, req(3)), timeout=5)  # nothing announced: at once
    assert server.batch_sizes == [3, 1]


async def test_an_announced_request_that_never_comes_is_waited_for_once(tmp_path: Path) -> None:
    server = make_server(tmp_path, batch_wait_timeout_s=0.2)
    events = await asyncio.wait_for(collect(server, {**req(0), "queued_behind": 5}), timeout=5)
    assert events[-1]["type"] == "done" and server.batch_sizes == [1]
    assert server._promised == 0  # the broken promise is forgotten: the next lone request goes at once
    server.batch_wait_timeout_s = 60.0
    await asyncio.wait_for(collect(server, req(1)), timeout=5)
    assert server.batch_sizes == [1, 1]


async def test_each_bucket_measures_what_an_image_costs_solo_and_batched(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    await asyncio.wait_for(collect(server, req(0)), timeout=5)  # a batch of one
    bucket = server.stats()["buckets"]["t2i 64x64 steps=4 guidance=5.0"]
    assert bucket["solo_image_s"] >= 0 and "batched_image_s" not in bucket
    await asyncio.wait_for(asyncio.gather(*(collect(server, req(i)) for i in (1, 2))), timeout=5)  # one of two
    assert server.batch_sizes == [1, 2]
    assert server.stats()["buckets"]["t2i 64x64 steps=4 guidance=5.0"]["batched_image_s"] >= 0


def measured(server: Any, label: str, **medians: float) -> None:
    """Give ``label`` these measured medians (each as the one call kept): timings are not for tests."""
    server._image_costs[label] = {key: deque([value]) for key, value in medians.items()}


def test_a_buckets_cost_per_image_is_the_median_of_its_latest_calls(tmp_path: Path) -> None:
    """A first call's warm-up (5 s here) does not sway what the batch wait judges; a batch of n
    images counts its time over n; a failed call counts nothing."""
    import time

    server = make_server(tmp_path)
    label = "t2i 64x64 steps=4 guidance=5.0"
    server.buckets[label] = {"batches": 0, "requests": 0, "max_size": 0}  # as _record_batch leaves it
    for ago in (5.0, 0.2, 0.2):  # pipeline calls that took (at least) this long
        server._pipeline_ran({"size": 1, "images": 1, "bucket": label}, time.monotonic() - ago)
    server._pipeline_ran({"size": 2, "images": 4, "bucket": label}, time.monotonic() - 0.4)
    server._pipeline_ran({"size": 2, "images": 4, "bucket": label}, time.monotonic() - 90.0, ok=False)
    info = server.stats()["buckets"][label]
    assert 0.2 <= info["solo_image_s"] < 1.0 and 0.1 <= info["batched_image_s"] < 1.0
    assert info["batched_size"] == 4.0 and info["batch_wait_s"] == pytest.approx(server._wait_bound(label), abs=1e-4)


def test_the_batch_wait_is_bounded_by_what_one_call_fewer_saves(tmp_path: Path) -> None:
    """a + b·n per call: a = (solo − batched)·n/(n − 1), capped by the configured wait; zero where a
    batched image costs what a solo one does; unmeasured or too short to judge: the configured wait."""
    server = make_server(tmp_path, batch_wait_timeout_s=0.5)
    label = "t2i 64x64 steps=4 guidance=5.0"

    def bound(**medians: float) -> float:
        measured(server, label, **medians)
        return server._wait_bound(label)

    assert bound() == 0.5  # unmeasured
    assert bound(solo_image_s=0.224) == 0.5  # batched not yet measured
    assert bound(solo_image_s=0.224, batched_image_s=0.202, batched_size=7.0) == pytest.approx(0.022 * 7 / 6)
    assert bound(solo_image_s=1.0, batched_image_s=1.0, batched_size=8.0) == 0.0  # flat: no wait
    assert bound(solo_image_s=1.0, batched_image_s=1.2, batched_size=8.0) == 0.0  # batching costs more
    assert bound(solo_image_s=1.0, batched_image_s=0.4, batched_size=8.0) == 0.5  # a GPU: capped
    assert bound(solo_image_s=0.001, batched_image_s=0.001, batched_size=8.0) == 0.5  # too short to judge


@pytest.mark.parametrize(("solo_s", "batched_s", "waits"), [(1.0, 1.0, False), (1.0, 1.5, False),
                                                            (100.0, 50.0, True), (0.001, 0.001, True)])
async def test_the_head_waits_for_announced_companions_only_as_long_as_batching_saves(
        tmp_path: Path, solo_s: float, batched_s: float, waits: bool) -> None:
    """Measured costs per image (set here: timings are not for tests): flat (a CPU) or higher
    batched, the head starts at once with what is queued; a call's fixed cost far above the
    configured 60 s (a GPU, scaled up), it waits for the announced companion; too short to judge,
    the configured wait stands."""
    server = make_server(tmp_path, batch_wait_timeout_s=60.0)
    label = "t2i 64x64 steps=4 guidance=5.0"
    measured(server, label, solo_image_s=solo_s, batched_image_s=batched_s, batched_size=2.0)
    head = asyncio.create_task(collect(server, {**req(0), "queued_behind": 1}))
    if not waits:
        events = await asyncio.wait_for(head, timeout=5)  # not held for the 60 s wait
        assert events[-1]["type"] == "done" and server.batch_sizes == [1]
        return
    await until(lambda: server.stats()["queued"] == 1)
    companion = asyncio.create_task(collect(server, req(1)))
    await asyncio.wait_for(asyncio.gather(head, companion), timeout=5)
    assert server.batch_sizes == [2]


# --- buckets ------------------------------------------------------------------------------------

async def test_sizes_steps_and_guidance_are_bucketed_fifo_by_the_oldest_head(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    first = await held_first(server, req(0))  # 64×64, 4 steps (the spec's defaults)
    shapes = [{}, {"width": 96}, {}, {"steps": 8}, {"width": 96}, {"guidance": 2.0}, {"width": 64, "height": 64}]
    later = await queue_in_order(server, [req(i + 1, **shape) for i, shape in enumerate(shapes)])
    assert server.stats()["queued_buckets"] == {"t2i 64x64 steps=4 guidance=5.0": 3, "t2i 96x64 steps=4 guidance=5.0": 2,
                                                "t2i 64x64 steps=8 guidance=5.0": 1,
                                                "t2i 64x64 steps=4 guidance=2.0": 1}
    server.generator.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *later), timeout=10)
    assert all(events[-1]["type"] == "done" for events in results)
    # heads in arrival order: job_1 (64), job_2 (96), job_4 (8 steps), job_6 (guidance 2)
    assert [b["bucket"] for b in server.stats()["batches"]] == [
        "t2i 64x64 steps=4 guidance=5.0", "t2i 64x64 steps=4 guidance=5.0", "t2i 96x64 steps=4 guidance=5.0",
        "t2i 64x64 steps=8 guidance=5.0", "t2i 64x64 steps=4 guidance=2.0"]
    assert server.batch_sizes == [1, 3, 2, 1, 1] == server.generator.calls
    bucket = server.stats()["buckets"]["t2i 64x64 steps=4 guidance=5.0"]
    assert {k: bucket[k] for k in ("batches", "requests", "max_size")} == {"batches": 2, "requests": 4, "max_size": 3}


async def test_a_lone_odd_sized_request_is_not_starved(tmp_path: Path) -> None:
    """The odd one is the oldest head once the running batch ends: it goes before the crowd behind it."""
    server = make_server(tmp_path)
    first = await held_first(server, req(0))
    odd, *crowd = await queue_in_order(server, [req(1, width=128, height=128)] + [req(i) for i in range(2, 6)])
    server.generator.gate.set()
    await asyncio.wait_for(asyncio.gather(first, odd, *crowd), timeout=10)
    assert [(b["size"], b["bucket"].split()[1]) for b in server.stats()["batches"]] == [
        (1, "64x64"), (1, "128x128"), (4, "64x64")]


async def test_lora_sets_batch_only_with_the_same_set(tmp_path: Path) -> None:
    server = make_server(tmp_path)

    async def no_adapters(set_id: str) -> list[Any]:
        return []

    server.adapter_set = no_adapters  # type: ignore[method-assign]
    first = await held_first(server, req(0))
    later = await queue_in_order(server, [{**req(i), "adapter_set": '[["l1","k",1.0]]' if i % 2 else ""}
                                          for i in range(1, 5)])
    server.generator.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *later), timeout=10)
    assert [b["bucket"] for b in server.stats()["batches"]] == [
        "t2i 64x64 steps=4 guidance=5.0", "t2i 64x64 steps=4 guidance=5.0 loras=1", "t2i 64x64 steps=4 guidance=5.0"]
    assert server.batch_sizes == [1, 2, 2]


async def test_a_request_without_a_batching_key_runs_alone(tmp_path: Path) -> None:
    """Bad input the key cannot read (the pipeline will refuse it): a bucket of its own, not a
    crash of the loop, and the others still batch."""
    server = make_server(tmp_path)

    def compatible_key(data: dict[str, Any]) -> tuple[Any, ...]:
        if data["prompt"] == "p1":
            raise ValueError("width must be a number")
        return ("ok",)

    server.generator.compatible_key = compatible_key
    first = await held_first(server, req(0))
    later = await queue_in_order(server, [req(i) for i in range(1, 4)])
    server.generator.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *later), timeout=10)
    assert [b["bucket"] for b in server.stats()["batches"]][1:] == ["alone job_1", "t2i 64x64 steps=4 guidance=5.0"]
    assert server.batch_sizes == [1, 1, 2]
    server.check_health()


# --- encoding and upload beside the next batch ----------------------------------------------------

async def test_the_next_batch_denoises_while_the_previous_one_uploads(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    server.progress_interval_s = 0.0  # every step on the stream (pacing: test_generator_server)
    storage = HeldStorage(server.storage, {"job_0"})
    server.storage = storage
    first = asyncio.create_task(collect(server, req(0)))
    await until(storage.blocked.is_set)  # job_0's upload is held
    second = await asyncio.wait_for(collect(server, req(1)), timeout=5)
    # the second batch ran its steps and even finished while the first one's upload is still held
    assert server.generator.calls == [1, 1] and second[-1]["type"] == "done"
    assert not first.done() and not any("/job_0/" in key for key in storage.stored)
    storage.release.set()
    events = await asyncio.wait_for(first, timeout=5)
    types = [e["type"] for e in events]
    assert types == ["stage", "progress", "progress", "progress", "stage", "output", "done"], types
    assert [e["stage"] for e in events if e["type"] == "stage"] == ["generating", "encoding"]
    assert events[-2]["key"] == "outputs/u/job_0/0.png" and events[-2]["thumbnail_key"] == "outputs/u/job_0/0.thumb.jpg"
    # each run's result record is still written after its outputs
    assert storage.stored.index("outputs/u/job_0/result.json") > storage.stored.index("outputs/u/job_0/0.png")
    assert server.storage.exists("outputs/u/job_1/result.json")
    assert server.stats()["jobs"]["job_0"]["state"] == "succeeded"


async def test_a_backlog_of_uploads_holds_the_next_batch(tmp_path: Path) -> None:
    """At most FINISHING_KEPT batches finish beside the denoising; one more and the loop waits."""
    import serve.generator as generator

    server = make_server(tmp_path)
    storage = HeldStorage(server.storage, {"job_0", "job_1", "job_2"})
    server.storage = storage
    tasks = []
    for i in range(generator.FINISHING_KEPT + 1):
        tasks.append(asyncio.create_task(collect(server, req(i))))
        await until(lambda n=i + 1: len(server.generator.calls) == n)
    last = asyncio.create_task(collect(server, req(9)))
    await until(lambda: server.stats()["queued"] == 1 and server.stats()["finishing"] == generator.FINISHING_KEPT + 1)
    assert len(server.generator.calls) == generator.FINISHING_KEPT + 1  # the loop waits for the encoder
    storage.release.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, last), timeout=10)
    assert all(events[-1]["type"] == "done" for events in results)
    assert len(server.generator.calls) == generator.FINISHING_KEPT + 2


async def test_each_run_of_a_batch_ends_its_stream_with_its_own_result(tmp_path: Path) -> None:
    """A run's stream closes after its own done, not after its batch's last upload: its caller
    settles its job while a companion's upload is still held."""
    server = make_server(tmp_path)
    storage = HeldStorage(server.storage, {"job_1"})
    server.storage = storage
    tasks = await queue_in_order(server, [{**req(0), "queued_behind": 1}])  # it waits for the announced one
    tasks.append(asyncio.create_task(collect(server, req(1))))  # one batch: job_0, then job_1
    await until(storage.blocked.is_set)  # job_0 stored, job_1's upload held
    first = await asyncio.wait_for(tasks[0], timeout=5)
    assert first[-1]["type"] == "done" and server.batch_sizes == [2]
    assert not tasks[1].done() and server.stats()["jobs"]["job_0"]["state"] == "succeeded"
    storage.release.set()
    second = await asyncio.wait_for(tasks[1], timeout=5)
    assert second[-1]["type"] == "done"


async def test_a_job_canceled_while_its_batch_encodes_is_canceled(tmp_path: Path) -> None:
    server = make_server(tmp_path)
    server.progress_interval_s = 0.0  # every step on the stream (pacing: test_generator_server)
    storage = HeldStorage(server.storage, {"job_0"})
    server.storage = storage
    tasks = await queue_in_order(server, [{**req(0), "queued_behind": 1}])  # it waits for the announced one
    tasks.append(asyncio.create_task(collect(server, req(1))))  # one batch, job_0 first
    await until(storage.blocked.is_set)  # job_0 uploading, job_1 waits behind it in the same batch
    assert await server.cancel("job_1") is True
    storage.release.set()
    first, second = await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    assert first[-1]["type"] == "done"
    assert second[-1]["type"] == "error" and second[-1]["code"] == "canceled"
    assert not server.storage.exists("outputs/u/job_1/0.png")


# --- the real pipeline --------------------------------------------------------------------------

@pytest.fixture
def tiny_dir(tmp_path: Path) -> Iterator[Path]:
    from models.tiny import make_tiny

    previous = limit_threads(1)
    out = tmp_path / "tiny"
    make_tiny(out, ["tiny-sd"])
    yield out
    limit_threads(previous)


async def test_mixed_sizes_and_steps_on_tiny_sd_run_one_pipeline_call_per_batch(tmp_path: Path,
                                                                                  tiny_dir: Path) -> None:
    """With the real generator the buckets are its exact keys: every batch is one pipeline call."""
    server = make_server(tmp_path, cls=GeneratorServer, tiny_dir=str(tiny_dir), threads=1)
    calls: list[list[int]] = []
    real = server.generator.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        try:
            return real(*args, **kwargs)
        finally:
            calls.append(list(server.generator.last_batch_sizes))

    server.generator.generate = generate
    shapes = [{"width": 64, "steps": 2}, {"width": 96, "steps": 2}, {"width": 64, "steps": 2},
              {"width": 64, "steps": 3}, {"width": 96, "steps": 2}, {"width": 64, "steps": 2}]
    results = await asyncio.wait_for(asyncio.gather(*(collect(server, req(i, **s)) for i, s in enumerate(shapes))),
                                     timeout=120)
    for shape, events in zip(shapes, results, strict=True):
        assert events[-1]["type"] == "done", events[-1]
        assert events[-2]["width"] == shape["width"]
        steps = [e for e in events if e["type"] == "progress"]
        assert steps[-1]["total"] == shape["steps"]
    assert sorted(server.batch_sizes) == [1, 2, 3]
    assert calls == [[n] for n in server.batch_sizes]  # one pipeline call per batch


# --- per-batch timings in stats() ---------------------------------------------------------------

async def test_each_batch_reports_its_pipeline_time_and_the_idle_time_before_it(tmp_path: Path) -> None:
    """``stats()["batches"]``: ``pipeline_s`` of every batch, ``idle_before_s`` from the second on
    (how long the pipeline stood idle since the previous call ended): what the serving bench reads to
    tell a replica waiting for work from a slow one."""
    import time

    server = make_server(tmp_path)
    before = time.monotonic()
    for i in range(2):
        events = await asyncio.wait_for(collect(server, req(i)), timeout=10)
        assert events[-1]["type"] == "done"
    after = time.monotonic()
    first, second = server.stats()["batches"]
    assert first["pipeline_s"] >= 0 and "idle_before_s" not in first
    assert second["pipeline_s"] >= 0 and second["idle_before_s"] >= 0
    # started_at: this host's monotonic clock (the bench compares it with its own), in order
    assert before - 0.001 <= first["started_at"] <= second["started_at"] <= after


async def test_the_batch_loop_stops_when_canceled_as_a_companion_arrives(tmp_path: Path) -> None:
    """Replica shutdown cancels the batch loop; a cancel landing in the same step as an arrival
    (the event the head's wait is on) still stops it (``asyncio.wait_for`` swallowed it on 3.11)."""
    server = make_server(tmp_path, batch_wait_timeout_s=60.0)
    head = asyncio.create_task(collect(server, {**req(0), "queued_behind": 1}))  # one more announced
    await until(lambda: server.stats()["queued"] == 1)
    for _ in range(3):
        await asyncio.sleep(0)  # the loop now waits for the announced companion
    batcher = server._batcher
    assert batcher is not None and not batcher.done()
    server._arrived.set()
    batcher.cancel()
    done, _ = await asyncio.wait([batcher], timeout=5)
    assert done == {batcher} and batcher.cancelled()
    assert server.batch_sizes == []  # it never ran the batch
    head.cancel()
    await asyncio.gather(head, return_exceptions=True)
