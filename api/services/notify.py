"""One cross-process signal: PostgreSQL ``LISTEN/NOTIFY``, or in-process on SQLite.

A change is announced with :func:`signal` *inside* the transaction that makes it:

- on PostgreSQL it runs ``SELECT pg_notify('cineweave_events', payload)``, which the server
  delivers to every listening connection exactly when (and only if) the transaction commits, so a
  listener never wakes before the row it is told about is visible;
- on SQLite (one process) it queues the signal on the session and hands it to this process's
  :class:`Notifier` after the commit.

Each API process runs one :class:`Notifier`: a listener task on its own autocommit psycopg
connection (reconnecting with a bounded backoff) that dispatches each notification to the
callbacks subscribed for its kind. Kinds in use: ``events`` (a job event was stored: wakes local
SSE streams through the :class:`EventBus`, and the runner: a job queued, requeued with a backoff
or handed back, a cancel requested) and ``webhooks`` (the outbox has a new row: wakes the
deliverer). The committing process hears its own signals at once, after the commit, on
PostgreSQL too (not through the server). The signal only wakes readers; the tables stay the
truth, so a lost notification costs latency (readers also poll slowly), never data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from api.db.engine import Database, is_postgres

logger = logging.getLogger(__name__)

CHANNEL = "cineweave_events"
LISTENER_NAME = "cineweave-notify"  # application_name of the listening connection (pg_stat_activity)
MAX_PAYLOAD_BYTES = 7000  # PostgreSQL refuses payloads of 8000 bytes or more
_PENDING = "cineweave_notify_pending"
ORIGIN = "o"  # payload key: the token of the notifier whose process sent it (PostgreSQL)

Callback = Callable[[dict[str, Any]], None]

# SQLite: the notifier of each database in this process, keyed by its connection pool (shared by
# the engine and its execution-option variants); weak: a disposed app leaves nothing behind
_local: weakref.WeakKeyDictionary[Pool, Notifier] = weakref.WeakKeyDictionary()


def signal(session: Session, kind: str, payload: dict[str, Any] | None = None) -> None:
    """Announce ``kind`` (with a small JSON ``payload``) when ``session``'s transaction commits.

    The process that commits hears its own signal right after the commit, without a round trip
    through the server (that is what wakes its runner for a job it just queued); on PostgreSQL the
    notification also carries the origin notifier's token, so that notifier skips its own copy
    when the server delivers it back.
    """
    message = {"k": kind, **(payload or {})}
    bind = session.get_bind()
    engine = bind.engine if hasattr(bind, "engine") else bind
    if is_postgres(engine):  # type: ignore[arg-type]
        local = _local.get(engine.pool)  # type: ignore[union-attr]
        wire = {**message, ORIGIN: local.origin} if local is not None else message
        body = json.dumps(wire, separators=(",", ":"))
        if len(body.encode()) > MAX_PAYLOAD_BYTES:
            body = json.dumps({"k": kind})  # no origin: its own listener dispatches it again (harmless)
        session.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": body})
    session.info.setdefault(_PENDING, []).append((engine.pool, message))  # type: ignore[union-attr]


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    for pool, message in pending or ():
        notifier = _local.get(pool)
        if notifier is not None:
            notifier.dispatch_threadsafe(message)


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)


def call_on_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` on ``loop``: at once when called on it, else handed over thread-safely
    (nothing when the loop is gone)."""
    if loop is None or loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn(*args)
    else:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(fn, *args)


def libpq_url(db: Database) -> str:
    """The database URL as psycopg wants it (no SQLAlchemy driver suffix)."""
    return make_url(str(db.engine.url.render_as_string(hide_password=False))).set(
        drivername="postgresql").render_as_string(hide_password=False)


class Notifier:
    """This process's end of the signal: ``subscribe(kind, callback)``, ``publish(kind, payload)``,
    ``start()``, ``stop()``.

    Callbacks run on the event loop the notifier was started on, must be quick and never block;
    a failing callback is logged and does not affect the others. On (re)connect every subscriber
    gets ``{"k": kind, "reconnected": True}`` because notifications sent meanwhile were missed.
    """

    def __init__(self, db: Database, *, backoff_s: float = 0.2, max_backoff_s: float = 10.0,
                 connect_timeout_s: float = 10.0, ping_s: float = 30.0, ping_timeout_s: float = 10.0) -> None:
        self.db = db
        self.postgres = is_postgres(db.engine)
        self._subscribers: dict[str, list[Callback]] = defaultdict(list)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._connect_timeout_s = connect_timeout_s
        self._ping_s = ping_s  # a quiet listener checks its connection this often (a half-open one is noticed)
        self._ping_timeout_s = ping_timeout_s
        self.received = 0  # notifications dispatched (tests, metrics)
        self.origin = uuid.uuid4().hex[:12]  # marks this process's own notifications (skipped when echoed)

    def subscribe(self, kind: str, callback: Callback) -> None:
        self._subscribers[kind].append(callback)

    def unsubscribe(self, kind: str, callback: Callback) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers[kind].remove(callback)

    # lifecycle ----------------------------------------------------------------------------
    async def start(self, ready_timeout_s: float = 10.0) -> None:
        """Bind to the running loop; on PostgreSQL start listening (waits, bounded, until it is)."""
        self._loop = asyncio.get_running_loop()
        _local[self.db.engine.pool] = self  # this process's own signals, dispatched after their commit
        if not self.postgres:
            return
        self._task = asyncio.create_task(self._listen_forever(), name="notify-listener")
        try:
            await asyncio.wait_for(self._listening.wait(), timeout=ready_timeout_s)
        except TimeoutError:
            logger.warning("notify: not listening after %.0fs; readers fall back to polling", ready_timeout_s)

    async def stop(self) -> None:
        if _local.get(self.db.engine.pool) is self:
            _local.pop(self.db.engine.pool, None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def publish(self, kind: str, payload: dict[str, Any] | None = None) -> None:
        """Announce ``kind`` outside a transaction (after a commit), from any thread.

        On PostgreSQL this is one short ``pg_notify`` transaction (blocking: call it off the event
        loop); on SQLite it dispatches to this process's subscribers. Prefer :func:`signal` inside
        the transaction of the change when there is one.
        """
        if self.postgres:
            with self.db.session() as session:
                signal(session, kind, payload)
                session.commit()
        else:
            self.dispatch_threadsafe({"k": kind, **(payload or {})})

    # dispatch ------------------------------------------------------------------------------
    def dispatch_threadsafe(self, message: dict[str, Any]) -> None:
        call_on_loop(self._loop, self.dispatch, message)

    def dispatch(self, message: dict[str, Any]) -> None:
        self.received += 1
        for callback in list(self._subscribers.get(str(message.get("k")), ())):
            try:
                callback(message)
            except Exception:  # noqa: BLE001 - one subscriber must not break the others
                logger.exception("notify subscriber for %r failed", message.get("k"))

    def _wake_all(self) -> None:
        for kind in list(self._subscribers):
            self.dispatch({"k": kind, "reconnected": True})

    # PostgreSQL listener -----------------------------------------------------------------------
    async def _listen_forever(self) -> None:
        import psycopg

        delay = self._backoff_s
        url = libpq_url(self.db)
        while True:
            try:
                # TCP keepalives: the kernel notices a dead peer on a quiet connection (a failover, a
                # dropped NAT entry) instead of the listener waiting on a half-open socket forever
                conn = await psycopg.AsyncConnection.connect(
                    url, autocommit=True, connect_timeout=max(1, int(self._connect_timeout_s)),
                    keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
                    application_name=LISTENER_NAME)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    delay = self._backoff_s
                    self._wake_all()
                    logger.info("notify: listening on %s", CHANNEL)
                    while True:
                        # notifications that arrive between two waits are kept by psycopg
                        async for note in conn.notifies(timeout=self._ping_s):
                            try:
                                message = json.loads(note.payload)
                            except ValueError:
                                continue
                            if not isinstance(message, dict):
                                continue
                            if message.pop(ORIGIN, None) == self.origin:
                                continue  # ours: dispatched right after its commit already
                            self.dispatch(message)
                        # quiet for ping_s: a round trip proves the connection still works (bounded;
                        # TimeoutError -> reconnect)
                        await asyncio.wait_for(conn.execute("SELECT 1"), timeout=self._ping_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database may be restarting
                logger.warning("notify: listener connection lost (%s); retrying in %.1fs",
                               type(exc).__name__, delay)
            self._listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff_s)
