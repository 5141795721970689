"""``api.core.aio.wait_event``: set or timed out, and never swallowing a cancel."""

from __future__ import annotations

import asyncio

from api.core.aio import wait_event


async def test_wait_event_never_swallows_a_cancel() -> None:
    """A loop waiting on ``wait_event`` stops when it is canceled just as its event is set (on
    Python 3.11 ``asyncio.wait_for(event.wait(), ...)`` returns normally then, and the loop goes on)."""
    event = asyncio.Event()
    rounds = 0

    async def loop_forever() -> None:
        nonlocal rounds
        while True:
            await wait_event(event, 10.0)
            rounds += 1
            event.clear()

    task = asyncio.create_task(loop_forever())
    for _ in range(3):
        await asyncio.sleep(0)  # the task now waits on the event
    event.set()
    task.cancel()  # in the same step: the wait sees both the set event and the cancel
    done, _ = await asyncio.wait([task], timeout=5)
    assert done == {task} and task.cancelled() and rounds == 0


async def test_wait_event_answers_set_or_timed_out() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0) is False
    event.set()
    assert await wait_event(event, 0) is True
