"""Service-level fixtures: a JobService on the test database."""

from __future__ import annotations

import pytest

from api.db.engine import Database
from api.metrics import Metrics
from api.services.events import EventBus
from api.services.jobs import JobService
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def jobs(db: Database, settings: Settings, catalog: Catalog, storage: LocalStorage, bus: EventBus) -> JobService:
    return JobService(db, settings, catalog, storage, bus, metrics=Metrics())
