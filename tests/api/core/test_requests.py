"""Validating a generation request against its model's spec (before anything is charged)."""

from __future__ import annotations

from typing import Any

import pytest

from api.core.errors import InvalidInput
from api.core.requests import normalize_input
from models.catalog import Catalog
from models.spec import ModelSpec


@pytest.fixture
def specs(catalog: Catalog) -> dict[str, ModelSpec]:
    return {s.id: s for s in catalog.all()}


def _ok(spec: ModelSpec, **raw: Any) -> tuple[str, dict[str, Any]]:
    return normalize_input(spec, {"prompt": "a cat", **raw}, 500)


def _bad(spec: ModelSpec, max_chars: int = 500, **raw: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        normalize_input(spec, {"prompt": "a cat", **raw} if "prompt" not in raw else raw, max_chars)
    assert info.value.code == "invalid_input" and info.value.status == 422
    return info.value


# images ---------------------------------------------------------------------------------------
def test_image_defaults_are_filled_in(specs: dict[str, ModelSpec]) -> None:
    task, out = _ok(specs["tiny-sd"])
    assert task == "t2i"
    assert {k: out[k] for k in ("width", "height", "steps", "guidance", "negative_prompt", "loras")} == {
        "width": 64, "height": 64, "steps": 4, "guidance": 5.0, "negative_prompt": "", "loras": []}
    assert 0 <= out["seed"] < 2**32


def test_a_given_seed_is_kept_and_a_missing_one_fixed(specs: dict[str, ModelSpec]) -> None:
    assert _ok(specs["tiny-sd"], seed=42)[1]["seed"] == 42
    seeds = {_ok(specs["tiny-sd"])[1]["seed"] for _ in range(5)}
    assert len(seeds) > 1  # drawn per request, stored on the job


@pytest.mark.parametrize(("width", "height"), [(32, 32), (256, 256), (64, 128), (248, 40)])
def test_sizes_in_range(specs: dict[str, ModelSpec], width: int, height: int) -> None:
    out = _ok(specs["tiny-sd"], width=width, height=height)[1]
    assert (out["width"], out["height"]) == (width, height)


@pytest.mark.parametrize(("raw", "field"), [
    ({"width": 24}, "width"), ({"width": 264}, "width"), ({"height": 16}, "height"),
    ({"height": 512}, "height"), ({"width": 68}, "width"), ({"height": 100}, "height"),
    ({"width": 0}, "width"), ({"height": -8}, "height"),
])
def test_sizes_out_of_range_or_not_multiple(specs: dict[str, ModelSpec], raw: dict[str, int], field: str) -> None:
    err = _bad(specs["tiny-sd"], **raw)
    assert field in str(err.details) or field in err.message


def test_steps_limit(specs: dict[str, ModelSpec]) -> None:
    assert _ok(specs["tiny-sd"], steps=50)[1]["steps"] == 50
    assert _bad(specs["tiny-sd"], steps=51).details["field"] == "steps"
    _bad(specs["tiny-sd"], steps=0)


@pytest.mark.parametrize("raw", [
    {"prompt": ""}, {"prompt": 5}, {"width": "wide"}, {"steps": 2.5}, {"guidance": "high"},
    {"seed": -1}, {"seed": 2**32}, {"colour": "red"}, {"loras": "none"}, {"loras": [{"id": "x", "extra": 1}]},
    {"loras": [{"id": "x", "scale": 9}]}, {"strength": 0}, {"image": ""},
])
def test_wrong_types_and_unknown_fields(specs: dict[str, ModelSpec], raw: dict[str, Any]) -> None:
    body = {"prompt": "a cat", **raw}
    with pytest.raises(InvalidInput) as info:
        normalize_input(specs["tiny-sd"], body, 500)
    assert info.value.details["errors"], info.value.details


def test_input_must_be_an_object(specs: dict[str, ModelSpec]) -> None:
    for raw in (None, "a cat", ["a cat"], 3):
        with pytest.raises(InvalidInput):
            normalize_input(specs["tiny-sd"], raw, 500)


def test_prompt_and_negative_prompt_length(specs: dict[str, ModelSpec]) -> None:
    normalize_input(specs["tiny-sd"], {"prompt": "x" * 20}, 20)
    with pytest.raises(InvalidInput):
        normalize_input(specs["tiny-sd"], {"prompt": "x" * 21}, 20)
    with pytest.raises(InvalidInput):
        normalize_input(specs["tiny-sd"], {"prompt": "ok", "negative_prompt": "n" * 21}, 20)


def test_task_follows_the_image(specs: dict[str, ModelSpec]) -> None:
    task, out = _ok(specs["tiny-sd"], image="upl_1", strength=0.5)
    assert task == "i2i" and out["image"] == "upl_1" and out["strength"] == 0.5
    # tiny-wan is text-to-video only: an input image is refused.
    err = _bad(specs["tiny-wan"], image="upl_1")
    assert err.details["field"] == "image" and err.details["tasks"] == ["t2v"]
    assert _ok(specs["veo-3.1"], image="https://example.com/a.png")[0] == "i2v"


def test_text_only_refused_by_an_image_only_model(specs: dict[str, ModelSpec]) -> None:
    i2i_only = specs["tiny-sd"].model_copy(update={"tasks": ["i2i"]})
    assert _bad(i2i_only).details["field"] == "image"


def test_loras_count(specs: dict[str, ModelSpec]) -> None:
    three = [{"id": f"lora_{i}", "scale": 0.5} for i in range(3)]
    assert _ok(specs["tiny-sd"], loras=three)[1]["loras"] == three
    err = _bad(specs["tiny-sd"], loras=three + [{"id": "lora_4"}])
    assert err.details == {"field": "loras", "max": 3}
    assert _bad(specs["veo-3.1"], loras=[{"id": "lora_1"}]).details["field"] == "loras"


# local video ------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [5, 9, 17, 45, 49])
def test_frames_on_the_grid_are_accepted(specs: dict[str, ModelSpec], frames: int) -> None:
    task, out = _ok(specs["tiny-wan"], num_frames=frames, fps=8)
    assert task == "t2v"
    assert out["num_frames"] == frames and out["duration"] == round(frames / 8, 3)


@pytest.mark.parametrize("frames", [4, 6, 16, 18, 48])
def test_frames_off_the_grid_are_refused(specs: dict[str, ModelSpec], frames: int) -> None:
    err = _bad(specs["tiny-wan"], num_frames=frames)
    assert err.details == {"field": "num_frames", "multiple": 4, "offset": 1}


@pytest.mark.parametrize("frames", [1, 53, 101])
def test_frames_out_of_range_are_refused(specs: dict[str, ModelSpec], frames: int) -> None:
    err = _bad(specs["tiny-wan"], num_frames=frames)
    assert err.details["field"] == "num_frames"


@pytest.mark.parametrize(("duration", "fps", "frames"), [
    (2.0, 8, 17),     # 16 frames → nearest 4k+1 = 17
    (1.0, 8, 9),      # 8 → 9
    (0.5, 8, 5),      # 4 → 5 (and at least min_frames)
    (0.1, 8, 5),      # 1 → raised to min_frames
    (6.0, 8, 49),     # 48 → 49
    (30.0, 8, 49),    # far above: capped at max_frames
    (1.0, 16, 17),
])
def test_duration_becomes_frames(specs: dict[str, ModelSpec], duration: float, fps: int, frames: int) -> None:
    out = _ok(specs["tiny-wan"], duration=duration, fps=fps)[1]
    assert out["num_frames"] == frames
    assert out["fps"] == fps and out["duration"] == round(frames / fps, 3)


def test_video_defaults(specs: dict[str, ModelSpec]) -> None:
    out = _ok(specs["tiny-wan"])[1]
    assert (out["num_frames"], out["fps"], out["duration"]) == (17, 8, 2.125)
    assert out["resolution"] == "64p"


@pytest.mark.parametrize("fps", [3, 31])
def test_fps_out_of_range(specs: dict[str, ModelSpec], fps: int) -> None:
    assert _bad(specs["tiny-wan"], fps=fps).details["field"] == "fps"


def test_video_size_multiple_is_the_specs(specs: dict[str, ModelSpec]) -> None:
    _ok(specs["tiny-wan"], width=96, height=64)  # multiples of 16
    assert _bad(specs["tiny-wan"], width=72).details["field"] == "width"


# remote video -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "expected"), [
    ({}, (8.0, "720p", "16:9")),
    ({"duration": 4}, (4.0, "720p", "16:9")),
    ({"duration": 6, "aspect_ratio": "9:16"}, (6.0, "720p", "9:16")),
    ({"duration": 8, "resolution": "1080p"}, (8.0, "1080p", "16:9")),
])
def test_remote_video_accepted(specs: dict[str, ModelSpec], raw: dict[str, Any], expected: tuple) -> None:
    for model in ("veo-3.1", "veo-3.1-replicate"):
        task, out = _ok(specs[model], **raw)
        assert task == "t2v"
        assert (out["duration"], out["resolution"], out["aspect_ratio"]) == expected
        assert "width" not in out and "steps" not in out  # the provider decides those


@pytest.mark.parametrize(("raw", "field"), [
    ({"duration": 5}, "duration"),
    ({"duration": 10}, "duration"),
    ({"resolution": "480p"}, "resolution"),
    ({"resolution": "4k", "duration": 8}, "resolution"),
    ({"aspect_ratio": "1:1"}, "aspect_ratio"),
    ({"duration": 4, "resolution": "1080p"}, "resolution"),  # 1080p only at 8 s
    ({"duration": 6, "resolution": "1080p"}, "resolution"),
    ({"num_frames": 97}, "num_frames"),                       # remote models take seconds
])
def test_remote_video_refused(specs: dict[str, ModelSpec], raw: dict[str, Any], field: str) -> None:
    assert _bad(specs["veo-3.1"], **raw).details["field"] == field
