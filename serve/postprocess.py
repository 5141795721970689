"""``PostprocessServer``: the CPU replica that runs pipelines' post-processing operations (ffmpeg).

A plain class (testable without Ray); :func:`serve.app.build_postprocess_app` turns it into a Serve
deployment (CPU only, never a GPU) whose handle the :class:`serve.executor.RayExecutor` reaches for
jobs whose model is :data:`POSTPROCESS_MODEL`. It takes the same
:class:`~serve.messages.ReplicaRequest` as a generator (``task`` = the operation, ``input`` = its
params plus the storage keys ``api.services.inputs`` resolved: ``video_key`` / ``image_key``,
``video_keys`` (concat), ``audio_key``, ``overlay_key``, and ``source_info(s)``) and streams the
same ``api.core.events`` wire dicts::

    stage postprocess → progress (step/100, stage "postprocess", every 5 %) … → output → done

or an error: a bad operation or params (``models.postprocess.OperationError``) → its code, not
retryable; an input key missing from storage → ``input_missing``, not retryable; ffmpeg failing
otherwise (a crash, a killed process, storage down) → retryable; ffmpeg past its time limit
(``postprocess_timeout``) → not retryable (the same work times out again: infer_output's work
budgets refuse such work before the charge).

The operation (``models.postprocess.run_operation``) runs in a worker thread, never on the event
loop; at most ``concurrency`` at once per replica (more are ``queued``). Inputs are downloaded to a
temp dir, the output is uploaded as ``{output_prefix}0.<ext>`` with a thumbnail (an image's
``0.thumb.jpg``, a video's ``0.poster.png``), then ``{output_prefix}result.json``
(:class:`~serve.messages.ResultRecord`) beside it, so a reclaimed attempt that lands on another
replica (or on this one after a restart) collects the result instead of running again.

Replica-owned like the generator: the run belongs to the replica; a caller that goes away only
stops listening, and a later ``generate`` for the same job attaches to the run (the log so far,
then the live events) unless it failed or was canceled. Only :meth:`PostprocessServer.cancel` stops
it (``should_stop`` is polled by the operation). No batching.

Test hooks (``RuntimeConfig.test_hooks_dir``, off by default): ``{dir}/{job_id}.hold`` and
``{dir}/{job_id}.fail``, see :mod:`serve.testhooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from api.core.events import DoneEvent, ErrorEvent, OutputEvent, ProgressEvent, StageEvent, event_to_wire
from serve.errors import classify
from serve.generator import COUNTS_KEPT, FINISHED_KEPT, FINISHED_TTL_S, RuntimeConfig, _bounded, _Run
from serve.messages import RESULT_NAME, ReplicaRequest, ResultRecord
from serve.testhooks import StepHooks

logger = logging.getLogger(__name__)

POSTPROCESS_MODEL = "postprocess"
"""The ``model`` of every post-processing job (a pipeline's op step); it has no catalog spec."""
APP_NAME = "postprocess"
DEPLOYMENT_NAME = "postprocess"
STAGE = "postprocess"
PROGRESS_TOTAL = 100
PROGRESS_EVERY = 5
"""Percent between two progress events: the operation reports per ffmpeg line, the job per 5 %."""
DEFAULT_CONCURRENCY = 2
"""Operations one replica runs at once (each ffmpeg also uses threads of its own)."""
HOOK_FAIL_CODE = "executor_error"


class InputMissing(Exception):
    """An input key the job names is not in storage (deleted, or never written): not retryable."""


class RunCanceled(Exception):
    """The run was canceled (``cancel``) before its operation started or after it returned."""


class HookFailure(RuntimeError):
    """The test hook's ``{job_id}.fail``: a retryable failure in the middle of the run."""


def replica_id() -> str:
    from serve.generator import replica_id as generator_replica_id

    return generator_replica_id()


def error_of(exc: BaseException) -> tuple[str, bool]:
    """``(code, retryable)`` of a failed operation (see the module doc)."""
    from models.postprocess import OperationCanceled, OperationError, OperationFailed

    if isinstance(exc, RunCanceled | OperationCanceled):
        return "canceled", False
    if isinstance(exc, InputMissing):
        return "input_missing", False
    if isinstance(exc, HookFailure):
        return HOOK_FAIL_CODE, True
    if isinstance(exc, OperationError):  # bad params or input kinds: the same again fails again
        return exc.code, False
    if isinstance(exc, OperationFailed):  # a crash may pass on another try; a timeout would only time out again
        return exc.code, exc.code != "postprocess_timeout"
    code, retryable = classify(exc)
    if code == "generation_failed":  # ffmpeg died, storage failed, …: another try may work
        return "postprocess_failed", True
    return code, retryable


class _Progress:
    """Coalesces the operation's fractions (one per ffmpeg line) into a progress event per 5 %."""

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self.emit = emit
        self.last = -1

    def __call__(self, fraction: float) -> None:
        try:
            percent = int(max(0.0, min(1.0, float(fraction))) * PROGRESS_TOTAL)
        except (TypeError, ValueError):
            return
        first, final = self.last < 0, percent == PROGRESS_TOTAL and self.last < PROGRESS_TOTAL
        if not (first or final or percent >= self.last + PROGRESS_EVERY):
            return
        self.last = percent
        self.emit(event_to_wire(ProgressEvent(percent, PROGRESS_TOTAL, STAGE)))


class PostprocessServer:
    """One replica's post-processing runs (see the module doc); ``runtime`` is a RuntimeConfig dict."""

    def __init__(self, runtime: dict[str, Any], concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.runtime = RuntimeConfig(**runtime)
        self.storage = self.runtime.storage()
        self.concurrency = max(1, int(concurrency))
        self.hooks = StepHooks(self.runtime.test_hooks_dir) if self.runtime.test_hooks_dir else None
        self.runs: dict[str, _Run] = {}
        """Job id → its latest run here: every queued and running one, and the last finished ones."""
        self.runs_by_job: dict[str, int] = {}
        """How many times an operation started for each job here (an attach does not count)."""
        self.attaches: dict[str, int] = {}
        self.canceled: dict[str, None] = {}
        self.canceled_early: dict[str, None] = {}
        """Jobs whose cancel came before their request (bounded): answered ``canceled``, never run."""
        self._job_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None
        self._ffmpeg: bool | None = None
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="postprocess")

    # the deployment's methods ----------------------------------------------------------------
    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one job's events; a second request for the job attaches to its run (or collects
        its stored result); leaving the stream never stops the run."""
        req = ReplicaRequest.model_validate(request)
        # _attachable awaits (threads): without the job's lock two requests arriving together would
        # both find nothing and both start the operation
        async with self._job_lock(req.job_id):
            run = await self._attachable(req)
            if run is None:
                run = self._start(req)
            else:
                self.attaches[req.job_id] = self.attaches.get(req.job_id, 0) + 1
                _bounded(self.attaches)
                logger.info("job %s attempt %d attached to its %s run", req.job_id, req.attempt, run.state)
            run.attempts.append(req.attempt)
            replay, queue = run.listen()
        try:
            for event in replay:
                yield event
            if queue is not None:
                while (event := await queue.get()) is not None:
                    yield event
        finally:
            if queue is not None and queue in run.listeners:
                run.listeners.remove(queue)

    @contextlib.asynccontextmanager
    async def _job_lock(self, job_id: str) -> AsyncIterator[None]:
        """The job's lock; its entry is dropped when its last user leaves."""
        lock, users = self._job_locks.get(job_id, (asyncio.Lock(), 0))
        self._job_locks[job_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._job_locks[job_id]
            if users <= 1:
                del self._job_locks[job_id]
            else:
                self._job_locks[job_id] = (lock, users - 1)

    async def cancel(self, job_id: str) -> bool:
        """Stop the job's run here; True when this replica had it queued or running. A cancel that
        comes before the request is remembered (bounded): that request never runs."""
        run = self.runs.get(job_id)
        if run is None:
            self.canceled_early[job_id] = None
            _bounded(self.canceled_early)
            return False
        if run.finished:
            return False
        run.canceled = True
        self.canceled[job_id] = None
        _bounded(self.canceled)
        logger.info("job %s canceled on this replica (%s)", job_id, run.state)
        if run.state == "queued":  # its task sees it finished and never starts the operation
            run.emit(event_to_wire(ErrorEvent("canceled", "canceled")))
            run.close()
        return True

    def check_health(self) -> None:
        if not self._ffmpeg_exists():  # pragma: no cover - a broken image
            raise RuntimeError("no ffmpeg binary")

    def stats(self) -> dict[str, Any]:
        return {"runs_by_job": dict(self.runs_by_job), "attaches": dict(self.attaches),
                "canceled": list(self.canceled), "concurrency": self.concurrency,
                "running": sum(1 for r in self.runs.values() if r.state == "running"),
                "queued": sum(1 for r in self.runs.values() if r.state == "queued" and not r.finished),
                "jobs": {job_id: {"state": run.state, "attempts": list(run.attempts),
                                  "listeners": len(run.listeners)} for job_id, run in self.runs.items()},
                "replica": replica_id()}

    async def drain(self, timeout_s: float) -> bool:
        """Wait (bounded) until no run is queued or running here; True if none is left."""
        pending = [t for t in self._tasks if not t.done()]
        if not pending:
            return True
        _done, left = await asyncio.wait(pending, timeout=timeout_s)
        return not left

    # runs ------------------------------------------------------------------------------------
    def _start(self, req: ReplicaRequest) -> _Run:
        loop = asyncio.get_running_loop()
        run = _Run(req, loop.time())
        self._keep(run)
        if req.job_id in self.canceled_early:
            logger.info("job %s was canceled before it arrived here; not started", req.job_id)
            run.canceled = True
            run.emit(event_to_wire(ErrorEvent("canceled", "canceled")))
            run.close()
            return run
        # A context of its own: the run outlives the request that started it.
        task = loop.create_task(self._drive(run), name=f"postprocess-{req.job_id}", context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return run

    async def _drive(self, run: _Run) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        try:
            async with self._slots:
                if run.finished:  # canceled while queued
                    return
                run.state = "running"
                self.runs_by_job[run.job_id] = self.runs_by_job.get(run.job_id, 0) + 1
                _bounded(self.runs_by_job)
                run.emit(event_to_wire(StageEvent(STAGE)))
                loop = asyncio.get_running_loop()
                progress = _Progress(lambda event: loop.call_soon_threadsafe(run.emit, event))
                progress(0.0)
                try:
                    outputs, result = await loop.run_in_executor(self._pool, self._execute, run, progress)
                except Exception as exc:  # noqa: BLE001 - becomes the job's error event
                    run.emit(self._error(run, exc))
                    return
                if run.canceled:
                    run.emit(event_to_wire(ErrorEvent("canceled", "canceled")))
                    return
                if progress.last < PROGRESS_TOTAL:
                    run.emit(event_to_wire(ProgressEvent(PROGRESS_TOTAL, PROGRESS_TOTAL, STAGE)))
                for output in outputs:
                    run.emit(output)
                run.emit(event_to_wire(DoneEvent(result)))
        except Exception as exc:  # noqa: BLE001 - a bug here must not hang the callers
            logger.exception("job %s: post-processing failed", run.job_id)
            run.emit(self._error(run, exc))
        finally:
            run.close()
            self._evict()

    def _error(self, run: _Run, exc: BaseException) -> dict[str, Any]:
        code, retryable = ("canceled", False) if run.canceled else error_of(exc)
        if code != "canceled":
            logger.warning("job %s (%s): %s (%s, retryable=%s)", run.job_id, run.request.task, exc, code, retryable)
        return event_to_wire(ErrorEvent(code, str(exc) or type(exc).__name__, retryable))

    def _execute(self, run: _Run, on_progress: Callable[[float], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Worker thread: download the inputs, run the operation, store its output, thumbnail and
        result record; the output event dicts and the done result."""
        from models.postprocess import parse_params, run_operation

        req = run.request
        op = req.task
        params = parse_params(op, dict(req.input))  # it leaves out the reference and resolved-key fields
        with tempfile.TemporaryDirectory(prefix="postprocess-") as tmp:
            root = Path(tmp)
            inputs, overlay, audio = self._download_inputs(req, root / "in")
            if self.hooks is not None:
                if self.hooks.take(req.job_id, "hold"):
                    self.hooks.hold(req.job_id, req.job_id, 1, lambda: run.canceled)
                if self.hooks.take(req.job_id, "fail"):
                    raise HookFailure(f"test hook: job {req.job_id} fails here once")
            if run.canceled:
                raise RunCanceled("canceled")
            out_dir = root / "out"
            out_dir.mkdir()
            started = time.perf_counter()
            result = run_operation(op, params, inputs, out_dir, overlay=overlay, audio=audio,
                                   on_progress=on_progress, should_stop=lambda: run.canceled)
            run_s = time.perf_counter() - started
            if run.canceled:
                raise RunCanceled("canceled")
            output = self._store(req, Path(result.path), str(result.content_type), result.info)
        info = result.info.model_dump(mode="json") if hasattr(result.info, "model_dump") else dict(result.info)
        done = {"op": op, "info": info, "run_s": round(run_s, 3)}
        outputs = [event_to_wire(output)]
        record = ResultRecord(job_id=req.job_id, attempt=req.attempt, outputs=outputs, result=done)
        self.storage.put_bytes(f"{req.output_prefix}{RESULT_NAME}", record.model_dump_json().encode(),
                               "application/json")
        return outputs, done

    def _download_inputs(self, req: ReplicaRequest, folder: Path) -> tuple[list[Path], Path | None, Path | None]:
        data = req.input
        keys: list[str] = []
        if data.get("video_keys"):
            keys = [str(k) for k in data["video_keys"]]
        elif data.get("video_key"):
            keys = [str(data["video_key"])]
        elif data.get("image_key"):
            keys = [str(data["image_key"])]
        folder.mkdir(parents=True)
        inputs = [self._download(key, folder / f"input-{i}{_suffix(key)}") for i, key in enumerate(keys)]
        overlay = self._download(str(data["overlay_key"]), folder / f"overlay{_suffix(str(data['overlay_key']))}") \
            if data.get("overlay_key") else None
        audio = self._download(str(data["audio_key"]), folder / f"audio{_suffix(str(data['audio_key']))}") \
            if data.get("audio_key") else None
        return inputs, overlay, audio

    def _download(self, key: str, path: Path) -> Path:
        try:
            return self.storage.download(key, path)
        except FileNotFoundError as exc:
            raise InputMissing(f"input {key} is not in storage") from exc
        except Exception as exc:
            if type(exc).__name__ in ("NoSuchKey", "S3Error") and "NoSuchKey" in str(exc):
                raise InputMissing(f"input {key} is not in storage") from exc
            raise

    def _store(self, req: ReplicaRequest, path: Path, content_type: str, info: Any) -> OutputEvent:
        """Upload the output as ``0.<ext>`` and its thumbnail; the output event from the probed info."""
        from PIL import Image

        from models.media import extract_poster, thumbnail_jpeg, thumbnail_png

        prefix = req.output_prefix
        key = f"{prefix}0{path.suffix or '.bin'}"
        self.storage.put_file(key, path, content_type)
        if info.kind == "image":
            thumb = f"{prefix}0.thumb.jpg"
            with Image.open(path) as img:
                self.storage.put_bytes(thumb, thumbnail_jpeg(img.convert("RGB")), "image/jpeg")
            return OutputEvent(key=key, content_type=content_type, width=info.width, height=info.height,
                               thumbnail_key=thumb)
        poster = f"{prefix}0.poster.png"
        frame = extract_poster(path)
        with Image.open(_bytes_io(frame)) as img:
            self.storage.put_bytes(poster, thumbnail_png(img.convert("RGB"), max_side=max(info.width, info.height)),
                                   "image/png")
        return OutputEvent(key=key, content_type=content_type, width=info.width, height=info.height,
                           num_frames=info.num_frames, fps=info.fps, duration_s=info.duration_s,
                           thumbnail_key=poster)

    # attach / keep ---------------------------------------------------------------------------
    async def _attachable(self, req: ReplicaRequest) -> _Run | None:
        run = self.runs.get(req.job_id)
        if run is not None and run.reusable:
            if run.state != "succeeded" or await asyncio.to_thread(self._outputs_exist, run.log):
                return run
            logger.warning("job %s: the outputs of its finished run are gone; running it again", req.job_id)
        record = await asyncio.to_thread(self._stored_result, req) if req.output_prefix else None
        if record is None:
            return None
        run = _Run(req, asyncio.get_running_loop().time())
        for output in record.outputs:
            run.emit(output)
        run.emit(event_to_wire(DoneEvent(dict(record.result))))
        run.close()
        self._keep(run)
        logger.info("job %s: collected the result stored by attempt %d", req.job_id, record.attempt)
        return run

    def _outputs_exist(self, log: list[dict[str, Any]]) -> bool:
        return all(self.storage.exists(e["key"]) for e in log if e.get("type") == "output")

    def _stored_result(self, req: ReplicaRequest) -> ResultRecord | None:
        key = f"{req.output_prefix}{RESULT_NAME}"
        try:
            if not self.storage.exists(key):
                return None
            record = ResultRecord.model_validate_json(self.storage.get_bytes(key))
        except Exception as exc:  # noqa: BLE001 - an unreadable record: run the job again
            logger.warning("job %s: cannot read %s (%s)", req.job_id, key, exc)
            return None
        if record.job_id != req.job_id or not self._outputs_exist(record.outputs):
            return None
        return record

    def _keep(self, run: _Run) -> None:
        self.runs.pop(run.job_id, None)
        self.runs[run.job_id] = run
        self._evict()

    def _evict(self) -> None:
        now = time.monotonic()
        finished = [r for r in self.runs.values() if r.finished]
        excess = len(finished) - FINISHED_KEPT
        for old in finished:
            if excess > 0 or now - (old.finished_at or now) > FINISHED_TTL_S:
                del self.runs[old.job_id]
                excess -= 1
        _bounded(self.runs_by_job, COUNTS_KEPT)

    def _ffmpeg_exists(self) -> bool:
        if self._ffmpeg is None:
            import imageio_ffmpeg

            try:
                self._ffmpeg = Path(imageio_ffmpeg.get_ffmpeg_exe()).exists()
            except Exception:  # noqa: BLE001 - no binary at all
                self._ffmpeg = False
        return self._ffmpeg


def _suffix(key: str) -> str:
    suffix = PurePosixPath(key).suffix.lower()
    return suffix if suffix.isascii() and 1 < len(suffix) <= 6 and suffix[1:].isalnum() else ""


def _bytes_io(data: bytes) -> Any:
    import io

    return io.BytesIO(data)
