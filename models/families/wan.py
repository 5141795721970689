"""Wan 2.1: text-to-video (``WanPipeline``) and image-to-video (``WanImageToVideoPipeline``).

The two are different checkpoints (the image-to-video transformer takes extra condition channels
and CLIP image features), so the checkpoint decides the task: a t2v checkpoint cannot do i2v.
One image-to-video call takes one input image for the whole batch (the pipeline repeats its
embedding), so ``image`` is not a per-item key here: requests batch together only when they share
the same input image. With half precision the VAE and the image encoder are loaded in float32, as
the Wan model cards recommend (their decode is unstable in fp16/bf16).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import DiffusionPipeline, WanImageToVideoPipeline, WanPipeline

from models.families.base import Family, as_rgb, common_kwargs, dtype_kwargs

logger = logging.getLogger(__name__)


def _ensure_ftfy() -> None:
    """diffusers 0.42's Wan image-to-video pipeline calls ``ftfy.fix_text`` without checking that
    ftfy is installed (the text-to-video one checks). ftfy is a project dependency; if it is missing
    anyway, stand in an identity ``fix_text`` (prompt mojibake is then left as is) instead of failing
    every i2v request with a NameError."""
    try:
        import ftfy  # noqa: F401
    except ImportError:
        from diffusers.pipelines.wan import pipeline_wan_i2v

        if not hasattr(pipeline_wan_i2v, "ftfy"):
            logger.warning("ftfy is not installed: Wan i2v prompts are not unicode-fixed (pip install ftfy)")
            pipeline_wan_i2v.ftfy = SimpleNamespace(fix_text=lambda text: text)


class WanFamily(Family):
    name = "wan"
    kind = "video"
    tasks = frozenset({"t2v", "i2v"})
    denoiser_attr = "transformer"
    per_item_keys = frozenset({"prompt", "negative_prompt"})

    def map_request(self, request: Mapping[str, Any], task: str) -> dict[str, Any]:
        self.check_task(task)
        kwargs = common_kwargs(request)
        kwargs.update(negative_prompt=request.get("negative_prompt") or None,
                      width=int(request["width"]), height=int(request["height"]),
                      num_frames=int(request["num_frames"]))
        if task == "i2v":
            image = request.get("image")
            if image is None:
                raise ValueError("image-to-video needs an input image")
            kwargs["image"] = as_rgb(image)  # the pipeline resizes it to width × height
        return kwargs

    def load(self, path: Path, torch_dtype: torch.dtype) -> DiffusionPipeline:
        if torch_dtype == torch.float32:
            return super().load(path, torch_dtype)
        # A per-component dtype mapping: everything in torch_dtype but the VAE and CLIP encoder.
        dtypes = {"default": torch_dtype, "vae": torch.float32, "image_encoder": torch.float32}
        return DiffusionPipeline.from_pretrained(str(path), **dtype_kwargs(dtypes))

    def pipeline_for_task(self, base: DiffusionPipeline, task: str) -> DiffusionPipeline:
        self.check_task(task)
        if task == "i2v":
            if not isinstance(base, WanImageToVideoPipeline):
                raise ValueError(f"this Wan checkpoint ({type(base).__name__}) is text-to-video only; "
                                 "image-to-video needs an I2V checkpoint")
            _ensure_ftfy()
        elif not isinstance(base, WanPipeline):
            raise ValueError(f"this Wan checkpoint ({type(base).__name__}) needs an input image (i2v)")
        return base


FAMILY = WanFamily()
