"""Replicate shape, review fixes: the predictions list leaves trainings out and reads logs once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from api.db.engine import Database
from api.db.tables import Job, JobEvent
from api.http.compat import replicate as replicate_shape
from api.services.events import events_of
from api.settings import Settings
from tests.api.http.compat.test_replicate import Rep, make_rep  # noqa: F401 - fixture
from tests.fixtures.harness import add_user


def test_list_leaves_out_trainings_and_reads_the_pages_logs_in_one_query(
        make_rep: Callable[..., Rep], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    rep = make_rep()
    user = rep.user(credits=100)
    client = rep.client(user.api_key)
    made = [client.predictions.create(model="cineweave/tiny-sd", input={"prompt": f"p{i}"}) for i in range(3)]
    for prediction in made:
        prediction.wait()
    training = Job(user_id=user.user.id, model="tiny-sd", kind="training", task="train", status="succeeded")
    with rep.state.db.session() as session:
        session.add(training)
        session.commit()
        training_id = training.id
    calls: list[list[str]] = []

    def counting(session: Any, job_ids: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append(list(job_ids))
        return events_of(session, job_ids, *args, **kwargs)

    monkeypatch.setattr(replicate_shape, "events_of", counting)
    page = client.predictions.list()
    assert [p.id for p in page.results] == [p.id for p in reversed(made)]
    assert training_id not in {p.id for p in page.results}
    assert len(calls) == 1 and set(calls[0]) == {p.id for p in made}
    for listed in page.results:
        assert listed.logs and listed.logs == client.predictions.get(listed.id).logs


def test_events_of_caps_each_job_and_keeps_order(db: Database, settings: Settings) -> None:
    user = add_user(db, settings, credits=10)
    with db.session() as session:
        jobs = [Job(user_id=user.user.id, model="tiny-sd", kind="image", task="t2i") for _ in range(2)]
        session.add_all(jobs)
        session.flush()
        for step in range(5):
            for job in jobs:
                session.add(JobEvent(job_id=job.id, type="progress", data={"step": step, "total": 5}))
                session.add(JobEvent(job_id=job.id, type="status", data={"status": "running"}))
        session.commit()
        ids = [j.id for j in jobs]
    with db.read() as session:
        got = events_of(session, [*ids, "job_none"], ("progress",), limit_per_job=3)
    assert {k: [e.data["step"] for e in v] for k, v in got.items()} == {ids[0]: [0, 1, 2], ids[1]: [0, 1, 2],
                                                                         "job_none": []}
