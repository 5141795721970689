"""GPU benchmark: SDXL, FLUX.1-schnell and Wan 2.1 T2V 1.3B on whatever GPU is present, each
optimization on and off, in one unattended run (under 8 minutes with the CUDA-marked tests).

    python -m bench.gpu                      # the benchmark, table + bench/results/gpu.json
    python -m bench.gpu --with-tests         # then ``pytest -m cuda`` (tests/…, CUDA-marked)
    python -m bench.gpu --dry-run            # what it would run and why it would skip; no GPU needed
    python -m bench.gpu --path sdxl=/models/sdxl --budget-s 300 --models sdxl,flux-schnell

Weights: ``--path model=dir`` (a diffusers directory), else the Hugging Face cache (local files
only, nothing is downloaded), else **random weights at the published sizes**, built from the
configs in :data:`ARCHITECTURES` (the denoiser and VAE exactly as published; the text encoders keep
their published widths but only :data:`TEXT_ENCODER_LAYERS` layers: they run once per prompt and do
not dominate a generation's time). Random weights time the plain path, batching, compile,
quantization and attention kernels faithfully; a step cache's skip rate depends on how much the
real model's activations change from step to step, so on random weights it is **not meaningful**
(the table and JSON flag it).

For each model, at its published default size: latency per image/clip and images (clips) per
second at batch 1, 4 and 8, peak GPU memory; then at batch 1 each optimization on its own, on vs
the plain row: attention backend (sage / flash where importable), step cache (transformer
families), torchao quantization (fp8 on compute capability ≥ 8.9, else int8 weight-only),
channels-last (SDXL), regional ``torch.compile`` (compile time reported apart). Video runs fewer
frames and steps than a full clip (see :data:`ARCHITECTURES`) and reports seconds per step, so a full
clip's time is ``steps × s/step + decode``.

A global time budget (``--budget-s``, default 300 s, plus at most 150 s of tests) bounds the run: a case whose estimate (from the
rows already measured) does not fit is skipped and listed with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "gpu.json"
BATCHES = (1, 4, 8)
TEXT_ENCODER_LAYERS = 2
TEST_TIMEOUT_S = 150

# --- the published architectures, as data ---------------------------------------------------------

_SD_VAE_BLOCKS = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                  "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
                  "act_fn": "silu", "in_channels": 3, "out_channels": 3}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sdxl": {
        "hf_repo": "stabilityai/stable-diffusion-xl-base-1.0", "family": "stable_diffusion", "kind": "image",
        "denoiser": "unet", "dtype": "float16", "width": 1024, "height": 1024, "steps": 30, "guidance": 5.0,
        "published_denoiser_params_b": 2.567,
        # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        "unet": {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
                 "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
                 "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32},
        "vae": {**_SD_VAE_BLOCKS, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025,
                "force_upcast": True},
        # CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 widths (768 + 1280 = cross_attention_dim 2048)
        "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "projection_dim": 768, "vocab_size": 49408, "hidden_act": "quick_gelu"},
        "text_encoder_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                           "projection_dim": 1280, "vocab_size": 49408, "hidden_act": "gelu"},
    },
    "flux-schnell": {
        "hf_repo": "black-forest-labs/FLUX.1-schnell", "family": "flux", "kind": "image",
        "denoiser": "transformer", "dtype": "bfloat16", "width": 1024, "height": 1024, "steps": 4, "guidance": 0.0,
        "max_sequence_length": 256, "published_denoiser_params_b": 11.9,
        # black-forest-labs/FLUX.1-schnell transformer/config.json
        "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]},
        "vae": {**_SD_VAE_BLOCKS, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
                "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False,
                "force_upcast": True},
        "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "projection_dim": 768, "vocab_size": 49408, "hidden_act": "quick_gelu"},
        # T5-XXL encoder width
        "text_encoder_2": {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "vocab_size": 32128,
                           "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32},
    },
    "wan2.1-t2v-1.3b": {
        "hf_repo": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "family": "wan", "kind": "video",
        "denoiser": "transformer", "dtype": "bfloat16", "width": 832, "height": 480, "guidance": 5.0,
        # a full clip is 81 frames × 50 steps: timed here on 33 frames × 10 steps (s/step reported)
        "num_frames": 33, "steps": 10, "full_clip": {"num_frames": 81, "steps": 50},
        "published_denoiser_params_b": 1.42,
        # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
        "transformer": {"patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128,
                        "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
                        "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
                        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024},
        "vae": {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                "temperal_downsample": [False, True, True], "dropout": 0.0},
        # UMT5-XXL encoder width
        "text_encoder": {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "vocab_size": 256384,
                         "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32},
    },
}


def optimization_cases(name: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, Optimizations fields) for each optimization measured on its own at batch 1."""
    arch = ARCHITECTURES[name]
    cases: list[tuple[str, dict[str, Any]]] = []
    if arch["family"] != "stable_diffusion":
        cases += [("attention=sage", {"attention_backend": "sage"}),
                  ("attention=flash", {"attention_backend": "flash"})]
        if arch["steps"] > 4:  # 4 distilled steps leave a step cache nothing to skip
            cases.append(("step_cache=first_block", {"step_cache": {"kind": "first_block", "threshold": 0.05}}))
        cases.append(("quantization=auto", {"quantization": "auto"}))
    else:
        cases.append(("channels_last", {"channels_last": True}))
    cases.append(("torch_compile=regional", {"torch_compile": True, "compile_mode": "regional"}))
    return cases


# --- environment -----------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    import torch

    from models import optimizations

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.cuda.is_available()}
    with contextlib.suppress(Exception):
        import diffusers

        env["diffusers"] = diffusers.__version__
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    env["importable"] = {m: optimizations.importable(m) for m in ("sageattention", "flash_attn", "torchao",
                                                                     "xformers")}
    return env


def weights_source(name: str, paths: dict[str, str]) -> tuple[str, str | None]:
    """("path"|"hf_cache"|"random", where)."""
    if name in paths:
        return "path", paths[name]
    repo = ARCHITECTURES[name]["hf_repo"]
    try:
        from huggingface_hub import snapshot_download

        where = snapshot_download(repo, local_files_only=True, allow_patterns=["model_index.json"])
        if (Path(where) / "model_index.json").exists():
            return "hf_cache", repo
    except Exception:  # not cached (or no hub library): random weights
        pass
    return "random", None


def skip_reason(case: dict[str, Any], env: dict[str, Any]) -> str | None:
    """Why a case cannot run on this machine (None: it can)."""
    if not env["cuda"]:
        return "no CUDA device"
    opts = case.get("options", {})
    backend = opts.get("attention_backend")
    if backend == "sage" and not env["importable"]["sageattention"]:
        return "sageattention not importable (pip install 'cineweave[gpu]')"
    if backend == "flash" and not env["importable"]["flash_attn"]:
        return "flash_attn not importable (pip install 'cineweave[gpu]')"
    if opts.get("quantization") and not env["importable"]["torchao"]:
        return "torchao not importable"
    return None


def planned_cases(models: list[str]) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for name in models:
        cases += [{"model": name, "label": f"plain b{b}", "batch": b, "options": {}} for b in BATCHES]
        cases += [{"model": name, "label": label, "batch": 1, "options": opts}
                  for label, opts in optimization_cases(name)]
    return cases


# --- building -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _default(device: str, dtype: Any) -> Iterator[None]:
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_denoiser(name: str, device: str = "meta", dtype: Any = None) -> Any:
    """The published denoiser with random weights (``device="meta"``: shapes only, no memory)."""
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel, WanTransformer3DModel

    arch = ARCHITECTURES[name]
    cls = {"stable_diffusion": UNet2DConditionModel, "flux": FluxTransformer2DModel,
           "wan": WanTransformer3DModel}[arch["family"]]
    with _default(device, dtype or torch.float32):
        return cls(**arch[arch["denoiser"]])


def build_random_pipeline(name: str, device: str, dtype: Any) -> Any:
    """The whole pipeline at published sizes with random weights, made on ``device`` in ``dtype``."""
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLWan,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusionXLPipeline,
        UniPCMultistepScheduler,
        WanPipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    from models.tiny import _clip_tokenizer, _t5_like_tokenizer

    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    denoiser = build_denoiser(name, device, dtype)
    with _default(device, dtype):
        if arch["family"] == "stable_diffusion":
            te = CLIPTextModel(CLIPTextConfig(num_hidden_layers=TEXT_ENCODER_LAYERS, **arch["text_encoder"]))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=TEXT_ENCODER_LAYERS,
                                                             **arch["text_encoder_2"]))
            vae = AutoencoderKL(**arch["vae"])
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=_clip_tokenizer(),
                tokenizer_2=_clip_tokenizer(), unet=denoiser,
                scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                 beta_end=0.012, timestep_spacing="leading", steps_offset=1))
        elif arch["family"] == "flux":
            te = CLIPTextModel(CLIPTextConfig(num_hidden_layers=TEXT_ENCODER_LAYERS, **arch["text_encoder"]))
            te2 = T5EncoderModel(T5Config(num_layers=TEXT_ENCODER_LAYERS, **arch["text_encoder_2"]))
            pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
                                vae=AutoencoderKL(**arch["vae"]), text_encoder=te, tokenizer=_clip_tokenizer(),
                                text_encoder_2=te2, tokenizer_2=_t5_like_tokenizer(), transformer=denoiser)
        else:
            te = UMT5EncoderModel(UMT5Config(num_layers=TEXT_ENCODER_LAYERS, **arch["text_encoder"]))
            vae = AutoencoderKLWan(**arch["vae"]).to(torch.float32)  # Wan's VAE runs in float32
            pipe = WanPipeline(tokenizer=_t5_like_tokenizer(), text_encoder=te, transformer=denoiser, vae=vae,
                               scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                 use_flow_sigmas=True, flow_shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_weights(name: str, source: str, where: str | None, device: str, dtype: Any) -> Any:
    if source == "random":
        return build_random_pipeline(name, device, dtype)
    from diffusers import DiffusionPipeline

    from models.families.base import dtype_kwargs

    pipe = DiffusionPipeline.from_pretrained(where, local_files_only=True, **dtype_kwargs(dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# --- measuring --------------------------------------------------------------------------------------

@dataclass
class Row:
    model: str
    label: str
    batch: int
    weights: str
    status: str = "ok"
    reason: str | None = None
    latency_s: float | None = None
    per_item_s: float | None = None
    items_per_s: float | None = None
    per_step_s: float | None = None
    peak_memory_gb: float | None = None
    first_call_s: float | None = None
    speedup_vs_plain: float | None = None
    skip_rate: float | None = None
    skip_rate_meaningful: bool | None = None
    applied: list[str] = field(default_factory=list)


def call_kwargs(name: str, batch: int) -> dict[str, Any]:
    arch = ARCHITECTURES[name]
    kwargs: dict[str, Any] = {"prompt": ["a lighthouse on a cliff at dusk, film still"] * batch,
                              "width": arch["width"], "height": arch["height"],
                              "num_inference_steps": arch["steps"], "guidance_scale": arch["guidance"],
                              "output_type": "pil"}
    if arch["kind"] == "video":
        kwargs["num_frames"] = arch["num_frames"]
    if "max_sequence_length" in arch:
        kwargs["max_sequence_length"] = arch["max_sequence_length"]
    return kwargs


def timed(pipe: Any, kwargs: dict[str, Any], repeats: int, policy: Any = None,
          device: str = "cuda") -> tuple[float, float, float | None]:
    """(first call s, median of ``repeats`` later calls s, peak GB on CUDA)."""
    import torch

    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def once() -> float:
        call = {**kwargs, "generator": torch.Generator("cpu").manual_seed(0)}
        if policy is not None:
            policy.before_call(pipe, call)
        sync()
        started = time.perf_counter()
        pipe(**call)
        sync()
        return time.perf_counter() - started

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first = once()
    runs = sorted(once() for _ in range(repeats))
    return first, runs[len(runs) // 2], torch.cuda.max_memory_allocated() / 2**30 if cuda else None


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_model(name: str, weights: tuple[str, str | None], cases: list[dict[str, Any]], env: dict[str, Any],
              budget: Budget, repeats: int, rows: list[Row], device: str = "cuda") -> None:
    """Run ``cases`` of one model, appending a :class:`Row` each (``device`` other than CUDA: only
    for the wiring test on tiny configs)."""
    import gc

    import torch

    from models.loading import _DTYPES, apply_plan, plan_optimizations
    from models.optimizations import SkipCounter
    from models.spec import Optimizations

    arch = ARCHITECTURES[name]
    # Random weights in fp16 overflow (no trained scales): bf16 times the same. The CPU: float32.
    dtype = _DTYPES[arch["dtype"]] if weights[0] != "random" or arch["dtype"] != "float16" else torch.bfloat16
    if not device.startswith("cuda"):
        dtype = torch.float32
    source, where = weights
    plain: float | None = None
    shared: Any = None
    pipe: Any = None
    for case in cases:
        row = Row(model=name, label=case["label"], batch=case["batch"], weights=source)
        rows.append(row)
        reason = skip_reason(case, env)
        # Estimate: batch b costs about b × the batch-1 call, (repeats + 1) calls, plus a build.
        estimate = (plain or 20.0) * case["batch"] * (repeats + 1) + (60.0 if case["options"].get("torch_compile")
                                                                       else 15.0)
        if reason is None and estimate > budget.left():
            reason = f"time budget: needs ~{estimate:.0f}s, {max(0.0, budget.left()):.0f}s left"
        if reason:
            row.status, row.reason = "skipped", reason
            continue
        plain_case = not case["options"]
        try:
            if not (plain_case and shared is not None):
                shared = None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                pipe = load_weights(name, source, where, device, dtype)
            else:
                pipe = shared
            opts = Optimizations.model_validate({"xformers": False, "vae_tiling": False, **case["options"]})
            spec_like = type("S", (), {"optimizations": opts})()
            plan = plan_optimizations(spec_like, True, False, torchao=env["importable"]["torchao"],  # type: ignore[arg-type]
                                      attention_available={"sage": env["importable"]["sageattention"],
                                                           "flash": env["importable"]["flash_attn"]},
                                      capability=tuple(env["capability"]))
            compile_kwargs = {"fullgraph": False} if opts.torch_compile else None
            row.applied, policy = apply_plan(pipe, plan, device, arch["denoiser"], compile_kwargs, opts)
            if plain_case:
                shared = pipe  # the plain rows (batch 1, 4, 8) share one build
            counter = SkipCounter(getattr(pipe, arch["denoiser"])) if opts.step_cache else None
            first, median, peak = timed(pipe, call_kwargs(name, case["batch"]), repeats, policy, device)
            row.first_call_s, row.latency_s = round(first, 3), round(median, 3)
            row.peak_memory_gb = round(peak, 2) if peak is not None else None
            row.per_item_s = round(median / case["batch"], 3)
            row.items_per_s = round(case["batch"] / median, 3)
            row.per_step_s = round(median / arch["steps"], 4)
            if case["label"] == "plain b1":
                plain = median
            if plain and case["batch"] == 1:
                row.speedup_vs_plain = round(plain / median, 3)
            if counter is not None:
                row.skip_rate, row.skip_rate_meaningful = round(counter.skip_rate, 3), source != "random"
        except Exception as exc:  # one case failing (OOM, kernel missing) must not end the run
            logger.exception("%s %s failed", name, case["label"])
            row.status, row.reason = "error", f"{type(exc).__name__}: {str(exc)[:200]}"
            shared = None
        finally:
            pipe = None
            if not plain_case:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                torch._dynamo.reset()
    shared = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- output ------------------------------------------------------------------------------------------

def table(rows: list[Row]) -> str:
    head = (f"{'model':<17} {'case':<24} {'b':>2} {'weights':<8} {'s/call':>7} {'s/item':>7} {'items/s':>8} "
            f"{'s/step':>7} {'peakGB':>7} {'×plain':>6} {'skip':>6}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(v: float | None, spec: str) -> str:
            return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))
        skip = "-" if r.skip_rate is None else f"{r.skip_rate:.2f}" + ("" if r.skip_rate_meaningful else "*")
        note = r.reason or (f"first call (compile) {r.first_call_s:.1f}s"
                            if "compile" in r.label and r.first_call_s else "")
        lines.append(f"{r.model:<17} {r.label:<24} {r.batch:>2} {r.weights:<8} {f(r.latency_s, '7.3f')} "
                     f"{f(r.per_item_s, '7.3f')} {f(r.items_per_s, '8.3f')} {f(r.per_step_s, '7.4f')} "
                     f"{f(r.peak_memory_gb, '7.2f')} {f(r.speedup_vs_plain, '6.2f')} {skip:>6}  {note}")
    if any(r.skip_rate is not None and not r.skip_rate_meaningful for r in rows):
        lines.append("* step-cache skip rate on random weights: NOT meaningful (real activations decide it)")
    return "\n".join(lines)


def run_tests(timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs", "tests/"]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
        tail = (done.stdout + done.stderr)[-4000:]
        return {"command": " ".join(cmd), "returncode": done.returncode, "seconds": round(time.perf_counter() - started, 1),
                "tail": tail}
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd), "returncode": None, "seconds": timeout_s, "tail": "timed out"}


def dry_run(models: list[str], paths: dict[str, str], env: dict[str, Any], out: Callable[[str], None]
            ) -> dict[str, Any]:
    plan: list[dict[str, Any]] = []
    sizes = {}
    for name in models:
        denoiser = build_denoiser(name)  # meta device: shapes only
        sizes[name] = round(sum(p.numel() for p in denoiser.parameters()) / 1e9, 3)
        source, where = weights_source(name, paths)
        out(f"{name}: denoiser {sizes[name]}B params (published {ARCHITECTURES[name]['published_denoiser_params_b']}B), "
            f"weights: {source}{' ' + where if where else ' (published architecture, random weights)'}")
    for case in planned_cases(models):
        reason = skip_reason(case, env)
        plan.append({**case, "would": "skip" if reason else "run", "reason": reason})
        out(f"  {case['model']:<17} {case['label']:<24} b{case['batch']}  "
            f"{'skip: ' + reason if reason else 'run'}")
    return {"dry_run": True, "environment": env, "denoiser_params_b": sizes, "plan": plan}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list what would run and why it would skip")
    parser.add_argument("--with-tests", action="store_true", help="then run the CUDA-marked tests")
    parser.add_argument("--models", default=",".join(ARCHITECTURES), help="comma-separated subset")
    parser.add_argument("--path", action="append", default=[], metavar="MODEL=DIR",
                        help="a local diffusers directory for a model")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help=f"time budget for the benchmark part (the CUDA tests get {TEST_TIMEOUT_S}s more)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per case after one warm-up call")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(ARCHITECTURES)}")
    paths = dict(p.split("=", 1) for p in args.path)
    env = environment()
    started = time.perf_counter()
    if args.dry_run:
        print(f"bench.gpu dry run: cuda={env['cuda']} importable={env['importable']}")
        result = dry_run(models, paths, env, print)
        if args.with_tests:
            print(f"then: {sys.executable} -m pytest -m cuda -q tests/ (timeout {TEST_TIMEOUT_S}s)")
    else:
        budget = Budget(args.budget_s)
        rows: list[Row] = []
        if not env["cuda"]:
            print("no CUDA device: every case skipped (see --dry-run)")
        for name in models:
            cases = [c for c in planned_cases(models) if c["model"] == name]
            run_model(name, weights_source(name, paths), cases, env, budget, max(1, args.repeats), rows)
        print(table(rows))
        result = {"dry_run": False, "environment": env, "budget_s": args.budget_s,
                  "architectures": {m: {k: v for k, v in ARCHITECTURES[m].items()
                                        if k in ("hf_repo", "width", "height", "steps", "num_frames",
                                                 "full_clip", "dtype")} for m in models},
                  "text_encoder_layers_when_random": TEXT_ENCODER_LAYERS,
                  "rows": [asdict(r) for r in rows],
                  "note": "skip_rate_meaningful is false on random weights"}
        if args.with_tests:
            result["tests"] = run_tests(TEST_TIMEOUT_S)
            print(result["tests"]["tail"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.json}")
    if args.with_tests and not args.dry_run and result["tests"]["returncode"] not in (0, 5):
        return 1  # 5: no CUDA-marked test collected/selected
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
