"""PNG metadata and thumbnails, MP4 encoding (exact size, frame count, fps), posters, probing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.generator import Generator
from models.media import (
    encode_mp4,
    encode_png,
    extract_poster,
    macro_block_for,
    probe_mp4,
    read_png_metadata,
    thumbnail_jpeg,
    thumbnail_png,
)


def frames(n: int, width: int, height: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        arr = np.zeros((height, width, 3), np.uint8)
        arr[..., 0] = 255 * i // max(1, n - 1)  # red ramps over time
        arr[: height // 2, :, 2] = 200
        out.append(Image.fromarray(arr))
    return out


def test_png_carries_prompt_seed_and_model() -> None:
    image = Image.new("RGB", (48, 32), (12, 34, 56))
    data = encode_png(image, {"prompt": "un café à Zürich ☕", "seed": 42, "model": "tiny-sd", "guidance": 5.0})
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "PNG" and decoded.size == (48, 32)
        assert decoded.getpixel((0, 0)) == (12, 34, 56)
    meta = read_png_metadata(data)
    assert meta["prompt"] == "un café à Zürich ☕" and meta["seed"] == "42" and meta["model"] == "tiny-sd"
    assert json.loads(meta["cineweave"]) == {"prompt": "un café à Zürich ☕", "seed": 42, "model": "tiny-sd",
                                             "guidance": 5.0}
    assert read_png_metadata(encode_png(np.zeros((4, 4, 3), np.float32))) == {}


@pytest.mark.parametrize(("size", "expected"), [((1024, 512), (256, 128)), ((100, 300), (85, 256)),
                                                 ((64, 64), (64, 64))])
def test_thumbnail_keeps_aspect_and_never_upscales(size: tuple[int, int], expected: tuple[int, int]) -> None:
    data = thumbnail_png(Image.new("RGB", size, "white"))
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "PNG" and thumb.size == expected


@pytest.mark.parametrize(("size", "expected"), [((1024, 512), (256, 128)), ((100, 300), (85, 256)),
                                                 ((64, 64), (64, 64))])
def test_jpeg_thumbnail_keeps_aspect_and_never_upscales(size: tuple[int, int], expected: tuple[int, int]) -> None:
    data = thumbnail_jpeg(Image.new("RGBA", size, (200, 10, 10, 255)))
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == expected and thumb.mode == "RGB"
        r, g, b = thumb.getpixel((thumb.width // 2, thumb.height // 2))
        assert abs(r - 200) < 8 and g < 20 and b < 20  # the colours survive the reduction


def test_jpeg_thumbnail_of_a_large_noisy_image_is_small() -> None:
    """A generated image (noise, a hundred KB and more as PNG) previews in a few KB."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    jpeg, png = thumbnail_jpeg(image), thumbnail_png(image)
    assert len(jpeg) < len(png) / 4 and len(jpeg) < 40_000


def test_thumbnail_max_side() -> None:
    with Image.open(io.BytesIO(thumbnail_png(Image.new("P", (400, 200)), max_side=100))) as thumb:
        assert thumb.size == (100, 50)


@pytest.mark.parametrize(("width", "height", "n", "fps"), [(64, 64, 17, 8), (72, 40, 9, 24), (62, 34, 5, 16)])
def test_mp4_has_requested_size_frames_and_fps(tmp_path: Path, width: int, height: int, n: int, fps: int) -> None:
    path = encode_mp4(frames(n, width, height), fps, tmp_path / "v.mp4")
    assert path.stat().st_size > 0
    info = probe_mp4(path)
    assert info == {"width": width, "height": height, "num_frames": n, "fps": float(fps),
                    "duration_s": round(n / fps, 3)}


def test_mp4_from_arrays_and_bad_input(tmp_path: Path) -> None:
    arrays = [np.asarray(f) for f in frames(5, 32, 32)]
    assert probe_mp4(encode_mp4(arrays, 10, tmp_path / "a.mp4"))["num_frames"] == 5
    floats = [a.astype(np.float32) / 255 for a in arrays]
    assert probe_mp4(encode_mp4(floats, 10, tmp_path / "f.mp4"))["num_frames"] == 5
    with pytest.raises(ValueError, match="no frames"):
        encode_mp4([], 8, tmp_path / "none.mp4")
    with pytest.raises(ValueError, match="needs even width and height"):
        encode_mp4(frames(2, 33, 32), 8, tmp_path / "odd.mp4")
    with pytest.raises(ValueError, match="frame 1 is 16×16, expected 32×32"):
        encode_mp4([*frames(1, 32, 32), *frames(1, 16, 16)], 8, tmp_path / "mixed.mp4")


def test_macro_block_keeps_size() -> None:
    assert macro_block_for(64, 48) == 16
    assert macro_block_for(72, 40) == 8
    assert macro_block_for(62, 34) == 2


def test_poster_is_the_first_frame_from_bytes_or_path(tmp_path: Path) -> None:
    path = encode_mp4(frames(6, 64, 32), 8, tmp_path / "v.mp4")
    for source in (path, str(path), path.read_bytes()):
        data = extract_poster(source)
        with Image.open(io.BytesIO(data)) as poster:
            assert poster.format == "PNG" and poster.size == (64, 32)
            r, _, b = poster.convert("RGB").getpixel((10, 5))
            assert r < 30 and b > 150  # first frame: no red yet, blue top half (lossy codec: approximate)
    with pytest.raises(Exception):  # noqa: B017 - ffmpeg's error type is an implementation detail
        extract_poster(b"not a video")


def test_generated_video_round_trip(wan_gen: Generator, tmp_path: Path) -> None:
    [media] = wan_gen.generate([{"prompt": "rain", "seed": 2, "num_frames": 13, "fps": 10}])
    assert media.frames is not None and media.fps is not None
    info = probe_mp4(encode_mp4(media.frames, media.fps, tmp_path / "out.mp4"))
    assert info == {"width": 64, "height": 64, "num_frames": 13, "fps": 10.0, "duration_s": 1.3}
    png = encode_png(media.poster, media.metadata)
    assert read_png_metadata(png)["model"] == "tiny-wan"
