"""Personal LoRAs: a training request becomes a LoRA record plus a priced ``training`` job.

The job follows the same credit rules as a generation (reserve on submit, capture on success,
refund on failure or cancel). When it ends, settlement copies its result (weights, validation
image, loss summary) onto the LoRA (see ``settlement.finish_job``).
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from api.core import ledger
from api.core.errors import InvalidInput, NotFound
from api.core.jobs import JobStatus
from api.core.pricing import price_training
from api.db.engine import Database
from api.db.tables import Job, Lora, User, utcnow
from api.services.events import EventBus, record_event
from api.services.jobs import JobService
from api.services.uploads import image_keys
from api.settings import Settings
from api.storage.base import Storage
from models.catalog import Catalog

logger = logging.getLogger(__name__)

STEP_PRESETS = (600, 1200, 2000)
TRIGGER_RE = re.compile(r"^[A-Za-z0-9_\-<>]{1,32}$")


@dataclass(frozen=True)
class TrainingRequest:
    name: str
    base_model: str
    images: list[str]
    trigger_word: str = "TOK"
    steps: int = 1200
    rank: int = 16
    learning_rate: float = 1e-4
    resolution: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class TrainingQuote:
    """What a training request would cost, and whether the account can pay it now."""

    base_model: str
    steps: int
    resolution: int
    images: int
    price: int
    balance: ledger.BalanceView
    debt: int = 0  # owed back: while above 0 the account cannot submit (account_in_debt)

    @property
    def affordable(self) -> bool:
        return self.debt == 0 and self.balance.available >= self.price


def weights_prefix(user_id: str, lora_id: str) -> str:
    return f"loras/{user_id}/{lora_id}/"


class LoraService:
    def __init__(self, db: Database, settings: Settings, catalog: Catalog, storage: Storage, bus: EventBus,
                 jobs: JobService) -> None:
        self.db = db
        self.settings = settings
        self.catalog = catalog
        self.storage = storage
        self.bus = bus
        self.jobs = jobs

    def _validate(self, req: TrainingRequest, *, need_images: bool = True) -> tuple[Any, int]:
        spec = self.catalog.get(req.base_model)
        if spec is None or not spec.enabled:
            raise InvalidInput(f"unknown base model {req.base_model!r}", {"field": "base_model"})
        if not spec.trainable:
            raise InvalidInput(f"{spec.id} cannot be trained", {"field": "base_model",
                               "trainable": [s.id for s in self.catalog.enabled() if s.trainable]})
        low, high = spec.limits.training_steps
        if not low <= req.steps <= high:
            raise InvalidInput(f"steps must be between {low} and {high} (presets {list(STEP_PRESETS)})",
                               {"field": "steps", "min": low, "max": high})
        resolutions = spec.limits.training_resolutions
        resolution = req.resolution or resolutions[0]
        if resolution not in resolutions:
            raise InvalidInput(f"resolution must be one of {resolutions}", {"field": "resolution"})
        if not TRIGGER_RE.match(req.trigger_word):
            raise InvalidInput("trigger_word must be 1–32 letters, digits, _ - < >", {"field": "trigger_word"})
        if need_images and not req.images:
            raise InvalidInput("give at least one image (upload ids, or one ZIP dataset)", {"field": "images"},
                               code="no_images")
        return spec, resolution

    def create(self, user: User, req: TrainingRequest) -> tuple[Lora, Job]:
        spec, resolution = self._validate(req)
        price = price_training(spec, req.steps, self.settings)
        max_active, _, _ = self.settings.limits_for(user.plan)
        lora = Lora(user_id=user.id, name=req.name, base_model=spec.id, trigger_word=req.trigger_word,
                    params={"steps": req.steps, "rank": req.rank, "learning_rate": req.learning_rate,
                            "resolution": resolution})
        with self.db.session() as session:
            images = self._images(session, user, req.images)
            inputs = {
                "lora_id": lora.id, "base_model": spec.id, "images": images, "trigger_word": req.trigger_word,
                "steps": req.steps, "rank": req.rank, "alpha": req.rank, "learning_rate": req.learning_rate,
                "resolution": resolution, "seed": req.seed if req.seed is not None else secrets.randbelow(2**31),
                "caption_dropout": 0.05, "checkpoint_every": max(1, min(250, req.steps // 4)),
                "validation_prompt": f"a photo of {req.trigger_word}",
                "weights_prefix": weights_prefix(user.id, lora.id),
            }
            job = Job(user_id=user.id, model=spec.id, kind="training", task="train", input=inputs,
                      max_attempts=self.settings.max_attempts, credits_reserved=price, lora_id=lora.id,
                      stage="queued")
            lora.job_id = job.id
            self.jobs.admit(session, user.id, max_active, None)  # the rate limit is for generations
            session.add(lora)
            session.add(job)
            session.flush()
            ledger.reserve(session, user.id, job.id, price)
            record_event(session, job.id, "status", {"status": job.status, "stage": job.stage})
            session.commit()
        self.bus.publish(job.id, "status", {"status": job.status})
        logger.info("LoRA %s: training job %s queued (%d steps, %d credits)", lora.id, job.id, req.steps, price)
        return lora, job

    def _images(self, session: Any, user: User, ids: list[str]) -> list[dict[str, Any]]:
        """The caller's images behind the upload ids (datasets expanded), within the file limit."""
        images = image_keys(session, user.id, ids)
        if not images:
            raise InvalidInput("the uploads hold no images", {"field": "images"}, code="no_images")
        if len(images) > self.settings.max_upload_files:
            raise InvalidInput(f"{len(images)} images; the limit is {self.settings.max_upload_files}",
                               {"field": "images"}, code="too_many_files")
        return images

    def quote(self, user: User, req: TrainingRequest) -> TrainingQuote:
        """What ``create`` would reserve, after the same checks; creates and moves nothing.

        The images may be left out (the console prices the steps before the photos are in): then
        only the image checks wait for the submission; given, they are checked as ``create`` does."""
        spec, resolution = self._validate(req, need_images=False)
        price = price_training(spec, req.steps, self.settings)
        with self.db.read() as session:
            images = self._images(session, user, req.images) if req.images else []
            balance = ledger.get_balance(session, user.id)
            debt = ledger.get_debt(session, user.id)
        return TrainingQuote(spec.id, req.steps, resolution, len(images), price, balance, debt)

    def get(self, user: User, lora_id: str) -> tuple[Lora, Job | None]:
        with self.db.read() as session:
            lora = session.get(Lora, lora_id)
            if lora is None or lora.user_id != user.id or lora.deleted_at is not None:
                raise NotFound(f"LoRA {lora_id} not found")
            job = session.get(Job, lora.job_id) if lora.job_id else None
        return lora, job

    def list(self, user: User, limit: int = 50) -> list[tuple[Lora, Job | None]]:
        with self.db.read() as session:
            loras = session.execute(select(Lora).where(Lora.user_id == user.id, Lora.deleted_at.is_(None))
                                    .order_by(Lora.created_at.desc()).limit(limit)).scalars().all()
            return [(lora, session.get(Job, lora.job_id) if lora.job_id else None) for lora in loras]

    def delete(self, user: User, lora_id: str) -> None:
        """Cancel its training if still active, then remove the weights. Jobs using it then fail fast."""
        lora, job = self.get(user, lora_id)
        if job is not None and job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            self.jobs.cancel(user, job.id)
        with self.db.session() as session:
            row = session.get(Lora, lora.id)
            assert row is not None
            row.deleted_at = utcnow()
            session.commit()
        self.storage.delete_prefix(weights_prefix(user.id, lora.id))
