"""A test-only hook that holds a generation after a given step until the test releases it.

Off unless the replica's runtime has ``test_hooks_dir`` (setting ``CINEWEAVE_TEST_HOOKS_DIR``,
default unset; never set it in production). With it set, a test that needs a job running at a
known moment (cancel mid-run, restart the API mid-run, queue requests behind a running batch):

1. writes ``{dir}/{token}.hold`` containing a step number ``k``, or several (``"2 5"`` or
   ``"2,5"``: held at each in turn), then submits a job whose prompt contains ``token`` (``token``:
   8-64 characters of ``[A-Za-z0-9_-]``);
2. waits for ``{dir}/{job_id}.held`` (written each time the job's batch has done a hold step's
   denoising steps; it holds that step number, so a test waits for the content it expects);
3. does what it needs, then writes ``{dir}/{job_id}.release`` (or ``{dir}/{token}.release`` for
   every job of that token, and every one of their holds). A hold that returns deletes
   ``{job_id}.release``, so the job's next hold blocks again until the next release.

Training (``serve.trainer``) matches the token against the job's ``trigger_word`` and holds
after the first checkpoint stored at or past each step (so a test can act on a stored checkpoint).

Post-processing (``serve.postprocess``) has no prompt to carry a token, so its hooks are keyed by
job id: ``{dir}/{job_id}.hold`` (any content) holds the job's next run once its inputs are
downloaded, before the operation starts (``{job_id}.held`` then holds ``1``; release it with
``{job_id}.release``); the ``.hold`` file is consumed when that run takes it, so it holds one run.
``{dir}/{job_id}.fail`` (any content) makes the job's next run fail there with the retryable code
``executor_error``; it is consumed too (one failure per file). See :meth:`StepHooks.take`.

A held job also goes on when it is canceled, and after :data:`HOLD_MAX_S` in any case, so a test
that forgets to release it cannot wedge a replica. The hold blocks the pipeline thread (the whole
batch waits), never the replica's event loop. The control files are read from a directory only the
test writes to, so job input alone (the prompt is the client's) can never hold anything.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HOLD_MAX_S = 120.0
POLL_S = 0.05
TOKEN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_STEPS = 16
"""Hold steps one ``.hold`` file may name (more are ignored)."""


@dataclass(frozen=True)
class Hold:
    """A test's hold on a job: its token and the steps it is held at, ascending."""

    token: str
    steps: tuple[int, ...]


def parse_steps(text: str) -> tuple[int, ...]:
    """The hold steps a ``.hold`` file names: one number or several, split by spaces or commas;
    empty means step 1. Raises ValueError for anything that is not a positive number."""
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    steps = sorted({int(p) for p in parts[:MAX_STEPS]}) if parts else [1]
    if steps[0] < 1:
        raise ValueError(f"not a step number: {steps[0]}")
    return tuple(steps)


class StepHooks:
    def __init__(self, root: str | Path, max_wait_s: float = HOLD_MAX_S) -> None:
        self.root = Path(root)
        self.max_wait_s = max_wait_s

    def hold_for(self, prompt: str) -> Hold | None:
        """The hold of a job with this prompt (its token and steps), if a test asked for one."""
        try:
            files = sorted(self.root.glob("*.hold"))[:100]
        except OSError:
            return None
        for path in files:
            token = path.stem
            if TOKEN.match(token) and token in prompt:
                try:
                    return Hold(token, parse_steps(path.read_text()))
                except (OSError, ValueError):
                    logger.warning("test hook %s: not step numbers", path)
        return None

    def take(self, job_id: str, suffix: str) -> bool:
        """Whether ``{job_id}.{suffix}`` was there (the job-keyed hooks: ``hold``, ``fail``); it is
        removed, so one file acts on one run."""
        if not JOB_ID.match(job_id):
            return False
        try:
            (self.root / f"{job_id}.{suffix}").unlink()
        except OSError:
            return False
        return True

    def hold(self, job_id: str, token: str, step: int, should_go: Callable[[], bool]) -> None:
        """Announce ``{job_id}.held`` (the step) and block until released, ``should_go()``, or the
        time cap; then consume ``{job_id}.release`` so the job's next hold blocks again."""
        own = self.root / f"{job_id}.release"
        held = self.root / f"{job_id}.held"
        temp = held.with_name(f"{job_id}.held.tmp")
        temp.write_text(str(step))
        temp.replace(held)  # atomic: a reader sees the old step or the new one, never an empty file
        logger.warning("test hook: job %s held at step %d", job_id, step)
        releases = (own, self.root / f"{token}.release")
        deadline = time.monotonic() + self.max_wait_s
        try:
            while time.monotonic() < deadline:
                if any(p.exists() for p in releases) or should_go():
                    return
                time.sleep(POLL_S)
            logger.warning("test hook: job %s released after the %.0fs cap", job_id, self.max_wait_s)
        finally:
            own.unlink(missing_ok=True)
