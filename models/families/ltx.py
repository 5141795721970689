"""LTX-Video: text-to-video (``LTXPipeline``) and image-to-video (``LTXImageToVideoPipeline`` built
with ``from_pipe`` on the same components).

LTX takes the frame rate as an input (``frame_rate``: it scales the temporal rotary embedding),
so ``fps`` is part of the call and requests batch together only at the same fps. Sizes must be
multiples of 32 and frame counts 8·k + 1 (the spec's limits say so).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from diffusers import DiffusionPipeline, LTXImageToVideoPipeline

from models.families.base import Family, as_rgb, common_kwargs, dtype_kwargs

logger = logging.getLogger(__name__)


class LTXFamily(Family):
    name = "ltx"
    kind = "video"
    tasks = frozenset({"t2v", "i2v"})
    denoiser_attr = "transformer"

    def map_request(self, request: Mapping[str, Any], task: str) -> dict[str, Any]:
        self.check_task(task)
        kwargs = common_kwargs(request)
        kwargs.update(negative_prompt=request.get("negative_prompt") or None,
                      width=int(request["width"]), height=int(request["height"]),
                      num_frames=int(request["num_frames"]), frame_rate=int(request.get("fps") or 24))
        if task == "i2v":
            image = request.get("image")
            if image is None:
                raise ValueError("image-to-video needs an input image")
            kwargs["image"] = as_rgb(image)
        return kwargs

    def pipeline_for_task(self, base: DiffusionPipeline, task: str) -> DiffusionPipeline:
        self.check_task(task)
        if task == "t2v":
            return base
        return LTXImageToVideoPipeline.from_pipe(base, **dtype_kwargs(base.dtype))


FAMILY = LTXFamily()
