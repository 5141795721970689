"""Queue position and ETA: the pure claim-order simulation, the ETA arithmetic, and the service
over a real database (its order is pinned against ``Runner.claim_next`` itself)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from api.core.queueing import (
    QueuedJob,
    claim_order,
    finish_times,
    running_remaining,
    seconds_per_unit,
    work_units,
)
from api.db.engine import Database
from api.db.tables import Job, User, utcnow
from api.runner.runner import Runner
from api.services.events import EventBus
from api.services.jobs import JobService, Submission
from api.services.queue import QueueService
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import add_user

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def q(job_id: str, user: str, seconds: float, priority: int = 0) -> QueuedJob:
    return QueuedJob(job_id, user, priority, T0 + timedelta(seconds=seconds))


# the claim order (pure) ---------------------------------------------------------------------
def test_users_take_turns_oldest_first_when_none_was_served() -> None:
    jobs = [q("a1", "a", 0), q("a2", "a", 1), q("a3", "a", 2), q("b1", "b", 3), q("c1", "c", 4), q("b2", "b", 5)]
    assert claim_order(jobs, {}) == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_the_user_served_least_recently_goes_first() -> None:
    jobs = [q("a1", "a", 0), q("b1", "b", 1), q("c1", "c", 2)]
    served = {"a": T0 + timedelta(seconds=30), "b": T0 + timedelta(seconds=10), "c": None}
    assert claim_order(jobs, served) == ["c1", "b1", "a1"]


def test_priority_before_fairness_and_age() -> None:
    jobs = [q("a1", "a", 0), q("b1", "b", 1), q("s1", "s", 9, priority=3), q("s2", "s", 10, priority=3),
            q("m1", "m", 8, priority=1)]
    # the studio user's two jobs first (one user alone at that tier), then the creator tier, then the rest
    assert claim_order(jobs, {}) == ["s1", "s2", "m1", "a1", "b1"]


def test_a_users_higher_priority_job_goes_before_their_older_one() -> None:
    jobs = [q("a1", "a", 0), q("a2", "a", 1, priority=2), q("b1", "b", 2)]
    assert claim_order(jobs, {}) == ["a2", "b1", "a1"]


def test_naive_and_aware_timestamps_compare_alike() -> None:
    """SQLite gives naive UTC datetimes back; both kinds must order the same."""
    naive = [QueuedJob("x1", "x", 0, datetime(2026, 1, 1, 0, 0, 5)), q("y1", "y", 1)]
    assert claim_order(naive, {}) == ["y1", "x1"]


# the ETA arithmetic (pure) --------------------------------------------------------------------
def test_work_units_and_the_median_rate() -> None:
    assert work_units({"steps": 4, "width": 64, "height": 32}) == 4 * 64 * 32
    assert work_units({"steps": 4, "num_frames": 9, "width": 8, "height": 8, "prompt": "x"}) == 4 * 9 * 64
    assert work_units({"prompt": "x", "steps": True}) == 1.0
    samples = [(2.0, {"steps": 10}), (4.0, {"steps": 10}), (100.0, {"steps": 10}), (0.0, {"steps": 1})]
    assert seconds_per_unit(samples) == pytest.approx(0.4)  # the median; an unmeasured 0 s is left out
    assert seconds_per_unit([]) is None


def test_finish_times_over_slots() -> None:
    # one slot busy for 3 s: jobs of 2 s each end at 5, 7, 9
    assert finish_times([3.0], [2.0, 2.0, 2.0], slots=1) == [5.0, 7.0, 9.0]
    # two slots, one busy for 3 s: the first job takes the free slot
    assert finish_times([3.0], [2.0, 2.0, 2.0], slots=2) == [2.0, 4.0, 5.0]
    # more running than slots (waiting at the replica): they hold the slots in turn
    assert finish_times([1.0, 1.0], [1.0], slots=1) == [3.0]
    # an unknown duration makes it and everything after it unknown
    assert finish_times([], [1.0, None, 1.0], slots=1) == [1.0, None, None]


def test_running_remaining() -> None:
    assert running_remaining(10.0, 4.0, 0.2) == pytest.approx(8.0)  # estimate × progress left wins
    assert running_remaining(10.0, 4.0, 0.5) == pytest.approx(6.0)  # estimate less elapsed
    assert running_remaining(10.0, 30.0, 0.9) == pytest.approx(1.0)  # overdue: the share left
    assert running_remaining(None, 6.0, 0.75) == pytest.approx(2.0)  # its own pace
    assert running_remaining(None, 6.0, 0.0) is None


# the service on a database ---------------------------------------------------------------------
def insert_job(db: Database, user_id: str, *, created: datetime, status: str = "queued", priority: int = 0,
               model: str = "tiny-sd", steps: int = 4, run_s: float | None = None, progress: float = 0.0,
               started: datetime | None = None, provider: str | None = None) -> str:
    job = Job(user_id=user_id, model=model, kind="image", task="t2i", priority=priority, status=status,
              input={"prompt": "x", "steps": steps, "width": 64, "height": 64}, created_at=created,
              run_s=run_s, progress=progress, started_at=started, provider=provider,
              completed_at=created if status == "succeeded" else None)
    with db.session() as session:
        session.add(job)
        session.commit()
        return job.id


def served(db: Database, user_id: str, when: datetime | None) -> None:
    with db.session() as session:
        user = session.get(User, user_id)
        assert user is not None
        user.last_served_at = when
        session.commit()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def either_db(request: pytest.FixtureRequest, settings: Settings) -> Iterator[tuple[Database, Settings]]:
    """The test database on SQLite, and on PostgreSQL when one is configured (NULLS FIRST, time zones)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("db"), settings
        return
    s = settings.model_copy(update={"database_url": request.getfixturevalue("pg_url")})
    database = Database(s)
    database.migrate()
    yield database, s
    database.dispose()


def test_positions_match_the_order_claim_next_takes(either_db: tuple[Database, Settings], storage: LocalStorage,
                                                    catalog: Catalog) -> None:
    """The simulation against the runner's own claims: three users, a priority tier, a user served
    before, several models (one model's claims move the users' turns for the others)."""
    db, settings = either_db
    a, b, c = (add_user(db, settings).user for _ in range(3))
    now = utcnow()
    served(db, a.id, now - timedelta(seconds=5))
    served(db, b.id, now - timedelta(seconds=50))
    ids = [insert_job(db, a.id, created=now - timedelta(seconds=40)),
           insert_job(db, a.id, created=now - timedelta(seconds=39), model="tiny-wan"),
           insert_job(db, b.id, created=now - timedelta(seconds=30)),
           insert_job(db, b.id, created=now - timedelta(seconds=29)),
           insert_job(db, c.id, created=now - timedelta(seconds=20), model="tiny-wan"),
           insert_job(db, c.id, created=now - timedelta(seconds=10), priority=2),
           insert_job(db, a.id, created=now - timedelta(seconds=9))]
    expired = insert_job(db, c.id, created=now - timedelta(seconds=60))  # its Cancel-After passed: never started
    with db.session() as session:
        row = session.get(Job, expired)
        assert row is not None
        row.start_deadline_at = now - timedelta(seconds=1)
        session.commit()
    service = QueueService(db, settings, catalog)
    with db.read() as session:
        rows = [session.get(Job, i) for i in ids]
    estimates = service.estimates([r for r in rows if r is not None])
    positions = {i: estimates[i].queue_position for i in ids}

    runner = Runner(db, FakeExecutor(storage=storage), settings, storage, EventBus(), runner_id="r1")
    claimed: list[Job] = []
    for _ in range(len(ids) + 1):
        job = runner.claim_next()
        if job is None:
            break
        claimed.append(job)
    assert sorted(j.id for j in claimed) == sorted(ids)
    for model in ("tiny-sd", "tiny-wan"):
        started = [j.id for j in claimed if j.model == model]
        assert [positions[i] for i in started] == list(range(len(started))), (model, positions)
    assert positions[ids[5]] == 0  # the priority job, submitted late, is next for its model
    assert expired not in {j.id for j in claimed}
    with db.read() as session:
        expired_job = session.get(Job, expired)
    assert expired_job is not None and service.estimate(expired_job).queue_position is None


def test_eta_from_measured_runs_scaled_to_the_request(db: Database, settings: Settings, catalog: Catalog) -> None:
    s = settings.model_copy(update={"queue_slots_per_model": 1})
    user = add_user(db, s).user
    now = utcnow()
    service = QueueService(db, s, catalog)
    first = insert_job(db, user.id, created=now - timedelta(seconds=3), steps=4)
    with db.read() as session:
        job = session.get(Job, first)
    assert job is not None
    # nothing measured yet: a position, no ETA (never a made-up constant)
    assert service.estimate(job).queue_position == 0 and service.estimate(job).eta_s is None

    # measured: 4-step jobs took 2 s (median of 1, 2, 9); a provider's run does not count
    for run_s in (1.0, 2.0, 9.0):
        insert_job(db, user.id, created=now - timedelta(seconds=100), status="succeeded", steps=4, run_s=run_s)
    insert_job(db, user.id, created=now - timedelta(seconds=99), status="succeeded", steps=4, run_s=500.0,
               provider="replicate")
    running = insert_job(db, user.id, created=now - timedelta(seconds=60), status="running", steps=4,
                         started=now - timedelta(seconds=1), progress=0.25)
    second = insert_job(db, user.id, created=now - timedelta(seconds=2), steps=8)
    service = QueueService(db, s, catalog)  # a fresh cache
    with db.read() as session:
        jobs = [session.get(Job, i) for i in (first, second, running)]
    est = service.estimates([j for j in jobs if j is not None])
    assert est[running].queue_position is None
    assert est[running].eta_s == pytest.approx(1.5, abs=0.2)  # 2 s × 75 % left
    assert (est[first].queue_position, est[second].queue_position) == (0, 1)
    assert est[first].eta_s == pytest.approx(1.5 + 2.0, abs=0.2)
    assert est[second].eta_s == pytest.approx(1.5 + 2.0 + 4.0, abs=0.2)  # twice the steps, twice the time

    # two slots: the first queued job does not wait for the running one
    two = QueueService(db, s.model_copy(update={"queue_slots_per_model": 2}), catalog)
    est2 = two.estimates([j for j in jobs if j is not None])
    assert est2[first].eta_s == pytest.approx(2.0, abs=0.2)
    assert est2[second].eta_s == pytest.approx(1.5 + 4.0, abs=0.2)


def test_slots_follow_the_spec_and_the_runner(db: Database, settings: Settings, catalog: Catalog) -> None:
    spec = catalog.get("tiny-sd")
    assert spec is not None
    service = QueueService(db, settings.model_copy(update={"runner_concurrency": 32}), catalog)
    assert service.slots("tiny-sd") == min(32, spec.serving.max_replicas)
    assert QueueService(db, settings.model_copy(update={"runner_concurrency": 1}), catalog).slots("tiny-sd") == 1
    assert QueueService(db, settings.model_copy(update={"queue_slots_per_model": 3}), catalog).slots("tiny-sd") == 3


def test_finished_jobs_have_no_estimate(db: Database, settings: Settings, catalog: Catalog) -> None:
    user = add_user(db, settings).user
    done = insert_job(db, user.id, created=utcnow(), status="succeeded", run_s=1.0)
    with db.read() as session:
        job = session.get(Job, done)
    assert job is not None
    est = QueueService(db, settings, catalog).estimate(job)
    assert (est.queue_position, est.eta_s) == (None, None)


# priority tiers by plan -------------------------------------------------------------------------
def test_the_plan_sets_the_priority(jobs: JobService, db: Database, settings: Settings) -> None:
    free = add_user(db, settings, plan="free", credits=50).user
    studio = add_user(db, settings, plan="studio", credits=50).user
    creator = add_user(db, settings, plan="creator", credits=50).user
    sub = Submission("tiny-sd", {"prompt": "a cat"})
    priorities: dict[str, Any] = {}
    for user in (free, studio, creator):
        job, _ = jobs.submit(user, sub)
        priorities[user.plan] = job.priority
    assert priorities == {"free": 0, "studio": 3, "creator": 2}
    # an explicit priority may raise a job above its plan's tier, never lower it
    raised, _ = jobs.submit(free, Submission("tiny-sd", {"prompt": "a dog"}, priority=5))
    kept, _ = jobs.submit(studio, Submission("tiny-sd", {"prompt": "a dog"}, priority=1))
    assert (raised.priority, kept.priority) == (5, 3)


# when an SSE stream sends a queue event --------------------------------------------------------
def test_queue_event_on_a_move_not_on_every_tick() -> None:
    from api.http.routes.jobs import queue_changed
    from api.services.queue import QueueEstimate as E

    assert queue_changed(None, E(3, None))  # the first one
    assert queue_changed(E(3, 40.0), E(2, 40.0))  # the position moved
    assert not queue_changed(E(3, 40.0), E(3, 39.0))  # the ETA counting down
    assert queue_changed(E(3, 40.0), E(3, 30.0))  # the ETA moved by more than 10 %
    assert not queue_changed(E(3, 10.0), E(3, 8.5)) and queue_changed(E(3, 10.0), E(3, 7.5))  # at least 2 s
    assert queue_changed(E(3, None), E(3, 12.0)) and queue_changed(E(3, 12.0), E(3, None))  # appeared, vanished
    assert not queue_changed(E(3, None), E(3, None))
