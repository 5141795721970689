"""SQLite's in-process write gate: lease work goes first, and every transaction gives it back."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from api.db.engine import Database, DatabaseBusy, WriteGate
from api.settings import Settings


def test_urgent_waiters_go_before_ordinary_ones() -> None:
    gate = WriteGate()
    gate.acquire(urgent=False, timeout_s=1)
    order: list[str] = []
    waiting = threading.Barrier(3)

    def waiter(name: str, urgent: bool) -> None:
        waiting.wait(5)
        gate.acquire(urgent=urgent, timeout_s=10)
        order.append(name)
        gate.release()

    threads = [threading.Thread(target=waiter, args=("client", False)),
               threading.Thread(target=waiter, args=("lease", True))]
    for t in threads:
        t.start()
    waiting.wait(5)
    # both are queued once the urgent one is counted (bounded wait on a condition, not a sleep)
    deadline = threading.Event()
    for _ in range(500):
        if gate._urgent_waiting == 1:  # noqa: SLF001 - observing the queue
            break
        deadline.wait(0.01)
    gate.release()
    for t in threads:
        t.join(10)
    assert order == ["lease", "client"]


def test_a_gate_not_given_in_time_raises() -> None:
    gate = WriteGate()
    gate.acquire(urgent=False, timeout_s=1)
    with pytest.raises(DatabaseBusy):
        gate.acquire(urgent=True, timeout_s=0.05)
    gate.release()
    gate.acquire(urgent=False, timeout_s=0.05)


def test_commit_rollback_and_errors_release_the_gate(settings: Settings) -> None:
    db = Database(settings)
    db.migrate()
    try:
        for _ in range(3):
            with db.session() as s:
                s.execute(text("CREATE TABLE IF NOT EXISTS gate_probe (x INTEGER)"))
                s.execute(text("INSERT INTO gate_probe VALUES (1)"))
                s.commit()
            with db.lease_session() as s:  # rolled back on close
                s.execute(text("INSERT INTO gate_probe VALUES (2)"))
            with pytest.raises(RuntimeError), db.session() as s:
                s.execute(text("INSERT INTO gate_probe VALUES (3)"))
                raise RuntimeError("boom")
        # another thread can still write at once: nothing kept the gate
        done: list[int] = []

        def write() -> None:
            with db.lease_session() as s:
                s.execute(text("INSERT INTO gate_probe VALUES (4)"))
                s.commit()
                done.append(1)

        t = threading.Thread(target=write)
        t.start()
        t.join(10)
        assert done == [1]
        with db.read() as s:
            assert s.execute(text("SELECT x FROM gate_probe ORDER BY rowid")).scalars().all() == [1, 1, 1, 4]
    finally:
        db.dispose()


def test_each_transaction_gets_its_busy_timeout_set_only_when_it_changes(settings: Settings) -> None:
    """A pooled connection serves both kinds of transaction; the timeout is set when it differs
    from the connection's, not once more per transaction."""
    from sqlalchemy import event

    from api.db.engine import API_BUSY_TIMEOUT_S

    db = Database(settings)
    if db.engine.dialect.name != "sqlite":
        pytest.skip("SQLite's busy timeout")
    db.migrate()
    pragmas: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("PRAGMA busy_timeout="):
            pragmas.append(statement)

    event.listen(db.engine, "before_cursor_execute", seen)
    timeouts: list[int] = []
    try:
        for session_of in (db.read, db.read, db.lease_session, db.lease_session, db.read, db.session):
            with session_of() as s:
                timeouts.append(int(s.execute(text("PRAGMA busy_timeout")).scalar_one()))
                s.commit()
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
        db.dispose()
    api_ms, lease_ms = int(API_BUSY_TIMEOUT_S * 1000), int(settings.resolved_sqlite_busy_timeout_s() * 1000)
    assert api_ms != lease_ms
    assert timeouts == [api_ms, api_ms, lease_ms, lease_ms, api_ms, api_ms]
    assert pragmas == [f"PRAGMA busy_timeout={lease_ms}", f"PRAGMA busy_timeout={api_ms}"]
