"""Two API processes on one PostgreSQL database (real OS processes: ``tests.fakes.api_process``).

- A job submitted to replica A (the only one running a runner) is watched by SSE on replica B:
  every event arrives, in order, with no gap (B's stream equals the event table), woken by
  NOTIFY (B's own poll is set far beyond the test's bounded wait), and ``Last-Event-ID`` resumes
  exactly after the given event.
- Webhooks queued while the receiver is down survive both processes stopping (one SIGKILLed),
  and are delivered after a restart by two new processes, once each (counted by ``webhook-id``).

The job is held at its first step by a gate file (the executor's test hook), not by a sleep; every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from api.db.engine import Database
from api.db.tables import JobEvent, WebhookDelivery
from api.settings import Settings
from tests.fakes.webhook_sink import CountingReceiver
from tests.fixtures.harness import add_user, bearer, get_job, wait_job, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 60.0
STREAM_TIMEOUT_S = 30.0  # well below replica B's SSE poll in the SSE test


@dataclass
class ApiProcess:
    """``python -m tests.fakes.api_process`` on a socket bound here (127.0.0.1), own log file."""

    name: str
    env: dict[str, str]
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    port: int = field(default=0, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        log = (self.log_dir / f"{self.name}.log").open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fakes.api_process", "--fd", str(sock.fileno())],
                cwd=REPO, env=self.env, pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT)
        finally:
            sock.close()  # the child has its own copy
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start: {self.log_tail()}")
            time.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout_s)

    def log_tail(self, n: int = 4000) -> str:
        path = self.log_dir / f"{self.name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


@dataclass
class Cluster:
    """API processes sharing one database and data dir; ``cluster(name, runner=...)`` starts one."""

    db: Database
    settings: Settings
    gate_dir: Path
    env: dict[str, str]
    log_dir: Path
    started: list[ApiProcess] = field(default_factory=list)

    def __call__(self, name: str, *, runner: bool, **settings_env: str) -> ApiProcess:
        env = {**self.env, "CINEWEAVE_RUNNER_ENABLED": "true" if runner else "false",
               **{f"CINEWEAVE_{k.upper()}": v for k, v in settings_env.items()}}
        process = ApiProcess(name, env, self.log_dir)
        self.started.append(process)
        return process.start()


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path, settings: Settings) -> Iterator[Cluster]:
    shared = settings.model_copy(update={"database_url": pg_url})
    db = Database(shared)
    db.migrate()  # once, before the processes start (they find the schema at head)
    gate_dir = tmp_path / "gates"
    gate_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CINEWEAVE_")}
    env.update({
        "PYTHONPATH": str(REPO), "CINEWEAVE_DATABASE_URL": pg_url,
        "CINEWEAVE_DATA_DIR": str(settings.data_dir), "CINEWEAVE_SIGNING_SECRET": "test-secret",
        "CINEWEAVE_ADMIN_KEY": "admin-test-key", "CINEWEAVE_RUNNER_POLL_S": "0.05",
        "CINEWEAVE_LEASE_S": "10", "CINEWEAVE_EGRESS_ALLOW_NETWORKS": json.dumps(["127.0.0.1/32"]),
        "CINEWEAVE_WEBHOOK_BACKOFF_S": "0.1", "CINEWEAVE_WEBHOOK_MAX_ATTEMPTS": "100",
        "CINEWEAVE_WEBHOOK_TIMEOUT_S": "1", "CINEWEAVE_WEBHOOK_CLAIM_S": "3", "CINEWEAVE_WEBHOOK_POLL_S": "600",
        "CINEWEAVE_TEST_GATE_DIR": str(gate_dir),
    })
    running = Cluster(db, shared, gate_dir, env, tmp_path)
    try:
        yield running
    finally:
        for process in reversed(running.started):
            process.stop(signal.SIGKILL, timeout_s=10)
        db.dispose()


async def sse_events(client: httpx.AsyncClient, url: str, key: str, last_event_id: int | None = None
                     ) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of each server-sent event, until the stream ends."""
    headers = bearer(key)
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    async with client.stream("GET", url, headers=headers, timeout=STREAM_TIMEOUT_S) as response:
        assert response.status_code == 200, await response.aread()
        current: dict[str, str] = {}
        async for line in response.aiter_lines():
            if not line:
                if "id" in current:
                    yield int(current["id"]), current.get("event", "message"), json.loads(current.get("data", "{}"))
                current = {}
                continue
            if line.startswith(":"):
                continue  # ping
            name, _, value = line.partition(":")
            current[name] = value[1:] if value.startswith(" ") else value


def stored_events(db: Database, job_id: str) -> list[tuple[int, str]]:
    with db.read() as session:
        return [(e.id, e.type) for e in session.execute(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars()]


async def test_sse_on_another_replica_sees_every_event_in_order(cluster: Cluster) -> None:
    a = cluster("replica-a", runner=True)
    # B re-reads the table on its own only every 120 s: live events within the bounded stream
    # below can only have reached it through A's NOTIFY
    b = cluster("replica-b", runner=False, sse_poll_s="120")
    user = add_user(cluster.db, cluster.settings, credits=10)
    async with httpx.AsyncClient(timeout=30) as client:
        submitted = await client.post(f"{a.url}/v1/jobs", headers=bearer(user.api_key),
                                      json={"model": "tiny-sd", "input": {"prompt": "hold-sse"}})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        # held at its first step on replica A: the stored events so far
        await wait_until(lambda: any(t == "progress" for _, t in stored_events(cluster.db, job_id)), 30,
                         what="the first progress event")
        before = stored_events(cluster.db, job_id)
        seen: list[tuple[int, str]] = []
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            async for event_id, type_, data in sse_events(client, f"{b.url}/v1/jobs/{job_id}/events",
                                                          user.api_key):
                seen.append((event_id, type_))
                if event_id == before[-1][0]:
                    (cluster.gate_dir / "hold-sse").touch()  # replayed up to now: let the job go on
                if type_ == "completed":
                    assert data["job"]["status"] == "succeeded"
                    break
        assert get_job(cluster.db, job_id).status == "succeeded"
        stored = stored_events(cluster.db, job_id)
        assert seen == stored  # in order, none missing, none twice
        live = seen[len(before):]
        assert {"progress", "output", "completed"} <= {t for _, t in live}  # these came live, after the gate

        # resume on B after a given event: exactly the rest
        middle = stored[len(stored) // 2][0]
        resumed: list[tuple[int, str]] = []
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            async for event_id, type_, _ in sse_events(client, f"{b.url}/v1/jobs/{job_id}/events",
                                                       user.api_key, last_event_id=middle):
                resumed.append((event_id, type_))
        assert resumed == [e for e in stored if e[0] > middle]


def outbox(db: Database, job_id: str) -> list[WebhookDelivery]:
    with db.read() as session:
        return list(session.execute(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                    .order_by(WebhookDelivery.created_at)).scalars())


async def test_webhooks_queued_before_a_restart_are_delivered_after_it_once_each(cluster: Cluster) -> None:
    receiver = CountingReceiver()  # bound, not listening yet: deliveries are refused at connect
    try:
        a = cluster("replica-a", runner=True)
        b = cluster("replica-b", runner=False)
        user = add_user(cluster.db, cluster.settings, credits=10)
        async with httpx.AsyncClient(timeout=30) as client:
            submitted = await client.post(f"{b.url}/v1/jobs", headers=bearer(user.api_key),
                                          json={"model": "tiny-sd", "input": {"prompt": "a cat"},
                                                "webhook": receiver.url})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        await wait_job(cluster.db, job_id, timeout_s=30)
        rows = outbox(cluster.db, job_id)
        assert [r.event for r in rows] == ["start", "output", "completed"]
        # The first is tried (and backs off) while the receiver is down; the job's later ones wait
        # behind it, so a job's webhooks arrive in order.
        await wait_until(lambda: outbox(cluster.db, job_id)[0].attempts >= 1, 30,
                         what="the job's first webhook tried while the receiver is down")
        assert [r.attempts for r in outbox(cluster.db, job_id)[1:]] == [0, 0]
        a.stop(signal.SIGKILL)
        b.stop(signal.SIGTERM)
        pending = outbox(cluster.db, job_id)
        assert all(r.delivered_at is None and r.failed_at is None for r in pending)
        assert receiver.received == []

        receiver.start()
        cluster("replica-a2", runner=True)
        cluster("replica-b2", runner=False)
        await wait_until(lambda: all(r.delivered_at is not None for r in outbox(cluster.db, job_id)), 60,
                         what="every queued webhook delivered after the restart")
        done = outbox(cluster.db, job_id)
        assert all(r.claimed_by is None and r.last_status == 200 for r in done)  # nothing left in flight
        assert receiver.counts() == {r.id: 1 for r in done}  # each exactly once, by webhook-id
        statuses = {}
        for headers, body in receiver.received:
            payload = Webhook(user.webhook_secret).verify(body, headers)
            statuses[headers["webhook-id"]] = payload["status"]
        assert [statuses[r.id] for r in done] == ["running", "running", "succeeded"]
    finally:
        receiver.stop()
