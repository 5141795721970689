"""The pipeline shape built from a parent job and its step jobs (no service, no runner): status,
stage, progress, credits sums, presigned outputs, the failed step, depends_on, the body schema, and
a pipeline's webhook body (``event_step`` from the row's ``step_event``)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from api.db.engine import Database
from api.db.tables import Job, WebhookDelivery
from api.http.pipeline_schemas import (
    PipelineCreate,
    PipelinePublic,
    PipelineWebhookBody,
    pipeline_view,
    pipeline_webhook_body,
)
from api.http.webhooks import ShapedView
from api.services.events import job_from_snapshot, job_snapshot
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.harness import add_user

STEPS = [{"name": "still", "model": "tiny-sd", "input": {"prompt": "a cat"}},
         {"name": "motion", "model": "tiny-wan", "input": {"prompt": "a cat", "image": "step:still"}},
         {"name": "fx", "op": "interpolate", "input": {"video": "step:motion", "fps": 24}}]


def rows(statuses: tuple[str, str, str], parent_status: str = "running", user_id: str = "usr_1",
         project: str | None = "prj_1") -> tuple[Job, list[Job]]:
    parent = Job(user_id=user_id, model="pipeline", kind="pipeline", task="pipeline", status=parent_status,
                 input={"steps": STEPS, "preset": "still-to-motion", "preset_version": 2, "params": {"prompt": "x"}},
                 credits_reserved=12, project_id=project)
    kinds = [("tiny-sd", "image", "t2i"), ("tiny-wan", "video", "i2v"), ("postprocess", "video", "interpolate")]
    children = []
    for index, ((model, kind, task), status) in enumerate(zip(kinds, statuses, strict=True)):
        child = Job(user_id=user_id, model=model, kind=kind, task=task, status=status, parent_id=parent.id,
                    step_name=STEPS[index]["name"], step_index=index, credits_reserved=4, input={})
        if status == "succeeded":
            child.credits_charged = 4
            child.progress = 1.0
            child.outputs = [{"key": f"outputs/{user_id}/{child.id}/0.png", "content_type": "image/png",
                              "width": 64, "height": 64}]
        elif status in ("failed", "canceled"):
            child.credits_refunded = 4
        children.append(child)
    return parent, children


def test_a_running_pipeline(storage: LocalStorage) -> None:
    parent, children = rows(("succeeded", "running", "waiting"))
    children[1].progress = 0.5
    view = pipeline_view(parent, list(reversed(children)), storage, 60)  # any order in
    PipelinePublic.model_validate(view)
    assert view["status"] == "running" and view["object"] == "pipeline"
    assert view["stage"] == "step 2/3: motion"
    assert view["progress"] == pytest.approx(0.5)  # (1 finished + 0.5) / 3
    assert view["credits"] == {"reserved": 12, "charged": 4, "refunded": 0}
    assert (view["preset"], view["preset_version"], view["params"], view["project"]) == \
        ("still-to-motion", 2, {"prompt": "x"}, "prj_1")
    assert [s["name"] for s in view["steps"]] == ["still", "motion", "fx"]
    still, motion, fx = view["steps"]
    assert still["model"] == "tiny-sd" and "op" not in still and still["depends_on"] == []
    assert fx["op"] == "interpolate" and "model" not in fx and fx["depends_on"] == ["motion"]
    assert motion["depends_on"] == ["still"] and motion["status"] == "running"
    assert fx["status"] == "waiting"  # a step keeps its own waiting
    assert still["outputs"][0]["url"].startswith("http") and "signature=" in still["outputs"][0]["url"]
    assert still["credits"] == {"reserved": 4, "charged": 4, "refunded": 0}
    assert view["outputs"] == []  # the final step has not delivered


def test_waiting_is_shown_as_queued_and_success_shows_the_final_outputs(storage: LocalStorage) -> None:
    parent, children = rows(("queued", "waiting", "waiting"), parent_status="waiting")
    view = pipeline_view(parent, children, storage, 60)
    assert view["status"] == "queued" and view["stage"] == "step 1/3: still" and view["progress"] == 0.0
    parent, children = rows(("succeeded", "succeeded", "succeeded"), parent_status="succeeded")
    parent.outputs = children[-1].outputs
    view = pipeline_view(parent, children, storage, 60)
    assert view["status"] == "succeeded" and view["stage"] is None and view["progress"] == 1.0
    assert view["outputs"][0]["url"] == view["steps"][2]["outputs"][0]["url"]
    assert view["credits"] == {"reserved": 12, "charged": 12, "refunded": 0}


def test_a_failed_pipeline_names_its_step(storage: LocalStorage) -> None:
    parent, children = rows(("succeeded", "failed", "canceled"), parent_status="failed")
    parent.error_code, parent.error_message = "generation_failed", "boom"
    children[1].error_code, children[1].error_message = "generation_failed", "boom"
    view = pipeline_view(parent, children, storage, 60)
    assert view["error"] == {"code": "generation_failed", "message": "boom", "step": "motion"}
    assert view["steps"][1]["error"] == {"code": "generation_failed", "message": "boom"}
    assert view["credits"] == {"reserved": 12, "charged": 4, "refunded": 8}


@pytest.mark.parametrize("body", [
    {},                                                            # neither
    {"steps": STEPS, "preset": "still-to-motion"},                 # both
    {"steps": STEPS, "params": {"prompt": "x"}},                   # params without a preset
    {"steps": []},                                                 # empty
    {"preset": "p", "surprise": 1},                                # unknown field
])
def test_the_body_is_steps_or_a_preset(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PipelineCreate.model_validate(body)


def test_a_step_keeps_what_the_validator_checks() -> None:
    body = PipelineCreate.model_validate({"steps": [{"name": "Bad Name", "op": "trim", "input": {}, "x": 1}]})
    assert body.step_dicts() == [{"name": "Bad Name", "op": "trim", "input": {}, "x": 1}]  # passed on as given


def test_webhook_body_of_a_step_event(db: Database, settings: Settings, storage: LocalStorage) -> None:
    user_id = add_user(db, settings).user.id
    parent, children = rows(("succeeded", "running", "waiting"), user_id=user_id, project=None)
    output = children[0].outputs[0]
    with db.session() as session:
        session.add(parent)
        session.add_all(children)
        session.commit()
        snapshot = job_snapshot(parent)
    view = ShapedView(lambda job: {"native": job.id},
                      pipeline=lambda job, row: pipeline_webhook_body(db, storage, 60, job, row))
    plain = WebhookDelivery(job_id=parent.id, user_id=user_id, event="completed", url="http://x", payload=snapshot)
    body = view.render_delivery(job_from_snapshot(snapshot), plain)
    assert body["object"] == "pipeline" and "event_step" not in body and len(body["steps"]) == 3
    step = WebhookDelivery(job_id=parent.id, user_id=user_id, event="step.completed", url="http://x",
                           payload={**snapshot, "step_event": {"step": "still", "job_id": children[0].id,
                                                               "status": "succeeded", "outputs": [output],
                                                               "credits": 4}})
    body = view.render_delivery(job_from_snapshot(step.payload), step)
    assert body["event_step"]["name"] == "still" and body["event_step"]["job_id"] == children[0].id
    assert body["event_step"]["outputs"][0]["url"] == storage.url(output["key"], 60)
    assert body["event_step"]["credits"] == 4
    PipelineWebhookBody.model_validate(body)
    job = Job(user_id="usr_1", model="tiny-sd", kind="image", task="t2i")
    assert view(job) == {"native": job.id}  # any other job: its own shape
