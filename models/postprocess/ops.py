"""Running an operation: one ffmpeg command per op, its output exactly what :func:`infer_output` said.

Every video chain ends with a clone-pad and a frame trim (``tpad``/``trim``) plus ``-frames:v N``
and ``setpts=N/(fps*TB)``, so the output has exactly the inferred frame count at a constant rate
whatever the filters in front of it do at the edges. Only numbers computed here reach a filter
string: watermark text is drawn by Pillow into a PNG that ffmpeg overlays as a file.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from models.postprocess.catalog import OperationBounds, OperationError, default_bounds
from models.postprocess.ffmpeg import INPUT_FORMATS, OperationFailed, probe, probe_audio, run_ffmpeg
from models.postprocess.spec import (
    AUDIO_BPS,
    MAX_VIDEO_BPS,
    MIN_VIDEO_BPS,
    AudioParams,
    ConcatParams,
    ExportParams,
    InterpolateParams,
    LoopParams,
    MediaInfo,
    TrimParams,
    UpscaleParams,
    WatermarkParams,
    _Params,
    concat_frames,
    crossfade_frames,
    infer_output,
    loop_cycle,
    parse_params,
    target_bitrate,
    trim_frames,
)

logger = logging.getLogger(__name__)

CONTENT_TYPES = {"png": "image/png", "mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}


@dataclass(frozen=True)
class OperationResult:
    path: Path
    content_type: str
    info: MediaInfo


def _num(x: float) -> str:
    """A number for a filter string (only ever a float computed here)."""
    return f"{float(x):.6g}"


def _exact(frames: int, fps: float) -> str:
    """Pad with the last frame, cut at ``frames``, constant timestamps at ``fps``."""
    return f"tpad=stop=-1:stop_mode=clone,trim=end_frame={int(frames)},setpts=N/({_num(fps)}*TB)"


def _video_codec(fmt: str, bitrate: int | None = None) -> list[str]:
    if fmt == "webm":
        rate = ["-b:v", str(bitrate)] if bitrate else ["-crf", "34", "-b:v", "0"]
        return ["-c:v", "libvpx-vp9", *rate, "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1",
                "-pix_fmt", "yuv420p"]
    if fmt == "gif":
        return ["-c:v", "gif"]
    rate = ["-b:v", str(bitrate), "-maxrate", str(bitrate), "-bufsize", str(2 * bitrate)] if bitrate \
        else ["-crf", "18"]
    return ["-c:v", "libx264", "-preset", "veryfast", *rate, "-pix_fmt", "yuv420p", "-movflags", "+faststart"]


def _audio_codec(fmt: str) -> list[str]:
    return ["-c:a", "libopus" if fmt == "webm" else "aac", "-b:a", str(AUDIO_BPS)]


def _video_out(out: MediaInfo, fmt: str, *, audio_from: str | None = None, bitrate: int | None = None) -> list[str]:
    """Output options: ``-map`` of the ``[v]`` label (and an audio stream), codecs, exact frames."""
    assert out.num_frames and out.fps
    args = ["-map", "[v]"]
    if audio_from is not None:
        args += ["-map", audio_from, *_audio_codec(fmt), "-t", _num(out.num_frames / out.fps)]
    return [*args, *_video_codec(fmt, bitrate), "-r", _num(out.fps), "-frames:v", str(out.num_frames)]


def _keep_audio(src: MediaInfo, out: MediaInfo) -> str | None:
    return "0:a:0" if src.has_audio and out.has_audio else None


def _fit(width: int, height: int) -> str:
    return (f"scale={width}:{height}:flags=lanczos:force_original_aspect_ratio=decrease,"
            f"pad={width}:{height}:-1:-1,setsar=1")


_MEASURE_PX = 32


def _mark_image(p: WatermarkParams, clip: MediaInfo, overlay: Path | None, work: Path) -> tuple[Path, int, int]:
    """The watermark as an RGBA PNG (text drawn by Pillow, or the overlay image) and its position."""
    margin = max(1, round(0.03 * min(clip.width, clip.height)))
    box_w, box_h = max(1, clip.width - 2 * margin), max(1, clip.height - 2 * margin)
    target_h = max(1, round(p.size * clip.height))
    if overlay is not None:
        with Image.open(overlay) as src:
            mark = src.convert("RGBA")
        mark = mark.resize((max(1, round(mark.width * target_h / mark.height)), target_h), Image.Resampling.LANCZOS)
    else:
        assert p.text is not None
        probe_draw = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
        # measure at a small size and scale, so the line is rendered no larger than the box
        # (a long text at full size would be a huge image, shrunk only afterwards)
        l0, t0, r0, b0 = probe_draw.textbbox((0, 0), p.text, font=ImageFont.load_default(size=_MEASURE_PX),
                                             stroke_width=1)
        fits = min(box_w * _MEASURE_PX / max(1, r0 - l0), box_h * _MEASURE_PX / max(1, b0 - t0))
        font_px = max(6, min(target_h, int(fits)))
        font = ImageFont.load_default(size=font_px)
        stroke = max(1, font_px // 12)
        left, top, right, bottom = probe_draw.textbbox((0, 0), p.text, font=font, stroke_width=stroke)
        mark = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
        ImageDraw.Draw(mark).text((-left, -top), p.text, font=font, fill=(255, 255, 255, 255),
                                  stroke_width=stroke, stroke_fill=(0, 0, 0, 255))
    if mark.width > box_w or mark.height > box_h:
        shrink = min(box_w / mark.width, box_h / mark.height)
        mark = mark.resize((max(1, int(mark.width * shrink)), max(1, int(mark.height * shrink))),
                           Image.Resampling.LANCZOS)
    alpha = mark.getchannel("A").point(lambda a: round(a * p.opacity))
    mark.putalpha(alpha)
    path = work / f".mark-{uuid.uuid4().hex[:8]}.png"
    mark.save(path, format="PNG")
    x = {"top-left": margin, "bottom-left": margin, "center": (clip.width - mark.width) // 2}.get(
        p.position, clip.width - mark.width - margin)
    y = {"top-left": margin, "top-right": margin, "center": (clip.height - mark.height) // 2}.get(
        p.position, clip.height - mark.height - margin)
    return path, max(0, x), max(0, y)


def _bitrate(p: ExportParams, out: MediaInfo) -> int | None:
    if p.target_size_mb is None:
        return None
    return int(min(MAX_VIDEO_BPS, max(MIN_VIDEO_BPS, target_bitrate(p.target_size_mb, out))))


def _export_scale(p: ExportParams, out: MediaInfo) -> str:
    """The scale (and pad/crop) of an export to ``out``'s size."""
    w, h = out.width, out.height
    if p.width is None and p.height is None:
        return f"scale={w}:{h}:flags=lanczos"
    if p.fit == "stretch":
        return f"scale={w}:{h}:flags=lanczos,setsar=1"
    if p.fit == "cover":
        return f"scale={w}:{h}:flags=lanczos:force_original_aspect_ratio=increase,crop={w}:{h},setsar=1"
    return _fit(w, h)




def _input(path: Path) -> list[str]:
    """An input file, read through the file protocol only and a whitelisted demuxer."""
    return ["-protocol_whitelist", "file", "-format_whitelist", INPUT_FORMATS, "-i", f"file:{Path(path).resolve()}"]


def _output(path: Path) -> str:
    return f"file:{Path(path).resolve()}"


def build_args(op: str, p: _Params, srcs: list[MediaInfo], inputs: list[Path], out: MediaInfo, dest: Path,
               *, mark: tuple[Path, int, int] | None = None, audio: Path | None = None,
               palette: Path | None = None) -> list[str]:
    """The ffmpeg arguments (after the global options) that make ``out`` at ``dest``."""
    src = srcs[0]
    ins = [a for path in inputs for a in _input(path)]
    head = f"[0:v]crop={out.width}:{out.height}:0:0," if src.kind == "video" and out.kind == "video" and (
        src.width % 2 or src.height % 2) and not isinstance(p, UpscaleParams | ExportParams | ConcatParams) else "[0:v]"
    if out.kind == "image":
        if isinstance(p, UpscaleParams):
            return [*ins, "-vf", f"scale={out.width}:{out.height}:flags=lanczos",
                    "-frames:v", "1", "-update", "1", _output(dest)]
        assert mark is not None
        return [*ins, *_input(mark[0]), "-filter_complex",
                f"[0:v][1:v]overlay=x={mark[1]}:y={mark[2]}:format=rgb[v]",
                "-map", "[v]", "-frames:v", "1", "-update", "1", _output(dest)]
    assert out.num_frames and out.fps
    n_out, fps = out.num_frames, out.fps
    fmt = out.format or "mp4"
    if isinstance(p, UpscaleParams):
        graph = f"[0:v]scale={out.width}:{out.height}:flags=lanczos,{_exact(n_out, fps)},format=yuv420p[v]"
        return [*ins, "-filter_complex", graph, *_video_out(out, fmt, audio_from=_keep_audio(src, out)), _output(dest)]
    if isinstance(p, WatermarkParams):
        assert mark is not None
        graph = (f"{head}null[base];[base][1:v]overlay=x={mark[1]}:y={mark[2]}:format=auto,"
                 f"{_exact(n_out, fps)},format=yuv420p[v]")
        return [*ins, *_input(mark[0]), "-filter_complex", graph,
                *_video_out(out, fmt, audio_from=_keep_audio(src, out)), _output(dest)]
    if isinstance(p, InterpolateParams):
        graph = f"{head}minterpolate=fps={int(p.fps)}:mi_mode=mci,{_exact(n_out, fps)},format=yuv420p[v]"
        return [*ins, "-filter_complex", graph, *_video_out(out, fmt, audio_from=_keep_audio(src, out)), _output(dest)]
    if isinstance(p, TrimParams):
        assert src.num_frames and src.fps
        first, last = trim_frames(p, src.num_frames, src.fps)
        graph = f"{head}trim=start_frame={first}:end_frame={last},{_exact(n_out, fps)},format=yuv420p[v]"
        if out.has_audio:  # the same span of the sound, padded with silence if it ends early
            graph += f";[0:a:0]atrim=start={_num(first / fps)}:end={_num(last / fps)},asetpts=PTS-STARTPTS,apad[a]"
        return [*ins, "-filter_complex", graph, *_video_out(out, fmt, audio_from="[a]" if out.has_audio else None),
                _output(dest)]
    if isinstance(p, LoopParams):
        assert src.num_frames
        n = src.num_frames
        cycle = loop_cycle(p, n)
        if cycle == n:
            graph = f"{head}loop=loop={p.count - 1}:size={n}:start=0,{_exact(n_out, fps)},format=yuv420p[v]"
        else:  # boomerang: 0..n-1 then n-2..1
            graph = (f"{head}split[f][r];[r]reverse,trim=start_frame=1:end_frame={n - 1},setpts=PTS-STARTPTS[b];"
                     f"[f][b]concat=n=2:v=1:a=0,setpts=N/({_num(fps)}*TB),"
                     f"loop=loop={p.count - 1}:size={cycle}:start=0,{_exact(n_out, fps)},format=yuv420p[v]")
        return [*ins, "-filter_complex", graph, *_video_out(out, fmt), _output(dest)]
    if isinstance(p, ConcatParams):
        frames = concat_frames(srcs, fps)
        parts = [f"[{i}:v]{_fit(out.width, out.height)},fps={_num(fps)},{_exact(m, fps)},format=yuv420p[c{i}]"
                 for i, m in enumerate(frames)]
        k = crossfade_frames(p, fps)
        labels = "".join(f"[c{i}]" for i in range(len(frames)))
        if k == 0:
            parts.append(f"{labels}concat=n={len(frames)}:v=1:a=0,{_exact(n_out, fps)}[v]")
        else:
            prev, length = "c0", frames[0]
            for i in range(1, len(frames)):
                label = f"x{i}"
                parts.append(f"[{prev}][c{i}]xfade=transition=fade:duration={_num(k / fps)}:"
                             f"offset={_num((length - k) / fps)}[{label}]")
                prev, length = label, length + frames[i] - k
            parts.append(f"[{prev}]{_exact(n_out, fps)}[v]")
        return [*ins, "-filter_complex", ";".join(parts), *_video_out(out, fmt), _output(dest)]
    if isinstance(p, AudioParams):
        assert audio is not None
        graph = f"{head}{_exact(n_out, fps)},format=yuv420p[v];[1:a:0]volume={_num(p.volume)},apad[a]"
        return [*ins, *_input(audio), "-filter_complex", graph, *_video_out(out, fmt, audio_from="[a]"), _output(dest)]
    if isinstance(p, ExportParams):
        head = _export_chain(p, src, out)
        if fmt == "gif":  # the second of gif_runs(): the palette PNG is the last input
            return [*ins, *_input(palette or dest), "-filter_complex",
                    f"[0:v]{head}[x];[x][1:v]paletteuse=dither=bayer:bayer_scale=3[v]",
                    *_video_out(out, fmt), _output(dest)]
        graph = f"[0:v]{head},format=yuv420p[v]"
        return [*ins, "-filter_complex", graph,
                *_video_out(out, fmt, audio_from=_keep_audio(src, out), bitrate=_bitrate(p, out)), _output(dest)]
    raise OperationFailed(f"no runner for {op}")  # pragma: no cover


def _export_chain(p: ExportParams, src: MediaInfo, out: MediaInfo) -> str:
    assert out.num_frames and out.fps
    chain = []
    if (out.width, out.height) != (src.width, src.height):
        chain.append(_export_scale(p, out))
    if p.fps is not None:
        chain.append(f"fps={_num(out.fps)}")
    chain.append(_exact(out.num_frames, out.fps))
    return ",".join(chain)


def build_runs(op: str, p: _Params, srcs: list[MediaInfo], inputs: list[Path], out: MediaInfo, dest: Path,
               *, mark: tuple[Path, int, int] | None = None, audio: Path | None = None,
               palette: Path | None = None) -> list[list[str]]:
    """The ffmpeg runs that make ``out``: one, except a GIF export's two.

    A GIF is made in two passes so that memory stays bounded: palettegen reads the clip once and
    writes a 256-colour PNG (a histogram, not the frames), then paletteuse maps the clip through it.
    One graph that splits the stream into palettegen and paletteuse would hold every frame until
    palettegen had seen the last (about 1 MB a frame at 512x512).
    """
    if isinstance(p, ExportParams) and out.format == "gif":
        assert palette is not None
        first = [*(a for path in inputs for a in _input(path)), "-filter_complex",
                 f"[0:v]{_export_chain(p, srcs[0], out)},palettegen=stats_mode=diff[v]",
                 "-map", "[v]", "-frames:v", "1", "-update", "1", _output(palette)]
        return [first, build_args(op, p, srcs, inputs, out, dest, palette=palette)]
    return [build_args(op, p, srcs, inputs, out, dest, mark=mark, audio=audio)]


class _Monotonic:
    """Passes on 0.0 first, then only fractions above the last one (1.0 at most once)."""

    def __init__(self, callback: Callable[[float], None] | None) -> None:
        self.callback = callback
        self.last: float | None = None

    def __call__(self, fraction: float) -> None:
        if self.callback is not None and (self.last is None or fraction > self.last):
            self.last = fraction
            self.callback(fraction)


def run_operation(op: str, params: _Params | dict, inputs: list[Path], out_dir: Path, *,
                  overlay: Path | None = None, audio: Path | None = None,
                  on_progress: Callable[[float], None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  bounds: OperationBounds | None = None, timeout_s: float | None = None) -> OperationResult:
    """Run ``op`` on the files ``inputs`` into ``out_dir``; the result is exactly :func:`infer_output`'s.

    Raises OperationError (bad params/kinds), OperationFailed (ffmpeg failed or timed out),
    OperationCanceled (``should_stop`` returned true; ffmpeg killed, no output left behind).
    """
    bounds = bounds or default_bounds()
    p = params if isinstance(params, _Params) else parse_params(op, dict(params), bounds=bounds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    srcs = [probe(Path(path)) for path in inputs]
    overlay_info = probe(overlay) if overlay is not None else None
    audio_s: float | None = None
    if op == "audio":
        if audio is None:
            raise OperationError("audio needs an audio input", field="audio")
        audio_s = probe_audio(audio, max_s=bounds.max_input_duration_s)
    out = infer_output(op, p, srcs, overlay=overlay_info, audio_s=audio_s, bounds=bounds)
    ext = "png" if out.kind == "image" else (out.format or "mp4")
    dest = out_dir / f"{op}.{ext}"
    partial = out_dir / f".{op}-{uuid.uuid4().hex[:8]}.partial.{ext}"
    report = _Monotonic(on_progress)
    mark = _mark_image(p, out, overlay, out_dir) if isinstance(p, WatermarkParams) else None
    palette = out_dir / f".palette-{uuid.uuid4().hex[:8]}.png"
    try:
        runs = build_runs(op, p, srcs, [Path(x) for x in inputs], out, partial, mark=mark, audio=audio,
                          palette=palette)
        report(0.0)
        deadline = time.monotonic() + (timeout_s or bounds.timeout_s)  # one limit for all the runs
        for i, args in enumerate(runs):  # progress: each run its equal share
            def share(fraction: float, i: int = i) -> None:
                report((i + fraction) / len(runs))

            last = i == len(runs) - 1
            run_ffmpeg(args, work_dir=out_dir, expected_frames=(out.num_frames or 1) if last else None,
                       duration_s=out.duration_s, timeout_s=max(1e-6, deadline - time.monotonic()), on_progress=share,
                       should_stop=should_stop)
        if not partial.exists() or partial.stat().st_size == 0:
            raise OperationFailed(f"ffmpeg wrote no {op} output")
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
        palette.unlink(missing_ok=True)
        if mark is not None:
            mark[0].unlink(missing_ok=True)
    report(1.0)
    logger.info("%s: %s -> %s (%s)", op, [str(x) for x in inputs], dest, out.model_dump(exclude_none=True))
    return OperationResult(path=dest, content_type=CONTENT_TYPES[ext], info=out)
