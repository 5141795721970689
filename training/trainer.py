"""``LoraTrainer``: train a peft LoRA on a loaded pipeline's denoiser, export it, render a validation image.

Runs in the calling thread, without Ray. What a caller sees:

- ``on_step(step, total, loss)`` after every optimizer step, ``should_cancel()`` before every step
  (:class:`TrainingCanceled` is raised within one step of it turning true);
- a checkpoint every ``checkpoint_every`` steps, written by :meth:`LoraTrainer.save_checkpoint`
  (LoRA weights, optimizer state, RNG states, step, losses so far) and handed to
  ``on_checkpoint(dir, step)``; ``resume_from=dir`` continues from one: the same samples, noise and
  optimizer moments as an uninterrupted run, not a restart;
- ``pytorch_lora_weights.safetensors`` in the diffusers/peft layout (rank and alpha in its
  metadata, so plain ``load_lora_weights`` rebuilds the same adapter), and one validation image.

Precision: float32 on the CPU. On CUDA the pipeline is half precision (see ``models.loading``);
the LoRA parameters are kept in float32 (``cast_training_params``) under autocast, fp16 adds a
gradient scaler, and the denoiser uses gradient checkpointing. The optimizer is 8-bit AdamW when
CUDA and bitsandbytes are there (bitsandbytes is never imported otherwise), else torch's AdamW.

The pipeline is left as found: the adapter is removed afterwards, so a serving replica can cache
the pipeline and train the next job on it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from models.loading import LoadedPipeline
from training.dataset import LoraDataset, TrainingImage, to_tensor_array
from training.objectives import Objective, TextEmbeds, make_objective

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
VALIDATION_NAME = "validation.png"
ADAPTER_NAME = "cineweave_training"
TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
CHECKPOINT_FORMAT = 1

OnStep = Callable[[int, int, float], None]
ShouldCancel = Callable[[], bool]
OnCheckpoint = Callable[[Path, int], None]
OnStage = Callable[[str], None]


class TrainingCanceled(Exception):
    """``should_cancel()`` turned true; nothing was exported."""


class CheckpointMismatch(ValueError):
    """A checkpoint written by a run with another rank, alpha, seed or resolution."""


@dataclass(frozen=True)
class TrainingConfig:
    """A run's hyper-parameters (defaults: what users of kohya and diffusers' scripts expect)."""

    steps: int
    rank: int = 16
    alpha: float | None = None
    """LoRA alpha; ``None`` means alpha = rank (scale 1)."""
    learning_rate: float = 1e-4
    resolution: int = 512
    seed: int = 0
    trigger_word: str = "TOK"
    caption_dropout: float = 0.05
    flip_p: float = 0.5
    batch_size: int = 1
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 = none."""
    validation_prompt: str | None = None
    """Defaults to ``"a photo of {trigger_word}"``."""
    validation_steps: int = 25
    validation_guidance: float = 5.0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool | None = None
    """``None``: on when training on CUDA."""
    optimizer: Literal["auto", "adamw", "adamw8bit"] = "auto"
    target_modules: tuple[str, ...] = TARGET_MODULES
    base_model: str | None = None
    """Recorded in the weights' metadata."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if self.batch_size < 1 or self.resolution < 8 or self.checkpoint_every < 0:
            raise ValueError("batch_size ≥ 1, resolution ≥ 8 and checkpoint_every ≥ 0 are required")
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be positive")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def prompt(self) -> str:
        return self.validation_prompt or f"a photo of {self.trigger_word}"

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumable by this run."""
        return {"rank": self.rank, "alpha": self.lora_alpha, "seed": self.seed, "resolution": self.resolution,
                "batch_size": self.batch_size, "target_modules": list(self.target_modules)}


@dataclass(frozen=True)
class LossSummary:
    first: float
    last: float
    min: float
    mean: float

    @classmethod
    def of(cls, losses: Sequence[float]) -> LossSummary:
        if not losses:
            return cls(math.nan, math.nan, math.nan, math.nan)
        return cls(float(losses[0]), float(losses[-1]), float(min(losses)), float(sum(losses) / len(losses)))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class TrainingResult:
    weights_path: Path
    validation_path: Path
    validation_size: tuple[int, int]
    steps: int
    """Total optimizer steps of the LoRA (including those done before a resume)."""
    resumed_from: int
    """The step training continued from (0: from scratch)."""
    loss: LossSummary
    rank: int
    alpha: float
    seconds: float
    losses: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"loss": self.loss.to_dict(), "rank": self.rank, "alpha": self.alpha, "steps": self.steps,
                "resumed_from": self.resumed_from}


# --- pure decisions ------------------------------------------------------------------------------

def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def choose_optimizer(requested: str, cuda: bool, bnb_available: bool) -> Literal["adamw", "adamw8bit"]:
    """8-bit AdamW on CUDA when bitsandbytes is installed (a quarter of Adam's state memory),
    plain AdamW otherwise; an explicit ``adamw8bit`` without them falls back with a warning."""
    if requested == "adamw":
        return "adamw"
    if cuda and bnb_available:
        return "adamw8bit"
    if requested == "adamw8bit":
        logger.warning("8-bit AdamW needs CUDA and bitsandbytes: using AdamW")
    return "adamw"


def autocast_dtype(device: str, pipeline_dtype: torch.dtype) -> torch.dtype | None:
    """Mixed precision only on CUDA with a half-precision pipeline; float32 everywhere else."""
    if device.startswith("cuda") and pipeline_dtype in (torch.float16, torch.bfloat16):
        return pipeline_dtype
    return None


# --- the trainer ---------------------------------------------------------------------------------

@dataclass
class _Run:
    """The mutable state of one training run (what a checkpoint saves)."""

    denoiser: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None
    params: list[tuple[str, torch.nn.Parameter]]
    losses: list[float] = field(default_factory=list)


class LoraTrainer:
    """Trains one LoRA at a time on ``loaded``'s denoiser (not reentrant)."""

    def __init__(self, loaded: LoadedPipeline, config: TrainingConfig, *,
                 pipeline_kwargs: Mapping[str, Any] | None = None) -> None:
        self.loaded = loaded
        self.config = config
        self.pipe = loaded.pipe
        self.family = loaded.family
        self.device = loaded.device
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self._run: _Run | None = None

    # public ----------------------------------------------------------------------------------
    def train(self, images: Sequence[TrainingImage], work_dir: Path, *, on_step: OnStep | None = None,
              should_cancel: ShouldCancel | None = None, on_checkpoint: OnCheckpoint | None = None,
              on_stage: OnStage | None = None, resume_from: Path | None = None) -> TrainingResult:
        """Train, export and validate; files go under ``work_dir``. See the module docstring."""
        cfg = self.config
        started = time.perf_counter()
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        dataset = LoraDataset(images, cfg.resolution, cfg.trigger_word, seed=cfg.seed, flip_p=cfg.flip_p,
                              caption_dropout=cfg.caption_dropout)
        denoiser = self.family.denoiser(self.pipe)
        objective = make_objective(self.pipe, self.family.denoiser_attr, self.device, self.pipeline_kwargs)
        with self._adapter(denoiser) as run:
            start = self.load_checkpoint(resume_from) if resume_from is not None else 0
            if start:
                logger.info("resuming LoRA training at step %d of %d", start, cfg.steps)
            if on_stage is not None:
                on_stage("training")
            self._loop(run, dataset, objective, start, work_dir, on_step, should_cancel, on_checkpoint)
            if on_stage is not None:
                on_stage("exporting")
            weights = self.export(work_dir / "lora")
            validation, size = self.validate(work_dir / VALIDATION_NAME)
            losses = list(run.losses)
        seconds = time.perf_counter() - started
        logger.info("trained %d steps (from %d) in %.1fs, loss %.4f -> %.4f", cfg.steps, start, seconds,
                    losses[0] if losses else math.nan, losses[-1] if losses else math.nan)
        return TrainingResult(weights_path=weights, validation_path=validation, validation_size=size,
                              steps=cfg.steps, resumed_from=start, loss=LossSummary.of(losses), rank=cfg.rank,
                              alpha=cfg.lora_alpha, seconds=seconds, losses=losses)

    def save_checkpoint(self, directory: Path, step: int) -> Path:
        """Write the running state to ``directory``: LoRA weights, optimizer (and scaler) state, RNG
        states, the step and the losses so far. Written to a sibling then renamed into place."""
        run = self._require_run()
        directory = Path(directory)
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file({name: p.detach().to("cpu", torch.float32).contiguous() for name, p in run.params},
                  str(staging / "lora.safetensors"))
        torch.save({"optimizer": run.optimizer.state_dict(),
                    "scaler": run.scaler.state_dict() if run.scaler is not None else None},
                   staging / "optimizer.pt")
        rng = {"generator": run.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps({
            "format": CHECKPOINT_FORMAT, "step": int(step), "losses": run.losses[:step],
            "config": self.config.fingerprint()}))
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
        return directory

    def load_checkpoint(self, directory: Path) -> int:
        """Restore a checkpoint into the running state; returns its step."""
        run = self._require_run()
        directory = Path(directory)
        state = json.loads((directory / "state.json").read_text())
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointMismatch(f"unknown checkpoint format {state.get('format')!r}")
        if state.get("config") != self.config.fingerprint():
            raise CheckpointMismatch(f"checkpoint made with {state.get('config')}, this run is "
                                     f"{self.config.fingerprint()}")
        step = int(state["step"])
        if not 0 <= step <= self.config.steps:
            raise CheckpointMismatch(f"checkpoint at step {step}, the run has {self.config.steps} steps")
        weights = load_file(str(directory / "lora.safetensors"))
        names = {name for name, _ in run.params}
        if set(weights) != names:
            raise CheckpointMismatch("checkpoint LoRA parameters differ from this model's")
        with torch.no_grad():
            for name, param in run.params:
                param.copy_(weights[name].to(param.device, param.dtype))
        opt = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        run.optimizer.load_state_dict(opt["optimizer"])
        if run.scaler is not None and opt.get("scaler"):
            run.scaler.load_state_dict(opt["scaler"])
        rng = torch.load(directory / "rng.pt", map_location="cpu", weights_only=True)
        run.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        run.losses = [float(x) for x in state.get("losses", [])][:step]
        return step

    def export(self, directory: Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` (peft keys under the denoiser's prefix, the
        adapter's LoraConfig as diffusers' ``lora_adapter_metadata``) with the pipeline class's own
        ``save_lora_weights``, so that class's ``load_lora_weights`` reads it back as is."""
        from peft.utils import get_peft_model_state_dict

        run = self._require_run()
        attr = self.family.denoiser_attr
        state = {k: v.detach().to("cpu", torch.float32).contiguous()
                 for k, v in get_peft_model_state_dict(run.denoiser, adapter_name=ADAPTER_NAME).items()}
        metadata = run.denoiser.peft_config[ADAPTER_NAME].to_dict()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        type(self.pipe).save_lora_weights(directory, weight_name=WEIGHTS_NAME, **{
            f"{attr}_lora_layers": state, f"{attr}_lora_adapter_metadata": metadata})
        path = directory / WEIGHTS_NAME
        self._stamp(path)
        logger.info("exported LoRA (%d tensors, rank %d, alpha %g) to %s", len(state), self.config.rank,
                    self.config.lora_alpha, path)
        return path

    @torch.no_grad()
    def validate(self, path: Path) -> tuple[Path, tuple[int, int]]:
        """Render the validation prompt (with the trigger word) through the pipeline, adapter on."""
        run = self._require_run()
        cfg = self.config
        run.denoiser.eval()
        task = "t2i" if self.family.kind == "image" else "t2v"
        request = {"prompt": cfg.prompt, "negative_prompt": None, "steps": cfg.validation_steps,
                   "guidance": cfg.validation_guidance, "width": cfg.resolution, "height": cfg.resolution,
                   "num_frames": 1}
        kwargs = {**self.pipeline_kwargs, **self.family.map_request(request, task)}
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        with self._autocast():
            result = self.pipe(**kwargs, generator=generator, output_type="pil")
        output = self.family.outputs(result)[0]
        image = output if self.family.kind == "image" else output[0]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
        return path, (image.width, image.height)

    # internals --------------------------------------------------------------------------------
    def _require_run(self) -> _Run:
        if self._run is None:
            raise RuntimeError("no training run in progress")
        return self._run

    @contextlib.contextmanager
    def _adapter(self, denoiser: torch.nn.Module) -> Iterator[_Run]:
        """Attach a fresh LoRA to ``denoiser`` for one run; remove it (and every training setting)
        afterwards, whatever happens."""
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        cfg = self.config
        cuda = self.device.startswith("cuda")
        if getattr(denoiser, "peft_config", None):
            raise RuntimeError("the denoiser already carries LoRA adapters; train on a clean pipeline")
        for name in ("vae", "text_encoder", "text_encoder_2", "image_encoder"):
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        denoiser.requires_grad_(False)
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                          target_modules=list(cfg.target_modules))
        # The gaussian init draws from the global RNG: seed it so a run (and its resume) is reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            denoiser.add_adapter(lora, adapter_name=ADAPTER_NAME)
        try:
            cast_training_params(denoiser, dtype=torch.float32)
            checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda
            if checkpointing:
                denoiser.enable_gradient_checkpointing()
            denoiser.train()
            params = [(n, p) for n, p in denoiser.named_parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"no LoRA target module ({', '.join(cfg.target_modules)}) in the denoiser")
            optimizer = self._optimizer([p for _, p in params], cuda)
            amp = autocast_dtype(self.device, self.pipe.dtype)
            scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
            self._run = _Run(denoiser=denoiser, optimizer=optimizer, generator=generator, scaler=scaler,
                             params=params)
            logger.info("LoRA rank %d alpha %g on %s: %d tensors, %d trainable parameters, %s, %s%s",
                        cfg.rank, cfg.lora_alpha, type(denoiser).__name__, len(params),
                        sum(p.numel() for _, p in params), type(optimizer).__name__,
                        f"autocast {amp}" if amp else "float32", ", gradient checkpointing" if checkpointing else "")
            yield self._run
        finally:
            self._run = None
            if getattr(denoiser, "is_gradient_checkpointing", False):
                denoiser.disable_gradient_checkpointing()
            denoiser.unload_lora()
            denoiser.requires_grad_(False)
            denoiser.eval()
            if cuda:
                torch.cuda.empty_cache()

    def _optimizer(self, params: list[torch.nn.Parameter], cuda: bool) -> torch.optim.Optimizer:
        cfg = self.config
        kind = choose_optimizer(cfg.optimizer, cuda, cuda and bitsandbytes_available())
        if kind == "adamw8bit":
            import bitsandbytes as bnb  # only ever imported on CUDA

            return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, betas=(0.9, 0.999),
                                       weight_decay=cfg.weight_decay, eps=1e-8)
        return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.999),
                                 weight_decay=cfg.weight_decay, eps=1e-8)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        amp = autocast_dtype(self.device, self.pipe.dtype)
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=amp)

    def _loop(self, run: _Run, dataset: LoraDataset, objective: Objective, start: int, work_dir: Path,
              on_step: OnStep | None, should_cancel: ShouldCancel | None,
              on_checkpoint: OnCheckpoint | None) -> None:
        cfg = self.config
        latents: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        texts: dict[str, TextEmbeds] = {}
        params = [p for _, p in run.params]
        last_checkpoint: Path | None = None
        for step in range(start, cfg.steps):
            if should_cancel is not None and should_cancel():
                raise TrainingCanceled(f"canceled at step {step} of {cfg.steps}")
            samples = [dataset.sample(step * cfg.batch_size + j) for j in range(cfg.batch_size)]
            batch_latents = []
            for s in samples:
                key = (s.index, s.flipped)
                if key not in latents:
                    pixels = torch.from_numpy(to_tensor_array(dataset.pixels(s.index, s.flipped)))[None]
                    latents[key] = objective.latent_stats(pixels)
                batch_latents.append(objective.sample_latents(latents[key], run.generator))
            for s in samples:
                if s.caption not in texts:
                    texts[s.caption] = objective.encode_text(s.caption)
            text = objective.collate([texts[s.caption] for s in samples])
            with self._autocast():
                loss = objective.loss(torch.cat(batch_latents), text, run.generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at step {step + 1}")
            if run.scaler is not None:
                run.scaler.scale(loss).backward()
                run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                run.scaler.step(run.optimizer)
                run.scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach().item())
            run.losses.append(value)
            done = step + 1
            if on_step is not None:
                on_step(done, cfg.steps, value)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                path = self.save_checkpoint(work_dir / "checkpoints" / f"step-{done}", done)
                if last_checkpoint is not None and last_checkpoint != path:
                    shutil.rmtree(last_checkpoint, ignore_errors=True)  # keep only the latest
                last_checkpoint = path
                if on_checkpoint is not None:
                    on_checkpoint(path, done)

    def _stamp(self, path: Path) -> None:
        """Add what a user wants to know about the file (trigger word, base model) to its metadata,
        beside diffusers' own keys."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata.update({"cineweave.trigger_word": self.config.trigger_word,
                         "cineweave.resolution": str(self.config.resolution),
                         "cineweave.steps": str(self.config.steps)})
        if self.config.base_model:
            metadata["cineweave.base_model"] = self.config.base_model
        save_file(tensors, str(path), metadata=metadata)

