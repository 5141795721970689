"""A real, tiny H.264 MP4 (a few 64×64 frames) for the fakes to serve as the generated video."""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache

import imageio_ffmpeg
import numpy as np

WIDTH = HEIGHT = 64
FRAMES = 8
FPS = 8


@lru_cache(maxsize=4)
def tiny_mp4(frames: int = FRAMES, fps: int = FPS, size: int = WIDTH) -> bytes:
    """MP4 bytes: ``frames`` frames of a moving colour gradient, ``size``×``size`` at ``fps``."""
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(path, (size, size), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                             macro_block_size=16, output_params=["-movflags", "+faststart"])
        writer.send(None)
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        for i in range(frames):
            frame = np.zeros((size, size, 3), dtype=np.uint8)
            frame[..., 0] = ramp[None, :]
            frame[..., 1] = ramp[:, None]
            frame[..., 2] = (i * 255) // max(1, frames - 1)
            writer.send(np.ascontiguousarray(frame).tobytes())
        writer.close()
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)
