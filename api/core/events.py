"""What an executor yields while it runs a job. Plain dataclasses: they cross the Ray boundary too.

On the wire (replica → executor) an event is a dict with a ``type`` and the dataclass's fields, plus
``v`` (:data:`EVENT_VERSION`). Reading is tolerant, for rolling upgrades: a field this version does
not know is dropped, and an event type it does not know is skipped (``event_from_dict`` returns
``None``), so a newer replica can add both without breaking an older API.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

logger = logging.getLogger(__name__)

EVENT_VERSION = 1
"""The version of the event shapes written by :func:`event_to_wire`; readers accept any."""


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
class PreviewEvent:
    """A small picture of the job while it denoises: ``image`` is a ``data:image/jpeg;base64,…`` URL.

    Live only: sent to SSE subscribers, never stored, never replayed, never sent to webhooks.
    ``index`` is which of the job's images it shows (``num_outputs`` > 1).
    """

    step: int
    total: int
    image: str
    width: int
    height: int
    index: int = 0
    type: Literal["preview"] = "preview"


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
                 | PreviewEvent | DoneEvent | ErrorEvent)

_BY_TYPE: dict[str, type] = {
    "stage": StageEvent, "progress": ProgressEvent, "output": OutputEvent, "log": LogEvent,
    "provider": ProviderEvent, "checkpoint": CheckpointEvent, "preview": PreviewEvent, "done": DoneEvent,
    "error": ErrorEvent,
}


_FIELDS: dict[type, frozenset[str]] = {cls: frozenset(f.name for f in fields(cls)) for cls in _BY_TYPE.values()}


def event_to_dict(event: ExecutorEvent) -> dict[str, Any]:
    """The event's fields and ``type`` (also how the runner stores outputs on the job)."""
    return asdict(event)


def event_to_wire(event: ExecutorEvent) -> dict[str, Any]:
    """The event as it crosses a process boundary: :func:`event_to_dict` plus its version ``v``."""
    return {**asdict(event), "v": EVENT_VERSION}


def event_from_dict(data: dict[str, Any]) -> ExecutorEvent | None:
    """The event a wire dict describes; unknown fields dropped; ``None`` for an unknown type.

    A known type missing a required field is still an error (``TypeError``): that is a broken
    sender, not a newer one.
    """
    cls = _BY_TYPE.get(str(data.get("type")))
    if cls is None:
        logger.debug("skipping an event of unknown type %r (from a newer sender?)", data.get("type"))
        return None
    known = _FIELDS[cls]
    return cls(**{k: v for k, v in data.items() if k in known})
