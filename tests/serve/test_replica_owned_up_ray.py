"""``cineweave up`` stops without cancelling replica work: SIGTERM while a replica generates; the
API stops first (it only lets go of its stream), the stack waits for the replica to finish and
store the result before it takes its own Ray down, and the next ``up`` on the same data dir
collects that result for the reclaimed job instead of running the pipeline again.

The replica holds the job with the step hook (``CINEWEAVE_TEST_HOOKS_DIR``): released only once
the API has stopped; in the second ``up`` a new run of the pipeline would be held again (no
release file then), so the job succeeding with no new ``.held`` file shows the pipeline ran once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api.db.engine import Database
from api.settings import Settings
from ops.server import free_port
from tests.fixtures.harness import add_user, bearer, ledger_rows
from tests.fixtures.ray import TERMINAL_STATUSES

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CINEWEAVE = Path(sys.executable).with_name("cineweave")
UP_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 120.0
TOKEN = "hold-up-restart"


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else ""


def start_up(tmp_path: Path, env: dict[str, str], port: int, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(CINEWEAVE), "up", "--host", "127.0.0.1", "--port", str(port),
                                 "--model", "tiny-sd"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + UP_TIMEOUT_S
    while True:
        assert proc.poll() is None, f"{name} exited early ({proc.returncode}):\n{tail(log)}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc, log
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{name}: no /healthz after {UP_TIMEOUT_S}s:\n{tail(log)}"
        time.sleep(0.5)


def wait_for(check: object, what: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} not within {timeout_s}s:\n{tail(log)}"
        time.sleep(0.2)


def test_up_stopped_mid_generation_keeps_the_work_for_the_next_up(tmp_path: Path, ray_tiny_dir: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CINEWEAVE_", "RAY_"))}
    env.update({"CINEWEAVE_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "CINEWEAVE_TINY_MODELS_DIR": str(ray_tiny_dir), "CINEWEAVE_TEST_HOOKS_DIR": str(hooks),
                "CINEWEAVE_LEASE_S": "3", "CINEWEAVE_RETRY_BACKOFF_S": "0.2", "CINEWEAVE_RUNNER_POLL_S": "0.1",
                "CINEWEAVE_OVERFLOW_ENABLED": "false", "CINEWEAVE_REPLICA_DRAIN_S": "90"})
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        first, log = start_up(tmp_path, env, port, "up-1")
        procs.append(first)
        settings = Settings(data_dir=data, _env_file=None)
        db = Database(settings)
        user = add_user(db, settings, credits=100)
        (hooks / f"{TOKEN}.hold").write_text("1")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=bearer(user.api_key), timeout=30) as client:
            response = client.post("/v1/jobs", json={"model": "tiny-sd", "input": {
                "prompt": f"up {TOKEN}", "width": 64, "height": 64, "steps": 3, "seed": 8}})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        held = hooks / f"{job_id}.held"
        wait_for(held.exists, "the replica holding the job", 90, log)

        first.send_signal(signal.SIGTERM)

        def api_down() -> bool:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            except httpx.HTTPError:
                return True
            return False

        wait_for(api_down, "the API stopping", STOP_TIMEOUT_S, log)
        # uvicorn says so once the app's shutdown ran: the runner has abandoned the job (its grace
        # is over, the job still held), so only the replica has it now.
        wait_for(lambda: "Application shutdown complete" in tail(log), "the API's shutdown", STOP_TIMEOUT_S, log)
        assert first.poll() is None, f"up did not wait for the replica's run:\n{tail(log)}"
        (hooks / f"{job_id}.release").write_text("")
        assert first.wait(timeout=STOP_TIMEOUT_S) == 0, tail(log)
        prefix = data / "storage" / "outputs" / user.user.id / job_id
        assert (prefix / "result.json").exists() and (prefix / "0.png").exists(), tail(log)

        held.unlink()
        # the hook consumed the release when it let the job go: a second run of the pipeline would be held
        assert not (hooks / f"{job_id}.release").exists()
        second, log = start_up(tmp_path, env, port, "up-2")
        procs.append(second)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=bearer(user.api_key), timeout=30) as client:
            deadline = time.monotonic() + 120
            while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in TERMINAL_STATUSES:
                assert time.monotonic() < deadline, f"job still {job['status']}:\n{tail(log)}"
                time.sleep(0.2)
        assert job["status"] == "succeeded", (job, tail(log))
        # 1: the stopping API handed the job back (a graceful stop uses no attempt); 2: it expired
        assert job["attempts"] in (1, 2) and not held.exists(), "the second up ran the pipeline again"
        kinds = [e.kind for e in ledger_rows(db, user_id=user.user.id, job_id=job_id)]
        assert kinds == ["reserve", "capture"], kinds
        assert job["credits"]["refunded"] == 0 and len(job["outputs"]) == 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
