"""Scheduled tasks: monthly plan grants, plan changes at period end, expiry of plan credits,
output expiry, and the stuck-job reaper.

``cineweave maintenance run`` runs them once; the API server runs them every
``maintenance_interval_s``. Each task is idempotent, so running it twice (or on two servers) is safe.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from api.core.events import ErrorEvent
from api.core.jobs import ACTIVE, JobStatus
from api.db.engine import Database
from api.db.tables import Job, User, utcnow
from api.services.billing import BillingService, stripe_managed_accounts
from api.services.events import EventBus
from api.services.settlement import (
    delete_job_outputs,
    finish_job,
    locked_job,
    publish_all,
    reclaim_expired,
    take_announcements,
)
from api.services.users import grant_plan_month
from api.settings import Settings
from api.storage.base import Storage

logger = logging.getLogger(__name__)


@dataclass
class MaintenanceReport:
    plan_grants: int = 0
    credits_granted: int = 0
    outputs_expired: int = 0
    leases_reclaimed: int = 0
    stuck_failed: int = 0
    plan_changes: int = 0
    grants_expired: int = 0
    credits_expired: int = 0
    pipelines_reconciled: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Maintenance:
    def __init__(self, db: Database, settings: Settings, storage: Storage, bus: EventBus | None = None) -> None:
        self.db = db
        self.settings = settings
        self.storage = storage
        self.bus = bus or EventBus()

    def run_once(self, period: str | None = None, now: datetime | None = None) -> MaintenanceReport:
        report = MaintenanceReport()
        billing = BillingService(self.db, self.settings)
        # a paid period that ended moves the account to its next plan before this month's grant
        report.plan_changes = billing.apply_downgrades(now)
        self.grant_plans(report, period)
        # plan credits are usable through the month after their own, then expire (billing.py)
        report.grants_expired, report.credits_expired = billing.expire_credits(now)
        self.expire_outputs(report)
        report.leases_reclaimed = reclaim_expired(self.db, self.settings, self.storage, self.bus)
        self.reap_stuck(report)
        self.reconcile_pipelines(report)
        logger.info("maintenance: %s", report.as_dict())
        return report

    async def run_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.run_once)
            except Exception:  # noqa: BLE001 - try again next interval
                logger.exception("maintenance run failed")
            await asyncio.sleep(self.settings.maintenance_interval_s)

    def grant_plans(self, report: MaintenanceReport, period: str | None = None) -> None:
        """Paid plans' monthly credits, people and team accounts alike, once per period.

        Accounts with a Stripe subscription are left out: a paid invoice grants their month.
        """
        paid = [p.id for p in self.settings.plans if p.monthly_credits]
        with self.db.read() as session:
            user_ids = session.execute(select(User.id).where(
                User.plan.in_(paid), User.disabled.is_(False), User.id.not_in(stripe_managed_accounts()))
                                       ).scalars().all()
        for user_id in user_ids:
            with self.db.session() as session:
                user = session.get(User, user_id)
                if user is None:
                    continue
                granted = grant_plan_month(session, self.settings, user, period)
                session.commit()
            if granted:
                report.plan_grants += 1
                report.credits_granted += granted

    def expire_outputs(self, report: MaintenanceReport) -> None:
        days = self.settings.output_retention_days
        if days <= 0:
            return
        cutoff = utcnow() - timedelta(days=days)
        with self.db.read() as session:
            job_ids = session.execute(select(Job.id).where(
                Job.completed_at < cutoff, Job.outputs_deleted_at.is_(None),
                Job.status == JobStatus.SUCCEEDED.value)).scalars().all()
        for job_id in job_ids:
            with self.db.session() as session:
                job = session.get(Job, job_id)
                if job is None or job.outputs_deleted_at is not None:
                    continue
                delete_job_outputs(self.storage, job)
                job.outputs = []
                job.outputs_deleted_at = utcnow()
                session.commit()
            report.outputs_expired += 1

    def reap_stuck(self, report: MaintenanceReport) -> None:
        """Queued jobs no runner took within ``stuck_job_s`` (since queued or requeued): fail, refund."""
        cutoff = utcnow() - timedelta(seconds=self.settings.stuck_job_s)
        with self.db.read() as session:
            job_ids = session.execute(select(Job.id).where(
                Job.status == JobStatus.QUEUED.value, Job.updated_at < cutoff)).scalars().all()
        for job_id in job_ids:
            with self.db.session() as session:
                job = locked_job(session, job_id)
                if job is None or job.status != JobStatus.QUEUED:
                    continue
                finish_job(session, self.storage, job, JobStatus.FAILED,
                           ErrorEvent("queue_timeout", f"no worker started this job within "
                                      f"{self.settings.stuck_job_s:.0f} s; credits refunded"))
                session.commit()
                others = take_announcements(session)  # a step's pipeline and the siblings it ended
            report.stuck_failed += 1
            self.bus.publish(job_id, "completed", {"status": "failed"})
            publish_all(self.bus, others)

    def reconcile_pipelines(self, report: MaintenanceReport) -> None:
        """A pipeline still active whose steps have all ended is ended too (a safety net: each
        step's settlement ends it in the same transaction, so only a bug or a manual change to
        the rows leaves one hanging). Its own end never touches the ledger."""
        from api.services.pipelines import PIPELINE_KIND, reconcile  # lazy: pipelines imports jobs

        child = Job.__table__.alias("child")  # type: ignore[attr-defined]
        active = [s.value for s in ACTIVE]
        with self.db.read() as session:
            unfinished = select(child.c.id).where(child.c.parent_id == Job.id, child.c.status.in_(active))
            job_ids = session.execute(select(Job.id).where(
                Job.kind == PIPELINE_KIND, Job.status.in_(active), ~unfinished.exists())).scalars().all()
        for job_id in job_ids:
            with self.db.session() as session:
                parent = locked_job(session, job_id)
                if parent is None or not reconcile(session, parent):
                    continue
                session.commit()
                status = parent.status
            report.pipelines_reconciled += 1
            self.bus.publish(job_id, "completed", {"status": status})
