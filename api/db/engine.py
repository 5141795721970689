"""Engine and sessions for SQLite (embedded default, WAL) and PostgreSQL (at scale)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from api.settings import Settings

logger = logging.getLogger(__name__)

# How long a transaction that holds no lease (a client's request) waits for SQLite's write lock.
API_BUSY_TIMEOUT_S = 30.0


class DatabaseBusy(RuntimeError):
    """No turn at SQLite's single writer came within the busy timeout."""


class WriteGate:
    """In-process queue for SQLite's one writer, with lease work first.

    SQLite does not queue waiting writers: each polls the lock and a busy process's writes can
    starve an unlucky one for seconds (a lease renewal among a burst of submissions). Here this
    process's write transactions wait in turn on a condition instead, and a waiting lease
    transaction (the runner's renewals, records, settlements) goes before waiting client ones.
    The gate spans exactly SQLite's write lock: from ``BEGIN IMMEDIATE`` to commit or rollback.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._urgent_waiting = 0

    def acquire(self, *, urgent: bool, timeout_s: float) -> None:
        with self._cond:
            if urgent:
                self._urgent_waiting += 1
            try:
                ok = self._cond.wait_for(lambda: not self._held and (urgent or not self._urgent_waiting),
                                         timeout=timeout_s)
            finally:
                if urgent:
                    self._urgent_waiting -= 1
            if not ok:
                self._cond.notify_all()  # a waiter skipped for this urgent one may go now
                raise DatabaseBusy(f"no turn at the database's write lock within {timeout_s:g} s")
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


BUSY_TIMEOUT_INFO = "cineweave_busy_timeout_ms"
"""Key in a SQLite connection's ``info``: the busy timeout (ms) it has now."""


def make_engine(settings: Settings) -> Engine:
    url = settings.resolved_database_url()
    if url.startswith("sqlite"):
        db_path = url.split("sqlite:///", 1)[-1]
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": API_BUSY_TIMEOUT_S},
                               pool_size=20, max_overflow=40)
        _configure_sqlite(engine, WriteGate())
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=40)


def _configure_sqlite(engine: Engine, gate: WriteGate | None = None) -> None:
    """WAL, a busy timeout, foreign keys, and ``BEGIN IMMEDIATE`` for every transaction.

    Two busy timeouts: a transaction under a lease (the runner's claims, renewals, records and
    settlements: :meth:`Database.lease_session`) waits for the write lock at most
    ``Settings.resolved_sqlite_busy_timeout_s()`` (well below the lease, so a blocked write fails
    and is retried or given up long before the lease runs out); any other transaction (a client's
    submission) may queue for up to ``API_BUSY_TIMEOUT_S`` rather than fail under a burst.

    Taking the write lock at BEGIN (instead of at the first write) is what makes check-then-write
    transactions (limits, credit reservation) serial and deadlock-free on SQLite.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(API_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        record.info[BUSY_TIMEOUT_INFO] = int(API_BUSY_TIMEOUT_S * 1000)

    def _busy_timeout(connection, busy_ms: int) -> None:  # type: ignore[no-untyped-def]
        """Per transaction (a pooled connection serves both kinds), but only when it changes: a
        statement less for most transactions. ``connection.info`` lives with the DBAPI connection."""
        if connection.info.get(BUSY_TIMEOUT_INFO) != busy_ms:
            connection.exec_driver_sql(f"PRAGMA busy_timeout={busy_ms}")
            connection.info[BUSY_TIMEOUT_INFO] = busy_ms

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        options = connection.get_execution_options()
        read_only = options.get("cineweave_read_only", False)
        busy_ms = int(options.get("cineweave_busy_timeout_ms", int(API_BUSY_TIMEOUT_S * 1000)))
        if read_only or gate is None:
            _busy_timeout(connection, busy_ms)
            connection.exec_driver_sql("BEGIN")
            return
        gate.acquire(urgent="cineweave_busy_timeout_ms" in options, timeout_s=busy_ms / 1000)
        try:
            _busy_timeout(connection, busy_ms)
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            gate.release()
            raise
        connection.info["cineweave_gate"] = True

    def _end(connection) -> None:  # type: ignore[no-untyped-def]
        if gate is not None and connection.info.pop("cineweave_gate", False):
            gate.release()

    event.listen(engine, "commit", _end)
    event.listen(engine, "rollback", _end)

    @event.listens_for(engine, "reset")
    def _on_reset(_dbapi_connection, record, _state=None) -> None:  # type: ignore[no-untyped-def]
        # a connection returned to the pool in a transaction (no commit/rollback event seen)
        if gate is not None and record.info.pop("cineweave_gate", False):
            gate.release()


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


class Database:
    """Owns the engine; hands out sessions. ``expire_on_commit`` is off so rows stay readable."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings)
        self._read_engine = self.engine.execution_options(cineweave_read_only=True)
        self._lease_engine = self.engine.execution_options(
            cineweave_busy_timeout_ms=max(1, int(settings.resolved_sqlite_busy_timeout_s() * 1000)))

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session for work that may write (on SQLite it takes the write lock at BEGIN)."""
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def lease_session(self) -> Iterator[Session]:
        """A writing session for work under a lease (the runner): on SQLite it waits for the write
        lock only ``sqlite_busy_timeout_s`` (well below the lease), then fails."""
        with Session(self._lease_engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads only: on SQLite (WAL) it never waits for, nor blocks, a writer."""
        with Session(self._read_engine, expire_on_commit=False) as session:
            yield session

    def migrate(self) -> None:
        from api.db.migrate import upgrade

        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()
