"""bench/gpu.py without a GPU: the dry run lists every case and why it skips, the architectures are
the published sizes, and the whole measuring path runs on the CPU on shrunk copies of them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import gpu
from models.optimizations import importable


def test_dry_run_lists_the_cases_and_why_they_skip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--with-tests", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert result["dry_run"] is True
    labels = {(c["model"], c["label"]) for c in result["plan"]}
    for model in ("sdxl", "flux-schnell", "wan2.1-t2v-1.3b"):
        for b in (1, 4, 8):
            assert (model, f"plain b{b}") in labels
        assert (model, "torch_compile=regional") in labels
    assert ("wan2.1-t2v-1.3b", "step_cache=first_block") in labels
    assert ("flux-schnell", "quantization=auto") in labels and ("sdxl", "channels_last") in labels
    if not torch.cuda.is_available():
        assert all(c["would"] == "skip" and c["reason"] == "no CUDA device" for c in result["plan"])
        assert "skip: no CUDA device" in printed
    assert "pytest -m cuda" in printed


def test_architectures_are_the_published_sizes() -> None:
    """Built on the meta device (no memory): the denoisers have the published parameter counts."""
    for name, arch in gpu.ARCHITECTURES.items():
        params = sum(p.numel() for p in gpu.build_denoiser(name).parameters()) / 1e9
        assert params == pytest.approx(arch["published_denoiser_params_b"], rel=0.01), name


def test_unknown_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        gpu.main(["--dry-run", "--models", "sd3", "--json", str(tmp_path / "x.json")])


_SHRUNK: dict[str, dict[str, Any]] = {
    "sdxl": {"width": 64, "height": 64, "steps": 2,
             "unet": {"sample_size": 8, "block_out_channels": [32, 64, 64], "transformer_layers_per_block": [1, 1, 1],
                      "attention_head_dim": [2, 4, 4], "cross_attention_dim": 48, "addition_time_embed_dim": 8,
                      "projection_class_embeddings_input_dim": 80, "norm_num_groups": 8},
             "vae": {"block_out_channels": [16, 16, 16, 16], "norm_num_groups": 8, "layers_per_block": 1},
             "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                              "projection_dim": 16, "vocab_size": 1000},
             "text_encoder_2": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                "projection_dim": 32, "vocab_size": 1000}},
    "flux-schnell": {"width": 64, "height": 64, "steps": 2, "max_sequence_length": 16,
                     "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                                     "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
                                     "axes_dims_rope": [4, 6, 6]},
                     "vae": {"block_out_channels": [16, 16, 16, 16], "norm_num_groups": 8, "layers_per_block": 1},
                     "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                      "projection_dim": 16, "vocab_size": 1000},
                     "text_encoder_2": {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "vocab_size": 1000}},
    "wan2.1-t2v-1.3b": {"width": 64, "height": 64, "steps": 6, "num_frames": 5,  # > 4 steps: a step cache row
                        "transformer": {"num_attention_heads": 2, "attention_head_dim": 16, "text_dim": 32,
                                        "ffn_dim": 32, "num_layers": 2, "rope_max_seq_len": 32},
                        "vae": {"base_dim": 8},
                        "text_encoder": {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "vocab_size": 1000}},
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(gpu.ARCHITECTURES))
def test_measuring_path_runs_on_shrunk_architectures(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real builders and measuring loop, on the CPU, with the widths shrunk: every plain row and
    the step-cache / quantization / channels-last rows are measured (the kernels that need CUDA are
    reported skipped), so a GPU run meets no wiring error."""
    monkeypatch.setitem(gpu.ARCHITECTURES, name, _merge(gpu.ARCHITECTURES[name], _SHRUNK[name]))
    monkeypatch.setattr(gpu, "BATCHES", (1, 2))
    env = {"cuda": True, "capability": [8, 0],  # pretend: a CUDA machine without fp8 or kernels
           "importable": {"sageattention": False, "flash_attn": False, "torchao": importable("torchao"),
                          "xformers": False}}
    cases = [c for c in gpu.planned_cases([name]) if "compile" not in c["label"]]  # compile: tested elsewhere
    rows: list[gpu.Row] = []
    gpu.run_model(name, ("random", None), cases, env, gpu.Budget(600), 1, rows, device="cpu")
    by_label = {r.label: r for r in rows}
    for label in ("plain b1", "plain b2"):
        assert by_label[label].status == "ok", by_label[label].reason
        assert by_label[label].latency_s and by_label[label].items_per_s
    for r in rows:
        if r.label.startswith("attention="):
            assert r.status == "skipped" and "not importable" in (r.reason or "")
        else:
            assert r.status == "ok", (r.label, r.reason)
    if name == "wan2.1-t2v-1.3b":
        cache = by_label["step_cache=first_block"]
        assert cache.skip_rate is not None and cache.skip_rate_meaningful is False
        assert "step_cache:first_block" in cache.applied
    if "quantization=auto" in by_label and env["importable"]["torchao"]:
        assert "quantize:int8_weight" in by_label["quantization=auto"].applied
    assert "NOT meaningful" in gpu.table(rows) or name != "wan2.1-t2v-1.3b"
