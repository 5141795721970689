"""A scripted Executor for router tests: yields given events, optionally waiting on a gate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from api.core.events import DoneEvent, ErrorEvent, ExecutorEvent, ProgressEvent
from api.core.executor import ExecutionRequest

Script = Sequence[ExecutorEvent] | Callable[[ExecutionRequest], Sequence[ExecutorEvent]]


class ScriptedExecutor:
    """Yields ``script`` (or ``script(request)``) for each run; records runs and cancels.

    With ``gate`` set, each run waits (bounded by ``gate_timeout_s``) until the gate is set before
    its last event, so a test can hold runs "in flight". A canceled run ends with ``canceled``.
    """

    def __init__(self, script: Script | None = None, *, name: str = "scripted", gate: asyncio.Event | None = None,
                 gate_timeout_s: float = 10.0) -> None:
        self.name = name
        self.script = script if script is not None else [ProgressEvent(1, 1), DoneEvent({"ok": True})]
        self.gate = gate
        self.gate_timeout_s = gate_timeout_s
        self.runs: list[ExecutionRequest] = []
        self.cancels: list[str] = []
        self.active: set[str] = set()
        self._canceled: set[str] = set()

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        self.runs.append(request)
        self.active.add(request.job_id)
        try:
            events = list(self.script(request) if callable(self.script) else self.script)
            for index, event in enumerate(events):
                if index == len(events) - 1 and self.gate is not None:
                    await self._hold(request.job_id)
                if request.job_id in self._canceled:
                    yield ErrorEvent("canceled", "canceled")
                    return
                yield event
                await asyncio.sleep(0)
        finally:
            self.active.discard(request.job_id)

    async def _hold(self, job_id: str) -> None:
        """Wait (bounded) until the gate opens or the job is canceled."""
        assert self.gate is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gate_timeout_s
        while not self.gate.is_set() and job_id not in self._canceled:
            if loop.time() > deadline:
                raise TimeoutError(f"{self.name}: gate not opened in {self.gate_timeout_s}s")
            await asyncio.sleep(0.01)

    async def cancel(self, job_id: str) -> None:
        self.cancels.append(job_id)
        self._canceled.add(job_id)
