"""Pipelines end to end on the real Ray path: ``POST /v1/pipelines`` on the shared stack
(``ray_api``: tiny-sd, tiny-wan-i2v and the post-processing deployment), every shipped preset run
to its final file (probed with ffmpeg), a middle step failing, a replica killed mid-step, a cancel
mid-pipeline, and the pipeline's SSE stream. Asserted from the API, the ledger (one reserve and
one settlement per step) and the replicas' own counters.

Expectations (frames, fps, size, format) are computed here from the steps' inputs as the API
stores them (``GET /v1/jobs/{step job}``), with the frame rules of each operation written out
below, never copied from the output.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
import ray
from PIL import Image

from api.db.tables import Upload
from tests.fixtures.ray import RayApi

pytestmark = pytest.mark.ray

RUN_S = 180.0
PROMPT = "a lighthouse at dusk"
# tiny sizes and few frames: each preset runs in seconds on the CPU replicas
PRESET_PARAMS: dict[str, dict[str, Any]] = {
    "still-to-motion": {"prompt": PROMPT, "duration": 1, "aspect_ratio": "1:1"},
    "cinematic-short": {"prompt": PROMPT, "duration": 1, "aspect_ratio": "1:1", "watermark": "CW"},
    "loop-gif": {"prompt": PROMPT, "num_frames": 5, "aspect_ratio": "1:1"},
}
CODECS = {"mp4": "h264", "webm": "vp9", "gif": "gif"}
CONTENT_TYPES = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}
SMALL_IMAGE = {"width": 64, "height": 64, "steps": 4, "seed": 11}
SMALL_I2V = {"width": 64, "height": 64, "steps": 4, "num_frames": 5, "fps": 8, "seed": 12}


# expectations from the step inputs -----------------------------------------------------------
def half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def resampled(frames: int, fps_in: float, fps_out: float) -> int:
    return frames if fps_out == fps_in else max(1, half_up(frames * fps_out / fps_in))


def expected_output(step: dict[str, Any], source: dict[str, Any] | None) -> dict[str, Any]:
    """What a step produces, from its stored input (``step``: ``GET /v1/jobs/{id}``) and what its
    source step produced. The rules of models/postprocess/spec.py, restated independently."""
    data = step["input"]
    if step["model"] != "postprocess":
        if step["kind"] == "image":
            return {"kind": "image", "width": data["width"], "height": data["height"], "format": "png"}
        return {"kind": "video", "width": data["width"], "height": data["height"], "frames": data["num_frames"],
                "fps": float(data["fps"]), "format": "mp4"}
    assert source is not None, step
    op, out = step["task"], dict(source)
    if op == "upscale":
        out.update(width=source["width"] * data["scale"], height=source["height"] * data["scale"])
    elif op == "interpolate":
        out.update(frames=resampled(source["frames"], source["fps"], data["fps"]), fps=float(data["fps"]))
    elif op == "loop":
        n = source["frames"]
        cycle = 2 * n - 2 if data.get("mode") == "boomerang" and n > 2 else n
        out.update(frames=cycle * data["count"])
    elif op == "watermark":
        pass
    elif op == "export":
        fmt = data.get("format", "mp4")
        fps = float(data.get("fps") or source["fps"])
        out.update(frames=resampled(source["frames"], source["fps"], fps), fps=fps, format=fmt)
        assert data.get("max_side") is None, "the size rule of max_side is not restated here"
    else:  # pragma: no cover - the presets use only the ops above
        raise AssertionError(f"no expectation for op {op}")
    if out["kind"] == "video" and (op != "export" or out["format"] != "gif"):
        out.update(width=out["width"] - out["width"] % 2, height=out["height"] - out["height"] % 2)
    return out


def probe(path: Path) -> dict[str, Any]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    frames, _secs = imageio_ffmpeg.count_frames_and_secs(str(path))
    return {"width": meta["size"][0], "height": meta["size"][1], "fps": float(meta["fps"]), "frames": frames,
            "codec": str(meta.get("codec", "")).split(" ")[0].rstrip(",")}


def step_jobs(ray_api: RayApi, key: str, pipeline: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each step's job (its stored, normalized input), by step name."""
    return {s["name"]: ray_api.job(key, s["job_id"]) for s in pipeline["steps"]}


def ledger_kinds(ray_api: RayApi, user_id: str, job_id: str) -> list[str]:
    return [e.kind for e in ray_api.ledger(user_id, job_id)]


def sse_events(ray_api: RayApi, key: str, pipeline_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The pipeline's SSE stream read to its end (``completed``; the pipeline must be finished)."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    with ray_api.http(key) as client, client.stream("GET", f"/v1/pipelines/{pipeline_id}/events",
                                                    headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name:
                events.append((name, json.loads(line.split(":", 1)[1])))
                if name == "completed":
                    break
    return events


def check_settled(ray_api: RayApi, user_id: str, pipeline: dict[str, Any], captured: set[str]) -> None:
    """Steps in ``captured`` were charged their reservation once; every other one refunded in full
    once; the pipeline itself has no ledger row; its credits are the sums over its steps."""
    for step in pipeline["steps"]:
        kinds = ledger_kinds(ray_api, user_id, step["job_id"])
        credits = step["credits"]
        if step["name"] in captured:
            assert kinds == ["reserve", "capture"], (step["name"], kinds)
            assert credits["charged"] == credits["reserved"] > 0 and credits["refunded"] == 0, step
        else:
            assert kinds == ["reserve", "refund"], (step["name"], kinds)
            assert credits["charged"] == 0 and credits["refunded"] == credits["reserved"] > 0, step
    assert ledger_kinds(ray_api, user_id, pipeline["id"]) == []
    total = {k: sum(s["credits"][k] for s in pipeline["steps"]) for k in ("reserved", "charged", "refunded")}
    assert pipeline["credits"] == total, (pipeline["credits"], total)


def replica_names(app: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{app}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


# 1. every shipped preset, end to end ----------------------------------------------------------
@pytest.mark.parametrize("preset", list(PRESET_PARAMS))
def test_a_shipped_preset_runs_to_its_final_clip(ray_api: RayApi, preset: str, tmp_path: Path) -> None:
    user = ray_api.user(credits=2000)
    key = user.api_key
    start = ray_api.credits(key)["balance"]
    body = {"preset": preset, "params": PRESET_PARAMS[preset]}
    quote = ray_api.quote_pipeline(key, body)
    assert quote["affordable"] and quote["preset"] == preset, quote
    submitted = ray_api.submit_pipeline(key, body)
    assert submitted["credits"]["reserved"] == quote["credits"], (submitted["credits"], quote["credits"])

    pipeline = ray_api.wait_pipeline(key, submitted["id"], RUN_S)
    assert pipeline["status"] == "succeeded", pipeline
    assert [s["status"] for s in pipeline["steps"]] == ["succeeded"] * len(pipeline["steps"]), pipeline["steps"]
    assert [s["name"] for s in pipeline["steps"]] == [s["name"] for s in quote["steps"]]

    # what each step must produce, chained from the inputs the API stored for it
    jobs = step_jobs(ray_api, key, pipeline)
    produced: dict[str, dict[str, Any]] = {}
    for step in pipeline["steps"]:
        job = jobs[step["name"]]
        sources = step["depends_on"]
        source = produced[sources[0]] if sources else None
        produced[step["name"]] = expected_output(job, source)
        out = job["outputs"][0]
        want = produced[step["name"]]
        assert (out["width"], out["height"]) == (want["width"], want["height"]), (step["name"], out, want)
        if want["kind"] == "video":
            assert (out["num_frames"], out["fps"]) == (want["frames"], want["fps"]), (step["name"], out, want)
    final = produced[pipeline["steps"][-1]["name"]]

    # the final file, downloaded and probed
    assert len(pipeline["outputs"]) == 1, pipeline["outputs"]
    output = pipeline["outputs"][0]
    assert output["content_type"] == CONTENT_TYPES[final["format"]], output
    path = tmp_path / f"final.{final['format']}"
    path.write_bytes(ray_api.download(output["url"]))
    info = probe(path)
    assert (info["width"], info["height"]) == (final["width"], final["height"]), (info, final)
    assert info["frames"] == final["frames"], (info, final)
    assert info["codec"] == CODECS[final["format"]], info
    # a GIF's frame delay is whole centiseconds: 8 fps is stored as 12 cs, read back as 8.33 fps
    fps = 100 / round(100 / final["fps"]) if final["format"] == "gif" else final["fps"]
    assert abs(info["fps"] - fps) < 0.01, (info, final)

    # charged the quote, one capture per step, nothing refunded
    assert pipeline["credits"] == {"reserved": quote["credits"], "charged": quote["credits"], "refunded": 0}
    check_settled(ray_api, user.user.id, pipeline, captured={s["name"] for s in pipeline["steps"]})
    assert [s["credits"]["charged"] for s in pipeline["steps"]] == [s["credits"] for s in quote["steps"]]
    assert ray_api.credits(key)["balance"] == start - quote["credits"]

    if preset == "still-to-motion":  # 5. the SSE stream: a step.completed per step, URLs that download
        events = sse_events(ray_api, key, pipeline["id"])
        completed = [data for name, data in events if name == "step.completed"]
        assert [d["step"] for d in completed] == [s["name"] for s in pipeline["steps"]], events
        for data in completed:
            assert data["status"] == "succeeded" and data["credits"] > 0, data
            assert data["outputs"] and ray_api.download(data["outputs"][0]["url"]), data
        assert events[-1][0] == "completed" and events[-1][1]["pipeline"]["status"] == "succeeded"


# 2. a middle step fails ---------------------------------------------------------------------------
def test_a_failing_middle_step_refunds_the_rest_once(ray_api: RayApi) -> None:
    """still → mark (a watermark whose overlay image is gone from storage: the replica refuses it,
    ``input_missing``, not retryable) → motion: the still is charged, mark and motion refunded."""
    user = ray_api.user(credits=500)
    key = user.api_key
    start = ray_api.credits(key)["balance"]
    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (255, 255, 255, 200)).save(buf, "PNG")
    with ray_api.http(key) as client:
        upload = client.post("/v1/uploads", files={"file": ("logo.png", buf.getvalue(), "image/png")})
    assert upload.status_code == 201, upload.text
    with ray_api.db.read() as session:
        stored = session.get(Upload, upload.json()["id"])
        assert stored is not None
        overlay_key = stored.key
    body = {"steps": [
        {"name": "still", "model": "tiny-sd", "input": {"prompt": PROMPT, **SMALL_IMAGE}},
        {"name": "mark", "op": "watermark", "input": {"image": "step:still", "overlay": upload.json()["id"]}},
        {"name": "motion", "model": "tiny-wan-i2v", "input": {"prompt": PROMPT, "image": "step:mark", **SMALL_I2V}},
    ]}
    submitted = ray_api.submit_pipeline(key, body)
    ray_api.storage.delete(overlay_key)  # lost from storage after the checks: the replica cannot read it

    pipeline = ray_api.wait_pipeline(key, submitted["id"], RUN_S)
    assert pipeline["status"] == "failed", pipeline
    by_name = {s["name"]: s for s in pipeline["steps"]}
    assert by_name["still"]["status"] == "succeeded"
    assert by_name["mark"]["status"] == "failed" and by_name["mark"]["error"]["code"] == "input_missing", by_name
    assert by_name["mark"]["attempts"] == 1, by_name["mark"]  # not retried
    assert by_name["motion"]["status"] == "canceled" and by_name["motion"]["attempts"] == 0, by_name["motion"]
    assert pipeline["error"]["step"] == "mark", pipeline["error"]
    check_settled(ray_api, user.user.id, pipeline, captured={"still"})
    assert ray_api.credits(key)["balance"] == start - by_name["still"]["credits"]["charged"]
    assert ray_api.credits(key)["reserved"] == 0
    assert ray_api.stats("tiny-wan-i2v")["runs_by_job"].get(by_name["motion"]["job_id"], 0) == 0


def held_pipeline(token: str) -> dict[str, Any]:
    """still → motion (its prompt carries the hold token: held after denoising step 1) → final."""
    return {"steps": [
        {"name": "still", "model": "tiny-sd", "input": {"prompt": PROMPT, **SMALL_IMAGE}},
        {"name": "motion", "model": "tiny-wan-i2v",
         "input": {"prompt": f"{PROMPT} {token}", "image": "step:still", **SMALL_I2V}},
        {"name": "final", "op": "export", "input": {"video": "step:motion", "format": "webm"}},
    ]}


# 3. a replica lost mid-step -----------------------------------------------------------------------
@pytest.mark.slow
def test_a_step_retried_after_its_replica_is_killed_never_reruns_the_first(ray_api: RayApi) -> None:
    user = ray_api.user(credits=500)
    key = user.api_key
    before = replica_names("tiny-wan-i2v")
    assert len(before) == 1, before
    token = ray_api.hold(step=1)
    submitted = ray_api.submit_pipeline(key, held_pipeline(token))
    ids = {s["name"]: s["job_id"] for s in submitted["steps"]}
    ray_api.wait_held(ids["motion"])
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    ray_api.release(ids["motion"])  # the retry, on the new replica, is not held again

    pipeline = ray_api.wait_pipeline(key, submitted["id"], RUN_S)
    assert pipeline["status"] == "succeeded", pipeline
    by_name = {s["name"]: s for s in pipeline["steps"]}
    assert by_name["motion"]["attempts"] == 2, by_name["motion"]
    assert by_name["still"]["attempts"] == 1 and by_name["final"]["attempts"] == 1
    assert ray_api.stats("tiny-sd")["runs_by_job"][ids["still"]] == 1  # step 1 ran once
    after = replica_names("tiny-wan-i2v")
    assert after and before[0] not in after, "Serve replaced the killed replica"
    check_settled(ray_api, user.user.id, pipeline, captured=set(ids))


# 4. cancel during step 2 --------------------------------------------------------------------------
def test_cancel_during_step_two_keeps_step_one_and_refunds_the_rest(ray_api: RayApi) -> None:
    user = ray_api.user(credits=500)
    key = user.api_key
    start = ray_api.credits(key)["balance"]
    token = ray_api.hold(step=1)
    submitted = ray_api.submit_pipeline(key, held_pipeline(token))
    ids = {s["name"]: s["job_id"] for s in submitted["steps"]}
    ray_api.wait_held(ids["motion"])
    with ray_api.http(key) as client:
        response = client.post(f"/v1/pipelines/{submitted['id']}/cancel")
    assert response.status_code == 200, response.text

    pipeline = ray_api.wait_pipeline(  # never released: the cancel ends the hold
        key, submitted["id"], 60, check=lambda p: all(s["status"] in ("succeeded", "canceled") for s in p["steps"])
        and p["status"] == "canceled")
    by_name = {s["name"]: s for s in pipeline["steps"]}
    assert [by_name[n]["status"] for n in ("still", "motion", "final")] == ["succeeded", "canceled", "canceled"]
    check_settled(ray_api, user.user.id, pipeline, captured={"still"})
    assert ray_api.credits(key)["balance"] == start - by_name["still"]["credits"]["charged"]
    # step 1's output is kept and still downloads
    still = ray_api.job(key, ids["still"])
    assert still["outputs"] and ray_api.download(still["outputs"][0]["url"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert by_name["final"]["attempts"] == 0
    assert ids["motion"] in ray_api.wait_stats("tiny-wan-i2v", lambda s: ids["motion"] in s["canceled"])["canceled"]
