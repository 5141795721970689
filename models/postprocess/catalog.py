"""The post-processing catalog: prices per output second, bounds, and the deployment's serving.

One YAML file, ``models/catalog/postprocess/operations.yaml`` (plain pydantic + PyYAML: the API
imports this to validate and price pipelines, so nothing heavy here).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

OPERATIONS: tuple[str, ...] = ("upscale", "interpolate", "trim", "loop", "concat", "watermark", "audio", "export")
Operation = Literal["upscale", "interpolate", "trim", "loop", "concat", "watermark", "audio", "export"]

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "catalog" / "postprocess" / "operations.yaml"


class OperationError(ValueError):
    """Bad parameters or input kinds for an operation (a 422 for the API: nothing is charged).

    ``code`` is ``invalid_input`` or ``pipeline_kind_mismatch``; ``field`` names the parameter or
    input field at fault when there is one.
    """

    def __init__(self, message: str, *, code: str = "invalid_input", field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OperationPrices(_Strict):
    """Credits per output second (an image counts as one second), never under ``min_credits``."""

    min_credits: int = Field(default=1, ge=0)
    credits_per_output_second: dict[str, float]

    @model_validator(mode="after")
    def _every_operation(self) -> OperationPrices:
        missing = [op for op in OPERATIONS if op not in self.credits_per_output_second]
        unknown = [op for op in self.credits_per_output_second if op not in OPERATIONS]
        if missing or unknown:
            raise ValueError(f"credits_per_output_second: missing {missing}, unknown {unknown}")
        if any(v < 0 or not math.isfinite(v) for v in self.credits_per_output_second.values()):
            raise ValueError("credits_per_output_second must be finite and >= 0")
        return self


class OperationBounds(_Strict):
    max_side: int = Field(default=2048, ge=16)           # any output side, in pixels
    max_input_side: int = Field(default=4096, ge=16)     # any input side
    max_fps: int = Field(default=60, ge=1)
    max_duration_s: float = Field(default=60.0, gt=0)    # any video output
    max_input_duration_s: float = Field(default=600.0, gt=0)  # trim/param values past this are refused
    max_loop_count: int = Field(default=8, ge=2)
    # loop/boomerang hold frames in memory (a cycle; boomerang also its reverse buffer): w x h x frames held
    max_buffered_pixels: float = Field(default=1.5e9, gt=0)
    # static work budgets (output width x height x frames): every video op, and minterpolate's own
    max_pixel_frames: float = Field(default=4e9, gt=0)
    max_interpolate_pixel_frames: float = Field(default=8e8, gt=0)
    max_concat_inputs: int = Field(default=8, ge=2)
    max_text_chars: int = Field(default=100, ge=1)
    max_target_size_mb: float = Field(default=100.0, gt=0)
    max_crossfade_s: float = Field(default=2.0, ge=0)
    timeout_s: float = Field(default=600.0, gt=0)         # one ffmpeg run


class OperationServing(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    max_ongoing_requests: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _order(self) -> OperationServing:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class OperationResources(_Strict):
    num_cpus: float = Field(default=0.5, gt=0)
    memory_gb: float | None = Field(default=None, gt=0)


class OperationCatalog(_Strict):
    version: int = 1
    prices: OperationPrices
    bounds: OperationBounds = Field(default_factory=OperationBounds)
    serving: OperationServing = Field(default_factory=OperationServing)
    resources: OperationResources = Field(default_factory=OperationResources)


class OperationCatalogError(ValueError):
    """operations.yaml is not valid; the message names the file and the field."""


def load_operation_catalog(path: Path | None = None) -> OperationCatalog:
    """The catalog at ``path`` (default: the shipped operations.yaml); cached per path."""
    return _load(Path(path).resolve() if path else DEFAULT_PATH)


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> OperationCatalog:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise OperationCatalogError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise OperationCatalogError(f"{path}: expected a mapping at the top level")
    try:
        return OperationCatalog.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors())
        raise OperationCatalogError(f"{path}: {problems}") from exc


def default_bounds() -> OperationBounds:
    return load_operation_catalog().bounds
