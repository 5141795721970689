"""Pacing of cross-process preview NOTIFYs (``api.runner.preview_notify``): one per job per
interval, the newest wins, a bounded number at once, a finished job's waiting preview dropped.
The clock and the timer are the test's: nothing here waits on real time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from api.runner.preview_notify import PreviewThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Timers:
    """``call_later`` that only records: the test fires a timer when its clock says so."""

    def __init__(self) -> None:
        self.scheduled: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> object:
        self.scheduled.append((delay, callback))
        return object()

    def fire(self) -> float:
        delay, callback = self.scheduled.pop(0)
        callback()
        return delay


class Sends:
    def __init__(self, block: bool = False) -> None:
        self.sent: list[tuple[str, int]] = []
        self.gate = asyncio.Event()
        if not block:
            self.gate.set()
        self.active = 0
        self.most_active = 0

    async def __call__(self, job_id: str, notice: dict[str, Any]) -> None:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await self.gate.wait()
            self.sent.append((job_id, notice["preview"]["step"]))
        finally:
            self.active -= 1


def notice(job_id: str, step: int) -> dict[str, Any]:
    return {"job": job_id, "type": "preview", "preview": {"step": step}}


async def settle(throttle: PreviewThrottle) -> None:
    for _ in range(5):  # let started sends run (bounded: each is a few awaits)
        await throttle.drain()
        await asyncio.sleep(0)


async def test_one_send_per_job_per_interval_and_only_the_newest() -> None:
    clock, timers, sends = Clock(), Timers(), Sends()
    throttle = PreviewThrottle(sends, interval_s=0.25, clock=clock, call_later=timers)
    throttle.offer("job_a", notice("job_a", 1))  # the first goes at once
    await settle(throttle)
    assert sends.sent == [("job_a", 1)]
    clock.now += 0.1
    for step in (2, 3, 4):  # within the interval: kept, each replacing the older
        throttle.offer("job_a", notice("job_a", step))
    await settle(throttle)
    assert sends.sent == [("job_a", 1)]
    assert throttle.pending("job_a") == notice("job_a", 4) and throttle.dropped == 2
    assert len(timers.scheduled) == 1 and abs(timers.scheduled[0][0] - 0.15) < 1e-9  # due 0.25 after the first
    clock.now += 0.15
    timers.fire()
    await settle(throttle)
    assert sends.sent == [("job_a", 1), ("job_a", 4)]
    clock.now += 1.0  # past the interval: the next goes at once, no timer
    throttle.offer("job_a", notice("job_a", 5))
    await settle(throttle)
    assert sends.sent[-1] == ("job_a", 5) and timers.scheduled == []


async def test_jobs_are_paced_apart() -> None:
    clock, timers, sends = Clock(), Timers(), Sends()
    throttle = PreviewThrottle(sends, interval_s=0.25, clock=clock, call_later=timers)
    throttle.offer("job_a", notice("job_a", 1))
    throttle.offer("job_b", notice("job_b", 1))  # another job's interval is its own
    await settle(throttle)
    assert sorted(sends.sent) == [("job_a", 1), ("job_b", 1)]


async def test_sends_at_once_are_bounded() -> None:
    clock, timers, sends = Clock(), Timers(), Sends(block=True)
    throttle = PreviewThrottle(sends, interval_s=0.25, concurrency=2, clock=clock, call_later=timers)
    for index in range(5):
        throttle.offer(f"job_{index}", notice(f"job_{index}", 1))
    for _ in range(10):
        await asyncio.sleep(0)
    assert sends.active == 2 and sends.sent == []  # the other three wait for a slot
    sends.gate.set()
    await settle(throttle)
    assert len(sends.sent) == 5 and sends.most_active == 2


async def test_a_preview_arriving_during_a_send_waits_for_it_then_its_interval() -> None:
    clock, timers, sends = Clock(), Timers(), Sends(block=True)
    throttle = PreviewThrottle(sends, interval_s=0.25, clock=clock, call_later=timers)
    throttle.offer("job_a", notice("job_a", 1))
    await asyncio.sleep(0)
    clock.now += 1.0  # the send is slow: the interval passed while it ran
    throttle.offer("job_a", notice("job_a", 2))
    await asyncio.sleep(0)
    assert sends.active == 1  # never two of one job at once
    sends.gate.set()
    await settle(throttle)
    assert sends.sent == [("job_a", 1), ("job_a", 2)]


async def test_a_finished_jobs_waiting_preview_is_dropped() -> None:
    clock, timers, sends = Clock(), Timers(), Sends()
    throttle = PreviewThrottle(sends, interval_s=0.25, clock=clock, call_later=timers)
    throttle.offer("job_a", notice("job_a", 1))
    await settle(throttle)
    throttle.offer("job_a", notice("job_a", 2))  # waits for the interval
    throttle.forget("job_a")  # the job ended
    clock.now += 1.0
    timers.fire()
    await settle(throttle)
    assert sends.sent == [("job_a", 1)] and throttle.pending("job_a") is None


async def test_a_failing_send_does_not_stop_the_next() -> None:
    clock, timers = Clock(), Timers()
    calls: list[int] = []

    async def send(job_id: str, data: dict[str, Any]) -> None:
        calls.append(data["preview"]["step"])
        raise RuntimeError("database away")

    throttle = PreviewThrottle(send, interval_s=0.25, clock=clock, call_later=timers)
    throttle.offer("job_a", notice("job_a", 1))
    await settle(throttle)
    clock.now += 1.0
    throttle.offer("job_a", notice("job_a", 2))
    await settle(throttle)
    assert calls == [1, 2]
