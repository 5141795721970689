"""Jobs claimed together are announced to the replica: each request says how many jobs of its
model the runner claims right behind it (``queued_behind``), so the replica's batch waits for them."""

from __future__ import annotations

import threading

from api.db.engine import Database
from api.services.events import EventBus
from api.services.jobs import JobService, Submission
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.api.runner.conftest import make_runner
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import wait_until


async def test_a_tick_announces_the_same_models_jobs_it_claims_behind_each(
        rdb: Database, rsettings: Settings, storage: LocalStorage, bus: EventBus, jobs: JobService,
        alice: NewUser) -> None:
    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"held": gate})
    # claim order (one user): created order. Four slots: sd1, sd2, wan, sd3 are claimed; sd4 waits.
    plan = [("tiny-sd", "sd1"), ("tiny-sd", "sd2"), ("tiny-wan", "wan"), ("tiny-sd", "sd3"), ("tiny-sd", "sd4")]
    ids = {}
    for model, name in plan:
        job, _ = jobs.submit(alice.user, Submission(model, {"prompt": "held"}))
        ids[job.id] = name
    runner = make_runner(rdb, rsettings, storage, bus, executor, runner_concurrency=4)
    try:
        assert await runner.tick(sweep=False) == 4
        await wait_until(lambda: len(executor.runs) == 4, 10, what="four requests sent")
        behind = {ids[r.job_id]: r.queued_behind for r in executor.runs}
        # sd1: sd2 and sd3 follow it (the wan job is another model's); sd2: sd3; sd3: none within
        # the slots (sd4 is not claimed by this tick); the wan job: no other wan job
        assert behind == {"sd1": 2, "sd2": 1, "wan": 0, "sd3": 0}
    finally:
        gate.set()
        await runner.stop()
    assert runner._queued_behind == {} and runner._next_models == {}
