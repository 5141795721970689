"""Queue position and ETA of active jobs, for the job views and SSE.

Position: how many queued jobs of the same model (and kind) the runner will start before this
one, from :func:`api.core.queueing.claim_order` over every queued job (all models take part in
the users' round-robin), so priority tiers and fairness count as the runner applies them.

ETA: seconds until the job should finish, from what this cluster measured: the median
seconds per work unit (steps × frames × pixels) over the model's recent succeeded local jobs,
scaled to each job's own input, scheduled over the model's slots behind the jobs ahead of it and
the running ones. Nothing measured yet: ``eta_s`` is None.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select

from api.core.jobs import JobStatus
from api.core.queueing import (
    QueuedJob,
    claim_order,
    finish_times,
    running_remaining,
    seconds_per_unit,
    timestamp,
    work_units,
)
from api.db.engine import Database
from api.db.tables import Job, User, utcnow
from api.settings import Settings
from models.catalog import Catalog

Key = tuple[str, str]  # (model, kind): a model's trainings queue for the trainer, not the generator


@dataclass(frozen=True)
class QueueEstimate:
    queue_position: int | None = None
    eta_s: float | None = None


UNKNOWN = QueueEstimate()


class QueueService:
    def __init__(self, db: Database, settings: Settings, catalog: Catalog) -> None:
        self.db = db
        self.settings = settings
        self.catalog = catalog
        self._rates: dict[Key, tuple[float, float | None]] = {}  # key -> (monotonic expiry, s/unit)
        self._lock = threading.Lock()

    def slots(self, model: str) -> int:
        """How many jobs of one model run at once."""
        if self.settings.queue_slots_per_model is not None:
            return self.settings.queue_slots_per_model
        concurrency = max(1, self.settings.runner_concurrency)
        spec = self.catalog.get(model)
        if spec is None or spec.remote_only:
            return concurrency
        return max(1, min(concurrency, spec.serving.max_replicas))

    def seconds_per_unit(self, model: str, kind: str) -> float | None:
        """Median measured seconds per work unit of a model's recent succeeded local runs (cached)."""
        key = (model, kind)
        now = time.monotonic()
        with self._lock:
            cached = self._rates.get(key)
            if cached is not None and cached[0] > now:
                return cached[1]
        with self.db.read() as session:
            rows = session.execute(
                select(Job.run_s, Job.input)
                .where(Job.status == JobStatus.SUCCEEDED.value, Job.model == model, Job.kind == kind,
                       Job.run_s.is_not(None), or_(Job.provider.is_(None), Job.provider == "local"))
                .order_by(Job.completed_at.desc()).limit(self.settings.queue_eta_samples)).all()
        rate = seconds_per_unit((float(run_s), params or {}) for run_s, params in rows)
        if rate is not None:  # not cached while unmeasured: the first success shows at once
            with self._lock:
                self._rates[key] = (now + self.settings.queue_eta_cache_s, rate)
        return rate

    def estimates(self, jobs: Iterable[Job]) -> dict[str, QueueEstimate]:
        """Position and ETA of each queued or running job given (one computation for all).

        Every queued job takes part in the order (a claim of any model moves its user's turn), but
        only its cheap columns are read; inputs only of the jobs whose durations the ETAs need.
        """
        active = [j for j in jobs if j.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value)]
        if not active:
            return {}
        keys = {(j.model, j.kind) for j in active}
        rates = {key: self.seconds_per_unit(*key) for key in keys}
        now = utcnow()
        with self.db.read() as session:
            queued_rows = session.execute(
                select(Job.id, Job.user_id, Job.priority, Job.created_at, Job.model, Job.kind,
                       User.last_served_at).join(User, User.id == Job.user_id)
                .where(Job.status == JobStatus.QUEUED.value,
                       # as claim_next: a passed start deadline (Cancel-After) is aborted, never started
                       or_(Job.start_deadline_at.is_(None), Job.start_deadline_at > now))).all()
            served: dict[str, datetime | None] = {row.user_id: row.last_served_at for row in queued_rows}
            running_rows = session.execute(
                select(Job.id, Job.model, Job.kind, Job.started_at, Job.progress, Job.input)
                .where(Job.status == JobStatus.RUNNING.value,
                       Job.model.in_(sorted({m for m, _ in keys})))).all()
            key_of = {row.id: (row.model, row.kind) for row in queued_rows}
            order = claim_order((QueuedJob(row.id, row.user_id, row.priority, row.created_at)
                                 for row in queued_rows), served)
            ahead: dict[Key, list[str]] = {key: [] for key in keys}
            for job_id in order:
                if key_of[job_id] in ahead:
                    ahead[key_of[job_id]].append(job_id)
            # the last job asked about bounds which inputs are needed (the ones after it change nothing)
            wanted = {j.id for j in active}
            need: list[str] = []
            for key, ids in ahead.items():
                if rates[key] is None:
                    continue
                last = max((i for i, job_id in enumerate(ids) if job_id in wanted), default=-1)
                need.extend(ids[:last + 1])
            inputs: dict[str, dict[str, Any]] = {}
            for chunk in range(0, len(need), 500):
                inputs.update(session.execute(select(Job.id, Job.input)
                                              .where(Job.id.in_(need[chunk:chunk + 500]))).tuples().all())

        def duration(key: Key, params: dict[str, Any] | None) -> float | None:
            rate = rates.get(key)
            return None if rate is None else rate * work_units(params or {})

        out: dict[str, QueueEstimate] = {}
        busy: dict[Key, list[float]] = {}
        for row in running_rows:
            key = (row.model, row.kind)
            if key not in keys:
                continue
            elapsed = max(0.0, timestamp(now) - timestamp(row.started_at)) if row.started_at else 0.0
            remaining = running_remaining(duration(key, row.input), elapsed, row.progress or 0.0)
            out[row.id] = QueueEstimate(None, None if remaining is None else round(remaining, 1))
            busy.setdefault(key, []).append(0.0 if remaining is None else remaining)
        for key, ids in ahead.items():
            durations = [duration(key, inputs.get(j)) if rates[key] is not None else None for j in ids]
            ends = finish_times(busy.get(key, []), durations, self.slots(key[0]))
            for position, (job_id, end) in enumerate(zip(ids, ends, strict=True)):
                out[job_id] = QueueEstimate(position, None if end is None else round(end, 1))
        return {j.id: out.get(j.id, UNKNOWN) for j in active}

    def estimate(self, job: Job) -> QueueEstimate:
        alone = self._alone(job)
        if alone is not None:
            return alone
        return self.estimates([job]).get(job.id, UNKNOWN)

    def _alone(self, job: Job) -> QueueEstimate | None:
        """A queued job with no other active job of its model and kind (the common case of a fresh
        submission): what :meth:`estimates` says, from one indexed existence query (position 0; the
        ETA is its own duration). None when the full computation is needed."""
        if job.status != JobStatus.QUEUED.value:
            return None
        now = utcnow()
        with self.db.read() as session:  # the job itself must be in the order (deadline not passed)
            active = session.execute(
                select(Job.id).where(
                    Job.model == job.model, Job.kind == job.kind,
                    or_(Job.status == JobStatus.RUNNING.value,
                        (Job.status == JobStatus.QUEUED.value)
                        & or_(Job.start_deadline_at.is_(None), Job.start_deadline_at > now)))
                .limit(2)).scalars().all()
        if active != [job.id]:
            return None
        rate = self.seconds_per_unit(job.model, job.kind)
        duration = None if rate is None else rate * work_units(job.input or {})
        end = finish_times([], [duration], self.slots(job.model))[0]
        return QueueEstimate(0, None if end is None else round(end, 1))
