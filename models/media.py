"""Encoding outputs: PNG with metadata, JPEG thumbnails, H.264 MP4 through imageio-ffmpeg, PNG posters.

The ffmpeg binary ships inside the imageio-ffmpeg wheel, so nothing here needs a system ffmpeg.
No torch: the overflow adapters use :func:`extract_poster` on provider videos too.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
from PIL import Image, PngImagePlugin

logger = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:  # float frames in [0, 1] as diffusers' "np" output gives them
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def encode_png(image: ImageLike, metadata: Mapping[str, Any] | None = None) -> bytes:
    """PNG bytes with each metadata entry (e.g. prompt, seed, model) as a text chunk.

    Strings are stored as they are, other values as JSON; a ``cineweave`` chunk holds the whole
    mapping as JSON for tools that read one chunk.
    """
    pil = _to_pil(image)
    info = PngImagePlugin.PngInfo()
    meta = dict(metadata or {})
    for key, value in meta.items():
        text = value if isinstance(value, str) else json.dumps(value)
        info.add_itxt(str(key), text)  # iTXt: UTF-8, so non-Latin-1 prompts survive
    if meta:
        info.add_itxt("cineweave", json.dumps(meta, ensure_ascii=False, default=str))
    buf = io.BytesIO()
    pil.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_metadata(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (the inverse of :func:`encode_png`'s metadata, as strings)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return {str(k): str(v) for k, v in getattr(img, "text", {}).items()}


def _reduced(image: ImageLike, max_side: int) -> Image.Image:
    """The image no larger than ``max_side`` on its longer side (aspect kept; never upscaled).

    Cheap: ``Image.thumbnail`` with a reducing gap first shrinks by an integer factor with
    ``Image.reduce`` (a box filter over whole blocks), then resamples only the small remainder.
    """
    pil = _to_pil(image)
    if pil.mode not in ("RGB", "RGBA", "L"):
        pil = pil.convert("RGB")
    if max(pil.size) <= max_side:
        return pil
    pil = pil.copy()
    pil.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)
    return pil


def thumbnail_png(image: ImageLike, max_side: int = 256) -> bytes:
    """A PNG no larger than ``max_side`` on its longer side (aspect kept; never upscaled).

    Fast zlib level, no ``optimize`` pass: a poster is a preview, not the output."""
    buf = io.BytesIO()
    _reduced(image, max_side).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


THUMBNAIL_JPEG_QUALITY = 80


def thumbnail_jpeg(image: ImageLike, max_side: int = 256, quality: int = THUMBNAIL_JPEG_QUALITY) -> bytes:
    """A small JPEG preview no larger than ``max_side`` (aspect kept; never upscaled).

    Made from the decoded image by reduction (see :func:`_reduced`), never by a second encode of
    the full-size output; a few KB where a PNG of generated noise is a hundred or more.
    """
    pil = _reduced(image, max_side)
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def macro_block_for(width: int, height: int) -> int:
    """The largest block (16, 8, 4 or 2) dividing both sides, so ffmpeg keeps the size exactly.

    yuv420p halves the chroma planes, so H.264 needs even sides: odd sizes raise ValueError.
    """
    if width % 2 or height % 2:
        raise ValueError(f"H.264/yuv420p needs even width and height, got {width}×{height}")
    return math.gcd(width, height, 16)


def encode_mp4(frames: Iterable[ImageLike], fps: int | float, path: Path | str) -> Path:
    """Write frames (PIL images or HxWx3 arrays, all one size) as H.264/yuv420p MP4 at ``fps``.

    The output has exactly the frames' width and height (see :func:`macro_block_for`) and starts
    playing before it is fully downloaded (``+faststart``).
    """
    path = Path(path)
    iterator = iter(frames)
    try:
        first = _to_pil(next(iterator)).convert("RGB")
    except StopIteration:
        raise ValueError("no frames to encode") from None
    width, height = first.size
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
        macro_block_size=macro_block_for(width, height), output_params=["-movflags", "+faststart"])
    writer.send(None)  # start ffmpeg
    count = 0
    try:
        for frame in (first, *(_to_pil(f).convert("RGB") for f in iterator)):
            if frame.size != (width, height):
                raise ValueError(f"frame {count} is {frame.size[0]}×{frame.size[1]}, expected {width}×{height}")
            writer.send(np.ascontiguousarray(np.asarray(frame, dtype=np.uint8)).tobytes())
            count += 1
    finally:
        writer.close()
    logger.debug("encoded %d frames %dx%d at %s fps to %s", count, width, height, fps, path)
    return path


class _AsFile:
    """A path for bytes-or-path input (ffmpeg reads files): a temp file removed afterwards."""

    def __init__(self, source: bytes | Path | str) -> None:
        self.source = source
        self._tmp: str | None = None

    def __enter__(self) -> str:
        if isinstance(self.source, bytes | bytearray | memoryview):
            fd, self._tmp = tempfile.mkstemp(suffix=".mp4")
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(self.source))
            return self._tmp
        return str(self.source)

    def __exit__(self, *exc: object) -> None:
        if self._tmp:
            os.unlink(self._tmp)


def extract_poster(video: bytes | Path | str) -> bytes:
    """PNG bytes of the first frame of a video (MP4 bytes or a path)."""
    with _AsFile(video) as path:
        reader = imageio_ffmpeg.read_frames(path, output_params=["-frames:v", "1"])
        try:
            meta = next(reader)
            width, height = meta["size"]
            try:
                raw = next(reader)
            except StopIteration:
                raise ValueError("the video has no frames") from None
        finally:
            reader.close()
    frame = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
    return encode_png(Image.fromarray(frame))


def probe_mp4(path: Path | str) -> dict[str, Any]:
    """``{width, height, num_frames, fps, duration_s}`` of a video, frames counted by decoding."""
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
    finally:
        reader.close()
    num_frames, _secs = imageio_ffmpeg.count_frames_and_secs(str(path))
    fps = float(meta["fps"])
    width, height = meta["size"]
    return {"width": int(width), "height": int(height), "num_frames": int(num_frames), "fps": fps,
            "duration_s": round(num_frames / fps, 3) if fps else 0.0}
