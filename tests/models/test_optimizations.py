"""The field's speed-ups on the tiny models: each is applied (the hook, module or processor is there)
and keeps the output close to the plain pipeline's (same seed).

Tolerances are on the mean absolute pixel difference (pixels in [0, 1]). The tiny models have random
weights, so their output is structured noise; two seeds of the same tiny-wan prompt differ by about
0.065 (tiny-sd: 0.17), measured in :func:`test_seed_control_is_far_above_the_tolerances`. A tolerance
well under that separates "the same picture, slightly perturbed" from "another picture":

- exact rewrites (regional compile with the eager backend, channels-last, the ``native`` attention
  backend): equal up to float32 reordering, max |Δ| ≤ 1e-4;
- step caches (they reuse a block's residual from an earlier step): mean |Δ| ≤ 0.01, measured
  1.6e-5 (first block), 1.1e-3 (TaylorSeer), 4.6e-3 / 6.8e-3 (MagCache, flat / FLUX ratios);
- int8 weight-only quantization (per-channel int8 weights, float activations): mean |Δ| ≤ 0.01,
  measured 2.5e-3;
- tiled VAE decode (overlapping tiles blended at the seams): mean |Δ| ≤ 0.03, measured 0.017.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from models import optimizations
from models.adapters import LoraAdapter
from models.catalog import Catalog, CatalogError
from models.generator import Generator
from models.loading import apply_plan, load_pipeline, plan_optimizations
from models.optimizations import (
    CallPolicy,
    SkipCounter,
    choose_attention_backend,
    choose_quantization,
    tiling_wanted,
)
from models.spec import Optimizations, StepCache, load_spec_file
from tests.models.helpers import tiny_spec
from tests.models.test_generator import _make_lora, pixels
from tests.models.test_loading import spec_with

EXACT = 1e-4
STEP_CACHE_MEAN = 0.01
INT8_MEAN = 0.01
TILING_MEAN = 0.03
REPO = Path(__file__).resolve().parents[2]
GPU_MODULES = ("xformers", "sageattention", "flash_attn", "torchao")


def wan_frames(pipe: Any, policy: CallPolicy | None = None, seed: int = 0, steps: int = 8) -> np.ndarray:
    call: dict[str, Any] = {"prompt": "a cat", "width": 64, "height": 64, "num_frames": 9, "num_inference_steps": steps,
                            "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    if policy is not None:
        policy.before_call(pipe, call)
    return pipe(**call).frames[0]


def sd_image(pipe: Any, seed: int = 0, size: int = 64, policy: CallPolicy | None = None) -> np.ndarray:
    call: dict[str, Any] = {"prompt": "a cat", "width": size, "height": size, "num_inference_steps": 4,
                            "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    if policy is not None:
        policy.before_call(pipe, call)
    return pipe(**call).images[0]


def fresh(tiny_dir: Path, name: str) -> Any:
    pipe = DiffusionPipeline.from_pretrained(str(tiny_dir / name))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan_plain(tiny_dir: Path) -> np.ndarray:
    return wan_frames(fresh(tiny_dir, "tiny-wan"))


@pytest.fixture(scope="module")
def sd_plain(tiny_dir: Path) -> np.ndarray:
    return sd_image(fresh(tiny_dir, "tiny-sd"))


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_seed_control_is_far_above_the_tolerances(tiny_dir: Path, wan_plain: np.ndarray,
                                                  sd_plain: np.ndarray) -> None:
    """The tolerances mean something: another seed is many times further away than any of them."""
    assert mean_abs(wan_plain, wan_frames(fresh(tiny_dir, "tiny-wan"), seed=1)) > 4 * max(STEP_CACHE_MEAN, INT8_MEAN)
    assert mean_abs(sd_plain, sd_image(fresh(tiny_dir, "tiny-sd"), seed=1)) > 4 * TILING_MEAN


# --- pure decisions ----------------------------------------------------------------------------

def test_choose_attention_backend(caplog: pytest.LogCaptureFixture) -> None:
    both = {"sage": True, "flash": True}
    assert choose_attention_backend("sdpa", True, both) == "sdpa"
    assert choose_attention_backend("sage", True, both) == "sage"
    assert choose_attention_backend("flash", True, both) == "flash"
    assert choose_attention_backend("auto", True, both) == "sage"
    assert choose_attention_backend("auto", True, {"sage": False, "flash": True}) == "flash"
    with caplog.at_level(logging.INFO, logger="models.optimizations"):
        assert choose_attention_backend("sage", True, {"sage": False, "flash": True}) == "sdpa"
        assert "sageattention not importable, using SDPA" in caplog.text
        assert choose_attention_backend("flash", False, both) == "sdpa"  # no CUDA
        assert "needs CUDA" in caplog.text


def test_choose_quantization_by_device(caplog: pytest.LogCaptureFixture) -> None:
    assert choose_quantization("none", (9, 0), True) is None
    assert choose_quantization("fp8", (8, 9), True) == "fp8"
    assert choose_quantization("auto", (9, 0), True) == "fp8"
    assert choose_quantization("auto", (8, 0), True) == "int8_weight"  # A100: no fp8 matmuls
    assert choose_quantization("auto", None, True) == "int8_weight"  # CPU
    assert choose_quantization("int8_weight", (9, 0), True) == "int8_weight"
    with caplog.at_level(logging.WARNING, logger="models.optimizations"):
        assert choose_quantization("fp8", (8, 6), True) == "int8_weight"
        assert "fp8 needs CUDA compute capability >= 8.9" in caplog.text
        assert choose_quantization("int8_weight", None, False) is None
        assert "torchao is not installed" in caplog.text


def test_tiling_wanted() -> None:
    auto = Optimizations(vae_tiling="auto", vae_tiling_min_pixels=64 * 64)
    assert not tiling_wanted(auto, 64, 64)
    assert tiling_wanted(auto, 128, 64)
    assert not tiling_wanted(auto, None, None)
    assert tiling_wanted(Optimizations(vae_tiling=True), 8, 8)
    assert not tiling_wanted(Optimizations(vae_tiling=False), 4096, 4096)


def test_plan_includes_the_new_optimizations(catalog: Catalog) -> None:
    wan = spec_with(tiny_spec(catalog, "tiny-wan"), optimizations={
        "attention_backend": "auto", "quantization": "auto", "step_cache": {"kind": "first_block"},
        "channels_last": True, "torch_compile": True})
    gpu = plan_optimizations(wan, cuda=True, xformers_available=False, attention_available={"sage": True},
                             capability=(9, 0), torchao=True)
    assert gpu == ["sage", "quantize:fp8", "step_cache:first_block", "channels_last", "vae_tiling_auto",
                   "torch_compile"]
    cpu = plan_optimizations(wan, cuda=False, xformers_available=False, attention_available={"sage": True},
                             capability=(9, 0), torchao=True)
    assert cpu == ["sdpa", "quantize:int8_weight", "step_cache:first_block", "channels_last", "vae_tiling_auto",
                   "torch_compile"]


# --- spec validation ---------------------------------------------------------------------------

def test_spec_rejects_step_cache_and_quantization_on_a_unet(catalog: Catalog) -> None:
    sd = tiny_spec(catalog, "tiny-sd")
    with pytest.raises(ValueError, match="step_cache needs a transformer family"):
        spec_with(sd, optimizations={"step_cache": {"kind": "first_block"}})
    with pytest.raises(ValueError, match="quantization is for the transformer families"):
        spec_with(sd, optimizations={"quantization": "int8_weight"})


def test_step_cache_fields_are_checked(tmp_path: Path, catalog: Catalog) -> None:
    with pytest.raises(ValueError, match="magcache needs mag_ratios"):
        StepCache(kind="magcache")
    with pytest.raises(ValueError, match="taylorseer has no threshold"):
        StepCache(kind="taylorseer", threshold=0.1)
    with pytest.raises(ValueError):
        StepCache(kind="pyramid")  # type: ignore[arg-type]
    data = tiny_spec(catalog, "tiny-sd").model_dump(mode="json")
    data["optimizations"]["step_cache"] = {"kind": "first_block", "threshold": 0.05}
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(data))
    with pytest.raises(CatalogError, match="bad.yaml.*step_cache needs a transformer family"):
        load_spec_file(bad)


def test_apply_step_cache_on_a_unet_is_a_config_error(tiny_dir: Path) -> None:
    pipe = fresh(tiny_dir, "tiny-sd")
    with pytest.raises(ValueError, match="UNet2DConditionModel does not support diffusers' step caches"):
        optimizations.apply_step_cache(pipe.unet, StepCache(kind="first_block"))


# --- step caches on tiny-wan -------------------------------------------------------------------

@pytest.mark.parametrize("cache", [
    StepCache(kind="first_block"),
    StepCache(kind="taylorseer", cache_interval=2, disable_cache_before_step=2),
    StepCache(kind="magcache", mag_ratios=[1.0] * 6),
    StepCache(kind="magcache", mag_ratios="flux"),
], ids=["first_block", "taylorseer", "magcache", "magcache-flux"])
def test_step_cache_is_applied_skips_and_stays_close(tiny_dir: Path, wan_plain: np.ndarray, cache: StepCache) -> None:
    pipe = fresh(tiny_dir, "tiny-wan")
    opts = Optimizations(step_cache=cache)
    applied, policy = apply_plan(pipe, ["sdpa", f"step_cache:{cache.kind}"], "cpu", "transformer", None, opts)
    assert applied == ["sdpa", f"step_cache:{cache.kind}"]
    assert pipe.transformer.is_cache_enabled
    counter = SkipCounter(pipe.transformer)
    out = wan_frames(pipe, policy)
    assert counter.calls == 16  # 8 steps × (conditional + unconditional pass)
    assert counter.skip_rate > 0, "the cache never skipped a block: not active"
    assert mean_abs(out, wan_plain) <= STEP_CACHE_MEAN
    # The state is reset between calls: a second run gives the same frames.
    np.testing.assert_array_equal(wan_frames(pipe, policy), out)
    counter.close()


def test_magcache_follows_each_calls_step_count(tiny_dir: Path) -> None:
    pipe = fresh(tiny_dir, "tiny-wan")
    opts = Optimizations(step_cache=StepCache(kind="magcache", mag_ratios=[1.0, 0.9, 0.95, 1.0]))
    _, policy = apply_plan(pipe, ["sdpa", "step_cache:magcache"], "cpu", "transformer", None, opts)
    for steps in (8, 3):
        counter = SkipCounter(pipe.transformer)
        wan_frames(pipe, policy, steps=steps)
        counter.close()
        assert policy.mag_config.num_inference_steps == steps and len(policy.mag_config.mag_ratios) == steps
        assert counter.calls == 2 * steps


# --- quantization, compile, channels-last, attention ---------------------------------------------

def test_int8_weight_only_quantization_on_tiny_wan(tiny_dir: Path, wan_plain: np.ndarray) -> None:
    pytest.importorskip("torchao")
    pipe = fresh(tiny_dir, "tiny-wan")
    applied, _ = apply_plan(pipe, ["sdpa", "quantize:int8_weight"], "cpu", "transformer", None, Optimizations())
    assert applied == ["sdpa", "quantize:int8_weight"]
    weight = pipe.transformer.blocks[0].ffn.net[0].proj.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    out = wan_frames(pipe)
    assert 0 < mean_abs(out, wan_plain) <= INT8_MEAN


@pytest.mark.parametrize(("name", "attr", "block"), [("tiny-sd", "unet", "BasicTransformerBlock"),
                                                     ("tiny-wan", "transformer", "WanTransformerBlock")])
def test_regional_compile_compiles_each_repeated_block(tiny_dir: Path, name: str, attr: str, block: str,
                                                       wan_plain: np.ndarray, sd_plain: np.ndarray) -> None:
    """Regional compile (eager backend: dynamo traces each block, no codegen; a real inductor compile
    is a CUDA-marked test): every repeated block is compiled in place, the denoiser itself is not."""
    pipe = fresh(tiny_dir, name)
    applied, _ = apply_plan(pipe, ["sdpa", "torch_compile"], "cpu", attr, {"backend": "eager"}, Optimizations())
    assert applied == ["sdpa", "torch_compile", "compile:regional"]
    denoiser = getattr(pipe, attr)
    blocks = [m for m in denoiser.modules() if type(m).__name__ == block]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert denoiser._compiled_call_impl is None
    out = wan_frames(pipe) if name == "tiny-wan" else sd_image(pipe)
    np.testing.assert_allclose(out, wan_plain if name == "tiny-wan" else sd_plain, atol=EXACT)


def test_full_compile_mode(tiny_dir: Path) -> None:
    pipe = fresh(tiny_dir, "tiny-sd")
    applied, _ = apply_plan(pipe, ["sdpa", "torch_compile"], "cpu", "unet", {"backend": "eager"},
                            Optimizations(compile_mode="full"))
    assert applied[-1] == "compile:full" and pipe.unet._compiled_call_impl is not None


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_regionally_compiled_generator_keeps_lora_hotswap_slots(tiny_dir: Path, catalog: Catalog,
                                                                tmp_path: Path) -> None:
    """A compiled denoiser hot-swaps LoRAs into fixed slots (no recompile per LoRA); with regional
    compilation the slots work and each LoRA gives the pixels of an uncompiled load."""
    spec = tiny_spec(catalog, "tiny-sd")
    compiled = spec_with(spec, optimizations={"torch_compile": True})
    first = LoraAdapter("a", _make_lora(tiny_dir, tmp_path / "a", 1))
    second = LoraAdapter("b", _make_lora(tiny_dir, tmp_path / "b", 2))
    req: dict[str, Any] = {"prompt": "p", "seed": 5, "steps": 2}
    plain = Generator.load(spec, tiny_dir=tiny_dir)
    expected = [pixels(plain.generate([req], adapters=[lora])[0]) for lora in (first, second)]
    gen = Generator.load(compiled, tiny_dir=tiny_dir, compile_kwargs={"backend": "eager"})
    assert "compile:regional" in gen.loaded.optimizations
    assert gen.adapters.hotswap_rank == spec.serving.lora_hotswap_rank
    gen.adapters.max_loaded = 1  # one slot: the second LoRA must be swapped into it
    got = [pixels(gen.generate([req], adapters=[lora])[0]) for lora in (first, second)]
    assert gen.adapters.hotswaps == 1 and list(gen.pipe.unet.peft_config) == ["slot_0"]
    for g, e in zip(got, expected, strict=True):
        assert np.abs(g.astype(int) - e.astype(int)).max() <= 1  # uint8 pixels: rounding only


def test_channels_last_on_unet_and_vae(tiny_dir: Path, sd_plain: np.ndarray) -> None:
    pipe = fresh(tiny_dir, "tiny-sd")
    applied, _ = apply_plan(pipe, ["sdpa", "channels_last"], "cpu", "unet", None, Optimizations())
    assert applied == ["sdpa", "channels_last"]
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(sd_image(pipe), sd_plain, atol=EXACT)
    wan = fresh(tiny_dir, "tiny-wan")  # a 3D video VAE and no UNet: nothing to convert, reported so
    assert apply_plan(wan, ["sdpa", "channels_last"], "cpu", "transformer", None, Optimizations())[0] == ["sdpa"]


def test_attention_backend_dispatch_on_wan(tiny_dir: Path, wan_plain: np.ndarray) -> None:
    pipe = fresh(tiny_dir, "tiny-wan")
    assert optimizations.apply_attention_backend(pipe.transformer, "native")
    backends = {str(getattr(p, "_attention_backend", None)) for p in pipe.transformer.attn_processors.values()}
    assert backends == {"AttentionBackendName.NATIVE"}
    np.testing.assert_allclose(wan_frames(pipe), wan_plain, atol=EXACT)


def test_sage_backend_is_set_where_importable_and_falls_back_otherwise(
        tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = fresh(tiny_dir, "tiny-wan")
    chosen: list[str] = []
    monkeypatch.setattr(pipe.transformer, "set_attention_backend", chosen.append)
    assert apply_plan(pipe, ["sage"], "cpu", "transformer")[0] == ["sage"]
    assert chosen == ["sage"]

    def no_kernel(backend: str) -> None:
        raise RuntimeError("sageattention has no kernel for this GPU")

    monkeypatch.setattr(pipe.transformer, "set_attention_backend", no_kernel)
    assert apply_plan(pipe, ["flash"], "cpu", "transformer")[0] == ["sdpa"]
    # A UNet's processors do not dispatch by backend: SDPA stays, reported as such.
    sd = fresh(tiny_dir, "tiny-sd")
    assert apply_plan(sd, ["sage"], "cpu", "unet")[0] == ["sdpa"]


def test_sage_requested_on_cpu_loads_with_sdpa(tiny_dir: Path, catalog: Catalog) -> None:
    spec = spec_with(tiny_spec(catalog, "tiny-wan"), optimizations={"attention_backend": "sage"})
    assert load_pipeline(spec, tiny_dir).optimizations[0] == "sdpa"


# --- VAE tiling by frame size ------------------------------------------------------------------

def test_auto_vae_tiling_follows_the_call_size(tiny_dir: Path, sd_plain: np.ndarray) -> None:
    pipe = fresh(tiny_dir, "tiny-sd")
    opts = Optimizations(vae_tiling="auto", vae_tiling_min_pixels=64 * 64)
    applied, policy = apply_plan(pipe, ["sdpa", "vae_tiling_auto"], "cpu", "unet", None, opts)
    assert applied == ["sdpa", "vae_tiling_auto"] and not pipe.vae.use_tiling
    np.testing.assert_array_equal(sd_image(pipe, policy=policy), sd_plain)  # 64²: not above, not tiled
    assert not pipe.vae.use_tiling and policy.tiled_calls == 0
    big = sd_image(pipe, size=128, policy=policy)
    assert pipe.vae.use_tiling and policy.tiled_calls == 1
    reference = sd_image(fresh(tiny_dir, "tiny-sd"), size=128)
    assert mean_abs(big, reference) <= TILING_MEAN
    sd_image(pipe, policy=policy)
    assert not pipe.vae.use_tiling  # back off for the small call


def test_generator_applies_the_call_policy(tiny_dir: Path, catalog: Catalog) -> None:
    spec = spec_with(tiny_spec(catalog, "tiny-sd"), optimizations={"vae_tiling": "auto",
                                                                 "vae_tiling_min_pixels": 64 * 64})
    gen = Generator.load(spec, tiny_dir=tiny_dir)
    gen.generate([{"prompt": "p", "seed": 1, "steps": 1, "width": 96, "height": 96}])
    assert gen.loaded.policy.tiled_calls == 1 and gen.pipe.vae.use_tiling
    gen.generate([{"prompt": "p", "seed": 1, "steps": 1, "width": 64, "height": 64}])
    assert gen.loaded.policy.tiled_calls == 1 and not gen.pipe.vae.use_tiling


# --- the CPU path imports no GPU extra ---------------------------------------------------------

_CHILD = textwrap.dedent('''
    import builtins, importlib, json, sys
    HIDDEN = {hidden!r}
    WATCHED = {watched!r}
    attempts = []
    # Stand in for a CPU install without the GPU extras: libraries that probe with find_spec see
    # nothing (diffusers imports torchao eagerly when it is installed) and any import of one fails.
    for name in HIDDEN:
        sys.modules[name] = None
    real_import, real_import_module = builtins.__import__, importlib.import_module

    def watch(name, globals=None, locals=None, fromlist=(), level=0):
        # level > 0 is a relative import (diffusers' and peft's own ``from .torchao import``).
        if level == 0 and name.split(".")[0] in WATCHED and name not in attempts:
            attempts.append(name)
        return real_import(name, globals, locals, fromlist, level)

    def watch_module(name, *args, **kwargs):
        if name.split(".")[0] in WATCHED and name not in attempts:
            attempts.append(name)
        return real_import_module(name, *args, **kwargs)

    builtins.__import__, importlib.import_module = watch, watch_module
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from models.catalog import Catalog
    from models.generator import Generator
    spec = Catalog.load().get({model!r})
    if {override!r}:
        spec = spec.model_copy(update={{"optimizations": spec.optimizations.model_copy(update={override!r})}})
    gen = Generator.load(spec, tiny_dir=Path({tiny!r}))
    out = gen.generate([{{"prompt": "p", "seed": 1, "steps": 1}}])
    print(json.dumps({{"attempts": attempts, "applied": gen.loaded.optimizations,
                      "loaded": sorted(n for n in WATCHED if sys.modules.get(n) is not None)}}))
''')


def _run_child(tiny_dir: Path, model: str, hidden: tuple[str, ...], override: dict[str, Any]) -> dict[str, Any]:
    """Load + run ``model`` in a fresh interpreter with ``hidden`` made unavailable; report which of
    the GPU modules were imported (``loaded``) or tried (``attempts``)."""
    code = _CHILD.format(hidden=hidden, watched=GPU_MODULES, model=model, override=override, tiny=str(tiny_dir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cpu_path_imports_no_gpu_extra(tiny_dir: Path) -> None:
    """tiny-sd with the catalog's config, loaded and run on the CPU: no GPU extra is imported, or
    even tried. Asking for sage attention on the CPU does not try to import it either."""
    for model, override in (("tiny-sd", {}), ("tiny-wan", {"attention_backend": "sage"})):
        got = _run_child(tiny_dir, model, GPU_MODULES, override)
        assert got["attempts"] == [] and got["loaded"] == [], (model, got)
        assert got["applied"][0] == "sdpa"


@pytest.mark.slow
def test_import_watch_sees_a_configured_extra(tiny_dir: Path) -> None:
    """The control: with torchao available and int8 quantization configured, the watch sees the
    import (so the test above can fail)."""
    pytest.importorskip("torchao")
    got = _run_child(tiny_dir, "tiny-wan", ("xformers", "sageattention", "flash_attn"),
                     {"quantization": "int8_weight"})
    assert "quantize:int8_weight" in got["applied"]
    assert got["loaded"] == ["torchao"] and any(a.startswith("torchao") for a in got["attempts"])
