"""Ending a job: exactly one settlement, requeue with backoff, reclaiming expired leases."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from api.core import ledger
from api.core.errors import InvalidTransition
from api.core.events import ErrorEvent
from api.core.jobs import JobStatus
from api.core.public_errors import SAFE_MESSAGES
from api.db.engine import Database
from api.db.tables import Job, utcnow
from api.services.events import EventBus, events_after
from api.services.jobs import JobService, Submission
from api.services.settlement import finish_job, locked_job, reclaim_expired, requeue_job
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.harness import add_user, balance, get_job, ledger_rows


@pytest.fixture
def running(db: Database, settings: Settings, jobs: JobService) -> tuple[str, str]:
    created = add_user(db, settings, credits=100)
    job, _ = jobs.submit(created.user, Submission("veo-3.1", {"prompt": "p", "duration": 4}))
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(
            status="running", attempts=1, lease_owner="r1", started_at=utcnow() - timedelta(seconds=2),
            lease_expires_at=utcnow() + timedelta(seconds=30)))
        s.commit()
    return created.user.id, job.id


def _finish(db: Database, storage: LocalStorage, job_id: str, status: JobStatus,
            error: ErrorEvent | None = None) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        finish_job(s, storage, job, status, error)
        s.commit()
    return get_job(db, job_id)


def test_success_captures(db: Database, storage: LocalStorage, running: tuple[str, str]) -> None:
    user, job_id = running
    job = _finish(db, storage, job_id, JobStatus.SUCCEEDED)
    assert (job.status, job.progress, job.credits_charged, job.credits_refunded) == ("succeeded", 1.0, 40, 0)
    assert job.run_s is not None and job.run_s >= 2 and job.lease_owner is None
    assert balance(db, user) == ledger.BalanceView(60, 0)
    with db.read() as s:
        types = [e.type for e in events_after(s, job_id, 0)]
    assert types[-2:] == ["status", "completed"]


def test_failure_refunds_records_the_error_and_keeps_no_output(db: Database, storage: LocalStorage,
                                                                running: tuple[str, str]) -> None:
    user, job_id = running
    key = f"outputs/{user}/{job_id}/0.png"
    storage.put_bytes(key, b"x", "image/png")
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(outputs=[{"key": key, "content_type": "image/png"}]))
        s.commit()
    job = _finish(db, storage, job_id, JobStatus.FAILED,
                  ErrorEvent("out_of_memory", "CUDA out of memory on /srv/models/x (cuda:0)"))
    assert (job.status, job.error_code, job.error_message, job.credits_refunded) == (
        "failed", "out_of_memory", SAFE_MESSAGES["out_of_memory"], 40)
    # refunded, so nothing was delivered: no output left behind (expiry only sweeps succeeded jobs)
    assert job.outputs == [] and not storage.exists(key)
    assert balance(db, user) == ledger.BalanceView(100, 0)


def test_cancel_refunds_and_deletes_outputs(db: Database, storage: LocalStorage, running: tuple[str, str]) -> None:
    user, job_id = running
    key = f"outputs/{user}/{job_id}/0.png"
    storage.put_bytes(key, b"x", "image/png")
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(outputs=[{"key": key, "content_type": "image/png"}]))
        s.commit()
    job = _finish(db, storage, job_id, JobStatus.CANCELED)
    assert job.outputs == [] and not storage.exists(key)
    assert balance(db, user) == ledger.BalanceView(100, 0)


def test_finishing_twice_is_refused_and_settles_once(db: Database, storage: LocalStorage,
                                                     running: tuple[str, str]) -> None:
    user, job_id = running
    _finish(db, storage, job_id, JobStatus.SUCCEEDED)
    with pytest.raises(InvalidTransition):
        _finish(db, storage, job_id, JobStatus.FAILED)
    assert [e.kind for e in ledger_rows(db, job_id=job_id)] == ["reserve", "capture"]
    assert balance(db, user) == ledger.BalanceView(60, 0)


def test_requeue_backs_off_exponentially(db: Database, storage: LocalStorage, settings: Settings,
                                         running: tuple[str, str]) -> None:
    _, job_id = running
    s10 = settings.model_copy(update={"retry_backoff_s": 10.0})
    for attempt, backoff in ((1, 10), (2, 20)):
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(status="running", attempts=attempt,
                                                                 lease_owner="r1"))
            job = s.get(Job, job_id)
            assert job is not None
            s.refresh(job)
            before = utcnow()
            requeue_job(s, s10, storage, job, "flaky", "try again")
            s.commit()
        job = get_job(db, job_id)
        assert (job.status, job.stage, job.lease_owner, job.attempts) == ("queued", "retrying", None, attempt)
        assert job.next_attempt_at is not None
        wait = (job.next_attempt_at - before).total_seconds()
        assert backoff - 1 < wait <= backoff + 1
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="running", attempts=3))
        job = s.get(Job, job_id)
        assert job is not None
        s.refresh(job)
        with pytest.raises(InvalidTransition):
            requeue_job(s, s10, storage, job, "flaky", "no attempts left")
    assert [e.kind for e in ledger_rows(db, job_id=job_id)] == ["reserve"]


@pytest.mark.parametrize(("attempts", "cancel", "status", "settled"), [
    (1, False, "queued", []),
    (3, False, "failed", ["refund"]),
    (1, True, "canceled", ["refund"]),
])
def test_reclaim_expired(db: Database, storage: LocalStorage, settings: Settings, running: tuple[str, str],
                         attempts: int, cancel: bool, status: str, settled: list[str]) -> None:
    user, job_id = running
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            attempts=attempts, cancel_requested=cancel, lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert reclaim_expired(db, settings, storage, EventBus()) == 1
    job = get_job(db, job_id)
    assert job.status == status and job.lease_owner is None
    assert [e.kind for e in ledger_rows(db, job_id=job_id)] == ["reserve", *settled]
    if status == "failed":
        assert job.error_code == "worker_lost"
    assert reclaim_expired(db, settings, storage, EventBus()) == 0
    expected = ledger.BalanceView(60, 40) if not settled else ledger.BalanceView(100, 0)
    assert balance(db, user) == expected


def test_live_lease_is_not_reclaimed(db: Database, storage: LocalStorage, settings: Settings,
                                     running: tuple[str, str]) -> None:
    _, job_id = running
    assert reclaim_expired(db, settings, storage, EventBus()) == 0
    assert get_job(db, job_id).status == "running"


class BrokenPrefix(LocalStorage):
    """Deleting one job's outputs fails (a storage outage for that prefix)."""

    broken: str = ""

    def delete_prefix(self, prefix: str) -> int:
        if self.broken and prefix.endswith(f"/{self.broken}/"):
            raise OSError("storage unavailable")
        return super().delete_prefix(prefix)


def test_one_jobs_reclaim_error_does_not_stop_the_others(db: Database, storage: LocalStorage,
                                                         settings: Settings, jobs: JobService,
                                                         running: tuple[str, str]) -> None:
    _, bad = running
    other = add_user(db, settings, credits=100)
    good, _ = jobs.submit(other.user, Submission("veo-3.1", {"prompt": "q", "duration": 4}))
    with db.session() as s:  # both expired on their last attempt: reclaiming fails and refunds them
        s.execute(update(Job).where(Job.id.in_([bad, good.id])).values(
            status="running", attempts=3, lease_owner="r1", lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    broken = BrokenPrefix(storage.root, signing_secret="test")
    broken.broken = bad
    assert reclaim_expired(db, settings, broken, EventBus()) == 1
    assert (get_job(db, good.id).status, [e.kind for e in ledger_rows(db, job_id=good.id)]) == (
        "failed", ["reserve", "refund"])
    assert get_job(db, bad).status == "running"  # rolled back; the next pass tries again
    assert reclaim_expired(db, settings, storage, EventBus()) == 1
    assert get_job(db, bad).status == "failed"


def test_a_reclaimed_local_run_is_marked_for_reattach_and_a_real_failure_is_not(
        db: Database, storage: LocalStorage, settings: Settings, running: tuple[str, str]) -> None:
    from api.core.executor import REATTACH_KEY

    _, job_id = running
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            provider="local", resume={"checkpoint_key": "ck"}, lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert reclaim_expired(db, settings, storage, EventBus()) == 1
    reclaimed = get_job(db, job_id)
    assert reclaimed.resume == {"checkpoint_key": "ck", REATTACH_KEY: "local"}  # the run goes on there
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="running", attempts=2, lease_owner="r2"))
        s.commit()
        job = s.get(Job, job_id)
        assert job is not None
        requeue_job(s, settings, storage, job, "out_of_memory", "CUDA OOM")
        s.commit()
    assert get_job(db, job_id).resume == {"checkpoint_key": "ck"}  # nothing to attach to: route afresh


def test_locked_job_reloads_a_row_already_in_the_session(backend_db: Database, backend_settings: Settings,
                                                         catalog: Any, storage: LocalStorage) -> None:
    """What the lock protects is what the caller sees: a row loaded before (and changed by another
    transaction since, e.g. while this one waited for the lock) is read again, not kept stale."""
    jobs = JobService(backend_db, backend_settings, catalog, storage, EventBus())
    created = add_user(backend_db, backend_settings, credits=100)
    job, _ = jobs.submit(created.user, Submission("veo-3.1", {"prompt": "p", "duration": 4}))
    with backend_db.session() as mine:
        before = mine.get(Job, job.id)  # held: in this session's identity map
        assert before is not None and before.status == "queued"
        # the row changes underneath the loaded object (as another transaction's commit does while
        # this one waits for the lock on PostgreSQL)
        mine.execute(update(Job).where(Job.id == job.id).values(status="running", cancel_requested=True)
                     .execution_options(synchronize_session=False))
        locked = locked_job(mine, job.id)
        assert locked is before and (locked.status, locked.cancel_requested) == ("running", True)
