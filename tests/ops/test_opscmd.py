"""``cineweave ops`` pieces that need no Ray: address resolution, the status report's parts, the
status command when the cluster or the database is out of reach, and the capacity command."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

import ops.opscmd
from api.db.engine import Database
from api.db.tables import Job, utcnow
from api.settings import Settings
from models.catalog import Catalog
from ops.capacity import markdown_table
from ops.opscmd import job_counts, ops_app, ray_address, serve_models
from tests.fixtures.harness import add_user


def test_ray_address_precedence(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(settings) == "auto"
    with_setting = settings.model_copy(update={"ray_address": "10.0.0.5:6379"})
    assert ray_address(with_setting) == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert ray_address(with_setting) == "10.0.0.9:6379"
    assert ray_address(with_setting, "ray-head:6379") == "ray-head:6379"


def test_serve_models_summarises_replicas_and_bounds() -> None:
    details = {"applications": {
        "sdxl": {"status": "RUNNING", "source": "declarative", "deployments": {"gen-sdxl": {
            "status": "UPSCALING", "target_num_replicas": 3,
            "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}],
            "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
                                  "ray_actor_options": {"num_gpus": 1.0}}}}},
        "tiny-sd": {"status": "RUNNING", "source": "imperative", "deployments": {"gen-tiny-sd": {
            "status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}],
            "deployment_config": {"num_replicas": 1, "ray_actor_options": {"num_gpus": 0}}}}},
    }}
    summary = serve_models(details)
    assert summary["sdxl"] == {"status": "RUNNING", "source": "declarative", "deployments": {"gen-sdxl": {
        "status": "UPSCALING", "replicas": {"RUNNING": 2, "STARTING": 1}, "running": 2, "target": 3,
        "min": 1, "max": 4, "gpus_per_replica": 1.0}}}
    dep = summary["tiny-sd"]["deployments"]["gen-tiny-sd"]
    assert (dep["min"], dep["max"], dep["running"]) == (1, 1, 1)


def test_job_counts_by_status_and_model(db: Database, settings: Settings) -> None:
    user = add_user(db, settings)
    now = utcnow()
    rows = [("tiny-sd", "queued", 30), ("tiny-sd", "queued", 300), ("tiny-sd", "running", 0),
            ("sdxl", "succeeded", 0), ("sdxl", "failed", 0), ("sdxl", "succeeded", 0)]
    with db.session() as session:
        for model, status, age in rows:
            session.add(Job(user_id=user.user.id, model=model, kind="image", task="t2i", status=status,
                            created_at=now - timedelta(seconds=age)))
        session.commit()
    counts = job_counts(settings)
    assert counts["by_status"] == {"queued": 2, "running": 1, "succeeded": 2, "failed": 1}
    assert counts["models"]["tiny-sd"]["queued"] == 2 and counts["models"]["tiny-sd"]["running"] == 1
    assert 300 <= counts["models"]["tiny-sd"]["oldest_wait_s"] < 400
    assert counts["models"]["sdxl"] == {"queued": 0, "running": 0, "oldest_wait_s": None}


def _status(settings: Settings, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    monkeypatch.setattr(ops.opscmd, "get_settings", lambda: settings)
    return CliRunner().invoke(ops_app, ["status", *args], env={"COLUMNS": "160"})


def test_status_without_a_cluster_still_reports_the_database(db: Database, settings: Settings,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cluster(*_args: Any) -> bool:
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ops.opscmd, "connect_ray", no_cluster)
    user = add_user(db, settings)
    with db.session() as session:
        session.add(Job(user_id=user.user.id, model="tiny-sd", kind="image", task="t2i", status="queued"))
        session.commit()
    result = _status(settings, monkeypatch, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ray_error"].startswith("ConnectionError") and "ray" not in report
    assert report["jobs"]["models"]["tiny-sd"]["queued"] == 1
    text = _status(settings, monkeypatch)
    assert text.exit_code == 0 and "Could not find any running Ray" in text.output
    assert "tiny-sd" in text.output and "not deployed" in text.output


def test_status_fails_when_nothing_answers(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cluster(*_args: Any) -> bool:
        raise ConnectionError("no Ray")

    monkeypatch.setattr(ops.opscmd, "connect_ray", no_cluster)
    unreachable = Settings(data_dir=tmp_path, database_url="postgresql://nobody@127.0.0.1:1/none", _env_file=None)
    result = _status(unreachable, monkeypatch, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert "ray_error" in report and "jobs_error" in report


def test_capacity_command_prints_the_table(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops.opscmd, "get_settings", lambda: settings)
    result = CliRunner().invoke(ops_app, ["capacity"])
    assert result.exit_code == 0 and result.output == markdown_table(Catalog.load())
