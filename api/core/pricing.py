"""Prices in whole credits, rounded up. All rates come from settings or the model's spec."""

from __future__ import annotations

import math
from typing import Any

from api.settings import Settings
from models.spec import ModelSpec


def video_credits(duration_s: float, resolution: str | None, credits_per_second: float,
                  multiplier_1080p: float) -> int:
    """``duration_s × credits_per_second × (multiplier if 1080p)``: 4 s/720p = 40, 8 s/1080p = 120."""
    factor = multiplier_1080p if resolution == "1080p" else 1.0
    return math.ceil(round(duration_s * credits_per_second * factor, 6))


def image_credits(width: int, height: int, credits_per_image: float, base_pixels: int) -> int:
    """Images cost ``credits_per_image`` up to ``base_pixels``, and proportionally more above it."""
    size_factor = max(1.0, (width * height) / base_pixels)
    return max(1, math.ceil(round(credits_per_image * size_factor, 6)))


def training_credits(steps: int, per_1000_steps: float) -> int:
    return max(1, math.ceil(round(steps * per_1000_steps / 1000, 6)))


def price_generation(spec: ModelSpec, normalized: dict[str, Any], settings: Settings) -> int:
    p = spec.pricing
    if spec.kind == "video":
        return video_credits(
            float(normalized["duration"]), normalized.get("resolution"),
            p.credits_per_second if p.credits_per_second is not None else settings.video_credits_per_second,
            p.multiplier_1080p if p.multiplier_1080p is not None else settings.video_1080p_multiplier)
    return image_credits(
        int(normalized["width"]), int(normalized["height"]),
        p.credits_per_image if p.credits_per_image is not None else settings.image_credits,
        p.base_pixels)


def price_training(spec: ModelSpec, steps: int, settings: Settings) -> int:
    rate = spec.pricing.training_credits_per_1000_steps
    return training_credits(steps, rate if rate is not None else settings.training_credits_per_1000_steps)
