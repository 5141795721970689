"""Property test: random sequences of submit, claim, succeed, fail, retry, cancel, grant, expiry and
lease loss over a few users, through the real services, runner settlement and ledger on SQLite.

After every step, for every user: granted − captured − expired = available + reserved;
available ≥ 0; at most one capture and one refund per job, never both; and the job's status agrees
with its settlement.
"""

from __future__ import annotations

import shutil
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select, update

from api.core import ledger
from api.core.errors import ConcurrencyLimit, InsufficientCredits
from api.core.events import DoneEvent, ErrorEvent
from api.db.engine import Database
from api.db.tables import Balance, Job, LedgerEntry, utcnow
from api.metrics import Metrics
from api.runner.runner import LeaseLost, Runner
from api.services.events import EventBus
from api.services.jobs import JobService, Submission
from api.services.settlement import reclaim_expired
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from tests.fixtures.harness import add_user

SUBMISSIONS = [
    Submission("tiny-sd", {"prompt": "p"}),                                  # 1 credit
    Submission("tiny-sd", {"prompt": "p", "width": 128, "height": 128}),    # 4
    Submission("veo-3.1", {"prompt": "p", "duration": 4}),                   # 40
    Submission("veo-3.1", {"prompt": "p", "duration": 8, "resolution": "1080p"}),  # 120
]


class World:
    """A migrated SQLite template; every example runs on its own copy (examples never interact)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.settings = Settings(data_dir=tmp / "template", signing_secret="s", max_active_jobs=4,
                                 rate_limit_per_minute=10**6, retry_backoff_s=0.0, max_attempts=2, _env_file=None)
        db = Database(self.settings)
        db.migrate()
        db.dispose()
        self.template = self.settings.data_dir / "cineweave.db"
        self.catalog = Catalog.load()
        self.storage = LocalStorage(tmp / "storage", signing_secret="s")

    def fresh(self) -> tuple[Settings, Database]:
        data_dir = self.tmp / uuid.uuid4().hex
        data_dir.mkdir()
        shutil.copyfile(self.template, data_dir / "cineweave.db")
        settings = self.settings.model_copy(update={"data_dir": data_dir})
        return settings, Database(settings)


WORLD: World | None = None


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert WORLD is not None
        self.settings, self.db = WORLD.fresh()
        self.storage = WORLD.storage
        self.bus = EventBus()
        self.jobs = JobService(self.db, self.settings, WORLD.catalog, self.storage, self.bus, metrics=Metrics())
        self.runners = [Runner(self.db, object(), self.settings, self.storage, self.bus,  # type: ignore[arg-type]
                               runner_id=f"r{i}") for i in range(2)]
        self.users: list[NewUser] = []
        self.job_ids: list[str] = []
        self.status: dict[str, str] = {}  # refreshed by the invariant after every step

    # helpers -------------------------------------------------------------------------------
    def _ids(self, status: str) -> list[str]:
        """This example's jobs in a status, in submission order (deterministic for replays)."""
        return [j for j in self.job_ids if self.status.get(j) == status]

    def _has(self, status: str) -> bool:
        return bool(self._ids(status))

    def _pick(self, status: str, index: int) -> Job | None:
        ids = self._ids(status)
        if not ids:
            return None
        with self.db.read() as s:
            return s.get(Job, ids[index % len(ids)])

    def _runner(self, job: Job) -> Runner:
        return next((r for r in self.runners if r.id == job.lease_owner), self.runners[0])

    # rules ---------------------------------------------------------------------------------
    @initialize(credits=st.lists(st.integers(0, 300), min_size=2, max_size=3))
    def make_users(self, credits: list[int]) -> None:
        for amount in credits:
            self.users.append(add_user(self.db, self.settings, email=f"{uuid.uuid4().hex}@p.test",
                                       credits=amount))

    @rule(user=st.integers(0, 2), which=st.integers(0, len(SUBMISSIONS) - 1), keyed=st.booleans())
    def submit(self, user: int, which: int, keyed: bool) -> None:
        owner = self.users[user % len(self.users)]
        key = f"idem-{which}" if keyed else None  # repeats replay the same job, charged once
        try:
            job, _ = self.jobs.submit(owner.user, SUBMISSIONS[which], idempotency_key=key)
        except (InsufficientCredits, ConcurrencyLimit):
            return
        if job.id not in self.job_ids:
            self.job_ids.append(job.id)

    @precondition(lambda self: self._has("queued"))
    @rule(runner=st.integers(0, 1))
    def claim(self, runner: int) -> None:
        job = self.runners[runner].claim_next()
        assert job is None or job.id in self.job_ids

    @precondition(lambda self: self._has("running"))
    @rule(index=st.integers(0, 50))
    def succeed(self, index: int) -> None:
        job = self._pick("running", index)
        if job is not None:
            self._runner(job)._settle_success(job.id, DoneEvent({"ok": True}))

    @precondition(lambda self: self._has("running"))
    @rule(index=st.integers(0, 50))
    def fail(self, index: int) -> None:
        job = self._pick("running", index)
        if job is not None:
            self._runner(job)._settle_error(job.id, ErrorEvent("boom", "broken input", retryable=False))

    @precondition(lambda self: self._has("running"))
    @rule(index=st.integers(0, 50))
    def retry(self, index: int) -> None:
        job = self._pick("running", index)
        if job is not None:
            self._runner(job)._settle_error(job.id, ErrorEvent("flaky", "try again", retryable=True))

    @precondition(lambda self: self._has("queued") or self._has("running"))
    @rule(index=st.integers(0, 50), running=st.booleans())
    def cancel(self, index: int, running: bool) -> None:
        job = self._pick("running" if running else "queued", index)
        if job is not None:
            owner = next(u for u in self.users if u.user.id == job.user_id)
            self.jobs.cancel(owner.user, job.id)

    @precondition(lambda self: self._has("running"))
    @rule(index=st.integers(0, 50))
    def lose_lease(self, index: int) -> None:
        """The runner of a job vanishes: its lease expires and is reclaimed; the old runner writes nothing."""
        job = self._pick("running", index)
        if job is None:
            return
        stale = self._runner(job)
        with self.db.session() as s:
            s.execute(update(Job).where(Job.id == job.id)
                      .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
            s.commit()
        reclaim_expired(self.db, self.settings, self.storage, self.bus)
        before = self._snapshot(job.id)
        with pytest.raises(LeaseLost):
            stale._settle_success(job.id, DoneEvent())
        assert self._snapshot(job.id) == before

    @rule(user=st.integers(0, 2), amount=st.integers(1, 200), kind=st.sampled_from(["grant", "purchase", "adjust"]))
    def grant(self, user: int, amount: int, kind: str) -> None:
        owner = self.users[user % len(self.users)]
        with self.db.session() as s:
            ledger.credit(s, owner.user.id, amount, f"g-{uuid.uuid4().hex}", kind=ledger.EntryKind(kind))
            s.commit()

    @rule(user=st.integers(0, 2), amount=st.integers(0, 400))
    def expire(self, user: int, amount: int) -> None:
        owner = self.users[user % len(self.users)]
        with self.db.session() as s:
            ledger.expire(s, owner.user.id, amount, f"e-{uuid.uuid4().hex}")
            s.commit()

    @precondition(lambda self: bool(self.job_ids))
    @rule(user=st.integers(0, 2))
    def regrant_same_key(self, user: int) -> None:
        """Replaying an operation with its key changes nothing."""
        owner = self.users[user % len(self.users)]
        with self.db.session() as s:
            first = ledger.credit(s, owner.user.id, 5, f"fixed-{owner.user.id}")
            again = ledger.credit(s, owner.user.id, 5, f"fixed-{owner.user.id}")
            s.commit()
        assert first.id == again.id

    def teardown(self) -> None:
        self.db.dispose()

    # checks --------------------------------------------------------------------------------
    def _snapshot(self, job_id: str) -> tuple:
        with self.db.read() as s:
            job = s.get(Job, job_id)
            rows = s.execute(select(LedgerEntry.kind).where(LedgerEntry.job_id == job_id)).scalars().all()
            assert job is not None
            bal = ledger.get_balance(s, job.user_id)
            return (job.status, job.lease_owner, job.credits_charged, job.credits_refunded, tuple(sorted(rows)), bal)

    @invariant()
    def books_balance_and_jobs_settle_once(self) -> None:
        self._books_balance()
        self._one_settlement_per_job()

    def _books_balance(self) -> None:
        with self.db.read() as s:
            for owner in self.users:
                uid = owner.user.id
                sums = Counter()
                for kind, amount in s.execute(select(LedgerEntry.kind, LedgerEntry.amount)
                                              .where(LedgerEntry.user_id == uid)).all():
                    sums[kind] += amount
                bal = s.get(Balance, uid)
                assert bal is not None
                s.refresh(bal)
                granted = sums["grant"] + sums["purchase"] + sums["adjust"]
                assert granted - sums["capture"] - sums["expire"] == bal.available + bal.reserved, (sums, bal)
                assert bal.available >= 0 and bal.reserved >= 0
                # what is reserved is exactly what active jobs hold
                active = s.execute(select(Job.credits_reserved).where(
                    Job.user_id == uid, Job.status.in_(["queued", "running"]))).scalars().all()
                assert bal.reserved == sum(active)
                assert sums["reserve"] - sums["capture"] - sums["refund"] == bal.reserved

    def _one_settlement_per_job(self) -> None:
        self.status = {}
        if not self.job_ids:
            return
        with self.db.read() as s:
            kinds: dict[str, Counter] = {}
            for job_id, kind in s.execute(select(LedgerEntry.job_id, LedgerEntry.kind)
                                          .where(LedgerEntry.job_id.in_(self.job_ids))).all():
                kinds.setdefault(job_id, Counter())[kind] += 1
            for job in s.execute(select(Job).where(Job.id.in_(self.job_ids))).scalars():
                self.status[job.id] = job.status
                k = kinds.get(job.id, Counter())
                assert k["reserve"] == 1 and k["capture"] <= 1 and k["refund"] <= 1, (job.id, k)
                assert not (k["capture"] and k["refund"]), (job.id, k)
                if job.status == "succeeded":
                    assert k["capture"] == 1 and job.credits_charged == job.credits_reserved
                elif job.status in ("failed", "canceled"):
                    assert k["refund"] == 1 and job.credits_refunded == job.credits_reserved
                    assert job.credits_charged == 0
                else:
                    assert not k["capture"] and not k["refund"]
                assert job.attempts <= job.max_attempts
                if job.cancel_requested:
                    assert job.status != "succeeded", job.id  # a canceled job is never charged


@pytest.mark.slow
def test_ledger_properties(tmp_path: Path) -> None:
    global WORLD
    WORLD = World(tmp_path)
    try:
        run_state_machine_as_test(LedgerMachine, settings=hsettings(
            max_examples=35, stateful_step_count=25, deadline=None, derandomize=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    finally:
        WORLD = None
