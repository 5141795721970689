"""FLUX.1 (schnell and dev): text-to-image, and image-to-image via ``FluxImg2ImgPipeline.from_pipe``.

Flux has no classifier-free guidance with a negative prompt in its distilled variants, so
``negative_prompt`` is not passed; ``guidance`` maps to ``guidance_scale`` (the distilled guidance
embedding of dev; schnell ignores it). ``max_sequence_length`` (256 for schnell, 512 for dev) comes
from the spec's ``pipeline_kwargs``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from diffusers import DiffusionPipeline, FluxImg2ImgPipeline

from models.families.base import Family, as_rgb, common_kwargs, dtype_kwargs

logger = logging.getLogger(__name__)


class FluxFamily(Family):
    name = "flux"
    kind = "image"
    tasks = frozenset({"t2i", "i2i"})
    denoiser_attr = "transformer"

    def map_request(self, request: Mapping[str, Any], task: str) -> dict[str, Any]:
        self.check_task(task)
        kwargs = common_kwargs(request)
        kwargs.update(width=int(request["width"]), height=int(request["height"]))
        if task == "i2i":
            image = request.get("image")
            if image is None:
                raise ValueError("image-to-image needs an input image")
            kwargs.update(image=as_rgb(image), strength=float(request.get("strength") or self.default_strength))
        return kwargs

    def expected_steps(self, kwargs: Mapping[str, Any], task: str) -> int:
        # FluxImg2ImgPipeline skips int(steps - steps × strength) steps (SD skips steps - int(steps × strength)).
        steps = int(kwargs["num_inference_steps"])
        strength = kwargs.get("strength")
        if strength is None:
            return steps
        return max(1, steps - int(max(steps - steps * float(strength), 0)))

    def pipeline_for_task(self, base: DiffusionPipeline, task: str) -> DiffusionPipeline:
        self.check_task(task)
        if task == "t2i":
            return base
        return FluxImg2ImgPipeline.from_pipe(base, **dtype_kwargs(base.dtype))


FAMILY = FluxFamily()
