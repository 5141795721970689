"""Submitting, listing, canceling and deleting jobs through the service (no HTTP)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from api.core import ledger
from api.core.errors import (
    ConcurrencyLimit,
    Conflict,
    ContentPolicy,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidInput,
    NotFound,
    RateLimited,
)
from api.core.jobs import JobStatus
from api.db.engine import Database
from api.db.tables import Job, JobEvent, Lora, Upload, utcnow
from api.services.jobs import JobService, Submission, decode_cursor, encode_cursor
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from tests.fixtures.harness import add_user, balance, get_job, job_count, ledger_rows


def sub(model: str = "tiny-sd", **input: Any) -> Submission:
    return Submission(model, {"prompt": "a cat", **input})


@pytest.fixture
def alice(db: Database, settings: Settings) -> NewUser:
    return add_user(db, settings, credits=100)


def test_submit_reserves_and_queues(jobs: JobService, db: Database, alice: NewUser) -> None:
    job, created = jobs.submit(alice.user, sub(width=128, height=128))
    assert created
    stored = get_job(db, job.id)
    assert (stored.status, stored.stage, stored.kind, stored.task, stored.credits_reserved) == (
        "queued", "queued", "image", "t2i", 4)
    assert stored.max_attempts == 3
    assert balance(db, alice.user.id) == ledger.BalanceView(96, 4)
    assert [(e.kind, e.amount, e.job_id) for e in ledger_rows(db, alice.user.id)][-1] == ("reserve", 4, job.id)
    with db.read() as s:
        events = s.query(JobEvent).filter(JobEvent.job_id == job.id).all()
    assert [(e.type, e.data["status"]) for e in events] == [("status", "queued")]


def _nothing_moved(db: Database, user: NewUser, credits: int = 100) -> None:
    assert job_count(db, user.user.id) == 0
    assert balance(db, user.user.id) == ledger.BalanceView(credits, 0)
    assert [e.kind for e in ledger_rows(db, user.user.id)] == ["grant"]


def test_insufficient_credits_creates_nothing(jobs: JobService, db: Database, settings: Settings) -> None:
    poor = add_user(db, settings, credits=39)
    with pytest.raises(InsufficientCredits) as info:
        jobs.submit(poor.user, sub("veo-3.1", duration=4))
    assert info.value.details == {"required": 40, "available": 39}
    _nothing_moved(db, poor, 39)


@pytest.mark.parametrize(("model", "raw", "error"), [
    ("nope", {}, InvalidInput),
    ("tiny-sd", {"width": 1000}, InvalidInput),
    ("tiny-sd", {"prompt": "x" * 501}, InvalidInput),
    ("veo-3.1", {"duration": 5}, InvalidInput),
    ("tiny-sd", {"prompt": "some GORE here"}, ContentPolicy),
    ("tiny-sd", {"negative_prompt": "gore"}, ContentPolicy),
])
def test_refused_before_any_charge(jobs: JobService, db: Database, alice: NewUser, model: str,
                                   raw: dict[str, Any], error: type[Exception]) -> None:
    jobs.settings = jobs.settings.model_copy(update={"content_policy_words": ["gore"]})
    with pytest.raises(error):
        jobs.submit(alice.user, sub(model, **raw))
    _nothing_moved(db, alice)


def test_disabled_model_is_refused(jobs: JobService, catalog: Catalog, db: Database, alice: NewUser) -> None:
    spec = catalog.get("tiny-sd")
    assert spec is not None
    catalog.replace(spec.model_copy(update={"enabled": False}))
    with pytest.raises(InvalidInput, match="disabled"):
        jobs.submit(alice.user, sub())
    _nothing_moved(db, alice)


@pytest.mark.parametrize(("webhook", "events"), [
    ("ftp://example.com/hook", None), ("not a url", None), ("https://", None),
    ("https://example.com/hook", ["start", "finished"]),
])
def test_bad_webhook_is_refused(jobs: JobService, db: Database, alice: NewUser, webhook: str,
                                events: list[str] | None) -> None:
    with pytest.raises(InvalidInput):
        jobs.submit(alice.user, Submission("tiny-sd", {"prompt": "p"}, webhook, events))
    _nothing_moved(db, alice)


def test_active_jobs_limit(jobs: JobService, db: Database, alice: NewUser) -> None:
    for _ in range(3):
        jobs.submit(alice.user, sub())
    with pytest.raises(ConcurrencyLimit):
        jobs.submit(alice.user, sub())
    assert job_count(db, alice.user.id) == 3
    assert balance(db, alice.user.id) == ledger.BalanceView(97, 3)


def test_finished_jobs_do_not_count_as_active(jobs: JobService, db: Database, alice: NewUser) -> None:
    first, _ = jobs.submit(alice.user, sub())
    jobs.submit(alice.user, sub())
    jobs.submit(alice.user, sub())
    jobs.cancel(alice.user, first.id)
    jobs.submit(alice.user, sub())
    assert job_count(db, alice.user.id) == 4


def test_rate_limit_per_minute(jobs: JobService, db: Database, alice: NewUser) -> None:
    jobs.settings = jobs.settings.model_copy(update={"max_active_jobs": 100})
    for _ in range(5):
        jobs.submit(alice.user, sub())
    with pytest.raises(RateLimited):
        jobs.submit(alice.user, sub())
    assert job_count(db, alice.user.id) == 5
    # A minute later the window has moved on.
    with db.session() as s:
        s.execute(update(Job).values(created_at=utcnow() - timedelta(seconds=61)))
        s.commit()
    jobs.submit(alice.user, sub())


def test_plan_overrides_the_limits(jobs: JobService, db: Database, settings: Settings) -> None:
    studio = add_user(db, settings, plan="studio", credits=100)
    for _ in range(6):
        jobs.submit(studio.user, sub())
    with pytest.raises(ConcurrencyLimit):
        jobs.submit(studio.user, sub())


def test_plan_prompt_limit_override(jobs: JobService, db: Database, settings: Settings) -> None:
    from api.settings import Plan, PlanLimits

    jobs.settings = settings.model_copy(update={"plans": [
        *settings.plans, Plan(id="wordy", name="Wordy", limits=PlanLimits(max_prompt_chars=1000))]})
    wordy = add_user(db, jobs.settings, plan="wordy", credits=10)
    plain = add_user(db, settings, credits=10)
    jobs.submit(wordy.user, sub(prompt="x" * 900))
    with pytest.raises(InvalidInput):
        jobs.submit(plain.user, sub(prompt="x" * 900))


# idempotency ---------------------------------------------------------------------------------
def test_same_key_same_body_replays(jobs: JobService, db: Database, alice: NewUser) -> None:
    first, created = jobs.submit(alice.user, sub(seed=1), idempotency_key="k1")
    again, created_again = jobs.submit(alice.user, sub(seed=1), idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    assert job_count(db, alice.user.id) == 1
    assert balance(db, alice.user.id) == ledger.BalanceView(99, 1)


def test_same_key_other_body_conflicts(jobs: JobService, db: Database, alice: NewUser) -> None:
    first, _ = jobs.submit(alice.user, sub(seed=1), idempotency_key="k1")
    with pytest.raises(IdempotencyConflict) as info:
        jobs.submit(alice.user, sub(seed=2), idempotency_key="k1")
    assert info.value.status == 409 and info.value.details == {"job_id": first.id}
    assert job_count(db, alice.user.id) == 1


def test_idempotency_keys_are_per_user(jobs: JobService, db: Database, settings: Settings, alice: NewUser) -> None:
    bob = add_user(db, settings, credits=10)
    a, _ = jobs.submit(alice.user, sub(), idempotency_key="shared")
    b, created = jobs.submit(bob.user, sub(), idempotency_key="shared")
    assert created and a.id != b.id


@pytest.mark.parametrize("key", ["", "k" * 201])
def test_idempotency_key_length(jobs: JobService, db: Database, alice: NewUser, key: str) -> None:
    with pytest.raises(InvalidInput):
        jobs.submit(alice.user, sub(), idempotency_key=key)
    _nothing_moved(db, alice)


# references ----------------------------------------------------------------------------------
def _upload(db: Database, user: NewUser, kind: str = "image") -> str:
    with db.session() as s:
        row = Upload(user_id=user.user.id, key=f"uploads/{user.user.id}/x.png", content_type="image/png", size=1,
                     kind=kind)
        s.add(row)
        s.commit()
        return row.id


def test_input_image_must_be_the_callers_upload(jobs: JobService, db: Database, settings: Settings,
                                                alice: NewUser) -> None:
    bob = add_user(db, settings, credits=10)
    mine, theirs, dataset = _upload(db, alice), _upload(db, bob), _upload(db, alice, "dataset")
    job, _ = jobs.submit(alice.user, sub(image=mine))
    assert job.task == "i2i"
    for ref in (theirs, dataset, "upl_missing"):
        with pytest.raises(InvalidInput):
            jobs.submit(alice.user, sub(image=ref))
    assert job_count(db, alice.user.id) == 1
    assert balance(db, alice.user.id) == ledger.BalanceView(99, 1)


def test_input_image_from_a_finished_job(jobs: JobService, db: Database, settings: Settings,
                                         alice: NewUser) -> None:
    bob = add_user(db, settings, credits=10)
    source, _ = jobs.submit(alice.user, sub())
    with pytest.raises(InvalidInput, match="not a finished image job"):
        jobs.submit(alice.user, sub(image=f"job:{source.id}"))
    with db.session() as s:
        s.execute(update(Job).where(Job.id == source.id).values(
            status="succeeded", outputs=[{"key": "outputs/x/0.png", "content_type": "image/png"}]))
        s.commit()
    job, _ = jobs.submit(alice.user, sub(image=f"job:{source.id}"))
    assert job.input["image"] == f"job:{source.id}"
    with pytest.raises(InvalidInput, match="not found"):
        jobs.submit(bob.user, sub(image=f"job:{source.id}"))


def test_input_image_url_is_taken_as_given(jobs: JobService, alice: NewUser) -> None:
    job, _ = jobs.submit(alice.user, sub(image="https://example.com/cat.png"))
    assert job.input["image"] == "https://example.com/cat.png"


def test_loras_must_be_the_callers_and_trained(jobs: JobService, db: Database, settings: Settings,
                                               alice: NewUser) -> None:
    bob = add_user(db, settings, credits=10)
    with db.session() as s:
        ready = Lora(user_id=alice.user.id, name="me", base_model="tiny-sd", status="succeeded",
                     weights_key="loras/me.safetensors")
        pending = Lora(user_id=alice.user.id, name="wip", base_model="tiny-sd", status="running")
        other_base = Lora(user_id=alice.user.id, name="wan", base_model="tiny-wan", status="succeeded",
                          weights_key="k")
        theirs = Lora(user_id=bob.user.id, name="bob", base_model="tiny-sd", status="succeeded", weights_key="k")
        s.add_all([ready, pending, other_base, theirs])
        s.commit()
    jobs.submit(alice.user, sub(loras=[{"id": ready.id, "scale": 0.7}]))
    with pytest.raises(NotFound):
        jobs.submit(alice.user, sub(loras=[{"id": theirs.id}]))
    with pytest.raises(InvalidInput, match="not trained"):
        jobs.submit(alice.user, sub(loras=[{"id": pending.id}]))
    with pytest.raises(InvalidInput, match="trained on tiny-wan"):
        jobs.submit(alice.user, sub(loras=[{"id": other_base.id}]))
    assert job_count(db, alice.user.id) == 1


# reading -------------------------------------------------------------------------------------
def test_get_hides_other_users_jobs(jobs: JobService, db: Database, settings: Settings, alice: NewUser) -> None:
    bob = add_user(db, settings, credits=10)
    job, _ = jobs.submit(alice.user, sub())
    assert jobs.get(alice.user, job.id).id == job.id
    assert jobs.get(None, job.id).id == job.id  # the admin view
    with pytest.raises(NotFound):
        jobs.get(bob.user, job.id)
    with pytest.raises(NotFound):
        jobs.get(alice.user, "job_missing")


def test_list_pages_with_a_cursor(jobs: JobService, db: Database, alice: NewUser) -> None:
    jobs.settings = jobs.settings.model_copy(update={"max_active_jobs": 100, "rate_limit_per_minute": 100})
    ids = [jobs.submit(alice.user, sub())[0].id for _ in range(7)]
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page, cursor = jobs.list(alice.user, cursor=cursor, limit=3)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each once


def test_list_cursor_with_equal_timestamps(jobs: JobService, db: Database, alice: NewUser) -> None:
    jobs.settings = jobs.settings.model_copy(update={"max_active_jobs": 100, "rate_limit_per_minute": 100})
    ids = [jobs.submit(alice.user, sub())[0].id for _ in range(5)]
    same = utcnow()
    with db.session() as s:
        s.execute(update(Job).values(created_at=same))
        s.commit()
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page, cursor = jobs.list(alice.user, cursor=cursor, limit=2)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5


def test_list_filters(jobs: JobService, db: Database, settings: Settings, alice: NewUser) -> None:
    jobs.settings = jobs.settings.model_copy(update={"max_active_jobs": 100, "rate_limit_per_minute": 100})
    bob = add_user(db, settings, credits=100)
    image, _ = jobs.submit(alice.user, sub())
    video, _ = jobs.submit(alice.user, sub("veo-3.1", duration=4))
    canceled, _ = jobs.submit(alice.user, sub())
    jobs.cancel(alice.user, canceled.id)
    jobs.submit(bob.user, sub())

    def ids(**kw: Any) -> set[str]:
        return {j.id for j in jobs.list(alice.user, **kw)[0]}

    assert ids() == {image.id, video.id, canceled.id}
    assert ids(kind="video") == {video.id}
    assert ids(kind="image") == {image.id, canceled.id}
    assert ids(status="queued") == {image.id, video.id}
    assert ids(status="canceled") == {canceled.id}
    assert ids(status="queued,canceled") == {image.id, video.id, canceled.id}
    assert ids(model="veo-3.1") == {video.id}
    assert ids(status="succeeded") == set()
    assert len(jobs.list(None)[0]) == 4  # admin: every user's
    with pytest.raises(InvalidInput):
        jobs.list(alice.user, status="done")
    with pytest.raises(InvalidInput):
        jobs.list(alice.user, cursor="!!garbage!!")


def test_cursor_round_trip(jobs: JobService, alice: NewUser) -> None:
    job, _ = jobs.submit(alice.user, sub())
    created, job_id = decode_cursor(encode_cursor(job))
    assert job_id == job.id and created == job.created_at


# changes -------------------------------------------------------------------------------------
def test_cancel_queued_refunds_now(jobs: JobService, db: Database, alice: NewUser) -> None:
    job, _ = jobs.submit(alice.user, sub("veo-3.1", duration=4))
    assert balance(db, alice.user.id) == ledger.BalanceView(60, 40)
    canceled = jobs.cancel(alice.user, job.id)
    assert canceled.status == "canceled" and canceled.credits_refunded == 40
    assert balance(db, alice.user.id) == ledger.BalanceView(100, 0)
    # Canceling again changes nothing.
    jobs.cancel(alice.user, job.id)
    assert [e.kind for e in ledger_rows(db, job_id=job.id)] == ["reserve", "refund"]


def test_cancel_running_asks_the_runner(jobs: JobService, db: Database, alice: NewUser) -> None:
    job, _ = jobs.submit(alice.user, sub())
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(status="running", lease_owner="r1"))
        s.commit()
    result = jobs.cancel(alice.user, job.id)
    assert result.status == "running" and result.cancel_requested
    assert balance(db, alice.user.id) == ledger.BalanceView(99, 1)  # the runner refunds when it stops


def test_cancel_someone_elses_job_is_not_found(jobs: JobService, db: Database, settings: Settings,
                                               alice: NewUser) -> None:
    bob = add_user(db, settings, credits=10)
    job, _ = jobs.submit(alice.user, sub())
    with pytest.raises(NotFound):
        jobs.cancel(bob.user, job.id)
    assert get_job(db, job.id).status == JobStatus.QUEUED


def test_delete_outputs(jobs: JobService, db: Database, storage: LocalStorage, alice: NewUser) -> None:
    job, _ = jobs.submit(alice.user, sub())
    with pytest.raises(Conflict) as info:
        jobs.delete_outputs(alice.user, job.id)
    assert info.value.code == "job_active"
    key = f"outputs/{alice.user.id}/{job.id}/0.png"
    storage.put_bytes(key, b"png", "image/png")
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(
            status="succeeded", outputs=[{"key": key, "content_type": "image/png"}]))
        s.commit()
    deleted = jobs.delete_outputs(alice.user, job.id)
    assert deleted.outputs == [] and deleted.outputs_deleted_at is not None
    assert not storage.exists(key)
    assert get_job(db, job.id).status == "succeeded"  # the job and its ledger stay


@pytest.mark.postgres
def test_cancel_waits_for_the_job_row_lock_so_event_ids_commit_in_order(
        backend_db: Database, settings: Settings, catalog: Catalog, storage: LocalStorage) -> None:
    """While a runner holds the job's row (recording an event), a cancel waits for it: the
    cancel's event then gets a later id than the runner's and commits after it, so an SSE reader
    that has seen the later id never misses the earlier one."""
    import threading

    from api.services.events import EventBus, record_event
    from api.services.settlement import locked_job

    if backend_db.engine.dialect.name != "postgresql":
        pytest.skip("row locks are a PostgreSQL matter (SQLite writers are serial)")
    service = JobService(backend_db, settings, catalog, storage, EventBus(), metrics=None)
    user = add_user(backend_db, settings)
    job, _ = service.submit(user.user, sub())
    with backend_db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(status="running", lease_owner="r1"))
        s.commit()
    done = threading.Event()
    with backend_db.session() as runner_session:
        assert locked_job(runner_session, job.id) is not None  # the runner's transaction holds the row
        canceler = threading.Thread(target=lambda: (service.cancel(user.user, job.id), done.set()))
        canceler.start()
        assert not done.wait(1.0), "cancel did not wait for the job's row lock"
        runner_event = record_event(runner_session, job.id, "progress", {"progress": 0.5})
        runner_session.commit()
        runner_id = runner_event.id
    canceler.join(timeout=30)
    assert done.is_set()
    with backend_db.read() as s:
        events = s.execute(select(JobEvent.id, JobEvent.type).where(JobEvent.job_id == job.id)
                           .order_by(JobEvent.id)).all()
    assert [t for _, t in events][-2:] == ["progress", "logs"]
    assert events[-1][0] > runner_id
