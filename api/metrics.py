"""Prometheus metrics: one registry per app, so tests and several apps in a process do not clash.

The gauges that need a database query or a call to the cluster (Ray handles) are never computed on
the scrape: a background thread (:meth:`Metrics.start_refresher`) refreshes them every
``metrics_refresh_s`` and a scrape renders the last values. A slow database or a busy cluster
makes the figures older, never the scrape slower, and a flood of scrapes costs no queries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _Cached:
    """The last value a (blocking) source returned; ``refresh`` is the only caller of the source."""

    def __init__(self, source: Callable[[], Any], empty: Any, what: str) -> None:
        self.source = source
        self.value = empty
        self.what = what
        self.refreshed_at: float | None = None

    def refresh(self) -> None:
        try:
            self.value = self.source()
            self.refreshed_at = time.monotonic()
        except Exception:  # noqa: BLE001 - keep the last value: the cluster or database is busy
            logger.warning("metrics source %s failed; keeping its last value", self.what, exc_info=True)


class _DbCollector(Collector):
    """Queue depth, active jobs and queue wait per model, from the last database snapshot."""

    def __init__(self, cached: _Cached) -> None:
        self._cached = cached

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snap = self._cached.value or {}
        jobs = GaugeMetricFamily("cineweave_jobs", "Jobs by status and model", labels=["status", "model"])
        for (status, model), count in snap.get("jobs", {}).items():
            jobs.add_metric([status, model], count)
        depth = GaugeMetricFamily("cineweave_queue_depth", "Queued jobs per model", labels=["model"])
        for model, count in snap.get("queued", {}).items():
            depth.add_metric([model], count)
        wait = GaugeMetricFamily("cineweave_queue_oldest_wait_seconds",
                                 "Age of the oldest queued job per model", labels=["model"])
        for model, seconds in snap.get("oldest_wait", {}).items():
            wait.add_metric([model], seconds)
        idle = GaugeMetricFamily("cineweave_running_job_idle_seconds",
                                 "Seconds since the least recently updated running job of a model "
                                 "reported anything (a stuck job keeps its lease but stops reporting)",
                                 labels=["model"])
        for model, seconds in snap.get("running_idle", {}).items():
            idle.add_metric([model], seconds)
        pending = GaugeMetricFamily("cineweave_webhooks_pending",
                                    "Client webhooks in the outbox not yet delivered nor given up")
        pending.add_metric([], snap.get("webhooks_pending", 0))
        pending_age = GaugeMetricFamily("cineweave_webhooks_oldest_pending_seconds",
                                        "Age of the oldest undelivered client webhook")
        pending_age.add_metric([], snap.get("webhooks_oldest_pending_s", 0.0))
        yield from (jobs, depth, wait, idle, pending, pending_age)


GpuMemorySource = Callable[[], Mapping[str, Mapping[str, float]]]


class _GpuMemoryCollector(Collector):
    """GPU memory per replica, from the last ``{model: {replica: bytes}}`` its source returned."""

    def __init__(self, cached: _Cached) -> None:
        self._cached = cached

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("cineweave_replica_gpu_memory_bytes",
                                   "CUDA memory reserved by each model replica (absent without CUDA)",
                                   labels=["model", "replica"])
        data = self._cached.value or {}
        for model, replicas in data.items():
            for replica, used in replicas.items():
                family.add_metric([model, replica], float(used))
        yield family


class StageTimer:
    """Time one job run spends in each stage; ``enter`` closes the stage before it.

    The run starts in ``starting`` (claimed, input resolved, waiting for a replica) and each
    stage change (``generating``, ``encoding``, …) observes the time spent in the previous one
    under ``cineweave_job_stage_seconds{model, stage}``; ``close`` ends the last stage.
    """

    def __init__(self, histogram: Histogram, model: str, stage: str = "starting",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._histogram = histogram
        self._model = model
        self._clock = clock
        self._stage: str | None = stage
        self._since = clock()

    @property
    def stage(self) -> str | None:
        return self._stage

    def enter(self, stage: str | None) -> None:
        if not stage or stage == self._stage:
            return
        now = self._observe()
        self._stage, self._since = stage, now

    def close(self) -> None:
        if self._stage is not None:
            self._observe()
            self._stage = None

    def _observe(self) -> float:
        now = self._clock()
        if self._stage is not None:
            self._histogram.labels(self._model, self._stage).observe(max(0.0, now - self._since))
        return now


class Metrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter("cineweave_jobs_submitted_total", "Jobs accepted", ["model", "kind"], registry=r)
        self.rejected = Counter("cineweave_jobs_rejected_total", "Submissions refused", ["code"], registry=r)
        self.finished_total = Counter("cineweave_jobs_finished_total", "Jobs ended", ["model", "status"],
                                      registry=r)
        self.run_seconds = Histogram("cineweave_job_run_seconds", "Run time of finished jobs",
                                     ["model", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("cineweave_job_queue_seconds", "Wait before the first start",
                                       ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("cineweave_job_stage_seconds", "Time spent per stage",
                                       ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.overflow = Counter("cineweave_overflow_jobs_total", "Jobs sent to a provider",
                                ["provider", "reason"], registry=r)
        self.overflow_cost = Counter("cineweave_overflow_cost_usd_total", "Provider cost", ["provider"],
                                     registry=r)
        self.credits = Counter("cineweave_credits_moved_total", "Credits moved by ledger kind", ["kind"],
                               registry=r)
        self.webhooks = Counter("cineweave_webhook_deliveries_total", "Client webhook deliveries",
                                ["result"], registry=r)
        self._sources: dict[str, _Cached] = {}
        if snapshot is not None:
            self._sources["database"] = _Cached(snapshot, {}, "database")
            r.register(_DbCollector(self._sources["database"]))
        self._gpu_memory: _GpuMemoryCollector | None = None
        self._refresher: threading.Thread | None = None
        self._stop_refresh = threading.Event()
        self._refresh_lock = threading.Lock()

    def watch_gpu_memory(self, source: GpuMemorySource) -> None:
        """Export ``cineweave_replica_gpu_memory_bytes`` from ``source`` (replaces an earlier one).

        ``source`` may call the cluster: only the refresher calls it, never a scrape.
        """
        if self._gpu_memory is not None:
            self.registry.unregister(self._gpu_memory)
        self._sources["gpu_memory"] = _Cached(source, {}, "gpu_memory")
        self._gpu_memory = _GpuMemoryCollector(self._sources["gpu_memory"])
        self.registry.register(self._gpu_memory)

    # background refresh -----------------------------------------------------------------
    def refresh(self) -> None:
        """Call every slow source once and keep what it returned (blocking; never on a scrape)."""
        with self._refresh_lock:
            for cached in list(self._sources.values()):
                cached.refresh()

    def start_refresher(self, interval_s: float) -> None:
        """Refresh the cached gauges now and every ``interval_s`` on a thread of their own."""
        if self._refresher is not None and self._refresher.is_alive():
            return
        self._stop_refresh.clear()

        def loop() -> None:
            while True:
                self.refresh()
                if self._stop_refresh.wait(interval_s):
                    return

        self._refresher = threading.Thread(target=loop, name="metrics-refresh", daemon=True)
        self._refresher.start()

    def stop_refresher(self, timeout_s: float = 5.0) -> None:
        self._stop_refresh.set()
        if self._refresher is not None:
            self._refresher.join(timeout_s)
            self._refresher = None

    def stage_timer(self, model: str, stage: str = "starting") -> StageTimer:
        """A timer for one run of a job on ``model`` (the runner feeds it the executor's stages)."""
        return StageTimer(self.stage_seconds, model, stage)

    # runner hooks -------------------------------------------------------------------------
    def job_submitted(self, model: str, kind: str, credits: int) -> None:
        self.submitted.labels(model, kind).inc()
        self.credits.labels("reserve").inc(credits)

    def routed(self, job_id: str, event: Any) -> None:
        # An overflow job yields two ProviderEvents: the router's decision (no provider id yet),
        # counted here, then the adapter's with the provider's id and the cost.
        remote = bool(event.provider) and event.provider != "local"
        if remote and event.provider_job_id is None:
            self.overflow.labels(event.provider, event.reason or "").inc()
        if remote and event.cost_usd:
            self.overflow_cost.labels(event.provider).inc(event.cost_usd)

    def finished(self, job: Any) -> None:
        self.finished_total.labels(job.model, job.status).inc()
        if job.run_s is not None:
            self.run_seconds.labels(job.model, job.status).observe(job.run_s)
        if job.queue_s is not None and job.attempts <= 1:
            self.queue_seconds.labels(job.model).observe(job.queue_s)
        if job.credits_charged:
            self.credits.labels("capture").inc(job.credits_charged)
        if job.credits_refunded:
            self.credits.labels("refund").inc(job.credits_refunded)

    def render(self) -> bytes:
        return generate_latest(self.registry)
