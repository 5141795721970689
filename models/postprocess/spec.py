"""What each operation takes and what it will produce, decided before anything runs.

:func:`infer_output` is static: from the inputs' :class:`MediaInfo` and the parameters it gives the
exact output (frames, fps, size, duration) that :func:`models.postprocess.run_operation` then
produces; the API validates and prices pipelines with it. The frame rules:

- upscale, watermark, audio: frames, fps and duration unchanged.
- interpolate to ``fps``: ``round_half_up(n * fps / fps_in)`` frames (the duration is kept).
  ffmpeg's minterpolate alone stops short (9 frames at 8 fps -> 16 fps gives 15, -> 24 gives 22:
  it ends at the last input frame's timestamp); the runner clones the last frame up to the count.
- trim: frames ``round_half_up(start_s * fps)`` (inclusive) to ``round_half_up(end_s * fps)``
  (exclusive); ``end_s`` may pass the duration by less than half a frame. The sound (if any) is
  trimmed alike; loop and concat drop it (a later ``audio`` step lays a track under the result).
- loop forward: ``n * count``. Boomerang: each cycle is frames 0..n-1 then n-2..1 (neither end
  frame doubled, so the cycles join seamlessly and the clip loops seamlessly too): ``count * (2n - 2)``.
- concat: every clip is fitted (aspect kept, padded) to the first's size and resampled to its fps
  (``round_half_up(n_i * fps / fps_i)`` frames); a crossfade of ``k = round_half_up(crossfade_s * fps)``
  frames overlaps each joint: ``sum(n_i) - (clips - 1) * k``.
- export with ``fps``: as interpolate (frames repeated or dropped, no motion interpolation).

Sizes: a video output's sides are even (H.264/VP9 in yuv420p need it): an odd-sized input video
loses its last column/row (upscale doubles, export scales to even sides; a GIF keeps odd sides).
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models.postprocess.catalog import (
    OPERATIONS,
    OperationBounds,
    OperationError,
    OperationPrices,
    default_bounds,
)

GIF_MAX_FPS = 50  # GIF delays are whole centiseconds, and players stretch delays under 2 cs

Position = Literal["top-left", "top-right", "bottom-left", "bottom-right", "center"]


class MediaInfo(BaseModel):
    kind: Literal["image", "video"]
    width: int
    height: int
    num_frames: int | None = None
    fps: float | None = None
    duration_s: float | None = None
    has_audio: bool = False
    format: str | None = None  # "png" | "jpeg" | "mp4" | "webm" | "gif" ...


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class UpscaleParams(_Params):
    """``method``: ``"lanczos"`` (ffmpeg's scaler, here) or ``"diffusion"``: a catalog upscaler
    (``model``, else the first enabled model with task ``upscale``), images only, ×4. A diffusion
    upscale is planned by the API as a generation step on that model (``api.core.pipelines``); it
    never reaches :func:`run_operation`. ``prompt`` guides the diffusion upscaler (optional)."""

    scale: Literal[2, 4]
    method: Literal["lanczos", "diffusion"] = "lanczos"
    model: str | None = Field(default=None, min_length=1, max_length=64)
    prompt: str | None = Field(default=None, max_length=2000)


class InterpolateParams(_Params):
    fps: int = Field(ge=1)


class TrimParams(_Params):
    start_s: float = Field(default=0.0, ge=0)
    end_s: float | None = Field(default=None, gt=0)
    duration_s: float | None = Field(default=None, gt=0)


class LoopParams(_Params):
    count: int = Field(ge=2)
    mode: Literal["forward", "boomerang"] = "forward"


class ConcatParams(_Params):
    crossfade_s: float = Field(default=0.0, ge=0)


class WatermarkParams(_Params):
    """``text`` (rendered with Pillow, never passed to ffmpeg) or an ``overlay`` image input."""

    text: str | None = Field(default=None, min_length=1)
    position: Position = "bottom-right"
    opacity: float = Field(default=0.8, ge=0, le=1)
    size: float = Field(default=0.08, ge=0.05, le=0.5)  # fraction of the clip's height

    @field_validator("text")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("text is blank")
        if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") for ch in value):
            raise ValueError("text may not contain control or format characters (newlines, tabs, ...)")
        return value


class AudioParams(_Params):
    volume: float = Field(default=1.0, ge=0, le=2)


class ExportParams(_Params):
    """An export: format, size (``max_side``, or an exact ``width``/``height`` with ``fit``), fps, file size.

    ``width``/``height``: an exact frame size (even sides, at most the catalog's ``max_side``; give
    one and the other follows the aspect, rounded to even). ``fit``: ``contain`` scales inside and
    pads, ``cover`` fills and crops the overflow, ``stretch`` ignores the aspect. Not with ``max_side``.

    ``target_size_mb`` (mp4/webm): the video bitrate is set to meet it; a target the 64 kb/s floor
    cannot meet for the clip's duration is refused (422) rather than silently overshot. GIF is
    refused: it has no bitrate control (its size follows the content and the palette), so meeting a
    size would mean an unbounded search of re-encodes, each as costly as the export itself.
    """

    format: Literal["mp4", "webm", "gif"] = "mp4"
    max_side: int | None = Field(default=None, ge=16)
    width: int | None = Field(default=None, ge=16)
    height: int | None = Field(default=None, ge=16)
    fit: Literal["contain", "cover", "stretch"] = "contain"
    target_size_mb: float | None = Field(default=None, gt=0)
    fps: int | None = Field(default=None, ge=1)


PARAMS: dict[str, type[_Params]] = {
    "upscale": UpscaleParams, "interpolate": InterpolateParams, "trim": TrimParams, "loop": LoopParams,
    "concat": ConcatParams, "watermark": WatermarkParams, "audio": AudioParams, "export": ExportParams,
}

_INPUT_FIELDS: dict[str, dict[str, str]] = {
    "upscale": {"image": "image", "video": "video"},
    "interpolate": {"video": "video"},
    "trim": {"video": "video"},
    "loop": {"video": "video"},
    "concat": {"videos": "video[]"},
    "watermark": {"image": "image", "video": "video", "overlay": "image"},
    "audio": {"video": "video", "audio": "audio"},
    "export": {"video": "video"},
}

# Keys a resolved step input carries beside the params (api/services/inputs.py): parse_params
# ignores them, so a step's whole input can be passed as it is.
RESOLVED_KEYS = frozenset({"image_key", "video_key", "video_keys", "audio_key", "overlay_key",
                           "source_info", "source_infos", "overlay_info", "audio_info"})


def _check_op(op: str) -> None:
    if op not in OPERATIONS:
        raise OperationError(f"unknown operation {op!r}; known: {', '.join(OPERATIONS)}", field="op")


def input_fields(op: str) -> dict[str, str]:
    """The op's reference fields and the kind each takes.

    ``image``/``video`` are alternatives: a step gives exactly one of them (the clip), except
    concat, which takes ``videos`` (2..max_concat_inputs). ``audio`` is required for ``audio``;
    ``overlay`` is optional for ``watermark`` (an image; then ``text`` is not given).
    """
    _check_op(op)
    return dict(_INPUT_FIELDS[op])


def parse_params(op: str, params: dict[str, Any], *, bounds: OperationBounds | None = None) -> _Params:
    """The op's parameters, validated and bounded; raises OperationError(code="invalid_input", field=...).

    Unknown fields are refused; the op's reference fields (:func:`input_fields`) and resolved
    storage keys (``video_key``, ...) are ignored.
    """
    _check_op(op)
    if not isinstance(params, dict):
        raise OperationError("params must be an object", field="input")
    bounds = bounds or default_bounds()
    skip = set(_INPUT_FIELDS[op]) | RESOLVED_KEYS
    raw = {k: v for k, v in params.items() if k not in skip}
    try:
        parsed = PARAMS[op].model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        raise OperationError(f"{op}: {field or 'params'}: {err['msg']}", field=field) from exc
    _bound(op, parsed, bounds)
    return parsed


def _too(field: str, message: str) -> OperationError:
    return OperationError(message, field=field)


def _bound(op: str, p: _Params, b: OperationBounds) -> None:
    if isinstance(p, InterpolateParams) and p.fps > b.max_fps:
        raise _too("fps", f"fps {p.fps} is over the limit of {b.max_fps}")
    if isinstance(p, ExportParams):
        if p.fps is not None and p.fps > b.max_fps:
            raise _too("fps", f"fps {p.fps} is over the limit of {b.max_fps}")
        if p.max_side is not None and p.max_side > b.max_side:
            raise _too("max_side", f"max_side {p.max_side} is over the limit of {b.max_side}")
        if p.target_size_mb is not None and p.target_size_mb > b.max_target_size_mb:
            raise _too("target_size_mb", f"target_size_mb is over the limit of {b.max_target_size_mb:g}")
        for name in ("width", "height"):
            value = getattr(p, name)
            if value is not None and value > b.max_side:
                raise _too(name, f"{name} {value} is over the limit of {b.max_side}")
            if value is not None and value % 2:
                raise _too(name, f"{name} {value} must be even (H.264/VP9 in yuv420p)")
        if p.max_side is not None and (p.width is not None or p.height is not None):
            raise _too("max_side", "give max_side or width/height, not both")
        if p.target_size_mb is not None and p.format == "gif":
            raise _too("target_size_mb", "target_size_mb is not supported for gif (use max_side or fps)")
    if isinstance(p, TrimParams):
        if p.end_s is not None and p.duration_s is not None:
            raise _too("end_s", "give end_s or duration_s, not both")
        for name in ("start_s", "end_s", "duration_s"):
            value = getattr(p, name)
            if value is not None and value > b.max_input_duration_s:
                raise _too(name, f"{name} {value:g} is over the limit of {b.max_input_duration_s:g} s")
        if p.end_s is not None and p.end_s <= p.start_s:
            raise _too("end_s", "end_s must be after start_s")
    if isinstance(p, LoopParams) and p.count > b.max_loop_count:
        raise _too("count", f"count {p.count} is over the limit of {b.max_loop_count}")
    if isinstance(p, ConcatParams) and p.crossfade_s > b.max_crossfade_s:
        raise _too("crossfade_s", f"crossfade_s is over the limit of {b.max_crossfade_s:g}")
    if isinstance(p, WatermarkParams) and p.text is not None and len(p.text) > b.max_text_chars:
        raise _too("text", f"text is longer than {b.max_text_chars} characters")


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def frames_at(num_frames: int, fps_in: float, fps_out: float) -> int:
    """Frames of a clip of ``num_frames`` at ``fps_in`` resampled to ``fps_out`` (duration kept)."""
    if fps_out == fps_in:
        return num_frames
    return max(1, round_half_up(num_frames * fps_out / fps_in))


def video_info(width: int, height: int, num_frames: int, fps: float, *, has_audio: bool = False,
               format: str = "mp4") -> MediaInfo:
    return MediaInfo(kind="video", width=width, height=height, num_frames=num_frames, fps=fps,
                     duration_s=round(num_frames / fps, 3), has_audio=has_audio, format=format)


def _video(op: str, info: MediaInfo, field: str = "video") -> tuple[int, float]:
    if info.kind != "video":
        raise OperationError(f"{op} needs a video, got an {info.kind}", code="pipeline_kind_mismatch", field=field)
    if not info.num_frames or not info.fps or info.num_frames < 1 or info.fps <= 0:
        raise OperationError(f"{op}: the input video has no frames or no frame rate", field=field)
    return info.num_frames, float(info.fps)


def even_fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size scaled down (aspect kept) so its longer side is at most ``max_side``; sides even."""
    scale = min(1.0, max_side / max(width, height))
    w, h = max(2, round_half_up(width * scale)), max(2, round_half_up(height * scale))
    return w - w % 2, h - h % 2


def infer_output(op: str, params: _Params | dict[str, Any], inputs: list[MediaInfo], *,
                 audio_s: float | None = None, overlay: MediaInfo | None = None,
                 bounds: OperationBounds | None = None) -> MediaInfo:
    """The exact output of ``op`` on ``inputs`` (one clip; concat: the clips in order).

    Raises OperationError: ``pipeline_kind_mismatch`` for a wrong input kind, ``invalid_input``
    for a range past the input or an output over the bounds.
    """
    _check_op(op)
    bounds = bounds or default_bounds()
    p = params if isinstance(params, PARAMS[op]) else parse_params(op, dict(params), bounds=bounds)  # type: ignore[arg-type]
    if op == "concat":
        if not (2 <= len(inputs) <= bounds.max_concat_inputs):
            raise OperationError(f"concat takes 2 to {bounds.max_concat_inputs} clips, got {len(inputs)}",
                                 field="videos")
    elif len(inputs) != 1:
        raise OperationError(f"{op} takes one input clip, got {len(inputs)}", field=_main_field(op))
    for info in inputs:
        if max(info.width, info.height) > bounds.max_input_side:
            raise OperationError(f"the input is over {bounds.max_input_side} px", field=_main_field(op))
        if info.kind == "video" and (info.duration_s or 0) > bounds.max_input_duration_s:
            raise OperationError(f"the input is longer than {bounds.max_input_duration_s:g} s", field=_main_field(op))
    out = _infer(op, p, inputs, audio_s=audio_s, overlay=overlay, bounds=bounds)
    if max(out.width, out.height) > bounds.max_side:
        raise OperationError(f"{op}: the output {out.width}x{out.height} is over {bounds.max_side} px a side",
                             field="scale" if op == "upscale" else _main_field(op))
    if out.kind == "video" and (out.duration_s or 0) > bounds.max_duration_s + 1e-6:
        raise OperationError(f"{op}: the output is {out.duration_s:g} s, over the limit of "
                             f"{bounds.max_duration_s:g} s", field=_long_field(op))
    if out.fps is not None and out.fps > bounds.max_fps + 1e-6:
        raise OperationError(f"{op}: the output is {out.fps:g} fps, over {bounds.max_fps}", field=_main_field(op))
    _work_budget(op, out, bounds)
    return out


def _work_budget(op: str, out: MediaInfo, bounds: OperationBounds) -> None:
    """Refuse work that cannot finish in its time limit (a 422 before any charge, not a timeout later).

    The measure is the output's width x height x frames: every video op is bounded by
    ``max_pixel_frames``, interpolate (minterpolate's motion search, the slowest by far) by
    ``max_interpolate_pixel_frames``.
    """
    if out.kind != "video" or not out.num_frames:
        return
    work = out.width * out.height * out.num_frames
    field = "scale" if op == "upscale" else _long_field(op)
    if op == "interpolate" and work > bounds.max_interpolate_pixel_frames:
        raise OperationError(f"interpolate: {out.width}x{out.height} x {out.num_frames} frames is over the work "
                             f"budget of {bounds.max_interpolate_pixel_frames:g} pixel-frames", field=field)
    if work > bounds.max_pixel_frames:
        raise OperationError(f"{op}: {out.width}x{out.height} x {out.num_frames} frames is over the work "
                             f"budget of {bounds.max_pixel_frames:g} pixel-frames", field=field)


def _main_field(op: str) -> str:
    return "videos" if op == "concat" else "video"


def _long_field(op: str) -> str:
    return {"loop": "count", "concat": "videos", "interpolate": "fps"}.get(op, _main_field(op))


def _infer(op: str, p: _Params, inputs: list[MediaInfo], *, audio_s: float | None,
           overlay: MediaInfo | None, bounds: OperationBounds) -> MediaInfo:
    src = inputs[0]
    if isinstance(p, UpscaleParams):
        w, h = src.width * p.scale, src.height * p.scale
        if src.kind == "image":
            return MediaInfo(kind="image", width=w, height=h, format="png")
        n, fps = _video(op, src)
        return video_info(w, h, n, fps, has_audio=src.has_audio)
    if isinstance(p, WatermarkParams):
        if (p.text is None) == (overlay is None):
            raise OperationError("watermark needs either text or an overlay image (not both)", field="text")
        if overlay is not None and overlay.kind != "image":
            raise OperationError("the overlay must be an image", code="pipeline_kind_mismatch", field="overlay")
        if overlay is not None and max(overlay.width, overlay.height) > bounds.max_input_side:
            raise OperationError(f"the overlay is over {bounds.max_input_side} px", field="overlay")
        if src.kind == "image":
            return MediaInfo(kind="image", width=src.width, height=src.height, format="png")
        n, fps = _video(op, src)
        return video_info(src.width - src.width % 2, src.height - src.height % 2, n, fps, has_audio=src.has_audio)
    n, fps = _video(op, src, _main_field(op))
    width, height = src.width - src.width % 2, src.height - src.height % 2  # H.264/VP9 yuv420p: even sides
    if isinstance(p, InterpolateParams):
        if p.fps <= fps:
            raise OperationError(f"fps {p.fps} must be above the input's {fps:g}", field="fps")
        return video_info(width, height, frames_at(n, fps, p.fps), p.fps, has_audio=src.has_audio)
    if isinstance(p, TrimParams):
        first, last = trim_frames(p, n, fps)
        return video_info(width, height, last - first, fps, has_audio=src.has_audio)
    if isinstance(p, LoopParams):
        cycle = loop_cycle(p, n)
        held = loop_held_frames(p, n) * width * height
        if held > bounds.max_buffered_pixels:
            raise OperationError(f"loop: {width}x{height} x {loop_held_frames(p, n)} frames held in memory is "
                                 f"over {bounds.max_buffered_pixels:g} pixels (a shorter or smaller clip fits)",
                                 field="video")
        return video_info(width, height, cycle * p.count, fps)
    if isinstance(p, ConcatParams):
        frames = concat_frames(inputs, fps)
        k = crossfade_frames(p, fps)
        if k and min(frames) <= k:
            raise OperationError(f"crossfade_s {p.crossfade_s:g} is not shorter than every clip", field="crossfade_s")
        return video_info(width, height, sum(frames) - (len(frames) - 1) * k, fps)
    if isinstance(p, AudioParams):
        if audio_s is not None and audio_s <= 0:
            raise OperationError("the audio input is empty", field="audio")
        return video_info(width, height, n, fps, has_audio=True)
    if isinstance(p, ExportParams):
        w, h = (src.width, src.height)
        if p.width is not None or p.height is not None:
            w, h = export_size(p, w, h)
            if max(w, h) > bounds.max_side:
                raise OperationError(f"export: {w}x{h} is over {bounds.max_side} px a side",
                                     field="width" if p.width is None else "height")
        elif p.max_side is not None or p.format != "gif":
            w, h = even_fit(w, h, p.max_side or max(w, h))
        out_fps: float = p.fps if p.fps is not None else fps
        if p.format == "gif" and out_fps > GIF_MAX_FPS:
            raise OperationError(f"a GIF plays at most {GIF_MAX_FPS} fps (its delays are whole centiseconds); "
                                 f"give fps", field="fps")
        info = video_info(w, h, frames_at(n, fps, out_fps), out_fps,
                          has_audio=src.has_audio and p.format != "gif", format=p.format)
        if p.target_size_mb is not None and target_bitrate(p.target_size_mb, info) < MIN_VIDEO_BPS:
            floor_mb = (MIN_VIDEO_BPS + (AUDIO_BPS if info.has_audio else 0)) * _seconds(info) / (8e6 * 0.92)
            raise OperationError(f"target_size_mb {p.target_size_mb:g} cannot be met for {_seconds(info):g} s at the "
                                 f"{MIN_VIDEO_BPS // 1000} kb/s floor (at least {floor_mb:.3g} MB)",
                                 field="target_size_mb")
        return info
    raise OperationError(f"unknown operation {op!r}", field="op")  # pragma: no cover


MIN_VIDEO_BPS = 64_000    # an export's video bitrate floor
MAX_VIDEO_BPS = 20_000_000
AUDIO_BPS = 128_000


def _seconds(out: MediaInfo) -> float:
    return max(out.duration_s or 0.0, 0.04)


def target_bitrate(target_size_mb: float, out: MediaInfo) -> float:
    """The video bits per second that fill ``target_size_mb`` (8 % container slack, the sound's share off)."""
    return target_size_mb * 8_000_000 * 0.92 / _seconds(out) - (AUDIO_BPS if out.has_audio else 0)


def export_size(p: ExportParams, width: int, height: int) -> tuple[int, int]:
    """The exact frame size of an export given ``width`` and/or ``height`` (the missing side by aspect, even)."""
    if p.width is not None and p.height is not None:
        return p.width, p.height
    if p.width is not None:
        h = max(2, round_half_up(height * p.width / width))
        return p.width, h - h % 2
    assert p.height is not None
    w = max(2, round_half_up(width * p.height / height))
    return w - w % 2, p.height


def trim_frames(p: TrimParams, num_frames: int, fps: float) -> tuple[int, int]:
    """[first, last) frame indexes of a trim; raises OperationError when the range is not inside."""
    duration = num_frames / fps
    end_s = p.end_s if p.end_s is not None else (p.start_s + p.duration_s if p.duration_s is not None else duration)
    first, last = round_half_up(p.start_s * fps), round_half_up(end_s * fps)
    if first >= num_frames:
        raise OperationError(f"start_s {p.start_s:g} is past the end of the clip ({duration:g} s)", field="start_s")
    if last > num_frames:
        field = "end_s" if p.end_s is not None else "duration_s"
        raise OperationError(f"the range ends at {end_s:g} s, past the end of the clip ({duration:g} s)", field=field)
    if last <= first:
        raise OperationError("the range holds no frame", field="end_s" if p.end_s is not None else "duration_s")
    return first, last


def loop_cycle(p: LoopParams, num_frames: int) -> int:
    if p.mode == "boomerang" and num_frames > 2:
        return 2 * num_frames - 2
    return num_frames


def loop_held_frames(p: LoopParams, num_frames: int) -> int:
    """Frames ffmpeg holds at once: the loop filter's cycle, plus boomerang's reverse buffer (n)."""
    cycle = loop_cycle(p, num_frames)
    return cycle + (num_frames if cycle != num_frames else 0)


def concat_frames(inputs: list[MediaInfo], fps: float) -> list[int]:
    return [frames_at(*_video("concat", info, "videos"), fps) for info in inputs]


def crossfade_frames(p: ConcatParams, fps: float) -> int:
    return round_half_up(p.crossfade_s * fps)


def operation_price(op: str, output: MediaInfo, prices: OperationPrices) -> int:
    """Credits for an output: its seconds (an image counts 1 s) × the op's rate, rounded up, >= min."""
    _check_op(op)
    seconds = 1.0 if output.kind == "image" else float(output.duration_s or 0.0)
    raw = seconds * prices.credits_per_output_second[op]
    return max(prices.min_credits, math.ceil(raw - 1e-9))
