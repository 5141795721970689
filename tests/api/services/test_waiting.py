"""Holding a request until its job ends (``Prefer: wait``, synchronous OpenAI images)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from api.core.errors import NotFound
from api.services.waiting import wait_for_job
from tests.fixtures.fake_executor import FakeExecutor


async def test_returns_as_soon_as_the_job_ends_not_at_the_poll(make_api: Any, storage: Any) -> None:
    gate = threading.Event()
    api = await make_api(executor=FakeExecutor(storage=storage, gates={"held": gate}))
    user = api.user(credits=100)
    job = (await api.submit(user.api_key, input={"prompt": "held"})).json()
    waiting = asyncio.create_task(wait_for_job(api.state.jobs, None, job["id"], 30, poll_s=60))
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.set()
    # with a 60 s poll only the bus can wake the waiter in time
    done = await asyncio.wait_for(waiting, timeout=15)
    assert done.status == "succeeded"


async def test_gives_back_the_job_as_it_stands_at_the_timeout(make_api: Any, storage: Any) -> None:
    gate = threading.Event()
    api = await make_api(executor=FakeExecutor(storage=storage, gates={"held": gate}))
    user = api.user(credits=100)
    job = (await api.submit(user.api_key, input={"prompt": "held"})).json()
    try:
        got = await wait_for_job(api.state.jobs, None, job["id"], 0.2, poll_s=0.05)
        assert got.status in ("queued", "running")
    finally:
        gate.set()


async def test_scoped_to_the_caller(make_api: Any) -> None:
    api = await make_api(run_runner=False)
    owner, other = api.user(credits=100), api.user(credits=100)
    job = (await api.submit(owner.api_key)).json()
    with pytest.raises(NotFound):
        await wait_for_job(api.state.jobs, other.user, job["id"], 1)
