"""Generation over the HTTP API into the real Ray Serve path, on tiny checkpoints.

Each test submits through ``POST /v1/jobs`` of the shared API (``ray_api``), lets the runner drive
the job through ``RayExecutor`` into the replicas, and checks the files the replica wrote to storage
for what was asked: PNG size and metadata, MP4 frame count, fps and duration, thumbnails/posters.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.media import probe_mp4, read_png_metadata
from tests.fixtures.ray import RayApi

pytestmark = pytest.mark.ray


def png_of(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def check_png_output(api: RayApi, job: dict[str, Any], width: int, height: int) -> Image.Image:
    """The job's one PNG: its size, its metadata, its thumbnail; returns the decoded image."""
    assert len(job["outputs"]) == 1, job["outputs"]
    out = job["outputs"][0]
    assert out["content_type"] == "image/png"
    assert (out["width"], out["height"]) == (width, height)
    data = api.download(out["url"])
    img = png_of(data)
    assert img.format == "PNG" and img.size == (width, height) and img.mode == "RGB"
    meta = read_png_metadata(data)
    assert meta["prompt"] == job["input"]["prompt"]
    assert meta["model"] == job["model"]
    if job["input"].get("seed") is not None:
        assert meta["seed"] == str(job["input"]["seed"])
    assert job["thumbnail_url"] and out["thumbnail_url"] == job["thumbnail_url"]
    thumb = png_of(api.download(job["thumbnail_url"]))
    assert max(thumb.size) <= 256 and thumb.size == img.size  # never upscaled; tiny images stay as they are
    return img


def check_mp4_output(api: RayApi, job: dict[str, Any], width: int, height: int, frames: int, fps: int) -> dict[str, Any]:
    """The job's one MP4, probed by decoding: size, frame count, fps, duration; and its poster."""
    assert len(job["outputs"]) == 1, job["outputs"]
    out = job["outputs"][0]
    assert out["content_type"] == "video/mp4"
    assert (out["width"], out["height"], out["num_frames"], out["fps"]) == (width, height, frames, fps)
    assert out["duration_s"] == pytest.approx(frames / fps)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.mp4"
        path.write_bytes(api.download(out["url"]))
        info = probe_mp4(path)
    assert (info["width"], info["height"]) == (width, height)
    assert info["num_frames"] == frames
    assert info["fps"] == pytest.approx(fps)
    assert info["duration_s"] == pytest.approx(frames / fps, abs=1e-3)
    assert job["thumbnail_url"], "a video job has a poster"
    poster = png_of(api.download(job["thumbnail_url"]))
    assert poster.size == (width, height)
    return info


def check_settled(api: RayApi, user: Any, job: dict[str, Any]) -> None:
    """Charged exactly what was reserved, once; the files live under outputs/{user}/{job}/."""
    assert job["credits"]["charged"] == job["credits"]["reserved"] > 0
    assert job["credits"]["refunded"] == 0
    kinds = [e.kind for e in api.ledger(user.user.id, job["id"])]
    assert kinds.count("capture") == 1 and "refund" not in kinds, kinds
    keys = api.output_keys(user.user.id, job["id"])
    assert len(keys) == 2, keys  # the output and its thumbnail/poster
    assert all(k.startswith(f"outputs/{user.user.id}/{job['id']}/") for k in keys)


def test_text_to_image(ray_api: RayApi) -> None:
    user = ray_api.user()
    job = ray_api.run(user.api_key, "tiny-sd", {"prompt": "a lighthouse at dusk", "width": 64, "height": 96,
                                                "steps": 3, "seed": 7})
    assert job["task"] == "t2i" and job["kind"] == "image" and job["attempts"] == 1
    check_png_output(ray_api, job, 64, 96)
    assert read_png_metadata(ray_api.download(job["outputs"][0]["url"]))["task"] == "t2i"
    check_settled(ray_api, user, job)


def test_image_to_image_from_upload(ray_api: RayApi) -> None:
    user = ray_api.user()
    source = Image.new("RGB", (80, 48), (200, 30, 30))
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    with ray_api.http(user.api_key) as client:
        response = client.post("/v1/uploads", files={"file": ("red.png", buf.getvalue(), "image/png")})
    assert response.status_code == 201, response.text
    upload_id = response.json()["id"]
    job = ray_api.run(user.api_key, "tiny-sd", {"prompt": "make it blue", "image": upload_id, "width": 64,
                                                "height": 64, "steps": 4, "strength": 0.5, "seed": 11})
    assert job["task"] == "i2i"
    check_png_output(ray_api, job, 64, 64)
    assert read_png_metadata(ray_api.download(job["outputs"][0]["url"]))["task"] == "i2i"
    check_settled(ray_api, user, job)


def test_text_to_video(ray_api: RayApi) -> None:
    user = ray_api.user()
    job = ray_api.run(user.api_key, "tiny-wan", {"prompt": "waves on a beach", "width": 64, "height": 48,
                                                 "num_frames": 9, "fps": 6, "steps": 3, "seed": 3})
    assert job["task"] == "t2v" and job["kind"] == "video"
    check_mp4_output(ray_api, job, 64, 48, frames=9, fps=6)
    check_settled(ray_api, user, job)


def test_image_to_video_from_a_finished_image_job(ray_api: RayApi) -> None:
    user = ray_api.user()
    image_job = ray_api.run(user.api_key, "tiny-sd", {"prompt": "a red car", "width": 64, "height": 64,
                                                      "steps": 3, "seed": 21})
    job = ray_api.run(user.api_key, "tiny-wan-i2v", {"prompt": "the car drives off", "image": f"job:{image_job['id']}",
                                                     "width": 64, "height": 64, "num_frames": 5, "fps": 4,
                                                     "steps": 2, "seed": 5})
    assert job["task"] == "i2v" and job["input"]["image"] == f"job:{image_job['id']}"
    check_mp4_output(ray_api, job, 64, 64, frames=5, fps=4)
    check_settled(ray_api, user, job)
    # The source job's output is untouched by being used as an input.
    assert ray_api.output_keys(user.user.id, image_job["id"])


def test_same_seed_gives_identical_pixels(ray_api: RayApi) -> None:
    user = ray_api.user()
    inputs = {"prompt": "a bowl of fruit", "width": 64, "height": 64, "steps": 3, "seed": 1234}
    first, second = (ray_api.run(user.api_key, "tiny-sd", inputs) for _ in range(2))
    other = ray_api.run(user.api_key, "tiny-sd", {**inputs, "seed": 1235})
    pixels = [np.asarray(png_of(ray_api.download(j["outputs"][0]["url"]))) for j in (first, second, other)]
    assert first["id"] != second["id"]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2]), "another seed must give other pixels"
    assert pixels[0].std() > 0, "not a blank image"


def decoded_frames(api: RayApi, job: dict[str, Any]) -> np.ndarray:
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        path.write_bytes(api.download(job["outputs"][0]["url"]))
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames)


def test_same_seed_gives_identical_video_frames(ray_api: RayApi) -> None:
    user = ray_api.user()
    inputs = {"prompt": "a windy field", "width": 64, "height": 64, "num_frames": 5, "fps": 8, "steps": 2,
              "seed": 77}
    first, second = (ray_api.run(user.api_key, "tiny-wan", inputs) for _ in range(2))
    other = ray_api.run(user.api_key, "tiny-wan", {**inputs, "seed": 78})
    frames = [decoded_frames(ray_api, j) for j in (first, second, other)]
    assert frames[0].shape == (5, 64, 64, 3)
    assert np.array_equal(frames[0], frames[1])
    assert not np.array_equal(frames[0], frames[2])
