"""The dataset: crops, captions with the trigger word, seeded flips and caption dropout."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tests.training.conftest import make_images
from training.dataset import (
    LoraDataset,
    TrainingImage,
    caption_with_trigger,
    center_crop_resize,
    to_tensor_array,
)


def banded(width: int, height: int) -> Image.Image:
    """Red outer thirds and a green middle third along the longer side."""
    arr = np.zeros((height, width, 3), np.uint8)
    if width >= height:
        third = width // 3
        arr[:, :third] = (255, 0, 0)
        arr[:, third:width - third] = (0, 255, 0)
        arr[:, width - third:] = (255, 0, 0)
    else:
        third = height // 3
        arr[:third] = (255, 0, 0)
        arr[third:height - third] = (0, 255, 0)
        arr[height - third:] = (255, 0, 0)
    return Image.fromarray(arr)


# --- crops ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(192, 64), (64, 192), (384, 128), (96, 288)])
def test_center_crop_keeps_the_middle_of_the_long_side(size: tuple[int, int]) -> None:
    out = center_crop_resize(banded(*size), 64)
    assert out.size == (64, 64) and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    # Only the green middle band survives (a few pixels of resampling blur at the edges).
    inner = arr[4:-4, 4:-4]
    assert (inner[..., 1] > 200).all() and (inner[..., 0] < 50).all()


def test_small_and_non_rgb_images_are_upscaled_to_rgb() -> None:
    rgba = Image.new("RGBA", (20, 30), (10, 20, 30, 128))
    gray = Image.new("L", (40, 40), 77)
    assert center_crop_resize(rgba, 64).size == (64, 64)
    assert center_crop_resize(rgba, 64).mode == "RGB"
    assert np.asarray(center_crop_resize(gray, 32))[0, 0].tolist() == [77, 77, 77]
    with pytest.raises(ValueError):
        center_crop_resize(gray, 0)


def test_tensor_array_is_chw_in_minus_one_to_one() -> None:
    img = Image.fromarray(np.array([[[0, 255, 128]]], np.uint8))
    arr = to_tensor_array(img)
    assert arr.shape == (3, 1, 1) and arr.dtype == np.float32
    assert arr[:, 0, 0] == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1.0], abs=1e-6)


# --- captions ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("caption", "expected"), [
    (None, "a photo of TOK"),
    ("", "a photo of TOK"),
    ("   \n ", "a photo of TOK"),
    ("a dog on a beach", "TOK, a dog on a beach"),
    ("a TOK dog on a beach", "a TOK dog on a beach"),
    ("TOK", "TOK"),
    ("a tok dog", "a tok dog"),  # CLIP lowercases: the trigger is there
    ("TOKYO at night", "TOK, TOKYO at night"),  # a longer word is not the trigger
    ("  two\n spaces  ", "TOK, two spaces"),
])
def test_captions_always_carry_the_trigger(caption: str | None, expected: str) -> None:
    assert caption_with_trigger(caption, "TOK") == expected


def test_caption_with_bracketed_trigger_and_template() -> None:
    assert caption_with_trigger("a <s0> cat", "<s0>") == "a <s0> cat"
    assert caption_with_trigger("a <s0>x cat", "<s0>") == "<s0>, a <s0>x cat"
    assert caption_with_trigger(None, "sks", template="an image of {trigger}") == "an image of sks"


# --- sampling ------------------------------------------------------------------------------------

def dataset(n: int = 4, **kw: object) -> LoraDataset:
    items = [TrainingImage(img, cap) for img, cap in zip(make_images(n, 48), [None, "a red toy", None, None],
                                                          strict=False)]
    return LoraDataset(items, 32, "TOK", **kw)  # type: ignore[arg-type]


def test_every_epoch_visits_each_image_once_in_a_seeded_order() -> None:
    ds = dataset(seed=3)
    epochs = [[ds.sample(e * 4 + i).index for i in range(4)] for e in range(5)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in epochs)
    assert len({tuple(o) for o in epochs}) > 1  # shuffled per epoch
    assert epochs == [[dataset(seed=3).sample(e * 4 + i).index for i in range(4)] for e in range(5)]
    other = [[dataset(seed=4).sample(e * 4 + i).index for i in range(4)] for e in range(5)]
    assert other != epochs


def test_samples_are_a_pure_function_of_seed_and_position() -> None:
    a, b = dataset(seed=7), dataset(seed=7)
    forward = [a.sample(i) for i in range(40)]
    backward = [b.sample(i) for i in reversed(range(40))][::-1]  # any order, same answers
    assert forward == backward


def test_flip_probability() -> None:
    assert not any(dataset(flip_p=0.0).sample(i).flipped for i in range(50))
    assert all(dataset(flip_p=1.0).sample(i).flipped for i in range(50))
    flips = Counter(dataset(flip_p=0.5, seed=1).sample(i).flipped for i in range(400))
    assert 150 < flips[True] < 250


def test_flipped_pixels_are_mirrored() -> None:
    ds = dataset()
    plain, mirrored = np.asarray(ds.pixels(1, False)), np.asarray(ds.pixels(1, True))
    assert plain.shape == (32, 32, 3)
    assert np.array_equal(mirrored, plain[:, ::-1])
    assert not np.array_equal(mirrored, plain)


def test_caption_dropout() -> None:
    kept = [dataset(caption_dropout=0.0).sample(i).caption for i in range(60)]
    assert all(kept) and all("TOK" in c for c in kept)
    assert {c for c in kept} == {"a photo of TOK", "TOK, a red toy"}
    assert all(dataset(caption_dropout=1.0).sample(i).caption == "" for i in range(20))
    dropped = sum(dataset(caption_dropout=0.25, seed=2).sample(i).caption == "" for i in range(400))
    assert 60 < dropped < 140


def test_captions_follow_their_images() -> None:
    ds = dataset(caption_dropout=0.0)
    for i in range(12):
        s = ds.sample(i)
        assert s.caption == ("TOK, a red toy" if s.index == 1 else "a photo of TOK")


def test_bad_datasets_are_refused() -> None:
    with pytest.raises(ValueError, match="no training images"):
        LoraDataset([], 64)
    with pytest.raises(ValueError):
        dataset(caption_dropout=1.5)
