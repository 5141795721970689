"""Runner fixtures: short leases and backoffs, raised limits, one rich user."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from api.db.engine import Database
from api.metrics import Metrics
from api.runner.runner import Runner
from api.services.events import EventBus
from api.services.jobs import JobService
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from tests.fixtures.harness import add_user


@pytest.fixture
def rsettings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_active_jobs": 50, "rate_limit_per_minute": 1000, "lease_s": 3.0,
                                       "retry_backoff_s": 0.05, "runner_poll_s": 0.02})


@pytest.fixture
def rdb(rsettings: Settings) -> Iterator[Database]:
    database = Database(rsettings)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def jobs(rdb: Database, rsettings: Settings, catalog: Catalog, storage: LocalStorage, bus: EventBus) -> JobService:
    return JobService(rdb, rsettings, catalog, storage, bus)


@pytest.fixture
def alice(rdb: Database, rsettings: Settings) -> NewUser:
    return add_user(rdb, rsettings, credits=1000)


def make_runner(rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, executor: Any,
                runner_id: str = "r1", **overrides: Any) -> Runner:
    s = rsettings.model_copy(update=overrides) if overrides else rsettings
    return Runner(rdb, executor, s, storage, bus, runner_id=runner_id, metrics=Metrics())


