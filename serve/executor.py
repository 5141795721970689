"""``RayExecutor``: the job layer's Executor port over Ray Serve deployment handles.

The API runs beside Ray (not as a Serve ingress) and reaches each model's deployment through a
handle; see docs/architecture in the README for why.
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

logger = logging.getLogger(__name__)

TRAINER_KEY = "__trainer__"


class RayExecutor:
    """Runs jobs on the generator deployments; ``handles`` maps model id → DeploymentHandle."""

    def __init__(self, handles: dict[str, Any] | Callable[[str], Any | None]) -> None:
        self._handles = handles
        self._responses: dict[str, Any] = {}
        self.in_flight: dict[str, int] = {}

    def handle_for(self, model: str) -> Any | None:
        if callable(self._handles):
            return self._handles(model)
        return self._handles.get(model)

    def handle_for_request(self, request: ExecutionRequest) -> Any | None:
        """Training jobs go to the trainer deployment; generations to their model's deployment."""
        return self.handle_for(TRAINER_KEY if request.kind == "training" else request.model)

    def serves(self, model: str) -> bool:
        return self.handle_for(model) is not None

    def jobs_ahead(self, model: str) -> int:
        return self.in_flight.get(model, 0)

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        handle = self.handle_for_request(request)
        if handle is None:
            yield ErrorEvent("not_deployed", f"{request.model} is not deployed on this cluster", retryable=True)
            return
        payload = {"job_id": request.job_id, "user_id": request.user_id, "model": request.model,
                   "input": request.input, "output_prefix": request.output_prefix, "task": request.task,
                   "attempt": request.attempt, "resume": request.resume,
                   "adapter_set": adapter_set_id(request.input.get("loras") or [])}
        method = "train" if request.kind == "training" else "generate"
        options: dict[str, Any] = {"stream": True}
        if payload["adapter_set"]:
            options["multiplexed_model_id"] = payload["adapter_set"]
        self.in_flight[request.model] = self.in_flight.get(request.model, 0) + 1
        final: ExecutorEvent | None = None
        try:
            response = getattr(handle.options(**options), method).remote(payload)
            self._responses[request.job_id] = response
            async for item in response:
                event = event_from_dict(item)
                if isinstance(event, DoneEvent | ErrorEvent):
                    final = event
                    # Keep reading until the replica closes the stream (the rest of its batch):
                    # leaving early would cancel this request mid-batch.
                    continue
                if final is None:
                    yield event
        except (asyncio.CancelledError, GeneratorExit):
            # The runner's task was canceled, or it closed this stream early (it lost the job's
            # lease to another runner): stop the request on the replica too, not leave it running.
            response = self._responses.get(request.job_id)
            if response is not None:
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
            self.in_flight[request.model] = max(0, self.in_flight.get(request.model, 1) - 1)
        yield final or ErrorEvent("incomplete", "the replica closed the stream without a result", retryable=True)

    async def cancel(self, job_id: str) -> None:
        response = self._responses.get(job_id)
        if response is not None:
            logger.info("canceling job %s on its replica", job_id)
            response.cancel()
