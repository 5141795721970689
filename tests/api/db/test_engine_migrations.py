"""Migrations match the tables; SQLite write transactions serialize while reads never wait."""

from __future__ import annotations

import threading
import time

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

import api.db.tables  # noqa: F401  (registers the tables)
from api.db.engine import Database
from api.db.migrate import alembic_config
from api.settings import Settings


def test_migrations_build_exactly_the_tables(backend_db: Database) -> None:
    """No model change without a migration: autogenerate finds nothing left to do."""
    with backend_db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        tables = set(inspect(conn).get_table_names())
    assert diff == []
    assert set(SQLModel.metadata.tables) <= tables


def test_migrate_is_idempotent_and_reversible(backend_db: Database) -> None:
    backend_db.migrate()  # already at head: nothing happens
    with backend_db.engine.connect() as conn:
        head = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert head
    command.downgrade(alembic_config(backend_db.engine), "base")
    with backend_db.engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    backend_db.migrate()
    with backend_db.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
        assert "ledger" in inspect(conn).get_table_names()


def test_sqlite_writers_take_the_lock_at_begin(db: Database, settings: Settings) -> None:
    """BEGIN IMMEDIATE: a second writer waits for the first; a reader does not wait at all."""
    order: list[str] = []
    first_holds = threading.Event()
    release = threading.Event()

    def first() -> None:
        with db.session() as s:
            s.execute(text("SELECT 1"))  # the transaction (and the write lock) starts here
            first_holds.set()
            release.wait(10)
            order.append("first commits")
            s.commit()

    def second() -> None:
        first_holds.wait(10)
        with db.session() as s:
            s.execute(text("SELECT 1"))
            order.append("second begins")
            s.commit()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    assert first_holds.wait(10)
    time.sleep(0.3)
    started = time.monotonic()
    with db.read() as s:  # a reader is not blocked by the writer
        assert s.execute(text("SELECT count(*) FROM users")).scalar() == 0
    assert time.monotonic() - started < 0.5
    assert order == []  # the second writer is still waiting
    release.set()
    for t in threads:
        t.join(20)
    assert order == ["first commits", "second begins"]


@pytest.mark.postgres
def test_replicas_starting_together_migrate_one_after_another(pg_url: str, settings: Settings) -> None:
    """Four API replicas starting at once on an empty PostgreSQL database: all reach the head
    revision, none fails on a table another one created meanwhile (the advisory lock)."""
    pg_settings = settings.model_copy(update={"database_url": pg_url})
    databases = [Database(pg_settings) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(databases), timeout=30)

    def start(database: Database) -> None:
        try:
            barrier.wait()
            database.migrate()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(d,)) for d in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    try:
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        with databases[0].engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
        assert current == ScriptDirectory.from_config(alembic_config()).get_current_head()
    finally:
        for database in databases:
            database.dispose()
