"""The job state machine: ``queued → running → succeeded | failed | canceled``.

``waiting`` comes before ``queued`` for a pipeline's step whose inputs are other steps' outputs
(no runner claims it; the pipeline releases it to ``queued`` when they succeed) and for the
pipeline's own row until its first step starts. Both may be canceled or failed while waiting.

A retry sends a running job back to ``queued``; the attempt is counted when it is claimed again
(``attempts`` is the number of runs started). A queued job can be canceled,
or failed by maintenance (its model was removed); anything else raises :class:`InvalidTransition`.
"""

from __future__ import annotations

from enum import StrEnum

from api.core.errors import InvalidTransition


class JobStatus(StrEnum):
    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RUNNING})

_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.WAITING: frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED,
                                  JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


def can_transition(current: str, target: str) -> bool:
    return JobStatus(target) in _ALLOWED[JobStatus(current)]


def transition(current: str, target: str) -> JobStatus:
    """Return the new status, or raise if the state machine forbids the change."""
    if not can_transition(current, target):
        raise InvalidTransition(f"job cannot go from {current} to {target}",
                                {"from": current, "to": target})
    return JobStatus(target)


def retry(current: str, attempts: int, max_attempts: int) -> JobStatus:
    """A retryable failure: back to ``queued`` while attempts remain."""
    if JobStatus(current) is not JobStatus.RUNNING:
        raise InvalidTransition(f"only a running job can be retried, not a {current} one",
                                {"from": current, "to": "queued"})
    if attempts >= max_attempts:
        raise InvalidTransition(f"no attempts left ({attempts} of {max_attempts})",
                                {"attempts": attempts, "max_attempts": max_attempts})
    return JobStatus.QUEUED


def is_terminal(status: str) -> bool:
    return JobStatus(status) in TERMINAL
