"""Post-processing jobs (model ``postprocess``) reach the postprocess deployment: the RayExecutor's
handle, the router (always local, never a provider), and the deployment's Serve options."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from api.core.events import DoneEvent, ErrorEvent, ProgressEvent, ProviderEvent, StageEvent, event_to_wire
from api.core.executor import REATTACH_KEY, ExecutionRequest
from api.settings import Settings
from models.catalog import Catalog
from models.postprocess import load_operation_catalog
from serve.app import EMBEDDED_POSTPROCESS_CPUS, POSTPROCESS_ADMIT_FACTOR, postprocess_deployment_options
from serve.executor import POSTPROCESS_KEY, TRAINER_KEY, RayExecutor
from serve.postprocess import DEPLOYMENT_NAME, POSTPROCESS_MODEL, STAGE
from serve.router import InFlightWaitEstimator, OverflowRouter
from tests.fakes.executors import ScriptedExecutor
from tests.serve.test_executor import FakeHandle, FakeResponse

STREAM = [event_to_wire(StageEvent(STAGE)), event_to_wire(ProgressEvent(0, 100, STAGE)),
          event_to_wire(ProgressEvent(100, 100, STAGE)), event_to_wire(DoneEvent({"op": "trim"}))]


def op_request(**extra: Any) -> ExecutionRequest:
    job_id = "job_" + uuid.uuid4().hex[:8]
    return ExecutionRequest(**{"job_id": job_id, "user_id": "usr_1", "model": POSTPROCESS_MODEL, "kind": "video",
                               "task": "trim", "input": {"video_key": "outputs/usr_1/job_a/0.mp4", "end_s": 1.0},
                               "output_prefix": f"outputs/usr_1/{job_id}/", **extra})


async def test_the_executor_sends_an_op_job_to_the_postprocess_handle() -> None:
    postprocess, generator, trainer = (FakeHandle(FakeResponse(STREAM)), FakeHandle(FakeResponse([])),
                                       FakeHandle(FakeResponse([])))
    executor = RayExecutor({POSTPROCESS_KEY: postprocess, "tiny-wan": generator, TRAINER_KEY: trainer})
    job = op_request()
    events = [e async for e in executor.run(job)]
    assert events == [StageEvent(STAGE), ProgressEvent(0, 100, STAGE), ProgressEvent(100, 100, STAGE),
                      DoneEvent({"op": "trim"})]
    assert generator.payloads == [] and trainer.payloads == []
    (payload,) = postprocess.payloads
    assert payload["model"] == POSTPROCESS_MODEL and payload["task"] == "trim"
    assert payload["input"] == job.input and payload["output_prefix"] == job.output_prefix
    assert postprocess.options_seen == [{"stream": True}]  # no LoRA set: no multiplexing


async def test_without_the_postprocess_deployment_an_op_job_is_not_deployed_retryable() -> None:
    events = [e async for e in RayExecutor({"tiny-wan": FakeHandle(FakeResponse([]))}).run(op_request())]
    assert events == [ErrorEvent("not_deployed", "postprocess is not deployed on this cluster", retryable=True)]


async def test_cancel_of_an_op_job_reaches_the_postprocess_deployment() -> None:
    handle = FakeHandle(FakeResponse(STREAM))
    executor = RayExecutor({POSTPROCESS_KEY: handle})
    job = op_request()
    stream = executor.run(job)
    await anext(stream)
    await executor.cancel(job.job_id)
    assert handle.cancels == [job.job_id]
    await stream.aclose()


# the router --------------------------------------------------------------------------------------

def router(tmp_path: Path, local: ScriptedExecutor | None, **settings: Any) -> tuple[OverflowRouter, ScriptedExecutor]:
    provider = ScriptedExecutor([ProviderEvent("replicate", "r1", None, 1.0), DoneEvent({})], name="replicate")
    config = Settings(data_dir=tmp_path, signing_secret="s", _env_file=None, **settings)
    return OverflowRouter(local, {"replicate": provider}, Catalog.load(), config, InFlightWaitEstimator(1)), provider


async def test_the_router_runs_an_op_job_locally_even_with_a_long_wait(tmp_path: Path) -> None:
    local = ScriptedExecutor([StageEvent(STAGE), DoneEvent({})], name="local")
    r, provider = router(tmp_path, local)
    estimator = r.estimator
    assert isinstance(estimator, InFlightWaitEstimator)
    for _ in range(50):  # a deep local queue: a generation with overflow configured would leave
        estimator.started(POSTPROCESS_MODEL)
    estimator.finished(POSTPROCESS_MODEL, 600.0)
    job = op_request()
    decision = r.decide(job)
    assert not isinstance(decision, ErrorEvent) and (decision.target, decision.reason) == ("local", "local")
    events = [e async for e in r.run(job)]
    assert events[0] == ProviderEvent("local", None, "local", None) and isinstance(events[-1], DoneEvent)
    assert provider.runs == [] and [j.job_id for j in local.runs] == [job.job_id]


async def test_a_local_capacity_failure_of_an_op_job_is_not_overflowed(tmp_path: Path) -> None:
    local = ScriptedExecutor([ErrorEvent("capacity", "busy", retryable=True)], name="local")
    r, provider = router(tmp_path, local)
    events = [e async for e in r.run(op_request())]
    assert events[-1] == ErrorEvent("capacity", "busy", retryable=True) and provider.runs == []


async def test_an_op_job_reattaches_locally_and_without_a_local_executor_fails(tmp_path: Path) -> None:
    r, _ = router(tmp_path, ScriptedExecutor(name="local"))
    decision = r.decide(op_request(resume={REATTACH_KEY: "local"}))
    assert not isinstance(decision, ErrorEvent) and decision.reason == "reattach"
    nothing, _ = router(tmp_path, None)
    decision = nothing.decide(op_request())
    assert isinstance(decision, ErrorEvent) and decision.code == "local_unavailable" and not decision.retryable


# the deployment's options ---------------------------------------------------------------------

def test_the_deployment_is_cpu_only_and_sized_by_operations_yaml() -> None:
    catalog = load_operation_catalog()
    options = postprocess_deployment_options(catalog)
    assert options["name"] == DEPLOYMENT_NAME
    assert options["ray_actor_options"] == {"num_cpus": catalog.resources.num_cpus, "num_gpus": 0}
    # Serve admits more than the replica runs at once (it queues them, and attaches reclaims)
    assert options["max_ongoing_requests"] == catalog.serving.max_ongoing_requests * POSTPROCESS_ADMIT_FACTOR
    assert options["autoscaling_config"]["target_ongoing_requests"] == catalog.serving.max_ongoing_requests
    assert options["autoscaling_config"]["min_replicas"] == catalog.serving.min_replicas
    assert options["autoscaling_config"]["max_replicas"] == catalog.serving.max_replicas


def test_the_embedded_deployment_takes_a_fraction_of_a_cpu_and_one_replica() -> None:
    options = postprocess_deployment_options(load_operation_catalog(), embedded=True)
    assert options["ray_actor_options"] == {"num_cpus": pytest.approx(EMBEDDED_POSTPROCESS_CPUS), "num_gpus": 0}
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options


def test_memory_is_reserved_at_scale_only(tmp_path: Path) -> None:
    base = load_operation_catalog()
    catalog = base.model_copy(update={"resources": base.resources.model_copy(update={"memory_gb": 2.0})})
    assert postprocess_deployment_options(catalog)["ray_actor_options"]["memory"] == 2 * 1024**3
    assert "memory" not in postprocess_deployment_options(catalog, embedded=True)["ray_actor_options"]
