"""``PostprocessServer`` as a plain class (no Ray) on LocalStorage: each event sequence, the stored
result a reclaimed attempt collects, attaching, cancel, errors and the job-keyed test hooks.

Most tests run the real operation (imageio-ffmpeg's ffmpeg on a 32×32 clip); the ones about
coalescing and timing use a stand-in ``run_operation`` gated by a threading.Event.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import models.postprocess
from models.media import encode_mp4, encode_png
from models.postprocess import MediaInfo, OperationFailed, OperationResult
from serve.postprocess import POSTPROCESS_MODEL, PROGRESS_TOTAL, STAGE, PostprocessServer
from tests.fixtures.harness import wait_until

WAIT_S = 30.0
USER = "usr_pp"


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    path = tmp_path / "hooks"
    path.mkdir()
    return path


def make_server(tmp_path: Path, hooks: Path | None = None) -> PostprocessServer:
    runtime: dict[str, Any] = {"storage_url": f"file://{tmp_path / 'storage'}", "signing_secret": "s"}
    if hooks is not None:
        runtime["test_hooks_dir"] = str(hooks)
    return PostprocessServer(runtime)


@pytest.fixture
def server(tmp_path: Path, hooks: Path) -> PostprocessServer:
    return make_server(tmp_path, hooks)


def put_video(server: PostprocessServer, tmp_path: Path, key: str = "outputs/usr_pp/job_src/0.mp4",
              frames: int = 8, fps: int = 8) -> str:
    rng = np.random.default_rng(0)
    clip = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(frames)]
    path = encode_mp4(clip, fps, tmp_path / "src.mp4")
    server.storage.put_file(key, path, "video/mp4")
    return key


def put_image(server: PostprocessServer, key: str = "outputs/usr_pp/job_img/0.png") -> str:
    server.storage.put_bytes(key, encode_png(Image.new("RGB", (32, 32), (200, 30, 30))), "image/png")
    return key


def request(job_id: str, op: str, input_: dict[str, Any], attempt: int = 1) -> dict[str, Any]:
    return {"job_id": job_id, "attempt": attempt, "user_id": USER, "model": POSTPROCESS_MODEL, "task": op,
            "input": input_, "output_prefix": f"outputs/{USER}/{job_id}/"}


async def collect(server: PostprocessServer, req: dict[str, Any]) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return [event async for event in server.generate(req)]

    return await asyncio.wait_for(run(), WAIT_S)


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def check_progress(events: list[dict[str, Any]]) -> list[int]:
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert all(e["stage"] == STAGE and e["total"] == PROGRESS_TOTAL for e in events if e["type"] == "progress")
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == PROGRESS_TOTAL
    return steps


# the event sequences -------------------------------------------------------------------------

async def test_an_image_upscale_streams_stage_progress_output_done_and_stores_a_thumbnail(
        server: PostprocessServer) -> None:
    key = put_image(server)
    events = await collect(server, request("job_up1", "upscale", {"image": "job:job_img", "image_key": key,
                                                                   "scale": 2}))
    assert events[0] == {"type": "stage", "stage": STAGE, "v": 1}
    assert types(events)[-2:] == ["output", "done"]
    assert set(types(events)[1:-2]) == {"progress"}
    check_progress(events)
    out = events[-2]
    assert out["key"] == f"outputs/{USER}/job_up1/0.png" and out["content_type"] == "image/png"
    assert (out["width"], out["height"]) == (64, 64) and out["num_frames"] is None
    assert out["thumbnail_key"] == f"outputs/{USER}/job_up1/0.thumb.jpg"
    with Image.open(io.BytesIO(server.storage.get_bytes(out["key"]))) as img:
        assert img.size == (64, 64)
    with Image.open(io.BytesIO(server.storage.get_bytes(out["thumbnail_key"]))) as img:
        assert img.format == "JPEG"
    done = events[-1]
    assert done["result"]["op"] == "upscale" and done["result"]["info"]["width"] == 64
    record = json.loads(server.storage.get_bytes(f"outputs/{USER}/job_up1/result.json"))
    assert record["job_id"] == "job_up1" and record["outputs"] == [out]
    assert server.stats()["runs_by_job"] == {"job_up1": 1}
    assert server.stats()["jobs"]["job_up1"]["state"] == "succeeded"


async def test_a_video_trim_output_carries_the_probed_frames_fps_duration_and_a_poster(
        server: PostprocessServer, tmp_path: Path) -> None:
    key = put_video(server, tmp_path, frames=16, fps=8)
    events = await collect(server, request("job_trim1", "trim", {"video_key": key, "start_s": 0.5, "end_s": 1.5}))
    assert types(events)[-2:] == ["output", "done"], events
    out = events[-2]
    assert out["key"].endswith("/0.mp4") and out["content_type"] == "video/mp4"
    assert (out["width"], out["height"], out["num_frames"], out["fps"]) == (32, 32, 8, 8.0)
    assert out["duration_s"] == pytest.approx(1.0)
    assert out["thumbnail_key"] == f"outputs/{USER}/job_trim1/0.poster.png"
    assert server.storage.get_bytes(out["thumbnail_key"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert models.postprocess.probe(server.storage.download(out["key"], tmp_path / "o.mp4")).num_frames == 8


async def test_concat_downloads_every_video_key_in_order(server: PostprocessServer, tmp_path: Path) -> None:
    a = put_video(server, tmp_path, "outputs/usr_pp/a/0.mp4", frames=8)
    b = put_video(server, tmp_path, "outputs/usr_pp/b/0.mp4", frames=16)
    events = await collect(server, request("job_cat1", "concat", {"videos": ["job:a", "job:b"],
                                                                   "video_keys": [a, b]}))
    assert events[-1]["type"] == "done", events
    assert events[-2]["num_frames"] == 24


@pytest.mark.parametrize(("fmt", "content_type"), [("gif", "image/gif"), ("webm", "video/webm")])
async def test_an_export_gets_its_content_type_and_a_poster(server: PostprocessServer, tmp_path: Path, fmt: str,
                                                           content_type: str) -> None:
    key = put_video(server, tmp_path)
    events = await collect(server, request(f"job_ex_{fmt}", "export", {"video_key": key, "format": fmt}))
    assert events[-1]["type"] == "done", events
    out = events[-2]
    assert out["key"].endswith(f"/0.{fmt}") and out["content_type"] == content_type
    assert out["num_frames"] == 8 and server.storage.exists(out["thumbnail_key"])


# progress coalescing, attach, replica-owned runs (stand-in operation) -----------------------

class FakeOperation:
    """``run_operation`` stand-in: reports ``reports`` fractions, optionally waits on ``gate``."""

    def __init__(self, reports: int = 1000) -> None:
        self.reports = reports
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.calls = 0

    def __call__(self, op: str, params: Any, inputs: list[Path], out_dir: Path, *, overlay: Path | None = None,
                 audio: Path | None = None, on_progress: Callable[[float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> OperationResult:
        self.calls += 1
        self.started.set()
        assert self.gate.wait(WAIT_S)
        for i in range(self.reports + 1):
            if on_progress:
                on_progress(i / self.reports)
        path = out_dir / "upscale.png"
        path.write_bytes(encode_png(Image.new("RGB", (8, 8))))
        return OperationResult(path=path, content_type="image/png", info=MediaInfo(kind="image", width=8, height=8))


@pytest.fixture
def fake_op(monkeypatch: pytest.MonkeyPatch) -> FakeOperation:
    op = FakeOperation()
    monkeypatch.setattr(models.postprocess, "run_operation", op)
    return op


async def test_progress_is_coalesced_to_one_event_per_five_percent(server: PostprocessServer,
                                                                   fake_op: FakeOperation) -> None:
    events = await collect(server, request("job_p1", "upscale", {"image_key": put_image(server), "scale": 2}))
    assert events[-1]["type"] == "done"
    steps = check_progress(events)
    assert steps == list(range(0, 101, 5))  # 1001 reports from the operation, 21 events


async def test_a_second_request_attaches_to_the_running_run_and_a_caller_leaving_does_not_stop_it(
        server: PostprocessServer, fake_op: FakeOperation) -> None:
    fake_op.gate.clear()
    req = request("job_at1", "upscale", {"image_key": put_image(server), "scale": 2})
    first = server.generate(req)
    assert (await asyncio.wait_for(anext(first), WAIT_S))["type"] == "stage"
    await first.aclose()  # the caller goes away (its API restarted): the run goes on
    second = asyncio.ensure_future(collect(server, {**req, "attempt": 2}))
    third = asyncio.ensure_future(collect(server, {**req, "attempt": 3}))
    await wait_until(lambda: len(server.stats()["jobs"]["job_at1"]["attempts"]) == 3, WAIT_S, what="attaches")
    fake_op.gate.set()
    a, b = await second, await third
    assert a == b and a[-1]["type"] == "done"
    assert fake_op.calls == 1
    stats = server.stats()
    assert stats["runs_by_job"] == {"job_at1": 1} and stats["attaches"] == {"job_at1": 2}
    assert stats["jobs"]["job_at1"]["attempts"] == [1, 2, 3]
    # once finished, a later attempt gets the finished result at once (progress collapsed)
    late = await collect(server, {**req, "attempt": 4})
    assert types(late) == ["stage", "progress", "output", "done"] and fake_op.calls == 1


async def test_another_replica_collects_the_stored_result_instead_of_running_again(
        server: PostprocessServer, tmp_path: Path, hooks: Path) -> None:
    req = request("job_rs1", "upscale", {"image_key": put_image(server), "scale": 2})
    events = await collect(server, req)
    other = make_server(tmp_path, hooks)  # same storage, nothing in memory
    again = await collect(other, {**req, "attempt": 2})
    assert types(again) == ["output", "done"]
    assert again[0] == events[-2] and again[1]["result"] == events[-1]["result"]
    assert other.stats()["runs_by_job"] == {} and other.stats()["attaches"] == {"job_rs1": 1}
    # outputs gone: the record does not count, the operation runs again
    other.storage.delete(events[-2]["key"])
    third = make_server(tmp_path, hooks)
    rerun = await collect(third, {**req, "attempt": 3})
    assert rerun[-1]["type"] == "done" and third.stats()["runs_by_job"] == {"job_rs1": 1}


# cancel ----------------------------------------------------------------------------------------

async def test_cancel_stops_a_held_run_and_it_is_not_reused(server: PostprocessServer, hooks: Path,
                                                             tmp_path: Path) -> None:
    (hooks / "job_cx1.hold").write_text("")
    req = request("job_cx1", "trim", {"video_key": put_video(server, tmp_path), "duration_s": 0.5})
    task = asyncio.ensure_future(collect(server, req))
    await wait_until(lambda: (hooks / "job_cx1.held").exists(), WAIT_S, what="the hold")
    assert not (hooks / "job_cx1.hold").exists()  # taken by this run: it holds one run
    assert server.stats()["jobs"]["job_cx1"]["state"] == "running"
    assert await server.cancel("job_cx1") is True
    events = await task
    assert events[-1] == {"type": "error", "code": "canceled", "message": "canceled", "retryable": False, "v": 1}
    assert "output" not in types(events)
    assert server.stats()["canceled"] == ["job_cx1"]
    assert not server.storage.exists(f"outputs/{USER}/job_cx1/result.json")
    # a canceled run is not reused: the next attempt runs afresh (not held: the .hold was taken)
    again = await collect(server, {**req, "attempt": 2})
    assert again[-1]["type"] == "done" and server.stats()["runs_by_job"] == {"job_cx1": 2}


async def test_a_cancel_before_the_request_means_it_never_runs(server: PostprocessServer,
                                                               fake_op: FakeOperation) -> None:
    assert await server.cancel("job_cx2") is False
    events = await collect(server, request("job_cx2", "upscale", {"image_key": put_image(server), "scale": 2}))
    assert types(events) == ["error"] and events[0]["code"] == "canceled"
    assert fake_op.calls == 0


async def test_cancel_of_a_queued_run_answers_at_once(tmp_path: Path, fake_op: FakeOperation) -> None:
    server = PostprocessServer({"storage_url": f"file://{tmp_path / 'storage'}"}, concurrency=1)
    fake_op.gate.clear()
    key = put_image(server)
    running = asyncio.ensure_future(collect(server, request("job_q1", "upscale", {"image_key": key, "scale": 2})))
    await wait_until(fake_op.started.is_set, WAIT_S, what="the first run")
    queued = asyncio.ensure_future(collect(server, request("job_q2", "upscale", {"image_key": key, "scale": 2})))
    await wait_until(lambda: "job_q2" in server.stats()["jobs"], WAIT_S, what="the queued run")
    assert server.stats()["jobs"]["job_q2"]["state"] == "queued" and server.stats()["queued"] == 1
    assert await server.cancel("job_q2") is True
    assert types(await queued) == ["error"]
    fake_op.gate.set()
    assert (await running)[-1]["type"] == "done"
    assert fake_op.calls == 1 and "job_q2" not in server.stats()["runs_by_job"]


# errors ----------------------------------------------------------------------------------------

async def test_bad_params_are_a_non_retryable_error_with_the_operations_code(server: PostprocessServer) -> None:
    events = await collect(server, request("job_e1", "upscale", {"image_key": put_image(server), "scale": 3}))
    assert events[-1]["type"] == "error" and "output" not in types(events)
    assert events[-1]["code"] == "invalid_input" and events[-1]["retryable"] is False


async def test_a_kind_mismatch_is_not_retryable(server: PostprocessServer) -> None:
    events = await collect(server, request("job_e2", "trim", {"video_key": put_image(server), "duration_s": 1}))
    assert events[-1]["type"] == "error" and events[-1]["retryable"] is False
    assert events[-1]["code"] in ("pipeline_kind_mismatch", "invalid_input")


async def test_a_missing_input_key_is_input_missing_not_retryable(server: PostprocessServer) -> None:
    events = await collect(server, request("job_e3", "trim", {"video_key": "outputs/usr_pp/gone/0.mp4",
                                                               "duration_s": 1}))
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == "input_missing" and events[-1]["retryable"] is False


async def test_an_ffmpeg_failure_is_retryable(server: PostprocessServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: Any, **kwargs: Any) -> OperationResult:
        raise OperationFailed("ffmpeg failed (exit -9): killed")

    monkeypatch.setattr(models.postprocess, "run_operation", crash)
    events = await collect(server, request("job_e4", "upscale", {"image_key": put_image(server), "scale": 2}))
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == "postprocess_failed" and events[-1]["retryable"] is True
    assert server.stats()["jobs"]["job_e4"]["state"] == "failed"


async def test_an_ffmpeg_timeout_is_not_retryable(server: PostprocessServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work past its time limit would time out again on every attempt: failed once, not retried for free."""
    def too_slow(*args: Any, **kwargs: Any) -> OperationResult:
        raise OperationFailed("ffmpeg ran past its time limit of 600 s", code="postprocess_timeout")

    monkeypatch.setattr(models.postprocess, "run_operation", too_slow)
    events = await collect(server, request("job_e5", "upscale", {"image_key": put_image(server), "scale": 2}))
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == "postprocess_timeout" and events[-1]["retryable"] is False


async def test_the_fail_hook_fails_one_run_retryably_then_the_next_attempt_runs(
        server: PostprocessServer, hooks: Path) -> None:
    (hooks / "job_f1.fail").write_text("")
    req = request("job_f1", "upscale", {"image_key": put_image(server), "scale": 2})
    first = await collect(server, req)
    assert first[-1]["type"] == "error"
    assert first[-1]["code"] == "executor_error" and first[-1]["retryable"] is True
    assert not (hooks / "job_f1.fail").exists()
    second = await collect(server, {**req, "attempt": 2})  # the failed run is not reused
    assert second[-1]["type"] == "done"
    assert server.stats()["runs_by_job"] == {"job_f1": 2}


async def test_without_a_hooks_dir_hook_files_do_nothing(tmp_path: Path, fake_op: FakeOperation) -> None:
    server = make_server(tmp_path)  # no test_hooks_dir
    (tmp_path / "job_f2.fail").write_text("")
    events = await collect(server, request("job_f2", "upscale", {"image_key": put_image(server), "scale": 2}))
    assert events[-1]["type"] == "done"
