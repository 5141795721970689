"""``GeneratorServer``: one model on one replica, batching requests and streaming their events.

A plain class (testable without Ray); :mod:`serve.app` turns it into a Serve deployment. Per
request it streams event dicts (``api.core.events`` shapes): stage, progress (step/total),
output (already stored under the job's prefix), then done or error.

Batching: the replica queues its requests and forms the next batch when the pipeline is free, FIFO
by the oldest queued request (the head): the batch is the head plus the queued requests of its
*bucket* (up to ``max_batch_size``). A bucket is the model's exact batching key
(``Generator.compatible_key``: task, size, steps, guidance, frames, … plus the LoRA adapter set),
so one batch is one pipeline call; requests of other buckets run in the batches after it, and a
lone odd-sized request waits at most for the batches of the buckets whose heads are older.
Sizes are bucketed, not padded: a padded latent is a different canvas (the denoiser attends over
the padding), so the cropped output would not be the image the request's solo run makes. Steps
and guidance are bucketed too: the schedulers' timestep tables depend on the step count, and the
pipelines take guidance as one scalar per call. Prompts, negative prompts and seeds (one
``torch.Generator`` each) stay per request.

The batch wait adapts: the head waits for companions (at most ``batch_wait_timeout_s`` after it
arrived) only while more requests are known to be coming: requests already inside ``generate``
but not yet queued, requests the sender announced (``ReplicaRequest.queued_behind``), or after a
full batch (the replica is saturated). A lone request on an idle replica starts at once. And no
longer than batching saves: the replica measures, per bucket, what an image costs in a batch of one
and in its larger batches (medians of its own latest pipeline calls). Read as a call's fixed cost
``a`` plus ``b`` per image, a companion that waits for the next batch instead costs that batch's
``a`` more, so a head waits at most ``a`` (:meth:`GeneratorServer._wait_bound`, capped by the
configured wait): on a CPU, where the cost per image is nearly flat, a few ms; on a GPU, most of a
solo call. Unmeasured, the configured wait stands. Companions that did not wait run in the next
batch, which starts the moment this one ends.
``@serve.batch`` is not used: Ray 2.60 forms each batch as soon as its first request arrives (+ the
wait) and only then queues it behind the running one, so requests arriving while a batch runs were
split into batches of one or two by arrival time.

Encoding and upload overlap the next batch: once a batch's pipeline call returned (latents
decoded), its PNG/MP4 encoding, thumbnails and uploads (and each ``result.json``) run in a worker
thread while the loop starts denoising the next batch. At most :data:`FINISHING_KEPT` batches are
finishing at once (memory: their decoded frames), beyond that the loop waits for the oldest.
Each run's own events stay in order: stage, progress (paced, :data:`PROGRESS_MIN_INTERVAL_S`), stage
``encoding``, output, done.

Replica-owned runs: once a request for job J reached the replica, the run is the replica's. A
caller that goes away (its stream closed, its API restarted or SIGKILLed) only stops listening;
only :meth:`GeneratorServer.cancel` stops a run. Each job's latest run and its event log are kept
(every queued and running one, plus the last :data:`FINISHED_KEPT` finished ones for at most
:data:`FINISHED_TTL_S`), and a later ``generate`` for J (any attempt: typically the attempt a new
API reclaimed) attaches to it: replays the log (progress collapsed to the latest), streams the
rest, or gets the finished result at once, so the pipeline runs once. A failed or canceled run is
not reused. After the outputs are uploaded the replica writes ``{output_prefix}result.json``
(:class:`~serve.messages.ResultRecord`); a request for a job that has one (another replica ran it,
or this one restarted) collects it instead of running again.

Limitation, several replicas: Serve routes a request to any replica of the deployment, so a reclaim
attaches only if it lands on the replica that runs the job (or after the run finished, through the
stored record); :meth:`cancel` likewise reaches the owner only when routed there, and
``RayExecutor.cancel`` retries a few times for that reason. ``multiplexed_model_id`` cannot route by
job since it already routes by LoRA set.

Test hook (``RuntimeConfig.test_hooks_dir``, off by default): see :mod:`serve.testhooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import logging
import statistics
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from ray import serve

from api.core.aio import wait_event
from api.core.events import DoneEvent, ErrorEvent, OutputEvent, ProgressEvent, StageEvent, event_to_wire
from api.storage.base import Storage, make_storage
from models.adapters import LoraAdapter
from models.spec import ModelSpec
from serve.errors import classify
from serve.lora_cache import LoraFileCache
from serve.messages import RESULT_NAME, ReplicaRequest, ResultRecord, pack_events
from serve.previews import PreviewPump
from serve.testhooks import Hold, StepHooks

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
    test_hooks_dir: str | None = None
    """Tests only (``serve.testhooks``): hold generations at a step until released. None: off."""
    lora_cache_entries: int = 64
    """How many LoRA weight files a replica keeps on its disk (least recently used go first)."""

    def storage(self) -> Storage:
        return make_storage(self.storage_url, signing_secret=self.signing_secret,
                            public_base_url=self.public_base_url)


def adapter_set_id(loras: list[dict[str, Any]]) -> str:
    """The multiplexed model id of a request: its LoRA set (ids, weights and scales), or ``""``."""
    if not loras:
        return ""
    return json.dumps(sorted([str(x["id"]), str(x["weights_key"]), float(x.get("scale", 1.0))] for x in loras),
                      separators=(",", ":"))


FINISHED_KEPT = 256
"""Finished runs a replica keeps (result and event log) for attaching callers, besides the TTL."""
FINISHED_TTL_S = 3600.0
"""How long a finished run stays attachable (a reclaim comes within a lease or two)."""
COUNTS_KEPT = 4096
"""Jobs kept in the per-job counters of ``stats()`` (runs, attaches) and the canceled list."""


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
class _Run:
    """One job's run on this replica: its state and event log, and the callers streaming it.

    The run belongs to the replica, not to a caller: a caller that goes away (stream closed, API
    restarted or killed) only stops listening. A later ``generate`` for the same job attaches: it
    gets the log so far (progress collapsed to the latest) and then the live events.
    """

    request: ReplicaRequest
    arrived: float
    state: str = "queued"  # queued | running | succeeded | failed | canceled
    log: list[dict[str, Any]] = field(default_factory=list)
    listeners: list[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=list)
    canceled: bool = False
    finished_at: float | None = None
    attempts: list[int] = field(default_factory=list)
    hold: Hold | None = None
    bucket: tuple[Any, ...] = ()
    """Its batching key (see the module doc): runs batch together only within one bucket."""
    bucket_label: str = ""
    """The bucket, readable (``stats()``): task, size, steps, guidance, frames, LoRA set."""

    @property
    def job_id(self) -> str:
        return self.request.job_id

    @property
    def adapter_set(self) -> str:
        return self.request.adapter_set

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def reusable(self) -> bool:
        """A new attempt attaches to a queued, running or succeeded run; a failed one runs afresh."""
        return self.state in ("queued", "running", "succeeded") and not self.canceled

    def emit(self, event: dict[str, Any]) -> None:
        if self.finished:
            return
        self.log.append(event)
        if event.get("type") == "done":
            self.state = "succeeded"
        elif event.get("type") == "error":
            self.state = "canceled" if event.get("code") == "canceled" else "failed"
        for queue in self.listeners:
            queue.put_nowait(event)

    def broadcast(self, event: dict[str, Any]) -> None:
        """A live-only event (a step preview): to the callers listening now, not into the log, so a
        caller that attaches later never gets it replayed."""
        if self.finished or self.canceled:
            return
        for queue in self.listeners:
            queue.put_nowait(event)

    def close(self) -> None:
        if self.finished:
            return
        if self.state in ("queued", "running"):
            self.state = "failed"  # ended without a result (the caller reads "incomplete")
        self.finished_at = time.monotonic()
        for queue in self.listeners:
            queue.put_nowait(None)
        self.listeners.clear()
        self.log = self._compacted()  # what a late caller gets: a few events per kept run

    def _compacted(self) -> list[dict[str, Any]]:
        """The log with only its latest progress event."""
        last_progress = max((i for i, e in enumerate(self.log) if e.get("type") == "progress"), default=-1)
        return [e for i, e in enumerate(self.log) if e.get("type") != "progress" or i == last_progress]

    def listen(self) -> tuple[list[dict[str, Any]], asyncio.Queue[dict[str, Any]] | None]:
        """The log so far (only the latest progress kept) and, unless finished, a queue for the rest."""
        replay = self._compacted()
        if self.finished:
            return replay, None
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.listeners.append(queue)
        return replay, queue


def _bounded(counter: dict[str, Any], kept: int = COUNTS_KEPT) -> None:
    while len(counter) > kept:
        del counter[next(iter(counter))]


BATCH_SIZES_KEPT = 1000
BUCKETS_KEPT = 64
"""Buckets kept in ``stats()["buckets"]`` (the least recently used go first)."""
JUDGED_MIN_S = 0.01
"""Solo pipeline calls shorter than this are not judged: too short to tell what batching saves
from noise, so the configured wait stands."""
COSTS_KEPT = 8
"""Per bucket, the latest solo and batched pipeline calls kept (cost per image, batch size); their
medians bound the batch wait (a median: a first call's warm-up or one slow call under load does not
sway it)."""
FINISHING_KEPT = 2
"""Batches whose encoding and upload may run at once beside the next batch's denoising."""
PROGRESS_MIN_INTERVAL_S = 0.2
"""Progress sent on a run's stream at most this often (the newest step wins; the first and the
last step always go, a step held back goes at the latest when the interval ends). The runner writes
progress at the same pace (``api.runner.runner.PROGRESS_MIN_INTERVAL_S``), so SSE clients see what
they saw before; each stream item costs the replica ~1.5 ms of Python (Ray's streaming) that the
denoising thread waits for on the GIL: per-step items made a 4-step tiny-sd call ~2.5 % slower
than the bare pipeline (bench/serving.py), more on models with fast steps."""


def _bounded_list(items: list[Any], kept: int = BATCH_SIZES_KEPT) -> None:
    if len(items) > kept:
        del items[:len(items) - kept]


def outputs_of(data: dict[str, Any]) -> int:
    """How many images a request asks for (``num_outputs``, 1 when absent)."""
    return max(1, int(data.get("num_outputs") or 1))


def expand_outputs(prepared: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """One generator entry per image a request asks for, seeds ``seed``, ``seed+1``, … (mod 2**32),
    so each image is the one a single-image request with that seed would give."""
    base = {k: v for k, v in prepared.items() if k != "num_outputs"}
    seed = base.get("seed")
    if n == 1 or seed is None:
        return [dict(base) for _ in range(n)]
    return [{**base, "seed": (int(seed) + i) % 2**32} for i in range(n)]


class GeneratorServer:
    def __init__(self, spec: dict[str, Any], runtime: dict[str, Any]) -> None:
        from models.generator import Generator

        self.spec = ModelSpec.model_validate(spec)
        self.runtime = RuntimeConfig(**runtime)
        self.storage = self.runtime.storage()
        self._generator_cls = Generator
        self.generator = self._load(self.spec)
        self.previews = PreviewPump(self.spec, self.generator)
        """Live step previews (``serve.previews``): every k steps, off the denoising thread."""
        self.source = self.spec.source.model_dump(exclude_none=True) if self.spec.source else {}
        self.batch_sizes: list[int] = []
        self.batches: list[dict[str, Any]] = []
        """The latest batches run here (bounded), in order: their size and bucket label, the
        pipeline call's ``started_at`` (``time.monotonic()``: the host's clock, comparable with
        another process's on the same host) and ``pipeline_s``, and from the second on
        ``idle_before_s`` (how long the pipeline stood idle since the previous call: a replica
        waiting for work, not a slow one)."""
        self._pipeline_free_at: float | None = None  # when the last pipeline call ended (monotonic)
        self.buckets: dict[str, dict[str, int]] = {}
        """Per bucket label: batches and requests run, largest batch (bounded, see BUCKETS_KEPT);
        ``stats()`` adds the costs below and the batch wait they allow (``batch_wait_s``)."""
        self._image_costs: dict[str, dict[str, deque[float]]] = {}
        """Per bucket label: its latest pipeline calls' cost per image, solo and batched, and the
        batched calls' sizes (see :meth:`_costs`, :meth:`_wait_bound`)."""
        self.runs: dict[str, _Run] = {}
        """Job id → its latest run here: every queued and running one, and the last finished ones."""
        self.runs_by_job: dict[str, int] = {}
        """How many times the pipeline started for each job (an attach does not count)."""
        self.attaches: dict[str, int] = {}
        """How many callers attached to an existing run (or a stored result), by job."""
        self.canceled: dict[str, None] = {}
        """Jobs canceled here by an explicit ``cancel``, oldest first."""
        self.canceled_early: dict[str, None] = {}
        """Jobs whose cancel came before any run of theirs was here (bounded): never started here."""
        self._job_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        """Per job: a lock (and its users) so concurrent requests for one job start one run."""
        self.hooks = StepHooks(self.runtime.test_hooks_dir) if self.runtime.test_hooks_dir else None
        self.adapter_loads: Counter[str] = Counter()
        self.swaps = 0
        self.swap_error: dict[str, Any] | None = None
        self.lora_files = LoraFileCache(Path(self.runtime.cache_dir or tempfile.gettempdir()) / "loras",
                                        self.storage, self.runtime.lora_cache_entries)
        self._pending: list[_Run] = []
        self._arrived = asyncio.Event()
        self._arriving = 0
        """Requests inside ``generate`` that are not queued (nor attached) yet: more are coming."""
        self._last_batch_full = False
        self._promised = 0
        """Requests the senders said follow (``ReplicaRequest.queued_behind``) that have not come yet."""
        self._batcher: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        """Batches being encoded and uploaded beside the next batch's denoising."""
        self._encoder = ThreadPoolExecutor(max_workers=FINISHING_KEPT, thread_name_prefix="encode")
        self.progress_interval_s = PROGRESS_MIN_INTERVAL_S
        """How often a run's stream carries progress at most (0: every step; tests)."""
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
        old_previews, self.previews = self.previews, PreviewPump(new_spec, new_generator)
        old_previews.close()
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
        return {"batch_sizes": list(self.batch_sizes), "batches": [dict(b) for b in self.batches],
                "buckets": {label: self._bucket_stats(label, info) for label, info in self.buckets.items()},
                "queued_buckets": dict(Counter(run.bucket_label for run in self._pending)),
                "finishing": len(self._finishing), "adapter_loads": dict(self.adapter_loads),
                "swaps": self.swaps, "swap_error": self.swap_error, "source": self.source,
                "canceled": list(self.canceled), "runs_by_job": dict(self.runs_by_job),
                "attaches": dict(self.attaches), "queued": len(self._pending),
                "jobs": {job_id: {"state": run.state, "attempts": list(run.attempts),
                                  "listeners": len(run.listeners)} for job_id, run in self.runs.items()},
                "replica": replica_id(), "gpu_memory_bytes": gpu_memory_bytes(),
                "previews": self.previews.stats()}

    # LoRA sets (multiplexed) --------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=4)
    async def adapter_set(self, set_id: str) -> list[LoraAdapter]:
        """Fetch a LoRA set's weights to the replica's disk; Serve keeps the last few (LRU)."""
        adapters = []
        kept: set[Path] = set()
        for lora_id, weights_key, scale in json.loads(set_id):
            path = await asyncio.to_thread(self.lora_files.path, lora_id, weights_key, kept)
            kept.add(path.parent)
            adapters.append(LoraAdapter(name=lora_id, path=path, scale=float(scale)))
        self.adapter_loads[set_id] += 1
        _bounded(self.adapter_loads)
        return adapters

    # generation ----------------------------------------------------------------------------
    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one job's events (a :class:`~serve.messages.ReplicaRequest` dict).

        The first request for a job starts a run; a later one for the same job (the job's next
        attempt after its API died, say) attaches to that run unless it failed or was canceled,
        or collects the result stored beside the outputs. Leaving the stream never stops the run:
        only :meth:`cancel` does.
        """
        req = ReplicaRequest.model_validate(request)
        self._arriving += 1  # a batch being formed meanwhile may wait for this one
        try:
            # _attachable awaits (threads): without the job's lock two requests arriving together
            # would both find nothing and both start the pipeline
            async with self._job_lock(req.job_id):
                run = await self._attachable(req)
                if run is None:
                    run = self._start(req)
                else:
                    self.attaches[req.job_id] = self.attaches.get(req.job_id, 0) + 1
                    _bounded(self.attaches)
                    logger.info("job %s attempt %d attached to its %s run (attempts %s)", req.job_id,
                                req.attempt, run.state, run.attempts)
                run.attempts.append(req.attempt)
                replay, queue = run.listen()
        finally:
            self._arriving -= 1
            self._arrived.set()  # a waiting batch re-checks whether more are coming
        try:
            async for item in self._items(replay, queue, together=req.stream_batches):
                yield item
        finally:
            # The caller went away or the run ended: stop listening, nothing else.
            if queue is not None and queue in run.listeners:
                run.listeners.remove(queue)

    @staticmethod
    async def _items(replay: list[dict[str, Any]], queue: asyncio.Queue[dict[str, Any] | None] | None, *,
                     together: bool) -> AsyncIterator[dict[str, Any]]:
        """A caller's stream items: the replay, then its queue until the run ends (``None``, always
        its last entry). ``together``: whatever is ready when the caller reads goes as one item
        (:func:`serve.messages.pack_events`); else one event per item."""
        ready: list[dict[str, Any] | None] = [*replay] if queue is not None else [*replay, None]
        while True:
            if not ready:
                assert queue is not None  # without one, the replay ended with None: returned already
                ready.append(await queue.get())
            while queue is not None and ready[-1] is not None and not queue.empty():
                ready.append(queue.get_nowait())
            events = [e for e in ready if e is not None]
            if events and together:
                yield pack_events(events)
            elif events:
                for event in events:
                    yield event
            if ready[-1] is None:
                return
            ready = []

    @contextlib.asynccontextmanager
    async def _job_lock(self, job_id: str) -> AsyncIterator[None]:
        """Hold the job's lock; the entry is dropped when its last user leaves (bounded by jobs in flight)."""
        lock, users = self._job_locks.get(job_id, (asyncio.Lock(), 0))
        self._job_locks[job_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._job_locks[job_id]
            if users <= 1:
                del self._job_locks[job_id]
            else:
                self._job_locks[job_id] = (lock, users - 1)

    async def _attachable(self, req: ReplicaRequest) -> _Run | None:
        run = self.runs.get(req.job_id)
        if run is not None and run.reusable:
            if run.state != "succeeded" or await asyncio.to_thread(self._outputs_exist, run.log):
                return run
            logger.warning("job %s: the outputs of its finished run are gone; running it again", req.job_id)
        record = await asyncio.to_thread(self._stored_result, req) if req.output_prefix else None
        if record is None:
            return None
        run = _Run(req, asyncio.get_running_loop().time())
        for output in record.outputs:
            run.emit(output)
        run.emit(event_to_wire(DoneEvent(dict(record.result))))
        run.close()
        self._keep(run)
        logger.info("job %s: collected the result stored by attempt %d", req.job_id, record.attempt)
        return run

    def _start(self, req: ReplicaRequest) -> _Run:
        loop = asyncio.get_running_loop()
        run = _Run(req, loop.time())
        run.bucket, run.bucket_label = self._bucket(req)
        self._keep(run)
        if req.job_id in self.canceled_early:  # its cancel came first: never runs
            logger.info("job %s was canceled before it arrived here; not started", req.job_id)
            run.canceled = True
            run.emit(event_to_wire(ErrorEvent("canceled", "canceled")))
            run.close()
            self._evict()
            return run
        self._promised = max(self._promised - 1, req.queued_behind)
        self._pending.append(run)
        self._arrived.set()
        if self._batcher is None or self._batcher.done():
            # A context of its own: the loop outlives the request that happened to start it.
            self._batcher = loop.create_task(self._batch_loop(), name="batcher", context=contextvars.Context())
        return run

    def _keep(self, run: _Run) -> None:
        """Register ``run`` as its job's run (the latest one last)."""
        self.runs.pop(run.job_id, None)
        self.runs[run.job_id] = run
        self._evict()

    def _evict(self) -> None:
        """Drop the oldest finished runs past FINISHED_KEPT, and those older than FINISHED_TTL_S."""
        now = time.monotonic()
        finished = [r for r in self.runs.values() if r.finished]
        excess = len(finished) - FINISHED_KEPT
        for old in finished:  # oldest first
            if excess > 0 or now - (old.finished_at or now) > FINISHED_TTL_S:
                del self.runs[old.job_id]
                excess -= 1

    async def cancel(self, job_id: str) -> bool:
        """Stop the job's run here: a queued one never runs, a running batch stops at its next step
        once all its runs are canceled. True when this replica had the job queued or running.

        A cancel for a job that has no run here yet (it came before the request) is remembered
        (bounded): the request, if it comes here, is answered ``canceled`` and never runs."""
        run = self.runs.get(job_id)
        if run is None:
            self.canceled_early[job_id] = None
            _bounded(self.canceled_early)
            return False
        if run.finished:
            return False
        run.canceled = True
        self.canceled[job_id] = None
        _bounded(self.canceled)
        logger.info("job %s canceled on this replica (%s)", job_id, run.state)
        if run in self._pending:
            self._pending.remove(run)
            run.emit(event_to_wire(ErrorEvent("canceled", "canceled")))
            run.close()
            self._evict()
        return True

    async def drain(self, timeout_s: float) -> bool:
        """Wait (bounded) until no run is queued or running here; True if none is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any(not run.finished for run in self.runs.values()):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    def _outputs_exist(self, log: list[dict[str, Any]]) -> bool:
        keys = [e["key"] for e in log if e.get("type") == "output"]
        return all(self.storage.exists(k) for k in keys)

    def _stored_result(self, req: ReplicaRequest) -> ResultRecord | None:
        key = f"{req.output_prefix}{RESULT_NAME}"
        try:
            if not self.storage.exists(key):
                return None
            record = ResultRecord.model_validate_json(self.storage.get_bytes(key))
        except Exception as exc:  # noqa: BLE001 - an unreadable record: run the job again
            logger.warning("job %s: cannot read %s (%s)", req.job_id, key, exc)
            return None
        if record.job_id != req.job_id or not self._outputs_exist(record.outputs):
            return None
        return record

    def _bucket(self, req: ReplicaRequest) -> tuple[tuple[Any, ...], str]:
        """The request's batching key and its readable label (see the module doc).

        The input image is keyed by its upload (``image_key``): families that take one image per
        call (Wan i2v) batch only requests of the same upload. A request whose key cannot be
        computed (bad input) gets a bucket of its own; its error comes from the pipeline.
        """
        from models.generator import compatible_key, fill_defaults, task_of

        data = {k: v for k, v in req.input.items() if k not in ("image", "image_key", "loras")}
        if req.input.get("image_key"):
            data["image"] = str(req.input["image_key"])
        try:
            exact = getattr(self.generator, "compatible_key", None)
            filled = fill_defaults(self.spec, data)
            key = exact(data) if exact is not None else compatible_key(filled)
            task = task_of(filled, self.spec.kind)
        except Exception as exc:  # noqa: BLE001 - see above
            logger.info("job %s: no batching key (%s); it runs alone", req.job_id, exc)
            return ("alone", req.job_id), f"alone {req.job_id}"
        label = f"{task} {filled.get('width')}x{filled.get('height')} steps={filled.get('steps')} " \
                f"guidance={filled.get('guidance')}"
        if self.spec.kind == "video":
            label += f" frames={filled.get('num_frames')} fps={filled.get('fps')}"
        if req.adapter_set:
            label += f" loras={len(json.loads(req.adapter_set))}"
        return (req.adapter_set, key), label

    def _more_coming(self) -> bool:
        """Whether a batch being formed should wait for companions (see the module doc)."""
        return self._arriving > 0 or self._promised > 0 or self._last_batch_full

    async def _batch_loop(self) -> None:
        """Run batches one after another, each formed when the pipeline is free (see the module doc)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            first = self._pending[0]
            bound = self._wait_bound(first.bucket_label)
            while bound > 0 and len(self._companions(first)) < self.max_batch_size and self._more_coming():
                remaining = first.arrived + bound - loop.time()
                if remaining <= 0:
                    self._promised = 0  # what was promised did not come in time: stop waiting for it
                    break
                self._arrived.clear()
                await wait_event(self._arrived, remaining)  # not wait_for: it can swallow a cancel
                if first not in self._pending:  # canceled while waiting
                    break
            if first not in self._pending:
                continue
            batch = self._fill(self._companions(first))
            self._last_batch_full = len(batch) >= self.max_batch_size
            for run in batch:
                self._pending.remove(run)
                run.state = "running"
            finishing = await self._run(batch)
            if finishing is not None:
                self._finishing.add(finishing)
                finishing.add_done_callback(self._finishing.discard)
            while len(self._finishing) > FINISHING_KEPT:  # the encoder is behind: let it catch up
                await asyncio.wait(set(self._finishing), return_when=asyncio.FIRST_COMPLETED)

    def _fill(self, companions: list[_Run]) -> list[_Run]:
        """The runs of one batch: up to ``max_batch_size`` images in all (a run of n images counts
        n; one run alone may exceed it), oldest first."""
        batch: list[_Run] = []
        images = 0
        for run in companions:
            n = outputs_of(run.request.input)
            if batch and images + n > self.max_batch_size:
                break
            batch.append(run)
            images += n
        return batch

    def _companions(self, first: _Run) -> list[_Run]:
        """Queued runs that can share ``first``'s batch (its bucket), oldest first."""
        return [p for p in self._pending if p.bucket == first.bucket]

    def _record_batch(self, batch: list[_Run]) -> dict[str, Any]:
        """Count the batch in the stats; returns its entry of ``batches`` (its timings go there)."""
        n = len(batch)
        self.batch_sizes.append(n)
        _bounded_list(self.batch_sizes)
        label = batch[0].bucket_label
        entry: dict[str, Any] = {"size": n, "bucket": label}
        self.batches.append(entry)
        _bounded_list(self.batches)
        info = self.buckets.pop(label, {"batches": 0, "requests": 0, "max_size": 0})
        info.update(batches=info["batches"] + 1, requests=info["requests"] + n, max_size=max(info["max_size"], n))
        self.buckets[label] = info  # the latest last
        _bounded(self.buckets, BUCKETS_KEPT)
        for run in batch:
            self.runs_by_job[run.job_id] = self.runs_by_job.get(run.job_id, 0) + 1
        _bounded(self.runs_by_job)
        return entry

    @staticmethod
    def _emit(batch: list[_Run], event: dict[str, Any]) -> None:
        for run in batch:
            run.emit(event)

    def _pipeline_ran(self, entry: dict[str, Any], started: float, ok: bool = True) -> None:
        self._pipeline_free_at = time.monotonic()
        entry["pipeline_s"] = round(self._pipeline_free_at - started, 4)
        if not ok:
            return
        label, images = entry["bucket"], entry.get("images") or entry["size"]
        costs = self._image_costs.pop(label, {})
        self._image_costs[label] = costs  # the latest used last: the oldest go first
        _bounded(self._image_costs, BUCKETS_KEPT)
        cost = (self._pipeline_free_at - started) / images
        if images == 1:
            costs.setdefault("solo_image_s", deque(maxlen=COSTS_KEPT)).append(cost)
        else:
            costs.setdefault("batched_image_s", deque(maxlen=COSTS_KEPT)).append(cost)
            costs.setdefault("batched_size", deque(maxlen=COSTS_KEPT)).append(float(images))

    def _costs(self, label: str) -> dict[str, float]:
        """The bucket's medians of its latest calls, those measured: ``solo_image_s``,
        ``batched_image_s`` (cost per image) and ``batched_size``."""
        return {key: round(statistics.median(values), 5)
                for key, values in self._image_costs.get(label, {}).items() if values}

    def _bucket_stats(self, label: str, info: dict[str, Any]) -> dict[str, Any]:
        """``stats()["buckets"][label]``: the counts, and once measured the costs and the wait they allow."""
        costs = self._costs(label)
        out = {**info, **costs}
        if costs:
            out["batch_wait_s"] = round(self._wait_bound(label), 4)
        return out

    def _wait_bound(self, label: str) -> float:
        """How long a head of this bucket may wait for companions: what one pipeline call fewer
        saves, capped by ``batch_wait_timeout_s`` (see the module doc).

        With a call costing ``a + b·n`` for n images, a solo image costs ``s = a + b`` and one of a
        batch of n ``p = a/n + b``, so ``a = (s − p)·n/(n − 1)``; zero where batched images cost as
        much as solo ones. Unmeasured, or solo calls too short to judge: the configured wait."""
        costs = self._costs(label)
        solo, batched, size = costs.get("solo_image_s"), costs.get("batched_image_s"), costs.get("batched_size")
        if solo is None or batched is None or solo < JUDGED_MIN_S or not size or size < 2:
            return self.batch_wait_timeout_s
        saved_per_call = (solo - batched) * size / (size - 1)
        return min(self.batch_wait_timeout_s, max(0.0, saved_per_call))

    def _close(self, batch: list[_Run]) -> None:
        for run in batch:
            run.close()
        self._evict()

    async def _run(self, batch: list[_Run]) -> asyncio.Task[None] | None:
        """Denoise ``batch``; returns the task that encodes and uploads its outputs (it runs beside
        the next batch), or None when the batch already ended (error or cancel)."""
        try:
            done = await self._denoise(batch)
        except Exception as exc:  # noqa: BLE001 - a bug here must not stop the loop or hang callers
            logger.exception("%s: batch failed", self.spec.id)
            self._emit(batch, self._error(exc))
            done = None
        if done is None:
            self._close(batch)
            return None
        generator, media = done
        self._emit(batch, event_to_wire(StageEvent("encoding")))
        return asyncio.get_running_loop().create_task(self._finish(batch, generator, media),
                                                      name=f"finish-{batch[0].job_id}")

    async def _denoise(self, batch: list[_Run]) -> tuple[Any, list[Any]] | None:
        """Run the pipeline for ``batch``, emitting its stage and progress events; the generator it
        ran on and the media, or None after emitting the batch's error."""
        n = len(batch)
        entry = self._record_batch(batch)
        requests = [run.request for run in batch]
        generator = self.generator  # the pipeline this batch runs on, even if a swap lands meanwhile
        try:
            set_id = requests[0].adapter_set
            adapters = await self.adapter_set(set_id) if set_id else None
            prepared = [await asyncio.to_thread(self._prepare_input, r.input) for r in requests]
            counts = [outputs_of(r.input) for r in requests]  # a request for n images is n entries
            inputs = [e for p, c in zip(prepared, counts, strict=True) for e in expand_outputs(p, c)]
            if self.hooks is not None:
                for run in batch:
                    run.hold = await asyncio.to_thread(self.hooks.hold_for, str(run.request.input.get("prompt", "")))
        except Exception as exc:  # noqa: BLE001 - becomes the requests' error event
            self._emit(batch, self._error(exc))
            return None
        self._emit(batch, event_to_wire(StageEvent("generating")))
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def should_cancel() -> bool:
            return all(run.canceled for run in batch)

        def on_step(done: int, total: int) -> None:
            loop.call_soon_threadsafe(progress.put_nowait, (done, total))
            if self.hooks is not None:
                for run in batch:
                    if run.hold is not None and done in run.hold.steps:
                        self.hooks.hold(run.job_id, run.hold.token, done, lambda r=run: r.canceled)

        on_latents = self.previews.callback(
            [run.job_id for run in batch], counts,
            lambda index, event: loop.call_soon_threadsafe(batch[index].broadcast, event))
        extra = {"on_latents": on_latents} if on_latents is not None else {}
        started = time.monotonic()
        entry["started_at"] = round(started, 4)
        if self._pipeline_free_at is not None:
            entry["idle_before_s"] = round(started - self._pipeline_free_at, 4)
        run_task = asyncio.ensure_future(asyncio.to_thread(generator.generate, inputs, on_step, should_cancel,
                                                           adapters, **extra))
        entry["images"] = sum(counts)
        run_task.add_done_callback(
            lambda t: self._pipeline_ran(entry, started, ok=not t.cancelled() and t.exception() is None))
        await self._stream_progress(batch, run_task, progress)
        try:
            media = run_task.result()
        except Exception as exc:  # noqa: BLE001 - classified into code + retryable
            self._emit(batch, self._error(exc))
            return None
        if len(media) != sum(counts):
            raise RuntimeError(f"the pipeline returned {len(media)} outputs for {n} requests "
                               f"({sum(counts)} images)")
        grouped, at = [], 0
        for count in counts:  # each run's own images back, in order
            grouped.append(media[at:at + count])
            at += count
        return generator, grouped

    async def _stream_progress(self, batch: list[_Run], run_task: asyncio.Future[Any],
                               progress: asyncio.Queue[tuple[int, int]]) -> None:
        """Emit the batch's steps until the pipeline call ends, paced (see PROGRESS_MIN_INTERVAL_S)."""
        loop = asyncio.get_running_loop()
        interval = self.progress_interval_s
        sent_at = float("-inf")  # the first step goes at once
        held: tuple[int, int] | None = None  # the newest step not sent yet

        def send(step: tuple[int, int]) -> None:
            nonlocal sent_at, held
            self._emit(batch, event_to_wire(ProgressEvent(*step)))
            sent_at, held = loop.time(), None

        while not run_task.done() or not progress.empty():
            timeout = None if held is None else max(0.0, sent_at + interval - loop.time())
            getter = asyncio.ensure_future(progress.get())
            await asyncio.wait({run_task, getter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                if held is not None and loop.time() >= sent_at + interval:
                    send(held)  # its interval ended with no newer step
                continue
            step = getter.result()
            done, total = step
            if done >= total or loop.time() >= sent_at + interval:
                send(step)
            else:
                held = step
        if held is not None and not run_task.cancelled() and run_task.exception() is None:
            send(held)  # the call ended before its last step was reported (it stopped early)

    async def _finish(self, batch: list[_Run], generator: Any, media: list[Any]) -> None:
        """Encode and upload each run's output in the encoder thread, then its ``result.json``;
        each run gets its output and done events as soon as its own upload is stored."""
        loop = asyncio.get_running_loop()
        try:
            for run, items in zip(batch, media, strict=True):
                # each run's stream ends with its own result, not with its batch's last upload: its
                # caller settles the job as soon as the stream closes
                if run.canceled:
                    run.emit(event_to_wire(ErrorEvent("canceled", "canceled")))
                    run.close()
                    continue
                result = {"seed": items[0].seed, "device": generator.device}
                if len(items) > 1:
                    result["seeds"] = [item.seed for item in items]
                try:
                    outs = await loop.run_in_executor(self._encoder, self._store_all, run.request, items, result)
                except Exception as exc:  # noqa: BLE001
                    run.emit(self._error(exc))
                    run.close()
                    continue
                for out in outs:
                    run.emit(out)
                run.emit(event_to_wire(DoneEvent(result)))
                run.close()
        except Exception as exc:  # noqa: BLE001 - a bug here must not hang callers
            logger.exception("%s: finishing a batch failed", self.spec.id)
            self._emit(batch, self._error(exc))
        finally:
            self._close(batch)

    def _store_all(self, request: ReplicaRequest, items: list[Any], result: dict[str, Any]) -> list[dict[str, Any]]:
        """Encoder thread: the run's outputs (``0.png``, ``1.png``, …) and thumbnails stored, then
        the result record."""
        outs = [event_to_wire(self._store(request, item, index)) for index, item in enumerate(items)]
        self._store_result(request, outs, result)
        return outs

    def _store_result(self, request: ReplicaRequest, outputs: list[dict[str, Any]], result: dict[str, Any]) -> None:
        """The result record, written after the outputs (see :class:`~serve.messages.ResultRecord`)."""
        record = ResultRecord(job_id=request.job_id, attempt=request.attempt, outputs=outputs, result=result)
        self.storage.put_bytes(f"{request.output_prefix}{RESULT_NAME}", record.model_dump_json().encode(),
                               "application/json")

    def _error(self, exc: BaseException) -> dict[str, Any]:
        code, retryable = classify(exc)
        if code != "canceled":
            logger.warning("%s: %s (%s, retryable=%s)", self.spec.id, exc, code, retryable)
        return event_to_wire(ErrorEvent(code, str(exc) or type(exc).__name__, retryable))

    def _prepare_input(self, data: dict[str, Any]) -> dict[str, Any]:
        prepared = {k: v for k, v in data.items() if k not in ("image", "image_key", "loras")}
        if data.get("image_key"):
            blob = self.storage.get_bytes(data["image_key"])
            with Image.open(io.BytesIO(blob)) as img:
                prepared["image"] = img.convert("RGB")
        return prepared

    def _store(self, request: ReplicaRequest, item: Any, index: int = 0) -> OutputEvent:
        from models.media import encode_mp4, encode_png, thumbnail_jpeg, thumbnail_png

        prefix = request.output_prefix
        meta = dict(item.metadata)
        if item.kind == "image":
            key = f"{prefix}{index}.png"
            self.storage.put_bytes(key, encode_png(item.image, meta), "image/png")
            thumb = f"{prefix}{index}.thumb.jpg"  # reduced from the decoded image: no second PNG encode
            self.storage.put_bytes(thumb, thumbnail_jpeg(item.image), "image/jpeg")
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
