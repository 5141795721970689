"""bench/load.py end to end at a tiny scale: clients, the API on loopback, the exact ledger check."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import update

from api.core.jobs import JobStatus
from api.db.engine import Database
from api.db.tables import Balance, Job, utcnow
from api.services.events import EventBus
from api.services.jobs import JobService, Submission
from api.services.settlement import finish_job
from api.settings import Settings
from api.storage.local import LocalStorage
from bench import load
from models.catalog import Catalog
from tests.fixtures.harness import add_user


def test_quick_load_run_checks_the_ledger_exactly(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    code = load.main(["--clients", "4", "--duration-s", "2", "--poll-s", "0.05", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result
    assert result["errors_5xx"] == 0 and result["jobs_submitted"] > 0
    ledger = result["ledger"]
    assert ledger["ok"] and ledger["reserved_after_drain"] == 0
    assert ledger["captures"] == ledger["succeeded_prices"]
    assert result["submit_ms"]["p50"] is not None and result["poll_ms"]["p99"] is not None


def test_ledger_check_catches_a_wrong_ledger(settings: Settings, storage: LocalStorage, catalog: Catalog) -> None:
    db = Database(settings)
    db.migrate()
    try:
        user = add_user(db, settings, credits=100)
        service = JobService(db, settings, catalog, storage, EventBus())
        job, _ = service.submit(user.user, Submission("tiny-sd", {"prompt": "a cat"}))
        assert not load.check_ledger(db, [user.user.id])["ok"]  # still queued, credits reserved
        with db.session() as s:
            row = s.get(Job, job.id)
            assert row is not None
            row.status, row.started_at = "running", utcnow()
            finish_job(s, storage, row, JobStatus.SUCCEEDED, None)
            s.commit()
        assert load.check_ledger(db, [user.user.id])["ok"]
        with db.session() as s:  # a capture that no job delivered
            s.execute(update(Balance).where(Balance.user_id == user.user.id).values(available=Balance.available - 1))
            s.commit()
        verdict = load.check_ledger(db, [user.user.id])
        assert not verdict["ok"] and any("balance" in p for p in verdict["problems"])
    finally:
        db.dispose()
