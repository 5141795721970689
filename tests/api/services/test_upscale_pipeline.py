"""A diffusion upscale step through the service: planned on the catalog upscaler, priced by it,
refused without one (422, nothing charged), and run by the runner as a generation (task upscale)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from api.core.errors import CineWeaveError
from api.db.engine import Database
from api.metrics import Metrics
from api.runner.runner import Runner
from api.services.events import EventBus
from api.services.jobs import JobService
from api.services.pipelines import PipelineService, PipelineSubmission
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import add_user, balance, get_job, job_count

UPSCALER = "tiny-sd-x4-upscaler"
STEPS: list[dict[str, Any]] = [
    {"name": "still", "model": "tiny-sd", "input": {"prompt": "one", "width": 32, "height": 48}},
    {"name": "big", "op": "upscale", "input": {"image": "step:still", "scale": 4, "method": "diffusion"}},
]


@pytest.fixture
def psettings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_active_jobs": 50, "rate_limit_per_minute": 1000, "lease_s": 3.0,
                                       "retry_backoff_s": 0.05, "runner_poll_s": 0.02})


@pytest.fixture
def pdb(psettings: Settings) -> Iterator[Database]:
    database = Database(psettings)
    database.migrate()
    yield database
    database.dispose()


def service(pdb: Database, psettings: Settings, storage: LocalStorage, bus: EventBus,
            enabled: bool) -> PipelineService:
    catalog = Catalog.load()
    spec = catalog.get(UPSCALER)
    assert spec is not None
    pricing = spec.pricing.model_copy(update={"credits_per_image": 3})  # told apart from tiny-sd's 1
    catalog.replace(spec.model_copy(update={"enabled": enabled, "pricing": pricing}))
    return PipelineService(JobService(pdb, psettings, catalog, storage, bus, metrics=Metrics()))


@pytest.fixture
def alice(pdb: Database, psettings: Settings) -> NewUser:
    return add_user(pdb, psettings, credits=1000)


async def test_a_diffusion_upscale_runs_on_the_upscaler_as_task_upscale(
        pdb: Database, psettings: Settings, storage: LocalStorage, bus: EventBus, alice: NewUser) -> None:
    pipelines = service(pdb, psettings, storage, bus, enabled=True)
    quote = pipelines.quote(alice.user, PipelineSubmission(steps=STEPS))
    assert [s.price for s in quote.plan.steps] == [1, 3] and quote.total == 4  # the upscaler's per-image price
    parent, _ = pipelines.submit(alice.user, PipelineSubmission(steps=STEPS))
    _parent, children = pipelines.get(None, parent.id)
    big = next(c for c in children if c.step_name == "big")
    assert (big.model, big.kind, big.task, big.status) == (UPSCALER, "image", "upscale", "waiting")
    assert big.input["width"] == 128 and big.input["height"] == 192 and big.input["input_width"] == 32
    executor = FakeExecutor(storage=storage)
    runner = Runner(pdb, executor, psettings, storage, bus, runner_id="r1", metrics=Metrics())
    await runner.drain(timeout_s=20)
    assert get_job(pdb, parent.id).status == "succeeded"
    run = next(r for r in executor.runs if r.job_id == big.id)
    assert run.model == UPSCALER and run.task == "upscale"
    assert run.input["image"] == f"job:{next(c.id for c in children if c.step_name == 'still')}"
    done = get_job(pdb, big.id)
    assert done.outputs and done.outputs[0]["width"] == 128 and done.credits_charged == 3
    assert balance(pdb, alice.user.id).reserved == 0


def test_no_upscaler_enabled_is_refused_before_any_charge(
        pdb: Database, psettings: Settings, storage: LocalStorage, bus: EventBus, alice: NewUser) -> None:
    pipelines = service(pdb, psettings, storage, bus, enabled=False)
    with pytest.raises(CineWeaveError) as info:
        pipelines.submit(alice.user, PipelineSubmission(steps=STEPS))
    assert info.value.status == 422 and info.value.code == "upscaler_unavailable"
    assert info.value.details["step"] == "big"
    assert job_count(pdb) == 0 and balance(pdb, alice.user.id).reserved == 0
