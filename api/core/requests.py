"""Validate a generation request against its model's spec, before anything is charged.

The result is the normalized input stored on the job: defaults filled in, the task decided,
video length given both as frames and seconds.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.core.errors import InvalidInput
from models.spec import ModelSpec


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)
    scale: float = Field(default=1.0, ge=-4.0, le=4.0)


class GenerationInput(BaseModel):
    """The ``input`` object of ``POST /v1/jobs``; fields the client relies on keep their names."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    width: int | None = Field(default=None, ge=1, le=16384)
    height: int | None = Field(default=None, ge=1, le=16384)
    steps: int | None = Field(default=None, ge=1, le=1000)
    guidance: float | None = Field(default=None, ge=0.0, le=50.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    num_frames: int | None = Field(default=None, ge=1, le=10000)
    fps: int | None = Field(default=None, ge=1, le=240)
    duration: float | None = Field(default=None, gt=0, le=600)
    resolution: str | None = None
    aspect_ratio: str | None = None
    image: str | None = Field(default=None, min_length=1, max_length=2048)
    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    loras: list[LoraRef] = Field(default_factory=list)
    # images from one job, generated as one batch (seeds seed, seed+1, …); priced per image
    num_outputs: int | None = Field(default=None, ge=1, le=10)


class UpscaleInput(GenerationInput):
    """The input of a model whose task is ``upscale``: ``image`` required, the prompt optional, and
    ``width``/``height`` the INPUT image's size when the caller (the pipeline planner) knows it."""

    prompt: str = ""  # type: ignore[assignment]  # "" allowed: the upscaler is text-guided, optionally


UPSCALE_FACTOR = 4
"""Output side / input side of the catalog's upscalers (the SD x4 upscaler family)."""


def _invalid(message: str, field: str, **details: Any) -> InvalidInput:
    return InvalidInput(message, {"field": field, **details})


def parse_input(raw: Any, model: type[GenerationInput] = GenerationInput) -> GenerationInput:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        first = errors[0]
        raise InvalidInput(f"input.{first['field']}: {first['message']}", {"errors": errors}) from exc


def _check_size(spec: ModelSpec, width: int, height: int) -> None:
    lim = spec.limits
    if not lim.min_width <= width <= lim.max_width:
        raise _invalid(f"width must be between {lim.min_width} and {lim.max_width}", "width",
                       min=lim.min_width, max=lim.max_width)
    if not lim.min_height <= height <= lim.max_height:
        raise _invalid(f"height must be between {lim.min_height} and {lim.max_height}", "height",
                       min=lim.min_height, max=lim.max_height)
    for name, value in (("width", width), ("height", height)):
        if value % lim.size_multiple:
            raise _invalid(f"{name} must be a multiple of {lim.size_multiple}", name,
                           multiple=lim.size_multiple)


def _nearest_valid_frames(spec: ModelSpec, frames: int) -> int:
    lim = spec.limits
    mult = lim.frame_multiple or 1
    n = round((frames - lim.frame_offset) / mult) * mult + lim.frame_offset
    lo = lim.min_frames or 1
    hi = lim.max_frames or n
    while n < lo:
        n += mult
    while n > hi:
        n -= mult
    return n


def _local_video(spec: ModelSpec, data: GenerationInput, out: dict[str, Any]) -> None:
    lim = spec.limits
    fps = data.fps or spec.defaults.fps or 16
    if lim.min_fps and fps < lim.min_fps or lim.max_fps and fps > lim.max_fps:
        raise _invalid(f"fps must be between {lim.min_fps} and {lim.max_fps}", "fps",
                       min=lim.min_fps, max=lim.max_fps)
    if data.num_frames is not None:
        frames = data.num_frames
        mult = lim.frame_multiple or 1
        if (frames - lim.frame_offset) % mult:
            raise _invalid(f"num_frames must be {mult}·k + {lim.frame_offset} (e.g. "
                           f"{_nearest_valid_frames(spec, frames)})", "num_frames",
                           multiple=mult, offset=lim.frame_offset)
    elif data.duration is not None:
        frames = _nearest_valid_frames(spec, math.ceil(data.duration * fps))
    else:
        frames = spec.defaults.num_frames or _nearest_valid_frames(spec, fps * 2)
    if lim.min_frames and frames < lim.min_frames or lim.max_frames and frames > lim.max_frames:
        raise _invalid(f"num_frames must be between {lim.min_frames} and {lim.max_frames} "
                       f"(duration at {fps} fps: {(lim.min_frames or 0) / fps:.2f}–"
                       f"{(lim.max_frames or 0) / fps:.2f} s)", "num_frames",
                       min=lim.min_frames, max=lim.max_frames)
    out.update(num_frames=frames, fps=fps, duration=round(frames / fps, 3))
    short = min(out["width"], out["height"])
    out["resolution"] = "1080p" if short >= 1080 else "720p" if short >= 720 else f"{short}p"


def _remote_video(spec: ModelSpec, data: GenerationInput, out: dict[str, Any]) -> None:
    lim, d = spec.limits, spec.defaults
    duration = data.duration if data.duration is not None else d.duration
    if data.num_frames is not None and data.duration is None:
        raise _invalid("this model takes duration (seconds), not num_frames", "num_frames",
                       durations=lim.durations)
    resolution = data.resolution or d.resolution
    aspect = data.aspect_ratio or d.aspect_ratio
    if lim.durations and duration not in lim.durations:
        raise _invalid(f"duration must be one of {lim.durations}", "duration", allowed=lim.durations)
    if lim.resolutions and resolution not in lim.resolutions:
        raise _invalid(f"resolution must be one of {lim.resolutions}", "resolution", allowed=lim.resolutions)
    if lim.aspect_ratios and aspect not in lim.aspect_ratios:
        raise _invalid(f"aspect_ratio must be one of {lim.aspect_ratios}", "aspect_ratio",
                       allowed=lim.aspect_ratios)
    allowed = (lim.resolutions_by_duration or {}).get(resolution or "")
    if allowed is not None and duration not in allowed:
        raise _invalid(f"{resolution} is only available at {allowed} s", "resolution",
                       durations=allowed)
    out.update(duration=float(duration or 0), resolution=resolution, aspect_ratio=aspect,
               fps=data.fps or d.fps)
    for name in ("width", "height", "steps", "guidance"):
        out.pop(name, None)


def normalize_input(spec: ModelSpec, raw: Any, max_prompt_chars: int) -> tuple[str, dict[str, Any]]:
    """Return ``(task, normalized_input)`` or raise :class:`InvalidInput`."""
    from api.core.limits import check_prompt_length

    if "upscale" in spec.tasks:
        return _normalize_upscale(spec, raw, max_prompt_chars)
    data = parse_input(raw)
    check_prompt_length(data.prompt, max_prompt_chars)
    if data.negative_prompt:
        check_prompt_length(data.negative_prompt, max_prompt_chars)
    is_video = spec.kind == "video"
    task = ("i2v" if is_video else "i2i") if data.image else ("t2v" if is_video else "t2i")
    if task not in spec.tasks:
        what = "an input image" if data.image else "text only"
        raise _invalid(f"{spec.id} does not take {what} (tasks: {', '.join(spec.tasks)})", "image",
                       tasks=list(spec.tasks))
    if len(data.loras) > spec.limits.max_loras:
        raise _invalid(f"at most {spec.limits.max_loras} LoRAs per request", "loras",
                       max=spec.limits.max_loras)
    if data.loras and spec.remote_only:
        raise _invalid(f"{spec.id} runs remotely and takes no LoRAs", "loras")
    d = spec.defaults
    out: dict[str, Any] = {
        "prompt": data.prompt,
        "negative_prompt": data.negative_prompt if data.negative_prompt is not None else d.negative_prompt,
        "width": data.width or d.width,
        "height": data.height or d.height,
        "steps": data.steps or d.steps,
        "guidance": data.guidance if data.guidance is not None else d.guidance,
        # A seed is always fixed at submission, so a retried job reproduces the same output.
        "seed": data.seed if data.seed is not None else secrets.randbelow(2**32),
        "loras": [lr.model_dump() for lr in data.loras],
    }
    if data.num_outputs is not None:
        if is_video:
            raise _invalid(f"{spec.id} makes one video per job: num_outputs is for image models",
                           "num_outputs")
        out["num_outputs"] = data.num_outputs
    if data.image:
        out["image"] = data.image
        if data.strength is not None:
            out["strength"] = data.strength
    if spec.remote_only:
        if not is_video:
            raise _invalid(f"{spec.id}: remote image models are not supported", "model")
        _remote_video(spec, data, out)
    else:
        _check_size(spec, out["width"], out["height"])
        if out["steps"] > spec.limits.max_steps:
            raise _invalid(f"steps must be at most {spec.limits.max_steps}", "steps",
                           max=spec.limits.max_steps)
        if is_video:
            _local_video(spec, data, out)
    return task, out


def _normalize_upscale(spec: ModelSpec, raw: Any, max_prompt_chars: int) -> tuple[str, dict[str, Any]]:
    """Task ``upscale``: the normalized ``width``/``height`` are the OUTPUT size (input × 4), checked
    against the spec's limits, with ``input_width``/``input_height`` beside them. Without the input's
    size (only known once the image is read) the output is unknown: it is priced at the largest
    output the spec allows (``width``/``height`` = the limits' maxima, ``size_known`` false)."""
    from api.core.limits import check_prompt_length

    data = parse_input(raw, UpscaleInput)
    check_prompt_length(data.prompt, max_prompt_chars)
    if data.negative_prompt:
        check_prompt_length(data.negative_prompt, max_prompt_chars)
    if not data.image:
        raise _invalid(f"{spec.id} upscales an image: input.image is required", "image",
                       tasks=list(spec.tasks))
    for name in ("num_frames", "duration", "resolution", "aspect_ratio", "strength", "num_outputs"):
        if getattr(data, name) is not None:
            raise _invalid(f"{spec.id} upscales one image: input.{name} does not apply", name)
    if data.loras:
        raise _invalid(f"{spec.id} takes no LoRAs", "loras")
    d = spec.defaults
    out: dict[str, Any] = {
        "prompt": data.prompt,
        "negative_prompt": data.negative_prompt if data.negative_prompt is not None else d.negative_prompt,
        "image": data.image,
        "steps": data.steps or d.steps,
        "guidance": data.guidance if data.guidance is not None else d.guidance,
        "seed": data.seed if data.seed is not None else secrets.randbelow(2**32),
        "loras": [],
        "scale": UPSCALE_FACTOR,
    }
    if (data.width is None) != (data.height is None):
        raise _invalid("give both width and height of the input image, or neither",
                       "width" if data.width is None else "height")
    if data.width is not None and data.height is not None:
        out.update(input_width=data.width, input_height=data.height, size_known=True,
                   width=data.width * UPSCALE_FACTOR, height=data.height * UPSCALE_FACTOR)
        try:
            _check_size(spec, out["width"], out["height"])
        except InvalidInput as exc:
            exc.details["output"] = [out["width"], out["height"]]
            exc.details["scale"] = UPSCALE_FACTOR
            raise
    else:
        out.update(width=spec.limits.max_width, height=spec.limits.max_height, size_known=False)
    if out["steps"] > spec.limits.max_steps:
        raise _invalid(f"steps must be at most {spec.limits.max_steps}", "steps", max=spec.limits.max_steps)
    return "upscale", out
