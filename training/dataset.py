"""The training set of a personal LoRA: images cropped to one square size, captions with the trigger word.

Everything random here (which image a step sees, whether it is flipped, whether its caption is
dropped) is a pure function of ``(seed, step)``, not of a stateful generator. A run resumed from
a checkpoint at step ``k`` therefore sees exactly the samples an uninterrupted run would have seen
from step ``k`` on, with no dataset state to save.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of {trigger}"


@dataclass(frozen=True)
class TrainingImage:
    """One image of the set; ``caption`` comes from a sidecar ``.txt`` file when the user gave one."""

    image: Image.Image
    caption: str | None = None


@dataclass(frozen=True)
class Sample:
    """What one step trains on: the (possibly flipped) image's index, and the caption to use."""

    index: int
    flipped: bool
    caption: str


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to ``resolution`` and cut the centre square out, in RGB.

    Center crop (as diffusers' dreambooth scripts do with ``--center_crop``) keeps every sample
    the same size, so batches need no buckets; faces and subjects are usually centred in photos.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _mentions(caption: str, trigger: str) -> bool:
    # The trigger is a token of its own: "TOK" is in "a TOK dog" but not in "TOKYO".
    pattern = r"(?<![\w<>-])" + re.escape(trigger) + r"(?![\w<>-])"
    return re.search(pattern, caption, flags=re.IGNORECASE) is not None


def caption_with_trigger(caption: str | None, trigger: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The caption to train on: the sidecar caption with the trigger word prepended when missing,
    else ``template`` (``"a photo of {trigger}"``).

    The trigger must be in every caption: it is the token the LoRA binds the subject to, and the
    token users put in their prompts later.
    """
    text = " ".join((caption or "").split())
    if not text:
        return template.format(trigger=trigger)
    if not trigger or _mentions(text, trigger):
        return text
    return f"{trigger}, {text}"


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *parts])


class LoraDataset:
    """Square crops of the user's images plus their captions; :meth:`sample` picks step ``s``'s item.

    Each epoch visits every image once in a seeded order; a horizontal flip (probability
    ``flip_p``) and caption dropout (empty caption with probability ``caption_dropout``, which
    keeps the model able to generate without the caption's words) are drawn per step.
    """

    def __init__(self, images: Sequence[TrainingImage], resolution: int, trigger_word: str = "TOK", *,
                 seed: int = 0, flip_p: float = 0.5, caption_dropout: float = 0.05,
                 template: str = DEFAULT_TEMPLATE) -> None:
        if not images:
            raise ValueError("no training images")
        if not 0.0 <= flip_p <= 1.0 or not 0.0 <= caption_dropout <= 1.0:
            raise ValueError("flip_p and caption_dropout must be probabilities")
        self.resolution = int(resolution)
        self.trigger_word = trigger_word
        self.seed = int(seed)
        self.flip_p = float(flip_p)
        self.caption_dropout = float(caption_dropout)
        self.images = [center_crop_resize(item.image, self.resolution) for item in images]
        self.captions = [caption_with_trigger(item.caption, trigger_word, template) for item in images]

    def __len__(self) -> int:
        return len(self.images)

    def order(self, epoch: int) -> list[int]:
        """The order images are visited in during ``epoch`` (a seeded permutation)."""
        return [int(i) for i in _rng(self.seed, 0, epoch).permutation(len(self))]

    def sample(self, position: int) -> Sample:
        """The ``position``-th sample of the run (``step × batch_size + i``); pure in (seed, position)."""
        epoch, offset = divmod(int(position), len(self))
        index = self.order(epoch)[offset]
        draws = _rng(self.seed, 1, int(position)).random(2)
        caption = "" if draws[1] < self.caption_dropout else self.captions[index]
        return Sample(index=index, flipped=bool(draws[0] < self.flip_p), caption=caption)

    def pixels(self, index: int, flipped: bool) -> Image.Image:
        """The cropped image ``index``, mirrored when ``flipped``."""
        image = self.images[index]
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else image


def to_tensor_array(image: Image.Image) -> np.ndarray:
    """An RGB image as a float32 ``(3, H, W)`` array in [-1, 1], the range diffusers' VAEs encode."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(array.transpose(2, 0, 1))
