"""The cross-process signal: delivered after commit (never on rollback), to every process.

On PostgreSQL the two notifiers use separate ``Database`` objects (separate pools and listener
connections), as two API processes would. Every wait is bounded; nothing sleeps and hopes: a
callback sets an ``asyncio.Event`` that the test awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from api.db.engine import Database
from api.services import notify
from api.services.events import EventBus, record_event
from api.services.notify import Notifier
from api.settings import Settings

WAIT_S = 10.0


class Inbox:
    """Collects messages of one kind; ``await inbox.next()`` waits (bounded) for the next one."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()

    def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def wait_for(self, predicate: Any, timeout_s: float = WAIT_S) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            for message in self.messages:
                if predicate(message):
                    return message
            self._arrived.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no matching message; got {self.messages}")
            await asyncio.wait_for(self._arrived.wait(), timeout=left)


@pytest.fixture
async def sqlite_notifier(db: Database) -> AsyncIterator[Notifier]:
    notifier = Notifier(db)
    await notifier.start()
    yield notifier
    await notifier.stop()


async def test_sqlite_signal_is_dispatched_after_commit_only(db: Database, sqlite_notifier: Notifier) -> None:
    inbox = Inbox()
    sqlite_notifier.subscribe("webhooks", inbox)
    with db.session() as session:
        notify.signal(session, "webhooks", {"job": "job_rolled_back"})
        session.rollback()
    with db.session() as session:
        notify.signal(session, "webhooks", {"job": "job_1"})
        assert inbox.messages == []  # not before the commit
        session.commit()
    message = await inbox.wait_for(lambda m: m.get("job") == "job_1")
    assert message == {"k": "webhooks", "job": "job_1"}
    assert all(m.get("job") != "job_rolled_back" for m in inbox.messages)


async def test_sqlite_signal_from_a_worker_thread_reaches_the_loop(db: Database, sqlite_notifier: Notifier) -> None:
    inbox = Inbox()
    sqlite_notifier.subscribe("events", inbox)

    def commit_in_thread() -> None:
        with db.session() as session:
            record_event(session, "job_t", "progress", {"progress": 0.5})
            session.commit()

    await asyncio.to_thread(commit_in_thread)
    assert (await inbox.wait_for(lambda m: m.get("job") == "job_t"))["type"] == "progress"


def test_a_subscriber_that_raises_does_not_stop_the_others(db: Database) -> None:
    notifier = Notifier(db)
    got: list[dict[str, Any]] = []

    def broken(_message: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    notifier.subscribe("events", broken)
    notifier.subscribe("events", got.append)
    notifier.dispatch({"k": "events", "job": "j"})
    assert got == [{"k": "events", "job": "j"}]


# PostgreSQL ------------------------------------------------------------------------------------
@pytest.fixture
async def pg_pair(pg_url: str, settings: Settings) -> AsyncIterator[tuple[Database, Notifier, Database, Notifier]]:
    """Two 'processes': each its own Database and listening Notifier on one PostgreSQL database."""
    pg_settings = settings.model_copy(update={"database_url": pg_url})
    db_a, db_b = Database(pg_settings), Database(pg_settings)
    db_a.migrate()
    a, b = Notifier(db_a), Notifier(db_b)
    await a.start()
    await b.start()
    assert a.listening and b.listening
    yield db_a, a, db_b, b
    await a.stop()
    await b.stop()
    db_a.dispose()
    db_b.dispose()


@pytest.mark.postgres
async def test_pg_notification_reaches_the_other_process_at_commit(pg_pair: Any) -> None:
    db_a, _a, _db_b, b = pg_pair
    inbox = Inbox()
    b.subscribe("events", inbox)
    with db_a.session() as session:
        record_event(session, "job_rb", "status", {"status": "queued"})
        session.rollback()
    with db_a.session() as session:
        record_event(session, "job_pg", "progress", {"progress": 0.25})
        session.commit()
    message = await inbox.wait_for(lambda m: m.get("job") == "job_pg")
    assert message["type"] == "progress"
    assert all(m.get("job") != "job_rb" for m in inbox.messages)  # rolled back: never announced


@pytest.mark.postgres
async def test_pg_notification_wakes_an_sse_waiter_on_the_other_process(pg_pair: Any) -> None:
    """What SSE and the runner's cancel watch rely on: the bus waiter of replica B is set by a
    change committed on replica A (not by B's slow poll: there is none here)."""
    db_a, _a, _db_b, b = pg_pair
    bus_b = EventBus()
    bus_b.bind(asyncio.get_running_loop())
    b.subscribe("events", bus_b.on_notification)
    waiter = bus_b.waiter("job_x")
    other = bus_b.waiter("job_other")
    with db_a.session() as session:
        record_event(session, "job_x", "logs", {"message": "hello"})
        session.commit()
    await asyncio.wait_for(waiter.wait(), timeout=WAIT_S)
    assert not other.is_set()  # only that job's readers wake
    bus_b.release("job_x", waiter)
    bus_b.release("job_other", other)


@pytest.mark.postgres
async def test_pg_listener_reconnects_and_wakes_everyone(pg_pair: Any, pg_url: str) -> None:
    """The listening connection is killed (a database failover): the notifier reconnects with
    backoff, wakes every subscriber (notifications meanwhile were missed), and receives again."""
    db_a, _a, _db_b, b = pg_pair
    inbox = Inbox()
    b.subscribe("events", inbox)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND application_name = %s "
                               "AND pid <> pg_backend_pid()", (notify.LISTENER_NAME,)).fetchall()
    assert killed, "no listening connection found"
    inbox.messages.clear()
    await inbox.wait_for(lambda m: m.get("reconnected") is True)
    with db_a.session() as session:
        record_event(session, "job_after", "status", {"status": "queued"})
        session.commit()
    await inbox.wait_for(lambda m: m.get("job") == "job_after")


@pytest.mark.postgres
def test_pg_payload_too_large_is_shrunk_not_refused(pg_url: str, settings: Settings) -> None:
    database = Database(settings.model_copy(update={"database_url": pg_url}))
    database.migrate()
    try:
        with database.session() as session:
            notify.signal(session, "events", {"job": "j", "blob": "x" * 10_000})
            session.execute(text("SELECT 1"))
            session.commit()  # PostgreSQL refuses payloads >= 8000 bytes; the signal must not fail the change
    finally:
        database.dispose()


async def test_publish_outside_a_transaction(db: Database, sqlite_notifier: Notifier) -> None:
    inbox = Inbox()
    sqlite_notifier.subscribe("runner", inbox)
    await asyncio.to_thread(sqlite_notifier.publish, "runner", {"model": "tiny-sd"})
    assert await inbox.wait_for(lambda m: m.get("model") == "tiny-sd") == {"k": "runner", "model": "tiny-sd"}


@pytest.mark.postgres
async def test_pg_publish_reaches_the_other_process(pg_pair: Any) -> None:
    _db_a, a, _db_b, b = pg_pair
    inbox = Inbox()
    b.subscribe("runner", inbox)
    await asyncio.to_thread(a.publish, "runner", {"model": "tiny-sd"})
    assert (await inbox.wait_for(lambda m: m.get("model") == "tiny-sd"))["k"] == "runner"


async def test_sqlite_signal_from_an_execution_options_engine(db: Database, sqlite_notifier: Notifier) -> None:
    """The runner writes through ``lease_session`` (an engine variant with its own options, the
    same pool): its signals reach the database's notifier too."""
    inbox = Inbox()
    sqlite_notifier.subscribe("webhooks", inbox)
    variant = db.engine.execution_options(cineweave_busy_timeout_ms=1000)
    from sqlmodel import Session

    with Session(variant) as session:
        notify.signal(session, "webhooks", {"job": "job_lease"})
        session.commit()
    await inbox.wait_for(lambda m: m.get("job") == "job_lease")


class FreezableProxy:
    """A TCP relay on 127.0.0.1 in front of PostgreSQL. ``freeze()`` stops relaying on the
    connections open now without closing them: what a half-open connection looks like (the peer
    is gone, nothing says so). Connections made afterwards are relayed normally."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.generation = 0
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def freeze(self) -> None:
        self.generation += 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        born = self.generation
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while chunk := await src.read(65536):
                if self.generation != born:  # frozen: swallow, never answer, never close
                    continue
                dst.write(chunk)
                await dst.drain()
            if self.generation == born:
                dst.close()

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def stop(self) -> None:
        for w in self._writers:
            w.close()
        if self.server is not None:
            self.server.close()


@pytest.mark.postgres
async def test_pg_listener_notices_a_half_open_connection(pg_url: str, settings: Settings) -> None:
    """The listening connection goes silent without closing (no FIN/RST ever arrives): the quiet
    listener's periodic round trip times out, it reconnects, wakes everyone and receives again."""
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    proxy = FreezableProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    proxied = url.set(port=port).render_as_string(hide_password=False)
    db_direct = Database(settings.model_copy(update={"database_url": pg_url}))
    db_proxied = Database(settings.model_copy(update={"database_url": proxied}))
    db_direct.migrate()
    listener = Notifier(db_proxied, backoff_s=0.05, ping_s=0.2, ping_timeout_s=0.5)
    inbox = Inbox()
    listener.subscribe("events", inbox)
    try:
        await listener.start()
        assert listener.listening and proxy.connections == 1
        inbox.messages.clear()
        proxy.freeze()
        # bounded by ping_s + ping_timeout_s + psycopg's own cancel-then-close of the stuck query (<= 10 s)
        await inbox.wait_for(lambda m: m.get("reconnected") is True, timeout_s=30.0)
        assert proxy.connections >= 2  # a new listening connection (and psycopg's cancel request)
        with db_direct.session() as session:
            record_event(session, "job_after_freeze", "status", {"status": "queued"})
            session.commit()
        await inbox.wait_for(lambda m: m.get("job") == "job_after_freeze")
    finally:
        await listener.stop()
        await proxy.stop()
        db_direct.dispose()
        db_proxied.dispose()


@pytest.mark.postgres
async def test_pg_listener_connection_has_tcp_keepalives(pg_pair: Any, pg_url: str) -> None:
    """libpq keepalive options are set on the listening connection (read back from the server's
    view of the socket is not possible; the client's connection options are)."""
    _db_a, _a, _db_b, b = pg_pair
    with psycopg.connect(pg_url, autocommit=True) as admin:
        [(count,)] = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                   (notify.LISTENER_NAME,)).fetchall()
    assert count >= 1
    recorded: dict[str, Any] = {}
    real_connect = psycopg.AsyncConnection.connect

    async def spy(*args: Any, **kwargs: Any) -> Any:
        recorded.update(kwargs)
        return await real_connect(*args, **kwargs)

    inbox = Inbox()
    b.subscribe("events", inbox)
    psycopg.AsyncConnection.connect = spy  # type: ignore[method-assign]
    try:
        with psycopg.connect(pg_url, autocommit=True) as admin:  # force a reconnect through the spy
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                          "AND pid <> pg_backend_pid()", (notify.LISTENER_NAME,))
        inbox.messages.clear()
        await inbox.wait_for(lambda m: m.get("reconnected") is True)
    finally:
        psycopg.AsyncConnection.connect = real_connect  # type: ignore[method-assign]
    assert {k: recorded.get(k) for k in ("keepalives", "keepalives_idle", "keepalives_interval",
                                         "keepalives_count")} == {
        "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


@pytest.mark.postgres
async def test_pg_own_signal_is_dispatched_once_after_commit_not_echoed(pg_pair: Any) -> None:
    """The committing process hears its own signal right after the commit (no round trip through
    the server, which is what wakes its runner at once) and skips the server's echo of it."""
    db_a, a, db_b, b = pg_pair
    inbox_a, inbox_b = Inbox(), Inbox()
    a.subscribe("events", inbox_a)
    b.subscribe("events", inbox_b)
    with db_a.session() as session:
        record_event(session, "job_own", "status", {"status": "queued"})
        assert inbox_a.messages == []  # not before the commit
        session.commit()
    assert [m.get("job") for m in inbox_a.messages] == ["job_own"]  # dispatched at the commit, locally
    assert "o" not in inbox_a.messages[0]  # the origin token never reaches subscribers
    await inbox_b.wait_for(lambda m: m.get("job") == "job_own")
    # a later notification from the other process: the server delivers in commit order, so the
    # echo of job_own (if it were dispatched) would come before it
    with db_b.session() as session:
        record_event(session, "job_marker", "status", {"status": "queued"})
        session.commit()
    await inbox_a.wait_for(lambda m: m.get("job") == "job_marker")
    assert [m.get("job") for m in inbox_a.messages].count("job_own") == 1
    assert inbox_b.messages[0]["s"] == "queued" and "o" not in inbox_b.messages[0]
