"""The runner under load: its database work and lease renewals never wait on a busy event loop,
and a runner whose database is blocked past its lease stops writing instead of running twice."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from api.db.engine import Database
from api.db.tables import Job, JobEvent
from api.http.app import create_app
from api.runner.runner import Runner
from api.services.events import EventBus
from api.services.jobs import JobService, Submission
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.api.runner.conftest import make_runner
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import add_user, bearer, get_job, ledger_rows, wait_job, wait_until

FLOOD_LEASE_S = 3.0
SSE_CLIENTS = 50
SUBMITTERS = 20
MAX_SUBMITS = 400  # the flood is bounded in count as well as in time


def _lease_values(db: Database, job_id: str) -> Any:
    with db.read() as s:
        return s.execute(select(Job.lease_expires_at).where(Job.id == job_id)).scalar()


async def test_flooded_loop_never_loses_the_lease_and_runs_the_job_once(
        settings: Settings, storage: LocalStorage, live_server: Any) -> None:
    s = settings.model_copy(update={"lease_s": FLOOD_LEASE_S, "runner_poll_s": 0.05, "max_active_jobs": 10_000,
                                    "rate_limit_per_minute": 100_000, "retry_backoff_s": 0.05})
    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"held": gate})
    app = create_app(s, executor, storage=storage, run_maintenance=False)
    server = live_server(app)
    db: Database = app.state.cineweave.db
    owner = add_user(db, s, credits=100)
    flooder = add_user(db, s, credits=100_000)
    submitted = 0
    errors: list[int] = []
    dropped: list[int] = []

    async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                 limits=httpx.Limits(max_connections=200)) as client:
        held = await client.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": "held"}},
                                 headers=bearer(owner.api_key))
        assert held.status_code == 202, held.text
        job_id = held.json()["id"]
        await wait_until(lambda: any(r.job_id == job_id for r in executor.runs), 20, what="the held job to run")
        stop = asyncio.Event()

        async def sse_client() -> None:
            while not stop.is_set():
                try:
                    async with client.stream("GET", f"/v1/jobs/{job_id}/events",
                                             headers=bearer(owner.api_key)) as response:
                        async for _line in response.aiter_lines():
                            if stop.is_set():
                                return
                except httpx.TransportError:  # a dropped stream: a client reconnects
                    dropped.append(1)

        async def submitter() -> None:
            nonlocal submitted
            while not stop.is_set() and submitted < MAX_SUBMITS:
                submitted += 1
                r = await client.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": "flood"}},
                                      headers=bearer(flooder.api_key))
                if r.status_code >= 500:
                    errors.append(r.status_code)
                elif r.status_code == 202:
                    await client.get(f"/v1/jobs/{r.json()['id']}", headers=bearer(flooder.api_key))

        tasks = [asyncio.create_task(sse_client()) for _ in range(SSE_CLIENTS)]
        tasks += [asyncio.create_task(submitter()) for _ in range(SUBMITTERS)]
        # Load until the lease has been renewed several times (each renewal moves its expiry),
        # i.e. for well over one lease of flooding; bounded in time.
        seen = {_lease_values(db, job_id)}
        deadline = time.monotonic() + 60
        while len(seen) < 5:
            assert time.monotonic() < deadline, "the lease was not renewed under load"
            assert all(not t.done() or t.exception() is None for t in tasks), [t.exception() for t in tasks
                                                                            if t.done()]
            job = get_job(db, job_id)
            assert (job.status, job.lease_owner is not None, job.attempts) == ("running", True, 1)
            seen.add(_lease_values(db, job_id))
            await asyncio.sleep(0.05)
        stop.set()
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
    job = await wait_job(db, job_id, timeout_s=30)
    assert (job.status, job.attempts) == ("succeeded", 1)
    assert [r.attempt for r in executor.runs if r.job_id == job_id] == [1]  # ran once
    with db.read() as session:
        events = session.execute(select(JobEvent.data).where(JobEvent.job_id == job_id)).scalars().all()
    assert not any((e.get("error") or {}).get("code") == "worker_lost" for e in events)  # never reclaimed
    assert [e.kind for e in ledger_rows(db, job_id=job_id)] == ["reserve", "capture"]
    assert errors == [] and submitted > SUBMITTERS, (submitted, errors, dropped)


async def test_runner_blocked_by_the_database_past_its_lease_stops_writing(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    """Another connection holds SQLite's write lock longer than the lease: renewals fail (the busy
    timeout is a quarter of the lease), the runner gives the job up and writes nothing more; the
    job is then reclaimed once and runs again elsewhere, charged once."""
    lease_s = 1.2
    settings = rsettings.model_copy(update={"lease_s": lease_s})
    assert settings.resolved_sqlite_busy_timeout_s() == pytest.approx(lease_s / 4)
    db = Database(settings)  # its busy timeout follows this lease
    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"held": gate})
    r1 = make_runner(db, settings, storage, bus, executor, "r1")
    job, _ = jobs.submit(alice.user, Submission("tiny-sd", {"prompt": "held"}))
    r1.start()
    try:
        await wait_until(lambda: get_job(rdb, job.id).progress == 1.0, 10, what="the job to reach its gate")
        path = rsettings.resolved_database_url().split("sqlite:///", 1)[1]
        blocker = sqlite3.connect(path, isolation_level=None, timeout=1)
        blocker.execute("BEGIN IMMEDIATE")  # the write lock, held past the lease
        try:
            # counted once the lock is held (WAL readers still read): a coalesced write that
            # landed just before it is not a write made while blocked
            with rdb.read() as session:
                events_before = len(session.execute(select(JobEvent.id).where(JobEvent.job_id == job.id)).all())
            await wait_until(lambda: not r1.active_job_ids, 10, what="r1 to give the job up")
            gate.set()  # the stale run may finish now: r1 must not settle it
            await asyncio.sleep(0)
        finally:
            blocker.rollback()
            blocker.close()
        after = get_job(rdb, job.id)
        assert (after.status, after.lease_owner, after.attempts) == ("running", "r1", 1)
        with rdb.read() as session:
            assert len(session.execute(select(JobEvent.id).where(JobEvent.job_id == job.id)).all()) == events_before
        assert [e.kind for e in ledger_rows(rdb, job_id=job.id)] == ["reserve"]
    finally:
        await r1.stop(grace_s=1)
        db.dispose()
    r2_exec = FakeExecutor(storage=storage)
    r2 = make_runner(rdb, rsettings, storage, bus, r2_exec, "r2")
    r2.start()
    try:
        done = await wait_job(rdb, job.id, timeout_s=20)
    finally:
        await r2.stop()
    assert (done.status, done.attempts) == ("succeeded", 2)
    assert len(executor.runs) == 1 and len(r2_exec.runs) == 1
    assert [e.kind for e in ledger_rows(rdb, job_id=job.id)] == ["reserve", "capture"]


def test_busy_timeout_must_stay_well_below_the_lease() -> None:
    with pytest.raises(ValueError, match="sqlite_busy_timeout_s"):
        Settings(lease_s=30, sqlite_busy_timeout_s=60, _env_file=None)
    assert Settings(lease_s=30, _env_file=None).resolved_sqlite_busy_timeout_s() == 5.0
    assert Settings(lease_s=8, _env_file=None).resolved_sqlite_busy_timeout_s() == 2.0
    assert Settings(lease_s=30, sqlite_busy_timeout_s=1, _env_file=None).resolved_sqlite_busy_timeout_s() == 1.0


def test_lease_sessions_wait_for_the_write_lock_well_below_the_lease(rsettings: Settings) -> None:
    from sqlalchemy import text

    from api.db.engine import API_BUSY_TIMEOUT_S

    db = Database(rsettings.model_copy(update={"lease_s": 2.0}))
    try:
        for _ in range(2):  # the same pooled connection switches between the two
            with db.lease_session() as s:
                assert s.execute(text("PRAGMA busy_timeout")).scalar() == 500
            with db.session() as s:
                assert s.execute(text("PRAGMA busy_timeout")).scalar() == int(API_BUSY_TIMEOUT_S * 1000)
    finally:
        db.dispose()


class LoopWatchingDb:
    """The runner's database, recording every session opened on the event loop's thread."""

    def __init__(self, db: Database, loop_thread: threading.Thread) -> None:
        self._db = db
        self._loop_thread = loop_thread
        self.on_loop: list[str] = []
        self.off_loop = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._db, name)
        if name in ("session", "lease_session", "read"):
            def opened(*args: Any, **kwargs: Any) -> Any:
                if threading.current_thread() is self._loop_thread:
                    self.on_loop.append(name)
                else:
                    self.off_loop += 1
                return attr(*args, **kwargs)
            return opened
        return attr


async def test_runner_never_touches_the_database_or_resolves_input_on_the_loop(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    """Claim, lease renewals, records, cancel watch, settlement, reclaim and input resolution
    all run on the runner's threads: a flooded loop cannot delay them, nor they the loop."""
    watched = LoopWatchingDb(rdb, threading.current_thread())
    resolved_on: list[str] = []

    def resolve(job: Any) -> dict[str, Any]:
        resolved_on.append(threading.current_thread().name)
        return dict(job.input)

    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"held": gate})
    runner = Runner(watched, executor, rsettings.model_copy(update={"lease_s": 0.6}),  # type: ignore[arg-type]
                    storage, bus, runner_id="r1", resolve_input=resolve)
    held, _ = jobs.submit(alice.user, Submission("tiny-sd", {"prompt": "held"}))
    quick, _ = jobs.submit(alice.user, Submission("tiny-sd", {"prompt": "quick"}))
    runner.start()
    try:
        await wait_until(lambda: get_job(rdb, quick.id).status == "succeeded", 10, what="the quick job")
        renewed = _lease_values(rdb, held.id)
        await wait_until(lambda: _lease_values(rdb, held.id) != renewed, 10, what="a lease renewal")
        gate.set()
        await wait_job(rdb, held.id, timeout_s=10)
    finally:
        await runner.stop()
    assert watched.on_loop == [] and watched.off_loop > 0
    assert len(resolved_on) == 2 and threading.current_thread().name not in resolved_on
