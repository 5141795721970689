"""Scheduled tasks: monthly plan grants, output expiry, stuck queued jobs, stale leases."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from api.core import ledger
from api.db.engine import Database
from api.db.tables import Job, User, utcnow
from api.services.jobs import JobService, Submission
from api.services.maintenance import Maintenance
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.harness import add_user, balance, get_job, ledger_rows


def test_monthly_grants_once_per_period(db: Database, settings: Settings, storage: LocalStorage) -> None:
    starter = add_user(db, settings, plan="starter", credits=0)
    studio = add_user(db, settings, plan="studio", credits=0)
    free = add_user(db, settings, credits=0)
    disabled = add_user(db, settings, plan="creator", credits=0)
    with db.session() as s:
        s.execute(update(User).where(User.id == disabled.user.id).values(disabled=True))
        s.commit()
    maintenance = Maintenance(db, settings, storage)
    first = maintenance.run_once("2031-03")
    assert (first.plan_grants, first.credits_granted) == (2, 580)
    again = maintenance.run_once("2031-03")
    assert (again.plan_grants, again.credits_granted) == (0, 0)
    assert balance(db, starter.user.id).available == 80
    assert balance(db, studio.user.id).available == 500
    assert balance(db, free.user.id).available == 0
    assert balance(db, disabled.user.id).available == 0
    nxt = maintenance.run_once("2031-04")
    assert nxt.plan_grants == 2
    assert balance(db, starter.user.id).available == 160
    assert [e.note for e in ledger_rows(db, starter.user.id)] == [
        "Starter monthly credits 2031-03", "Starter monthly credits 2031-04"]


def _finished(db: Database, jobs: JobService, storage: LocalStorage, user_id: str, days_ago: float) -> tuple[str, str]:
    from api.services.users import get_user

    with db.read() as s:
        user = get_user(s, user_id)
    job, _ = jobs.submit(user, Submission("tiny-sd", {"prompt": "p"}))
    key = f"outputs/{user_id}/{job.id}/0.png"
    storage.put_bytes(key, b"png", "image/png")
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(
            status="succeeded", completed_at=utcnow() - timedelta(days=days_ago),
            outputs=[{"key": key, "content_type": "image/png"}]))
        s.commit()
    return job.id, key


def test_output_expiry(db: Database, settings: Settings, storage: LocalStorage, jobs: JobService) -> None:
    user = add_user(db, settings, credits=10).user.id
    old_job, old_key = _finished(db, jobs, storage, user, days_ago=8)
    new_job, new_key = _finished(db, jobs, storage, user, days_ago=1)
    keep = Maintenance(db, settings, storage).run_once()
    assert keep.outputs_expired == 0 and storage.exists(old_key)  # retention 0 = keep forever
    s7 = settings.model_copy(update={"output_retention_days": 7})
    report = Maintenance(db, s7, storage).run_once()
    assert report.outputs_expired == 1
    assert not storage.exists(old_key) and storage.exists(new_key)
    expired = get_job(db, old_job)
    assert expired.outputs == [] and expired.outputs_deleted_at is not None and expired.status == "succeeded"
    assert get_job(db, new_job).outputs != []
    assert Maintenance(db, s7, storage).run_once().outputs_expired == 0


def test_stuck_queued_jobs_fail_and_refund(db: Database, settings: Settings, storage: LocalStorage,
                                           jobs: JobService) -> None:
    created = add_user(db, settings, credits=100)
    old, _ = jobs.submit(created.user, Submission("veo-3.1", {"prompt": "p", "duration": 4}))
    fresh, _ = jobs.submit(created.user, Submission("tiny-sd", {"prompt": "p"}))
    with db.session() as s:
        stale = utcnow() - timedelta(hours=2)  # queued (or requeued) two hours ago
        s.execute(update(Job).where(Job.id == old.id).values(created_at=stale, updated_at=stale))
        s.commit()
    report = Maintenance(db, settings, storage).run_once()
    assert report.stuck_failed == 1
    stuck = get_job(db, old.id)
    assert (stuck.status, stuck.error_code, stuck.credits_refunded) == ("failed", "queue_timeout", 40)
    assert get_job(db, fresh.id).status == "queued"
    assert balance(db, created.user.id) == ledger.BalanceView(99, 1)
    assert Maintenance(db, settings, storage).run_once().stuck_failed == 0
    assert [e.kind for e in ledger_rows(db, job_id=old.id)] == ["reserve", "refund"]


def test_stale_lease_is_reclaimed_by_maintenance(db: Database, settings: Settings, storage: LocalStorage,
                                                 jobs: JobService) -> None:
    created = add_user(db, settings, credits=10)
    job, _ = jobs.submit(created.user, Submission("tiny-sd", {"prompt": "p"}))
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(
            status="running", attempts=3, lease_owner="gone", lease_expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    report = Maintenance(db, settings, storage).run_once()
    assert report.leases_reclaimed == 1
    lost = get_job(db, job.id)
    assert (lost.status, lost.error_code, lost.credits_refunded) == ("failed", "worker_lost", 1)
    assert balance(db, created.user.id) == ledger.BalanceView(10, 0)


def test_an_old_job_requeued_recently_is_not_reaped(db: Database, settings: Settings, storage: LocalStorage,
                                                    jobs: JobService) -> None:
    """The reaper goes by the last change (a retry requeues), not by the submission time."""
    created = add_user(db, settings, credits=100)
    job, _ = jobs.submit(created.user, Submission("tiny-sd", {"prompt": "p"}))
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(created_at=utcnow() - timedelta(hours=2)))
        s.commit()
    assert Maintenance(db, settings, storage).run_once().stuck_failed == 0
    assert get_job(db, job.id).status == "queued"
