"""Job events: stored for replay (SSE ``Last-Event-ID``) and announced to in-process listeners.

The database is the source of truth; the bus only wakes listeners early. A listener in another
process (a second API replica) still sees every event by reading the table.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlmodel import Session

from api.db.tables import JobEvent

logger = logging.getLogger(__name__)

Listener = Callable[[str, str, dict[str, Any]], None]


def record_event(session: Session, job_id: str, type_: str, data: dict[str, Any]) -> JobEvent:
    event = JobEvent(job_id=job_id, type=type_, data=data)
    session.add(event)
    return event


def events_after(session: Session, job_id: str, after_id: int, limit: int = 500) -> list[JobEvent]:
    return list(session.execute(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id)
        .order_by(JobEvent.id).limit(limit)).scalars())


class EventBus:
    """Wakes SSE streams and feeds outgoing webhooks after a change is committed."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop listeners live on; ``publish`` from a worker thread is handed to it."""
        self._loop = loop

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish(self, job_id: str, type_: str, data: dict[str, Any]) -> None:
        """Call after commit, from any thread. Never raises: a broken listener must not break the runner."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._publish_now, job_id, type_, data)
            return
        self._publish_now(job_id, type_, data)

    def _publish_now(self, job_id: str, type_: str, data: dict[str, Any]) -> None:
        for waiter in list(self._waiters.get(job_id, ())):
            waiter.set()
        for listener in self._listeners:
            try:
                listener(job_id, type_, data)
            except Exception:  # noqa: BLE001 - isolation is the point
                logger.exception("event listener failed for job %s", job_id)

    def waiter(self, job_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters[job_id].add(event)
        return event

    def release(self, job_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(job_id, None)
