"""``TrainerServer``: LoRA training jobs on one replica, streaming their events like a generator does.

A plain class (testable without Ray); :func:`build_trainer_app` turns it into a Serve deployment
whose handle the API's :class:`serve.executor.RayExecutor` reaches under ``TRAINER_KEY``, calling
``train`` with ``stream=True``. Per job it streams event dicts (``api.core.events`` shapes):

    stage preparing → stage training → progress (step, total, loss) … with a checkpoint event each
    time a checkpoint is stored → stage exporting → stage uploading → output (weights) → output
    (validation image) → done (weights and validation keys, loss summary, rank, alpha, steps)

or an error event (code, retryable). Checkpoints go to ``{weights_prefix}checkpoints/step-N/``
(only the latest is kept); the event's key is that folder's ``checkpoint.json`` manifest, written
last, so a key the runner records always names a complete checkpoint. A retried job whose
``resume`` names one continues from its step.

One job at a time per replica (``max_ongoing_requests=1``, and a lock, because a canceled job's
thread finishes its current step after the caller is gone). The base pipeline of the last job is
kept; the trainer removes its adapter after every run, so the next job starts clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from ray import serve
from ray.serve import Application

from api.core.events import (
    CheckpointEvent,
    DoneEvent,
    ErrorEvent,
    ExecutorEvent,
    OutputEvent,
    ProgressEvent,
    StageEvent,
    event_to_dict,
)
from api.storage.base import Storage
from models.spec import ModelSpec
from serve.errors import classify
from serve.generator import RuntimeConfig
from serve.testhooks import StepHooks

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "trainer"
APP_NAME = "trainer"
TRAINER_IMPORT_PATH = "serve.trainer:build"
MANIFEST = "checkpoint.json"
OCTET = "application/octet-stream"

Emit = Callable[[ExecutorEvent], None]


def checkpoint_folder(weights_prefix: str, step: int) -> str:
    return f"{weights_prefix}checkpoints/step-{int(step)}/"


def default_checkpoint_every(steps: int) -> int:
    """About four checkpoints a run, at most 250 steps apart (what the API asks for too)."""
    return max(1, min(250, steps // 4))


def classify_training_error(exc: BaseException) -> tuple[str, bool]:
    """:func:`serve.errors.classify` plus the failures only training has."""
    name = type(exc).__name__
    if name == "TrainingCanceled":
        return "canceled", False
    if isinstance(exc, FloatingPointError):
        return "training_diverged", False  # same seed, same data: a retry would diverge again
    if isinstance(exc, NotImplementedError):
        return "invalid_input", False  # a family the trainer cannot train
    return classify(exc)


class TrainerServer:
    def __init__(self, runtime: dict[str, Any], specs: Sequence[dict[str, Any]] | None = None, *,
                 storage: Storage | None = None) -> None:
        from models.generator import limit_threads

        self.runtime = RuntimeConfig(**runtime)
        self.storage = storage if storage is not None else self.runtime.storage()
        if specs is None:
            from models.catalog import Catalog

            self.specs = {s.id: s for s in Catalog.load().all()}
        else:
            self.specs = {s.id: s for s in (ModelSpec.model_validate(x) for x in specs)}
        if self.runtime.threads:
            limit_threads(self.runtime.threads)
        self._lock = threading.Lock()
        self._pipeline: tuple[tuple[str, str], Any] | None = None
        self._work_root = Path(self.runtime.cache_dir or tempfile.gettempdir()) / "training"
        self.loads: Counter[str] = Counter()
        self.canceled: set[str] = set()
        self.last_run: dict[str, Any] = {}
        self.hooks = StepHooks(self.runtime.test_hooks_dir) if self.runtime.test_hooks_dir else None

    # Serve hooks -------------------------------------------------------------------------
    def check_health(self) -> None:
        """Liveness only: a replica with no pipeline loaded yet is healthy (it loads per job)."""

    def stats(self) -> dict[str, Any]:
        return {"loads": dict(self.loads), "canceled": sorted(self.canceled), "last_run": dict(self.last_run),
                "pipeline": self._pipeline[0][0] if self._pipeline else None}

    # the stream --------------------------------------------------------------------------
    async def train(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one training job's events. ``request``: job_id, input, resume, attempt, …"""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: ExecutorEvent) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event_to_dict(event))
            except RuntimeError:  # the caller's loop is gone: nobody listens any more
                cancel.set()

        run = asyncio.ensure_future(asyncio.to_thread(self._run_job, request, emit, cancel.is_set))
        # A canceled caller never reads the result: retrieve it so asyncio does not log it.
        run.add_done_callback(lambda f: f.cancelled() or f.exception())
        finished = False
        try:
            while not run.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                try:
                    await asyncio.wait({run, getter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()
                if getter.done() and not getter.cancelled():
                    yield getter.result()
            finished = True
        finally:
            if not finished:
                # The caller is gone: canceled while we awaited (CancelledError, what
                # response.cancel() raises) or while it held an event (the stream is closed,
                # GeneratorExit). Training stops before its next step.
                cancel.set()
                self.canceled.add(str(request.get("job_id")))
                logger.info("training job %s canceled by its caller", request.get("job_id"))
        try:
            run.result()
        except Exception as exc:  # noqa: BLE001 - becomes the job's error event
            yield self._error(request, exc)

    def _error(self, request: dict[str, Any], exc: BaseException) -> dict[str, Any]:
        code, retryable = classify_training_error(exc)
        if code != "canceled":
            logger.warning("training job %s failed: %s: %s (%s, retryable=%s)", request.get("job_id"),
                           type(exc).__name__, exc, code, retryable)
        return event_to_dict(ErrorEvent(code, str(exc) or type(exc).__name__, retryable))

    # the work (in a thread) ----------------------------------------------------------------
    def _run_job(self, request: dict[str, Any], emit: Emit, cancelled: Callable[[], bool]) -> None:
        from training.trainer import TrainingCanceled

        with self._lock:
            if cancelled():
                raise TrainingCanceled("canceled before it started")
            job_id = str(request["job_id"])
            work = self._work_root / f"{_safe(job_id)}-{int(request.get('attempt') or 1)}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            started = time.perf_counter()
            self.last_run = {"job_id": job_id, "step": 0, "outcome": "running"}
            outcome = "failed"
            try:
                self._train(request, work, emit, cancelled)
                outcome = "done"
            except TrainingCanceled:
                outcome = "canceled"
                raise
            finally:
                shutil.rmtree(work, ignore_errors=True)
                self.last_run = {**self.last_run, "outcome": outcome,
                                 "seconds": round(time.perf_counter() - started, 3)}

    def _train(self, request: dict[str, Any], work: Path, emit: Emit, cancelled: Callable[[], bool]) -> None:
        from training.trainer import LoraTrainer, TrainingCanceled

        data = dict(request["input"])
        emit(StageEvent("preparing"))
        spec = self._spec(str(data.get("base_model") or request.get("model") or ""))
        prefix = _prefix(data)
        config = self.training_config(spec, data)
        images = self._images(data.get("images") or [])
        resume_dir = self._fetch_checkpoint(request.get("resume") or {}, prefix, work / "resume")
        loaded = self._load(spec)
        if cancelled():
            raise TrainingCanceled("canceled while preparing")

        def on_step(step: int, total: int, loss: float) -> None:
            emit(ProgressEvent(step, total, stage="training", metrics={"loss": loss}))
            self.last_run = {**self.last_run, "step": step}

        hold = self.hooks.hold_for(str(data.get("trigger_word") or "")) if self.hooks is not None else None
        hold_steps = list(hold.steps) if hold is not None else []

        def on_checkpoint(path: Path, step: int) -> None:
            key = self._store_checkpoint(path, step, prefix)
            emit(CheckpointEvent(key, step))
            if hold is not None and self.hooks is not None and hold_steps and step >= hold_steps[0]:  # tests only
                self.hooks.hold(str(request["job_id"]), hold.token, step, cancelled)
                hold_steps[:] = [s for s in hold_steps if s > step]

        trainer = LoraTrainer(loaded, config, pipeline_kwargs=spec.pipeline_kwargs)
        result = trainer.train(images, work / "run", on_step=on_step, should_cancel=cancelled,
                               on_checkpoint=on_checkpoint, on_stage=lambda stage: emit(StageEvent(stage)),
                               resume_from=resume_dir)
        if cancelled():
            raise TrainingCanceled("canceled while exporting")
        emit(StageEvent("uploading"))
        weights_key = f"{prefix}{result.weights_path.name}"
        validation_key = f"{prefix}validation.png"
        self.storage.put_file(weights_key, result.weights_path, OCTET)
        self.storage.put_file(validation_key, result.validation_path, "image/png")
        width, height = result.validation_size
        emit(OutputEvent(key=weights_key, content_type=OCTET, role="weights"))
        emit(OutputEvent(key=validation_key, content_type="image/png", width=width, height=height,
                         role="validation"))
        emit(DoneEvent({"weights_key": weights_key, "validation_key": validation_key, **result.summary(),
                        "trigger_word": config.trigger_word, "seconds": round(result.seconds, 3)}))

    # pieces ------------------------------------------------------------------------------
    def _spec(self, model_id: str) -> ModelSpec:
        spec = self.specs.get(model_id)
        if spec is None:
            raise ValueError(f"unknown base model {model_id!r}")
        if not spec.trainable:
            raise ValueError(f"{model_id} cannot be trained")
        return spec

    @staticmethod
    def training_config(spec: ModelSpec, data: dict[str, Any]) -> Any:
        """The job input as a :class:`training.trainer.TrainingConfig`, checked against the spec's
        limits (the API checked them too; a replica does not trust its caller)."""
        from training.trainer import TrainingConfig

        steps = int(data["steps"])
        low, high = spec.limits.training_steps
        if not low <= steps <= high:
            raise ValueError(f"steps must be between {low} and {high}, got {steps}")
        resolution = int(data.get("resolution") or spec.limits.training_resolutions[0])
        if resolution not in spec.limits.training_resolutions:
            raise ValueError(f"resolution must be one of {spec.limits.training_resolutions}, got {resolution}")
        rank = int(data.get("rank") or 16)
        alpha = data.get("alpha")
        trigger = str(data.get("trigger_word") or "TOK")
        every = data.get("checkpoint_every")
        return TrainingConfig(
            steps=steps, rank=rank, alpha=float(alpha) if alpha is not None else None,
            learning_rate=float(data.get("learning_rate") or 1e-4), resolution=resolution,
            seed=int(data.get("seed") or 0), trigger_word=trigger,
            caption_dropout=float(data.get("caption_dropout", 0.05)),
            checkpoint_every=int(every) if every is not None else default_checkpoint_every(steps),
            validation_prompt=data.get("validation_prompt") or f"a photo of {trigger}",
            validation_steps=spec.defaults.steps, validation_guidance=spec.defaults.guidance,
            base_model=spec.id)

    def _images(self, items: Sequence[Any]) -> list[Any]:
        from training.dataset import TrainingImage

        if not items:
            raise ValueError("no training images")
        images = []
        for item in items:
            key, caption = (item, None) if isinstance(item, str) else (item["key"], item.get("caption"))
            try:
                blob = self.storage.get_bytes(key)
            except FileNotFoundError:
                raise ValueError(f"training image {key} is not in storage") from None
            try:
                with Image.open(io.BytesIO(blob)) as img:
                    # Uploads had their EXIF orientation applied (and stripped) when stored.
                    images.append(TrainingImage(img.convert("RGB"), caption))
            except (OSError, Image.DecompressionBombError) as exc:
                raise ValueError(f"training image {key} cannot be decoded: {exc}") from None
        return images

    def _load(self, spec: ModelSpec) -> Any:
        """The base pipeline, loaded for this spec unless the last job used the same one."""
        from models.loading import load_pipeline

        source = json.dumps(spec.source.model_dump(exclude_none=True) if spec.source else {}, sort_keys=True)
        key = (spec.id, source)
        if self._pipeline is not None and self._pipeline[0] == key:
            return self._pipeline[1]
        if self._pipeline is not None:  # free the old one before loading the next
            self._pipeline = None
            gc.collect()
            with contextlib.suppress(Exception):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        # CPU offload moves modules between steps and a compiled denoiser would recompile once the
        # adapter is attached: neither suits training.
        # Quantized weights take no gradients and a step cache skips blocks: off for training too.
        opts = spec.optimizations.model_copy(update={"cpu_offload": False, "torch_compile": False,
                                                     "quantization": "none", "step_cache": None})
        started = time.perf_counter()
        loaded = load_pipeline(spec.model_copy(update={"optimizations": opts}),
                               Path(self.runtime.tiny_dir) if self.runtime.tiny_dir else None,
                               Path(self.runtime.cache_dir) if self.runtime.cache_dir else None)
        self.loads[spec.id] += 1
        logger.info("trainer loaded %s in %.2fs", spec.id, time.perf_counter() - started)
        self._pipeline = (key, loaded)
        return loaded

    def _store_checkpoint(self, path: Path, step: int, prefix: str) -> str:
        """Upload a checkpoint folder, manifest last, then delete the older ones; return the
        manifest's key."""
        folder = checkpoint_folder(prefix, step)
        files = sorted(p for p in Path(path).iterdir() if p.is_file())
        for file in files:
            self.storage.put_file(folder + file.name, file, OCTET)
        manifest = {"step": int(step), "files": [f.name for f in files]}
        key = folder + MANIFEST
        self.storage.put_bytes(key, json.dumps(manifest).encode(), "application/json")
        for old in self.storage.list(f"{prefix}checkpoints/"):
            if not old.startswith(folder):
                self.storage.delete(old)
        return key

    def _fetch_checkpoint(self, resume: dict[str, Any], prefix: str, into: Path) -> Path | None:
        """Download the checkpoint ``resume`` names, or None (then training starts from zero)."""
        key = resume.get("checkpoint_key")
        if not key:
            return None
        if not str(key).startswith(f"{prefix}checkpoints/") or not str(key).endswith("/" + MANIFEST):
            raise ValueError(f"checkpoint {key!r} does not belong to this LoRA")
        folder = str(key)[: -len(MANIFEST)]
        try:
            manifest = json.loads(self.storage.get_bytes(key))
            for name in manifest["files"]:
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"bad file name {name!r} in checkpoint {key}")
                self.storage.download(folder + name, into / name)
        except FileNotFoundError:
            logger.warning("checkpoint %s is gone: training from step 0", key)
            shutil.rmtree(into, ignore_errors=True)
            return None
        logger.info("resuming from %s (step %s)", key, manifest.get("step"))
        return into


def _prefix(data: dict[str, Any]) -> str:
    prefix = str(data.get("weights_prefix") or "")
    if not prefix or not prefix.endswith("/"):
        raise ValueError(f"weights_prefix must be a folder ending in '/', got {prefix!r}")
    return prefix


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]", "_", name)[:100] or "job"


# the deployment -----------------------------------------------------------------------------------

def trainer_deployment_options(num_gpus: float = 1.0, num_cpus: float = 1.0, embedded: bool = False, *,
                               num_replicas: int = 1, max_queued_requests: int = 16) -> dict[str, Any]:
    """Serve options: one job per replica at a time; zero GPUs in the embedded (CPU) profile."""
    return {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": 0 if embedded else num_gpus},
        "num_replicas": num_replicas,
        "max_ongoing_requests": 1,
        "max_queued_requests": max_queued_requests,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        # A job canceled at shutdown stops at its next step; give the step time to end.
        "graceful_shutdown_timeout_s": 60,
    }


def build_trainer_app(runtime: RuntimeConfig, num_gpus: float = 1.0, num_cpus: float = 1.0,
                      embedded: bool = False, *, specs: Sequence[ModelSpec] | None = None,
                      num_replicas: int = 1) -> Application:
    """The trainer as a Serve application; ``specs`` defaults to the replica's built-in catalog."""
    options = trainer_deployment_options(num_gpus, num_cpus, embedded, num_replicas=num_replicas)
    deployment = serve.deployment(TrainerServer).options(**options)
    spec_dicts = [s.model_dump(mode="json") for s in specs] if specs is not None else None
    return deployment.bind(dict(runtime.__dict__), spec_dicts)



def build(args: dict[str, Any]) -> Application:
    """Serve config entry point (``import_path: serve.trainer:build``) with the arguments
    ``{"runtime": {...}, "num_gpus": 1, "num_cpus": 4, "embedded": false, "models_dir": optional}``;
    the replica trains the catalog's enabled trainable models."""
    from models.catalog import Catalog

    catalog = Catalog.load(Path(args["models_dir"]) if args.get("models_dir") else None)
    specs = [s for s in catalog.enabled() if s.trainable]
    return build_trainer_app(RuntimeConfig(**args["runtime"]), float(args.get("num_gpus", 1.0)),
                             float(args.get("num_cpus", 1.0)), bool(args.get("embedded", False)), specs=specs,
                             num_replicas=int(args.get("num_replicas", 1)))
