"""Holding a request until its job ends: Replicate's ``Prefer: wait`` and OpenAI's synchronous
images calls. Woken by the event bus (this process) or ``notify`` (other processes); the poll is
only a safety net, so a job that ends is answered at once."""

from __future__ import annotations

import asyncio
import logging

from api.core.aio import wait_event
from api.core.jobs import TERMINAL
from api.db.tables import Job, User
from api.services.jobs import JobService

logger = logging.getLogger(__name__)


def is_terminal(job: Job) -> bool:
    return job.status in {s.value for s in TERMINAL}


async def wait_for_job(jobs: JobService, user: User | None, job_id: str, timeout_s: float,
                       *, poll_s: float = 1.0) -> Job:
    """The job once it is terminal, or as it stands when ``timeout_s`` has passed.

    ``user`` scopes the read as :meth:`JobService.get` does (another user's job is not found).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, timeout_s)
    while True:
        waiter = jobs.bus.waiter(job_id)  # registered before the read: a change after it still wakes us
        try:
            job = await asyncio.to_thread(jobs.get, user, job_id)
            remaining = deadline - loop.time()
            if is_terminal(job) or remaining <= 0:
                return job
            await wait_event(waiter, min(poll_s, remaining))
        finally:
            jobs.bus.release(job_id, waiter)
