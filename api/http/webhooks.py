"""Outgoing client webhooks, signed the way Replicate signs its own.

Headers: ``webhook-id`` (stable across retries of one delivery), ``webhook-timestamp`` (unix
seconds) and ``webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>`` where
key is the base64-decoded part of the user's ``whsec_…`` secret. Deliveries go through a queue and
worker tasks, so the runner never waits on a client's server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from api.db.engine import Database
from api.db.tables import Job, User
from api.metrics import Metrics
from api.settings import Settings

logger = logging.getLogger(__name__)

BUS_TO_WEBHOOK = {"start": "start", "output": "output", "logs": "logs", "completed": "completed"}


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """Check a signature made by :func:`sign` (what a client does with our webhooks)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    webhook_id, stamp, signatures = (lowered.get("webhook-id"), lowered.get("webhook-timestamp"),
                                     lowered.get("webhook-signature", ""))
    if not webhook_id or not stamp or not stamp.isdigit():
        return False
    if abs((now or time.time()) - int(stamp)) > tolerance_s:
        return False
    expected = sign(secret, webhook_id, int(stamp), body)
    return any(hmac.compare_digest(expected, part) for part in signatures.split())


class _Retryable(Exception):
    pass


@dataclass(frozen=True)
class Delivery:
    job_id: str
    event: str
    webhook_id: str


class WebhookDispatcher:
    """Turns bus events into signed POSTs to the job's webhook, filtered by its event filter."""

    def __init__(self, db: Database, settings: Settings, render_job: Callable[[Job], dict[str, Any]],
                 transport: httpx.AsyncBaseTransport | None = None, workers: int = 4,
                 metrics: Metrics | None = None) -> None:
        self.db = db
        self.settings = settings
        self.render_job = render_job
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=10_000)
        self._transport = transport
        self._workers_n = workers
        self._workers: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self.delivered: list[tuple[str, str, int]] = []
        self.metrics = metrics

    def on_event(self, job_id: str, type_: str, _data: dict[str, Any]) -> None:
        event = BUS_TO_WEBHOOK.get(type_)
        if event is None:
            return
        try:
            self._queue.put_nowait(Delivery(job_id, event, f"msg_{uuid.uuid4().hex}"))
        except asyncio.QueueFull:
            logger.error("webhook queue full; dropping %s for job %s", event, job_id)

    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, transport=self._transport,
                                         follow_redirects=False)
        self._workers = [asyncio.create_task(self._work(), name=f"webhooks-{i}")
                         for i in range(self._workers_n)]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def join(self, timeout_s: float = 10.0) -> None:
        """Wait until every queued delivery was attempted (tests)."""
        await asyncio.wait_for(self._queue.join(), timeout=timeout_s)

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._deliver(delivery)
            except Exception:  # noqa: BLE001 - one bad delivery must not stop the worker
                logger.exception("webhook delivery for job %s failed", delivery.job_id)
            finally:
                self._queue.task_done()

    async def _deliver(self, delivery: Delivery) -> None:
        with self.db.read() as session:
            job = session.get(Job, delivery.job_id)
            user = session.get(User, job.user_id) if job else None
        if job is None or user is None or not job.webhook:
            return
        wanted = job.webhook_events_filter or ["start", "output", "logs", "completed"]
        if delivery.event not in wanted:
            return
        body = json.dumps(self.render_job(job), separators=(",", ":")).encode()
        assert self._client is not None
        status = 0
        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(self.settings.webhook_max_attempts),
                    wait=wait_exponential(multiplier=self.settings.webhook_backoff_s, max=60),
                    retry=retry_if_exception_type((_Retryable, httpx.TransportError)), reraise=True):
                with attempt:
                    stamp = int(time.time())
                    headers = {"content-type": "application/json", "webhook-id": delivery.webhook_id,
                               "webhook-timestamp": str(stamp),
                               "webhook-signature": sign(user.webhook_secret, delivery.webhook_id, stamp, body),
                               "user-agent": "cineweave-webhooks/1"}
                    response = await self._client.post(job.webhook, content=body, headers=headers)
                    status = response.status_code
                    if status == 429 or status >= 500:
                        raise _Retryable(f"HTTP {status}")
            self.delivered.append((job.id, delivery.event, status))
            outcome = "ok" if status < 400 else "rejected"
        except (_Retryable, httpx.TransportError) as exc:
            outcome = "failed"
            logger.warning("webhook %s for job %s gave up: %s", delivery.event, job.id, exc)
        if self.metrics is not None:
            self.metrics.webhooks.labels(outcome).inc()
