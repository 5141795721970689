"""Classify failures into a stable code and whether a retry may help."""

from __future__ import annotations

RETRYABLE_MARKERS = ("out of memory", "cuda error", "cublas", "nccl")


def classify(exc: BaseException) -> tuple[str, bool]:
    """``(code, retryable)``: out of memory and lost replicas are worth a retry; bad input is not."""
    name = type(exc).__name__
    text = str(exc).lower()
    if name in ("GenerationCanceled", "TrainingCanceled"):
        return "canceled", False
    if isinstance(exc, FloatingPointError):
        return "training_diverged", False  # same seed and data: a retry diverges again
    if isinstance(exc, NotImplementedError):
        return "invalid_input", False  # e.g. a family the trainer cannot train
    if name == "OutOfMemoryError" or "out of memory" in text:
        return "out_of_memory", True
    if name in ("ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError",
                "NodeDiedError", "ObjectLostError", "OwnerDiedError"):
        return "replica_lost", True
    if name in ("BackPressureError", "DeploymentUnavailableError"):
        return "capacity", True
    if name == "ModelUnavailable":
        return "model_unavailable", False
    if name in ("FileNotFoundError",) and "lora" in text:
        return "lora_unavailable", False
    if isinstance(exc, ValueError | TypeError | KeyError):
        return "invalid_input", False
    if any(marker in text for marker in RETRYABLE_MARKERS):
        return "device_error", True
    return "generation_failed", True
