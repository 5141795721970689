"""What both provider adapters share: the run lifecycle, cancel, deadlines, errors, costs.

A subclass implements ``_execute`` (an async generator of events that ends with a DoneEvent, or
raises a :class:`~serve.fallback.http.ProviderError`) and ``_cancel_remote``. The base class turns
exceptions into the ErrorEvent codes the runner understands:

============================ ========== ===================================================
code                         retryable  when
============================ ========== ===================================================
``content_policy``           no         the provider's safety filter blocked the output
``provider_unavailable``     yes        429/5xx/unreachable through every retry
``provider_timeout``         no         not finished within ``provider_timeout_s`` (the
                                        remote job is canceled; a retry would pay twice and
                                        make the client wait as long again)
``provider_failed``          mostly no  the provider failed the job, rejected the request,
                                        or deleted the output before we copied it
``provider_not_configured``  no         no API key / token / model name
``storage_failed``           yes        the output could not be written to our storage
``canceled``                 no         :meth:`cancel` was called (the cancel reaches the
                                        provider)
============================ ========== ===================================================
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from api.core.aio import wait_event
from api.core.events import ErrorEvent, ExecutorEvent
from api.core.executor import ExecutionRequest
from api.services.egress import EgressPolicy
from api.settings import Settings
from api.storage.base import Storage
from serve.fallback.http import Deadline, ProviderError, ProviderTimeout, Redactor, RetryPolicy
from serve.fallback.outputs import store_video

logger = logging.getLogger(__name__)

ClientFactory = Callable[[], httpx.AsyncClient]
CANCEL_TIMEOUT_S = 30.0


class RunCanceled(Exception):
    """:meth:`ProviderExecutor.cancel` was called for the running job."""


class StorageFailed(ProviderError):
    code, retryable = "storage_failed", True


@dataclass
class RunState:
    """One job at the provider, as the run loop, :meth:`cancel` and webhooks see it."""

    job_id: str
    model: str
    provider_job_id: str | None = None
    cancel_url: str | None = None
    latest: dict[str, Any] | None = None
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    remote_cancel_sent: bool = False
    finished: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    """The loop the run lives on: updates from other threads (webhooks) are handed to it."""


def default_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0),
                             limits=httpx.Limits(max_connections=50, max_keepalive_connections=10),
                             headers={"User-Agent": "cineweave-overflow/1"})


class ProviderExecutor:
    """Base of the overflow adapters; an :class:`~api.core.executor.Executor`."""

    provider: ClassVar[str] = ""

    def __init__(self, settings: Settings, storage: Storage, catalog: Any | None = None, *,
                 client_factory: ClientFactory | None = None, retry: RetryPolicy | None = None) -> None:
        self.settings = settings
        self.storage = storage
        if catalog is None:
            from models.catalog import Catalog

            catalog = Catalog.load(settings.models_dir)
        self.catalog = catalog
        self.retry = retry or RetryPolicy()
        self._client_factory = client_factory or default_client
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._runs: dict[str, RunState] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.redact = Redactor()
        # File URLs named by a provider's answer are checked like user input (provider base URLs
        # are configuration and are not).
        self.egress = EgressPolicy.from_settings(settings)

    # plumbing ------------------------------------------------------------------------------
    def client(self) -> httpx.AsyncClient:
        """One pooled client per event loop (a client cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop or self._http.is_closed:
            self._http = self._client_factory()
            self._http_loop = loop
        return self._http

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._http is not None and not self._http.is_closed:
            await self._http.aclose()
        self._http = None

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop any more (shutting down): nothing left to do it with
            coro.close()
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def output_prefix(request: ExecutionRequest) -> str:
        prefix = request.output_prefix or f"outputs/{request.user_id}/{request.job_id}/"
        return prefix if prefix.endswith("/") else prefix + "/"

    def provider_model(self, request: ExecutionRequest) -> str:
        spec = self.catalog.get(request.model)
        name = spec.overflow.model if spec is not None else None
        if not name:
            raise ProviderError(f"{request.model}: the catalog names no {self.provider} model "
                                "(overflow.model)", code="provider_not_configured")
        return name

    @staticmethod
    def duration_s(request: ExecutionRequest) -> float | None:
        data = request.input
        if data.get("duration"):
            return float(data["duration"])
        if data.get("num_frames") and data.get("fps"):
            return float(data["num_frames"]) / float(data["fps"])
        return None

    def cost_per_second(self) -> float:
        raise NotImplementedError

    def cost_usd(self, request: ExecutionRequest) -> float | None:
        duration = self.duration_s(request)
        return None if duration is None else round(duration * self.cost_per_second(), 4)

    async def store_output(self, request: ExecutionRequest, data: bytes, index: int = 0) -> ExecutorEvent:
        try:
            return await store_video(self.storage, self.output_prefix(request), data, name=str(index),
                                     fps_hint=request.input.get("fps"),
                                     duration_hint=self.duration_s(request))
        except Exception as exc:  # noqa: BLE001 - S3 down, disk full…: worth another attempt
            raise StorageFailed(f"storing the output failed: {type(exc).__name__}: {exc}") from exc

    # waiting and canceling -----------------------------------------------------------------
    async def pause(self, state: RunState, seconds: float, deadline: Deadline) -> bool:
        """Sleep up to ``seconds`` (within the deadline); True if woken early (a webhook).

        Raises :class:`RunCanceled` when a cancel arrived, :class:`ProviderTimeout` when the deadline
        passed.
        """
        if state.cancel_requested.is_set():
            raise RunCanceled()
        woke = False
        timeout = deadline.cap(seconds)
        if timeout > 0:
            woke = await wait_event(state.wake, timeout)  # not wait_for: it can swallow a cancel
        state.wake.clear()
        if state.cancel_requested.is_set():
            raise RunCanceled()
        if deadline.expired:
            raise ProviderTimeout(f"the provider did not finish within {deadline.seconds:g} s "
                                  "(provider_timeout_s)")
        return woke

    async def cancel(self, job_id: str) -> None:
        state = self._runs.get(job_id)
        if state is None:
            logger.debug("%s: cancel for job %s, which is not running here", self.provider, job_id)
            return
        logger.info("%s: canceling job %s (provider id %s)", self.provider, job_id, state.provider_job_id)
        state.cancel_requested.set()
        state.wake.set()
        if state.provider_job_id:
            await self.cancel_remote_once(state)

    async def cancel_remote_once(self, state: RunState) -> None:
        if state.remote_cancel_sent or state.finished or not state.provider_job_id:
            return
        state.remote_cancel_sent = True
        try:
            await asyncio.wait_for(self._cancel_remote(state, Deadline(CANCEL_TIMEOUT_S)), CANCEL_TIMEOUT_S)
            logger.info("%s: canceled %s at the provider", self.provider, state.provider_job_id)
        except Exception as exc:  # noqa: BLE001 - best effort: the job ends canceled on our side anyway
            logger.warning("%s: cancel of %s at the provider failed: %s", self.provider, state.provider_job_id,
                           self.redact(f"{type(exc).__name__}: {exc}"))

    async def _cancel_remote(self, state: RunState, deadline: Deadline) -> None:
        raise NotImplementedError

    # the run -------------------------------------------------------------------------------
    def _execute(self, request: ExecutionRequest, state: RunState,
                 deadline: Deadline) -> AsyncIterator[ExecutorEvent]:
        raise NotImplementedError

    def _register(self, state: RunState) -> None:
        self._runs[state.job_id] = state

    def _unregister(self, state: RunState) -> None:
        if self._runs.get(state.job_id) is state:
            del self._runs[state.job_id]

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        state = RunState(job_id=request.job_id, model=request.model, loop=asyncio.get_running_loop())
        deadline = Deadline(self.settings.provider_timeout_s)
        self._register(state)
        closed_early = True
        try:
            try:
                async for event in self._execute(request, state, deadline):
                    yield event
                closed_early = False
                return
            except RunCanceled:
                closed_early = False
                await self.cancel_remote_once(state)
                final = ErrorEvent("canceled", "canceled", retryable=False)
            except ProviderError as exc:
                closed_early = False
                if not state.finished:  # stop paying for a job we no longer wait for
                    await self.cancel_remote_once(state)
                message = self.redact(exc.message)
                logger.warning("%s: job %s failed: %s (%s)", self.provider, request.job_id, message, exc.code)
                final = ErrorEvent(exc.code, message, retryable=exc.retryable)
            except Exception as exc:  # noqa: BLE001 - a bug here must still end the job cleanly
                closed_early = False
                if not state.finished:
                    await self.cancel_remote_once(state)
                message = self.redact(f"{type(exc).__name__}: {exc}")
                logger.error("%s: job %s: unexpected error: %s", self.provider, request.job_id, message)
                final = ErrorEvent("provider_failed", message, retryable=False)
            yield final
        finally:
            self._unregister(state)
            if closed_early and not state.finished and state.provider_job_id and not state.remote_cancel_sent:
                # The consumer went away (task canceled, generator closed): do not await here.
                logger.info("%s: job %s abandoned; canceling %s at the provider", self.provider,
                            request.job_id, state.provider_job_id)
                self._spawn(self.cancel_remote_once(state))


__all__ = ["CANCEL_TIMEOUT_S", "ClientFactory", "ProviderExecutor", "RunCanceled", "RunState", "StorageFailed",
           "default_client"]
