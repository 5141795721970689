"""Apply Alembic migrations programmatically (on start, and from tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


# An arbitrary, fixed key for PostgreSQL's advisory lock that serialises migrations.
MIGRATION_LOCK_KEY = 0x43574D47  # "CWMG"


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``.

    On PostgreSQL several API replicas may start at once on an empty database: a session-level
    advisory lock makes them migrate one after another (the later ones find the schema current),
    instead of racing to create the same tables.
    """
    if engine.dialect.name != "postgresql":
        command.upgrade(alembic_config(engine), revision)
        return
    with engine.connect() as lock_connection:
        lock_connection.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
        try:
            command.upgrade(alembic_config(engine), revision)
        finally:
            lock_connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
            lock_connection.commit()
