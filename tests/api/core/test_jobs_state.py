"""The job state machine: every (from, to) pair, allowed or forbidden, and retries."""

from __future__ import annotations

import itertools

import pytest

from api.core.errors import InvalidTransition
from api.core.jobs import ACTIVE, TERMINAL, JobStatus, can_transition, is_terminal, retry, transition

W, Q, R, S, F, C = (JobStatus.WAITING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED,
                    JobStatus.FAILED, JobStatus.CANCELED)

ALLOWED = {
    (W, Q), (W, R), (W, C), (W, F),  # a pipeline step released, a pipeline started; both end early
    (Q, R), (Q, C), (Q, F),
    (R, S), (R, F), (R, C), (R, Q),
}
PAIRS = list(itertools.product(JobStatus, JobStatus))


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED))
def test_allowed_transitions(current: JobStatus, target: JobStatus) -> None:
    assert can_transition(current, target)
    assert transition(current.value, target.value) is target


@pytest.mark.parametrize(("current", "target"), [p for p in PAIRS if p not in ALLOWED])
def test_forbidden_transitions_raise(current: JobStatus, target: JobStatus) -> None:
    assert not can_transition(current, target)
    with pytest.raises(InvalidTransition) as info:
        transition(current.value, target.value)
    assert info.value.details == {"from": current.value, "to": target.value}


def test_terminal_states_have_no_way_out() -> None:
    assert TERMINAL == {S, F, C}
    assert ACTIVE == {W, Q, R}
    for status in JobStatus:
        assert is_terminal(status) is (status in TERMINAL)
        if status in TERMINAL:
            assert not any(can_transition(status, t) for t in JobStatus)


def test_unknown_status_is_an_error() -> None:
    with pytest.raises(ValueError):
        transition("queued", "exploded")
    with pytest.raises(ValueError):
        can_transition("paused", "running")


@pytest.mark.parametrize(("attempts", "max_attempts"), [(1, 3), (2, 3), (1, 2)])
def test_retry_requeues_a_running_job_while_attempts_remain(attempts: int, max_attempts: int) -> None:
    assert retry("running", attempts, max_attempts) is Q


@pytest.mark.parametrize(("attempts", "max_attempts"), [(3, 3), (4, 3), (1, 1)])
def test_retry_without_attempts_left_raises(attempts: int, max_attempts: int) -> None:
    with pytest.raises(InvalidTransition) as info:
        retry("running", attempts, max_attempts)
    assert info.value.details == {"attempts": attempts, "max_attempts": max_attempts}


@pytest.mark.parametrize("status", [Q, S, F, C])
def test_only_a_running_job_can_be_retried(status: JobStatus) -> None:
    with pytest.raises(InvalidTransition):
        retry(status.value, 1, 3)
