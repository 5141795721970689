"""A submission alone in its model's queue (the common case) gets its estimate from one cheap
query, and it is the estimate the full computation gives."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from api.db.engine import Database
from api.db.tables import Job, utcnow
from api.services.queue import QueueService
from api.settings import Settings
from models.catalog import Catalog
from tests.api.services.test_queue import insert_job
from tests.fixtures.harness import add_user


def job_of(db: Database, job_id: str) -> Job:
    with db.read() as session:
        job = session.get(Job, job_id)
    assert job is not None
    return job


@pytest.mark.parametrize("measured", [False, True])
def test_a_job_alone_skips_the_full_computation_with_the_same_answer(
        db: Database, settings: Settings, catalog: Catalog, monkeypatch: pytest.MonkeyPatch, measured: bool) -> None:
    user = add_user(db, settings).user
    now = utcnow()
    if measured:
        insert_job(db, user.id, created=now - timedelta(seconds=100), status="succeeded", steps=4, run_s=2.0)
    insert_job(db, user.id, created=now - timedelta(seconds=50), model="tiny-wan")  # another model's
    job = job_of(db, insert_job(db, user.id, created=now - timedelta(seconds=3), steps=8))
    service = QueueService(db, settings, catalog)
    full = service.estimates([job])[job.id]
    assert full.queue_position == 0 and (full.eta_s is not None) == measured

    def no_full(*_: Any) -> Any:
        raise AssertionError("the full computation ran")

    monkeypatch.setattr(service, "estimates", no_full)
    assert service.estimate(job) == full


@pytest.mark.parametrize("other", ["queued", "running"])
def test_another_active_job_of_the_model_takes_the_full_computation(
        db: Database, settings: Settings, catalog: Catalog, other: str) -> None:
    user = add_user(db, settings).user
    now = utcnow()
    first = insert_job(db, user.id, created=now - timedelta(seconds=10), status=other,
                       started=now - timedelta(seconds=1) if other == "running" else None)
    job = job_of(db, insert_job(db, user.id, created=now - timedelta(seconds=3)))
    service = QueueService(db, settings, catalog)
    assert service._alone(job) is None
    assert service.estimate(job).queue_position == (1 if other == "queued" else 0)
    assert first


def test_a_job_past_its_start_deadline_is_not_alone(db: Database, settings: Settings, catalog: Catalog) -> None:
    user = add_user(db, settings).user
    job_id = insert_job(db, user.id, created=utcnow() - timedelta(seconds=3))
    with db.session() as session:
        row = session.get(Job, job_id)
        assert row is not None
        row.start_deadline_at = utcnow() - timedelta(seconds=1)
        session.commit()
    job = job_of(db, job_id)
    service = QueueService(db, settings, catalog)
    assert service._alone(job) is None and service.estimate(job).queue_position is None
