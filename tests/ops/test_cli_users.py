"""`cineweave users create`, `credits grant` and `maintenance run`, on a temporary data dir."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import update
from typer.testing import CliRunner

from api import settings as settings_module
from api.core import ledger
from api.db.engine import Database
from api.db.tables import Job, utcnow
from api.http.app import create_app
from api.services.events import EventBus
from api.services.jobs import JobService, Submission
from api.services.users import find_user_by_email
from api.settings import Settings, get_settings
from models.catalog import Catalog
from ops.cli import app as cli


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in list(os.environ):
        if name.startswith("CINEWEAVE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    data = tmp_path / "var"
    monkeypatch.setenv("CINEWEAVE_DATA_DIR", str(data))
    monkeypatch.setenv("CINEWEAVE_SIGNING_SECRET", "cli-test")
    settings_module._cached_settings.cache_clear()
    yield data
    settings_module._cached_settings.cache_clear()


def run(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def _db() -> Database:
    return Database(get_settings(fresh=True))


def test_users_create_json_prints_a_working_key(data_dir: Path) -> None:
    result = run("users", "create", "--email", "Ada@Example.com", "--credits", "50", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {"user_id", "api_key"} <= out.keys()
    assert out["user_id"].startswith("usr_") and out["api_key"].startswith("cw_")

    async def call() -> tuple[httpx.Response, httpx.Response]:
        app = create_app(get_settings(fresh=True), None, run_maintenance=False)
        async with LifespanManager(app) as manager, httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver") as client:
            good = await client.get("/v1/credits", headers={"Authorization": f"Bearer {out['api_key']}"})
            bad = await client.get("/v1/credits", headers={"Authorization": f"Bearer {out['api_key']}x"})
            return good, bad

    good, bad = asyncio.run(call())
    assert good.status_code == 200 and good.json() == {"balance": 50, "reserved": 0, "plan": "free"}
    assert bad.status_code == 401
    db = _db()
    with db.read() as s:
        assert find_user_by_email(s, "ada@example.com").id == out["user_id"]
    db.dispose()


def test_users_create_plain_output_and_plan(data_dir: Path) -> None:
    result = run("users", "create", "--email", "paid@example.com", "--plan", "starter")
    assert result.exit_code == 0, result.output
    lines = dict(line.split(":", 1) for line in result.stdout.strip().splitlines())
    assert lines["user_id"].strip().startswith("usr_") and lines["api_key"].strip().startswith("cw_")
    db = _db()
    with db.read() as s:
        user = find_user_by_email(s, "paid@example.com")
        assert user.plan == "starter"
        assert ledger.get_balance(s, user.id) == ledger.BalanceView(80, 0)  # this month's plan credits
    db.dispose()


@pytest.mark.parametrize("args", [("--email", "dup@example.com"), ("--email", "bad-email"),
                                  ("--email", "x@example.com", "--plan", "gold")])
def test_users_create_refusals_exit_1(data_dir: Path, args: tuple[str, ...]) -> None:
    run("users", "create", "--email", "dup@example.com")
    result = run("users", "create", *args)
    assert result.exit_code == 1
    assert "error" in result.stderr and result.stdout == ""


def test_credits_grant(data_dir: Path) -> None:
    run("users", "create", "--email", "g@example.com", "--credits", "10")
    result = run("credits", "grant", "--email", "g@example.com", "--amount", "25")
    assert result.exit_code == 0, result.output
    assert "granted 25 credits to g@example.com; balance 35" in result.stdout
    for _ in range(2):
        again = run("credits", "grant", "--email", "G@example.com", "--amount", "5", "--idempotency-key", "inv-1")
        assert again.exit_code == 0
    db = _db()
    with db.read() as s:
        user = find_user_by_email(s, "g@example.com")
        assert ledger.get_balance(s, user.id).available == 40  # the keyed grant counted once
    db.dispose()
    missing = run("credits", "grant", "--email", "nobody@example.com", "--amount", "5")
    assert missing.exit_code == 1 and "nobody@example.com" in missing.stderr
    zero = run("credits", "grant", "--email", "g@example.com", "--amount", "0")
    assert zero.exit_code != 0


def test_maintenance_run(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run("users", "create", "--email", "s@example.com", "--plan", "starter", "--credits", "0")
    run("users", "create", "--email", "q@example.com", "--credits", "40")
    settings = get_settings(fresh=True)
    db = _db()
    with db.read() as s:
        queued_user = find_user_by_email(s, "q@example.com")
    jobs = JobService(db, settings, Catalog.load(), _storage(settings), EventBus())
    job, _ = jobs.submit(queued_user, Submission("veo-3.1", {"prompt": "p", "duration": 4}))
    with db.session() as s:
        stale = utcnow() - timedelta(hours=3)  # queued three hours ago, untouched since
        s.execute(update(Job).where(Job.id == job.id).values(created_at=stale, updated_at=stale))
        s.commit()

    first = run("maintenance", "run", "--period", "2032-05")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report == {"plan_grants": 1, "credits_granted": 80, "outputs_expired": 0, "leases_reclaimed": 0,
                      "stuck_failed": 1, "plan_changes": 0, "grants_expired": 0, "credits_expired": 0,
                      "pipelines_reconciled": 0}
    again = json.loads(run("maintenance", "run", "--period", "2032-05").stdout)
    assert again["plan_grants"] == 0 and again["stuck_failed"] == 0
    with db.read() as s:
        assert ledger.get_balance(s, queued_user.id) == ledger.BalanceView(40, 0)  # refunded
        stuck = s.get(Job, job.id)
        assert stuck is not None and stuck.status == "failed" and stuck.error_code == "queue_timeout"
    db.dispose()


def _storage(settings: Settings) -> Any:
    from api.storage.base import make_storage

    return make_storage(settings.resolved_storage_url(), signing_secret=settings.resolved_signing_secret())
