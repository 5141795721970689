"""Several runners on one database never take the same job (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest

from api.core import ledger
from api.db.engine import Database
from api.metrics import Metrics
from api.runner.runner import Runner
from api.services.events import EventBus
from api.services.jobs import JobService, Submission
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import add_user, balance, ledger_rows

USERS, PER_USER = 4, 10


def _queue(db: Database, settings: Settings, storage: LocalStorage) -> tuple[list[str], list[str]]:
    jobs = JobService(db, settings, Catalog.load(), storage, EventBus())
    user_ids, job_ids = [], []
    for _ in range(USERS):
        user = add_user(db, settings, credits=100)
        user_ids.append(user.user.id)
        for i in range(PER_USER):
            job, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": f"p{i}"}))
            job_ids.append(job.id)
    return user_ids, job_ids


@pytest.fixture
def cdb(backend_settings: Settings) -> Database:
    s = backend_settings.model_copy(update={"max_active_jobs": 100, "rate_limit_per_minute": 1000,
                                            "runner_poll_s": 0.01, "lease_s": 30.0})
    database = Database(s)
    database.migrate()
    yield database
    database.dispose()


def test_concurrent_claims_take_each_job_once(cdb: Database, storage: LocalStorage) -> None:
    _, job_ids = _queue(cdb, cdb.settings, storage)
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def claim_all(n: int) -> None:
        runner = Runner(cdb, FakeExecutor(), cdb.settings, storage, EventBus(), runner_id=f"c{n}")
        barrier.wait(10)
        for _ in range(len(job_ids) + 5):
            job = runner.claim_next()
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claim_all, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert Counter(claimed).most_common(1)[0][1] == 1, "a job was claimed twice"
    assert sorted(claimed) == sorted(job_ids)


@pytest.mark.slow
def test_two_runners_drain_many_jobs_each_run_once(cdb: Database, storage: LocalStorage) -> None:
    user_ids, job_ids = _queue(cdb, cdb.settings, storage)
    executors = [FakeExecutor(storage=storage, steps=1, step_s=0.005) for _ in range(2)]
    errors: list[BaseException] = []

    def run(n: int) -> None:
        runner = Runner(cdb, executors[n], cdb.settings, storage, EventBus(), runner_id=f"r{n}",
                        metrics=Metrics())
        try:
            asyncio.run(runner.drain(timeout_s=90))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    runs = Counter(r.job_id for e in executors for r in e.runs)
    assert sorted(runs) == sorted(job_ids)
    assert set(runs.values()) == {1}, "a job ran twice"
    assert all(e.runs for e in executors), "one runner did all the work"
    for job_id in job_ids:
        assert [e.kind for e in ledger_rows(cdb, job_id=job_id)] == ["reserve", "capture"]
    for user_id in user_ids:
        assert balance(cdb, user_id) == ledger.BalanceView(100 - PER_USER, 0)


@pytest.mark.slow
def test_submissions_while_runners_settle_the_same_users_jobs(cdb: Database, storage: LocalStorage) -> None:
    """Submit (locks the user's balance) and settle (job row, then balance) at once: no deadlock, no 5xx."""
    jobs = JobService(cdb, cdb.settings, Catalog.load(), storage, EventBus())
    user = add_user(cdb, cdb.settings, credits=1000)
    submitted: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def submit_many(n: int) -> None:
        for i in range(12):
            try:
                job, _ = jobs.submit(user.user, Submission("tiny-sd", {"prompt": f"s{n}-{i}"}))
                with lock:
                    submitted.append(job.id)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    def run(n: int) -> None:
        runner = Runner(cdb, FakeExecutor(storage=storage, steps=1), cdb.settings, storage, EventBus(),
                        runner_id=f"r{n}")

        async def loop() -> None:
            for _ in range(3000):
                await runner.tick()
                if stop.is_set() and not runner.active_job_ids:
                    await runner.drain(timeout_s=60)
                    return
                await asyncio.sleep(0.005)

        try:
            asyncio.run(loop())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    runners = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    submitters = [threading.Thread(target=submit_many, args=(n,)) for n in range(4)]
    for t in runners + submitters:
        t.start()
    for t in submitters:
        t.join(120)
    stop.set()
    for t in runners:
        t.join(120)
    assert not errors, errors[:3]
    assert len(submitted) == 48
    for job_id in submitted:
        assert [e.kind for e in ledger_rows(cdb, job_id=job_id)] == ["reserve", "capture"], job_id
    assert balance(cdb, user.user.id) == ledger.BalanceView(1000 - 48, 0)
