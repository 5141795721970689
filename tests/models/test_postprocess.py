"""Post-processing operations on real ffmpeg: each output probed equals infer_output; content order
(trim, loop, boomerang) checked frame by frame; hostile parameters refused; stop kills ffmpeg."""

from __future__ import annotations

import math
import subprocess
import threading
import wave
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

import models.postprocess.ffmpeg as ff
from models.postprocess import (
    OPERATIONS,
    MediaInfo,
    OperationCanceled,
    OperationCatalogError,
    OperationError,
    OperationFailed,
    ProgressParser,
    infer_output,
    input_fields,
    load_operation_catalog,
    operation_price,
    parse_params,
    probe,
    probe_audio,
    run_operation,
)
from models.postprocess.catalog import DEFAULT_PATH, default_bounds
from models.postprocess.ops import _bitrate, _mark_image
from models.postprocess.spec import ExportParams, WatermarkParams

STEP = 15  # red level per frame in the test clips: frame i is red = i * STEP


def write_clip(path: Path, n: int, fps: float = 8, width: int = 64, height: int = 64, *,
               noise: bool = False) -> Path:
    """A clip whose frame i is flat red ``i * STEP`` (a green bar moves), or noise (odd sides: yuv444p)."""
    odd = width % 2 or height % 2
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv444p" if odd else "yuv420p", macro_block_size=1,
                                         output_params=["-crf", "10"])
    writer.send(None)
    rng = np.random.default_rng(0)
    for i in range(n):
        if noise:
            frame = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        else:
            frame = np.zeros((height, width, 3), np.uint8)
            frame[..., 0] = i * STEP
            frame[height - 8:, (4 * i) % width:(4 * i) % width + 6, 1] = 255
        writer.send(np.ascontiguousarray(frame).tobytes())
    writer.close()
    return path


def write_wav(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * 440 * t) * 12000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return path


def red_levels(path: Path) -> list[int]:
    """The mean red of the top half of each frame (the bar sits in the bottom rows)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    out = []
    for raw in reader:
        frame = np.frombuffer(raw, np.uint8).reshape(height, width, 3)
        out.append(round(float(frame[: height // 2, :, 0].mean()) / STEP))
    return out


def first_frame(path: Path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        width, height = next(reader)["size"]
        return np.frombuffer(next(reader), np.uint8).reshape(height, width, 3)
    finally:
        reader.close()


def codec_of(path: Path) -> str:
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        return str(next(reader)["codec"]).rstrip(",")
    finally:
        reader.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pp-media")
    image = np.zeros((48, 64, 3), np.uint8)
    image[..., 2] = 180
    Image.fromarray(image).save(d / "still.png")
    logo = Image.new("RGBA", (40, 20), (255, 255, 0, 255))
    logo.save(d / "logo.png")
    clip_with_audio = d / "av.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error",
                    "-i", str(write_clip(d / "v.mp4", 9)), "-i", str(write_wav(d / "tone.wav", 1.125)),
                    "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", str(clip_with_audio)],
                   check=True, timeout=60)
    return {
        "c9": write_clip(d / "c9.mp4", 9), "c13": write_clip(d / "c13.mp4", 13),
        "c17": write_clip(d / "c17.mp4", 17),
        "small12": write_clip(d / "small12.mp4", 12, fps=12, width=48, height=32),
        "odd": write_clip(d / "odd.mp4", 9, width=63, height=45),
        "still": d / "still.png", "logo": d / "logo.png", "av": clip_with_audio,
        "long_wav": write_wav(d / "long.wav", 3.0), "short_wav": write_wav(d / "short.wav", 0.3),
    }


BOOMERANG = list(range(9)) + list(range(7, 0, -1))  # 0..8 then 7..1: no end frame doubled

CASES: list[tuple[str, dict[str, Any], list[str], dict[str, str], str, list[int] | None]] = [
    # op, params, inputs, extra inputs, expected codec, expected frame order (red levels)
    ("upscale", {"scale": 2}, ["c9"], {}, "h264", None),
    ("upscale", {"scale": 4, "method": "lanczos"}, ["still"], {}, "png", None),
    ("interpolate", {"fps": 12}, ["c9"], {}, "h264", None),
    ("interpolate", {"fps": 16}, ["c13"], {}, "h264", None),
    ("interpolate", {"fps": 24}, ["c17"], {}, "h264", None),
    ("interpolate", {"fps": 30}, ["c9"], {}, "h264", None),
    ("trim", {"start_s": 0.25, "end_s": 1.0}, ["c9"], {}, "h264", [2, 3, 4, 5, 6, 7]),
    ("trim", {"start_s": 0.5, "duration_s": 1.0}, ["c17"], {}, "h264", None),
    ("trim", {"start_s": 0.3}, ["c13"], {}, "h264", None),
    ("trim", {"start_s": 0.5}, ["av"], {}, "h264", [4, 5, 6, 7, 8]),  # keeps its sound
    ("loop", {"count": 3}, ["c9"], {}, "h264", list(range(9)) * 3),
    ("loop", {"count": 2, "mode": "boomerang"}, ["c9"], {}, "h264", BOOMERANG * 2),
    ("concat", {}, ["c9", "c13"], {}, "h264", list(range(9)) + list(range(13))),
    ("concat", {"crossfade_s": 0.5}, ["c9", "small12", "c13"], {}, "h264", None),
    ("watermark", {"text": "CineWeave", "position": "top-left", "opacity": 0.9, "size": 0.2}, ["c9"], {}, "h264", None),
    ("watermark", {"text": "hi", "position": "center"}, ["still"], {}, "png", None),
    ("watermark", {"position": "bottom-right", "opacity": 0.5, "size": 0.25}, ["c9"], {"overlay": "logo"}, "h264", None),
    ("audio", {"volume": 0.5}, ["c9"], {"audio": "long_wav"}, "h264", None),
    ("audio", {}, ["c13"], {"audio": "short_wav"}, "h264", None),
    ("export", {"format": "mp4"}, ["av"], {}, "h264", None),
    ("export", {"format": "webm", "fps": 12, "max_side": 32}, ["c9"], {}, "vp9", None),
    ("export", {"format": "gif", "max_side": 48}, ["c9"], {}, "gif", None),
    ("export", {"format": "mp4", "fps": 4}, ["c17"], {}, "h264", None),
    # an odd-sized input (yuv444p): video outputs get even sides
    ("trim", {"start_s": 0.25}, ["odd"], {}, "h264", None),
    ("loop", {"count": 2, "mode": "boomerang"}, ["odd"], {}, "h264", None),
    ("watermark", {"text": "odd"}, ["odd"], {}, "h264", None),
    ("concat", {"crossfade_s": 0.25}, ["odd", "c9"], {}, "h264", None),
    ("export", {"format": "gif"}, ["odd"], {}, "gif", None),
    ("export", {"format": "webm"}, ["odd"], {}, "vp9", None),
    # an exact frame size: pad, crop, stretch; one side given (the other by aspect)
    ("export", {"format": "mp4", "width": 96, "height": 48}, ["c9"], {}, "h264", None),
    ("export", {"format": "webm", "width": 48, "height": 96, "fit": "cover"}, ["small12"], {}, "vp9", None),
    ("export", {"format": "gif", "width": 40, "height": 64, "fit": "stretch"}, ["c9"], {}, "gif", None),
    ("export", {"format": "mp4", "height": 48}, ["small12"], {}, "h264", None),
]


@pytest.mark.parametrize(("op", "params", "names", "extra", "codec", "order"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_output_probed_equals_inferred(media: dict[str, Path], tmp_path: Path, op: str, params: dict[str, Any],
                                       names: list[str], extra: dict[str, str], codec: str,
                                       order: list[int] | None) -> None:
    inputs = [media[n] for n in names]
    overlay = media[extra["overlay"]] if "overlay" in extra else None
    audio = media[extra["audio"]] if "audio" in extra else None
    expected = infer_output(op, params, [probe(p) for p in inputs],
                            overlay=probe(overlay) if overlay else None)
    result = run_operation(op, params, inputs, tmp_path, overlay=overlay, audio=audio)
    assert result.info == expected
    got = probe(result.path)
    assert (got.kind, got.width, got.height, got.num_frames, got.has_audio) == (
        expected.kind, expected.width, expected.height, expected.num_frames, expected.has_audio)
    assert codec_of(result.path) == codec
    assert result.content_type == {"png": "image/png", "h264": "video/mp4", "vp9": "video/webm",
                                   "gif": "image/gif"}[codec]
    if expected.kind == "video":
        assert expected.fps and got.fps and got.duration_s and expected.duration_s
        assert abs(got.duration_s - expected.duration_s) <= 1 / expected.fps + 1e-6
        assert abs(got.fps - expected.fps) <= (0.5 if codec == "gif" else 0.01)
        assert expected.format == got.format
    assert sorted(p.name for p in tmp_path.iterdir()) == [result.path.name]  # no temp files left
    if order is not None:
        assert red_levels(result.path) == order


def test_odd_sizes_become_even(media: dict[str, Path]) -> None:
    odd = probe(media["odd"])
    assert (odd.width, odd.height) == (63, 45)
    assert infer_output("trim", {"start_s": 0.25}, [odd]).model_dump(include={"width", "height"}) == {
        "width": 62, "height": 44}
    assert infer_output("export", {"format": "gif"}, [odd]).width == 63
    assert infer_output("upscale", {"scale": 2}, [odd]).width == 126


def test_a_playlist_posing_as_a_video_is_not_read(tmp_path: Path) -> None:
    """Inputs are read through the file protocol and whitelisted demuxers only (no hls/concat lists)."""
    evil = tmp_path / "in" / "evil.mp4"
    evil.parent.mkdir()
    evil.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")
    with pytest.raises(OperationError) as err:
        run_operation("trim", {"start_s": 0}, [evil], tmp_path / "out")
    assert err.value.code == "input_unreadable"
    args = ff_args_for_trim(tmp_path)
    assert args[:4] == ["-protocol_whitelist", "file", "-format_whitelist", args[3]]
    assert "hls" not in args[3] and "concat" not in args[3] and args[5].startswith("file:/")


def ff_args_for_trim(tmp_path: Path) -> list[str]:
    from models.postprocess.ops import build_args
    from models.postprocess.spec import TrimParams

    return build_args("trim", TrimParams(), [VIDEO], [tmp_path / "a.mp4"], VIDEO.model_copy(update={"format": "mp4"}),
                      tmp_path / "o.mp4")


def test_interpolate_frame_rule_keeps_duration() -> None:
    """The rule infer_output encodes (measured: minterpolate alone gives 15 for 9@8->16, 22 for ->24)."""
    clip = MediaInfo(kind="video", width=64, height=64, num_frames=9, fps=8, duration_s=1.125)
    table = {12: 14, 16: 18, 24: 27, 30: 34, 60: 68}  # round_half_up(9 * fps / 8)
    for fps, frames in table.items():
        out = infer_output("interpolate", {"fps": fps}, [clip])
        assert (out.num_frames, out.fps) == (frames, fps)
        assert abs(out.duration_s - 1.125) < 1 / fps  # type: ignore[operator]


def test_concat_fits_clips_to_the_first(media: dict[str, Path]) -> None:
    first, other = probe(media["c9"]), probe(media["small12"])  # 64x64@8 then 48x32@12 (12 frames = 1 s)
    out = infer_output("concat", {"crossfade_s": 0.25}, [first, other])
    assert (out.width, out.height, out.fps) == (64, 64, 8.0)
    assert out.num_frames == 9 + 8 - 2  # 12 frames at 12 fps -> 8 at 8 fps; a 2-frame crossfade


def test_audio_is_cut_or_padded_to_the_clip(media: dict[str, Path], tmp_path: Path) -> None:
    for wav in ("long_wav", "short_wav"):
        result = run_operation("audio", {}, [media["c9"]], tmp_path / wav, audio=media[wav])
        reader = imageio_ffmpeg.read_frames(str(result.path))
        meta = next(reader)
        reader.close()
        assert meta.get("audio_codec") == "aac"
        assert abs(float(meta["duration"]) - 9 / 8) <= 0.1  # the container ends with the clip


def test_audio_input_probed(media: dict[str, Path], tmp_path: Path) -> None:
    assert probe_audio(media["long_wav"]) == pytest.approx(3.0, abs=0.05)
    assert probe_audio(media["av"]) == pytest.approx(1.1, abs=0.1)
    with pytest.raises(OperationError) as err:  # a video without sound given as the audio
        run_operation("audio", {}, [media["c9"]], tmp_path, audio=media["c13"])
    assert (err.value.code, err.value.field) == ("input_unreadable", "audio")
    with pytest.raises(OperationError) as err:
        run_operation("audio", {}, [media["c9"]], tmp_path)
    assert err.value.field == "audio"
    assert list(tmp_path.iterdir()) == []


def test_export_target_size_lowers_the_bitrate(media: dict[str, Path], tmp_path: Path) -> None:
    noise = write_clip(tmp_path / "noise.mp4", 48, width=128, height=128, noise=True)  # 6 s
    free = run_operation("export", {"format": "mp4"}, [noise], tmp_path / "free")
    small = run_operation("export", {"format": "mp4", "target_size_mb": 0.1}, [noise], tmp_path / "small")
    assert free.path.stat().st_size > 0.3e6
    assert 0.07e6 < small.path.stat().st_size < 0.12e6  # single-pass ABR: near the target
    clip = MediaInfo(kind="video", width=64, height=64, num_frames=80, fps=8, duration_s=10.0)
    assert _bitrate(ExportParams(target_size_mb=10), clip) == int(10 * 8_000_000 * 0.92 / 10)
    assert _bitrate(ExportParams(target_size_mb=100), clip.model_copy(update={"duration_s": 0.1})) == 20_000_000
    assert _bitrate(ExportParams(target_size_mb=0.001), clip) == 64_000


def test_gif_is_a_video_kind(media: dict[str, Path], tmp_path: Path) -> None:
    result = run_operation("export", {"format": "gif"}, [media["c9"]], tmp_path)
    assert (result.info.kind, result.info.format, result.content_type) == ("video", "gif", "image/gif")
    assert (probe(result.path).kind, probe(result.path).format) == ("video", "gif")


HOSTILE_TEXTS = ["'; drawtext=text=pwned:x=0 %{pts\\:hms} %{eif\\:n\\:d}", "a\\b\\\\c x:y:z=1,[out]",
                 "un café ☕ [v];[0:v]null"]


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_watermark_text_never_reaches_ffmpeg(media: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    commands: list[list[str]] = []
    monkeypatch.setattr(ff, "_on_spawn", lambda proc: commands.append([str(a) for a in proc.args]))
    params = {"text": text, "position": "top-left", "size": 0.3, "opacity": 1.0}
    result = run_operation("watermark", params, [media["c9"]], tmp_path)
    assert len(commands) == 1
    joined = "\x00".join(commands[0])
    assert "drawtext" not in joined and "%{" not in joined and text not in joined
    for token in text.replace("\\", " ").split():
        if len(token) >= 3:
            assert token not in joined, token
    # drawn: pixels of the top rows differ from the source's
    marked, source = first_frame(result.path), first_frame(media["c9"])
    changed = np.abs(marked[:24].astype(int) - source[:24].astype(int)).sum(axis=2) > 60
    assert changed.sum() >= 40


@pytest.mark.parametrize("text", ["two\nlines", "tab\there", "cr\r", "nul\x00", "zw\u200bsp", "   ", "x" * 101])
def test_watermark_text_refused(text: str) -> None:
    with pytest.raises(OperationError) as err:
        parse_params("watermark", {"text": text})
    assert err.value.field == "text" and err.value.code == "invalid_input"


@pytest.mark.parametrize(("op", "params", "field"), [
    ("upscale", {"scale": 8}, "scale"),
    ("upscale", {"scale": 1000}, "scale"),
    ("upscale", {"scale": 2, "method": "esrgan"}, "method"),
    ("upscale", {"scale": 2, "filter": "x"}, "filter"),
    ("interpolate", {"fps": 1000}, "fps"),
    ("interpolate", {"fps": 0}, "fps"),
    ("interpolate", {"fps": "24; rm"}, "fps"),
    ("trim", {"start_s": 0, "end_s": 36000}, "end_s"),
    ("trim", {"start_s": 0, "duration_s": 36000}, "duration_s"),
    ("trim", {"start_s": -1, "end_s": 1}, "start_s"),
    ("trim", {"start_s": 2, "end_s": 1}, "end_s"),
    ("trim", {"start_s": 0, "end_s": 1, "duration_s": 1}, "end_s"),
    ("trim", {"start_s": float("nan")}, "start_s"),
    ("trim", {"end_s": float("inf")}, "end_s"),
    ("loop", {"count": 1000}, "count"),
    ("loop", {"count": 1}, "count"),
    ("loop", {"count": 2, "mode": "pingpong"}, "mode"),
    ("concat", {"crossfade_s": 5}, "crossfade_s"),
    ("concat", {"crossfade_s": -1}, "crossfade_s"),
    ("watermark", {"text": "a", "opacity": 2}, "opacity"),
    ("watermark", {"text": "a", "size": 0.9}, "size"),
    ("watermark", {"text": "a", "position": "middle"}, "position"),
    ("audio", {"volume": 10}, "volume"),
    ("export", {"format": "avi"}, "format"),
    ("export", {"target_size_mb": 1000}, "target_size_mb"),
    ("export", {"format": "gif", "target_size_mb": 1}, "target_size_mb"),
    ("export", {"max_side": 100000}, "max_side"),
    ("export", {"fps": 240}, "fps"),
])
def test_hostile_params_refused(op: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(OperationError) as err:
        parse_params(op, params)
    assert (err.value.code, err.value.field) == ("invalid_input", field)


def test_unknown_operation_refused() -> None:
    with pytest.raises(OperationError):
        parse_params("rm", {})
    with pytest.raises(OperationError):
        input_fields("rm")


def test_parse_params_ignores_reference_fields() -> None:
    parsed = parse_params("trim", {"video": "step:a", "video_key": "k", "source_info": {}, "start_s": 0.5})
    assert parsed.start_s == 0.5  # type: ignore[attr-defined]
    assert parse_params("concat", {"videos": ["step:a", "step:b"]}).crossfade_s == 0  # type: ignore[attr-defined]


def test_input_fields() -> None:
    assert input_fields("trim") == {"video": "video"}
    assert input_fields("concat") == {"videos": "video[]"}
    assert input_fields("audio") == {"video": "video", "audio": "audio"}
    assert input_fields("watermark") == {"image": "image", "video": "video", "overlay": "image"}
    assert input_fields("upscale") == {"image": "image", "video": "video"}
    assert set(OPERATIONS) == {"upscale", "interpolate", "trim", "loop", "concat", "watermark", "audio", "export"}


VIDEO = MediaInfo(kind="video", width=64, height=64, num_frames=9, fps=8, duration_s=1.125)
IMAGE = MediaInfo(kind="image", width=64, height=64, format="png")
BIG = MediaInfo(kind="video", width=1024, height=576, num_frames=81, fps=16, duration_s=5.0625)
LONG = MediaInfo(kind="video", width=64, height=64, num_frames=160, fps=16, duration_s=10.0)


@pytest.mark.parametrize(("op", "params", "inputs", "kwargs", "code", "field"), [
    ("trim", {"start_s": 0.1}, [IMAGE], {}, "pipeline_kind_mismatch", "video"),
    ("interpolate", {"fps": 16}, [IMAGE], {}, "pipeline_kind_mismatch", "video"),
    ("concat", {}, [VIDEO, IMAGE], {}, "pipeline_kind_mismatch", "videos"),
    ("watermark", {}, [VIDEO], {"overlay": VIDEO}, "pipeline_kind_mismatch", "overlay"),
    ("trim", {"start_s": 0, "end_s": 2}, [VIDEO], {}, "invalid_input", "end_s"),
    ("trim", {"start_s": 1.2}, [VIDEO], {}, "invalid_input", "start_s"),
    ("trim", {"start_s": 0.5, "end_s": 0.51}, [VIDEO], {}, "invalid_input", "end_s"),
    ("upscale", {"scale": 4}, [BIG], {}, "invalid_input", "scale"),
    ("loop", {"count": 8}, [LONG], {}, "invalid_input", "count"),
    ("interpolate", {"fps": 8}, [VIDEO], {}, "invalid_input", "fps"),
    ("concat", {}, [VIDEO], {}, "invalid_input", "videos"),
    ("concat", {}, [VIDEO] * 9, {}, "invalid_input", "videos"),
    ("concat", {"crossfade_s": 2}, [VIDEO, VIDEO], {}, "invalid_input", "crossfade_s"),
    ("concat", {}, [LONG] * 7, {}, "invalid_input", "videos"),
    ("watermark", {}, [VIDEO], {}, "invalid_input", "text"),
    ("watermark", {"text": "a"}, [VIDEO], {"overlay": IMAGE}, "invalid_input", "text"),
    ("export", {"format": "gif", "fps": 60}, [VIDEO], {}, "invalid_input", "fps"),
    ("export", {"format": "gif"}, [VIDEO.model_copy(update={"fps": 60, "num_frames": 60})], {}, "invalid_input", "fps"),
])
def test_infer_output_refuses(op: str, params: dict[str, Any], inputs: list[MediaInfo], kwargs: dict[str, Any],
                              code: str, field: str) -> None:
    with pytest.raises(OperationError) as err:
        infer_output(op, params, inputs, **kwargs)
    assert (err.value.code, err.value.field) == (code, field)


def test_import_is_light() -> None:
    """The API imports this module to validate and price pipelines: no torch, no numpy."""
    import sys

    code = ("import sys, models.postprocess; bad = [m for m in ('torch', 'diffusers', 'numpy', 'api', 'serve') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout + done.stderr


def test_trim_end_within_half_a_frame_is_the_end() -> None:
    out = infer_output("trim", {"start_s": 0.5, "end_s": 1.15}, [VIDEO])  # 9 frames = 1.125 s
    assert out.num_frames == 5


def test_should_stop_kills_a_running_ffmpeg(media: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[subprocess.Popen[bytes]] = []
    started = threading.Event()
    alive_when_stopped: list[bool] = []

    def on_spawn(proc: subprocess.Popen[bytes]) -> None:
        spawned.append(proc)
        started.set()

    def should_stop() -> bool:
        if started.is_set():
            alive_when_stopped.append(spawned[0].poll() is None)
            return True
        return False

    monkeypatch.setattr(ff, "_on_spawn", on_spawn)
    with pytest.raises(OperationCanceled):
        run_operation("interpolate", {"fps": 60}, [media["c17"]], tmp_path, should_stop=should_stop)
    assert alive_when_stopped == [True]
    assert spawned[0].returncode is not None and spawned[0].returncode < 0  # killed by a signal
    assert list(tmp_path.iterdir()) == []  # no partial output, no mark, no stderr file


def test_time_limit_kills_ffmpeg(media: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(OperationFailed) as err:
        run_operation("interpolate", {"fps": 60}, [media["c17"]], tmp_path, timeout_s=1e-6)
    assert err.value.code == "postprocess_timeout"
    assert list(tmp_path.iterdir()) == []


def test_a_raising_progress_callback_kills_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[subprocess.Popen[bytes]] = []
    monkeypatch.setattr(ff, "_on_spawn", spawned.append)

    def boom(fraction: float) -> None:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):  # a 10-minute real-time source, ended on the first report
        ff.run_ffmpeg(["-re", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=8:duration=600", "-f", "null", "-"],
                      work_dir=tmp_path, expected_frames=4800, on_progress=boom)
    assert spawned[0].returncode is not None and spawned[0].returncode < 0


def test_ffmpeg_failure_is_operation_failed(tmp_path: Path) -> None:
    with pytest.raises(OperationFailed):
        ff.run_ffmpeg(["-i", str(tmp_path / "missing.mp4"), str(tmp_path / "o.mp4")], work_dir=tmp_path)


def test_progress_callback_increases_to_one(media: dict[str, Path], tmp_path: Path) -> None:
    seen: list[float] = []
    run_operation("interpolate", {"fps": 24}, [media["c17"]], tmp_path, on_progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and len(seen) >= 2
    assert all(a < b for a, b in zip(seen, seen[1:], strict=False))


def test_progress_parser() -> None:
    parser = ProgressParser(expected_frames=20, duration_s=2.0)
    assert parser.feed(b"frame=0\nout_time_us=N/A\nfra") == []
    assert parser.feed(b"me=5\nprogress=continue\nframe=5\nframe=10\n") == [0.25, 0.5]
    assert parser.feed(b"frame=8\n") == []  # never backwards
    assert parser.feed(b"frame=30\nprogress=end\n") == [1.0]
    by_time = ProgressParser(expected_frames=None, duration_s=2.0)
    assert by_time.feed(b"out_time_us=500000\nout_time_us=1000000\n") == [0.25, 0.5]


def test_probe_kinds(media: dict[str, Path]) -> None:
    assert probe(media["still"]) == MediaInfo(kind="image", width=64, height=48, format="png")
    assert probe(media["c9"]) == MediaInfo(kind="video", width=64, height=64, num_frames=9, fps=8.0,
                                           duration_s=1.125, format="mp4")
    assert probe(media["av"]).has_audio is True
    assert probe(media["small12"]).model_dump(include={"width", "height", "num_frames", "fps"}) == {
        "width": 48, "height": 32, "num_frames": 12, "fps": 12.0}


def test_operation_price() -> None:
    prices = load_operation_catalog().prices
    assert operation_price("upscale", IMAGE, prices) == 2  # an image counts 1 s
    assert operation_price("trim", VIDEO, prices) == 1  # 0.225 -> min 1
    assert operation_price("upscale", LONG, prices) == 20
    assert operation_price("export", VIDEO.model_copy(update={"duration_s": 4.5}), prices) == math.ceil(4.5 * 0.5)


def test_catalog_shipped_and_strict(tmp_path: Path) -> None:
    catalog = load_operation_catalog()
    assert set(catalog.prices.credits_per_output_second) == set(OPERATIONS)
    assert catalog.prices.min_credits == 1 and catalog.resources.num_cpus == 0.5
    assert (catalog.bounds.max_side, catalog.bounds.max_fps, catalog.bounds.max_duration_s) == (2048, 60, 60)
    text = DEFAULT_PATH.read_text()
    bad = tmp_path / "extra.yaml"
    bad.write_text(text + "\nsurprise: 1\n")
    with pytest.raises(OperationCatalogError, match="surprise"):
        load_operation_catalog(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text(text.replace("    export: 0.5\n", ""))
    with pytest.raises(OperationCatalogError, match="export"):
        load_operation_catalog(missing)



# --- review fixes: bounded memory, work budgets, exact export sizes, a bounded probe ---------------


def test_gif_export_is_two_bounded_runs(media: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """palettegen to a PNG, then paletteuse reading it: no split of the whole stream (which holds every frame)."""
    commands: list[list[str]] = []
    monkeypatch.setattr(ff, "_on_spawn", lambda proc: commands.append([str(a) for a in proc.args]))
    fractions: list[float] = []
    params = {"format": "gif", "max_side": 48}
    result = run_operation("export", params, [media["c9"]], tmp_path, on_progress=fractions.append)
    assert len(commands) == 2
    first, second = ("\x00".join(c) for c in commands)
    assert "palettegen" in first and "paletteuse" not in first and "split" not in first
    assert "paletteuse" in second and "palettegen" not in second and "split" not in second
    palette = commands[0][-1]
    assert palette.endswith(".png") and palette in commands[1]  # the second run reads the first's PNG
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0 and 0.5 in fractions
    assert sorted(p.name for p in tmp_path.iterdir()) == [result.path.name]  # the palette is removed
    got, expected = probe(result.path), infer_output("export", params, [probe(media["c9"])])
    assert (got.format, got.width, got.height, got.num_frames) == ("gif", expected.width, expected.height,
                                                                   expected.num_frames)


def _clip(width: int, height: int, num_frames: int, fps: float) -> MediaInfo:
    return MediaInfo(kind="video", width=width, height=height, num_frames=num_frames, fps=fps,
                     duration_s=num_frames / fps)


def test_loop_is_bounded_by_pixels_held() -> None:
    """1.5e9 pixels held: forward holds a cycle (n), boomerang its reverse buffer too (n + 2n - 2)."""
    assert default_bounds().max_buffered_pixels == 1.5e9
    assert infer_output("loop", {"count": 2}, [_clip(1000, 1000, 1500, 60)]).num_frames == 3000
    with pytest.raises(OperationError) as err:
        infer_output("loop", {"count": 2}, [_clip(1000, 1000, 1501, 60)])
    assert (err.value.code, err.value.field) == ("invalid_input", "video")
    boomerang = {"count": 2, "mode": "boomerang"}
    assert infer_output("loop", boomerang, [_clip(1000, 1000, 500, 60)]).num_frames == 2 * 998  # 1498 held
    with pytest.raises(OperationError) as err:
        infer_output("loop", boomerang, [_clip(1000, 1000, 501, 60)])  # 1501 held
    assert err.value.field == "video"
    assert infer_output("loop", {"count": 2}, [_clip(64, 64, 1300, 60)]).num_frames == 2600  # small: many frames


def test_work_budgets_refuse_what_cannot_finish() -> None:
    """interpolate: output w x h x frames <= 8e8; every video op: <= 4e9 (a 422 before any charge)."""
    assert infer_output("interpolate", {"fps": 60}, [_clip(1024, 576, 361, 16)]).num_frames == 1354
    with pytest.raises(OperationError) as err:
        infer_output("interpolate", {"fps": 60}, [_clip(1024, 576, 362, 16)])  # 1358 x 589824 > 8e8
    assert (err.value.code, err.value.field) == ("invalid_input", "fps")
    assert infer_output("upscale", {"scale": 2}, [_clip(1024, 1024, 953, 16)]).width == 2048
    with pytest.raises(OperationError) as err:
        infer_output("upscale", {"scale": 2}, [_clip(1024, 1024, 954, 16)])  # 954 x 2048^2 > 4e9
    assert (err.value.code, err.value.field) == ("invalid_input", "scale")
    with pytest.raises(OperationError) as err:
        infer_output("trim", {"start_s": 0}, [_clip(2048, 2048, 954, 16)])
    assert err.value.field == "video"


def test_watermark_text_is_rendered_no_larger_than_the_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 100-char text at size 0.5 on 2048 px: measured small and scaled, never a 97670 px wide image."""
    sizes: list[tuple[int, int]] = []
    real_new = Image.new

    def new(mode: str, size: tuple[int, int], *args: Any, **kwargs: Any) -> Image.Image:
        sizes.append(tuple(size))
        return real_new(mode, size, *args, **kwargs)

    monkeypatch.setattr(Image, "new", new)
    clip = _clip(2048, 2048, 9, 8)
    path, x, y = _mark_image(WatermarkParams(text="W" * 100, size=0.5), clip, None, tmp_path)
    assert max(w * h for w, h in sizes) <= 2048 * 2048
    with Image.open(path) as mark:
        assert mark.width <= 2048 and mark.height <= 2048 and mark.width > 1000  # fills the width
    short, _, _ = _mark_image(WatermarkParams(text="hi", size=0.5), _clip(256, 256, 9, 8), None, tmp_path)
    with Image.open(short) as mark:
        assert mark.height >= 0.4 * 256  # a short text keeps its size


def test_export_exact_size_params() -> None:
    src = [_clip(64, 48, 9, 8)]
    assert infer_output("export", {"width": 32, "height": 64, "fit": "cover"}, src).model_dump(
        include={"width", "height"}) == {"width": 32, "height": 64}
    assert (infer_output("export", {"width": 32}, src).height, infer_output("export", {"height": 32}, src).width) == (
        24, 42)
    for params, field in [({"width": 33}, "width"), ({"height": 4096}, "height"),
                          ({"width": 32, "max_side": 32}, "max_side"), ({"fit": "zoom", "width": 32}, "fit")]:
        with pytest.raises(OperationError) as err:
            infer_output("export", params, src)
        assert err.value.field == field, params
    with pytest.raises(OperationError) as err:
        infer_output("export", {"height": 2048}, [_clip(4096, 1024, 9, 8)])  # width by aspect: 8192
    assert err.value.field == "width"


def test_export_target_size_under_the_bitrate_floor_is_refused() -> None:
    """64 kb/s for 10 s is ~0.087 MB: a 0.05 MB target is refused, not silently overshot."""
    ten_s = _clip(64, 64, 80, 8)
    assert infer_output("export", {"target_size_mb": 0.1}, [ten_s]).format == "mp4"
    for clip, mb in [(ten_s, 0.05), (ten_s.model_copy(update={"has_audio": True}), 0.2)]:
        with pytest.raises(OperationError) as err:
            infer_output("export", {"format": "webm", "target_size_mb": mb}, [clip])
        assert (err.value.code, err.value.field) == ("invalid_input", "target_size_mb")


def test_probe_refuses_a_playlist_posing_as_a_video(media: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """probe() reads as _input() does (file protocol, whitelisted demuxers) under a time limit."""
    (tmp_path / "real.mp4").write_bytes(media["c9"].read_bytes())
    playlist = tmp_path / "list.mp4"
    playlist.write_text("ffconcat version 1.0\nfile real.mp4\n")
    hls = tmp_path / "hls.mp4"
    hls.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.125,\n{tmp_path / 'real.mp4'}\n#EXT-X-ENDLIST\n")
    commands: list[list[str]] = []
    real_run = subprocess.run

    def run(cmd: list[str], *args: Any, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        commands.append([str(a) for a in cmd])
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(ff.subprocess, "run", run)
    for evil in (playlist, hls):
        with pytest.raises(OperationError) as err:
            probe(evil)
        assert err.value.code == "input_unreadable"
    assert commands and all("-protocol_whitelist" in c and "-format_whitelist" in c for c in commands)
    with pytest.raises(OperationFailed) as timed:
        probe(tmp_path / "real.mp4", timeout_s=1e-6)
    assert timed.value.code == "postprocess_timeout"
