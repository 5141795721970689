"""OverflowRouter: which way each job goes, and why (scripted executors, plus one real adapter)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from api.core.events import DoneEvent, ErrorEvent, OutputEvent, ProgressEvent, ProviderEvent, StageEvent
from api.core.executor import REATTACH_KEY, ExecutionRequest, Executor, ProviderWebhookReceiver
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from models.spec import ModelSpec
from serve.fallback.http import RetryPolicy
from serve.fallback.replicate import ReplicateExecutor
from serve.fallback.veo import VeoExecutor
from serve.router import InFlightWaitEstimator, OverflowRouter, Route, build_overflow_router, catalog_slots
from tests.fakes.executors import ScriptedExecutor
from tests.fakes.replicate_server import FakeReplicate

RUN_TIMEOUT_S = 15.0


def _local_spec(model_id: str = "tiny-burst", *, max_wait_s: float | None = 1.5, measured_run_s: float | None = 1.0,
                when: list[str] | None = None, provider: str | None = "replicate") -> ModelSpec:
    overflow: dict[str, Any] = {"when": when if when is not None else ["wait", "capacity"]}
    if provider:
        overflow |= {"provider": provider, "model": "acme/tiny-burst"}
    return ModelSpec.model_validate({
        "id": model_id, "kind": "video", "tasks": ["t2v"], "family": "wan", "source": {"tiny": "tiny-wan"},
        "defaults": {"width": 64, "height": 64, "num_frames": 17, "fps": 8},
        "limits": {"max_wait_s": max_wait_s}, "serving": {"max_replicas": 1, "max_batch_size": 1},
        "measured_run_s": measured_run_s, "overflow": overflow})


@pytest.fixture
def catalog() -> Catalog:
    base = Catalog.load()
    return Catalog([*base.all(), _local_spec(), _local_spec("tiny-steady", max_wait_s=None),
                    _local_spec("tiny-nowait", when=["capacity"]), _local_spec("tiny-alone", provider=None)])


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(**{"data_dir": tmp_path / "var", "signing_secret": "s", "_env_file": None,
                       "provider_poll_s": 0.02, "provider_timeout_s": 10.0,
                       "egress_allow_networks": ["127.0.0.1/32"], **overrides})  # fake file hosts


def _job(model: str, **input_: Any) -> ExecutionRequest:
    job_id = "job_" + uuid.uuid4().hex[:8]
    return ExecutionRequest(job_id=job_id, user_id="u1", model=model, kind="video", task="t2v",
                            input={"prompt": "p", "seed": 1, "duration": 8.0, "resolution": "720p",
                                   "aspect_ratio": "16:9", "fps": 24, **input_},
                            output_prefix=f"outputs/u1/{job_id}/")


async def _collect(router: Executor, job: ExecutionRequest) -> list[Any]:
    async def drain() -> list[Any]:
        return [event async for event in router.run(job)]

    return await asyncio.wait_for(drain(), RUN_TIMEOUT_S)


def _provider_done(name: str) -> ScriptedExecutor:
    return ScriptedExecutor([ProviderEvent(name, f"{name}-123", None, 1.5), StageEvent("generating"),
                             OutputEvent("outputs/u1/j/0.mp4", "video/mp4"), DoneEvent({"provider": name})],
                            name=name)


def _first(events: list[Any]) -> ProviderEvent:
    assert isinstance(events[0], ProviderEvent), events
    return events[0]


# remote-only ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "provider"), [("veo-3.1", "veo"), ("veo-3.1-replicate", "replicate")])
async def test_remote_only_models_go_to_their_provider(tmp_path: Path, catalog: Catalog, model: str,
                                                       provider: str) -> None:
    local = ScriptedExecutor(name="local")
    providers = {"veo": _provider_done("veo"), "replicate": _provider_done("replicate")}
    router = OverflowRouter(local, providers, catalog, _settings(tmp_path))
    events = await _collect(router, _job(model))
    first = _first(events)
    assert (first.provider, first.reason) == (provider, "remote_only")
    # The provider's own event (its job id, its cost) carries the same reason.
    [own] = [e for e in events[1:] if isinstance(e, ProviderEvent)]
    assert (own.provider, own.provider_job_id, own.reason, own.cost_usd) == (provider, f"{provider}-123",
                                                                             "remote_only", 1.5)
    assert isinstance(events[-1], DoneEvent)
    assert local.runs == [] and len(providers[provider].runs) == 1
    assert router.decisions[(provider, "remote_only")] == 1


async def test_overflow_disabled_fails_remote_only_models_clearly(tmp_path: Path, catalog: Catalog) -> None:
    provider = _provider_done("veo")
    router = OverflowRouter(ScriptedExecutor(), {"veo": provider}, catalog, _settings(tmp_path, overflow_enabled=False))
    events = await _collect(router, _job("veo-3.1"))
    assert len(events) == 1 and isinstance(events[0], ErrorEvent)
    assert (events[0].code, events[0].retryable) == ("overflow_disabled", False)
    assert "veo" in events[0].message and provider.runs == []


async def test_unconfigured_provider_fails_remote_only_models(tmp_path: Path, catalog: Catalog) -> None:
    router = OverflowRouter(ScriptedExecutor(), {}, catalog, _settings(tmp_path))
    [event] = await _collect(router, _job("veo-3.1-replicate"))
    assert isinstance(event, ErrorEvent) and (event.code, event.retryable) == ("provider_not_configured", False)


# local and wait ---------------------------------------------------------------------------------
async def test_a_local_model_runs_locally_and_says_so(tmp_path: Path, catalog: Catalog) -> None:
    local = ScriptedExecutor(name="local")
    router = OverflowRouter(local, {"replicate": _provider_done("replicate")}, catalog, _settings(tmp_path))
    events = await _collect(router, _job("tiny-burst"))
    assert (_first(events).provider, _first(events).reason) == ("local", "local")
    assert isinstance(events[-1], DoneEvent) and len(local.runs) == 1


async def test_saturated_local_sends_the_excess_to_the_provider(tmp_path: Path, catalog: Catalog) -> None:
    """measured_run_s 1 s, max_wait_s 1.5 s, one slot: 0 and 1 jobs ahead stay, 2+ ahead overflow."""
    gate = asyncio.Event()
    local = ScriptedExecutor([ProgressEvent(1, 2), DoneEvent({"where": "local"})], name="local", gate=gate)
    provider = _provider_done("replicate")
    router = OverflowRouter(local, {"replicate": provider}, catalog, _settings(tmp_path))
    jobs = [_job("tiny-burst") for _ in range(5)]
    tasks = [asyncio.create_task(_collect(router, job)) for job in jobs]
    deadline = time.monotonic() + 5
    while len(local.active) < 2 or len(provider.runs) < 3:
        assert time.monotonic() < deadline, (len(local.active), len(provider.runs))
        await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*tasks)
    routes = [(_first(events).provider, _first(events).reason) for events in results]
    assert routes == [("local", "local")] * 2 + [("replicate", "wait")] * 3
    assert all(isinstance(events[-1], DoneEvent) for events in results)
    assert {r.job_id for r in local.runs} == {j.job_id for j in jobs[:2]}
    # Once the local runs are done the next job stays local again.
    again = await _collect(router, _job("tiny-burst"))
    assert _first(again).provider == "local"


async def test_wait_uses_the_measured_run_time(tmp_path: Path, catalog: Catalog) -> None:
    estimator = InFlightWaitEstimator(slots=1, alpha=0.5)
    router = OverflowRouter(ScriptedExecutor(), {"replicate": _provider_done("replicate")}, catalog,
                            _settings(tmp_path), wait_estimator=estimator)
    estimator.started("tiny-burst")
    assert router.estimated_wait_s("tiny-burst") == pytest.approx(1.0)  # the spec's measured_run_s
    estimator.started("tiny-burst")
    estimator.finished("tiny-burst", 4.0)  # learned: runs take 4 s, so one job ahead is too long
    assert estimator.run_seconds("tiny-burst") == pytest.approx(4.0)
    assert router.decide(_job("tiny-burst")) == Route("replicate", "wait", pytest.approx(4.0))
    estimator.finished("tiny-burst", 2.0)
    assert estimator.run_seconds("tiny-burst") == pytest.approx(3.0)  # moving average
    assert router.decide(_job("tiny-burst")) == Route("local", "local", 0.0)


async def test_wait_overflow_needs_the_condition_a_limit_and_the_switch(tmp_path: Path, catalog: Catalog) -> None:
    class Saturated:
        def jobs_ahead(self, model: str) -> int:
            return 100

        def run_seconds(self, model: str) -> float | None:
            return None

    providers = {"replicate": _provider_done("replicate")}
    router = OverflowRouter(ScriptedExecutor(), providers, catalog, _settings(tmp_path), wait_estimator=Saturated())
    assert router.decide(_job("tiny-burst")).target == "replicate"
    assert router.decide(_job("tiny-steady")).target == "local"    # no max_wait_s
    assert router.decide(_job("tiny-nowait")).target == "local"    # "wait" not in overflow.when
    assert router.decide(_job("tiny-alone")).target == "local"     # no overflow provider
    assert router.decide(_job("tiny-sd")).target == "local"        # a built-in model without overflow
    off = OverflowRouter(ScriptedExecutor(), providers, catalog, _settings(tmp_path, overflow_enabled=False),
                         wait_estimator=Saturated())
    events = await _collect(off, _job("tiny-burst"))
    assert _first(events).provider == "local" and isinstance(events[-1], DoneEvent)
    unconfigured = OverflowRouter(ScriptedExecutor(), {}, catalog, _settings(tmp_path), wait_estimator=Saturated())
    assert unconfigured.decide(_job("tiny-burst")).target == "local"


def test_catalog_slots(catalog: Catalog) -> None:
    slots = catalog_slots(catalog)
    assert slots("tiny-burst") == 1 and slots("unknown") == 1
    assert slots("tiny-sd") == catalog.get("tiny-sd").serving.max_replicas * catalog.get("tiny-sd").serving.max_batch_size


# capacity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["capacity", "not_deployed"])
async def test_a_capacity_failure_goes_to_the_provider(tmp_path: Path, catalog: Catalog, code: str) -> None:
    local = ScriptedExecutor([StageEvent("loading"), ErrorEvent(code, "no replica free", retryable=True)],
                             name="local")
    provider = _provider_done("replicate")
    router = OverflowRouter(local, {"replicate": provider}, catalog, _settings(tmp_path))
    events = await _collect(router, _job("tiny-burst"))
    markers = [(e.provider, e.reason) for e in events if isinstance(e, ProviderEvent)]
    assert markers == [("local", "local"), ("replicate", "capacity"), ("replicate", "capacity")]
    assert not [e for e in events if isinstance(e, ErrorEvent)]  # the capacity error is not the job's end
    assert isinstance(events[-1], DoneEvent) and len(provider.runs) == 1
    assert router.estimator.in_flight("tiny-burst") == 0


async def test_capacity_failures_stay_failures_without_a_way_out(tmp_path: Path, catalog: Catalog) -> None:
    def failing() -> ScriptedExecutor:
        return ScriptedExecutor([ErrorEvent("capacity", "busy", retryable=True)], name="local")

    for model, settings in (("tiny-alone", _settings(tmp_path)), ("tiny-burst", _settings(tmp_path, overflow_enabled=False))):
        router = OverflowRouter(failing(), {"replicate": _provider_done("replicate")}, catalog, settings)
        events = await _collect(router, _job(model))
        assert isinstance(events[-1], ErrorEvent) and events[-1].code == "capacity" and events[-1].retryable


async def test_other_failures_and_late_capacity_errors_are_not_overflowed(tmp_path: Path, catalog: Catalog) -> None:
    provider = _provider_done("replicate")
    for script in ([ErrorEvent("out_of_memory", "oom", retryable=True)],
                   [OutputEvent("outputs/u1/j/0.mp4", "video/mp4"), ErrorEvent("capacity", "late", retryable=True)]):
        router = OverflowRouter(ScriptedExecutor(script), {"replicate": provider}, catalog, _settings(tmp_path))
        events = await _collect(router, _job("tiny-burst"))
        assert isinstance(events[-1], ErrorEvent) and events[-1].code == script[-1].code
    assert provider.runs == []


async def test_no_local_executor_uses_the_provider_for_capacity(tmp_path: Path, catalog: Catalog) -> None:
    router = OverflowRouter(None, {"replicate": _provider_done("replicate")}, catalog, _settings(tmp_path))
    events = await _collect(router, _job("tiny-burst"))
    assert (_first(events).provider, _first(events).reason) == ("replicate", "capacity")
    [event] = await _collect(router, _job("tiny-alone"))
    assert isinstance(event, ErrorEvent) and event.code == "local_unavailable"


# cancel and webhooks ----------------------------------------------------------------------------
async def test_cancel_reaches_whichever_executor_runs_the_job(tmp_path: Path, catalog: Catalog) -> None:
    gate = asyncio.Event()
    local = ScriptedExecutor([ProgressEvent(1, 2), DoneEvent()], name="local", gate=gate)
    provider = ScriptedExecutor([ProviderEvent("veo", "op-1"), DoneEvent()], name="veo", gate=gate)
    router = OverflowRouter(local, {"veo": provider}, catalog, _settings(tmp_path))
    for executor, job in ((local, _job("tiny-burst")), (provider, _job("veo-3.1"))):
        task = asyncio.create_task(_collect(router, job))
        deadline = time.monotonic() + 5
        while job.job_id not in executor.active:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await router.cancel(job.job_id)
        events = await task
        assert executor.cancels == [job.job_id]
        assert isinstance(events[-1], ErrorEvent) and events[-1].code == "canceled"
    await router.cancel("not-running")  # nothing to do, no error


async def test_webhooks_are_delegated_to_the_provider(tmp_path: Path, catalog: Catalog, storage: LocalStorage) -> None:
    settings = _settings(tmp_path, replicate_api_token="t", replicate_webhook_secret="whsec_" + "A" * 32,
                         gemini_api_key="k")
    replicate = ReplicateExecutor(settings, storage, catalog)
    router = OverflowRouter(None, {"replicate": replicate, "veo": VeoExecutor(settings, storage, catalog)},
                            catalog, settings)
    assert isinstance(router, ProviderWebhookReceiver)
    assert await router.handle_webhook("replicate", {"webhook-id": "x"}, b"{}") is False
    assert replicate.webhook_stats["rejected"] == 1
    assert await router.handle_webhook("veo", {}, b"{}") is False      # Veo takes no webhooks
    assert await router.handle_webhook("unknown", {}, b"{}") is False


# end to end with a real adapter -----------------------------------------------------------------
async def test_saturated_local_overflows_to_the_real_replicate_adapter(
        tmp_path: Path, catalog: Catalog, storage: LocalStorage) -> None:
    with FakeReplicate() as fake:
        settings = _settings(tmp_path, replicate_base_url=fake.base_url, replicate_api_token=fake.token)
        replicate = ReplicateExecutor(settings, storage, catalog,
                                      retry=RetryPolicy(attempts=3, initial_s=0.01, max_s=0.02))
        gate = asyncio.Event()
        local = ScriptedExecutor([ProgressEvent(1, 1), DoneEvent({"where": "local"})], name="local", gate=gate)
        router = OverflowRouter(local, {"replicate": replicate}, catalog, settings)
        jobs = [_job("tiny-burst", num_frames=17, fps=8, duration=2.125) for _ in range(3)]
        tasks = [asyncio.create_task(_collect(router, job)) for job in jobs]
        overflowed = await asyncio.wait_for(tasks[2], RUN_TIMEOUT_S)  # finishes while local is still busy
        gate.set()
        local_results = await asyncio.gather(*tasks[:2])
        remote_only = await _collect(router, _job("veo-3.1-replicate"))
        await replicate.aclose()

    assert [_first(r).provider for r in local_results] == ["local", "local"]
    assert (_first(overflowed).provider, _first(overflowed).reason) == ("replicate", "wait")
    assert isinstance(overflowed[-1], DoneEvent)
    [output] = [e for e in overflowed if isinstance(e, OutputEvent)]
    assert output.key.startswith(jobs[2].output_prefix) and storage.get_bytes(output.key) == fake.mp4
    [own] = [e for e in overflowed[1:] if isinstance(e, ProviderEvent)]
    assert own.reason == "wait" and own.provider_job_id in fake.predictions
    assert own.cost_usd == pytest.approx(2.125 * settings.replicate_cost_per_second_usd)
    assert fake.created[0]["input"]["num_frames"] == 17  # a non-Veo model gets the generic mapping
    assert (_first(remote_only).reason, type(remote_only[-1])) == ("remote_only", DoneEvent)


def test_build_overflow_router_wires_the_configured_providers(tmp_path: Path, catalog: Catalog) -> None:
    local = ScriptedExecutor(name="local")
    bare = build_overflow_router(local, catalog, _settings(tmp_path))
    assert bare.local is local and bare.providers == {}
    assert isinstance(bare.estimator, InFlightWaitEstimator)
    full = build_overflow_router(None, catalog, _settings(tmp_path, replicate_api_token="r8_x", gemini_api_key="AIzaX"))
    assert isinstance(full.providers["replicate"], ReplicateExecutor)
    assert isinstance(full.providers["veo"], VeoExecutor)
    assert full.providers["veo"].storage is full.providers["replicate"].storage
    assert isinstance(full.providers["veo"].storage, LocalStorage)


async def test_a_taken_back_job_goes_back_to_its_replica_not_to_a_provider(tmp_path: Path, catalog: Catalog) -> None:
    """The queue looks long, but this attempt follows one whose run goes on on a replica (its API
    stopped or died): it is sent there to attach, not paid for again at the provider."""
    class Saturated:
        def jobs_ahead(self, model: str) -> int:
            return 100

        def run_seconds(self, model: str) -> float | None:
            return None

    router = OverflowRouter(ScriptedExecutor(), {"replicate": _provider_done("replicate")}, catalog,
                            _settings(tmp_path), wait_estimator=Saturated())
    fresh = _job("tiny-burst")
    assert router.decide(fresh).target == "replicate"
    taken_back = dataclasses.replace(fresh, attempt=2, resume={REATTACH_KEY: "local"})
    assert router.decide(taken_back) == Route("local", "reattach", pytest.approx(100.0))
    after_a_failure = dataclasses.replace(fresh, attempt=2, resume={})
    assert router.decide(after_a_failure).target == "replicate"
