"""LoRA training on tiny checkpoints: export, loading in a fresh pipeline, checkpoints, resume, cancel."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from models.loading import LoadedPipeline, load_pipeline
from models.spec import ModelSpec
from tests.training.conftest import build_tiny_sdxl, tiny_training_spec, training_images
from training.trainer import (
    WEIGHTS_NAME,
    CheckpointMismatch,
    LoraTrainer,
    LossSummary,
    TrainingCanceled,
    TrainingConfig,
    TrainingResult,
    autocast_dtype,
    choose_optimizer,
)

# lr 1e-3 rather than the product's 1e-4: eight steps then move the tiny model's output by a few
# grey levels, enough to compare images; the code path is the same.
CONFIG = TrainingConfig(steps=8, rank=8, alpha=16, learning_rate=1e-3, resolution=64, seed=11,
                        checkpoint_every=3, validation_steps=4, validation_guidance=5.0, base_model="tiny-sd")


@dataclass
class Recorder:
    cancel_after: int | None = None
    steps: list[tuple[int, int, float]] = field(default_factory=list)
    checkpoints: list[tuple[Path, int, bool]] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    cancel_checks: int = 0

    def on_step(self, step: int, total: int, loss: float) -> None:
        self.steps.append((step, total, loss))

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.checkpoints.append((path, step, (path / "state.json").is_file()))

    def should_cancel(self) -> bool:
        self.cancel_checks += 1
        return self.cancel_after is not None and len(self.steps) >= self.cancel_after

    def kwargs(self) -> dict[str, Any]:
        return {"on_step": self.on_step, "on_checkpoint": self.on_checkpoint, "should_cancel": self.should_cancel,
                "on_stage": self.stages.append}


@dataclass
class Trained:
    result: TrainingResult
    record: Recorder
    work: Path


@pytest.fixture(scope="module")
def trained(sd_loaded: LoadedPipeline, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    work = tmp_path_factory.mktemp("lora-run")
    record = Recorder()
    result = LoraTrainer(sd_loaded, CONFIG).train(training_images(), work, **record.kwargs())
    return Trained(result, record, work)


@pytest.fixture(scope="module")
def fresh_sd(tiny_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir / "tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: DiffusionPipeline, prompt: str = "a photo of TOK", output_type: str = "np", **kw: Any) -> Any:
    out = pipe(prompt, num_inference_steps=4, guidance_scale=5.0, width=64, height=64,
               generator=torch.Generator().manual_seed(11), output_type=output_type, **kw)
    return out.images[0]


# --- pure decisions ------------------------------------------------------------------------------

def test_optimizer_choice() -> None:
    assert choose_optimizer("auto", cuda=True, bnb_available=True) == "adamw8bit"
    assert choose_optimizer("auto", cuda=True, bnb_available=False) == "adamw"
    assert choose_optimizer("auto", cuda=False, bnb_available=True) == "adamw"
    assert choose_optimizer("adamw8bit", cuda=False, bnb_available=True) == "adamw"
    assert choose_optimizer("adamw", cuda=True, bnb_available=True) == "adamw"


def test_mixed_precision_only_on_cuda_half_pipelines() -> None:
    assert autocast_dtype("cpu", torch.float32) is None
    assert autocast_dtype("cpu", torch.bfloat16) is None
    assert autocast_dtype("cuda", torch.float16) == torch.float16
    assert autocast_dtype("cuda:1", torch.bfloat16) == torch.bfloat16
    assert autocast_dtype("cuda", torch.float32) is None


def test_config_defaults_and_validation() -> None:
    cfg = TrainingConfig(steps=10)
    assert (cfg.rank, cfg.lora_alpha, cfg.learning_rate, cfg.caption_dropout) == (16, 16.0, 1e-4, 0.05)
    assert cfg.prompt == "a photo of TOK"
    assert TrainingConfig(steps=10, trigger_word="sks").prompt == "a photo of sks"
    assert TrainingConfig(steps=10, rank=4, alpha=8).lora_alpha == 8.0
    for bad in ({"steps": 0}, {"steps": 5, "rank": 0}, {"steps": 5, "learning_rate": 0.0},
                {"steps": 5, "checkpoint_every": -1}):
        with pytest.raises(ValueError):
            TrainingConfig(**bad)  # type: ignore[arg-type]


def test_loss_summary() -> None:
    s = LossSummary.of([3.0, 1.0, 2.0])
    assert s.to_dict() == {"first": 3.0, "last": 2.0, "min": 1.0, "mean": 2.0}
    assert math.isnan(LossSummary.of([]).mean)


def test_cpu_never_uses_bitsandbytes(sd_loaded: LoadedPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.trainer as mod

    monkeypatch.setattr(mod, "bitsandbytes_available", lambda: True)
    trainer = LoraTrainer(sd_loaded, TrainingConfig(steps=1, optimizer="adamw8bit"))
    opt = trainer._optimizer([torch.nn.Parameter(torch.zeros(2))], cuda=False)
    assert type(opt) is torch.optim.AdamW


# --- a short run on tiny-sd ----------------------------------------------------------------------

def test_loss_is_reported_every_step_and_summarized(trained: Trained) -> None:
    steps = trained.record.steps
    assert [(s, t) for s, t, _ in steps] == [(i, 8) for i in range(1, 9)]
    losses = [loss for _, _, loss in steps]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert trained.result.losses == losses
    assert trained.result.loss == LossSummary.of(losses)
    assert (trained.result.steps, trained.result.resumed_from) == (8, 0)
    assert (trained.result.rank, trained.result.alpha) == (8, 16.0)
    assert trained.record.stages == ["training", "exporting"]
    assert trained.record.cancel_checks == 8  # before every step


def test_checkpoints_every_n_steps_keep_only_the_latest(trained: Trained) -> None:
    assert [(step, complete) for _, step, complete in trained.record.checkpoints] == [(3, True), (6, True)]
    remaining = sorted(p.name for p in (trained.work / "checkpoints").iterdir())
    assert remaining == ["step-6"]
    state = json.loads((trained.work / "checkpoints" / "step-6" / "state.json").read_text())
    assert state["step"] == 6 and len(state["losses"]) == 6
    assert state["config"]["rank"] == 8 and state["config"]["alpha"] == 16.0
    assert {p.name for p in (trained.work / "checkpoints" / "step-6").iterdir()} == {
        "lora.safetensors", "optimizer.pt", "rng.pt", "state.json"}


def test_exported_weights_are_peft_format_with_rank_and_alpha_metadata(trained: Trained) -> None:
    path = trained.result.weights_path
    assert path.name == WEIGHTS_NAME and path.is_file()
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        keys = list(handle.keys())
    lora_meta = json.loads(meta["lora_adapter_metadata"])
    assert lora_meta["unet.r"] == 8 and lora_meta["unet.lora_alpha"] == 16
    assert sorted(lora_meta["unet.target_modules"]) == sorted(["to_k", "to_q", "to_v", "to_out.0"])
    assert meta["cineweave.trigger_word"] == "TOK" and meta["cineweave.base_model"] == "tiny-sd"
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any(k.endswith("to_out.0.lora_B.weight") for k in keys)
    tensors = load_file(str(path))
    assert all(t.shape[0] == 8 for k, t in tensors.items() if ".lora_A." in k)
    # B starts at zero ("gaussian" init); training moved it.
    assert max(float(t.abs().max()) for k, t in tensors.items() if ".lora_B." in k) > 0


def test_weights_load_in_a_fresh_pipeline_and_change_its_output(trained: Trained,
                                                               fresh_sd: StableDiffusionPipeline) -> None:
    pipe = fresh_sd
    base = generate(pipe)
    pipe.load_lora_weights(str(trained.result.weights_path.parent), adapter_name="mine")
    try:
        assert pipe.unet.peft_config["mine"].r == 8 and pipe.unet.peft_config["mine"].lora_alpha == 16
        with_lora = generate(pipe)
        assert np.abs(with_lora - base).max() > 1e-3  # the LoRA changes the image, same seed
        pipe.set_adapters(["mine"], adapter_weights=[0.0])
        assert np.array_equal(generate(pipe), base)  # scale 0 equals no LoRA
        pipe.set_adapters(["mine"], adapter_weights=[1.0])
        assert np.array_equal(generate(pipe, cross_attention_kwargs={"scale": 0.0}), base)
        assert np.array_equal(generate(pipe), with_lora)
    finally:
        pipe.unload_lora_weights()
    assert np.array_equal(generate(pipe), base)


def test_validation_image_is_what_the_exported_lora_renders(trained: Trained,
                                                           fresh_sd: StableDiffusionPipeline) -> None:
    """The validation image (made in the trainer, adapter attached) is reproduced by the exported
    file in a fresh pipeline: the export carries the trained weights and alpha/rank exactly."""
    validation = np.asarray(Image.open(trained.result.validation_path)).astype(int)
    assert validation.shape == (64, 64, 3) and trained.result.validation_size == (64, 64)
    pipe = fresh_sd
    pipe.load_lora_weights(str(trained.result.weights_path), adapter_name="val")
    try:
        same = np.asarray(generate(pipe, CONFIG.prompt, output_type="pil")).astype(int)
        assert np.abs(same - validation).max() <= 1
        pipe.set_adapters(["val"], adapter_weights=[0.5])  # what a lost alpha (16 → 8) would give
        half = np.asarray(generate(pipe, CONFIG.prompt, output_type="pil")).astype(int)
        assert np.abs(half - validation).max() >= 3
    finally:
        pipe.unload_lora_weights()


def test_the_trained_pipeline_is_left_clean(trained: Trained, sd_loaded: LoadedPipeline,
                                            fresh_sd: StableDiffusionPipeline) -> None:
    unet = sd_loaded.pipe.unet
    assert not getattr(unet, "peft_config", None)
    assert not any("lora" in name for name, _ in unet.named_parameters())
    assert not any(p.requires_grad for p in unet.parameters()) and not unet.training
    assert np.array_equal(generate(sd_loaded.pipe), generate(fresh_sd))


# --- checkpoint, cancel, resume --------------------------------------------------------------------

def test_cancel_stops_within_a_step_and_resume_continues_from_the_checkpoint(
        trained: Trained, sd_loaded: LoadedPipeline, tmp_path: Path) -> None:
    interrupted = Recorder(cancel_after=4)
    with pytest.raises(TrainingCanceled):
        LoraTrainer(sd_loaded, CONFIG).train(training_images(), tmp_path / "a", **interrupted.kwargs())
    assert [s for s, _, _ in interrupted.steps] == [1, 2, 3, 4]  # canceled after step 4: no step 5
    assert [step for _, step, _ in interrupted.checkpoints] == [3]
    assert not (tmp_path / "a" / "lora").exists()  # nothing exported
    checkpoint = interrupted.checkpoints[0][0]

    resumed = Recorder()
    result = LoraTrainer(sd_loaded, CONFIG).train(training_images(), tmp_path / "b", resume_from=checkpoint,
                                                  **resumed.kwargs())
    # Steps 1–3 are not redone: the resumed run reports 4..8 only.
    assert [s for s, _, _ in resumed.steps] == [4, 5, 6, 7, 8]
    assert result.resumed_from == 3 and result.steps == 8
    assert [step for _, step, _ in resumed.checkpoints] == [6]
    # It continues the same run: same samples, noise and optimizer moments as the uninterrupted one.
    uninterrupted = trained.result.losses
    assert result.losses[:3] == uninterrupted[:3]  # carried in the checkpoint
    assert np.allclose(result.losses, uninterrupted, rtol=1e-4, atol=1e-6)
    assert result.loss.first == trained.result.loss.first
    a, b = load_file(str(result.weights_path)), load_file(str(trained.result.weights_path))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_a_restart_from_zero_would_differ(trained: Trained, sd_loaded: LoadedPipeline, tmp_path: Path) -> None:
    """Guards the resume test: a 5-step run from scratch is NOT what the resumed run produced."""
    cfg = TrainingConfig(**{**CONFIG.__dict__, "steps": 5, "checkpoint_every": 0})
    result = LoraTrainer(sd_loaded, cfg).train(training_images(), tmp_path)
    assert not np.allclose(result.losses, trained.result.losses[3:8], rtol=1e-4)


def test_resume_refuses_a_checkpoint_of_another_run(trained: Trained, sd_loaded: LoadedPipeline,
                                                    tmp_path: Path) -> None:
    checkpoint = trained.work / "checkpoints" / "step-6"
    other = TrainingConfig(**{**CONFIG.__dict__, "rank": 4})
    with pytest.raises(CheckpointMismatch, match="rank"):
        LoraTrainer(sd_loaded, other).train(training_images(), tmp_path, resume_from=checkpoint)
    assert not getattr(sd_loaded.pipe.unet, "peft_config", None)  # cleaned up after the failure


def test_cancel_before_the_first_step(sd_loaded: LoadedPipeline, tmp_path: Path) -> None:
    record = Recorder(cancel_after=0)
    with pytest.raises(TrainingCanceled):
        LoraTrainer(sd_loaded, CONFIG).train(training_images(), tmp_path, **record.kwargs())
    assert record.steps == [] and record.cancel_checks == 1


def test_gradient_checkpointing_gives_the_same_losses(sd_loaded: LoadedPipeline, tmp_path: Path) -> None:
    """The GPU path's gradient checkpointing, run on the CPU: same numbers, recomputed activations."""
    base = TrainingConfig(**{**CONFIG.__dict__, "steps": 3, "checkpoint_every": 0, "validation_steps": 1})
    plain = LoraTrainer(sd_loaded, base).train(training_images(), tmp_path / "plain")
    ckpt_cfg = TrainingConfig(**{**base.__dict__, "gradient_checkpointing": True})
    during: list[bool] = []
    checkpointed = LoraTrainer(sd_loaded, ckpt_cfg).train(
        training_images(), tmp_path / "ckpt",
        on_step=lambda *_: during.append(sd_loaded.pipe.unet.is_gradient_checkpointing))
    assert during == [True, True, True]
    assert np.allclose(plain.losses, checkpointed.losses, rtol=1e-4)
    # Gradients reached the LoRA through the recomputed blocks: the weights moved, and alike.
    a, b = load_file(str(plain.weights_path)), load_file(str(checkpointed.weights_path))
    assert max(float(t.abs().max()) for k, t in b.items() if ".lora_B." in k) > 0
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-7) for k in a)
    assert not sd_loaded.pipe.unet.is_gradient_checkpointing  # switched off again


def test_v_prediction_schedulers_train(tiny_dir: Path, sd_spec: Any, tmp_path: Path) -> None:
    from training.objectives import DDPMObjective

    loaded = load_pipeline(sd_spec, tiny_dir)
    loaded.pipe.scheduler.register_to_config(prediction_type="v_prediction")
    trainer = LoraTrainer(loaded, TrainingConfig(steps=2, rank=4, resolution=64, validation_steps=1))
    result = trainer.train(training_images(2), tmp_path)
    objective = DDPMObjective(loaded.pipe, loaded.pipe.unet, "cpu")
    assert objective.prediction_type == "v_prediction" and math.isfinite(result.loss.last)


# --- transformers (flow matching) -------------------------------------------------------------------

@pytest.mark.parametrize("model_id", ["tiny-wan", "tiny-flux"])
def test_flow_matching_transformers_train_and_export(model_id: str, tiny_dir: Path, tmp_path: Path) -> None:
    loaded = load_pipeline(tiny_training_spec(model_id), tiny_dir)
    cfg = TrainingConfig(steps=3, rank=4, alpha=4, learning_rate=1e-2, resolution=64, seed=3, validation_steps=2,
                         validation_guidance=3.0)
    record = Recorder()
    result = LoraTrainer(loaded, cfg).train(training_images(2), tmp_path, **record.kwargs())
    assert [s for s, _, _ in record.steps] == [1, 2, 3] and all(math.isfinite(x) for x in result.losses)
    assert Image.open(result.validation_path).size == (64, 64)
    with safe_open(str(result.weights_path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
        assert all(k.startswith("transformer.") for k in handle.keys())
    assert meta["transformer.r"] == 4
    assert not getattr(loaded.pipe.transformer, "peft_config", None)

    fresh = type(loaded.pipe).from_pretrained(str(tiny_dir / model_id))
    fresh.set_progress_bar_config(disable=True)
    call: dict[str, Any] = {"prompt": "a photo of TOK", "num_inference_steps": 2, "width": 64, "height": 64,
                            "output_type": "np"}
    if model_id == "tiny-wan":
        call["num_frames"] = 1

    def run() -> np.ndarray:
        out = fresh(**call, generator=torch.Generator().manual_seed(0))
        return np.asarray(out.frames[0] if model_id == "tiny-wan" else out.images[0])

    base = run()
    fresh.load_lora_weights(str(result.weights_path), adapter_name="mine")
    assert not np.array_equal(run(), base)
    fresh.set_adapters(["mine"], adapter_weights=[0.0])
    assert np.array_equal(run(), base)


def test_sdxl_unets_train_with_their_extra_conditioning(tiny_dir: Path, tmp_path: Path) -> None:
    path = build_tiny_sdxl(tmp_path / "tiny-sdxl", tiny_dir / "tiny-sd")
    spec = ModelSpec.model_validate({"id": "tiny-sdxl", "kind": "image", "tasks": ["t2i"],
                                     "family": "stable_diffusion", "source": {"path": str(path)}, "dtype": "float32",
                                     "trainable": True, "optimizations": {"xformers": False}})
    loaded = load_pipeline(spec, None)
    cfg = TrainingConfig(steps=2, rank=4, learning_rate=1e-2, resolution=64, validation_steps=2)
    result = LoraTrainer(loaded, cfg).train(training_images(2), tmp_path / "run")
    assert all(math.isfinite(x) for x in result.losses)
    fresh = type(loaded.pipe).from_pretrained(str(path))
    fresh.set_progress_bar_config(disable=True)
    base = generate(fresh)
    fresh.load_lora_weights(str(result.weights_path), adapter_name="xl")
    assert fresh.unet.peft_config["xl"].r == 4
    assert not np.array_equal(generate(fresh), base)


def test_training_never_imports_api_or_serve() -> None:
    """The import boundary (DESIGN.md): training may use models, never the job layer or Serve
    (``tests/models`` checks that models does not either, so the rule holds transitively)."""
    import ast

    root = Path(__file__).resolve().parents[2] / "training"
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found += [(path.name, n) for n in names if n.split(".")[0] in ("api", "serve", "ray")]
    assert len(list(root.glob("*.py"))) >= 4 and found == []


def test_cpu_training_did_not_load_bitsandbytes(trained: Trained) -> None:
    import sys

    assert "bitsandbytes" not in sys.modules
