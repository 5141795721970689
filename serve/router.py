"""``OverflowRouter``: per job, run locally or at the model's overflow provider, and say why.

The router is the Executor the runner drives. For each job it decides:

- the model is remote-only (``overflow.remote_only``, e.g. Veo) → its provider, reason ``remote_only``;
- the estimated wait for a local run (jobs ahead × run time) exceeds the spec's
  ``limits.max_wait_s`` → the provider, reason ``wait``;
- a post-processing job (model ``postprocess``, a pipeline's op step: no catalog spec) → always
  local, never a provider (no wait or capacity overflow);
- otherwise local (reason ``local``); if the local run then fails for lack of capacity (an
  ErrorEvent whose code is in :data:`CAPACITY_CODES`, before any output) → the provider, reason
  ``capacity``.

Overflow for ``wait``/``capacity`` happens only when the spec lists the condition in
``overflow.when`` and the provider is configured. ``settings.overflow_enabled = False`` turns all
overflow off: local models always run locally, and remote-only models fail at once with the
non-retryable code ``overflow_disabled``.

The first event of every run is a ProviderEvent (``provider="local"`` or the provider's name, and
the reason) so the job records which way it went; the provider's own ProviderEvent (its job id and
cost) follows with the same reason.

The wait estimate comes from a :class:`WaitEstimator`. :class:`InFlightWaitEstimator` (the default)
counts the local runs this router has in flight per model and learns a moving average of their run
times (the spec's ``measured_run_s`` until it has one). The API wires it: it builds the router with
:func:`build_overflow_router` — the RayExecutor as ``local``, :func:`serve.fallback.make_providers`
as ``providers`` and ``InFlightWaitEstimator(catalog_slots(catalog))`` — and passes the router to
``create_app`` as its executor; the router is also the receiver of ``POST /v1/webhooks/replicate``.
Give it a better estimator (e.g. Serve queue lengths) by passing ``wait_estimator``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from api.core.events import DoneEvent, ErrorEvent, ExecutorEvent, OutputEvent, ProviderEvent
from api.core.executor import REATTACH_KEY, ExecutionRequest, Executor, ProviderWebhookReceiver
from api.settings import Settings
from api.storage.base import Storage
from serve.postprocess import POSTPROCESS_MODEL

logger = logging.getLogger(__name__)

LOCAL = "local"
#: Local failures that mean "no room here", not "this job is broken" (see serve.errors.classify).
CAPACITY_CODES = frozenset({"capacity", "not_deployed"})


class WaitEstimator(Protocol):
    def jobs_ahead(self, model: str) -> int:
        """How many local runs a new job for ``model`` would wait behind."""
        ...

    def run_seconds(self, model: str) -> float | None:
        """A local run's typical duration, or None to use the spec's ``measured_run_s``."""
        ...


@runtime_checkable
class RunTracker(Protocol):
    """Optional: an estimator that wants to hear about the local runs the router starts."""

    def started(self, model: str) -> None: ...

    def finished(self, model: str, run_s: float | None) -> None: ...


def catalog_slots(catalog: Any) -> Callable[[str], int]:
    """Local runs a model serves at once: max replicas × batch size (1 for unknown models)."""

    def slots(model: str) -> int:
        spec = catalog.get(model)
        if spec is None:
            return 1
        return max(1, spec.serving.max_replicas * max(1, spec.serving.max_batch_size))

    return slots


class InFlightWaitEstimator:
    """Counts local runs in flight per model; learns their run time as a moving average.

    ``jobs_ahead`` is ``in_flight // slots``: with one slot and two runs in flight a new job waits
    for about two run times.
    """

    def __init__(self, slots: Callable[[str], int] | int = 1, alpha: float = 0.3) -> None:
        self._slots = slots
        self.alpha = alpha
        self._in_flight: Counter[str] = Counter()
        self._run_s: dict[str, float] = {}

    def slots(self, model: str) -> int:
        return max(1, self._slots(model) if callable(self._slots) else self._slots)

    def in_flight(self, model: str) -> int:
        return self._in_flight[model]

    def jobs_ahead(self, model: str) -> int:
        return self._in_flight[model] // self.slots(model)

    def run_seconds(self, model: str) -> float | None:
        return self._run_s.get(model)

    def started(self, model: str) -> None:
        self._in_flight[model] += 1

    def finished(self, model: str, run_s: float | None) -> None:
        self._in_flight[model] = max(0, self._in_flight[model] - 1)
        if run_s is not None and run_s >= 0:
            previous = self._run_s.get(model)
            self._run_s[model] = run_s if previous is None else (1 - self.alpha) * previous + self.alpha * run_s


@dataclass(frozen=True)
class Route:
    target: str
    """``"local"`` or a provider name."""
    reason: str
    """``local``, ``remote_only``, ``wait`` or ``capacity``."""
    estimated_wait_s: float | None = None


@dataclass
class _Active:
    executor: Executor | None
    canceled: bool = False


class OverflowRouter:
    """An Executor (and ProviderWebhookReceiver) that routes each job local or to a provider."""

    def __init__(self, local: Executor | None, providers: Mapping[str, Executor], catalog: Any,
                 settings: Settings, wait_estimator: WaitEstimator | None = None) -> None:
        self.local = local
        self.providers = dict(providers)
        self.catalog = catalog
        self.settings = settings
        self.estimator: WaitEstimator = wait_estimator or InFlightWaitEstimator(catalog_slots(catalog))
        self._active: dict[str, _Active] = {}
        self.decisions: Counter[tuple[str, str]] = Counter()

    # the policy ------------------------------------------------------------------------------
    def _overflow_target(self, model: str, condition: str) -> str | None:
        """The provider to overflow to under ``condition``, if allowed and configured."""
        spec = self.catalog.get(model)
        if spec is None or not self.settings.overflow_enabled:
            return None
        provider = spec.overflow.provider
        if provider and condition in spec.overflow.when and provider in self.providers:
            return provider
        return None

    def estimated_wait_s(self, model: str) -> float | None:
        spec = self.catalog.get(model)
        run_s = self.estimator.run_seconds(model) or (spec.measured_run_s if spec is not None else None)
        if not run_s:
            return None
        return self.estimator.jobs_ahead(model) * run_s

    def decide(self, request: ExecutionRequest) -> Route | ErrorEvent:
        """Where the job goes (or why it cannot go anywhere)."""
        if request.model == POSTPROCESS_MODEL:
            # a pipeline's post-processing step: no catalog spec, no provider runs it: always local
            if self.local is None:
                return ErrorEvent("local_unavailable", "post-processing runs only on the local cluster, and no "
                                  "local executor is configured", retryable=False)
            return Route(LOCAL, "reattach" if request.resume.get(REATTACH_KEY) == LOCAL else "local")
        spec = self.catalog.get(request.model)
        if spec is not None and spec.remote_only:
            provider = spec.overflow.provider or ""
            if not self.settings.overflow_enabled:
                return ErrorEvent("overflow_disabled", f"{request.model} runs only at {provider}, and overflow "
                                  "to providers is turned off (CINEWEAVE_OVERFLOW_ENABLED)", retryable=False)
            if provider not in self.providers:
                return ErrorEvent("provider_not_configured", f"{request.model} runs only at {provider}, "
                                  "which is not configured (API key missing)", retryable=False)
            return Route(provider, "remote_only")
        if self.local is not None and request.resume.get(REATTACH_KEY) == LOCAL:
            # an earlier attempt's run goes on (or is done) on a replica: attach to it there
            return Route(LOCAL, "reattach", self.estimated_wait_s(request.model))
        if self.local is None:
            target = self._overflow_target(request.model, "capacity")
            if target:
                return Route(target, "capacity")
            return ErrorEvent("local_unavailable", "no local executor is configured and the model has no "
                              "usable overflow provider", retryable=False)
        wait = self.estimated_wait_s(request.model)
        max_wait = spec.limits.max_wait_s if spec is not None else None
        if wait is not None and max_wait is not None and wait > max_wait:
            target = self._overflow_target(request.model, "wait")
            if target:
                return Route(target, "wait", wait)
        return Route(LOCAL, "local", wait)

    # the Executor port -------------------------------------------------------------------------
    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        decision = self.decide(request)
        if isinstance(decision, ErrorEvent):
            logger.info("job %s (%s): not routed: %s", request.job_id, request.model, decision.code)
            yield decision
            return
        active = _Active(executor=None)
        self._active[request.job_id] = active
        try:
            route = decision
            if route.target == LOCAL:
                failure: ErrorEvent | None = None
                async with contextlib.aclosing(self._run_local(request, active)) as local_events:
                    async for event in local_events:
                        if isinstance(event, _CapacityFailure):
                            failure = event.error
                            break
                        yield event
                if failure is None:
                    return
                target = self._overflow_target(request.model, "capacity")
                if target is None:  # checked before, but settings or providers may have changed
                    yield failure
                    return
                logger.info("job %s (%s): local capacity failed (%s); overflowing to %s", request.job_id,
                            request.model, failure.code, target)
                route = Route(target, "capacity")
                if active.canceled:
                    yield ErrorEvent("canceled", "canceled", retryable=False)
                    return
            async for event in self._run_provider(request, route, active):
                yield event
        finally:
            if self._active.get(request.job_id) is active:
                del self._active[request.job_id]

    async def _run_local(self, request: ExecutionRequest, active: _Active) -> AsyncIterator[Any]:
        assert self.local is not None
        tracker = self.estimator if isinstance(self.estimator, RunTracker) else None
        self.decisions[(LOCAL, "local")] += 1
        # Counted before the first yield, with no await since decide(): concurrent decisions see it.
        if tracker is not None:
            tracker.started(request.model)
        active.executor = self.local
        started = time.monotonic()
        run_s: float | None = None
        produced_output = False
        try:
            yield ProviderEvent(LOCAL, None, "local", None)
            async with contextlib.aclosing(self.local.run(request)) as events:
                async for event in events:
                    if (isinstance(event, ErrorEvent) and event.code in CAPACITY_CODES and not produced_output
                            and not active.canceled and self._overflow_target(request.model, "capacity")):
                        yield _CapacityFailure(event)
                        return
                    if isinstance(event, OutputEvent):
                        produced_output = True
                    if isinstance(event, DoneEvent):
                        run_s = time.monotonic() - started
                    yield event
        finally:
            if tracker is not None:
                tracker.finished(request.model, run_s)

    async def _run_provider(self, request: ExecutionRequest, route: Route,
                            active: _Active) -> AsyncIterator[ExecutorEvent]:
        provider = self.providers[route.target]
        active.executor = provider
        self.decisions[(route.target, route.reason)] += 1
        logger.info("job %s (%s) → %s (%s%s)", request.job_id, request.model, route.target, route.reason,
                    f", estimated local wait {route.estimated_wait_s:.1f}s" if route.estimated_wait_s else "")
        yield ProviderEvent(route.target, None, route.reason, None)
        async with contextlib.aclosing(provider.run(request)) as events:
            async for event in events:
                if isinstance(event, ProviderEvent) and event.reason is None:
                    event = dataclasses.replace(event, reason=route.reason)
                yield event

    async def cancel(self, job_id: str) -> None:
        active = self._active.get(job_id)
        if active is None:
            return
        active.canceled = True
        if active.executor is not None:
            await active.executor.cancel(job_id)

    async def handle_webhook(self, provider: str, headers: dict[str, str], body: bytes) -> bool:
        receiver = self.providers.get(provider)
        if isinstance(receiver, ProviderWebhookReceiver):
            return await receiver.handle_webhook(provider, headers, body)
        return False

    async def aclose(self) -> None:
        for executor in self.providers.values():
            closer = getattr(executor, "aclose", None)
            if closer is not None:
                await closer()


def build_overflow_router(local: Executor | None, catalog: Any, settings: Settings,
                          storage: Storage | None = None) -> OverflowRouter:
    """The router the API runs: ``local`` plus every configured provider, the in-flight estimator.

    ``storage`` defaults to the one the settings describe (as ``create_app`` builds it), so the
    providers write outputs where the API serves them from.
    """
    from api.storage.base import make_storage
    from serve.fallback import make_providers

    if storage is None:
        storage = make_storage(settings.resolved_storage_url(), signing_secret=settings.resolved_signing_secret(),
                               public_base_url=settings.public_url or f"http://{settings.host}:{settings.port}")
    providers = make_providers(settings, storage, catalog)
    logger.info("overflow: %s (overflow %s)", ", ".join(sorted(providers)) or "no provider configured",
                "on" if settings.overflow_enabled else "off")
    return OverflowRouter(local, providers, catalog, settings, InFlightWaitEstimator(catalog_slots(catalog)))


@dataclass(frozen=True)
class _CapacityFailure:
    """Internal marker: the local run failed for lack of capacity (not passed to the runner)."""

    error: ErrorEvent


__all__ = ["CAPACITY_CODES", "InFlightWaitEstimator", "OverflowRouter", "Route", "RunTracker", "WaitEstimator",
           "build_overflow_router", "catalog_slots"]
