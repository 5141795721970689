"""Serving benchmark, in one run on one tiny model and size: what the whole stack costs over a bare
diffusers pipeline call, and what batching buys back.

    .venv/bin/python -m bench.serving [--size 64] [--steps 4] [--repeats 8] [--concurrency 16]
                                      [--rounds 2] [--threads 1] [--runner-poll-s S] [--mixed]
    .venv/bin/python -m bench.serving --profile claim-settled.txt [--repeats 8]

(a) **Overhead.** One request at a time: a raw call (``StableDiffusionPipeline.from_pretrained`` of
    the tiny-sd checkpoint, called directly in this process) against the full HTTP path of the
    embedded stack (``POST /v1/jobs`` → runner claim → ``RayExecutor`` → Serve replica: pipeline,
    PNG + thumbnail encoding, storage → job ``succeeded`` → the PNG downloaded from its signed URL).
    Ratio = median full path / median raw call. The two alternate, so a change in the machine's
    load hits both alike. The job's own metrics split the full path: ``queue_s`` (submit to claim:
    the runner is woken by the submission, so this is the claim's own cost) and ``run_s`` (claim to
    settled). Targets: ratio ≤ 1.10, ``queue_s`` median < 20 ms.
(b) **Throughput.** ``--concurrency`` requests submitted at once through the stack (the replica
    batches them) against the same number of raw calls one after another. Ratio = stack
    requests/s / raw requests/s (above 1: the stack is faster than a loop of bare calls). Target ≥ 1.0.
(c) ``--mixed``: the same with sizes 64 and 96 and step counts of 1×, 1.5× and 2× ``--steps``
    interleaved; prints the batch sizes the replica ran (its ``stats()["batch_sizes"]``) and the
    throughput ratio.
(d) **Preview cost.** The replica's own code in this process (``models.generator.Generator`` on the
    tiny-sd checkpoint, with ``serve.previews.PreviewPump`` as the replica wires it: capture on the
    denoising thread, render in its worker thread), the same request with and without previews
    (the spec's ``every_k_steps``), alternating, ``--preview-repeats`` pairs. Step time = (last step's
    end − first step's end) / (steps − 1), from the step callback; also the whole call. Ratio = median
    with / median without. Target ≤ 1.05. ``--previews-only`` runs just (d).
``--profile``: instead of (a)–(c), claim → settled under pyinstrument (see :func:`profile`).

The client (``ops.client.Client``, as ``cineweave generate`` uses it) runs in a process of its
own, as an app does, with its HTTP clients made and connected before the clock starts (an app keeps
its client; making one costs ~22 ms here). The full path is timed there, from the submission to
the downloaded PNG.

Both sides use the same size, steps, guidance and thread count (the replica runs with one torch
thread, as ``cineweave up`` configures it; ``--threads`` sets the raw side, default 1 to match).
The stack is ``ops.server.running_stack`` with only tiny-sd deployed, on a fresh data dir.

Prints a table and writes JSON to ``bench/results/serving.json``. The figures depend on the machine
and on what else runs on it: the JSON records the load average around the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import queue
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import load_average, stats_ms

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
MODEL = "tiny-sd"
JOB_TIMEOUT_S = 300.0




class RawPipeline:
    """The tiny-sd checkpoint loaded with plain diffusers, called the way the replica calls it."""

    def __init__(self, path: Path, request: dict[str, Any]) -> None:
        from diffusers import StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None,
                                                            requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.request = request

    def __call__(self, seed: int, overrides: dict[str, Any] | None = None) -> Any:
        import torch

        r = {**self.request, **(overrides or {})}
        out = self.pipe(r["prompt"], width=r["width"], height=r["height"], num_inference_steps=r["steps"],
                        guidance_scale=r["guidance"], generator=torch.Generator("cpu").manual_seed(seed),
                        output_type="pil")
        return out.images[0]


class StackClient:
    """Submit, wait for ``succeeded``, download the output: the full path, timed.

    Waiting follows the job's server-sent events (``ops.client.Client``, as ``cineweave generate``
    does), so the client does not load the API (and the two cores the replica shares) with polling.

    The HTTP clients are made before the clock starts (:meth:`ready`) and kept, one per request in
    flight, as an app keeps its HTTP client and its keep-alive connections: making an
    ``httpx.Client`` costs ~22 ms of CPU here (its TLS context, even for ``http://``), work of the
    client and not of the stack, which the figures before 2026-12-04 counted against the stack.
    """

    def __init__(self, url: str, api_key: str, request: dict[str, Any]) -> None:
        self.url, self.api_key, self.request = url, api_key, request
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._made: list[Any] = []
        self._lock = threading.Lock()

    def ready(self, n: int) -> None:
        """At least ``n`` clients made and idle (call before timing ``n`` requests at once)."""
        from ops.client import Client

        with self._lock:
            while len(self._made) < n:
                client = Client(self.url, self.api_key, timeout_s=60)
                self._made.append(client)
                self._idle.put(client)

    def close(self) -> None:
        with self._lock:
            for client in self._made:
                client.close()
            self._made.clear()

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        try:
            client = self._idle.get_nowait()
        except queue.Empty:  # more in flight than made ready: one more, kept after (its making is timed)
            from ops.client import Client

            client = Client(self.url, self.api_key, timeout_s=60)
            with self._lock:
                self._made.append(client)
        try:
            yield client
        finally:
            self._idle.put(client)

    def one(self, seed: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The finished job, with ``_phases``: the client's own timings of each leg (seconds)."""
        with self._client() as client:
            t0 = time.perf_counter()
            job = client.submit(MODEL, {**self.request, **(overrides or {}), "seed": seed})
            t1 = time.perf_counter()
            job = client.wait(job["id"], timeout_s=JOB_TIMEOUT_S)
            t2, completed_seen = time.perf_counter(), time.time()
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
            png = client.http.get(job["outputs"][0]["url"])
            if png.status_code != 200 or not png.content.startswith(b"\x89PNG"):
                raise RuntimeError(f"job {job['id']}: output not downloadable ({png.status_code})")
            t3 = time.perf_counter()
            job["_phases"] = {"post_s": t1 - t0, "wait_s": t2 - t1, "download_s": t3 - t2,
                              "completed_to_client_s": completion_lag(job, completed_seen), "total_s": t3 - t0}
            return job

    def many(self, items: list[tuple[int, dict[str, Any] | None]]) -> dict[str, Any]:
        """``items`` (seed, overrides) all at once, one thread each: the finished jobs, the wall
        time from the first submission to the last download, and its ends on ``time.monotonic()``."""
        self.ready(len(items))
        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            t0, m0 = time.perf_counter(), time.monotonic()
            jobs = list(pool.map(lambda a: self.one(*a), items))
            wall, m1 = time.perf_counter() - t0, time.monotonic()
        return {"jobs": jobs, "wall_s": wall, "started": m0, "ended": m1}


class ClientProcess:
    """A :class:`StackClient` in a process of its own, as an app runs apart from the API: its
    threads (JSON, SSE parsing, downloads) then do not take the GIL from the API, the runner and the
    Ray driver that the embedded stack runs in this process. The timings are taken in that process;
    only the results cross back (spawned, so it shares nothing with this one but the host's clock)."""

    def __init__(self, url: str, api_key: str, request: dict[str, Any], concurrency: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_client_start, initargs=(url, api_key, request, concurrency))

    def one(self, seed: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._pool.submit(_client_one, seed, overrides).result(timeout=JOB_TIMEOUT_S)

    def many(self, items: list[tuple[int, dict[str, Any] | None]]) -> dict[str, Any]:
        return self._pool.submit(_client_many, items).result(timeout=JOB_TIMEOUT_S)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_process_client: StackClient | None = None  # the client process's own (set by its initializer)


def _client_start(url: str, api_key: str, request: dict[str, Any], concurrency: int) -> None:
    global _process_client
    _process_client = StackClient(url, api_key, request)
    _process_client.ready(concurrency)


def _client_one(seed: int, overrides: dict[str, Any] | None) -> dict[str, Any]:
    assert _process_client is not None
    return _process_client.one(seed, overrides)


def _client_many(items: list[tuple[int, dict[str, Any] | None]]) -> dict[str, Any]:
    assert _process_client is not None
    return _process_client.many(items)


def completion_lag(job: dict[str, Any], seen_wall: float) -> float | None:
    """Seconds from the job's ``completed_at`` (server clock: this machine) to the client seeing it."""
    from datetime import UTC, datetime

    stamp = job.get("completed_at")
    if not stamp:
        return None
    at = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return seen_wall - at.timestamp()


def uptime() -> str | None:
    """``uptime``'s line (the load average as the brief's readers know it)."""
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def replica_stats(handle: Any) -> dict[str, Any]:
    """The replica's ``stats()`` (``batch_sizes``: the batch sizes it ran, oldest first)."""
    return dict(handle.stats.remote().result(timeout_s=60))


def first_of_round(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A round's batches, the first one's ``idle_before_s`` dropped: it is the time before the round
    (the raw calls ran meanwhile), not a gap inside it."""
    return [{k: v for k, v in b.items() if not (i == 0 and k == "idle_before_s")} for i, b in enumerate(batches)]


def replica_time(batches: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Where the stack's wall time went on the replica: the pipeline calls' own time (a slow
    pipeline: the machine is shared), against the time it stood idle between them (waiting for
    work: the path around it). From the replica's ``stats()["batches"]`` timings."""
    pipeline = sum(b.get("pipeline_s") or 0.0 for b in batches)
    idle = sum(b.get("idle_before_s") or 0.0 for b in batches)
    return {"replica_pipeline_s": round(pipeline, 3), "replica_idle_between_s": round(idle, 3),
            "replica_busy_share": round(pipeline / wall_s, 3) if wall_s > 0 else None}


def round_edges(batches: list[dict[str, Any]], started: float, ended: float) -> dict[str, float] | None:
    """The replica's idle time at a round's two ends: from the first request sent (``started``,
    ``time.monotonic()`` here) to its first pipeline call (the submissions, claims and the batch
    wait), and from its last call's end to the last client done (``ended``: encoding, settlement,
    the completion on SSE, the download). The replica's ``started_at`` is the same host's clock."""
    timed = [b for b in batches if b.get("started_at") is not None and b.get("pipeline_s") is not None]
    if not timed:
        return None
    first, last = timed[0], timed[-1]
    return {"lead_in_s": round(first["started_at"] - started, 3),
            "tail_s": round(ended - (last["started_at"] + last["pipeline_s"]), 3)}


def edge_medians(edges: list[dict[str, float] | None]) -> dict[str, float]:
    """Median lead-in and tail over the rounds (ms)."""
    seen = [e for e in edges if e is not None]
    return {f"round_{k.removesuffix('_s')}_ms": round(statistics.median(e[k] for e in seen) * 1000, 1)
            for k in ("lead_in_s", "tail_s")} if seen else {}


def image_costs(buckets: dict[str, dict[str, Any]], label_part: str) -> dict[str, Any] | None:
    """The replica's medians of what one image costs in a batch of one and in larger batches
    (its latest calls), in the bucket whose label has ``label_part``, and the batch wait they allow
    (``serve.generator.GeneratorServer._wait_bound``)."""
    for label, info in buckets.items():
        if label_part in label and "solo_image_s" in info and "batched_image_s" in info:
            solo, batched = float(info["solo_image_s"]), float(info["batched_image_s"])
            wait = info.get("batch_wait_s")
            return {"bucket": label, "solo_ms": round(solo * 1000, 1), "batched_ms": round(batched * 1000, 1),
                    "batching_gain": round(solo / batched, 3) if batched > 0 else None,
                    "batch_wait_ms": round(float(wait) * 1000, 1) if wait is not None else None}
    return None


def mixed_requests(n: int, steps: int) -> list[dict[str, Any]]:
    """``n`` requests of sizes 64 and 96 and step counts steps, 1.5× and 2× steps, interleaved."""
    sizes = (64, 96)
    step_counts = (steps, max(1, round(steps * 1.5)), steps * 2)
    return [{"width": sizes[i % 2], "height": sizes[i % 2], "steps": step_counts[(i // 2) % 3]} for i in range(n)]


def run(size: int, steps: int, repeats: int, concurrency: int, rounds: int, threads: int,
        runner_poll_s: float | None, tiny_dir: Path, data_dir: Path, mixed: bool = False) -> dict[str, Any]:
    import diffusers
    import ray
    import torch

    from api.settings import Settings
    from models.catalog import Catalog
    from models.generator import limit_threads
    from ops.server import free_port, running_stack

    spec = Catalog.load().get(MODEL)
    assert spec is not None
    request = {"prompt": "a lighthouse at dusk", "width": size, "height": size, "steps": steps,
               "guidance": spec.defaults.guidance}
    overrides: dict[str, Any] = {}
    if runner_poll_s is not None:
        overrides["runner_poll_s"] = runner_poll_s
    settings = Settings(data_dir=data_dir, tiny_models_dir=tiny_dir.resolve(), port=free_port(),
                        admin_key=secrets.token_urlsafe(24), max_active_jobs=max(64, concurrency * 2),
                        rate_limit_per_minute=1_000_000, overflow_enabled=False, _env_file=None, **overrides)
    load_before = load_average()
    limit_threads(threads)
    started = time.perf_counter()
    with running_stack(settings, models=[MODEL]) as (url, stack):
        startup_s = time.perf_counter() - started
        import httpx

        created = httpx.post(f"{url}/v1/admin/users", headers={"Authorization": f"Bearer {settings.admin_key}"},
                             json={"email": f"bench-{uuid.uuid4().hex[:8]}@example.com", "credits": 1_000_000})
        created.raise_for_status()
        client = ClientProcess(url, created.json()["api_key"], request, concurrency)
        raw = RawPipeline(tiny_dir / MODEL, request)
        handle = stack.handles[MODEL]

        for seed in range(2):  # warm-up: the first calls of each path (allocations, thread pools, caches)
            raw(seed)
            client.one(seed)
        client.many([(500 + i, None) for i in range(concurrency)])  # and every client's connection, batches

        # (a) one request at a time, alternating raw and full path ------------------------------
        raw_s: list[float] = []
        http_s: list[float] = []
        queue_s: list[float] = []
        run_s: list[float] = []
        phases: list[dict[str, Any]] = []
        jitter = random.Random(0)
        for i in range(repeats):
            t0 = time.perf_counter()
            raw(100 + i)
            raw_s.append(time.perf_counter() - t0)
            # Arrive at a random moment, as a client would: a fixed rhythm could lock onto a period
            # of the stack (the runner's safety poll, the replica's batch wait) and bias the figure.
            time.sleep(jitter.uniform(0, min(settings.runner_poll_s, 0.5)))
            job = client.one(100 + i)
            http_s.append(job["_phases"]["total_s"])
            queue_s.append(job["metrics"]["queue_s"] or 0.0)
            run_s.append(job["metrics"]["run_s"] or 0.0)
            phases.append({**job["_phases"], "raw_s": raw_s[-1], "http_s": http_s[-1],
                           "queue_s": queue_s[-1], "run_s": run_s[-1]})

        # (b) N concurrent through the stack against N sequential raw calls ---------------------
        seq_walls: list[float] = []
        stack_walls: list[float] = []
        batch_sizes: list[int] = []
        batch_entries: list[dict[str, Any]] = []
        edges: list[dict[str, float] | None] = []
        for r in range(rounds):
            t0 = time.perf_counter()
            for i in range(concurrency):
                raw(1000 * (r + 1) + i)
            seq_walls.append(time.perf_counter() - t0)

            stats_before = replica_stats(handle)
            before = len(stats_before.get("batch_sizes", []))
            entries_before = len(stats_before.get("batches", []))
            done = client.many([(2000 * (r + 1) + i, None) for i in range(concurrency)])
            stack_walls.append(done["wall_s"])
            stats_after = replica_stats(handle)
            batch_sizes.extend(stats_after.get("batch_sizes", [])[before:])
            round_batches = stats_after.get("batches", [])[entries_before:]
            batch_entries.extend(first_of_round(round_batches))
            edges.append(round_edges(round_batches, done["started"], done["ended"]))

        # (c) --mixed: sizes 64 and 96, mixed step counts, N concurrent against N sequential ----
        mixed_report: dict[str, Any] | None = None
        if mixed:
            plan = mixed_requests(concurrency, steps)
            mixed_seq: list[float] = []
            mixed_stack: list[float] = []
            mixed_batches: list[Any] = []
            mixed_sizes: list[int] = []
            mixed_edges: list[dict[str, float] | None] = []
            for r in range(rounds):
                t0 = time.perf_counter()
                for i, overrides in enumerate(plan):
                    raw(3000 * (r + 1) + i, overrides)
                mixed_seq.append(time.perf_counter() - t0)
                stats_before = replica_stats(handle)
                n_sizes, n_batches = len(stats_before.get("batch_sizes", [])), len(stats_before.get("batches", []))
                done = client.many([(4000 * (r + 1) + i, o) for i, o in enumerate(plan)])
                mixed_stack.append(done["wall_s"])
                stats_after = replica_stats(handle)
                mixed_sizes.extend(stats_after.get("batch_sizes", [])[n_sizes:])
                round_batches = stats_after.get("batches", [])[n_batches:]
                mixed_batches.extend(first_of_round(round_batches))
                mixed_edges.append(round_edges(round_batches, done["started"], done["ended"]))
            mixed_report = {
                "requests": concurrency, "rounds": rounds, "plan": plan,
                "raw_sequential_s": [round(x, 3) for x in mixed_seq],
                "stack_concurrent_s": [round(x, 3) for x in mixed_stack],
                "ratio": round(statistics.median(mixed_seq) / statistics.median(mixed_stack), 2),
                "replica_batch_sizes": mixed_sizes, "replica_batches": mixed_batches,
                **replica_time(mixed_batches, sum(mixed_stack)), **edge_medians(mixed_edges),
            }
        buckets = replica_stats(handle).get("buckets", {})
        client.close()

    raw_median = statistics.median(raw_s)
    http_median = statistics.median(http_s)
    seq_wall = statistics.median(seq_walls)
    stack_wall = statistics.median(stack_walls)
    return {
        "model": MODEL, "size": f"{size}x{size}", "inference_steps": steps, "guidance": request["guidance"],
        "overhead": {
            "raw_call": stats_ms(raw_s), "http_path": stats_ms(http_s),
            "ratio": round(http_median / raw_median, 2),
            "added_ms": round((http_median - raw_median) * 1000, 1),
            "job_queue_s": stats_ms(queue_s), "job_run_s": stats_ms(run_s),
            "phases_median_ms": phase_medians(phases),
        },
        "throughput": {
            "requests": concurrency, "rounds": rounds,
            "raw_sequential_s": [round(x, 3) for x in seq_walls], "stack_concurrent_s": [round(x, 3) for x in stack_walls],
            "raw_rps": round(concurrency / seq_wall, 3), "stack_rps": round(concurrency / stack_wall, 3),
            "ratio": round(seq_wall / stack_wall, 2), "replica_batch_sizes": batch_sizes,
            **replica_time(batch_entries, sum(stack_walls)), **edge_medians(edges),
            "replica_cost_per_image": image_costs(buckets, f"{size}x{size} steps={steps} "),
        },
        "mixed": mixed_report,
        "targets": {"overhead_ratio_max": 1.10, "queue_median_ms_max": 20.0, "throughput_ratio_min": 1.0},
        "stack": {"startup_s": round(startup_s, 1), "runner_poll_s": settings.runner_poll_s,
                  "max_batch_size": spec.serving.max_batch_size, "batch_wait_timeout_s": spec.serving.batch_wait_timeout_s,
                  "replica_torch_threads": 1},
        "machine": {"cpus": os.cpu_count(), "torch_threads_raw": threads, "load_average_before": load_before,
                    "load_average_after": load_average(), "uptime_after": uptime(),
                    "cuda": torch.cuda.is_available(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "diffusers": diffusers.__version__, "ray": ray.__version__},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def preview_cost(tiny_dir: Path, size: int, steps: int, repeats: int, threads: int) -> dict[str, Any]:
    """(d): step time and call time of the replica's generator with and without previews (see the module doc)."""
    import torch

    from models.catalog import Catalog
    from models.generator import Generator, limit_threads
    from serve.previews import PreviewPump

    limit_threads(threads)
    spec = Catalog.load().get(MODEL)
    assert spec is not None
    request = {"prompt": "a lighthouse at dusk", "width": size, "height": size, "steps": steps,
               "guidance": spec.defaults.guidance}
    generator = Generator.load(spec, tiny_dir=tiny_dir)
    pump = PreviewPump(spec, generator)
    assert pump.enabled, f"{MODEL} has previews off (every_k_steps 0)"
    sent: list[dict[str, Any]] = []
    spent: dict[str, list[float]] = {"capture": [], "render": []}
    for name in spent:  # time the two halves: capture is on the denoising thread, render beside it
        def timed(*args: Any, _fn: Any = getattr(pump.previewer, name), _name: str = name) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*args)
            finally:
                spent[_name].append(time.perf_counter() - t0)

        setattr(pump.previewer, name, timed)

    def one(seed: int, previews: bool) -> tuple[float, float]:
        marks: list[float] = []
        extra: dict[str, Any] = {}
        if previews:
            extra["on_latents"] = pump.callback([f"bench-{seed}"], [1], lambda _i, event: sent.append(event))
        t0 = time.perf_counter()
        generator.generate([{**request, "seed": seed}], lambda done, total: marks.append(time.perf_counter()),
                           None, None, **extra)
        call_s = time.perf_counter() - t0
        return (marks[-1] - marks[0]) / max(1, len(marks) - 1), call_s

    for seed in range(3):  # warm-up, both ways
        one(seed, False)
        one(seed, True)
    sent.clear()
    for values in spent.values():
        values.clear()
    sent_before = pump.sent
    step_off: list[float] = []
    step_on: list[float] = []
    call_off: list[float] = []
    call_on: list[float] = []
    for i in range(repeats):
        order = (False, True) if i % 2 == 0 else (True, False)  # alternate who goes first
        for previews in order:
            step_s, call_s = one(10_000 + i, previews)
            (step_on if previews else step_off).append(step_s)
            (call_on if previews else call_off).append(call_s)
    pump.close(wait=True)  # every preview handed over is rendered and counted
    per_run = (steps - 1) // pump.every  # previews at k, 2k, … below the last step
    for values in spent.values():
        if not values:
            values.append(0.0)
    return {
        "every_k_steps": pump.every, "decoder": pump.previewer.decoder, "previews_per_run": per_run,
        "previews_sent": pump.sent - sent_before, "previews_dropped": pump.dropped, "pairs": repeats,
        "preview_bytes_median": int(statistics.median(len(e["image"]) for e in sent)) if sent else None,
        "step_without": stats_ms(step_off), "step_with": stats_ms(step_on),
        "step_ratio": round(statistics.median(step_on) / statistics.median(step_off), 3),
        "step_ratio_paired": round(statistics.median(a / b for a, b in zip(step_on, step_off, strict=True)), 3),
        "step_ratio_fastest": round(min(step_on) / min(step_off), 3),
        "capture_ms": stats_ms(spent["capture"]), "render_ms": stats_ms(spent["render"]),
        # the denoising thread's own share: capture time per run over the run's denoising time
        "capture_share": round(statistics.median(spent["capture"]) * per_run
                               / (statistics.median(step_off) * steps), 5) if spent["capture"] else None,
        "call_without": stats_ms(call_off), "call_with": stats_ms(call_on),
        "call_ratio": round(statistics.median(call_on) / statistics.median(call_off), 3),
        "target_ratio_max": 1.05, "torch_threads": threads, "cuda": torch.cuda.is_available(),
    }


def preview_rows(out: Any, p: dict[str, Any]) -> None:
    out.add_row(f"(d) step time, previews every {p['every_k_steps']} steps ({p['pairs']} pairs)",
                f"{p['step_without']['median_ms']:.2f} ms (without)", f"{p['step_with']['median_ms']:.2f} ms (with)",
                f"{p['step_ratio']:.3f}×")
    out.add_row("    paired (median of with/without per pair), fastest runs", "", "",
                f"{p['step_ratio_paired']:.3f}×, {p['step_ratio_fastest']:.3f}×")
    out.add_row("    capture (denoising thread) / render (worker), median", "",
                f"{p['capture_ms']['median_ms']:.3f} ms / {p['render_ms']['median_ms']:.2f} ms", "")
    out.add_row("    whole pipeline call", f"{p['call_without']['median_ms']:.1f} ms",
                f"{p['call_with']['median_ms']:.1f} ms", f"{p['call_ratio']:.3f}×")
    out.add_row("    previews sent / dropped, median size", "",
                f"{p['previews_sent']} / {p['previews_dropped']}, {p['preview_bytes_median']} B", "")
    out.add_row("    target", "", f"cost ≤ 5 %: {'met' if p['step_ratio'] <= p['target_ratio_max'] else 'NOT met'}", "")


def phase_medians(phases: list[dict[str, Any]]) -> dict[str, float]:
    """Median of each leg of (a) in ms; ``unaccounted``: POST's return to the job's claim, and
    settlement to ``completed_at`` (full path − POST − queue − run − completion lag − download)."""
    out: dict[str, float] = {}
    for name in ("raw_s", "http_s", "post_s", "queue_s", "run_s", "completed_to_client_s", "download_s", "wait_s"):
        values = [p[name] for p in phases if p.get(name) is not None]
        if values:
            out[name.removesuffix("_s")] = round(statistics.median(values) * 1000, 1)
    rest = [p["http_s"] - p["post_s"] - p["queue_s"] - p["run_s"] - (p["completed_to_client_s"] or 0.0)
            - p["download_s"] for p in phases]
    if rest:
        out["unaccounted"] = round(statistics.median(rest) * 1000, 1)
    around = [p["run_s"] - p["raw_s"] for p in phases]
    if around:
        out["run_minus_raw"] = round(statistics.median(around) * 1000, 1)
    return out


def count_calls(runner: Any, calls: Counter[str]) -> None:
    """Count the runner's database calls (each is one transaction on its pool) by function name."""
    real = runner._call

    async def counted(fn: Any, *args: Any) -> Any:
        inner = getattr(fn, "func", fn)  # functools.partial
        calls[getattr(inner, "__name__", repr(inner))] += 1
        return await real(fn, *args)

    runner._call = counted


def profile(size: int, steps: int, repeats: int, tiny_dir: Path, data_dir: Path, out: Path) -> dict[str, Any]:
    """Claim → settled under pyinstrument, on the tiny-sd path.

    The stack runs without its own runner; a :class:`~api.runner.runner.Runner` on this thread's
    event loop drives the same ``RayExecutor``/router the API uses, and jobs are submitted through
    :class:`~api.services.jobs.JobService` (no HTTP: only claim → settled is profiled). The profiler
    runs in async mode, so the time a coroutine spends awaiting (a database call on the runner's
    pool, the replica's stream) is attributed to the line that awaits it.
    """
    import asyncio

    from pyinstrument import Profiler

    from api.db.engine import Database
    from api.runner.runner import Runner
    from api.services.events import EventBus
    from api.services.jobs import JobService, Submission
    from api.services.notify import Notifier
    from api.services.users import create_user
    from api.settings import Settings
    from api.storage.base import make_storage
    from models.catalog import Catalog
    from models.generator import limit_threads
    from ops.server import free_port, running_stack

    catalog = Catalog.load()
    spec = catalog.get(MODEL)
    assert spec is not None
    request = {"prompt": "a lighthouse at dusk", "width": size, "height": size, "steps": steps,
               "guidance": spec.defaults.guidance}
    settings = Settings(data_dir=data_dir, tiny_models_dir=tiny_dir.resolve(), port=free_port(),
                        admin_key=secrets.token_urlsafe(24), max_active_jobs=64, rate_limit_per_minute=1_000_000,
                        overflow_enabled=False, runner_enabled=False, _env_file=None)
    limit_threads(1)
    with running_stack(settings, models=[MODEL]) as (_url, stack):
        db = Database(settings)
        storage = make_storage(settings.resolved_storage_url(), signing_secret=settings.resolved_signing_secret(),
                               public_base_url=f"http://{settings.host}:{settings.port}")
        db.migrate()
        with db.session() as session:
            user = create_user(session, settings, f"profile-{uuid.uuid4().hex[:8]}@example.com", None, 1_000_000)
            session.commit()
        run_s: list[float] = []
        queue_s: list[float] = []
        calls: Counter[str] = Counter()

        async def main() -> Profiler:
            bus = EventBus()
            bus.bind(asyncio.get_running_loop())
            notifier = Notifier(db)
            notifier.subscribe("events", bus.on_notification)
            await notifier.start()
            jobs = JobService(db, settings, catalog, storage, bus)

            def make_runner() -> Runner:
                return Runner(db, stack.executor(), settings, storage, bus, notifier=notifier)

            async def one(seed: int) -> None:
                job, _ = await asyncio.to_thread(jobs.submit, user.user, Submission(MODEL, {**request, "seed": seed}))
                deadline = time.monotonic() + JOB_TIMEOUT_S
                while time.monotonic() < deadline:
                    waiter = bus.waiter(job.id)
                    try:
                        current = await asyncio.to_thread(jobs.get, None, job.id)
                        if current.status in ("succeeded", "failed", "canceled"):
                            if current.status != "succeeded":
                                raise RuntimeError(f"job {job.id} {current.status}: {current.error_code}")
                            run_s.append(current.run_s or 0.0)
                            queue_s.append(current.queue_s or 0.0)
                            return
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(waiter.wait(), timeout=1.0)
                    finally:
                        bus.release(job.id, waiter)
                raise TimeoutError(f"job {job.id} did not finish")

            try:
                warm = make_runner()  # warm-up: the first calls of each path, outside the profile
                warm.start()
                try:
                    for seed in range(2):
                        await one(seed)
                finally:
                    await warm.stop()
                run_s.clear()
                queue_s.clear()
                # started before the runner: its loop and job tasks inherit the profiled context
                profiler = Profiler(async_mode="enabled", interval=0.0005)
                profiler.start()
                runner = make_runner()
                count_calls(runner, calls)
                runner.start()
                try:
                    for i in range(repeats):
                        await one(100 + i)
                finally:
                    await runner.stop()
                profiler.stop()
                return profiler
            finally:
                await notifier.stop()

        profiler = asyncio.run(main())
        db.dispose()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profiler.output_text(unicode=True, show_all=False))
    return {"profile": str(out), "job_run_s": stats_ms(run_s), "job_queue_s": stats_ms(queue_s),
            "runner_db_calls_per_job": {k: round(v / max(1, repeats), 2) for k, v in sorted(calls.items())},
            "runner_db_calls_per_job_total": round(sum(calls.values()) / max(1, repeats), 2),
            "load_average": load_average(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    o, t = report["overhead"], report["throughput"]
    out = Table(title=f"serving: {report['model']} {report['size']}, {report['inference_steps']} steps "
                      f"(runner poll {report['stack']['runner_poll_s']}s)")
    out.add_column("measure")
    out.add_column("raw diffusers call", justify="right")
    out.add_column("through the stack", justify="right")
    out.add_column("ratio", justify="right")
    out.add_row("(a) one request, median latency", f"{o['raw_call']['median_ms']:.0f} ms",
                f"{o['http_path']['median_ms']:.0f} ms", f"{o['ratio']:.2f}× (+{o['added_ms']:.0f} ms)")
    out.add_row("    of which: queued for a runner", "", f"{o['job_queue_s']['median_ms']:.0f} ms", "")
    out.add_row("    of which: claim → settled", "", f"{o['job_run_s']['median_ms']:.0f} ms", "")
    for name, ms in o.get("phases_median_ms", {}).items():
        out.add_row(f"    phase median: {name}", "", f"{ms:.1f} ms", "")
    out.add_row(f"(b) {t['requests']} requests, throughput", f"{t['raw_rps']:.2f} req/s (sequential)",
                f"{t['stack_rps']:.2f} req/s (concurrent)", f"{t['ratio']:.2f}×")
    out.add_row("    replica batch sizes", "", ",".join(map(str, t["replica_batch_sizes"])), "")
    if "replica_pipeline_s" in t:
        out.add_row("    replica pipeline time / idle between batches", "",
                    f"{t['replica_pipeline_s']:.2f} s / {t['replica_idle_between_s']:.2f} s", "")
    cost = t.get("replica_cost_per_image")
    if cost:
        wait = f", wait ≤ {cost['batch_wait_ms']:.0f} ms" if cost.get("batch_wait_ms") is not None else ""
        out.add_row("    replica cost per image, solo / batched (its medians)", "",
                    f"{cost['solo_ms']:.0f} ms / {cost['batched_ms']:.0f} ms", f"gain {cost['batching_gain']:.2f}×{wait}")
    if "round_lead_in_ms" in t:
        out.add_row("    replica idle at a round's start / end (median)", "",
                    f"{t['round_lead_in_ms']:.0f} ms / {t['round_tail_ms']:.0f} ms", "")
    m = report.get("mixed")
    if m:
        out.add_row(f"(c) {m['requests']} mixed (64/96 px, mixed steps)",
                    f"{statistics.median(m['raw_sequential_s']):.2f} s (sequential)",
                    f"{statistics.median(m['stack_concurrent_s']):.2f} s (concurrent)", f"{m['ratio']:.2f}×")
        out.add_row("    replica batch sizes", "", ",".join(map(str, m["replica_batch_sizes"])) or "(not reported)", "")
    g = report["targets"]
    verdict = [(f"overhead ≤ {g['overhead_ratio_max']:.2f}×", o["ratio"] <= g["overhead_ratio_max"]),
               (f"queue median < {g['queue_median_ms_max']:.0f} ms",
                o["job_queue_s"]["median_ms"] < g["queue_median_ms_max"]),
               (f"throughput ≥ {g['throughput_ratio_min']:.1f}×", t["ratio"] >= g["throughput_ratio_min"])]
    out.add_row("targets", "", "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in verdict), "")
    if report.get("previews"):
        preview_rows(out, report["previews"])
    machine = report["machine"]
    out.add_row("load average (before → after)", "", f"{machine['load_average_before']} → "
                f"{machine['load_average_after']}", "")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per generation")
    parser.add_argument("--repeats", type=int, default=8, help="single requests per side for (a)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests per round for (b)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (b); the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the raw side (replicas use 1)")
    parser.add_argument("--runner-poll-s", type=float, default=None,
                        help="the runner's polling interval (default: the product default, CINEWEAVE_RUNNER_POLL_S)")
    parser.add_argument("--tiny-dir", type=Path, default=Path("var/tiny-models"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--mixed", action="store_true",
                        help="also (c): sizes 64 and 96 and mixed step counts, concurrent vs sequential")
    parser.add_argument("--preview-repeats", type=int, default=60, help="with/without pairs for (d)")
    parser.add_argument("--previews-only", action="store_true", help="run only (d), the preview cost")
    parser.add_argument("--profile", type=Path, default=None, metavar="TXT",
                        help="instead: profile claim → settled with pyinstrument, write the report to TXT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

    if args.profile is not None:
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
            summary = profile(args.size, args.steps, args.repeats, args.tiny_dir, Path(tmp), args.profile)
        print(json.dumps(summary, indent=2))
        return 0
    if args.previews_only:
        from rich.table import Table

        report = {"model": MODEL, "size": f"{args.size}x{args.size}", "inference_steps": args.steps,
                  "previews": preview_cost(args.tiny_dir, args.size, args.steps, args.preview_repeats, args.threads),
                  "load_average": load_average(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        out = Table(title=f"preview cost: {MODEL} {report['size']}, {args.steps} steps")
        for column in ("measure", "without previews", "with previews", "ratio"):
            out.add_column(column)
        preview_rows(out, report["previews"])
        Console().print(out)
        print(json.dumps(report, indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        report = run(args.size, args.steps, args.repeats, args.concurrency, args.rounds, args.threads,
                     args.runner_poll_s, args.tiny_dir, Path(tmp), mixed=args.mixed)
    report["previews"] = preview_cost(args.tiny_dir, args.size, args.steps, args.preview_repeats, args.threads)
    Console().print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
