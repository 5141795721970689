"""The GPU-only speed-ups, on a tiny Wan transformer on CUDA: fp8 quantization, SageAttention and
FlashAttention, an inductor (real) regional compile, and a full catalog load on the GPU.

Skipped without CUDA (the reason is printed with ``-rs``); ``python -m bench.gpu --with-tests`` runs
them. The tiny Wan of the catalog has a 12-wide attention head and 24-wide linears, which the
kernels refuse (sage needs head dim 64 or 128, fp8 matmuls multiples of 16), so these tests swap in
a transformer of the same class with 2 × 64 heads. Tolerances (mean |Δ| of pixels in [0, 1] against
the same pipeline in bf16 with SDPA, same seed): 0.02 for the kernels and fp8 (bf16/fp8 rounding on
random weights; two seeds differ by ~0.06), 1e-2 for compile (inductor fuses in another order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, WanTransformer3DModel

from models import optimizations
from models.catalog import Catalog
from models.loading import apply_plan, load_pipeline
from models.spec import Optimizations, StepCache
from tests.models.helpers import tiny_spec

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run python -m bench.gpu --with-tests)"),
]

KERNEL_MEAN = 0.02
COMPILE_MEAN = 0.01


def gpu_wan(tiny_dir: Path) -> Any:
    pipe = DiffusionPipeline.from_pretrained(str(tiny_dir / "tiny-wan"))
    config = dict(pipe.transformer.config)
    torch.manual_seed(7)
    pipe.transformer = WanTransformer3DModel(
        patch_size=tuple(config["patch_size"]), num_attention_heads=2, attention_head_dim=64,
        in_channels=16, out_channels=16, text_dim=config["text_dim"], freq_dim=256, ffn_dim=256,
        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    pipe.transformer.to(torch.bfloat16)
    pipe.text_encoder.to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda")


def frames(pipe: Any, policy: Any = None) -> np.ndarray:
    call: dict[str, Any] = {"prompt": "a cat", "width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 6,
                            "generator": torch.Generator("cpu").manual_seed(0), "output_type": "np"}
    if policy is not None:
        policy.before_call(pipe, call)
    return pipe(**call).frames[0]


@pytest.fixture(scope="module")
def plain(tiny_dir: Path) -> np.ndarray:
    return frames(gpu_wan(tiny_dir))


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_fp8_quantization_on_ada_or_hopper(tiny_dir: Path, plain: np.ndarray) -> None:
    if optimizations.cuda_capability() < optimizations.FP8_MIN_CAPABILITY:
        pytest.skip(f"fp8 needs compute capability >= 8.9, this GPU has {optimizations.cuda_capability()}")
    pytest.importorskip("torchao")
    pipe = gpu_wan(tiny_dir)
    applied, _ = apply_plan(pipe, ["sdpa", "quantize:fp8"], "cuda", "transformer", None, Optimizations())
    assert applied == ["sdpa", "quantize:fp8"]
    weight = pipe.transformer.blocks[0].ffn.net[0].proj.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    assert mean_abs(frames(pipe), plain) <= KERNEL_MEAN


def test_quantization_auto_picks_by_capability(tiny_dir: Path, catalog: Catalog) -> None:
    pytest.importorskip("torchao")
    spec = tiny_spec(catalog, "tiny-wan")
    spec = spec.model_copy(update={"optimizations": Optimizations(xformers=False, quantization="auto")})
    loaded = load_pipeline(spec, tiny_dir, device="cuda")
    fp8 = optimizations.cuda_capability() >= optimizations.FP8_MIN_CAPABILITY
    assert ("quantize:fp8" if fp8 else "quantize:int8_weight") in loaded.optimizations


@pytest.mark.parametrize(("backend", "module"), [("sage", "sageattention"), ("flash", "flash_attn")])
def test_attention_kernel_is_used_and_close(tiny_dir: Path, plain: np.ndarray, backend: str, module: str) -> None:
    if not optimizations.importable(module):
        pytest.skip(f"{module} is not installed (pip install 'cineweave[gpu]')")
    pipe = gpu_wan(tiny_dir)
    applied, _ = apply_plan(pipe, [backend], "cuda", "transformer", None, Optimizations())
    assert applied == [backend]
    names = {str(getattr(p, "_attention_backend", "")) for p in pipe.transformer.attn_processors.values()}
    assert all(backend in n.lower() for n in names), names
    assert mean_abs(frames(pipe), plain) <= KERNEL_MEAN


def test_inductor_regional_compile_on_cuda(tiny_dir: Path, plain: np.ndarray) -> None:
    pipe = gpu_wan(tiny_dir)
    applied, _ = apply_plan(pipe, ["sdpa", "torch_compile"], "cuda", "transformer", None, Optimizations())
    assert "compile:regional" in applied
    assert all(b._compiled_call_impl is not None for b in pipe.transformer.blocks)
    assert mean_abs(frames(pipe), plain) <= COMPILE_MEAN


def test_first_block_cache_on_cuda(tiny_dir: Path, plain: np.ndarray) -> None:
    pipe = gpu_wan(tiny_dir)
    opts = Optimizations(step_cache=StepCache(kind="first_block"))
    _, policy = apply_plan(pipe, ["sdpa", "step_cache:first_block"], "cuda", "transformer", None, opts)
    assert mean_abs(frames(pipe, policy), plain) <= KERNEL_MEAN


def test_catalog_tiny_sd_loads_on_cuda(tiny_dir: Path, catalog: Catalog) -> None:
    loaded = load_pipeline(tiny_spec(catalog, "tiny-sd"), tiny_dir)
    assert loaded.device == "cuda" and loaded.pipe.unet.device.type == "cuda"
    image = loaded.pipe("x", width=64, height=64, num_inference_steps=2, output_type="np").images[0]
    assert np.isfinite(image).all()
