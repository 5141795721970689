"""Operator views: users with balances, credit grants, stats over jobs, credits and overflow."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select

from api.core import ledger
from api.core.errors import InvalidInput
from api.db.engine import Database
from api.db.tables import Job, LedgerEntry, User
from api.services.users import get_user
from api.settings import Settings

#: the provider name the router records for a run on a local replica (``serve.router.LOCAL``)
LOCAL_PROVIDER = "local"


class AdminService:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    def list_users(self, limit: int = 100, offset: int = 0, q: str | None = None) -> list[tuple[User, ledger.BalanceView]]:
        """Oldest first; ``q``: only users whose email contains it (any case)."""
        query = select(User)
        if q:
            query = query.where(func.lower(User.email).contains(q.lower(), autoescape=True))
        with self.db.read() as session:
            users = session.execute(query.order_by(User.created_at, User.id).offset(offset).limit(limit)).scalars().all()
            return [(u, ledger.get_balance(session, u.id)) for u in users]

    def user(self, user_id: str) -> tuple[User, ledger.BalanceView]:
        with self.db.read() as session:
            user = get_user(session, user_id)
            return user, ledger.get_balance(session, user_id)

    def update_user(self, user_id: str, plan: str | None, disabled: bool | None) -> User:
        with self.db.session() as session:
            user = get_user(session, user_id)
            if plan is not None:
                try:
                    self.settings.plan(plan)
                except KeyError:
                    raise InvalidInput(f"unknown plan {plan!r}", {"field": "plan"}) from None
                user.plan = plan
            if disabled is not None:
                user.disabled = disabled
            session.commit()
            return user

    def grant(self, user_id: str, amount: int, kind: str, note: str, key: str | None) -> LedgerEntry:
        with self.db.session() as session:
            get_user(session, user_id)
            entry = ledger.credit(session, user_id, amount,
                                  f"admin:{user_id}:{key}" if key else f"admin:{uuid.uuid4().hex}",
                                  kind=ledger.EntryKind(kind), note=note or "admin grant")
            session.commit()
            return entry

    def stats(self) -> dict[str, Any]:
        with self.db.read() as session:
            by_status = session.execute(select(Job.model, Job.status, func.count()).group_by(Job.model, Job.status)).all()
            by_route = session.execute(select(Job.provider, Job.route_reason, func.count(), func.sum(Job.cost_usd))
                                       .where(Job.provider.is_not(None))
                                       .group_by(Job.provider, Job.route_reason)).all()
            credits = session.execute(select(LedgerEntry.kind, func.sum(LedgerEntry.amount), func.count())
                                      .group_by(LedgerEntry.kind)).all()
            run = session.execute(select(Job.model, func.avg(Job.run_s), func.avg(Job.queue_s))
                                  .where(Job.status == "succeeded").group_by(Job.model)).all()
            users = session.execute(select(func.count()).select_from(User)).scalar_one()
            failed = session.execute(select(Job.model, Job.error_code, func.count())
                                     .where(Job.status == "failed")
                                     .group_by(Job.model, Job.error_code)).all()
        jobs: dict[str, dict[str, int]] = {}
        for model, status, count in by_status:
            jobs.setdefault(model, {})[status] = count
        routes = [{"provider": p, "reason": r, "jobs": c, "cost_usd": round(float(s or 0), 4)}
                  for p, r, c, s in by_route]
        return {
            "users": users,
            "jobs": jobs,
            "outcomes": _outcomes(jobs),
            "failures": sorted(({"model": m, "code": code or "unknown", "jobs": n} for m, code, n in failed),
                               key=lambda f: (-f["jobs"], f["model"], f["code"])),
            "overflow": _overflow(routes),
            "routes": routes,
            "credits": {kind: {"amount": int(total or 0), "entries": n} for kind, total, n in credits},
            "timings": {model: {"avg_run_s": _round(r), "avg_queue_s": _round(q)} for model, r, q in run},
        }


def _outcomes(jobs: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Totals over every model; the success rate counts finished jobs that were not canceled
    (a cancel is the user's choice, not a failure), None before the first one finishes."""
    totals: dict[str, int] = {}
    for counts in jobs.values():
        for status, n in counts.items():
            totals[status] = totals.get(status, 0) + n
    succeeded, failed = totals.get("succeeded", 0), totals.get("failed", 0)
    decided = succeeded + failed
    return {"total": sum(totals.values()), "by_status": totals,
            "success_rate": round(succeeded / decided, 4) if decided else None}


def _overflow(routes: list[dict[str, Any]]) -> dict[str, Any]:
    """Jobs that ran at a fallback provider instead of a local replica, by provider and reason."""
    remote = [r for r in routes if r["provider"] != LOCAL_PROVIDER]
    by_provider: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    for r in remote:
        by_provider[r["provider"]] = by_provider.get(r["provider"], 0) + r["jobs"]
        reason = r["reason"] or "unknown"
        by_reason[reason] = by_reason.get(reason, 0) + r["jobs"]
    return {"jobs": sum(r["jobs"] for r in remote), "by_provider": by_provider, "by_reason": by_reason,
            "cost_usd": round(sum(r["cost_usd"] for r in remote), 4)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)
