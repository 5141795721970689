"""Outgoing client webhooks: a durable outbox, delivered by whichever API process claims a row.

Rows of ``webhook_deliveries`` are written by :func:`api.services.events.record_event` in the
transaction of the change they announce. Every API process runs a :class:`WebhookDeliverer`: it
claims due rows atomically (a conditional UPDATE that sets the claim owner and expiry; on
PostgreSQL the candidates are picked ``FOR UPDATE SKIP LOCKED``), POSTs each through the egress
policy, and marks it delivered, failed for good, or due again after an exponential backoff. Only a
job's oldest unfinished row is claimable (one POST per claim, order per job kept). It is
woken by the ``webhooks`` notification (no poll lag) and also polls slowly as a safety net; a claim
left by a process that died expires and the row is taken again (at-least-once; receivers dedupe by
``webhook-id``, which stays the same across retries).

The body is the job as it was when the event happened (Replicate sends the prediction's state at
the event): the row holds a snapshot of the job's columns taken in the event's transaction, and
it is rendered into the public job shape at each attempt, so output URLs are signed when sent.

Signatures follow Standard Webhooks (what Replicate uses), made with the ``standardwebhooks``
library: headers ``webhook-id``, ``webhook-timestamp`` (unix seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>``, where the key is
the base64-decoded part of the user's ``whsec_…`` secret.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.core.aio import wait_event
from api.db.engine import Database, is_postgres
from api.db.tables import Job, User, WebhookDelivery, utcnow
from api.metrics import Metrics
from api.services import egress
from api.services.events import job_from_snapshot
from api.services.notify import Notifier
from api.settings import Settings

logger = logging.getLogger(__name__)

RETRYABLE_4XX = frozenset({408, 429})
MAX_BACKOFF_S = 3600.0
PostFn = Callable[..., Awaitable[int]]


# signing ---------------------------------------------------------------------------------------
def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one delivery (Standard Webhooks, v1)."""
    return Webhook(secret).sign(webhook_id, datetime.fromtimestamp(timestamp, UTC), body.decode())


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Check a signature made by :func:`sign` (what a client does with our webhooks): the
    library's ``Webhook.verify`` (timestamp within 5 minutes, any v1 signature matching)."""
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except (WebhookVerificationError, ValueError, binascii.Error):
        return False
    return True


def backoff_s(settings: Settings, attempts: int) -> float:
    """Wait before the next try after ``attempts`` tries: base × 2^(attempts-1), capped."""
    return min(settings.webhook_backoff_s * (2 ** max(0, attempts - 1)), MAX_BACKOFF_S)


def outcome_of(status: int) -> str:
    """``delivered``, ``retry`` (5xx, 408, 429) or ``final`` (any other 4xx and odd codes)."""
    if 200 <= status < 400:
        return "delivered"
    if status >= 500 or status in RETRYABLE_4XX:
        return "retry"
    return "final"


def head_of_job() -> ColumnElement[bool]:
    """True for a row that is its job's oldest unfinished delivery (created_at, then id).

    A job's deliveries go in the order they were written: only this row is ever claimable, so a row
    backing off (or in flight in another process) holds back the ones written after it.
    """
    older = aliased(WebhookDelivery)
    return ~exists().where(
        older.job_id == WebhookDelivery.job_id, older.delivered_at.is_(None), older.failed_at.is_(None),
        or_(older.created_at < WebhookDelivery.created_at,
            and_(older.created_at == WebhookDelivery.created_at, older.id < WebhookDelivery.id)))


PipelineRenderer = Callable[[Job, WebhookDelivery | None], dict[str, Any]]
"""``(parent job, the outbox row or None) -> body``: a pipeline's webhook body."""


class ShapedView:
    """The webhook body of a job in the shape of the API that created it (``Job.api_shape``):
    a Replicate prediction for a prediction, a pipeline (``kind == "pipeline"``, with ``pipeline``
    given) in the pipeline shape, the native job otherwise."""

    def __init__(self, default: Callable[[Job], dict[str, Any]],
                 shapes: dict[str, Callable[[Job], dict[str, Any]]] | None = None,
                 pipeline: PipelineRenderer | None = None) -> None:
        self.default = default
        self.shapes = dict(shapes or {})
        self.pipeline = pipeline

    def __call__(self, job: Job) -> dict[str, Any]:
        if job.kind == "pipeline" and self.pipeline is not None:
            return self.pipeline(job, None)
        return self.shapes.get(job.api_shape or "native", self.default)(job)

    def render_delivery(self, job: Job, row: WebhookDelivery) -> dict[str, Any]:
        """One outbox row's body: a pipeline's knows which event it announces (``step.completed``
        carries the step)."""
        if job.kind == "pipeline" and self.pipeline is not None:
            return self.pipeline(job, row)
        return self(job)


class WebhookDeliverer:
    """Claims due outbox rows and delivers them; one per API process."""

    def __init__(self, db: Database, settings: Settings, render_job: Callable[[Job], dict[str, Any]], *,
                 notifier: Notifier | None = None, policy: egress.EgressPolicy | None = None,
                 metrics: Metrics | None = None, owner: str | None = None, post: PostFn | None = None) -> None:
        self.db = db
        self.settings = settings
        self.render_job = render_job
        self.policy = policy or egress.EgressPolicy.from_settings(settings)
        self.metrics = metrics
        self.id = owner or f"wh_{uuid.uuid4().hex[:12]}"
        self._post = post or egress.post
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_prune = 0.0
        self._stopping = False
        if notifier is not None:
            notifier.subscribe("webhooks", lambda _message: self.wake())

    @property
    def claim_s(self) -> float:
        """How long a claim holds: longer than one POST can take."""
        return max(self.settings.webhook_claim_s, self.settings.webhook_timeout_s * 3)

    # lifecycle ----------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_forever(), name=f"webhooks-{self.id}")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming; let the round in flight finish (bounded by ``grace_s``, default the POST
        timeout) so a delivery that reached the client is marked and not sent again, then cancel."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            grace = self.settings.webhook_timeout_s + 1.0 if grace_s is None else grace_s
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=grace)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # rows claimed and not finished are released, so another process need not wait for expiry
        await asyncio.to_thread(self._release_claims)

    async def join(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) until no row is due now or claimed: every delivery was tried (tests)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while await asyncio.to_thread(self._busy):
            if loop.time() > deadline:
                raise TimeoutError("webhook deliveries still pending")
            self.wake()
            await asyncio.sleep(0.02)

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()  # before the round: a wake that arrives during it is kept
            try:
                done = await self.run_once()
                if loop.time() - self._last_prune > self.settings.webhook_prune_interval_s:
                    self._last_prune = loop.time()
                    await asyncio.to_thread(self.prune)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the database may be briefly away; try again later
                logger.exception("webhook deliverer %s: a round failed", self.id)
                done = 0
            if done or self._stopping:
                continue  # there may be more due (or: stop now)
            try:
                wait_s = await asyncio.to_thread(self._next_due_in, self.settings.webhook_poll_s)
            except Exception:  # noqa: BLE001 - fall back to the slow poll
                wait_s = self.settings.webhook_poll_s
            await wait_event(self._wake, wait_s)

    # one round ------------------------------------------------------------------------------
    async def run_once(self, limit: int | None = None) -> int:
        """Claim the due rows (up to ``limit``, one per job) and deliver them; the number claimed.

        Jobs go in parallel; a job's next row is claimed in a later round, once this one is finished.
        """
        rows = await asyncio.to_thread(self.claim, limit or self.settings.webhook_batch)
        results = await asyncio.gather(*(self.deliver(row) for row in rows), return_exceptions=True)
        for failure in results:
            if isinstance(failure, Exception):  # e.g. the database away while marking: the claim expires
                logger.error("webhook delivery round: %s", type(failure).__name__, exc_info=failure)
        return len(rows)

    def claim(self, limit: int) -> list[WebhookDelivery]:
        """Atomically take up to ``limit`` due rows for this deliverer (counts one attempt each).

        At most one row per job (its oldest unfinished one): each claim covers a single POST, so it
        cannot expire while earlier rows of the same job are still being sent (no duplicates), and a
        retried row is delivered before the rows written after it (order kept).
        """
        now = utcnow()
        due = and_(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.failed_at.is_(None),
                   WebhookDelivery.next_attempt_at <= now,
                   or_(WebhookDelivery.claim_expires_at.is_(None), WebhookDelivery.claim_expires_at < now),
                   head_of_job())
        claimed: list[WebhookDelivery] = []
        query = (select(WebhookDelivery.id).where(due)
                 .order_by(WebhookDelivery.created_at, WebhookDelivery.id).limit(limit))
        with self.db.read() as session:  # nothing due (the usual case): no write transaction at all
            if session.execute(query.limit(1)).first() is None:
                return []
        with self.db.session() as session:
            if is_postgres(self.db.engine):
                query = query.with_for_update(skip_locked=True)
            ids = list(session.execute(query).scalars())
            for row_id in ids:
                result = session.execute(
                    update(WebhookDelivery).where(WebhookDelivery.id == row_id, due)
                    .values(claimed_by=self.id, claim_expires_at=now + timedelta(seconds=self.claim_s),
                            attempts=WebhookDelivery.attempts + 1)
                    .execution_options(synchronize_session=False))
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(row_id)
            rows = list(session.execute(select(WebhookDelivery).where(WebhookDelivery.id.in_(claimed))
                                        .order_by(WebhookDelivery.created_at)).scalars()) if claimed else []
            session.commit()
        return rows

    async def deliver(self, row: WebhookDelivery) -> str:
        """POST one claimed row and record the outcome: ``delivered``, ``retry`` or ``failed``."""
        secret = await asyncio.to_thread(self._secret, row.user_id)
        status: int | None = None
        error: str | None = None
        if secret is None:
            outcome, error = "final", "the user no longer exists"
        else:
            try:
                body = json.dumps(self.render(row), separators=(",", ":")).encode()
                stamp = int(utcnow().timestamp())
                headers = {"content-type": "application/json", "webhook-id": row.id,
                           "webhook-timestamp": str(stamp), "webhook-signature": sign(secret, row.id, stamp, body),
                           "user-agent": "cineweave-webhooks/1"}
            except Exception:  # noqa: BLE001 - a row that cannot be rendered never will be
                logger.exception("webhook %s for job %s: the payload could not be rendered", row.id, row.job_id)
                outcome, error = "final", "internal error rendering the payload"
            else:
                try:
                    status = await self._post(self.policy, row.url, content=body, headers=headers,
                                              timeout_s=self.settings.webhook_timeout_s)
                    outcome = outcome_of(status)
                    error = None if outcome == "delivered" else f"HTTP {status}"
                except egress.UrlNotAllowed:
                    outcome, error = "final", "url_not_allowed: the webhook URL is not allowed"
                except egress.EgressError as exc:  # refused for another stable reason: final too
                    outcome, error = "final", f"{exc.code}: the webhook URL was refused"
                except httpx.TransportError as exc:
                    outcome, error = "retry", f"network error ({type(exc).__name__})"
                except Exception as exc:  # noqa: BLE001 - unexpected: retried, bounded by max attempts
                    logger.exception("webhook %s for job %s: unexpected error", row.id, row.job_id)
                    outcome, error = "retry", f"internal error ({type(exc).__name__})"
        if outcome == "retry" and row.attempts >= self.settings.webhook_max_attempts:
            outcome = "exhausted"
        await asyncio.to_thread(self._finish, row, outcome, status, error)
        if outcome != "delivered":
            logger.warning("webhook %s (%s) for job %s, attempt %d: %s (%s)", row.id, row.event, row.job_id,
                           row.attempts, outcome, error)
        if self.metrics is not None and outcome != "retry":
            self.metrics.webhooks.labels({"delivered": "ok", "final": "rejected", "exhausted": "failed"}[outcome]).inc()
        return outcome

    def render(self, row: WebhookDelivery) -> dict[str, Any]:
        """The body of a row: its job snapshot rendered now (URLs signed at send time)."""
        job = job_from_snapshot(row.payload)
        render_delivery = getattr(self.render_job, "render_delivery", None)
        return render_delivery(job, row) if render_delivery is not None else self.render_job(job)

    # database ------------------------------------------------------------------------------
    def _secret(self, user_id: str) -> str | None:
        with self.db.read() as session:
            user = session.get(User, user_id)
            return user.webhook_secret if user is not None else None

    def _finish(self, row: WebhookDelivery, outcome: str, status: int | None, error: str | None) -> None:
        now = utcnow()
        values: dict[str, Any] = {"last_status": status, "last_error": error, "claimed_by": None,
                                  "claim_expires_at": None}
        if outcome == "delivered":
            values["delivered_at"] = now
        elif outcome == "retry":
            values["next_attempt_at"] = now + timedelta(seconds=backoff_s(self.settings, row.attempts))
        else:
            values["failed_at"] = now
        with self.db.session() as session:
            # only while the claim is still ours: one that expired and was taken again is not touched
            session.execute(update(WebhookDelivery)
                            .where(WebhookDelivery.id == row.id, WebhookDelivery.claimed_by == self.id)
                            .values(**values).execution_options(synchronize_session=False))
            session.commit()

    def _release_claims(self) -> None:
        with self.db.session() as session:
            session.execute(update(WebhookDelivery).where(WebhookDelivery.claimed_by == self.id)
                            .values(claimed_by=None, claim_expires_at=None)
                            .execution_options(synchronize_session=False))
            session.commit()

    def _busy(self) -> bool:
        now = utcnow()
        with self.db.read() as session:
            return session.execute(select(WebhookDelivery.id).where(
                WebhookDelivery.delivered_at.is_(None), WebhookDelivery.failed_at.is_(None), head_of_job(),
                or_(WebhookDelivery.next_attempt_at <= now, WebhookDelivery.claimed_by.is_not(None)))
                .limit(1)).first() is not None

    def _next_due_in(self, at_most_s: float) -> float:
        """Seconds until the earliest pending retry (or a claim expiry) is due, at most ``at_most_s``."""
        now = utcnow()
        with self.db.read() as session:
            # rows held back behind an earlier one of their job do not count (else: a busy loop)
            pending = and_(WebhookDelivery.delivered_at.is_(None), WebhookDelivery.failed_at.is_(None), head_of_job())
            soonest = [session.execute(select(func.min(column)).where(pending)).scalar()
                       for column in (WebhookDelivery.next_attempt_at, WebhookDelivery.claim_expires_at)]
        waits = [(t - now).total_seconds() for t in soonest if t is not None]
        return max(0.01, min([at_most_s, *waits]))

    def prune(self) -> int:
        """Forget finished rows (delivered or failed) older than ``webhook_retention_s``."""
        cutoff = utcnow() - timedelta(seconds=self.settings.webhook_retention_s)
        with self.db.session() as session:
            result = session.execute(delete(WebhookDelivery).where(
                or_(WebhookDelivery.delivered_at < cutoff, WebhookDelivery.failed_at < cutoff))
                .execution_options(synchronize_session=False))
            session.commit()
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
