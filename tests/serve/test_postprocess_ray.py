"""The post-processing deployment on the shared Ray session (``ray_stack`` deploys it beside the
generators): one operation through the RayExecutor, and the job-keyed fail hook reaching the replica."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from api.core.events import DoneEvent, ErrorEvent, OutputEvent, ProgressEvent, StageEvent
from api.core.executor import ExecutionRequest
from api.storage.local import LocalStorage
from models.media import encode_mp4
from serve.executor import POSTPROCESS_KEY, RayExecutor
from serve.postprocess import POSTPROCESS_MODEL, STAGE

pytestmark = pytest.mark.ray

RUN_S = 120.0


def op_job(key: str, **input_: Any) -> ExecutionRequest:
    job_id = "job_" + uuid.uuid4().hex[:10]
    return ExecutionRequest(job_id=job_id, user_id="usr_ray", model=POSTPROCESS_MODEL, kind="video", task="trim",
                            input={"video": "job:src", "video_key": key, **input_},
                            output_prefix=f"outputs/usr_ray/{job_id}/")


async def run(executor: RayExecutor, job: ExecutionRequest) -> list[Any]:
    async def drain() -> list[Any]:
        return [event async for event in executor.run(job)]

    return await asyncio.wait_for(drain(), RUN_S)


async def test_an_operation_runs_on_the_postprocess_deployment(ray_stack: Any, ray_settings: Any,
                                                               tmp_path: Path) -> None:
    storage = LocalStorage(ray_settings.data_dir / "storage", signing_secret="s")
    rng = np.random.default_rng(1)
    clip = encode_mp4([rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(16)], 8, tmp_path / "a.mp4")
    key = f"outputs/usr_ray/src-{uuid.uuid4().hex[:8]}/0.mp4"
    storage.put_file(key, clip, "video/mp4")
    executor = RayExecutor(lambda model: ray_stack.handles.get(model))

    job = op_job(key, start_s=0.5, duration_s=1.0)
    events = await run(executor, job)
    assert events[0] == StageEvent(STAGE), events
    assert isinstance(events[-1], DoneEvent), events
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    assert progress and progress[-1] == ProgressEvent(100, 100, STAGE)
    (output,) = [e for e in events if isinstance(e, OutputEvent)]
    assert (output.width, output.height, output.num_frames, output.fps) == (32, 32, 8, 8.0)
    assert output.key == f"{job.output_prefix}0.mp4" and storage.exists(output.key)
    assert output.thumbnail_key is not None and storage.exists(output.thumbnail_key)
    assert storage.exists(f"{job.output_prefix}result.json")
    handle = ray_stack.handles[POSTPROCESS_KEY]
    stats = await handle.stats.remote()
    assert stats["runs_by_job"][job.job_id] == 1

    # the replica reads the session's hook dir: a .fail fails that job's next run, retryably
    failing = op_job(key, duration_s=0.5)
    (Path(ray_settings.test_hooks_dir) / f"{failing.job_id}.fail").write_text("")
    events = await run(executor, failing)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "executor_error" and events[-1].retryable
