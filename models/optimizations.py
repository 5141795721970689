"""The field's speed-ups, applied to a loaded pipeline: step caches, regional compile, channels-last,
torchao weight quantization, attention backends and size-dependent VAE tiling.

Decisions are pure functions of the spec's :class:`~models.spec.Optimizations` and what the machine
has (:func:`choose_attention_backend`, :func:`choose_quantization`, :func:`tiling_wanted`), tested
without a GPU. The optional GPU packages (sageattention, flash-attn, xformers, torchao) are never
imported here unless the spec asks for them and the device can run them: availability is checked
with :func:`importlib.util.find_spec`, which does not import.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from models.spec import Optimizations, StepCache

logger = logging.getLogger(__name__)

ATTENTION_PACKAGES = {"sage": "sageattention", "flash": "flash_attn"}
"""The importable module each optional attention backend needs (diffusers' backend names: sage, flash)."""

TAYLORSEER_ATTENTION_PATTERN = (
    r"(?:blocks|transformer_blocks|single_transformer_blocks|temporal_transformer_blocks)\.\d+\.attn\d*")
"""The modules a TaylorSeer cache forecasts: every repeated block's attention (Wan, Flux, LTX names)."""

FP8_MIN_CAPABILITY = (8, 9)
"""fp8 matmuls need Ada (8.9) or Hopper (9.0) and later."""


def importable(module: str) -> bool:
    """Whether ``module`` could be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_capability() -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


# --- pure decisions ----------------------------------------------------------------------------

def choose_attention_backend(requested: str, cuda: bool, available: Mapping[str, bool]) -> str:
    """The attention backend to use: ``sdpa`` (PyTorch's scaled-dot-product attention) unless the spec
    asks for ``sage``/``flash`` (``auto``: sage, then flash), CUDA is there and the package imports.
    Falls back to ``sdpa`` with a log line otherwise."""
    if requested == "sdpa":
        return "sdpa"
    candidates = ["sage", "flash"] if requested == "auto" else [requested]
    if not cuda:
        if requested != "auto":
            logger.info("attention backend %s needs CUDA: using SDPA", requested)
        return "sdpa"
    for name in candidates:
        if available.get(name):
            return name
    logger.info("attention backend %s: %s not importable, using SDPA", requested,
                " / ".join(ATTENTION_PACKAGES[c] for c in candidates))
    return "sdpa"


def choose_quantization(requested: str, capability: tuple[int, int] | None, torchao: bool) -> str | None:
    """``fp8`` (torchao float8 dynamic-activation, float8 weights) on CUDA with compute capability
    >= 8.9, else ``int8_weight`` (torchao int8 weight-only, which works anywhere, the CPU included);
    ``None`` for no quantization or without torchao (logged)."""
    if requested == "none":
        return None
    if not torchao:
        logger.warning("quantization %s requested but torchao is not installed (pip install 'cineweave[gpu]'): "
                       "running unquantized", requested)
        return None
    fp8_ok = capability is not None and capability >= FP8_MIN_CAPABILITY
    if requested in ("fp8", "auto") and fp8_ok:
        return "fp8"
    if requested == "fp8":
        logger.warning("fp8 needs CUDA compute capability >= 8.9 (this device: %s): using int8 weight-only",
                       capability or "cpu")
    return "int8_weight"


def tiling_wanted(opt: Optimizations, width: int | None, height: int | None) -> bool:
    """Whether one call's VAE decode should tile: always/never when the spec says so, else (``auto``)
    when a frame is larger than ``vae_tiling_min_pixels``."""
    if opt.vae_tiling is True or opt.vae_tiling is False:
        return bool(opt.vae_tiling)
    if not width or not height:
        return False
    return width * height > opt.vae_tiling_min_pixels


# --- applying ----------------------------------------------------------------------------------

def supports_step_cache(denoiser: torch.nn.Module) -> bool:
    from diffusers.models.cache_utils import CacheMixin

    return isinstance(denoiser, CacheMixin)


def step_cache_config(cfg: StepCache, num_inference_steps: int = 28) -> Any:
    """The diffusers hook config for ``cfg``."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if cfg.kind == "first_block":
        return FirstBlockCacheConfig(threshold=cfg.threshold if cfg.threshold is not None else 0.05)
    if cfg.kind == "taylorseer":
        # Taylor factors in float32: bf16 factors lose the small differences on which the forecast rests.
        # diffusers' default patterns (``^blocks.*attn`` full-matched) miss Wan's attn1/attn2: name
        # every block family's attention modules explicitly.
        return TaylorSeerCacheConfig(cache_interval=cfg.cache_interval,
                                     disable_cache_before_step=cfg.disable_cache_before_step,
                                     max_order=cfg.max_order, taylor_factors_dtype=torch.float32,
                                     cache_identifiers=[TAYLORSEER_ATTENTION_PATTERN])
    ratios: Any = cfg.mag_ratios
    if ratios == "flux":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        ratios = FLUX_MAG_RATIOS
    return MagCacheConfig(threshold=cfg.threshold if cfg.threshold is not None else 0.06,
                          max_skip_steps=cfg.max_skip_steps, retention_ratio=cfg.retention_ratio,
                          num_inference_steps=num_inference_steps, mag_ratios=torch.as_tensor(ratios).float())


def apply_step_cache(denoiser: torch.nn.Module, cfg: StepCache) -> Any:
    """Register the step cache's hooks on the denoiser; returns the diffusers config (kept so a
    magnitude cache can follow each call's step count). Raises ValueError where unsupported."""
    if not supports_step_cache(denoiser):
        raise ValueError(f"step_cache {cfg.kind}: {type(denoiser).__name__} does not support diffusers' "
                         "step caches (transformer families only)")
    config = step_cache_config(cfg)
    denoiser.enable_cache(config)
    return config


def apply_attention_backend(denoiser: torch.nn.Module, backend: str) -> bool:
    """Dispatch the denoiser's attention to ``backend`` (diffusers' ``set_attention_backend``).

    Only processors built on diffusers' attention dispatcher honour it (Wan, Flux, LTX); a UNet's
    ``AttnProcessor2_0`` ignores it, so there it is reported not applied and SDPA stays."""
    processors = getattr(denoiser, "attn_processors", {}) or {}
    if not any(hasattr(p, "_attention_backend") for p in processors.values()):
        logger.info("attention backend %s: %s's processors do not dispatch by backend, keeping SDPA",
                    backend, type(denoiser).__name__)
        return False
    denoiser.set_attention_backend(backend)
    return True


def quantize_denoiser(denoiser: torch.nn.Module, kind: str) -> None:
    """torchao weight quantization of the denoiser's linear layers, in place."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if kind == "fp8":
        # fp8 matmuls (torch._scaled_mm) need both dimensions divisible by 16: other linears stay.
        quantize_(denoiser, Float8DynamicActivationFloat8WeightConfig(), filter_fn=_fp8_friendly)
    else:
        quantize_(denoiser, Int8WeightOnlyConfig())


def _fp8_friendly(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def compile_denoiser(denoiser: torch.nn.Module, mode: str, compile_kwargs: Mapping[str, Any] | None) -> str:
    """Compile in place: ``regional`` compiles each repeated block (diffusers'
    ``compile_repeated_blocks``: the blocks are one graph compiled once, so compile time is a
    fraction of a full compile); ``full`` the whole module. ``Module.compile`` keeps the class and
    the module tree, so LoRA loading and hot-swapping into fixed slots still find their layers.
    Returns the mode used (regional falls back to full where the model declares no repeated blocks)."""
    kwargs = dict(compile_kwargs or {})
    if mode == "regional" and getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks(**kwargs)
        return "regional"
    if mode == "regional":
        logger.info("%s declares no repeated blocks: compiling the whole module", type(denoiser).__name__)
    denoiser.compile(**kwargs)
    return "full"


def apply_channels_last(pipe: Any) -> list[str]:
    """Channels-last memory format for the conv-heavy 2D modules (UNet, image VAE): convolutions pick
    their faster NHWC kernels. 3D video VAEs are left as they are. Returns the modules converted."""
    done = []
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is None or not isinstance(module, torch.nn.Module):
            continue
        if any(isinstance(m, torch.nn.Conv3d) for m in module.modules()):
            logger.info("channels_last: %s is a 3D (video) module, left as is", name)
            continue
        module.to(memory_format=torch.channels_last)
        done.append(name)
    return done


def _call_size(call: Mapping[str, Any]) -> tuple[int | None, int | None]:
    width, height = call.get("width"), call.get("height")
    if width and height:
        return int(width), int(height)
    image = call.get("image")
    size = getattr(image, "size", None)
    if isinstance(size, tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None, None


@dataclass
class CallPolicy:
    """What must change per pipeline call: VAE tiling by frame size, a magnitude cache's step count."""

    options: Optimizations = field(default_factory=Optimizations)
    mag_config: Any = None
    mag_ratios: Any = None
    tiled_calls: int = 0

    def before_call(self, pipe: Any, call: Mapping[str, Any]) -> None:
        vae = getattr(pipe, "vae", None)
        if self.options.vae_tiling == "auto" and vae is not None and hasattr(vae, "enable_tiling"):
            width, height = _call_size(call)
            if tiling_wanted(self.options, width, height):
                vae.enable_tiling()
                self.tiled_calls += 1
            else:
                vae.disable_tiling()
        steps = call.get("num_inference_steps")
        if self.mag_config is not None and steps and int(steps) != self.mag_config.num_inference_steps:
            from diffusers.hooks.mag_cache import nearest_interp

            # The hooks read the config at every step: the ratios must be as long as this call's steps.
            self.mag_config.num_inference_steps = int(steps)
            self.mag_config.mag_ratios = nearest_interp(self.mag_ratios, int(steps))


class SkipCounter:
    """Counts how often the denoiser ran its last repeated block's first attention projection,
    against how often the denoiser was called: a step cache that skipped (or forecast) a step did
    not run it. Attach before a run; :attr:`skip_rate` is the skipped share of denoiser calls."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.calls = 0
        self.computed = 0
        probe = _last_block_probe(denoiser)
        if probe is None:
            raise ValueError(f"{type(denoiser).__name__} has no repeated block with an attention projection")
        self._handles = [denoiser.register_forward_pre_hook(self._on_call),
                         probe.register_forward_pre_hook(self._on_compute)]

    def _on_call(self, *_: Any) -> None:
        self.calls += 1

    def _on_compute(self, *_: Any) -> None:
        self.computed += 1

    @property
    def skip_rate(self) -> float:
        return 0.0 if not self.calls else max(0.0, 1.0 - self.computed / self.calls)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _last_block_probe(denoiser: torch.nn.Module) -> torch.nn.Module | None:
    blocks = [m for name in ("blocks", "transformer_blocks", "single_transformer_blocks")
              if isinstance(m := getattr(denoiser, name, None), torch.nn.ModuleList) and len(m)]
    if not blocks:
        return None
    last = blocks[-1][-1]
    for name, module in last.named_modules():
        if name.endswith("to_q"):
            return module
    return None
