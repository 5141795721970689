"""The ``cineweave`` command on the real stack: ``up`` starts and stops cleanly on SIGTERM leaving no
Ray process behind, and ``generate`` submits to a running stack, follows it and downloads the output.

``up`` runs as a subprocess with its own data dir, port and Ray session. Other Ray sessions may be
alive on this machine (this test run's shared one, at least), so "no Ray process left" is checked
against what the subprocess itself started: its process tree and its Ray session directory.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from models.media import probe_mp4, read_png_metadata
from ops.server import free_port
from tests.fixtures.ray import RayApi, RaySession

pytestmark = pytest.mark.ray

CINEWEAVE = Path(sys.executable).with_name("cineweave")
SESSION_RE = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")
UP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CINEWEAVE_", "RAY_"))}
    env.update({"CINEWEAVE_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                **extra})
    return env


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def processes_of_session(session: str) -> list[psutil.Process]:
    """Every live process on the machine whose command line names this Ray session."""
    return [p for p in psutil.process_iter() if session in cmdline(p) and alive(p)]


def listening_ports(procs: list[psutil.Process]) -> set[int]:
    ports: set[int] = set()
    for p in procs:
        try:
            ports |= {c.laddr.port for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return ports


def log_tail(path: Path, n: int = 40) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(line for line in lines[-n:] if "fork_posix" not in line)


@pytest.mark.slow
def test_up_starts_and_stops_cleanly_on_sigterm(tmp_path: Path, ray_tiny_dir: Path, ray_session: RaySession) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    # This test run's shared Ray session runs beside it and must survive it.
    ours = [p for p in processes_of_session(ray_session.session_dir.name) if p.name() in ("raylet", "gcs_server")]
    assert {p.name() for p in ours} == {"raylet", "gcs_server"}, ours
    with log.open("wb") as out:
        proc = subprocess.Popen([str(CINEWEAVE), "up", "--host", "127.0.0.1", "--port", str(port),
                                 "--model", "tiny-sd"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env=cli_env(tmp_path, CINEWEAVE_TINY_MODELS_DIR=str(ray_tiny_dir)),
                                start_new_session=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"cineweave up exited early ({proc.returncode}):\n{log_tail(log)}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"no /healthz after {UP_TIMEOUT_S}s:\n{log_tail(log)}"
            time.sleep(0.5)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        assert any(m["id"] == "tiny-sd" and m.get("available") for m in models["data"]), models
        # What it started: Ray's own processes (gcs_server, raylet, workers), all in one session.
        started = tree(proc.pid)
        names = {p.name() for p in started if alive(p)}
        assert {"raylet", "gcs_server"} <= names, names
        sessions = {m.group(0) for p in started for m in [SESSION_RE.search(cmdline(p))] if m}
        assert len(sessions) == 1, sessions
        session = sessions.pop()
        assert processes_of_session(session)
        # Only the API listens on HTTP: Serve's proxy is off, so it cannot take 127.0.0.1:8000
        # (the API's default port) from `cineweave up` run with its defaults.
        listening = listening_ports([psutil.Process(proc.pid), *started])
        assert port in listening and 8000 not in listening, sorted(listening)
        assert not [p for p in started if "ProxyActor" in cmdline(p)]

        known = {p.pid for p in started}
        started += [p for p in tree(proc.pid) if p.pid not in known]  # workers started since
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"cineweave up still running {STOP_TIMEOUT_S}s after SIGTERM:\n{log_tail(log)}")
        assert code == 0, f"exit {code} (a clean stop exits 0):\n{log_tail(log)}"
        # Nothing it started outlives it (a few seconds for the kernel to reap stragglers).
        deadline = time.monotonic() + 15
        while (left := [p for p in started if alive(p)] + processes_of_session(session)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, [f"{p.pid} {p.name()}" for p in left]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        assert all(alive(p) for p in ours), "the test run's own Ray session was stopped"
        assert session != ray_session.session_dir.name
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for p in started:
            if alive(p):
                p.kill()


def run_generate(ray_api: RayApi, tmp_path: Path, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(tmp_path, CINEWEAVE_API_URL=ray_api.url, CINEWEAVE_API_KEY=key)
    return subprocess.run([str(CINEWEAVE), "generate", *args, "--out", str(tmp_path / "out")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def test_generate_downloads_an_image_and_a_video(ray_api: RayApi, tmp_path: Path) -> None:
    user = ray_api.user()
    result = run_generate(ray_api, tmp_path, user.api_key, "--model", "tiny-sd", "--prompt", "a red kite",
                          "--width", "64", "--height", "48", "--steps", "3", "--seed", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    png = Path(result.stdout.strip().splitlines()[-1])
    assert png.is_file() and png.parent == (tmp_path / "out").resolve() and png.suffix == ".png"
    with Image.open(png) as img:
        assert img.size == (64, 48)
    meta = read_png_metadata(png.read_bytes())
    assert meta["prompt"] == "a red kite" and meta["seed"] == "8"
    assert "queued" in result.stderr  # the progress display ran (on stderr)
    job_id = png.name.split("-0.")[0]
    assert ray_api.job(user.api_key, job_id)["status"] == "succeeded"

    result = run_generate(ray_api, tmp_path, user.api_key, "--model", "tiny-wan", "--prompt", "rain",
                          "--num-frames", "9", "--fps", "8", "--steps", "2", "--seed", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    mp4 = Path(result.stdout.strip().splitlines()[-1])
    info = probe_mp4(mp4)
    assert mp4.suffix == ".mp4" and info["num_frames"] == 9 and info["fps"] == pytest.approx(8)


def test_generate_fails_clearly(ray_api: RayApi, tmp_path: Path) -> None:
    result = run_generate(ray_api, tmp_path, "not-a-key", "--model", "tiny-sd", "--prompt", "x")
    assert result.returncode != 0 and "unauthorized" in result.stderr
    user = ray_api.user()
    result = run_generate(ray_api, tmp_path, user.api_key, "--model", "tiny-sd", "--prompt", "x", "--steps", "5000")
    assert result.returncode != 0 and "invalid_input" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
