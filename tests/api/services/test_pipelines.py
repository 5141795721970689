"""Pipelines at the service level: validation before any charge, one reservation per step in one
transaction, steps released in order by the runner, failure/cancel refunding exactly the steps not
delivered (ledger rows counted), retries that never rerun a finished step, limits counting a
pipeline once, the reconcile safety net. Ledger tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, update

from api.core.errors import CineWeaveError, ConcurrencyLimit, IdempotencyConflict, InsufficientCredits
from api.core.events import ErrorEvent
from api.core.jobs import JobStatus
from api.db.engine import Database
from api.db.tables import Job, JobEvent, LedgerEntry, Upload, WebhookDelivery
from api.metrics import Metrics
from api.runner.runner import Runner
from api.services.events import EventBus, events_after
from api.services.inputs import InputResolver
from api.services.jobs import JobService, Submission
from api.services.maintenance import Maintenance
from api.services.pipelines import PipelineService, PipelineSubmission
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import add_user, balance, get_job, job_count, ledger_rows, wait_job, wait_until

STEPS: list[dict[str, Any]] = [
    {"name": "still", "model": "tiny-sd", "input": {"prompt": "one"}},
    {"name": "motion", "model": "tiny-wan-i2v", "input": {"prompt": "two", "image": "step:still"}},
    {"name": "fx", "op": "interpolate", "input": {"video": "step:motion", "fps": 16}},
]


@pytest.fixture
def psettings(backend_settings: Settings) -> Settings:
    return backend_settings.model_copy(update={"max_active_jobs": 50, "rate_limit_per_minute": 1000,
                                               "lease_s": 3.0, "retry_backoff_s": 0.05, "runner_poll_s": 0.02})


@pytest.fixture
def pdb(psettings: Settings) -> Iterator[Database]:
    database = Database(psettings)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def pjobs(pdb: Database, psettings: Settings, catalog: Catalog, storage: LocalStorage, bus: EventBus) -> JobService:
    return JobService(pdb, psettings, catalog, storage, bus, metrics=Metrics())


@pytest.fixture
def pipelines(pjobs: JobService) -> PipelineService:
    return PipelineService(pjobs)


@pytest.fixture
def alice(pdb: Database, psettings: Settings) -> NewUser:
    return add_user(pdb, psettings, credits=1000)


def runner_for(pjobs: JobService, executor: FakeExecutor, runner_id: str = "r1") -> Runner:
    return Runner(pjobs.db, executor, pjobs.settings, pjobs.storage, pjobs.bus, runner_id=runner_id,
                  metrics=Metrics())


def steps_of(pipelines: PipelineService, parent_id: str) -> dict[str, Job]:
    _parent, steps = pipelines.get(None, parent_id)
    return {s.step_name or "": s for s in steps}


def settlements(db: Database, job_id: str) -> list[str]:
    return [e.kind for e in ledger_rows(db, job_id=job_id) if e.kind != "reserve"]


def runs_per_step(executor: FakeExecutor, steps: dict[str, Job]) -> dict[str, int]:
    counts = Counter(r.job_id for r in executor.runs)
    return {name: counts[job.id] for name, job in steps.items()}


def parent_events(db: Database, parent_id: str) -> list[JobEvent]:
    with db.read() as session:
        return events_after(session, parent_id, 0)


# validation: 422 before any charge ------------------------------------------------------------------
def _step(name: str, **body: Any) -> dict[str, Any]:
    return {"name": name, **body}


INVALID: list[tuple[str, list[dict[str, Any]], str, str | None]] = [
    ("unknown step", [STEPS[0], _step("b", model="tiny-wan-i2v", input={"prompt": "p", "image": "step:nope"})],
     "pipeline_unknown_step", "b"),
    ("cycle", [_step("a", model="tiny-sd", input={"prompt": "p", "image": "step:b"}),
               _step("b", model="tiny-sd", input={"prompt": "p", "image": "step:a"})], "pipeline_cycle", "a"),
    ("upscale of a prompt", [_step("up", op="upscale", input={"prompt": "a cat", "scale": 2})],
     "pipeline_kind_mismatch", "up"),
    ("i2v from a video", [_step("m", model="tiny-wan", input={"prompt": "p"}),
                          _step("i", model="tiny-wan-i2v", input={"prompt": "p", "image": "step:m"})],
     "pipeline_kind_mismatch", "i"),
    ("trim of an image", [STEPS[0], _step("t", op="trim", input={"video": "step:still", "duration_s": 1})],
     "pipeline_kind_mismatch", "t"),
    ("too many steps", [_step(f"s{i}", model="tiny-sd", input={"prompt": "p"}) for i in range(9)],
     "pipeline_too_many_steps", None),
    ("bad step input", [STEPS[0], _step("b", model="tiny-sd", input={"prompt": "p", "width": 33})],
     "invalid_input", "b"),
    ("invalid model", [STEPS[0], _step("b", model="no-such-model", input={"prompt": "p"})], "invalid_input", "b"),
    ("bad op params", [*STEPS[:2], _step("t", op="trim", input={"video": "step:motion", "start_s": 36000})],
     "invalid_input", "t"),
    ("a text-only model given a step image", [STEPS[0], _step("m", model="tiny-wan",
                                                              input={"prompt": "p", "image": "step:still"})],
     "invalid_input", "m"),
]


@pytest.mark.parametrize(("what", "steps", "code", "step"), INVALID, ids=[c[0] for c in INVALID])
def test_validation_refuses_before_any_charge(db: Database, settings: Settings, jobs: JobService, what: str,
                                              steps: list[dict[str, Any]], code: str, step: str | None) -> None:
    user = add_user(db, settings, credits=1000)
    service = PipelineService(jobs)
    for call in (service.quote, service.submit):
        with pytest.raises(CineWeaveError) as info:
            call(user.user, PipelineSubmission(steps=steps))
        assert (info.value.status, info.value.code) == (422, code), what
        assert info.value.details.get("step") == step
    assert job_count(db, user.user.id) == 0
    assert [e.kind for e in ledger_rows(db, user.user.id)] == ["grant"]
    assert balance(db, user.user.id).available == 1000


def test_webhook_filter_takes_step_events_and_refuses_others(db: Database, settings: Settings,
                                                             jobs: JobService) -> None:
    user = add_user(db, settings, credits=100)
    service = PipelineService(jobs)
    parent, _ = service.submit(user.user, PipelineSubmission(
        steps=STEPS[:1], webhook="https://example.com/hook", webhook_events_filter=["step.completed", "completed"]))
    assert parent.webhook_events_filter == ["step.completed", "completed"]
    with pytest.raises(CineWeaveError) as info:
        service.submit(user.user, PipelineSubmission(steps=STEPS[:1], webhook="https://example.com/hook",
                                                     webhook_events_filter=["step.exploded"]))
    assert info.value.details["field"] == "webhook_events_filter"
    with pytest.raises(CineWeaveError):  # a plain job still takes only its own events
        jobs.submit(user.user, Submission("tiny-sd", {"prompt": "p"}, webhook="https://example.com/hook",
                                          webhook_events_filter=["step.completed"]))


def test_a_plain_job_cannot_name_a_step(db: Database, settings: Settings, jobs: JobService) -> None:
    user = add_user(db, settings, credits=100)
    with pytest.raises(CineWeaveError) as info:
        jobs.submit(user.user, Submission("tiny-sd", {"prompt": "p", "image": "step:still"}))
    assert info.value.status == 422 and job_count(db) == 0


# submission: the whole price at once ---------------------------------------------------------------
def test_submit_reserves_the_quoted_total_at_once(pdb: Database, pipelines: PipelineService,
                                                  alice: NewUser) -> None:
    quote = pipelines.quote(alice.user, PipelineSubmission(steps=STEPS))
    prices = {s.name: s.price for s in quote.plan.steps}
    assert quote.affordable and quote.total == sum(prices.values()) and job_count(pdb) == 0
    assert quote.plan.step("fx").output.num_frames == 34  # 17 frames at 8 fps, raised to 16 fps
    parent, created = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS))
    assert created and (parent.kind, parent.model, parent.task, parent.status) == (
        "pipeline", "pipeline", "pipeline", "waiting")
    assert parent.credits_reserved == quote.total
    assert [s["name"] for s in parent.input["steps"]] == ["still", "motion", "fx"]
    steps = steps_of(pipelines, parent.id)
    assert {n: (s.status, s.credits_reserved, s.step_index) for n, s in steps.items()} == {
        "still": ("queued", prices["still"], 0), "motion": ("waiting", prices["motion"], 1),
        "fx": ("waiting", prices["fx"], 2)}
    assert steps["fx"].model == "postprocess" and steps["fx"].task == "interpolate" and steps["fx"].kind == "video"
    # one reserve per step, none for the pipeline; the balance holds the total
    assert ledger_rows(pdb, job_id=parent.id) == []
    for name, step in steps.items():
        assert [(e.kind, e.amount) for e in ledger_rows(pdb, job_id=step.id)] == [("reserve", prices[name])]
    assert balance(pdb, alice.user.id).reserved == quote.total
    assert balance(pdb, alice.user.id).available == 1000 - quote.total
    # the listing shows the pipeline once; its steps are hidden
    listed, _ = pipelines.jobs.list(alice.user)
    assert [j.id for j in listed] == [parent.id]


def test_too_few_credits_for_the_total_charges_nothing(pdb: Database, psettings: Settings,
                                                       pipelines: PipelineService) -> None:
    poor = add_user(pdb, psettings, credits=10)  # still (1) fits, motion (22) does not
    quote = pipelines.quote(poor.user, PipelineSubmission(steps=STEPS))
    assert (quote.affordable, quote.reason) == (False, "insufficient_credits")
    with pytest.raises(InsufficientCredits):
        pipelines.submit(poor.user, PipelineSubmission(steps=STEPS))
    assert job_count(pdb) == 0 and balance(pdb, poor.user.id).available == 10


def test_idempotency_key(pdb: Database, pipelines: PipelineService, alice: NewUser) -> None:
    first, created = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS), idempotency_key="k1")
    again, created_again = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS), idempotency_key="k1")
    assert (created, created_again, again.id) == (True, False, first.id)
    with pytest.raises(IdempotencyConflict):
        pipelines.submit(alice.user, PipelineSubmission(steps=STEPS[:1]), idempotency_key="k1")
    assert job_count(pdb) == 4


def test_limits_count_a_pipeline_once(pdb: Database, psettings: Settings, catalog: Catalog,
                                      storage: LocalStorage, bus: EventBus) -> None:
    s = psettings.model_copy(update={"max_active_jobs": 2})
    jobs = JobService(pdb, s, catalog, storage, bus)
    user = add_user(pdb, s, credits=1000)
    PipelineService(jobs).submit(user.user, PipelineSubmission(steps=STEPS))  # 4 rows, 1 active job
    jobs.submit(user.user, Submission("tiny-sd", {"prompt": "p"}))  # 2 of 2
    with pytest.raises(ConcurrencyLimit):
        jobs.submit(user.user, Submission("tiny-sd", {"prompt": "p"}))
    per_minute = psettings.model_copy(update={"rate_limit_per_minute": 2})
    other = add_user(pdb, per_minute, credits=1000)
    service = PipelineService(JobService(pdb, per_minute, catalog, storage, bus))
    service.submit(other.user, PipelineSubmission(steps=STEPS))
    service.submit(other.user, PipelineSubmission(steps=STEPS))
    with pytest.raises(CineWeaveError) as info:
        service.submit(other.user, PipelineSubmission(steps=STEPS))
    assert info.value.code == "rate_limited"


def test_preset_body_expands_through_the_hook(pdb: Database, pjobs: JobService, alice: NewUser) -> None:
    seen: list[tuple[str, Any]] = []

    def expand(session: Any, name: str, params: dict[str, Any] | None) -> tuple[list[dict[str, Any]], str, int]:
        seen.append((name, params))
        return [{"name": "still", "model": "tiny-sd", "input": {"prompt": (params or {})["prompt"]}}], name, 3

    service = PipelineService(pjobs, expand)
    parent, _ = service.submit(alice.user, PipelineSubmission(preset="one-still", params={"prompt": "a fox"}))
    assert seen == [("one-still", {"prompt": "a fox"})]
    assert (parent.task, parent.input["preset"], parent.input["preset_version"]) == ("one-still", "one-still", 3)
    assert parent.input["params"] == {"prompt": "a fox"}
    assert steps_of(service, parent.id)["still"].input["prompt"] == "a fox"
    with pytest.raises(CineWeaveError) as info:
        PipelineService(pjobs).submit(alice.user, PipelineSubmission(preset="x"))
    assert info.value.status == 404


# running: release, capture, failure, cancel, retry ------------------------------------------------
async def test_three_steps_succeed_each_captured_once(pdb: Database, pjobs: JobService, pipelines: PipelineService,
                                                      storage: LocalStorage, alice: NewUser) -> None:
    executor = FakeExecutor(storage=storage)
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS))
    await runner_for(pjobs, executor).drain(timeout_s=20)
    done = get_job(pdb, parent.id)
    steps = steps_of(pipelines, parent.id)
    assert done.status == "succeeded" and all(s.status == "succeeded" for s in steps.values())
    assert runs_per_step(executor, steps) == {"still": 1, "motion": 1, "fx": 1}
    for step in steps.values():
        assert settlements(pdb, step.id) == ["capture"]
    assert ledger_rows(pdb, job_id=parent.id) == []
    assert done.credits_charged == done.credits_reserved == sum(s.credits_charged for s in steps.values())
    assert done.credits_refunded == 0 and done.outputs == steps["fx"].outputs and done.progress == 1.0
    assert balance(pdb, alice.user.id).reserved == 0
    # released steps name their sources' jobs; the executor got those references
    assert steps["motion"].input["image"] == f"job:{steps['still'].id}"
    assert steps["fx"].input["video"] == f"job:{steps['motion'].id}"
    # the pipeline's events: waiting, running (the first claim, attempt 1), a step.completed per
    # step in order, succeeded, completed
    events = parent_events(pdb, parent.id)
    types = [e.type for e in events]
    assert types[:2] == ["status", "status"] and events[1].data == {"status": "running", "stage": "running",
                                                                     "attempt": 1}
    completed = [e.data for e in events if e.type == "step.completed"]
    assert [d["step"] for d in completed] == ["still", "motion", "fx"]
    assert completed[0]["outputs"] == steps["still"].outputs and completed[0]["credits"] == 1
    assert types[-2:] == ["status", "completed"] and events[-2].data["status"] == "succeeded"
    assert done.started_at is not None and done.queue_s is not None


async def test_failure_in_the_middle_step_refunds_the_rest_exactly_once(
        pdb: Database, pjobs: JobService, pipelines: PipelineService, storage: LocalStorage,
        alice: NewUser) -> None:
    executor = FakeExecutor(storage=storage,
                            failures={"two": [ErrorEvent("invalid_input", "the image is unusable", retryable=False)]})
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS))
    await runner_for(pjobs, executor).drain(timeout_s=20)
    done = get_job(pdb, parent.id)
    steps = steps_of(pipelines, parent.id)
    assert {n: s.status for n, s in steps.items()} == {"still": "succeeded", "motion": "failed", "fx": "canceled"}
    assert settlements(pdb, steps["still"].id) == ["capture"]
    assert settlements(pdb, steps["motion"].id) == ["refund"]
    assert settlements(pdb, steps["fx"].id) == ["refund"]
    assert runs_per_step(executor, steps) == {"still": 1, "motion": 1, "fx": 0}
    assert (done.status, done.error_code) == ("failed", "invalid_input")
    assert done.result["failed_step"] == {"step": "motion", "job_id": steps["motion"].id}
    assert done.credits_charged == steps["still"].credits_reserved
    assert done.credits_refunded == steps["motion"].credits_reserved + steps["fx"].credits_reserved
    assert balance(pdb, alice.user.id).available == 1000 - steps["still"].credits_reserved
    assert balance(pdb, alice.user.id).reserved == 0
    assert storage.exists(steps["still"].outputs[0]["key"])  # delivered: kept
    with pdb.read() as session:  # one refund per job, whatever ran
        refunds = session.execute(select(func.count()).select_from(LedgerEntry).where(
            LedgerEntry.kind == "refund", LedgerEntry.user_id == alice.user.id)).scalar_one()
    assert refunds == 2
    kinds = [e.type for e in parent_events(pdb, parent.id)]
    assert kinds.count("step.failed") == 1 and kinds.count("step.canceled") == 1 and kinds[-1] == "completed"


async def test_cancel_during_step_two_keeps_step_one(pdb: Database, pjobs: JobService, pipelines: PipelineService,
                                                     storage: LocalStorage, alice: NewUser) -> None:
    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"two": gate})
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS))
    runner = runner_for(pjobs, executor)
    runner.start()
    try:
        await wait_until(lambda: steps_of(pipelines, parent.id)["motion"].status == "running", 20,
                         what="step 2 running")
        await wait_until(lambda: any(r.job_id == steps_of(pipelines, parent.id)["motion"].id
                                     for r in executor.runs), 10, what="step 2 in the executor")
        canceled = pipelines.cancel(alice.user, parent.id)
        assert canceled.status == "canceled"
        motion_id = steps_of(pipelines, parent.id)["motion"].id
        await wait_job(pdb, motion_id, timeout_s=20)
    finally:
        gate.set()
        await runner.stop(grace_s=5)
    steps = steps_of(pipelines, parent.id)
    assert {n: s.status for n, s in steps.items()} == {"still": "succeeded", "motion": "canceled", "fx": "canceled"}
    assert settlements(pdb, steps["still"].id) == ["capture"]
    assert settlements(pdb, steps["motion"].id) == ["refund"]
    assert settlements(pdb, steps["fx"].id) == ["refund"]
    assert executor.canceled and executor.canceled[0] == steps["motion"].id
    assert storage.exists(steps["still"].outputs[0]["key"])  # step 1's output is still downloadable
    done = get_job(pdb, parent.id)
    assert done.status == "canceled" and done.credits_charged == steps["still"].credits_charged
    assert done.credits_refunded == steps["motion"].credits_reserved + steps["fx"].credits_reserved
    assert balance(pdb, alice.user.id).reserved == 0
    # a second cancel changes nothing
    assert pipelines.cancel(alice.user, parent.id).status == "canceled"
    assert len(ledger_rows(pdb, alice.user.id)) == 1 + 3 + 3


async def test_a_retried_step_never_reruns_the_first(pdb: Database, pjobs: JobService, pipelines: PipelineService,
                                                     storage: LocalStorage, alice: NewUser) -> None:
    executor = FakeExecutor(storage=storage, failures={"two": [ErrorEvent("worker_lost", "replica died",
                                                                           retryable=True)]})
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS))
    await runner_for(pjobs, executor).drain(timeout_s=20)
    steps = steps_of(pipelines, parent.id)
    assert get_job(pdb, parent.id).status == "succeeded"
    assert runs_per_step(executor, steps) == {"still": 1, "motion": 2, "fx": 1}
    assert steps["motion"].attempts == 2
    assert all(settlements(pdb, s.id) == ["capture"] for s in steps.values())
    # the retried step's runs both read step 1's output
    motion_runs = [r for r in executor.runs if r.job_id == steps["motion"].id]
    assert {r.input["image"] for r in motion_runs} == {f"job:{steps['still'].id}"}


def test_canceling_a_queued_pipeline_refunds_every_step(pdb: Database, pipelines: PipelineService,
                                                        alice: NewUser) -> None:
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS))
    step_id = steps_of(pipelines, parent.id)["still"].id
    pipelines.jobs.cancel(alice.user, step_id)  # canceling one step cancels its pipeline
    assert get_job(pdb, parent.id).status == "canceled"
    steps = steps_of(pipelines, parent.id)
    assert all(s.status == "canceled" and settlements(pdb, s.id) == ["refund"] for s in steps.values())
    assert balance(pdb, alice.user.id).available == 1000 and balance(pdb, alice.user.id).reserved == 0
    assert ledger_rows(pdb, job_id=parent.id) == []


async def test_delete_outputs_of_a_pipeline_deletes_its_steps(pdb: Database, pjobs: JobService,
                                                              pipelines: PipelineService, storage: LocalStorage,
                                                              alice: NewUser) -> None:
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS[:2]))
    await runner_for(pjobs, FakeExecutor(storage=storage)).drain(timeout_s=20)
    keys = [s.outputs[0]["key"] for s in steps_of(pipelines, parent.id).values()]
    assert all(storage.exists(k) for k in keys)
    pjobs.delete_outputs(alice.user, parent.id)
    assert not any(storage.exists(k) for k in keys)
    assert get_job(pdb, parent.id).outputs == []
    assert all(s.outputs == [] and s.outputs_deleted_at for s in steps_of(pipelines, parent.id).values())


async def test_step_completed_webhook(pdb: Database, pjobs: JobService, pipelines: PipelineService,
                                      storage: LocalStorage, alice: NewUser) -> None:
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS[:2], webhook="https://example.com/h"))
    await runner_for(pjobs, FakeExecutor(storage=storage)).drain(timeout_s=20)
    with pdb.read() as session:
        rows = session.execute(select(WebhookDelivery).where(WebhookDelivery.job_id == parent.id)
                               .order_by(WebhookDelivery.created_at)).scalars().all()
    assert [r.event for r in rows] == ["start", "step.completed", "step.completed", "completed"]
    assert [r.payload["step_event"]["step"] for r in rows if r.event == "step.completed"] == ["still", "motion"]
    with pdb.read() as session:  # steps have no webhook of their own
        assert session.execute(select(func.count()).select_from(WebhookDelivery).where(
            WebhookDelivery.job_id != parent.id)).scalar_one() == 0


# the reconcile safety net ----------------------------------------------------------------------------
@pytest.mark.parametrize(("statuses", "expected"), [
    (["succeeded", "succeeded"], "succeeded"), (["succeeded", "failed"], "failed"),
    (["canceled", "canceled"], "canceled"), (["succeeded", "running"], "waiting")])
def test_reconcile_ends_a_pipeline_whose_steps_all_ended(pdb: Database, psettings: Settings, storage: LocalStorage,
                                                         pipelines: PipelineService, alice: NewUser,
                                                         statuses: list[str], expected: str) -> None:
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS[:2]))
    steps = steps_of(pipelines, parent.id)
    with pdb.session() as session:  # as if a crash had left the rows so (no settlement hook ran)
        for step, status in zip(steps.values(), statuses, strict=True):
            outputs = [{"key": f"outputs/x/{step.id}/0.png"}] if status == "succeeded" else []
            session.execute(update(Job).where(Job.id == step.id).values(status=status, outputs=outputs,
                                                                        error_code="boom" if status == "failed"
                                                                        else None))
        session.commit()
    maintenance = Maintenance(pdb, psettings, storage)
    report = maintenance.run_once()
    done = get_job(pdb, parent.id)
    assert done.status == expected
    assert report.pipelines_reconciled == (0 if expected == "waiting" else 1)
    if expected == "succeeded":
        assert done.outputs == [{"key": f"outputs/x/{steps['motion'].id}/0.png"}]
    if expected == "failed":
        assert done.error_code == "boom"
    assert ledger_rows(pdb, job_id=parent.id) == []  # the pipeline's own end never touches the ledger
    assert maintenance.run_once().pipelines_reconciled == 0


# inputs of a post-processing step ---------------------------------------------------------------
def test_inputs_resolve_a_postprocess_steps_references(pdb: Database, psettings: Settings, storage: LocalStorage,
                                                       catalog: Catalog, alice: NewUser) -> None:
    other = add_user(pdb, psettings, credits=10)
    output = {"key": "outputs/a/job_src/0.mp4", "content_type": "video/mp4", "width": 64, "height": 64,
              "num_frames": 17, "fps": 8.0, "duration_s": 2.125}
    with pdb.session() as session:
        session.add(Job(id="job_src", user_id=alice.user.id, model="tiny-wan", kind="video", task="t2v",
                        status="succeeded", outputs=[output]))
        session.add(Job(id="job_other", user_id=other.user.id, model="tiny-wan", kind="video", task="t2v",
                        status="succeeded", outputs=[output]))
        session.add(Upload(id="upl_logo", user_id=alice.user.id, key="uploads/a/logo.png",
                           content_type="image/png", size=10, width=32, height=32))
        session.add(Upload(id="upl_song", user_id=alice.user.id, key="uploads/a/song.mp3", kind="audio",
                           content_type="audio/mpeg", size=10, meta={"duration_s": 3.5}))
        session.commit()
    resolver = InputResolver(pdb, psettings, storage, catalog)

    def resolve(task: str, data: dict[str, Any]) -> dict[str, Any]:
        return resolver(Job(user_id=alice.user.id, model="postprocess", kind="video", task=task, input=data))

    out = resolve("watermark", {"video": "job:job_src", "overlay": "upl_logo"})
    assert out["video_key"] == output["key"] and out["overlay_key"] == "uploads/a/logo.png"
    assert out["source_info"]["num_frames"] == 17 and out["source_info"]["kind"] == "video"
    assert out["overlay_info"]["width"] == 32
    out = resolve("concat", {"videos": ["job:job_src", "job:job_src"]})
    assert out["video_keys"] == [output["key"]] * 2 and len(out["source_infos"]) == 2
    out = resolve("audio", {"video": "job:job_src", "audio": "upl_song"})
    assert out["audio_key"] == "uploads/a/song.mp3" and out["audio_info"]["duration_s"] == 3.5
    for bad in ({"video": "job:job_other"}, {"video": "step:still"}, {"video": "upl_nope"}):
        with pytest.raises(CineWeaveError) as info:
            resolve("trim", bad)
        assert info.value.status == 422


def test_waiting_is_not_claimed(pdb: Database, pjobs: JobService, pipelines: PipelineService,
                                storage: LocalStorage, alice: NewUser) -> None:
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS))
    runner = runner_for(pjobs, FakeExecutor(storage=storage))
    claimed = runner.claim_next()
    assert claimed is not None and claimed.step_name == "still"
    assert runner.claim_next() is None  # the others wait for it; the pipeline is never claimed
    assert get_job(pdb, parent.id).status == JobStatus.RUNNING


# teams ---------------------------------------------------------------------------------------------
def test_a_team_member_submits_as_the_team_within_the_cap_on_the_total(
        pdb: Database, psettings: Settings, pipelines: PipelineService) -> None:
    from api.core import ledger
    from api.services.teams import TeamService

    teams = TeamService(pdb, psettings)
    owner, member = add_user(pdb, psettings, credits=0), add_user(pdb, psettings, credits=0)
    team_id = teams.create(owner.user, "T").view.team.id
    teams.accept(member.user, teams.invite(owner.user, team_id, member.user.email, "member").token)
    with pdb.session() as session:
        ledger.credit(session, team_id, 500, f"test-grant:{team_id}")
        session.commit()
    total = pipelines.quote(member.user, PipelineSubmission(steps=STEPS, team=team_id)).total
    teams.update_member(owner.user, team_id, member.user.id, monthly_cap=total - 1, set_cap=True)
    quote = pipelines.quote(member.user, PipelineSubmission(steps=STEPS, team=team_id))
    assert (quote.affordable, quote.reason) == (False, "member_cap_exceeded")
    with pytest.raises(InsufficientCredits) as capped:
        pipelines.submit(member.user, PipelineSubmission(steps=STEPS, team=team_id))
    assert capped.value.code == "member_cap_exceeded" and job_count(pdb) == 0
    teams.update_member(owner.user, team_id, member.user.id, monthly_cap=total, set_cap=True)
    parent, _ = pipelines.submit(member.user, PipelineSubmission(steps=STEPS, team=team_id))
    assert (parent.user_id, parent.submitted_by) == (team_id, member.user.id)
    steps = steps_of(pipelines, parent.id)
    assert all((s.user_id, s.submitted_by) == (team_id, member.user.id) for s in steps.values())
    assert balance(pdb, team_id).reserved == total and balance(pdb, member.user.id).reserved == 0
    # the cap, the members' view and the usage count a pipeline once (its row), not its steps again
    from api.services.teams import member_spent, month_start
    with pdb.read() as session:
        assert member_spent(session, team_id, member.user.id, month_start()) == total
    assert {m.member.user_id: m.spent_this_month for m in teams.members(owner.user, team_id)}[member.user.id] == total


# fan-in and a failure beside a running step ---------------------------------------------------------
FAN_IN: list[dict[str, Any]] = [
    {"name": "a", "model": "tiny-wan", "input": {"prompt": "left"}},
    {"name": "b", "model": "tiny-wan", "input": {"prompt": "right"}},
    {"name": "both", "op": "concat", "input": {"videos": ["step:a", "step:b"], "crossfade_s": 0.5}},
]


async def test_a_step_taking_two_steps_is_released_when_both_succeeded(
        pdb: Database, pjobs: JobService, pipelines: PipelineService, storage: LocalStorage,
        alice: NewUser) -> None:
    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"right": gate})
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=FAN_IN))
    assert {n: s.status for n, s in steps_of(pipelines, parent.id).items()} == {
        "a": "queued", "b": "queued", "both": "waiting"}
    runner = runner_for(pjobs, executor)
    runner.start()
    try:
        await wait_job(pdb, steps_of(pipelines, parent.id)["a"].id, timeout_s=20)
        assert steps_of(pipelines, parent.id)["both"].status == "waiting"  # b has not succeeded yet
        gate.set()
        await wait_job(pdb, parent.id, timeout_s=20)
    finally:
        gate.set()
        await runner.stop(grace_s=5)
    steps = steps_of(pipelines, parent.id)
    assert get_job(pdb, parent.id).status == "succeeded"
    assert steps["both"].input["videos"] == [f"job:{steps['a'].id}", f"job:{steps['b'].id}"]
    assert runs_per_step(executor, steps) == {"a": 1, "b": 1, "both": 1}


async def test_a_failed_step_stops_a_running_sibling_and_refunds_it(
        pdb: Database, pjobs: JobService, pipelines: PipelineService, storage: LocalStorage,
        alice: NewUser) -> None:
    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"left": gate},
                            failures={"right": [ErrorEvent("content_policy", "refused", retryable=False)]})
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=FAN_IN))
    runner = runner_for(pjobs, executor)
    runner.start()
    try:
        await wait_job(pdb, parent.id, timeout_s=20)
        a_id = steps_of(pipelines, parent.id)["a"].id
        await wait_job(pdb, a_id, timeout_s=20)  # asked to stop by the pipeline's failure
    finally:
        gate.set()
        await runner.stop(grace_s=5)
    steps = steps_of(pipelines, parent.id)
    assert {n: s.status for n, s in steps.items()} == {"a": "canceled", "b": "failed", "both": "canceled"}
    assert a_id in executor.canceled
    assert all(settlements(pdb, s.id) == ["refund"] for s in steps.values())
    done = get_job(pdb, parent.id)
    assert (done.status, done.credits_charged) == ("failed", 0)
    assert done.credits_refunded == done.credits_reserved  # the running sibling's refund counted too
    assert balance(pdb, alice.user.id).available == 1000


@pytest.mark.parametrize("steps", [
    [{"name": "still", "model": "tiny-sd", "input": {"prompt": "a forbidden cat"}}],
    [*STEPS[:2], {"name": "mark", "op": "watermark", "input": {"video": "step:motion", "text": "FORBIDDEN"}}],
], ids=["prompt", "watermark text"])
def test_policy_words_refuse_a_step_before_any_charge(db: Database, settings: Settings, catalog: Catalog,
                                                      storage: LocalStorage, bus: EventBus,
                                                      steps: list[dict[str, Any]]) -> None:
    strict = settings.model_copy(update={"content_policy_words": ["forbidden"]})
    user = add_user(db, strict, credits=1000)
    service = PipelineService(JobService(db, strict, catalog, storage, bus))
    with pytest.raises(CineWeaveError) as info:
        service.submit(user.user, PipelineSubmission(steps=steps))
    assert (info.value.status, info.value.code) == (422, "content_policy")
    assert info.value.details["step"] == steps[-1]["name"]
    assert job_count(db) == 0 and balance(db, user.user.id).available == 1000


# a finished pipeline's output as an op's input: its kind is the output's ------------------------------
CLIP = {"key": "outputs/a/job_clip/0.mp4", "content_type": "video/mp4", "width": 64, "height": 64,
        "num_frames": 17, "fps": 8.0, "duration_s": 2.125}


def test_an_op_on_a_finished_pipelines_mp4_is_planned_and_priced_as_a_video(
        pdb: Database, psettings: Settings, storage: LocalStorage, catalog: Catalog, pipelines: PipelineService,
        alice: NewUser) -> None:
    with pdb.session() as session:
        session.add(Job(id="job_pipe", user_id=alice.user.id, model="pipeline", kind="pipeline", task="pipeline",
                        status="succeeded", outputs=[CLIP]))
        session.add(Job(id="job_clip", user_id=alice.user.id, model="tiny-wan", kind="video", task="t2v",
                        status="succeeded", outputs=[CLIP]))
        session.add(Job(id="job_train", user_id=alice.user.id, model="lora-trainer", kind="training",
                        task="train", status="succeeded",
                        outputs=[{"key": "loras/a/w.safetensors", "content_type": "application/octet-stream"}]))
        session.commit()

    def quote(op: str, source: str, field: str = "video", **params: Any) -> Any:
        body = {"name": "fx", "op": op, "input": {field: f"job:{source}", **params}}
        return pipelines.quote(alice.user, PipelineSubmission(steps=[body])).plan.steps[0]

    for op, params in (("upscale", {"scale": 2}), ("trim", {"duration_s": 1})):
        of_pipeline, of_clip = quote(op, "job_pipe", **params), quote(op, "job_clip", **params)
        assert of_pipeline.kind == of_pipeline.output.kind == "video", op
        assert of_pipeline.price == of_clip.price and of_pipeline.output == of_clip.output, op
    assert quote("upscale", "job_pipe", scale=2).output.num_frames == 17
    for source, field in (("job_pipe", "image"), ("job_train", "video"), ("job_train", "image")):
        with pytest.raises(CineWeaveError) as info:  # the clip is no image; a LoRA's weights are no media
            quote("upscale", source, field, scale=2)
        assert (info.value.status, info.value.code) == (422, "pipeline_kind_mismatch"), (source, field)
    # a submitted upscale of it runs on the clip as a video (the resolver says so too)
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(
        steps=[{"name": "up", "op": "upscale", "input": {"video": "job:job_pipe", "scale": 2}}]))
    step = steps_of(pipelines, parent.id)["up"]
    assert step.kind == "video"
    resolved = InputResolver(pdb, psettings, storage, catalog)(step)
    assert resolved["video_key"] == CLIP["key"] and resolved["source_info"]["kind"] == "video"
    with pytest.raises(CineWeaveError):
        InputResolver(pdb, psettings, storage, catalog)(
            Job(user_id=alice.user.id, model="postprocess", kind="video", task="trim",
                input={"video": "job:job_train"}))


# the claim guard: a step whose pipeline ended never runs -----------------------------------------------
def test_a_queued_step_under_an_ended_pipeline_is_canceled_at_claim_not_run(
        pdb: Database, pjobs: JobService, pipelines: PipelineService, storage: LocalStorage,
        alice: NewUser) -> None:
    """As when a step was requeued (retryable error) while a sibling's failure ended the pipeline
    (the sibling's transaction saw it running): the claim ends it canceled and refunded."""
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=FAN_IN[:2]))
    steps = steps_of(pipelines, parent.id)
    with pdb.session() as session:  # a failed, b left queued
        session.execute(update(Job).where(Job.id == parent.id).values(status="failed", stage="failed"))
        session.commit()
    heard: list[tuple[str, str]] = []
    pjobs.bus.add_listener(lambda job_id, type_, _data: heard.append((job_id, type_)))
    executor = FakeExecutor(storage=storage)
    runner = runner_for(pjobs, executor)
    assert runner.claim_next() is None  # neither step is handed out
    assert runner.claim_next() is None
    after = steps_of(pipelines, parent.id)
    assert {n: s.status for n, s in after.items()} == {"a": "canceled", "b": "canceled"}
    assert all(settlements(pdb, s.id) == ["refund"] for s in steps.values())  # once each
    assert executor.runs == []
    assert balance(pdb, alice.user.id).reserved == 0 and balance(pdb, alice.user.id).available == 1000
    assert {(s.id, "completed") for s in steps.values()} <= set(heard)
    assert get_job(pdb, parent.id).credits_refunded == sum(s.credits_reserved for s in steps.values())


# a step ended by a reclaim or the reaper: its pipeline ends, each step settled once, announced --------
def _listen(bus: EventBus) -> list[tuple[str, str, dict[str, Any]]]:
    heard: list[tuple[str, str, dict[str, Any]]] = []
    bus.add_listener(lambda job_id, type_, data: heard.append((job_id, type_, data)))
    return heard


def _ended_once(pdb: Database, pipelines: PipelineService, parent_id: str, alice: NewUser,
                heard: list[tuple[str, str, dict[str, Any]]], first: str) -> None:
    steps = steps_of(pipelines, parent_id)
    assert steps["still"].status == "failed" and steps["motion"].status == "canceled"
    assert all(settlements(pdb, s.id) == ["refund"] for s in steps.values())
    done = get_job(pdb, parent_id)
    assert (done.status, done.error_code) == ("failed", first)
    assert done.credits_refunded == done.credits_reserved and done.credits_charged == 0
    assert balance(pdb, alice.user.id).reserved == 0 and balance(pdb, alice.user.id).available == 1000
    assert ledger_rows(pdb, job_id=parent_id) == []
    # listeners of the pipeline and of the sibling it ended hear it on the in-process bus
    assert (parent_id, "completed", {"status": "failed"}) in heard
    assert (steps["motion"].id, "completed", {"status": "canceled"}) in heard


def test_a_step_reclaimed_with_no_attempts_left_fails_the_pipeline(
        pdb: Database, psettings: Settings, pjobs: JobService, pipelines: PipelineService,
        storage: LocalStorage, alice: NewUser) -> None:
    from api.services.settlement import reclaim_expired

    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS[:2]))
    runner = runner_for(pjobs, FakeExecutor(storage=storage))
    claimed = runner.claim_next()
    assert claimed is not None and claimed.step_name == "still"
    with pdb.session() as session:  # its runner vanished on its last attempt
        session.execute(update(Job).where(Job.id == claimed.id).values(
            attempts=claimed.max_attempts, lease_expires_at=claimed.started_at))
        session.commit()
    heard = _listen(pjobs.bus)
    assert reclaim_expired(pdb, psettings, storage, pjobs.bus) == 1
    _ended_once(pdb, pipelines, parent.id, alice, heard, "worker_lost")
    assert reclaim_expired(pdb, psettings, storage, pjobs.bus) == 0
    assert len(ledger_rows(pdb, alice.user.id)) == 1 + 2 + 2


def test_a_stuck_queued_step_reaped_fails_the_pipeline(
        pdb: Database, psettings: Settings, pjobs: JobService, pipelines: PipelineService,
        storage: LocalStorage, alice: NewUser) -> None:
    from datetime import timedelta

    from api.db.tables import utcnow

    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS[:2]))
    still = steps_of(pipelines, parent.id)["still"]
    with pdb.session() as session:  # no runner took it within stuck_job_s
        session.execute(update(Job).where(Job.id == still.id).values(
            updated_at=utcnow() - timedelta(seconds=psettings.stuck_job_s + 60)))
        session.commit()
    heard = _listen(pjobs.bus)
    maintenance = Maintenance(pdb, psettings, storage, pjobs.bus)
    assert maintenance.run_once().stuck_failed == 1
    _ended_once(pdb, pipelines, parent.id, alice, heard, "queue_timeout")
    assert maintenance.run_once().stuck_failed == 0
    assert len(ledger_rows(pdb, alice.user.id)) == 1 + 2 + 2


async def test_a_failing_step_announces_its_pipeline_on_the_bus(
        pdb: Database, pjobs: JobService, pipelines: PipelineService, storage: LocalStorage,
        alice: NewUser) -> None:
    executor = FakeExecutor(storage=storage,
                            failures={"two": [ErrorEvent("invalid_input", "unusable", retryable=False)]})
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS))
    heard = _listen(pjobs.bus)
    await runner_for(pjobs, executor).drain(timeout_s=20)
    fx = steps_of(pipelines, parent.id)["fx"]
    assert (parent.id, "completed", {"status": "failed"}) in heard
    assert (fx.id, "completed", {"status": "canceled"}) in heard


# deleting a step's outputs ----------------------------------------------------------------------------
async def test_deleting_a_steps_outputs(pdb: Database, pjobs: JobService, pipelines: PipelineService,
                                        storage: LocalStorage, alice: NewUser) -> None:
    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"two": gate})
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS[:2]))
    runner = runner_for(pjobs, executor)
    runner.start()
    try:
        await wait_until(lambda: steps_of(pipelines, parent.id)["motion"].status == "running", 20,
                         what="step 2 running")
        still = steps_of(pipelines, parent.id)["still"]
        with pytest.raises(CineWeaveError) as info:  # step 2 reads it: refused while the pipeline runs
            pjobs.delete_outputs(alice.user, still.id)
        assert (info.value.status, info.value.code) == (409, "job_active")
        assert storage.exists(still.outputs[0]["key"])
        gate.set()
        await wait_job(pdb, parent.id, timeout_s=20)
    finally:
        gate.set()
        await runner.stop(grace_s=5)
    steps = steps_of(pipelines, parent.id)
    assert get_job(pdb, parent.id).outputs == steps["motion"].outputs != []
    pjobs.delete_outputs(alice.user, steps["still"].id)  # not the last step: the pipeline keeps its outputs
    assert get_job(pdb, parent.id).outputs == steps["motion"].outputs
    pjobs.delete_outputs(alice.user, steps["motion"].id)  # the last step's are the pipeline's
    done = get_job(pdb, parent.id)
    assert done.outputs == [] and done.outputs_deleted_at is not None
    assert not storage.exists(steps["motion"].outputs[0]["key"])


def test_ending_a_pipeline_decides_on_each_step_as_locked(pdb: Database, pipelines: PipelineService,
                                                          storage: LocalStorage, alice: NewUser) -> None:
    """A sibling read running before its lock, requeued by its runner meanwhile (the PostgreSQL
    race): it is ended canceled and refunded now, not only asked to stop."""
    from api.services.pipelines import _end_unfinished

    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=FAN_IN[:2]))
    b_id = steps_of(pipelines, parent.id)["b"].id
    with pdb.session() as session:
        session.execute(update(Job).where(Job.id == b_id).values(status="running", attempts=1))
        session.commit()
    with pdb.session() as session:
        b = session.get(Job, b_id)
        assert b is not None and b.status == "running"  # as this transaction read it
        session.execute(update(Job).where(Job.id == b_id).values(status="queued")  # its runner's requeue
                        .execution_options(synchronize_session=False))
        assert _end_unfinished(session, storage, [b], None) == []
        session.commit()
    after = get_job(pdb, b_id)
    assert (after.status, after.cancel_requested) == ("canceled", False)
    assert settlements(pdb, b_id) == ["refund"]
