"""What an executor yields while it runs a job. Plain dataclasses: they cross the Ray boundary too."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class StageEvent:
    """The job entered a stage (``loading``, ``generating``, ``encoding``, ``uploading``, …)."""

    stage: str
    type: Literal["stage"] = "stage"


@dataclass(frozen=True)
class ProgressEvent:
    step: int
    total: int
    stage: str = "generating"
    metrics: dict[str, float] = field(default_factory=dict)
    type: Literal["progress"] = "progress"

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else max(0.0, min(1.0, self.step / self.total))


@dataclass(frozen=True)
class OutputEvent:
    """One stored output. ``key`` is the storage key; the API presigns it on read."""

    key: str
    content_type: str
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: float | None = None
    duration_s: float | None = None
    thumbnail_key: str | None = None
    role: str = "output"
    type: Literal["output"] = "output"


@dataclass(frozen=True)
class LogEvent:
    message: str
    type: Literal["log"] = "log"


@dataclass(frozen=True)
class ProviderEvent:
    """The job is being served by an overflow provider (recorded on the job)."""

    provider: str
    provider_job_id: str | None = None
    reason: str | None = None
    cost_usd: float | None = None
    type: Literal["provider"] = "provider"


@dataclass(frozen=True)
class CheckpointEvent:
    """A resumable checkpoint was stored (training): a retry resumes from ``key`` at ``step``."""

    key: str
    step: int
    type: Literal["checkpoint"] = "checkpoint"


@dataclass(frozen=True)
class DoneEvent:
    result: dict[str, Any] = field(default_factory=dict)
    type: Literal["done"] = "done"


@dataclass(frozen=True)
class ErrorEvent:
    code: str
    message: str
    retryable: bool = False
    type: Literal["error"] = "error"


ExecutorEvent = (StageEvent | ProgressEvent | OutputEvent | LogEvent | ProviderEvent | CheckpointEvent
                 | DoneEvent | ErrorEvent)

_BY_TYPE: dict[str, type] = {
    "stage": StageEvent, "progress": ProgressEvent, "output": OutputEvent, "log": LogEvent,
    "provider": ProviderEvent, "checkpoint": CheckpointEvent, "done": DoneEvent, "error": ErrorEvent,
}


def event_to_dict(event: ExecutorEvent) -> dict[str, Any]:
    return asdict(event)


def event_from_dict(data: dict[str, Any]) -> ExecutorEvent:
    cls = _BY_TYPE[data["type"]]
    return cls(**{k: v for k, v in data.items()})
