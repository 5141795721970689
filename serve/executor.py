"""``RayExecutor``: the job layer's Executor port over Ray Serve deployment handles.

The API runs beside Ray (not as a Serve ingress) and reaches each model's deployment through a
handle; see docs/architecture in the README for why.

A generation belongs to the replica once it has the request (see :mod:`serve.generator`): when the
runner stops reading (shutdown, lost lease) this executor only lets go of the stream, and the job's
next attempt attaches to the same run. Only :meth:`RayExecutor.cancel` stops it, through the
deployment's ``cancel(job_id)``. Training keeps the older contract (leaving the stream cancels the
request; a retry resumes from the last checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from api.core.events import DoneEvent, ErrorEvent, ExecutorEvent, event_from_dict
from api.core.executor import ExecutionRequest
from serve.errors import classify
from serve.generator import adapter_set_id
from serve.messages import ReplicaRequest, unpack_events
from serve.postprocess import POSTPROCESS_MODEL

logger = logging.getLogger(__name__)

TRAINER_KEY = "__trainer__"
POSTPROCESS_KEY = "postprocess"
"""The handle of the post-processing deployment (``serve.postprocess``): jobs whose model is
``serve.postprocess.POSTPROCESS_MODEL`` (pipeline op steps) go there."""
CANCEL_TRIES = 8
"""Calls of a deployment's ``cancel`` until a replica owns the job (Serve routes each call to any
replica; with one replica the first call lands)."""
CANCEL_RETRY_S = 0.25
"""Pause between two cancel tries (each may reach another replica of the deployment)."""


class RayExecutor:
    """Runs jobs on the generator deployments; ``handles`` maps model id → DeploymentHandle."""

    def __init__(self, handles: dict[str, Any] | Callable[[str], Any | None]) -> None:
        self._handles = handles
        self._responses: dict[str, Any] = {}
        self._running: dict[str, tuple[Any, str]] = {}
        """Job id → (handle, method) of the runs this executor streams."""
        self.in_flight: dict[str, int] = {}

    def handle_for(self, model: str) -> Any | None:
        if callable(self._handles):
            return self._handles(model)
        return self._handles.get(model)

    def handle_for_request(self, request: ExecutionRequest) -> Any | None:
        """Training jobs go to the trainer deployment, post-processing jobs to the postprocess
        deployment, generations to their model's deployment."""
        if request.kind == "training":
            return self.handle_for(TRAINER_KEY)
        if request.model == POSTPROCESS_MODEL:
            return self.handle_for(POSTPROCESS_KEY)
        return self.handle_for(request.model)

    def serves(self, model: str) -> bool:
        return self.handle_for(model) is not None

    def jobs_ahead(self, model: str) -> int:
        return self.in_flight.get(model, 0)

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        handle = self.handle_for_request(request)
        if handle is None:
            yield ErrorEvent("not_deployed", f"{request.model} is not deployed on this cluster", retryable=True)
            return
        message = ReplicaRequest(job_id=request.job_id, attempt=request.attempt, user_id=request.user_id,
                                 model=request.model, task=request.task, input=request.input,
                                 output_prefix=request.output_prefix, resume=request.resume,
                                 adapter_set=adapter_set_id(request.input.get("loras") or []),
                                 queued_behind=request.queued_behind, stream_batches=True)
        payload = message.model_dump(mode="json")
        method = "train" if request.kind == "training" else "generate"
        options: dict[str, Any] = {"stream": True}
        if message.adapter_set:
            options["multiplexed_model_id"] = message.adapter_set
        self.in_flight[request.model] = self.in_flight.get(request.model, 0) + 1
        final: ExecutorEvent | None = None
        try:
            response = getattr(handle.options(**options), method).remote(payload)
            self._responses[request.job_id] = response
            self._running[request.job_id] = (handle, method)
            async for item in response:
                for wire in unpack_events(item):  # an item may carry several events (stream_batches)
                    event = event_from_dict(wire)
                    if event is None:  # a type this version does not know (a newer replica): skipped
                        continue
                    if isinstance(event, DoneEvent | ErrorEvent):
                        final = event
                        # Keep reading until the replica closes the stream (the rest of its batch):
                        # leaving early would cancel this request mid-batch.
                        continue
                    if final is None:
                        yield event
        except (asyncio.CancelledError, GeneratorExit):
            # The runner's task was canceled (API shutdown), or it closed this stream early (it lost
            # the job's lease): a generation goes on on its replica, for the job's next attempt to
            # attach to. Training still stops here (it resumes from its checkpoint).
            response = self._responses.get(request.job_id)
            if response is not None and method == "train":
                response.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a code the runner understands
            name = type(exc).__name__
            if name == "RequestCancelledError":
                final = ErrorEvent("canceled", "canceled", retryable=False)
            else:
                code, retryable = classify(exc)
                logger.warning("job %s on %s failed: %s: %s", request.job_id, request.model, name, exc)
                final = ErrorEvent(code, f"{name}: {exc}", retryable)
        finally:
            self._responses.pop(request.job_id, None)
            self._running.pop(request.job_id, None)
            self.in_flight[request.model] = max(0, self.in_flight.get(request.model, 1) - 1)
        yield final or ErrorEvent("incomplete", "the replica closed the stream without a result", retryable=True)

    async def cancel(self, job_id: str) -> None:
        """Stop the job on its replica: ``cancel(job_id)`` on the deployment (training: the request)."""
        handle, method = self._running.get(job_id, (None, ""))
        if handle is None:
            return
        logger.info("canceling job %s on its replica", job_id)
        if method == "train":
            response = self._responses.get(job_id)
            if response is not None:
                response.cancel()
            return
        for attempt in range(CANCEL_TRIES):
            if attempt:  # spaced: the replica running it may not have registered the request yet
                await asyncio.sleep(CANCEL_RETRY_S)
            try:
                if await handle.cancel.remote(job_id):
                    return
            except Exception as exc:  # noqa: BLE001 - the run then ends on its own; settlement still holds
                logger.warning("cancel of job %s failed: %s: %s", job_id, type(exc).__name__, exc)
                return
        logger.warning("no replica owned job %s to cancel (it finished, or another replica runs it)", job_id)
