"""``GeneratorServer``: one model on one replica, batching requests and streaming their events.

A plain class (testable without Ray); :mod:`serve.app` turns it into a Serve deployment. Per
request it streams event dicts (``api.core.events`` shapes): stage, progress (step/total),
output (already stored under the job's prefix), then done or error.

Batching: the replica queues its requests and forms the next batch when the pipeline is free (up
to ``max_batch_size`` requests with the same LoRA adapter set, waiting at most
``batch_wait_timeout_s`` after the first one arrived). ``@serve.batch`` is not used: Ray 2.60 forms
each batch as soon as its first request arrives (+ the wait) and only then queues it behind the
running one, so requests arriving while a batch runs were split into batches of one or two by
arrival time, and under steady load the replica fell behind running single requests. The batch
itself is an async generator yielding one list per step, one item per request (``None`` when a
request has nothing new); each request's ``generate`` stream passes its items on.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from ray import serve

from api.core.events import DoneEvent, ErrorEvent, OutputEvent, ProgressEvent, StageEvent, event_to_dict
from api.storage.base import Storage, make_storage
from models.adapters import LoraAdapter
from models.spec import ModelSpec
from serve.errors import classify

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeConfig:
    """What a replica needs besides its spec; plain values so it crosses process boundaries."""

    storage_url: str
    signing_secret: str = ""
    public_base_url: str = ""
    tiny_dir: str | None = None
    cache_dir: str | None = None
    threads: int | None = None

    def storage(self) -> Storage:
        return make_storage(self.storage_url, signing_secret=self.signing_secret,
                            public_base_url=self.public_base_url)


def adapter_set_id(loras: list[dict[str, Any]]) -> str:
    """The multiplexed model id of a request: its LoRA set (ids, weights and scales), or ``""``."""
    if not loras:
        return ""
    return json.dumps(sorted([str(x["id"]), str(x["weights_key"]), float(x.get("scale", 1.0))] for x in loras),
                      separators=(",", ":"))


CANCELED_KEPT = 1024


def request_key(request: dict[str, Any]) -> str:
    """One attempt of one job. A cancel applies to that attempt only: when an API stops mid-job it
    cancels its request here, and the job's next attempt (same job id) may land on this replica."""
    return f"{request['job_id']}#{request.get('attempt', 1)}"


def replica_id() -> str:
    """This replica's id as Serve reports it (``serve status``), or host-pid outside Serve."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - a plain GeneratorServer (tests) has no replica context
        import os
        import socket

        return f"{socket.gethostname()}-{os.getpid()}"


def gpu_memory_bytes() -> int | None:
    """CUDA memory this process holds (the caching allocator's reserve), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count())))


@dataclass(eq=False)
class _Pending:
    """A request waiting in the replica's queue, and the queue its events go to."""

    request: dict[str, Any]
    arrived: float
    events: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)

    @property
    def adapter_set(self) -> str:
        return str(self.request.get("adapter_set") or "")


class GeneratorServer:
    def __init__(self, spec: dict[str, Any], runtime: dict[str, Any]) -> None:
        from models.generator import Generator

        self.spec = ModelSpec.model_validate(spec)
        self.runtime = RuntimeConfig(**runtime)
        self.storage = self.runtime.storage()
        self._generator_cls = Generator
        self.generator = self._load(self.spec)
        self.source = self.spec.source.model_dump(exclude_none=True) if self.spec.source else {}
        self.batch_sizes: list[int] = []
        self.canceled: dict[str, str] = {}
        """Canceled requests, ``request_key`` → job id, oldest first (the last CANCELED_KEPT)."""
        self.adapter_loads: Counter[str] = Counter()
        self.swaps = 0
        self.swap_error: dict[str, Any] | None = None
        self._lora_dir = Path(self.runtime.cache_dir or tempfile.gettempdir()) / "loras"
        self._pending: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._batcher: asyncio.Task[None] | None = None
        self._configure_batching()

    def _load(self, spec: ModelSpec) -> Any:
        started = time.perf_counter()
        generator = self._generator_cls.load(
            spec, Path(self.runtime.tiny_dir) if self.runtime.tiny_dir else None,
            Path(self.runtime.cache_dir) if self.runtime.cache_dir else None, threads=self.runtime.threads)
        logger.info("%s loaded in %.2fs", spec.id, time.perf_counter() - started)
        return generator

    def _configure_batching(self) -> None:
        self.max_batch_size = max(1, int(self.spec.serving.max_batch_size))
        self.batch_wait_timeout_s = max(0.0, float(self.spec.serving.batch_wait_timeout_s))

    # Serve hooks -------------------------------------------------------------------------
    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Swap the checkpoint without downtime: load the new one beside the old, then switch.

        Loading runs in a thread, so requests keep running on the old pipeline meanwhile; the
        switch is one assignment, so every request runs wholly on one pipeline or the other.
        A source that fails to load leaves the old pipeline serving: the failure is kept in
        ``stats()["swap_error"]`` for the caller to report, and not raised, since Serve answers a
        failed ``reconfigure`` by replacing the replica and the model would go down.
        """
        source = config.get("source")
        if not source or source == self.source:
            return
        try:
            new_spec = self.spec.model_copy(update={"source": type(self.spec.source).model_validate(source)})
            new_generator = await asyncio.to_thread(self._load, new_spec)
        except Exception as exc:  # noqa: BLE001 - reported through stats(), see above
            self.swap_error = {"source": source, "error": f"{type(exc).__name__}: {exc}"}
            logger.error("%s: cannot load %s (%s); still serving %s", self.spec.id, source, exc, self.source)
            return
        old, self.generator = self.generator, new_generator
        self.spec, self.source = new_spec, source
        self.swaps += 1
        self.swap_error = None
        logger.info("%s swapped to %s", self.spec.id, source)
        await asyncio.to_thread(old.close)

    def check_health(self) -> None:
        if self.generator is None:
            raise RuntimeError("no pipeline loaded")
        if self._batcher is not None and self._batcher.done() and not self._batcher.cancelled() \
                and self._batcher.exception() is not None:
            raise RuntimeError(f"the batching loop died: {self._batcher.exception()!r}")

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "adapter_loads": dict(self.adapter_loads),
                "swaps": self.swaps, "swap_error": self.swap_error, "source": self.source,
                "canceled": sorted(set(self.canceled.values())),
                "replica": replica_id(), "gpu_memory_bytes": gpu_memory_bytes()}

    # LoRA sets (multiplexed) --------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=4)
    async def adapter_set(self, set_id: str) -> list[LoraAdapter]:
        """Fetch a LoRA set's weights to the replica's disk; Serve keeps the last few (LRU)."""
        adapters = []
        for lora_id, weights_key, scale in json.loads(set_id):
            path = self._lora_dir / lora_id / "pytorch_lora_weights.safetensors"
            if not path.exists():
                await asyncio.to_thread(self.storage.download, weights_key, path)
            adapters.append(LoraAdapter(name=lora_id, path=path, scale=float(scale)))
        self.adapter_loads[set_id] += 1
        return adapters

    # generation ----------------------------------------------------------------------------
    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's events. ``request``: job_id, attempt, input, output_prefix, adapter_set."""
        loop = asyncio.get_running_loop()
        pending = _Pending(request, loop.time())
        self._pending.append(pending)
        self._arrived.set()
        if self._batcher is None or self._batcher.done():
            # A context of its own: the loop outlives the request that happened to start it.
            self._batcher = loop.create_task(self._batch_loop(), name="batcher", context=contextvars.Context())
        try:
            while (event := await pending.events.get()) is not None:
                yield event
        except asyncio.CancelledError:
            # The caller canceled: a queued request never runs; a running batch stops at its next
            # step if every request in it was canceled.
            if pending in self._pending:
                self._pending.remove(pending)
            self.canceled[request_key(request)] = request["job_id"]
            while len(self.canceled) > CANCELED_KEPT:
                del self.canceled[next(iter(self.canceled))]
            raise

    async def _batch_loop(self) -> None:
        """Run batches one after another, each formed when the pipeline is free (see the module doc)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            first = self._pending[0]
            while len(self._companions(first)) < self.max_batch_size:
                remaining = first.arrived + self.batch_wait_timeout_s - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                if first not in self._pending:  # canceled while waiting
                    break
            if first not in self._pending:
                continue
            batch = self._companions(first)[:self.max_batch_size]
            for pending in batch:
                self._pending.remove(pending)
            await self._run(batch)

    def _companions(self, first: _Pending) -> list[_Pending]:
        """Queued requests that can share ``first``'s batch (one adapter set per batch), oldest first."""
        return [p for p in self._pending if p.adapter_set == first.adapter_set]

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            async for items in self._batched([p.request for p in batch]):
                for pending, item in zip(batch, items, strict=True):
                    if item is not None:
                        pending.events.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the loop or hang callers
            logger.exception("%s: batch failed", self.spec.id)
            for pending in batch:
                pending.events.put_nowait(self._error(exc))
        finally:
            for pending in batch:
                pending.events.put_nowait(None)

    async def _batched(self, requests: list[dict[str, Any]]) -> AsyncIterator[list[dict[str, Any] | None]]:
        n = len(requests)
        self.batch_sizes.append(n)
        keys = [request_key(r) for r in requests]
        generator = self.generator  # the pipeline this batch runs on, even if a swap lands meanwhile
        try:
            set_id = requests[0].get("adapter_set", "")
            adapters = await self.adapter_set(set_id) if set_id else None
            inputs = [await asyncio.to_thread(self._prepare_input, r["input"]) for r in requests]
        except Exception as exc:  # noqa: BLE001 - becomes the requests' error event
            yield [self._error(exc)] * n
            return
        yield [event_to_dict(StageEvent("generating"))] * n
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def on_step(done: int, total: int) -> None:
            loop.call_soon_threadsafe(progress.put_nowait, (done, total))

        def should_cancel() -> bool:
            return all(key in self.canceled for key in keys)

        run = asyncio.ensure_future(asyncio.to_thread(generator.generate, inputs, on_step, should_cancel,
                                                      adapters))
        while not run.done() or not progress.empty():
            getter = asyncio.ensure_future(progress.get())
            await asyncio.wait({run, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                done, total = getter.result()
                yield [event_to_dict(ProgressEvent(done, total))] * n
            else:
                getter.cancel()
        try:
            media = run.result()
        except Exception as exc:  # noqa: BLE001 - classified into code + retryable
            yield [self._error(exc)] * n
            return
        yield [event_to_dict(StageEvent("encoding"))] * n
        outputs: list[dict[str, Any] | None] = []
        for request, item in zip(requests, media, strict=True):
            if request_key(request) in self.canceled:
                outputs.append(event_to_dict(ErrorEvent("canceled", "canceled")))
                continue
            try:
                out = await asyncio.to_thread(self._store, request, item)
                outputs.append(event_to_dict(out))
            except Exception as exc:  # noqa: BLE001
                outputs.append(self._error(exc))
        yield outputs
        yield [event_to_dict(DoneEvent({"seed": item.seed, "device": generator.device}))
               if out and out["type"] == "output" else None for out, item in zip(outputs, media, strict=True)]

    def _error(self, exc: BaseException) -> dict[str, Any]:
        code, retryable = classify(exc)
        if code != "canceled":
            logger.warning("%s: %s (%s, retryable=%s)", self.spec.id, exc, code, retryable)
        return event_to_dict(ErrorEvent(code, str(exc) or type(exc).__name__, retryable))

    def _prepare_input(self, data: dict[str, Any]) -> dict[str, Any]:
        prepared = {k: v for k, v in data.items() if k not in ("image", "image_key", "loras")}
        if data.get("image_key"):
            blob = self.storage.get_bytes(data["image_key"])
            with Image.open(io.BytesIO(blob)) as img:
                prepared["image"] = img.convert("RGB")
        return prepared

    def _store(self, request: dict[str, Any], item: Any) -> OutputEvent:
        from models.media import encode_mp4, encode_png, thumbnail_png

        prefix = request["output_prefix"]
        meta = dict(item.metadata)
        if item.kind == "image":
            key = f"{prefix}0.png"
            self.storage.put_bytes(key, encode_png(item.image, meta), "image/png")
            thumb = f"{prefix}0.thumb.png"
            self.storage.put_bytes(thumb, thumbnail_png(item.image), "image/png")
            return OutputEvent(key=key, content_type="image/png", width=item.width, height=item.height,
                               thumbnail_key=thumb)
        with tempfile.TemporaryDirectory() as tmp:
            path = encode_mp4(item.frames, item.fps, Path(tmp) / "video.mp4")
            key = f"{prefix}0.mp4"
            self.storage.put_file(key, path, "video/mp4")
        poster = f"{prefix}0.poster.png"
        self.storage.put_bytes(poster, thumbnail_png(item.poster, max_side=max(item.width, item.height)),
                               "image/png")
        return OutputEvent(key=key, content_type="video/mp4", width=item.width, height=item.height,
                           num_frames=item.num_frames, fps=item.fps, duration_s=item.duration_s,
                           thumbnail_key=poster)
