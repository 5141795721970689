"""A test-only hook that holds a generation after a given step until the test releases it.

Off unless the replica's runtime has ``test_hooks_dir`` (setting ``CINEWEAVE_TEST_HOOKS_DIR``,
default unset; never set it in production). With it set, a test that needs a job running at a
known moment (cancel mid-run, restart the API mid-run, queue requests behind a running batch):

1. writes ``{dir}/{token}.hold`` containing a step number ``k`` (``token``: 8-64 characters of
   ``[A-Za-z0-9_-]``), then submits a job whose prompt contains ``token``;
2. waits for ``{dir}/{job_id}.held`` (written once the job's batch has done ``k`` denoising steps;
   it holds the step number);
3. does what it needs, then writes ``{dir}/{job_id}.release`` (or ``{dir}/{token}.release`` for
   every job of that token).

Training (``serve.trainer``) matches the token against the job's ``trigger_word`` and holds
after the first checkpoint stored at or past step ``k`` (so a test can act on a stored checkpoint).

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
from pathlib import Path

logger = logging.getLogger(__name__)

HOLD_MAX_S = 120.0
POLL_S = 0.05
TOKEN = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


class StepHooks:
    def __init__(self, root: str | Path, max_wait_s: float = HOLD_MAX_S) -> None:
        self.root = Path(root)
        self.max_wait_s = max_wait_s

    def hold_for(self, prompt: str) -> tuple[str, int] | None:
        """The (token, step) a job with this prompt is held at, if a test asked for one."""
        try:
            files = sorted(self.root.glob("*.hold"))[:100]
        except OSError:
            return None
        for path in files:
            token = path.stem
            if TOKEN.match(token) and token in prompt:
                try:
                    return token, int(path.read_text().strip() or "1")
                except (OSError, ValueError):
                    logger.warning("test hook %s: not a step number", path)
        return None

    def hold(self, job_id: str, token: str, step: int, should_go: Callable[[], bool]) -> None:
        """Announce ``{job_id}.held`` and block until released, ``should_go()``, or the time cap."""
        (self.root / f"{job_id}.held").write_text(str(step))
        logger.warning("test hook: job %s held at step %d", job_id, step)
        releases = (self.root / f"{job_id}.release", self.root / f"{token}.release")
        deadline = time.monotonic() + self.max_wait_s
        while time.monotonic() < deadline:
            if any(p.exists() for p in releases) or should_go():
                return
            time.sleep(POLL_S)
        logger.warning("test hook: job %s released after the %.0fs cap", job_id, self.max_wait_s)
