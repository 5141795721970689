"""The order in which the runner will start the queued jobs, and when each should finish.

Plain functions over plain values (no database): :mod:`api.services.queue` feeds them rows.

The order mirrors ``Runner.claim_next`` (``api/runner/runner.py``): highest ``priority`` first,
then the user served least recently (never served first), then the oldest job; every claim
marks its user as served just now, so within a priority the users take turns (round-robin).
If the runner's ordering changes, this function must change with it (its tests pin both).
"""

from __future__ import annotations

import heapq
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class QueuedJob:
    id: str
    user_id: str
    priority: int
    created_at: datetime


def timestamp(value: datetime) -> float:
    """Comparable seconds; SQLite hands back naive datetimes that are UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def claim_order(jobs: Iterable[QueuedJob], last_served: Mapping[str, datetime | None]) -> list[str]:
    """Job ids in the order the runner claims them, simulating its round-robin claim by claim.

    ``last_served``: each user's ``User.last_served_at`` now (absent or None: never served).
    Each user's own jobs go in (priority desc, created_at) order, so only each user's head job
    competes; a served user's key moves past every real timestamp, behind the users not yet served.
    """
    per_user: dict[str, deque[QueuedJob]] = {}
    for job in sorted(jobs, key=lambda j: (-j.priority, timestamp(j.created_at), j.id)):
        per_user.setdefault(job.user_id, deque()).append(job)

    def served_key(user_id: str) -> tuple[int, float]:
        served = last_served.get(user_id)
        return (0, 0.0) if served is None else (1, timestamp(served))

    heap: list[tuple[int, tuple[int, float], float, str, str]] = []
    for user_id, queue in per_user.items():
        head = queue[0]
        heap.append((-head.priority, served_key(user_id), timestamp(head.created_at), head.id, user_id))
    heapq.heapify(heap)
    order: list[str] = []
    turn = 0
    while heap:
        _p, _served, _created, job_id, user_id = heapq.heappop(heap)
        queue = per_user[user_id]
        queue.popleft()
        order.append(job_id)
        turn += 1
        if queue:
            head = queue[0]
            heapq.heappush(heap, (-head.priority, (2, float(turn)), timestamp(head.created_at), head.id, user_id))
    return order


def work_units(params: Mapping[str, Any]) -> float:
    """How much compute a request asks for, relative to others of the same model:
    steps × frames × pixels × outputs (each factor 1 when the input does not say): a job of
    ``num_outputs`` n generates n images, so it is n times the work of one."""
    units = 1.0
    for name in ("steps", "num_frames", "width", "height", "num_outputs"):
        value = params.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            units *= float(value)
    return units


def seconds_per_unit(samples: Iterable[tuple[float, Mapping[str, Any]]]) -> float | None:
    """The median measured seconds per work unit over ``(run_s, input)`` of finished jobs;
    None when nothing was measured (an estimate is never a made-up constant)."""
    rates = [run_s / work_units(params) for run_s, params in samples if run_s is not None and run_s > 0]
    return statistics.median(rates) if rates else None


def finish_times(running_remaining: Sequence[float], queued_durations: Sequence[float | None],
                 slots: int) -> list[float | None]:
    """Seconds from now until each queued job (in claim order) finishes, on ``slots`` parallel
    slots: the running jobs hold slots for their remaining time, then every queued job takes
    the slot that frees first. A job of unknown duration makes it and every job after it unknown."""
    free = [0.0] * max(1, slots)
    heapq.heapify(free)
    for remaining in sorted(running_remaining):
        start = heapq.heappop(free)
        heapq.heappush(free, start + max(0.0, remaining))
    out: list[float | None] = []
    unknown = False
    for duration in queued_durations:
        if unknown or duration is None:
            unknown = True
            out.append(None)
            continue
        start = heapq.heappop(free)
        end = start + max(0.0, duration)
        heapq.heappush(free, end)
        out.append(end)
    return out


def running_remaining(estimate_s: float | None, elapsed_s: float, progress: float) -> float | None:
    """Seconds a running job still needs: the measured estimate less the time it has run (never
    less than the estimate's share of the progress still to make); without an estimate, its own
    pace so far; None when neither is known."""
    progress = min(max(progress, 0.0), 1.0)
    if estimate_s is not None:
        return max(estimate_s - elapsed_s, estimate_s * (1.0 - progress), 0.0)
    if progress > 0.0 and elapsed_s > 0.0:
        return elapsed_s * (1.0 - progress) / progress
    return None
