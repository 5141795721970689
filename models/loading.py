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

from models import optimizations
from models.families.base import Family
from models.optimizations import CallPolicy
from models.registry import get_family
from models.sources import (
    ModelUnavailable,
    S3Client,
    S3Config,
    availability,
    resolve_source,
)
from models.spec import ModelSpec, Optimizations

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedPipeline",
    "ModelUnavailable",
    "S3Config",
    "apply_optimizations",
    "apply_plan",
    "availability",
    "choose_device",
    "choose_dtype",
    "load_pipeline",
    "plan_optimizations",
    "resolve_source",
    "xformers_available",
]

OPTIMIZATIONS = ("xformers", "sdpa", "sage", "flash", "cpu_offload", "quantize:int8_weight", "quantize:fp8",
                 "step_cache:first_block", "step_cache:taylorseer", "step_cache:magcache", "channels_last",
                 "vae_slicing", "vae_tiling", "vae_tiling_auto", "attention_slicing", "torch_compile")
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


def plan_optimizations(spec: ModelSpec, cuda: bool, xformers_available: bool, *,
                       attention_available: dict[str, bool] | None = None,
                       capability: tuple[int, int] | None = None, torchao: bool | None = None) -> list[str]:
    """Which optimizations to apply, in order, from the spec and what the machine has.

    Attention: ``sage``/``flash`` when the spec's ``attention_backend`` asks, CUDA is there and the
    package imports (:func:`models.optimizations.choose_attention_backend`); else ``xformers`` when
    the spec asks, CUDA is there and xformers imports; otherwise ``sdpa`` (PyTorch's
    scaled-dot-product attention, diffusers' default: nothing to apply). CPU offload needs CUDA.
    Quantization is ``quantize:fp8`` on CUDA capability >= 8.9, else ``quantize:int8_weight``.
    ``vae_tiling_auto`` tiles per call above the spec's frame size. Step caches, channels-last,
    VAE slicing/tiling, attention slicing and torch.compile work anywhere.
    """
    opt = spec.optimizations
    if attention_available is None:
        attention_available = {name: optimizations.importable(mod)
                               for name, mod in optimizations.ATTENTION_PACKAGES.items()}
    backend = optimizations.choose_attention_backend(opt.attention_backend, cuda, attention_available)
    if backend != "sdpa":
        plan = [backend]
    else:
        plan = ["xformers" if (opt.xformers and cuda and xformers_available) else "sdpa"]
    if opt.cpu_offload and cuda:
        plan.append("cpu_offload")
    if opt.quantization != "none":
        quant = optimizations.choose_quantization(
            opt.quantization, capability if cuda else None,
            optimizations.importable("torchao") if torchao is None else torchao)
        if quant:
            plan.append(f"quantize:{quant}")
    if opt.step_cache is not None:
        plan.append(f"step_cache:{opt.step_cache.kind}")
    if opt.channels_last:
        plan.append("channels_last")
    if opt.vae_slicing:
        plan.append("vae_slicing")
    if opt.vae_tiling is True:
        plan.append("vae_tiling")
    elif opt.vae_tiling == "auto":
        plan.append("vae_tiling_auto")
    if opt.attention_slicing:
        plan.append("attention_slicing")
    if opt.torch_compile:
        plan.append("torch_compile")
    return plan


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


# --- applying ----------------------------------------------------------------------------------

def apply_optimizations(pipe: DiffusionPipeline, plan: list[str], device: str, denoiser_attr: str,
                        compile_kwargs: dict[str, Any] | None = None,
                        options: Optimizations | None = None) -> list[str]:
    """Apply ``plan`` and place the pipeline on ``device`` (or hook CPU offload); return what was
    applied (see :func:`apply_plan`)."""
    return apply_plan(pipe, plan, device, denoiser_attr, compile_kwargs, options)[0]


def apply_plan(pipe: DiffusionPipeline, plan: list[str], device: str, denoiser_attr: str,
               compile_kwargs: dict[str, Any] | None = None, options: Optimizations | None = None,
               ) -> tuple[list[str], optimizations.CallPolicy]:
    """Apply ``plan``; return what was applied and the per-call policy (auto VAE tiling, a magnitude
    cache's step count). Failures of optional speed-ups (xformers, attention kernels, compile) are
    logged, never fatal; a step cache on a denoiser without support is a ValueError (a config error)."""
    options = options or Optimizations()
    policy = optimizations.CallPolicy(options=options)
    applied: list[str] = []
    denoiser = getattr(pipe, denoiser_attr, None)
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
    elif "sage" in plan or "flash" in plan:
        backend = "sage" if "sage" in plan else "flash"
        try:
            ok = denoiser is not None and optimizations.apply_attention_backend(denoiser, backend)
        except Exception as exc:  # kernel built for another torch/CUDA, head dim or dtype unsupported, …
            logger.warning("attention backend %s could not be set (%s): using PyTorch SDPA", backend, exc)
            ok = False
        applied.append(backend if ok else "sdpa")
    elif "sdpa" in plan:
        applied.append("sdpa")
    for step in plan:
        if step.startswith("quantize:"):
            if denoiser is None:
                logger.warning("%s requested but the pipeline has no %s", step, denoiser_attr)
                continue
            optimizations.quantize_denoiser(denoiser, step.split(":", 1)[1])
            applied.append(step)
    for step in plan:
        if step.startswith("step_cache:") and options.step_cache is not None:
            if denoiser is None:
                raise ValueError(f"{step} requested but the pipeline has no {denoiser_attr}")
            config = optimizations.apply_step_cache(denoiser, options.step_cache)
            if options.step_cache.kind == "magcache":
                policy.mag_config, policy.mag_ratios = config, config.mag_ratios.clone()
            applied.append(step)
    if "channels_last" in plan:
        if optimizations.apply_channels_last(pipe):
            applied.append("channels_last")
    vae = getattr(pipe, "vae", None)
    for name, method in (("vae_slicing", "enable_slicing"), ("vae_tiling", "enable_tiling"),
                         ("vae_tiling_auto", "enable_tiling")):
        if name in plan:
            if vae is not None and hasattr(vae, method):
                if name != "vae_tiling_auto":
                    getattr(vae, method)()
                applied.append(name)
            else:
                logger.warning("%s requested but %s has no %s", name, type(vae).__name__, method)
    if "vae_tiling_auto" not in applied:
        policy.options = options.model_copy(update={"vae_tiling": False})
    if "attention_slicing" in plan and hasattr(pipe, "enable_attention_slicing"):
        pipe.enable_attention_slicing()
        applied.append("attention_slicing")
    if "torch_compile" in plan:
        if denoiser is None:
            logger.warning("torch_compile requested but the pipeline has no %s", denoiser_attr)
        else:
            # Module.compile() compiles in place: the attribute keeps its class, so LoRA loading
            # and from_pipe still see a UNet/transformer (a torch.compile() wrapper would not).
            mode = optimizations.compile_denoiser(denoiser, options.compile_mode, compile_kwargs)
            applied.extend(["torch_compile", f"compile:{mode}"])
    return applied, policy


@dataclass
class LoadedPipeline:
    pipe: DiffusionPipeline
    family: Family
    path: Path
    device: str
    dtype: str
    optimizations: list[str] = field(default_factory=list)
    policy: CallPolicy = field(default_factory=CallPolicy)
    """Per-call adjustments the optimizations need (auto VAE tiling, a magnitude cache's steps)."""

    def before_call(self, pipe: DiffusionPipeline, call: dict[str, Any]) -> None:
        """Call right before ``pipe(**call)`` (``pipe``: this one or a task pipeline built from it)."""
        self.policy.before_call(pipe, call)


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
    capability = optimizations.cuda_capability() if cuda and torch.cuda.is_available() else None
    plan = plan_optimizations(spec, cuda, xformers_available(), capability=capability)
    applied, policy = apply_plan(pipe, plan, device, family.denoiser_attr, compile_kwargs, spec.optimizations)
    logger.info("loaded %s from %s on %s (%s): %s", spec.id, path, device, dtype, ", ".join(applied))
    return LoadedPipeline(pipe=pipe, family=family, path=path, device=device, dtype=dtype,
                          optimizations=applied, policy=policy)
