"""What every pipeline family provides: request mapping, batching, loading and task pipelines.

A request reaching a family is our normalized dict (keys ``prompt``, ``negative_prompt``, ``width``,
``height``, ``steps``, ``guidance``, ``seed``, ``num_frames``, ``fps``, ``image`` (a PIL image by
then), ``strength``). :meth:`Family.map_request` turns one into the pipeline's call keyword
arguments and is pure, so it is unit-tested without any weights. :meth:`Family.batch_kwargs` merges
several mapped requests into the keyword arguments of one pipeline call: the keys in
``per_item_keys`` become lists (one entry per request), every other key must be equal across the
batch (that is what makes requests "compatible").
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline
from packaging.version import Version
from PIL import Image

logger = logging.getLogger(__name__)

# diffusers 0.42 and transformers 4.56 renamed from_pretrained's ``torch_dtype`` to ``dtype``
# (the old name still works there but warns).
_DIFFUSERS_DTYPE_KW = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
_TRANSFORMERS_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def dtype_kwargs(dtype: torch.dtype | dict[str, torch.dtype], library: str = "diffusers",
                 ) -> dict[str, torch.dtype | dict[str, torch.dtype]]:
    """``{"dtype": dtype}`` or ``{"torch_dtype": dtype}``, whichever the installed library takes."""
    return {_DIFFUSERS_DTYPE_KW if library == "diffusers" else _TRANSFORMERS_DTYPE_KW: dtype}


def image_fingerprint(image: Any) -> str:
    """A short stable id for an input image (PIL: its pixels; anything else: its repr)."""
    if isinstance(image, Image.Image):
        digest = hashlib.sha1(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
        return digest.hexdigest()[:16]
    return repr(image)


def as_rgb(image: Any) -> Any:
    """PIL images in RGB (uploads may be RGBA, P or L); anything else unchanged."""
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


def hashable(value: Any) -> Any:
    """A value usable in a batching key (images by fingerprint, lists as tuples)."""
    if isinstance(value, Image.Image):
        return ("image", image_fingerprint(value))
    if isinstance(value, list | tuple):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, hashable(v)) for k, v in value.items()))
    return value


class Family:
    """Base class; subclasses set the class variables and implement :meth:`map_request`."""

    name: ClassVar[str]
    kind: ClassVar[Literal["image", "video"]]
    tasks: ClassVar[frozenset[str]]
    denoiser_attr: ClassVar[str] = "transformer"
    """The attribute holding the denoiser (what torch.compile and LoRA target)."""
    per_item_keys: ClassVar[frozenset[str]] = frozenset({"prompt", "negative_prompt", "image"})
    """Call kwargs that may differ inside one batch (passed as lists, one entry per request)."""
    default_strength: ClassVar[float] = 0.8

    # --- pure parts ---------------------------------------------------------------------------

    def map_request(self, request: Mapping[str, Any], task: str) -> dict[str, Any]:
        """One normalized request -> this family's pipeline call kwargs (no generator, no callback)."""
        raise NotImplementedError

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"family {self.name} does not do {task} (it does {', '.join(sorted(self.tasks))})")

    def batch_kwargs(self, mapped: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Merge mapped requests into one call: per-item keys become lists, the rest must agree."""
        if not mapped:
            raise ValueError("empty batch")
        keys = set().union(*(m.keys() for m in mapped))
        out: dict[str, Any] = {}
        for key in sorted(keys):
            values = [m.get(key) for m in mapped]
            if key in self.per_item_keys:
                if key == "negative_prompt" and all(not v for v in values):
                    continue  # no request has one: let the pipeline use its own empty default
                out[key] = [v if v is not None else ("" if key == "negative_prompt" else v) for v in values]
            else:
                first = hashable(values[0])
                if any(hashable(v) != first for v in values[1:]):
                    raise ValueError(f"requests in one batch differ in {key!r}: {values!r}")
                out[key] = values[0]
        return out

    def shared_key(self, mapped: Mapping[str, Any]) -> tuple[Any, ...]:
        """The part of a mapped request that must be equal for two requests to share a call."""
        return tuple(sorted((k, hashable(v)) for k, v in mapped.items() if k not in self.per_item_keys))

    def expected_steps(self, kwargs: Mapping[str, Any], task: str) -> int:
        """Denoising steps one call with these kwargs runs (image-to-image runs ``steps × strength``)."""
        steps = int(kwargs["num_inference_steps"])
        strength = kwargs.get("strength")
        if strength is not None:
            return max(1, min(int(steps * float(strength)), steps))
        return steps

    # --- torch parts --------------------------------------------------------------------------

    def load(self, path: Path, torch_dtype: torch.dtype) -> DiffusionPipeline:
        """Load the checkpoint at ``path`` (a diffusers directory) on the CPU."""
        return DiffusionPipeline.from_pretrained(str(path), **dtype_kwargs(torch_dtype))

    def pipeline_for_task(self, base: DiffusionPipeline, task: str) -> DiffusionPipeline:
        """The pipeline that runs ``task``: ``base`` itself or one built from its components."""
        self.check_task(task)
        return base

    def denoiser(self, pipe: DiffusionPipeline) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attr)

    def outputs(self, result: Any) -> list[Any]:
        """Per-request outputs of a call made with ``output_type="pil"``: images, or lists of frames."""
        if self.kind == "image":
            return list(result.images)
        return [list(frames) for frames in result.frames]


def common_kwargs(request: Mapping[str, Any]) -> dict[str, Any]:
    """The keys every family maps the same way."""
    return {
        "prompt": request["prompt"],
        "num_inference_steps": int(request["steps"]),
        "guidance_scale": float(request["guidance"]),
    }
