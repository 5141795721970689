"""Small asyncio helpers shared by the API, the runner and the replicas (plain Python, no I/O)."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` has passed; True if it was set.

    Not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 that returns normally when the
    task is cancelled just as the event is set, swallowing the cancel, so a loop built on it may
    never stop (a ``stop()`` that cancels it then hangs). ``asyncio.timeout`` tells its own
    cancellation from a caller's.
    """
    try:
        async with asyncio.timeout(max(0.0, timeout_s)):
            await event.wait()
    except TimeoutError:
        return False
    return True
