"""Prices: video by seconds and resolution, images by size, training by steps."""

from __future__ import annotations

import math
from typing import Any

import pytest

from api.core.pricing import (
    compute_units,
    credits_per_reference_clip,
    image_credits,
    local_video_credits,
    price_generation,
    price_training,
    training_credits,
    video_credits,
)
from api.core.requests import normalize_input
from api.settings import Settings
from models.catalog import Catalog


@pytest.mark.parametrize(("duration", "resolution", "credits"), [
    (4, "720p", 40), (6, "720p", 60), (8, "720p", 80),
    (4, "1080p", 60), (6, "1080p", 90), (8, "1080p", 120),
    (2.125, "720p", 22),  # rounded up to whole credits
    (1.0, None, 10),
])
def test_video_credits(duration: float, resolution: str | None, credits: int) -> None:
    assert video_credits(duration, resolution, 10.0, 1.5) == credits


def test_video_credits_take_configured_rates() -> None:
    assert video_credits(4, "720p", 2.5, 2.0) == 10
    assert video_credits(4, "1080p", 2.5, 2.0) == 20


def test_video_credits_do_not_round_up_float_noise() -> None:
    # 0.1 s × 30/s is 3.0000000000000004 in floats: still 3 credits, not 4.
    assert video_credits(0.1, "720p", 30.0, 1.5) == 3


@pytest.mark.parametrize(("width", "height", "credits"), [
    (64, 64, 1),      # at the base size
    (32, 32, 1),      # smaller is never cheaper than one image
    (128, 64, 2),     # twice the pixels
    (128, 128, 4),
    (96, 64, 2),      # 1.5× → rounded up
    (256, 256, 16),
])
def test_image_credits_scale_with_size(width: int, height: int, credits: int) -> None:
    assert image_credits(width, height, 1.0, 64 * 64) == credits


def test_image_credits_per_image_rate() -> None:
    assert image_credits(64, 64, 3.0, 4096) == 3
    assert image_credits(128, 128, 0.5, 4096) == 2


@pytest.mark.parametrize(("steps", "rate", "credits"), [
    (1000, 20.0, 20), (1500, 20.0, 30), (2, 20.0, 1), (4000, 20.0, 80), (999, 10.0, 10)])
def test_training_credits_by_steps(steps: int, rate: float, credits: int) -> None:
    assert training_credits(steps, rate) == credits


@pytest.fixture
def settings_plain(tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(data_dir=tmp_path, _env_file=None)


@pytest.mark.parametrize(("model", "raw", "credits"), [
    ("veo-3.1", {"duration": 4}, 40),
    ("veo-3.1", {"duration": 6, "resolution": "720p"}, 60),
    ("veo-3.1", {"duration": 8, "resolution": "720p"}, 80),
    ("veo-3.1", {"duration": 8, "resolution": "1080p"}, 120),
    ("veo-3.1-replicate", {}, 80),  # defaults: 8 s at 720p
    ("tiny-sd", {}, 1),
    ("tiny-sd", {"width": 128, "height": 128}, 4),
    ("tiny-wan", {"num_frames": 17, "fps": 8}, 22),   # the reference clip (the defaults)
    ("tiny-wan", {"num_frames": 17, "fps": 24}, 22),  # same compute at any fps
    ("tiny-wan", {"num_frames": 33, "fps": 16}, 43),  # 22 × 33/17 = 42.7
])
def test_price_generation_from_the_spec(catalog: Catalog, settings_plain: Settings, model: str,
                                        raw: dict, credits: int) -> None:
    spec = catalog.get(model)
    assert spec is not None
    _, normalized = normalize_input(spec, {"prompt": "p", **raw}, 500)
    assert price_generation(spec, normalized, settings_plain) == credits


def test_settings_rates_apply_when_the_spec_has_none(catalog: Catalog, settings_plain: Settings) -> None:
    spec = catalog.get("veo-3.1")
    assert spec is not None
    bare = spec.model_copy(update={"pricing": spec.pricing.model_copy(
        update={"credits_per_second": None, "multiplier_1080p": None})})
    s = settings_plain.model_copy(update={"video_credits_per_second": 5.0, "video_1080p_multiplier": 2.0})
    assert price_generation(bare, {"duration": 8.0, "resolution": "1080p"}, s) == 80
    assert price_generation(bare, {"duration": 4.0, "resolution": "720p"}, s) == 20
    image = catalog.get("tiny-sd")
    assert image is not None
    image_bare = image.model_copy(update={"pricing": image.pricing.model_copy(update={"credits_per_image": None})})
    s2 = settings_plain.model_copy(update={"image_credits": 3.0})
    assert price_generation(image_bare, {"width": 64, "height": 64}, s2) == 3


def test_price_training(catalog: Catalog, settings_plain: Settings) -> None:
    spec = catalog.get("tiny-sd")
    assert spec is not None
    assert price_training(spec, 1000, settings_plain) == 20
    no_rate = spec.model_copy(update={"pricing": spec.pricing.model_copy(
        update={"training_credits_per_1000_steps": None})})
    s = settings_plain.model_copy(update={"training_credits_per_1000_steps": 50.0})
    assert price_training(no_rate, 1000, s) == 50


def _local_price(catalog: Catalog, settings: Settings, model: str, **raw: Any) -> int:
    spec = catalog.get(model)
    assert spec is not None
    _, normalized = normalize_input(spec, {"prompt": "p", **raw}, 500)
    return price_generation(spec, normalized, settings)


@pytest.mark.parametrize("model", ["tiny-wan", "wan2.1-t2v-1.3b", "ltx-video"])
def test_local_video_price_follows_compute_not_fps(catalog: Catalog, settings_plain: Settings, model: str) -> None:
    spec = catalog.get(model)
    assert spec is not None and not spec.remote_only
    frames, steps = spec.defaults.num_frames, spec.defaults.steps
    assert frames and steps
    fps_low, fps_high = max(spec.limits.min_fps or 8, 8), min(spec.limits.max_fps or 24, 24)
    slow = _local_price(catalog, settings_plain, model, num_frames=frames, steps=steps, fps=fps_low)
    fast = _local_price(catalog, settings_plain, model, num_frames=frames, steps=steps, fps=fps_high)
    assert slow == fast == math.ceil(spec.pricing.credits_per_reference_clip or 0)
    doubled_steps = _local_price(catalog, settings_plain, model, num_frames=frames, steps=steps * 2, fps=fps_low)
    assert doubled_steps == 2 * slow


def test_local_video_credits_scale_linearly_and_round_up() -> None:
    ref = compute_units(17, 4, 64, 64)
    assert local_video_credits(17, 4, 64, 64, ref, 22) == 22
    assert local_video_credits(34, 4, 64, 64, ref, 22) == 44  # double the frames
    assert local_video_credits(17, 8, 64, 64, ref, 22) == 44  # double the steps
    assert local_video_credits(17, 4, 128, 128, ref, 22) == 88  # four times the pixels
    assert local_video_credits(17, 4, 64, 64, ref, 21.25) == 22  # rounded up
    assert local_video_credits(18, 4, 64, 64, ref, 22) == 24  # 23.29 -> 24
    assert local_video_credits(1, 1, 16, 16, ref, 22) == 1  # never free


def test_local_video_reference_price_defaults_to_per_second_rate(catalog: Catalog, settings_plain: Settings) -> None:
    spec = catalog.get("tiny-wan")
    assert spec is not None
    bare = spec.model_copy(update={"pricing": spec.pricing.model_copy(update={"credits_per_reference_clip": None})})
    assert credits_per_reference_clip(bare, settings_plain) == 10.0 * 17 / 8  # the defaults' 2.125 s
    s = settings_plain.model_copy(update={"video_credits_per_second": 4.0})
    assert credits_per_reference_clip(bare, s) == 4.0 * 17 / 8
    _, normalized = normalize_input(bare, {"prompt": "p", "fps": 24}, 500)
    assert price_generation(bare, normalized, s) == 9  # 8.5 rounded up, at any fps


def test_remote_only_video_stays_priced_by_duration(catalog: Catalog, settings_plain: Settings) -> None:
    assert _local_price(catalog, settings_plain, "veo-3.1", duration=4, resolution="720p") == 40
    assert _local_price(catalog, settings_plain, "veo-3.1", duration=8, resolution="1080p") == 120
    assert _local_price(catalog, settings_plain, "veo-3.1-replicate", duration=8, resolution="1080p") == 120


def test_fewer_steps_never_cheapen_a_model_that_may_overflow(catalog: Catalog, settings_plain: Settings) -> None:
    """wan2.1-t2v-1.3b may overflow to a provider that runs its own steps: one step costs what
    the reference clip's steps cost. A model without overflow prices the steps asked for."""
    spec = catalog.get("wan2.1-t2v-1.3b")
    assert spec is not None and spec.overflow.provider
    frames, steps = spec.defaults.num_frames, spec.defaults.steps
    one_step = _local_price(catalog, settings_plain, "wan2.1-t2v-1.3b", num_frames=frames, steps=1)
    full = _local_price(catalog, settings_plain, "wan2.1-t2v-1.3b", num_frames=frames, steps=steps)
    assert one_step == full
    local_only = catalog.get("tiny-wan")
    assert local_only is not None and not local_only.overflow.provider
    ref_steps = local_only.defaults.steps
    assert _local_price(catalog, settings_plain, "tiny-wan", steps=1) < \
        _local_price(catalog, settings_plain, "tiny-wan", steps=ref_steps)
