"""Replicate's webhook rule: ``output`` and ``logs`` at most once per 500 ms each, per prediction;
``start`` and ``completed`` always. Native jobs keep one webhook per event."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select

from api.db.tables import Job, WebhookDelivery
from api.services.events import REPLICATE_THROTTLE_S, enqueue_webhook
from tests.fixtures.harness import add_user


def _job(db: Any, settings: Any, shape: str) -> str:
    user = add_user(db, settings)
    with db.session() as session:
        job = Job(user_id=user.user.id, model="tiny-sd", kind="image", task="t2i", input={"prompt": "x"},
                  credits_reserved=1, webhook="https://hooks.example/x", api_shape=shape)
        session.add(job)
        session.commit()
        return job.id


def _events(db: Any, job_id: str) -> list[str]:
    with db.read() as session:
        return list(session.execute(select(WebhookDelivery.event).where(WebhookDelivery.job_id == job_id)
                                    .order_by(WebhookDelivery.created_at)).scalars())


def _enqueue(db: Any, job_id: str, *events: str) -> None:
    for event in events:
        with db.session() as session:
            enqueue_webhook(session, job_id, event)
            session.commit()


def test_a_prediction_gets_one_logs_and_one_output_webhook_per_window(db: Any, settings: Any) -> None:
    job_id = _job(db, settings, "replicate")
    _enqueue(db, job_id, "start", "logs", "logs", "output", "output", "logs", "completed", "completed")
    assert _events(db, job_id) == ["start", "logs", "output", "completed", "completed"]


def test_the_window_passes_and_the_next_one_is_sent(db: Any, settings: Any) -> None:
    job_id = _job(db, settings, "replicate")
    _enqueue(db, job_id, "logs")
    with db.session() as session:  # the first one was sent longer ago than the window
        row = session.execute(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)).scalar_one()
        row.created_at = row.created_at - timedelta(seconds=REPLICATE_THROTTLE_S * 3)
        session.add(row)
        session.commit()
    _enqueue(db, job_id, "logs")
    assert _events(db, job_id) == ["logs", "logs"]


def test_native_jobs_are_not_throttled(db: Any, settings: Any) -> None:
    job_id = _job(db, settings, "native")
    _enqueue(db, job_id, "logs", "logs", "output", "output")
    assert _events(db, job_id) == ["logs", "logs", "output", "output"]
