"""Live step previews on a generator replica: every k steps, a small JPEG per job of the batch.

The denoising thread only takes the job's latent slice (copied to the CPU, see
:meth:`models.previews.Previewer.capture`) and hands it to one worker thread that projects and
encodes it; the result goes to the job's current listeners as a ``preview`` event (never into the
run's log: previews are not replayed). At most one preview per job is in flight: while the worker
is still busy with a job's previous one, the new one is dropped, so the batch never waits for it.
A preview that fails is logged and dropped; it never fails the job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from api.core.events import PreviewEvent, event_to_wire
from models.spec import ModelSpec

logger = logging.getLogger(__name__)

Publish = Callable[[int, dict[str, Any]], None]
"""``publish(run_index, event)``: hand a preview event of the batch's run ``run_index`` to its
listeners (called from the worker thread)."""


class PreviewPump:
    """One replica's previews: the spec's ``every_k_steps``, the previewer and its worker thread."""

    def __init__(self, spec: ModelSpec, generator: Any) -> None:
        self.every = spec.preview_every
        self.previewer: Any = None
        loaded = getattr(generator, "loaded", None)
        if self.every > 0 and loaded is not None:
            try:
                from models.previews import Previewer

                self.previewer = Previewer.for_spec(spec, loaded.pipe, getattr(generator, "device", "cpu"))
            except Exception:  # noqa: BLE001 - no previews is better than no replica
                logger.exception("%s: previews disabled, the previewer could not be built", spec.id)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preview")
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self.sent = 0
        self.dropped = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.previewer is not None and self.every > 0

    def stats(self) -> dict[str, Any]:
        return {"every_k_steps": self.every if self.enabled else 0,
                "decoder": self.previewer.decoder if self.previewer is not None else None,
                "sent": self.sent, "dropped": self.dropped, "failed": self.failed}

    def callback(self, job_ids: Sequence[str], counts: Sequence[int], publish: Publish) -> Any:
        """The ``on_latents`` for one batch (``models.generator.OnLatents``), or None when previews are
        off. ``job_ids[i]`` asked for ``counts[i]`` images (consecutive generator inputs); each job's
        preview shows its first image."""
        if not self.enabled:
            return None
        first_input: dict[int, int] = {}
        at = 0
        for run_index, count in enumerate(counts):
            first_input[at] = run_index
            at += count

        def on_latents(done: int, total: int, indices: Sequence[int], latents: Any, call: Any) -> None:
            if done % self.every or done >= total:  # the last step: the real image follows at once
                return
            for row, input_index in enumerate(indices):
                run_index = first_input.get(input_index)
                if run_index is not None:
                    self._offer(job_ids[run_index], run_index, done, total, latents, row, call, publish)

        return on_latents

    def _offer(self, job_id: str, run_index: int, done: int, total: int, latents: Any, row: int,
               call: Any, publish: Publish) -> None:
        """Denoising thread: capture and hand over, unless this job's previous preview is still busy."""
        with self._lock:
            if job_id in self._busy:
                self.dropped += 1
                return
            self._busy.add(job_id)
        try:
            captured = self.previewer.capture(latents, row, dict(call))
            future = self._pool.submit(self.previewer.render, captured)
        except Exception as exc:  # noqa: BLE001 - a preview never fails the job
            self._release(job_id)
            self.failed += 1
            logger.warning("preview of job %s at step %d failed: %s: %s", job_id, done, type(exc).__name__, exc)
            return

        def finished(fut: Future[Any]) -> None:
            self._release(job_id)
            if fut.cancelled():  # the replica is closing
                return
            try:
                image = fut.result()
            except Exception as exc:  # noqa: BLE001 - see above
                self.failed += 1
                logger.warning("preview of job %s at step %d failed: %s: %s", job_id, done,
                               type(exc).__name__, exc)
                return
            self.sent += 1
            event = PreviewEvent(step=done, total=total, image=image.data_url, width=image.width,
                                 height=image.height)
            with contextlib.suppress(RuntimeError):  # the replica's loop is gone (shutdown)
                publish(run_index, event_to_wire(event))

        future.add_done_callback(finished)

    def _release(self, job_id: str) -> None:
        with self._lock:
            self._busy.discard(job_id)

    def close(self, wait: bool = False) -> None:
        """Stop the worker; ``wait``: let the renders already handed over finish first."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
