"""normalize_input for a model whose task is upscale: image required, prompt optional, output ×4."""

from __future__ import annotations

import pytest

from api.core.errors import InvalidInput
from api.core.requests import normalize_input
from models.catalog import Catalog
from models.spec import ModelSpec


@pytest.fixture
def upscaler() -> ModelSpec:
    spec = Catalog.load().get("tiny-sd-x4-upscaler")
    assert spec is not None
    return spec


def test_the_output_is_four_times_the_given_input_size(upscaler: ModelSpec) -> None:
    task, out = normalize_input(upscaler, {"image": "upl_1", "width": 16, "height": 24, "seed": 3}, 100)
    assert task == "upscale"
    assert out["width"] == 64 and out["height"] == 96 and out["scale"] == 4
    assert out["input_width"] == 16 and out["input_height"] == 24 and out["size_known"] is True
    assert out["prompt"] == "" and out["image"] == "upl_1" and out["seed"] == 3
    assert out["steps"] == upscaler.defaults.steps


def test_a_prompt_is_optional_and_empty_is_allowed(upscaler: ModelSpec) -> None:
    assert normalize_input(upscaler, {"image": "u", "prompt": ""}, 100)[1]["prompt"] == ""
    assert normalize_input(upscaler, {"image": "u", "prompt": "sharp"}, 100)[1]["prompt"] == "sharp"


def test_without_the_input_size_it_is_priced_at_the_largest_output(upscaler: ModelSpec) -> None:
    _task, out = normalize_input(upscaler, {"image": "u"}, 100)
    assert (out["width"], out["height"]) == (upscaler.limits.max_width, upscaler.limits.max_height)
    assert out["size_known"] is False and "input_width" not in out


@pytest.mark.parametrize(("raw", "field"), [
    ({"prompt": "no image"}, "image"),
    ({"image": "u", "width": 128, "height": 16}, "width"),  # 512 px out: over max_width 256
    ({"image": "u", "width": 4, "height": 16}, "width"),  # 16 px out: under min_width 32
    ({"image": "u", "width": 16}, "height"),
    ({"image": "u", "num_frames": 9}, "num_frames"),
    ({"image": "u", "strength": 0.5}, "strength"),
    ({"image": "u", "steps": 51}, "steps"),
])
def test_refused(upscaler: ModelSpec, raw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        normalize_input(upscaler, raw, 100)
    assert info.value.details["field"] == field


def test_other_models_still_require_a_prompt() -> None:
    spec = Catalog.load().get("tiny-sd")
    assert spec is not None
    with pytest.raises(InvalidInput):
        normalize_input(spec, {"image": "u"}, 100)
