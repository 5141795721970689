"""An Idempotency-Key replay must match the API shape and Cancel-After of the first request."""

from __future__ import annotations

import pytest

from api.core.errors import IdempotencyConflict
from api.db.engine import Database
from api.services.jobs import JobService, Submission
from api.services.users import NewUser
from api.settings import Settings
from tests.fixtures.harness import add_user, job_count


@pytest.fixture
def alice(db: Database, settings: Settings) -> NewUser:
    return add_user(db, settings, credits=100)


def sub(**kwargs: object) -> Submission:
    return Submission("tiny-sd", {"prompt": "a cat", "seed": 1}, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("second", [
    {"api_shape": "replicate"},
    {"api_shape": "replicate", "cancel_after_s": 30.0},
    {"cancel_after_s": 30.0},
])
def test_native_key_reused_with_other_shape_or_deadline_conflicts(
        jobs: JobService, db: Database, alice: NewUser, second: dict[str, object]) -> None:
    first, _ = jobs.submit(alice.user, sub(), idempotency_key="k1")
    with pytest.raises(IdempotencyConflict) as info:
        jobs.submit(alice.user, sub(**second), idempotency_key="k1")
    assert info.value.details == {"job_id": first.id}
    assert job_count(db, alice.user.id) == 1


def test_other_cancel_after_conflicts(jobs: JobService, alice: NewUser) -> None:
    jobs.submit(alice.user, sub(api_shape="replicate", cancel_after_s=30.0), idempotency_key="k1")
    with pytest.raises(IdempotencyConflict):
        jobs.submit(alice.user, sub(api_shape="replicate", cancel_after_s=60.0), idempotency_key="k1")


def test_same_shape_and_deadline_replays(jobs: JobService, alice: NewUser) -> None:
    first, _ = jobs.submit(alice.user, sub(api_shape="replicate", cancel_after_s=30.0), idempotency_key="k1")
    again, created = jobs.submit(alice.user, sub(api_shape="replicate", cancel_after_s=30.0),
                                 idempotency_key="k1")
    assert (again.id, created) == (first.id, False)
    assert again.start_deadline_at is not None
