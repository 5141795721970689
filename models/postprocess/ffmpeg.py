"""Running the ffmpeg binary that imageio-ffmpeg ships, and probing media.

Always an argument list (never a shell), ``-nostdin -y``, ``-progress pipe:1`` for progress, a
time limit, and a stop check between reads: a stopped run's process is killed, waited for, and
:class:`OperationCanceled` raised.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import imageio_ffmpeg
from imageio_ffmpeg._parsing import parse_ffmpeg_header
from PIL import Image, UnidentifiedImageError

from models.postprocess.catalog import OperationError
from models.postprocess.spec import MediaInfo

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 0.2


class OperationFailed(RuntimeError):
    """ffmpeg failed or ran past its time limit (not the caller's fault: a retry may succeed)."""

    def __init__(self, message: str, *, code: str = "postprocess_failed") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class OperationCanceled(RuntimeError):
    """``should_stop`` asked the run to stop; ffmpeg was killed."""

    code = "canceled"


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


class ProgressParser:
    """Turns ``-progress`` key=value lines into fractions in [0, 1], never decreasing.

    ``frame=`` over the expected frame count when it is known, else ``out_time_us`` over the
    expected duration.
    """

    def __init__(self, expected_frames: int | None, duration_s: float | None) -> None:
        self.expected_frames = expected_frames
        self.duration_s = duration_s
        self.fraction = 0.0
        self._buffer = b""

    def feed(self, data: bytes) -> list[float]:
        """New fractions (each above the last) from a chunk of ffmpeg's progress output."""
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        out: list[float] = []
        for line in lines:
            key, _, value = line.decode("ascii", "replace").strip().partition("=")
            fraction: float | None = None
            try:
                if key == "frame" and self.expected_frames:
                    fraction = int(value) / self.expected_frames
                elif key == "out_time_us" and self.duration_s and not self.expected_frames:
                    fraction = int(value) / (self.duration_s * 1e6)
                elif key == "progress" and value == "end":
                    fraction = 1.0
            except ValueError:  # "N/A" before the first frame
                continue
            if fraction is None:
                continue
            fraction = min(1.0, max(0.0, fraction))
            if fraction > self.fraction:
                self.fraction = fraction
                out.append(fraction)
        return out


# A hook for tests: called with each started process (e.g. to check that a stop kills it).
_on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None


def run_ffmpeg(args: Sequence[str], *, work_dir: Path, expected_frames: int | None = None,
               duration_s: float | None = None, timeout_s: float = 600.0,
               on_progress: Callable[[float], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> None:
    """Run ffmpeg with ``args`` (inputs, filters, outputs); raise on failure, timeout or stop."""
    cmd = [ffmpeg_exe(), "-nostdin", "-y", "-hide_banner", "-loglevel", "error", "-nostats",
           "-progress", "pipe:1", "-stats_period", str(STATS_PERIOD_S), *args]
    parser = ProgressParser(expected_frames, duration_s)
    with tempfile.TemporaryFile(dir=work_dir) as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        assert proc.stdout is not None
        try:
            if _on_spawn is not None:
                _on_spawn(proc)
            rc = _drive(proc, proc.stdout, parser, time.monotonic() + timeout_s, timeout_s, on_progress, should_stop)
        except BaseException:  # stopped, timed out, or a callback raised: never leave ffmpeg running
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        if rc != 0:
            stderr.seek(0)
            tail = stderr.read()[-2000:].decode("utf-8", "replace").strip()
            logger.warning("ffmpeg failed (rc=%s): %s", rc, tail)
            raise OperationFailed(f"ffmpeg failed (exit {rc}): {tail[-500:]}")


def _drive(proc: subprocess.Popen[bytes], stdout: IO[bytes], parser: ProgressParser, deadline: float,
           timeout_s: float, on_progress: Callable[[float], None] | None,
           should_stop: Callable[[], bool] | None) -> int:
    """Read progress until ffmpeg closes its output; the exit status. Checks stop and time between reads."""
    timed_out = OperationFailed(f"ffmpeg ran past its time limit of {timeout_s:g} s", code="postprocess_timeout")
    with selectors.DefaultSelector() as sel:
        sel.register(stdout, selectors.EVENT_READ)
        fd = stdout.fileno()
        for _ in range(int(timeout_s / 0.1) + 1_000_000):  # bounded; the deadline ends it first
            if should_stop is not None and should_stop():
                raise OperationCanceled("the operation was stopped")
            if time.monotonic() > deadline:
                raise timed_out
            if not sel.select(timeout=0.1):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if on_progress is not None:
                for fraction in parser.feed(chunk):
                    on_progress(fraction)
    try:
        return proc.wait(timeout=max(0.5, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise timed_out from None


# Demuxers an input may be read with: no playlists (hls, concat), no devices, no network.
INPUT_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,gif,image2,png_pipe,jpeg_pipe,webp_pipe,"
                 "wav,mp3,ogg,flac,aac")
PROBE_TIMEOUT_S = 120.0
_FRAME_RE = re.compile(rb"frame=\s*(\d+)")


def _probe_video(path: Path, *, timeout_s: float) -> tuple[dict, int]:
    """The header meta (imageio-ffmpeg's parser) and the decoded frame count, in one bounded run."""
    cmd = [ffmpeg_exe(), "-nostdin", "-protocol_whitelist", "file", "-format_whitelist", INPUT_FORMATS,
           "-i", f"file:{path.resolve()}", "-map", "0:v:0", "-vf", "null", "-f", "null", "-"]
    unreadable = OperationError(f"cannot read {path.name} as an image or a video", code="input_unreadable",
                                field=None)
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise OperationFailed(f"probing {path.name} ran past {timeout_s:g} s", code="postprocess_timeout") from exc
    text = done.stderr.decode("utf-8", "replace")
    frames = _FRAME_RE.findall(done.stderr)
    if done.returncode != 0 or not frames:
        # not a transient failure: the same file fails again (a non-retryable error for the runner)
        raise unreadable
    try:
        meta = parse_ffmpeg_header(text.split("Output #0", 1)[0])
    except (IndexError, ValueError, AttributeError) as exc:
        raise unreadable from exc
    return meta, int(frames[-1])


_IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}


def probe(path: Path, *, timeout_s: float = PROBE_TIMEOUT_S) -> MediaInfo:
    """What a file holds: images through Pillow; videos (GIF too) through imageio-ffmpeg.

    Raises OperationError(code="input_unreadable") for a file that is neither.

    A video is read as ``_input()`` reads it (the file protocol, whitelisted demuxers: a playlist
    posing as an .mp4 is refused, never followed) in one ffmpeg run under ``timeout_s``
    (``postprocess_timeout`` past it). A video's frames are counted by decoding; its duration is
    ``frames / fps`` (a GIF's fps is its frames over its stored duration: GIF delays are whole
    centiseconds).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            fmt = (img.format or "").upper()
            if fmt in _IMAGE_FORMATS:
                return MediaInfo(kind="image", width=img.width, height=img.height, format=_IMAGE_FORMATS[fmt])
    except Image.DecompressionBombError as exc:
        raise OperationError(f"{path.name} is too large an image", code="input_unreadable") from exc
    except (UnidentifiedImageError, OSError):
        pass
    meta, num_frames = _probe_video(path, timeout_s=timeout_s)
    width, height = meta["size"]
    codec = str(meta.get("codec", "")).rstrip(",")
    suffix = path.suffix.lower().lstrip(".")
    fmt_name = "gif" if codec == "gif" else (suffix or codec or None)
    fps = float(meta.get("fps") or 0.0)
    if fmt_name == "gif" and meta.get("duration"):
        fps = round(num_frames / float(meta["duration"]), 2)
    return MediaInfo(kind="video", width=int(width), height=int(height), num_frames=int(num_frames),
                     fps=fps, duration_s=round(num_frames / fps, 3) if fps else None,
                     has_audio=bool(meta.get("audio_codec")), format=fmt_name)


def probe_audio(path: Path, *, max_s: float = 600.0, timeout_s: float = 60.0) -> float:
    """The seconds of a file's first audio stream (decoded, up to ``max_s``).

    Raises OperationError(code="input_unreadable", field="audio") when it has no readable audio.
    """
    path = Path(path)
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-nostats", "-progress", "pipe:1",
           "-protocol_whitelist", "file", "-format_whitelist", AUDIO_FORMATS, "-i", f"file:{path.resolve()}",
           "-map", "0:a:0", "-t", f"{max_s:g}", "-f", "null", "-"]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise OperationFailed(f"reading the audio {path.name} ran past {timeout_s:g} s",
                              code="postprocess_timeout") from exc
    seconds = 0.0
    for line in done.stdout.decode("ascii", "replace").splitlines():
        key, _, value = line.partition("=")
        if key == "out_time_us" and value.strip().lstrip("-").isdigit():
            seconds = max(seconds, int(value) / 1e6)
    if done.returncode != 0 or seconds <= 0:
        raise OperationError(f"{path.name} holds no readable audio", code="input_unreadable", field="audio")
    return round(seconds, 3)


AUDIO_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,wav,mp3,ogg,flac,aac"
