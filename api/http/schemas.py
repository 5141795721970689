"""Request bodies and the answer shapes clients rely on (see DESIGN.md; add fields, never rename)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.db.tables import Job, LedgerEntry, Lora, Upload, User
from api.storage.base import Storage


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64)
    input: dict[str, Any]
    webhook: str | None = Field(default=None, max_length=2048)
    webhook_events_filter: list[str] | None = None


class CreditGrant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: int = Field(gt=0, le=10_000_000)
    kind: str = Field(default="grant", pattern="^(grant|purchase|adjust)$")
    note: str = Field(default="", max_length=500)
    idempotency_key: str | None = Field(default=None, max_length=200)


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=254)
    plan: str | None = None
    credits: int | None = Field(default=None, ge=0, le=10_000_000)
    is_admin: bool = False


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str | None = None
    disabled: bool | None = None


class LoraCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    base_model: str = Field(min_length=1, max_length=64)
    images: list[str] | None = Field(default=None, max_length=100, description="upload ids of images")
    dataset: str | None = Field(default=None, max_length=64, description="upload id of a ZIP dataset")
    trigger_word: str = Field(default="TOK", min_length=1, max_length=32)
    steps: int = Field(default=1200, ge=1, le=100_000)
    rank: int = Field(default=16, ge=1, le=256)
    learning_rate: float = Field(default=1e-4, gt=0, le=1e-2)
    resolution: int | None = Field(default=None, ge=16, le=4096)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


class ModelSwap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: dict[str, Any] = Field(description="a catalog source: {path}, {s3}, {hf_repo, revision} or {tiny}")


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=100)


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def output_view(out: dict[str, Any], storage: Storage, ttl_s: int) -> dict[str, Any]:
    view = {
        "url": storage.url(out["key"], ttl_s),
        "content_type": out.get("content_type"),
        "width": out.get("width"),
        "height": out.get("height"),
        "num_frames": out.get("num_frames"),
        "fps": out.get("fps"),
        "duration_s": out.get("duration_s"),
    }
    if out.get("thumbnail_key"):
        view["thumbnail_url"] = storage.url(out["thumbnail_key"], ttl_s)
    if out.get("role") and out["role"] != "output":
        view["role"] = out["role"]
    return view


def job_view(job: Job, storage: Storage, ttl_s: int) -> dict[str, Any]:
    outputs = [output_view(o, storage, ttl_s) for o in job.outputs]
    thumbnail = next((o["thumbnail_url"] for o in outputs if o.get("thumbnail_url")), None)
    return {
        "id": job.id,
        "model": job.model,
        "kind": job.kind,
        "task": job.task,
        "status": job.status,
        "stage": job.stage,
        "progress": job.progress,
        "input": job.input,
        "outputs": outputs,
        "thumbnail_url": thumbnail,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "credits": {"reserved": job.credits_reserved, "charged": job.credits_charged,
                    "refunded": job.credits_refunded},
        "provider": job.provider,
        "route_reason": job.route_reason,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "webhook": job.webhook,
        "webhook_events_filter": job.webhook_events_filter,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "metrics": {"queue_s": job.queue_s, "run_s": job.run_s},
        "result": job.result or None,
    }


def ledger_view(entry: LedgerEntry) -> dict[str, Any]:
    return {"id": entry.id, "kind": entry.kind, "amount": entry.amount, "job_id": entry.job_id,
            "note": entry.note, "balance": entry.available_after, "reserved": entry.reserved_after,
            "created_at": iso(entry.created_at)}


def upload_view(upload: Upload, storage: Storage, ttl_s: int) -> dict[str, Any]:
    return {"id": upload.id, "kind": upload.kind, "filename": upload.filename,
            "content_type": upload.content_type, "size": upload.size, "width": upload.width,
            "height": upload.height, "url": storage.url(upload.key, ttl_s), "meta": upload.meta or None,
            "created_at": iso(upload.created_at)}


def user_view(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "plan": user.plan, "is_admin": user.is_admin,
            "disabled": user.disabled, "created_at": iso(user.created_at)}


def lora_view(lora: Lora, job: Job | None, storage: Storage, ttl_s: int) -> dict[str, Any]:
    return {
        "id": lora.id, "name": lora.name, "base_model": lora.base_model, "trigger_word": lora.trigger_word,
        "status": job.status if job is not None else lora.status,
        "stage": job.stage if job is not None else None,
        "progress": job.progress if job is not None else None,
        "params": lora.params, "summary": lora.summary or None, "job_id": lora.job_id,
        "weights_url": storage.url(lora.weights_key, ttl_s) if lora.weights_key else None,
        "validation_url": storage.url(lora.validation_key, ttl_s) if lora.validation_key else None,
        "error": {"code": job.error_code, "message": job.error_message} if job is not None and job.error_code else None,
        "credits": {"reserved": job.credits_reserved, "charged": job.credits_charged,
                    "refunded": job.credits_refunded} if job is not None else None,
        "created_at": iso(lora.created_at),
    }
