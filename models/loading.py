"""Load a spec's pipeline: resolve the weights, pick device and dtype, apply the optimizations.

The decisions are pure functions (:func:`choose_dtype`, :func:`plan_optimizations`) tested without
a GPU; :func:`apply_optimizations` carries a plan out on a pipeline and :func:`load_pipeline` does
the whole thing. Source resolution and :func:`availability` live in :mod:`models.sources` (no
torch, so the API can use them) and are re-exported here.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from models.families.base import Family
from models.registry import get_family
from models.sources import (
    ModelUnavailable,
    S3Client,
    S3Config,
    availability,
    resolve_source,
)
from models.spec import ModelSpec

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedPipeline",
    "ModelUnavailable",
    "S3Config",
    "apply_optimizations",
    "availability",
    "choose_device",
    "choose_dtype",
    "load_pipeline",
    "plan_optimizations",
    "resolve_source",
    "xformers_available",
]

OPTIMIZATIONS = ("xformers", "sdpa", "cpu_offload", "vae_slicing", "vae_tiling", "attention_slicing",
                 "torch_compile")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- pure decisions ----------------------------------------------------------------------------

def choose_device(cuda: bool) -> str:
    return "cuda" if cuda else "cpu"


def choose_dtype(spec_dtype: str, cuda: bool, bf16_supported: bool) -> str:
    """The dtype to load in: the spec's on CUDA (``auto``: bf16 where supported, else fp16), and
    always float32 on the CPU (half precision there is slow or unsupported)."""
    if not cuda:
        return "float32"
    if spec_dtype == "auto":
        return "bfloat16" if bf16_supported else "float16"
    if spec_dtype == "bfloat16" and not bf16_supported:
        logger.warning("bfloat16 is not supported on this GPU: using float16")
        return "float16"
    return spec_dtype


def plan_optimizations(spec: ModelSpec, cuda: bool, xformers_available: bool) -> list[str]:
    """Which optimizations to apply, in order, from the spec and what the machine has.

    Attention is ``xformers`` when the spec asks, CUDA is there and xformers imports; otherwise
    ``sdpa`` (PyTorch's scaled-dot-product attention, diffusers' default: nothing to apply).
    CPU offload needs CUDA. VAE slicing/tiling, attention slicing and torch.compile work anywhere.
    """
    opt = spec.optimizations
    plan = ["xformers" if (opt.xformers and cuda and xformers_available) else "sdpa"]
    if opt.cpu_offload and cuda:
        plan.append("cpu_offload")
    if opt.vae_slicing:
        plan.append("vae_slicing")
    if opt.vae_tiling:
        plan.append("vae_tiling")
    if opt.attention_slicing:
        plan.append("attention_slicing")
    if opt.torch_compile:
        plan.append("torch_compile")
    return plan


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


# --- applying ----------------------------------------------------------------------------------

def apply_optimizations(pipe: DiffusionPipeline, plan: list[str], device: str, denoiser_attr: str,
                        compile_kwargs: dict[str, Any] | None = None) -> list[str]:
    """Apply ``plan`` and place the pipeline on ``device`` (or hook CPU offload); return what was
    applied. Failures of optional speedups (xformers, compile) are logged, never fatal."""
    applied: list[str] = []
    if "cpu_offload" in plan:
        pipe.enable_model_cpu_offload(device=device)
        applied.append("cpu_offload")
    else:
        pipe.to(device)
    if "xformers" in plan:
        try:
            pipe.enable_xformers_memory_efficient_attention()
            applied.append("xformers")
        except Exception as exc:  # xformers built for another torch/CUDA, no kernel for this GPU, …
            logger.warning("xformers could not be enabled (%s): using PyTorch SDPA", exc)
            applied.append("sdpa")
    elif "sdpa" in plan:
        applied.append("sdpa")
    vae = getattr(pipe, "vae", None)
    for name, method in (("vae_slicing", "enable_slicing"), ("vae_tiling", "enable_tiling")):
        if name in plan:
            if vae is not None and hasattr(vae, method):
                getattr(vae, method)()
                applied.append(name)
            else:
                logger.warning("%s requested but %s has no %s", name, type(vae).__name__, method)
    if "attention_slicing" in plan and hasattr(pipe, "enable_attention_slicing"):
        pipe.enable_attention_slicing()
        applied.append("attention_slicing")
    if "torch_compile" in plan:
        denoiser = getattr(pipe, denoiser_attr, None)
        if denoiser is None:
            logger.warning("torch_compile requested but the pipeline has no %s", denoiser_attr)
        else:
            # Module.compile() compiles in place: the attribute keeps its class, so LoRA loading
            # and from_pipe still see a UNet/transformer (a torch.compile() wrapper would not).
            denoiser.compile(**(compile_kwargs or {}))
            applied.append("torch_compile")
    return applied


@dataclass
class LoadedPipeline:
    pipe: DiffusionPipeline
    family: Family
    path: Path
    device: str
    dtype: str
    optimizations: list[str] = field(default_factory=list)


def _hf_download(repo: str, revision: str | None, cache_dir: Path | None) -> Path:
    # DiffusionPipeline.download fetches only what model_index.json needs (safetensors, no
    # duplicate fp32/fp16/onnx/flax copies), unlike a plain snapshot of the whole repo.
    return Path(DiffusionPipeline.download(repo, revision=revision, cache_dir=cache_dir,
                                           use_safetensors=True))


def load_pipeline(spec: ModelSpec, tiny_dir: Path | None = None, cache_dir: Path | None = None, *,
                  hf_cache_dir: Path | None = None, s3: S3Config | None = None,
                  s3_client: S3Client | None = None, allow_download: bool = False,
                  device: str | None = None, compile_kwargs: dict[str, Any] | None = None,
                  ) -> LoadedPipeline:
    """Resolve, load, place and optimize the spec's base pipeline.

    ``device`` None means CUDA when available, else CPU. ``allow_download`` lets a Hugging Face
    source download when missing from the cache (never when ``HF_HUB_OFFLINE`` is set). Raises
    :class:`ModelUnavailable` when the weights are not there.
    """
    if not spec.family:
        raise ModelUnavailable(f"{spec.id} has no family (remote only?)")
    family = get_family(spec.family)
    path = resolve_source(spec, tiny_dir, cache_dir, hf_cache_dir=hf_cache_dir, s3=s3, s3_client=s3_client,
                          hf_download=_hf_download if allow_download else None)
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    device = device or choose_device(cuda)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    dtype = choose_dtype(spec.dtype, cuda, bf16)
    pipe = family.load(path, _DTYPES[dtype])
    if spec.scheduler:
        import diffusers

        scheduler_cls = getattr(diffusers, spec.scheduler, None)
        if scheduler_cls is None:
            raise ValueError(f"{spec.id}: unknown scheduler {spec.scheduler!r}")
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    plan = plan_optimizations(spec, cuda, xformers_available())
    applied = apply_optimizations(pipe, plan, device, family.denoiser_attr, compile_kwargs)
    logger.info("loaded %s from %s on %s (%s): %s", spec.id, path, device, dtype, ", ".join(applied))
    return LoadedPipeline(pipe=pipe, family=family, path=path, device=device, dtype=dtype,
                          optimizations=applied)
