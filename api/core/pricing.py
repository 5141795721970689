"""Prices in whole credits, rounded up. All rates come from settings or the model's spec.

- Remote-only video (Veo, Replicate): ``duration_s × credits_per_second × (1.5 if 1080p)``, as the
  providers charge per second of output.
- Local video: by the compute asked for, ``frames × steps × width × height``, relative to the
  model's reference clip (its defaults), which costs ``credits_per_reference_clip``. The same
  frames, steps and size cost the same at any fps (fps only changes how long the clip plays).
- Images: per image up to ``base_pixels``, proportionally more above; a job of
  ``num_outputs`` images costs that many times one image.
"""

from __future__ import annotations

import math
from typing import Any

from api.settings import Settings
from models.spec import ModelSpec


def _credits(amount: float) -> int:
    """Whole credits, rounded up, at least 1 (``round`` first: 0.1 × 30 is 3, not 4)."""
    return max(1, math.ceil(round(amount, 6)))


def video_credits(duration_s: float, resolution: str | None, credits_per_second: float,
                  multiplier_1080p: float) -> int:
    """``duration_s × credits_per_second × (multiplier if 1080p)``: 4 s/720p = 40, 8 s/1080p = 120."""
    factor = multiplier_1080p if resolution == "1080p" else 1.0
    return math.ceil(round(duration_s * credits_per_second * factor, 6))


def compute_units(num_frames: int, steps: int, width: int, height: int) -> int:
    """What a local video generation costs the GPU, to first order: denoising steps over every
    latent of every frame."""
    return num_frames * steps * width * height


def local_video_credits(num_frames: int, steps: int, width: int, height: int, reference_units: int,
                        credits_per_reference: float) -> int:
    """``credits_per_reference × compute / reference compute``, rounded up."""
    return _credits(credits_per_reference * compute_units(num_frames, steps, width, height) / reference_units)


def reference_clip(spec: ModelSpec) -> tuple[int, int, int, int, int] | None:
    """The spec's reference clip ``(num_frames, steps, width, height, fps)``: its defaults."""
    d = spec.defaults
    if not (d.num_frames and d.steps and d.width and d.height):
        return None
    return d.num_frames, d.steps, d.width, d.height, d.fps or 16


def credits_per_reference_clip(spec: ModelSpec, settings: Settings) -> float | None:
    """The reference clip's price: configured, or ``credits_per_second × its duration``."""
    ref = reference_clip(spec)
    if ref is None:
        return None
    if spec.pricing.credits_per_reference_clip is not None:
        return spec.pricing.credits_per_reference_clip
    per_second = spec.pricing.credits_per_second
    per_second = per_second if per_second is not None else settings.video_credits_per_second
    frames, _steps, _w, _h, fps = ref
    return per_second * frames / fps


def image_credits(width: int, height: int, credits_per_image: float, base_pixels: int) -> int:
    """Images cost ``credits_per_image`` up to ``base_pixels``, and proportionally more above it."""
    size_factor = max(1.0, (width * height) / base_pixels)
    return max(1, math.ceil(round(credits_per_image * size_factor, 6)))


def training_credits(steps: int, per_1000_steps: float) -> int:
    return max(1, math.ceil(round(steps * per_1000_steps / 1000, 6)))


def price_generation(spec: ModelSpec, normalized: dict[str, Any], settings: Settings) -> int:
    p = spec.pricing
    if spec.kind == "video":
        ref = reference_clip(spec)
        if not spec.remote_only and ref is not None and "num_frames" in normalized and "steps" in normalized:
            frames, steps, width, height, _fps = ref
            price = credits_per_reference_clip(spec, settings)
            assert price is not None
            asked_steps = int(normalized["steps"])
            if spec.overflow.provider:
                # It may overflow to a provider that runs (and bills) its own step count: fewer
                # steps than the reference clip's never make such a job cheaper.
                asked_steps = max(asked_steps, steps)
            return local_video_credits(int(normalized["num_frames"]), asked_steps,
                                       int(normalized["width"]), int(normalized["height"]),
                                       compute_units(frames, steps, width, height), price)
        return video_credits(
            float(normalized["duration"]), normalized.get("resolution"),
            p.credits_per_second if p.credits_per_second is not None else settings.video_credits_per_second,
            p.multiplier_1080p if p.multiplier_1080p is not None else settings.video_1080p_multiplier)
    return int(normalized.get("num_outputs") or 1) * image_credits(
        int(normalized["width"]), int(normalized["height"]),
        p.credits_per_image if p.credits_per_image is not None else settings.image_credits,
        p.base_pixels)


def price_training(spec: ModelSpec, steps: int, settings: Settings) -> int:
    rate = spec.pricing.training_credits_per_1000_steps
    return training_credits(steps, rate if rate is not None else settings.training_credits_per_1000_steps)
