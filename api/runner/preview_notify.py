"""Pacing of the step previews a runner sends to the other API processes (PostgreSQL NOTIFY).

Each NOTIFY is a short ``pg_notify`` transaction on the shared database; a batch of fast steps
would otherwise make one per preview per job. :class:`PreviewThrottle` sends at most one per job
per ``interval_s`` (only the newest preview matters: a newer one replaces a waiting one, the
older is dropped) and at most ``concurrency`` at once across jobs, so previews hold at most that
many pool connections and never queue in front of the runner's lease and heartbeat writes
(those run on the runner's own threads and are never behind a preview).

The clock and the timer are injectable so the pacing is tested without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

PREVIEW_NOTIFY_INTERVAL_S = 0.25
PREVIEW_NOTIFY_CONCURRENCY = 2
JOBS_KEPT = 1024
"""Jobs whose last send time is remembered (a job's entry goes when it ends, or the oldest first)."""

Send = Callable[[str, dict[str, Any]], Awaitable[None]]
CallLater = Callable[[float, Callable[[], None]], Any]


class PreviewThrottle:
    """At most one send per job per ``interval_s``, newest wins, ``concurrency`` sends at once.

    Lives on one event loop (the runner's): :meth:`offer` and :meth:`forget` are called on it.
    ``send(job_id, notice)`` does the NOTIFY (off the loop) and must not raise.
    """

    def __init__(self, send: Send, *, interval_s: float = PREVIEW_NOTIFY_INTERVAL_S,
                 concurrency: int = PREVIEW_NOTIFY_CONCURRENCY, clock: Callable[[], float] = time.monotonic,
                 call_later: CallLater | None = None) -> None:
        self._send = send
        self.interval_s = interval_s
        self._concurrency = max(1, concurrency)
        self._clock = clock
        self._call_later = call_later
        self._pending: dict[str, dict[str, Any]] = {}  # job id -> the newest notice not yet sent
        self._last: dict[str, float] = {}  # job id -> when its last send began (clock time)
        self._sending: set[str] = set()
        self._timers: dict[str, Any] = {}  # job id -> the timer that sends its pending notice
        self._tasks: set[asyncio.Task[None]] = set()
        self._semaphore: asyncio.Semaphore | None = None
        self.dropped = 0  # notices replaced by a newer one before they were sent

    def offer(self, job_id: str, notice: dict[str, Any]) -> None:
        """The job's newest preview notice: sent now if the job's interval has passed and nothing of
        it is in flight, else kept (replacing an older waiting one) until then."""
        if job_id in self._pending:
            self.dropped += 1
        self._pending[job_id] = notice
        self._schedule(job_id)

    def forget(self, job_id: str) -> None:
        """The job ended: its waiting notice is dropped (a send in flight finishes)."""
        self._pending.pop(job_id, None)
        self._last.pop(job_id, None)
        timer = self._timers.pop(job_id, None)
        if timer is not None and hasattr(timer, "cancel"):
            timer.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._sending)

    def pending(self, job_id: str) -> dict[str, Any] | None:
        return self._pending.get(job_id)

    async def drain(self) -> None:
        """Wait for the sends started so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _schedule(self, job_id: str) -> None:
        if job_id in self._sending or job_id in self._timers or job_id not in self._pending:
            return  # the send in flight (or the timer) picks the newest up when it ends
        last = self._last.get(job_id)
        wait = 0.0 if last is None else last + self.interval_s - self._clock()
        if wait > 0:
            call_later = self._call_later or asyncio.get_running_loop().call_later
            self._timers[job_id] = call_later(wait, lambda: self._due(job_id))
            return
        self._start(job_id)

    def _due(self, job_id: str) -> None:
        self._timers.pop(job_id, None)
        self._schedule(job_id)

    def _start(self, job_id: str) -> None:
        notice = self._pending.pop(job_id)
        self._sending.add(job_id)
        self._last.pop(job_id, None)
        self._last[job_id] = self._clock()  # reserved now: a newer preview waits its interval
        while len(self._last) > JOBS_KEPT:
            del self._last[next(iter(self._last))]
        task = asyncio.get_running_loop().create_task(self._run(job_id, notice), name=f"preview-notify-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job_id: str, notice: dict[str, Any]) -> None:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self._concurrency)
        try:
            async with self._semaphore:
                await self._send(job_id, notice)
        except Exception:  # noqa: BLE001 - a preview must never break the runner
            logger.debug("preview NOTIFY of job %s failed", job_id, exc_info=True)
        finally:
            self._sending.discard(job_id)
            self._schedule(job_id)
