"""The model spec: one YAML file per model, validated here.

Plain pydantic + PyYAML: the API imports this module to validate and price requests, so it must
never pull torch or diffusers in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Kind = Literal["image", "video"]
Task = Literal["t2i", "i2i", "t2v", "i2v", "upscale"]
VIDEO_TASKS = {"t2v", "i2v"}
IMAGE_TASKS = {"t2i", "i2i", "upscale"}


class CatalogError(ValueError):
    """A catalog file that does not describe a valid model; the message names file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Source(_Strict):
    """Where the weights come from: a local path, ``s3://bucket/prefix`` or a Hugging Face repo."""

    path: str | None = None
    s3: str | None = None
    hf_repo: str | None = None
    revision: str | None = None
    tiny: str | None = Field(default=None, description="name of a tiny checkpoint built by make-tiny")

    @model_validator(mode="after")
    def _one_source(self) -> Source:
        given = [x for x in (self.path, self.s3, self.hf_repo, self.tiny) if x]
        if len(given) != 1:
            raise ValueError("source needs exactly one of path, s3, hf_repo, tiny")
        if self.s3 and not self.s3.startswith("s3://"):
            raise ValueError("source.s3 must start with s3://")
        return self


class Defaults(_Strict):
    width: int = 512
    height: int = 512
    steps: int = 30
    guidance: float = 5.0
    num_frames: int | None = None
    fps: int | None = None
    duration: float | None = None
    resolution: str | None = None
    aspect_ratio: str | None = None
    negative_prompt: str = ""
    strength: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="image-to-image strength when the request gives none (None: the family's default)")


class Limits(_Strict):
    min_width: int = 64
    max_width: int = 1024
    min_height: int = 64
    max_height: int = 1024
    size_multiple: int = 8
    max_steps: int = 100
    min_frames: int | None = None
    max_frames: int | None = None
    frame_multiple: int | None = None
    frame_offset: int = 0
    min_fps: int | None = None
    max_fps: int | None = None
    durations: list[float] | None = None
    resolutions: list[str] | None = None
    aspect_ratios: list[str] | None = None
    resolutions_by_duration: dict[str, list[float]] | None = Field(
        default=None, description="resolution -> durations allowed at it, e.g. 1080p: [8]")
    max_wait_s: float | None = None
    max_loras: int = 3
    training_steps: tuple[int, int] = (10, 4000)
    training_resolutions: list[int] = Field(default_factory=lambda: [512])


class Pricing(_Strict):
    credits_per_image: float | None = None
    base_pixels: int = 512 * 512
    credits_per_second: float | None = None
    multiplier_1080p: float | None = None
    # Local video is priced by compute: this is the price of the reference clip (the spec's default
    # num_frames × steps × width × height); a request pays in proportion to its own
    # frames × steps × pixels. Unset: credits_per_second × the default clip's duration.
    credits_per_reference_clip: float | None = None
    training_credits_per_1000_steps: float | None = None


class Resources(_Strict):
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    memory_gb: float | None = Field(default=None, description="host RAM one replica needs (Ray's memory)")
    accelerator_type: str | None = None
    gpu_memory_gb: float | None = Field(
        default=None, description="GPU memory one replica needs with the spec's optimizations")


class Serving(_Strict):
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 8
    max_queued_requests: int = 64
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05
    max_loras_per_replica: int = 4
    lora_hotswap_rank: int = Field(default=64, ge=1, le=1024,
                                   description="largest LoRA rank a compiled model can hot-swap")
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0
    shutdown_drain_s: float = Field(
        default=25.0, ge=0, le=3600,
        description="how long a replica being stopped (scale-down, redeploy) keeps running the "
                    "generations it owns before it exits; set it above the longest run")


UNET_FAMILIES = frozenset({"stable_diffusion"})
"""Families whose denoiser is a UNet: no transformer blocks for step caches or transformer quantization."""


class StepCache(_Strict):
    """A diffusers step cache on the denoiser (transformer families only): skip the repeated blocks of
    a denoising step whose first-block output (first_block), magnitude ratio (magcache) or Taylor
    forecast (taylorseer) says they would change little, reusing the cached residual instead."""

    kind: Literal["first_block", "taylorseer", "magcache"]
    threshold: float | None = Field(
        default=None, gt=0, le=1,
        description="first_block: relative change of the first block's residual under which a step reuses the "
                    "cache (diffusers' default 0.05); magcache: accumulated error budget (default 0.06)")
    cache_interval: int = Field(default=5, ge=1, le=100, description="taylorseer: full steps every N steps")
    disable_cache_before_step: int = Field(default=3, ge=0, description="taylorseer: always compute the first N")
    max_order: int = Field(default=1, ge=0, le=4, description="taylorseer: Taylor expansion order")
    max_skip_steps: int = Field(default=3, ge=1, description="magcache: at most N skipped steps in a row")
    retention_ratio: float = Field(default=0.2, ge=0, le=1, description="magcache: never skip the first share")
    mag_ratios: list[float] | Literal["flux"] | None = Field(
        default=None, description="magcache: the checkpoint's calibrated magnitude ratios ('flux': diffusers' "
                                  "FLUX.1 ratios); interpolated to each request's step count")

    @model_validator(mode="after")
    def _kind_fields(self) -> StepCache:
        if self.kind == "magcache" and self.mag_ratios is None:
            raise ValueError("step_cache magcache needs mag_ratios (calibrated for the checkpoint, or 'flux')")
        if self.kind == "taylorseer" and self.threshold is not None:
            raise ValueError("step_cache taylorseer has no threshold (it uses cache_interval)")
        return self


class Optimizations(_Strict):
    """Speed-ups applied at load time (models/loading.py, models/optimizations.py). Each GPU-only one is
    chosen by device detection and falls back, with a log line, where the machine cannot run it."""

    xformers: bool = True
    cpu_offload: bool = False
    vae_tiling: bool | Literal["auto"] = Field(
        default="auto", description="auto: tile the VAE decode of calls above vae_tiling_min_pixels per frame")
    vae_tiling_min_pixels: int = Field(default=1536 * 1024, ge=1, description="auto VAE tiling: frame size above which")
    vae_slicing: bool = False
    torch_compile: bool = False
    compile_mode: Literal["regional", "full"] = Field(
        default="regional", description="regional: compile each repeated block (fast compile, same speed-up); "
                                        "full: the whole denoiser")
    attention_slicing: bool = False
    channels_last: bool = Field(default=False, description="channels-last memory format for the UNet and a 2D VAE")
    attention_backend: Literal["sdpa", "sage", "flash", "auto"] = Field(
        default="sdpa", description="sage/flash where importable on CUDA (auto: sage, then flash), else SDPA")
    quantization: Literal["none", "int8_weight", "fp8", "auto"] = Field(
        default="none", description="torchao weight quantization of the transformer: fp8 on CUDA compute "
                                    "capability >= 8.9, else int8 weight-only; auto picks by device")
    step_cache: StepCache | None = None


class Previews(_Strict):
    """Live step previews (``models/previews.py``): a small JPEG every ``every_k_steps`` denoising steps.

    Unset ``every_k_steps``: on for image models (every 2 steps), off for video: at real video
    sizes the latents are large and each step is long, so a model opts in explicitly.
    """

    every_k_steps: int | None = Field(default=None, ge=0, le=1000,
                                      description="a preview every k steps; 0: none; unset: 2 for images, 0 for video")
    decoder: Literal["projection", "taesd"] = Field(
        default="projection", description="projection: a fixed linear map of the latent channels to RGB (cheap); "
                                          "taesd: the tiny autoencoder at taesd_source, else the projection")
    taesd_source: str | None = Field(
        default=None, description="a local diffusers AutoencoderTiny directory, or a Hugging Face repo in the cache")
    max_side: int = Field(default=128, ge=16, le=512, description="longest side of a preview (never above the job's)")

    @model_validator(mode="after")
    def _taesd_named(self) -> Previews:
        if self.decoder == "taesd" and not self.taesd_source:
            raise ValueError("previews.decoder taesd needs previews.taesd_source")
        return self


class Overflow(_Strict):
    provider: Literal["replicate", "veo"] | None = None
    model: str | None = Field(default=None, description="provider's model name, e.g. google/veo-3.1")
    when: list[Literal["remote_only", "wait", "capacity"]] = Field(
        default_factory=lambda: ["wait", "capacity"])
    remote_only: bool = False


class ModelSpec(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    name: str | None = None
    description: str = ""
    kind: Kind
    tasks: list[Task]
    family: str | None = None
    enabled: bool = True
    source: Source | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    scheduler: str | None = None
    pipeline_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="extra keyword arguments for every pipeline call, e.g. max_sequence_length")
    defaults: Defaults = Defaults()
    limits: Limits = Limits()
    pricing: Pricing = Pricing()
    resources: Resources = Resources()
    serving: Serving = Serving()
    optimizations: Optimizations = Optimizations()
    overflow: Overflow = Overflow()
    previews: Previews = Previews()
    trainable: bool = False
    measured_run_s: float | None = Field(default=None, description="typical run time, for wait estimates")

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if not self.tasks:
            raise ValueError("tasks must not be empty")
        wrong = set(self.tasks) - (VIDEO_TASKS if self.kind == "video" else IMAGE_TASKS)
        if wrong:
            raise ValueError(f"tasks {sorted(wrong)} do not fit kind {self.kind}")
        unet = self.family in UNET_FAMILIES
        if unet and self.optimizations.step_cache is not None:
            raise ValueError(f"optimizations.step_cache needs a transformer family (wan, flux, ltx); "
                             f"{self.family} has a UNet denoiser")
        if unet and self.optimizations.quantization != "none":
            raise ValueError(f"optimizations.quantization is for the transformer families; {self.family} has a UNet")
        if self.overflow.remote_only:
            if not self.overflow.provider:
                raise ValueError("a remote-only model needs overflow.provider")
        else:
            if self.source is None or not self.family:
                raise ValueError("a local model needs source and family")
        return self

    @property
    def remote_only(self) -> bool:
        return self.overflow.remote_only

    @property
    def preview_every(self) -> int:
        """Steps between two previews; 0: none (see :class:`Previews`)."""
        every = self.previews.every_k_steps
        if every is None:
            return 2 if self.kind == "image" else 0
        return every


def load_spec_file(path: Path) -> ModelSpec:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise CatalogError(f"{path}: expected a mapping at the top level")
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors())
        raise CatalogError(f"{path}: {problems}") from exc
