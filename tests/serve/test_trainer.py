"""``TrainerServer`` without Ray: the plain class, its ``train`` stream iterated in asyncio, on local storage."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from api.core.events import event_from_dict
from api.storage.local import LocalStorage
from models.catalog import Catalog
from models.generator import limit_threads
from serve.trainer import (
    TrainerServer,
    build_trainer_app,
    classify_training_error,
    default_checkpoint_every,
    trainer_deployment_options,
)
from tests.training.conftest import build_tiny, make_images

PREFIX = "loras/u1/lora1/"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    previous = limit_threads(1)  # see tests/training/conftest.py
    yield
    limit_threads(previous)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> LocalStorage:
    store = LocalStorage(tmp_path_factory.mktemp("storage"), signing_secret="x")
    for i, img in enumerate(make_images(4, 64)):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        store.put_bytes(f"uploads/u1/img{i}.png", buf.getvalue(), "image/png")
    return store


@pytest.fixture(scope="module")
def server(tiny_dir: Path, storage: LocalStorage, tmp_path_factory: pytest.TempPathFactory) -> TrainerServer:
    catalog = Catalog.load()
    specs = [s.model_dump(mode="json") for s in catalog.all() if s.id in ("tiny-sd", "tiny-wan-i2v")]
    runtime = {"storage_url": f"file://{storage.root}", "signing_secret": "x", "tiny_dir": str(tiny_dir),
               "cache_dir": str(tmp_path_factory.mktemp("cache"))}
    return TrainerServer(runtime, specs, storage=storage)


def job_input(**over: Any) -> dict[str, Any]:
    data = {"lora_id": "lora1", "base_model": "tiny-sd",
            "images": [{"key": f"uploads/u1/img{i}.png", "caption": "a TOK toy" if i == 1 else None} for i in range(4)],
            "trigger_word": "TOK", "steps": 6, "rank": 4, "alpha": 8, "learning_rate": 1e-3, "resolution": 64,
            "seed": 5, "caption_dropout": 0.05, "checkpoint_every": 2, "validation_prompt": "a photo of TOK",
            "weights_prefix": PREFIX}
    data.update(over)
    return data


def request(job_id: str = "job1", resume: dict[str, Any] | None = None, **over: Any) -> dict[str, Any]:
    return {"job_id": job_id, "user_id": "u1", "model": "tiny-sd", "input": job_input(**over),
            "output_prefix": f"outputs/u1/{job_id}/", "task": "train", "attempt": 1, "resume": resume or {},
            "adapter_set": ""}


async def collect(server: TrainerServer, req: dict[str, Any]) -> list[dict[str, Any]]:
    return [event async for event in server.train(req)]


def summary(events: list[dict[str, Any]]) -> list[Any]:
    """The stream in short: stages by name, progress as step numbers, the rest by type."""
    out: list[Any] = []
    for e in events:
        if e["type"] == "stage":
            out.append(e["stage"])
        elif e["type"] == "progress":
            out.append(e["step"])
        elif e["type"] == "checkpoint":
            out.append(("checkpoint", e["step"]))
        elif e["type"] == "output":
            out.append(("output", e["role"]))
        else:
            out.append(e["type"])
    return out


@pytest.fixture(scope="module")
def first_run(server: TrainerServer, storage: LocalStorage) -> dict[str, Any]:
    events = asyncio.run(collect(server, request()))
    # What storage held right after the run (later tests add and delete checkpoints).
    return {"events": events, "stored": storage.list(PREFIX), "weights": load_file(str(storage.root / PREFIX /
                                                                                      "pytorch_lora_weights.safetensors"))}


# --- pure parts --------------------------------------------------------------------------------

def test_deployment_options_run_one_job_per_replica() -> None:
    opts = trainer_deployment_options(num_gpus=1, num_cpus=4)
    assert opts["max_ongoing_requests"] == 1 and opts["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
    embedded = trainer_deployment_options(num_gpus=1, num_cpus=0.5, embedded=True)
    assert embedded["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}


def test_build_trainer_app_binds_the_server(tmp_path: Path) -> None:
    from ray.serve import Application

    from serve.generator import RuntimeConfig

    app = build_trainer_app(RuntimeConfig(storage_url=f"file://{tmp_path}"), num_gpus=0, num_cpus=0.5,
                            embedded=True, specs=[Catalog.load().get("tiny-sd")])  # type: ignore[list-item]
    assert isinstance(app, Application)


def test_serve_config_entry_point_builds_the_app(tmp_path: Path) -> None:
    from ray.serve import Application

    from serve.trainer import build

    app = build({"runtime": {"storage_url": f"file://{tmp_path}"}, "num_gpus": 0, "num_cpus": 0.5, "embedded": True})
    assert isinstance(app, Application)
    specs = app._bound_deployment.init_args[1]  # what the replica will train
    assert "tiny-sd" in [s["id"] for s in specs] and all(s["trainable"] for s in specs)


def test_error_classes() -> None:
    from training.trainer import CheckpointMismatch, TrainingCanceled

    assert classify_training_error(TrainingCanceled("x")) == ("canceled", False)
    assert classify_training_error(FloatingPointError("nan")) == ("training_diverged", False)
    assert classify_training_error(NotImplementedError("no")) == ("invalid_input", False)
    assert classify_training_error(CheckpointMismatch("rank")) == ("invalid_input", False)
    assert classify_training_error(RuntimeError("CUDA out of memory")) == ("out_of_memory", True)


def test_default_checkpoint_interval() -> None:
    assert [default_checkpoint_every(n) for n in (1, 8, 600, 2000)] == [1, 2, 150, 250]


# --- a training job -------------------------------------------------------------------------------

def test_events_stream_in_order(first_run: dict[str, Any]) -> None:
    events = first_run["events"]
    assert summary(events) == [
        "preparing", "training",
        1, 2, ("checkpoint", 2), 3, 4, ("checkpoint", 4), 5, 6,
        "exporting", "uploading", ("output", "weights"), ("output", "validation"), "done"]
    for e in events:
        event_from_dict(e)  # every dict is a valid api.core.events shape
    progress = [e for e in events if e["type"] == "progress"]
    assert all(e["total"] == 6 and e["stage"] == "training" and e["metrics"]["loss"] > 0 for e in progress)


def test_outputs_and_result(first_run: dict[str, Any], storage: LocalStorage) -> None:
    events = first_run["events"]
    weights, validation = (e for e in events if e["type"] == "output")
    assert weights["key"] == PREFIX + "pytorch_lora_weights.safetensors"
    assert weights["content_type"] == "application/octet-stream"
    assert validation["key"] == PREFIX + "validation.png" and validation["content_type"] == "image/png"
    assert (validation["width"], validation["height"]) == (64, 64)
    done = events[-1]["result"]
    assert done["weights_key"] == weights["key"] and done["validation_key"] == validation["key"]
    assert (done["rank"], done["alpha"], done["steps"], done["resumed_from"]) == (4, 8.0, 6, 0)
    losses = [e["metrics"]["loss"] for e in events if e["type"] == "progress"]
    assert done["loss"]["first"] == losses[0] and done["loss"]["last"] == losses[-1]
    assert done["loss"]["min"] == min(losses)
    stored = first_run["stored"]
    assert weights["key"] in stored and validation["key"] in stored
    with Image.open(storage.root / validation["key"]) as img:
        assert img.size == (64, 64)
    with safe_open(str(storage.root / weights["key"]), framework="pt") as handle:
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 8)


def test_only_the_latest_checkpoint_is_kept(first_run: dict[str, Any]) -> None:
    checkpoints = [e for e in first_run["events"] if e["type"] == "checkpoint"]
    assert [c["key"] for c in checkpoints] == [PREFIX + "checkpoints/step-2/checkpoint.json",
                                               PREFIX + "checkpoints/step-4/checkpoint.json"]
    stored = [k for k in first_run["stored"] if "/checkpoints/" in k]
    assert stored and all(k.startswith(PREFIX + "checkpoints/step-4/") for k in stored)
    assert {k.rsplit("/", 1)[1] for k in stored} == {"checkpoint.json", "lora.safetensors", "optimizer.pt",
                                                    "rng.pt", "state.json"}


def test_a_retry_resumes_from_the_recorded_checkpoint(first_run: dict[str, Any], server: TrainerServer,
                                                      storage: LocalStorage) -> None:
    checkpoint = [e for e in first_run["events"] if e["type"] == "checkpoint"][-1]
    events = asyncio.run(collect(server, request("job1", resume={"checkpoint_key": checkpoint["key"],
                                                                 "step": checkpoint["step"]})))
    assert summary(events)[:5] == ["preparing", "training", 5, 6, "exporting"]  # steps 1–4 not redone
    done = events[-1]["result"]
    assert done["resumed_from"] == 4 and done["steps"] == 6
    assert done["loss"]["first"] == first_run["events"][-1]["result"]["loss"]["first"]
    resumed = load_file(str(storage.root / PREFIX / "pytorch_lora_weights.safetensors"))
    import torch

    assert all(torch.allclose(resumed[k], first_run["weights"][k], rtol=1e-4, atol=1e-6) for k in resumed)


def test_a_missing_checkpoint_restarts_from_zero(server: TrainerServer) -> None:
    events = asyncio.run(collect(server, request(
        "job2", resume={"checkpoint_key": PREFIX + "checkpoints/step-99/checkpoint.json", "step": 99},
        steps=2, checkpoint_every=0)))
    assert summary(events)[:4] == ["preparing", "training", 1, 2]
    assert events[-1]["type"] == "done"


def test_the_pipeline_is_loaded_once_and_reused(first_run: dict[str, Any], server: TrainerServer) -> None:
    asyncio.run(collect(server, request("job3", steps=2, checkpoint_every=0)))
    assert server.loads["tiny-sd"] == 1


@pytest.mark.parametrize("where", ["awaiting", "holding"])
async def test_cancel_stops_training_within_a_step(server: TrainerServer, where: str) -> None:
    """The caller's task is canceled while it awaits the next event (CancelledError inside the
    stream) or while it holds one (the stream is then closed): either way training stops."""
    seen: list[dict[str, Any]] = []
    job_id = f"job-cancel-{where}"

    async def consume() -> None:
        async for event in server.train(request(job_id, steps=40, checkpoint_every=0)):
            seen.append(event)
            if where == "holding" and event["type"] == "progress" and event["step"] == 2:
                await asyncio.sleep(3600)

    task = asyncio.create_task(consume())
    while not any(e["type"] == "progress" and e["step"] >= 2 for e in seen):
        await asyncio.sleep(0.005)
        assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The thread stops at its next step check; the replica then takes the next job.
    for _ in range(600):
        if job_id in server.canceled and not server._lock.locked():
            break
        await asyncio.sleep(0.05)
    assert job_id in server.canceled and not server._lock.locked()
    last_seen = max(e["step"] for e in seen if e["type"] == "progress")
    assert server.last_run["job_id"] == job_id and server.last_run["outcome"] == "canceled"
    assert server.last_run["step"] <= last_seen + 1 < 40
    events = await collect(server, request("job-after", steps=2, checkpoint_every=0))
    assert events[-1]["type"] == "done"


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("over", "code", "text"), [
    ({"base_model": "nope"}, "invalid_input", "unknown base model"),
    ({"base_model": "tiny-wan-i2v"}, "invalid_input", "cannot be trained"),
    ({"steps": 100000}, "invalid_input", "steps must be"),
    ({"resolution": 96}, "invalid_input", "resolution must be"),
    ({"images": []}, "invalid_input", "no training images"),
    ({"images": [{"key": "uploads/u1/missing.png"}]}, "invalid_input", "not in storage"),
    ({"images": [{"key": "uploads/u1/junk.png"}]}, "invalid_input", "cannot be decoded"),
    ({"weights_prefix": "loras/u1/x"}, "invalid_input", "weights_prefix"),
])
def test_bad_jobs_fail_fast_without_retry(server: TrainerServer, storage: LocalStorage, over: dict[str, Any],
                                          code: str, text: str) -> None:
    storage.put_bytes("uploads/u1/junk.png", b"not an image", "image/png")
    events = asyncio.run(collect(server, request("bad", **over)))
    assert [e["type"] for e in events] == ["stage", "error"]
    error = events[-1]
    assert (error["code"], error["retryable"]) == (code, False)
    assert text in error["message"]


def test_a_foreign_checkpoint_key_is_refused(server: TrainerServer) -> None:
    events = asyncio.run(collect(server, request(
        "bad-resume", resume={"checkpoint_key": "loras/u2/other/checkpoints/step-2/checkpoint.json", "step": 2})))
    assert events[-1]["type"] == "error" and "does not belong" in events[-1]["message"]


# --- through Ray Serve ---------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
async def test_training_through_ray_serve_and_the_executor(ray_session: Any, ray_tiny_dir: Path,
                                                         storage: LocalStorage) -> None:
    """The deployment ``build_trainer_app`` makes, reached as the runner reaches it: RayExecutor
    sends ``kind="training"`` to the ``__trainer__`` handle and streams ``train``; a cancel through
    the executor stops the replica's training."""
    from ray import serve

    from api.core.events import CheckpointEvent, DoneEvent, ErrorEvent, OutputEvent, ProgressEvent
    from api.core.executor import ExecutionRequest
    from serve.executor import TRAINER_KEY, RayExecutor
    from serve.generator import RuntimeConfig

    runtime = RuntimeConfig(storage_url=f"file://{storage.root}", signing_secret="x", tiny_dir=str(ray_tiny_dir),
                            threads=1)
    app = build_trainer_app(runtime, num_gpus=0, num_cpus=0.5, embedded=True,
                            specs=[Catalog.load().get("tiny-sd")])  # type: ignore[list-item]
    handle = serve.run(app, name="trainer-test", route_prefix=None)
    try:
        executor = RayExecutor({TRAINER_KEY: handle})

        def execution(job_id: str, **over: Any) -> ExecutionRequest:
            return ExecutionRequest(job_id=job_id, user_id="u1", model="tiny-sd", kind="training", task="train",
                                    input=job_input(weights_prefix=f"loras/u1/{job_id}/", **over))

        events = [e async for e in executor.run(execution("ray-job", steps=4, checkpoint_every=2))]
        assert [type(e).__name__ for e in events if not isinstance(e, ProgressEvent)] == [
            "StageEvent", "StageEvent", "CheckpointEvent", "StageEvent", "StageEvent", "OutputEvent",
            "OutputEvent", "DoneEvent"]
        assert [e.step for e in events if isinstance(e, ProgressEvent)] == [1, 2, 3, 4]
        checkpoint = next(e for e in events if isinstance(e, CheckpointEvent))
        assert checkpoint.step == 2 and storage.exists(checkpoint.key)
        assert {e.role for e in events if isinstance(e, OutputEvent)} == {"weights", "validation"}
        done = events[-1]
        assert isinstance(done, DoneEvent) and storage.exists(done.result["weights_key"])

        seen: list[Any] = []

        async def long_job() -> None:
            async for event in executor.run(execution("ray-cancel", steps=200, checkpoint_every=0)):
                seen.append(event)

        task = asyncio.create_task(long_job())
        for _ in range(1200):
            if sum(isinstance(e, ProgressEvent) for e in seen) >= 2:
                break
            await asyncio.sleep(0.05)
        await executor.cancel("ray-cancel")
        await asyncio.wait_for(task, timeout=60)
        assert isinstance(seen[-1], ErrorEvent) and seen[-1].code == "canceled"
        for _ in range(300):
            stats = await handle.stats.remote()
            if stats["last_run"].get("outcome") == "canceled":
                break
            await asyncio.sleep(0.1)
        assert stats["last_run"]["job_id"] == "ray-cancel" and stats["last_run"]["outcome"] == "canceled"
        assert stats["last_run"]["step"] < 200 and "ray-cancel" in stats["canceled"]
    finally:
        serve.delete("trainer-test")
