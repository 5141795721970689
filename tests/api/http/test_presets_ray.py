"""The three shipped presets (tiny profile) run end to end on the real Ray path: the tiny models,
then the post-processing deployment; the final file is what each preset promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest

from tests.fixtures.ray import RayApi

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CASES = [
    # preset, params, final content type, (width, height), fps
    ("still-to-motion", {"style": "cinematic"}, "video/mp4", (64, 64), 16.0),
    ("cinematic-short", {"aspect_ratio": "16:9", "watermark": "CW"}, "video/mp4", (192, 128), 8.0),
    ("loop-gif", {"num_frames": 9}, "image/gif", (64, 64), 8.0),
]


@pytest.mark.parametrize(("preset", "params", "ctype", "size", "fps"), CASES, ids=[c[0] for c in CASES])
def test_shipped_preset_runs(ray_api: RayApi, tmp_path: Path, preset: str, params: dict[str, Any], ctype: str,
                             size: tuple[int, int], fps: float) -> None:
    user = ray_api.user(credits=10_000)
    body = {"preset": preset, "params": {"prompt": "a lighthouse at dusk", **params}}
    quote = ray_api.quote_pipeline(user.api_key, body)
    created = ray_api.submit_pipeline(user.api_key, body)
    assert created["preset"] == preset and created["preset_version"] == 1
    done = ray_api.wait_pipeline(user.api_key, created["id"], timeout_s=300)
    assert done["status"] == "succeeded", [(s["name"], s["status"], s["error"]) for s in done["steps"]]
    assert [s["status"] for s in done["steps"]] == ["succeeded"] * len(done["steps"])
    assert done["credits"]["charged"] == quote["credits"]  # all of it captured, nothing refunded
    (final,) = done["outputs"]
    assert final["content_type"] == ctype and (final["width"], final["height"]) == size, final
    data = ray_api.download(final["url"])
    path = tmp_path / ("out.gif" if ctype == "image/gif" else "out.mp4")
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    reader.close()
    assert tuple(meta["size"]) == size
    assert meta["fps"] == pytest.approx(fps, rel=0.05)
    if preset == "loop-gif":  # forward then backward: more frames than the 9 generated
        frames, _secs = imageio_ffmpeg.count_frames_and_secs(str(path))
        assert frames > 9
