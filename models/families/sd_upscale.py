"""Stable Diffusion x4 upscaler (``StableDiffusionUpscalePipeline``): task ``upscale`` only.

The UNet denoises latents at the input image's size, conditioned on the (noised, ``noise_level``)
low-resolution image concatenated to them (``in_channels`` 7 = 4 latent + 3 image channels); the
VAE decodes to 4× the input. The request's ``width``/``height`` are the OUTPUT size (the API
normalizes them so); when ``input_width``/``input_height`` are given the input image is resized to
them first, so the output has exactly the size that was priced.

diffusers 0.42's upscale pipeline still takes the legacy ``callback(step, timestep, latents)``
instead of ``callback_on_step_end``; :class:`UpscalePipeline` translates one to the other so the
generator's progress and cancellation work as for every other family.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionUpscalePipeline
from PIL import Image

from models.families.base import Family, as_rgb, common_kwargs, dtype_kwargs

logger = logging.getLogger(__name__)

SCALE = 4
"""The factor of the x4 upscaler: output = input × 4 on each side."""

DEFAULT_NOISE_LEVEL = 20


class UpscalePipeline(StableDiffusionUpscalePipeline):
    """The diffusers upscale pipeline with ``callback_on_step_end`` (see the module doc)."""

    def __call__(self, *args: Any, callback_on_step_end: Callable[..., Any] | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, **kwargs: Any) -> Any:
        if callback_on_step_end is not None:
            wanted = set(callback_on_step_end_tensor_inputs or ())

            def legacy(step: int, timestep: Any, latents: torch.Tensor) -> None:
                callback_on_step_end(self, step, timestep, {"latents": latents} if "latents" in wanted else {})

            kwargs.update(callback=legacy, callback_steps=1)
        return super().__call__(*args, **kwargs)


class SDUpscaleFamily(Family):
    name = "sd_upscale"
    kind = "image"
    tasks = frozenset({"upscale"})
    denoiser_attr = "unet"

    def map_request(self, request: Mapping[str, Any], task: str) -> dict[str, Any]:
        self.check_task(task)
        kwargs = common_kwargs(request)
        kwargs["prompt"] = request.get("prompt") or ""
        kwargs["negative_prompt"] = request.get("negative_prompt") or None
        image = request.get("image")
        if image is None:
            raise ValueError("upscale needs an input image")
        image = as_rgb(image)
        in_w, in_h = request.get("input_width"), request.get("input_height")
        if in_w and in_h and isinstance(image, Image.Image) and image.size != (int(in_w), int(in_h)):
            image = image.resize((int(in_w), int(in_h)), Image.Resampling.LANCZOS)
        kwargs.update(image=image, noise_level=int(request.get("noise_level") or DEFAULT_NOISE_LEVEL))
        return kwargs

    def shared_key(self, mapped: Mapping[str, Any]) -> tuple[Any, ...]:
        """Images are per request in one call, but they must have one size (one latent tensor)."""
        image = mapped.get("image")
        size = image.size if isinstance(image, Image.Image) else None
        return (*super().shared_key(mapped), ("image_size", size))

    def load(self, path: Path, torch_dtype: torch.dtype) -> DiffusionPipeline:
        return UpscalePipeline.from_pretrained(str(path), **dtype_kwargs(torch_dtype))


FAMILY = SDUpscaleFamily()
