"""Restarts lose no GPU work: an API process killed (SIGKILL) or stopped (SIGTERM) while a replica
generates, and a new API on the same database, settle the job once on the run the replica already
had. Real processes: each API is ``python -m tests.serve.api_process`` joined to the test session's
Ray; the replica holds the job with the step hook until the new API has attached.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.db.engine import Database
from api.settings import Settings
from ops.server import free_port
from tests.fixtures.harness import ADMIN_KEY, add_user, bearer, ledger_rows
from tests.fixtures.ray import TERMINAL_STATUSES, RayApi

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
LEASE_S = 3.0  # short, so the new API reclaims quickly; no assertion depends on it


@dataclass
class ApiProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@dataclass
class Restartable:
    """API processes on one SQLite database, beside the shared Ray session's replicas."""

    settings: Settings
    env: dict[str, str]
    db: Database
    tmp: Path
    started: list[ApiProcess]

    def start(self, name: str, timeout_s: float = 120.0) -> ApiProcess:
        port = free_port()
        log = self.tmp / f"{name}.log"
        env = {**self.env, "CINEWEAVE_PORT": str(port)}
        with log.open("wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "tests.serve.api_process"], cwd=REPO, env=env,
                                       stdout=out, stderr=subprocess.STDOUT)
        api = ApiProcess(process, f"http://127.0.0.1:{port}", log)
        self.started.append(api)
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.poll() is None, f"{name} exited ({process.returncode}):\n{api.tail()}"
            try:
                if httpx.get(f"{api.url}/healthz", timeout=2).status_code == 200:
                    return api
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{name} did not start in {timeout_s}s:\n{api.tail()}"
            time.sleep(0.2)

    def wait(self, api: ApiProcess, key: str, job_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=api.url, headers=bearer(key), timeout=10) as client:
            while True:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in TERMINAL_STATUSES:
                    return job
                assert time.monotonic() < deadline, f"job {job_id} still {job['status']}:\n{api.tail()}"
                time.sleep(0.1)


@pytest.fixture
def restartable(ray_api: RayApi, tmp_path: Path) -> Iterator[Restartable]:
    import ray

    base = ray_api.settings
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "CINEWEAVE_DATA_DIR": str(tmp_path / "var"),
           "CINEWEAVE_DATABASE_URL": f"sqlite:///{tmp_path / 'api.db'}",
           "CINEWEAVE_STORAGE_URL": base.resolved_storage_url(),  # the replicas' storage
           "CINEWEAVE_SIGNING_SECRET": base.resolved_signing_secret(), "CINEWEAVE_ADMIN_KEY": ADMIN_KEY,
           "CINEWEAVE_HOST": "127.0.0.1", "CINEWEAVE_LEASE_S": str(LEASE_S),
           "CINEWEAVE_RETRY_BACKOFF_S": "0.2", "CINEWEAVE_RUNNER_POLL_S": "0.1",
           "CINEWEAVE_OVERFLOW_ENABLED": "false", "CINEWEAVE_MAX_ACTIVE_JOBS": "64",
           "CINEWEAVE_RATE_LIMIT_PER_MINUTE": "100000", "CINEWEAVE_TINY_MODELS_DIR": str(base.tiny_models_dir)}
    env.pop("CINEWEAVE_TEST_HOOKS_DIR", None)  # the hook lives in the replicas, set by the stack
    settings = Settings(data_dir=tmp_path / "var", database_url=env["CINEWEAVE_DATABASE_URL"],
                        storage_url=env["CINEWEAVE_STORAGE_URL"], _env_file=None)
    db = Database(settings)
    db.migrate()
    restartable = Restartable(settings, env, db, tmp_path, [])
    try:
        yield restartable
    finally:
        for api in restartable.started:
            if api.process.poll() is None:
                api.process.kill()
            api.process.wait(timeout=30)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_an_api_restart_mid_generation_settles_the_replicas_run_once(
        restartable: Restartable, ray_api: RayApi, how: signal.Signals) -> None:
    user = add_user(restartable.db, restartable.settings, credits=100)
    first = restartable.start("api-1")
    token = ray_api.hold(step=1)
    with httpx.Client(base_url=first.url, headers=bearer(user.api_key), timeout=30) as client:
        response = client.post("/v1/jobs", json={"model": "tiny-sd", "input": {
            "prompt": f"restart {token}", "width": 64, "height": 64, "steps": 4, "seed": 5}})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    ray_api.wait_held(job_id)  # the replica generates it (held after step 1)

    if how == signal.SIGKILL:
        first.process.kill()
    else:
        first.process.terminate()
    assert first.process.wait(timeout=60) is not None
    if how == signal.SIGTERM:
        assert "Traceback" not in first.tail(), first.tail()

    second = restartable.start("api-2")
    # The new API reclaims the job once the old lease expired, and its request attaches to the
    # replica's run (the hook still holds it, so it cannot have finished meanwhile).
    stats = ray_api.wait_stats("tiny-sd", lambda s: s["attaches"].get(job_id, 0) >= 1, timeout_s=90)
    assert stats["runs_by_job"][job_id] == 1 and job_id not in stats["canceled"]
    ray_api.release(job_id)
    job = restartable.wait(second, user.api_key, job_id)
    assert job["status"] == "succeeded", (job, second.tail())
    assert job["attempts"] in (1, 2), job["attempts"]
    assert ray_api.stats("tiny-sd")["runs_by_job"][job_id] == 1  # the pipeline ran once
    kinds = [e.kind for e in ledger_rows(restartable.db, user_id=user.user.id, job_id=job_id)]
    assert kinds == ["reserve", "capture"], kinds
    assert job["credits"]["charged"] == job["credits"]["reserved"] > 0 and job["credits"]["refunded"] == 0
    assert len(job["outputs"]) == 1 and job["outputs"][0]["content_type"] == "image/png"
    assert ray_api.output_keys(user.user.id, job_id) == [f"outputs/{user.user.id}/{job_id}/0.png",
                                                         f"outputs/{user.user.id}/{job_id}/0.thumb.jpg"]
