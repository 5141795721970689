"""Copy a provider's video into our storage, with a poster frame and what the MP4 header says.

The video is probed by reading its MP4 boxes (``tkhd`` for the size, ``mdhd`` for the duration,
``stts`` for the frame count): no decoding, so it costs nothing next to the download. The poster
comes from :func:`models.media.extract_poster` (ffmpeg from imageio-ffmpeg). A poster that cannot
be made is logged and left out: the paid-for video is what the job delivers.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from api.core.events import OutputEvent
from api.storage.base import Storage

logger = logging.getLogger(__name__)

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


@dataclass(frozen=True)
class VideoInfo:
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: float | None = None
    duration_s: float | None = None


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) for each box in ``data[start:end]``."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if pos + 16 > end:
                return
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    for found, payload, box_end in _boxes(data, start, end):
        if found == kind:
            return payload, box_end
    return None


def _track_info(data: bytes, start: int, end: int) -> VideoInfo | None:
    mdia = _child(data, start, end, b"mdia")
    if mdia is None:
        return None
    hdlr = _child(data, *mdia, b"hdlr")
    if hdlr is None or data[hdlr[0] + 8:hdlr[0] + 12] != b"vide":
        return None
    width = height = None
    tkhd = _child(data, start, end, b"tkhd")
    if tkhd is not None:
        version = data[tkhd[0]]
        offset = tkhd[0] + (88 if version == 1 else 76)
        if offset + 8 <= tkhd[1]:
            w, h = struct.unpack_from(">II", data, offset)
            width, height = w >> 16, h >> 16
    duration_s = None
    mdhd = _child(data, *mdia, b"mdhd")
    if mdhd is not None:
        version = data[mdhd[0]]
        if version == 1:
            timescale, duration = struct.unpack_from(">IQ", data, mdhd[0] + 20)
        else:
            timescale, duration = struct.unpack_from(">II", data, mdhd[0] + 12)
        if timescale:
            duration_s = duration / timescale
    frames = None
    minf = _child(data, *mdia, b"minf")
    stbl = _child(data, *minf, b"stbl") if minf else None
    stts = _child(data, *stbl, b"stts") if stbl else None
    if stts is not None:
        (count,) = struct.unpack_from(">I", data, stts[0] + 4)
        frames = 0
        for i in range(min(count, (stts[1] - stts[0] - 8) // 8)):
            frames += struct.unpack_from(">I", data, stts[0] + 8 + 8 * i)[0]
    fps = round(frames / duration_s, 3) if frames and duration_s else None
    return VideoInfo(width or None, height or None, frames, fps,
                     round(duration_s, 3) if duration_s is not None else None)


def probe_mp4(data: bytes) -> VideoInfo:
    """Size, frame count, fps and duration of the first video track; empty if unreadable."""
    try:
        moov = _child(data, 0, len(data), b"moov")
        if moov is None:
            return VideoInfo()
        for kind, payload, box_end in _boxes(data, *moov):
            if kind == b"trak":
                info = _track_info(data, payload, box_end)
                if info is not None:
                    return info
    except struct.error:
        logger.debug("unreadable MP4 header", exc_info=True)
    return VideoInfo()


def _poster_png(video: bytes) -> bytes:
    from models.media import extract_poster  # ffmpeg and numpy: loaded only when needed

    return extract_poster(video)


async def store_video(storage: Storage, prefix: str, data: bytes, *, name: str = "0",
                      content_type: str = "video/mp4", fps_hint: float | None = None,
                      duration_hint: float | None = None) -> OutputEvent:
    """Write ``{prefix}{name}.mp4`` and ``{prefix}{name}.poster.png``; describe them as an OutputEvent."""
    key = f"{prefix}{name}.mp4"
    await asyncio.to_thread(storage.put_bytes, key, data, content_type)
    info = probe_mp4(data)
    poster_key: str | None = f"{prefix}{name}.poster.png"
    try:
        png = await asyncio.to_thread(_poster_png, data)
        await asyncio.to_thread(storage.put_bytes, poster_key, png, "image/png")
    except Exception as exc:  # noqa: BLE001 - the video is stored; a missing poster is not fatal
        logger.warning("no poster for %s: %s: %s", key, type(exc).__name__, exc)
        poster_key = None
    return OutputEvent(key=key, content_type=content_type, width=info.width, height=info.height,
                       num_frames=info.num_frames, fps=info.fps or fps_hint,
                       duration_s=info.duration_s if info.duration_s is not None else duration_hint,
                       thumbnail_key=poster_key)


__all__ = ["VideoInfo", "probe_mp4", "store_video"]
