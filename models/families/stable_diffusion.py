"""Stable Diffusion 1.x/2.x and SDXL: text-to-image, and image-to-image on the same components.

The checkpoint's ``model_index.json`` decides the text-to-image class (``StableDiffusionPipeline``
or ``StableDiffusionXLPipeline``); image-to-image uses the matching img2img class built with
``from_pipe``, which shares every module (no second copy of the weights).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from diffusers import (
    AutoPipelineForImage2Image,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from models.families.base import Family, as_rgb, common_kwargs, dtype_kwargs

logger = logging.getLogger(__name__)

_IMG2IMG: dict[type, type] = {
    StableDiffusionPipeline: StableDiffusionImg2ImgPipeline,
    StableDiffusionXLPipeline: StableDiffusionXLImg2ImgPipeline,
}


class StableDiffusionFamily(Family):
    name = "stable_diffusion"
    kind = "image"
    tasks = frozenset({"t2i", "i2i"})
    denoiser_attr = "unet"

    def map_request(self, request: Mapping[str, Any], task: str) -> dict[str, Any]:
        self.check_task(task)
        kwargs = common_kwargs(request)
        kwargs["negative_prompt"] = request.get("negative_prompt") or None
        width, height = int(request["width"]), int(request["height"])
        if task == "t2i":
            kwargs.update(width=width, height=height)
            return kwargs
        image = request.get("image")
        if image is None:
            raise ValueError("image-to-image needs an input image")
        image = as_rgb(image)
        # The img2img pipelines take no width/height: the output has the input's size, so the
        # input is resized to the requested size here.
        if isinstance(image, Image.Image) and image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        kwargs.update(image=image, strength=float(request.get("strength") or self.default_strength))
        return kwargs

    def pipeline_for_task(self, base: DiffusionPipeline, task: str) -> DiffusionPipeline:
        self.check_task(task)
        if task == "t2i":
            return base
        cls = _IMG2IMG.get(type(base))
        if cls is not None:
            return cls.from_pipe(base, **dtype_kwargs(base.dtype))
        return AutoPipelineForImage2Image.from_pipe(base)


FAMILY = StableDiffusionFamily()
