"""Personal LoRAs over HTTP: a training request is a priced job; its result lands on the LoRA."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image

from api.core import ledger
from api.core.events import DoneEvent, ExecutorEvent, ProgressEvent
from api.core.executor import ExecutionRequest
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import ApiHarness, balance, bearer, job_count, ledger_rows, wait_job


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(out, "PNG")
    return out.getvalue()


class TrainingExecutor(FakeExecutor):
    """Trains instantly: stores fake weights under the job's weights prefix; generations as usual."""

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        if request.kind != "training":
            async for event in super().run(request):
                yield event
            return
        self.runs.append(request)
        yield ProgressEvent(request.input["steps"], request.input["steps"], stage="training")
        key = f"{request.input['weights_prefix']}lora.safetensors"
        assert self.storage is not None
        self.storage.put_bytes(key, b"weights", "application/octet-stream")
        await asyncio.sleep(0)
        yield DoneEvent({"weights_key": key, "loss": 0.12, "rank": request.input["rank"],
                         "steps": request.input["steps"]})


async def _upload(h: ApiHarness, key: str) -> str:
    r = await h.client.post("/v1/uploads", files={"file": ("a.png", png(), "image/png")}, headers=bearer(key))
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture
async def idle(make_api: Any) -> ApiHarness:
    return await make_api(run_runner=False)


async def test_training_request_is_a_priced_job(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    upload = await _upload(idle, user.api_key)
    r = await idle.client.post("/v1/loras", json={"name": "me", "base_model": "tiny-sd", "images": [upload],
                                                  "steps": 1000, "trigger_word": "sks"}, headers=bearer(user.api_key))
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["name"], body["base_model"], body["trigger_word"], body["status"]) == ("me", "tiny-sd", "sks",
                                                                                       "queued")
    assert body["job"]["kind"] == "training" and body["job"]["credits"]["reserved"] == 20  # 20 per 1000 steps
    assert balance(idle.db, user.user.id) == ledger.BalanceView(80, 20)
    listed = (await idle.client.get("/v1/loras", headers=bearer(user.api_key))).json()["data"]
    assert [lora["id"] for lora in listed] == [body["id"]]


@pytest.mark.parametrize(("change", "code"), [
    ({"base_model": "nope"}, "invalid_input"),
    ({"base_model": "veo-3.1"}, "invalid_input"),     # not trainable
    ({"steps": 1}, "invalid_input"),                  # below the model's range
    ({"steps": 5000}, "invalid_input"),               # above it
    ({"resolution": 512}, "invalid_input"),           # not one of the model's training resolutions
    ({"trigger_word": "two words"}, "invalid_input"),
    ({"images": []}, "no_images"),
    ({"images": ["upl_someone_elses"]}, "invalid_input"),
    ({"name": ""}, "invalid_input"),
    ({"learning_rate": 1.0}, "invalid_input"),
    ({"unknown": 1}, "invalid_input"),
])
async def test_bad_training_requests_move_nothing(idle: ApiHarness, change: dict[str, Any], code: str) -> None:
    user = idle.user(credits=100)
    upload = await _upload(idle, user.api_key)
    body = {"name": "me", "base_model": "tiny-sd", "images": [upload], "steps": 100, **change}
    r = await idle.client.post("/v1/loras", json=body, headers=bearer(user.api_key))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code
    assert job_count(idle.db, user.user.id) == 0
    assert balance(idle.db, user.user.id) == ledger.BalanceView(100, 0)


async def test_an_untrained_lora_cannot_be_used_yet(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    upload = await _upload(idle, user.api_key)
    lora = (await idle.client.post("/v1/loras", json={"name": "me", "base_model": "tiny-sd", "images": [upload],
                                                      "steps": 100}, headers=bearer(user.api_key))).json()
    r = await idle.submit(user.api_key, input={"prompt": "p", "loras": [{"id": lora["id"]}]})
    assert r.status_code == 422 and "not trained yet" in r.json()["error"]["message"]
    assert job_count(idle.db, user.user.id) == 1  # only the training job


async def test_training_without_enough_credits_is_402(idle: ApiHarness) -> None:
    user = idle.user(credits=10)
    upload = await _upload(idle, user.api_key)
    r = await idle.client.post("/v1/loras", json={"name": "me", "base_model": "tiny-sd", "images": [upload],
                                                  "steps": 2000}, headers=bearer(user.api_key))
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_credits"
    assert job_count(idle.db, user.user.id) == 0
    assert (await idle.client.get("/v1/loras", headers=bearer(user.api_key))).json()["data"] == []


async def test_deleting_a_queued_lora_cancels_and_refunds(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    upload = await _upload(idle, user.api_key)
    lora = (await idle.client.post("/v1/loras", json={"name": "me", "base_model": "tiny-sd", "images": [upload],
                                                      "steps": 500}, headers=bearer(user.api_key))).json()
    r = await idle.client.delete(f"/v1/loras/{lora['id']}", headers=bearer(user.api_key))
    assert r.status_code == 204
    assert (await idle.client.get(f"/v1/loras/{lora['id']}", headers=bearer(user.api_key))).status_code == 404
    assert balance(idle.db, user.user.id) == ledger.BalanceView(100, 0)
    assert [e.kind for e in ledger_rows(idle.db, job_id=lora["job_id"])] == ["reserve", "refund"]


async def test_trained_lora_is_settled_and_usable(make_api: Any, storage: Any) -> None:
    api = await make_api(executor=TrainingExecutor(storage=storage))
    user = api.user(credits=100)
    upload = await _upload(api, user.api_key)
    lora = (await api.client.post("/v1/loras", json={"name": "me", "base_model": "tiny-sd", "images": [upload],
                                                     "steps": 100}, headers=bearer(user.api_key))).json()
    job = await wait_job(api.db, lora["job_id"])
    assert job.status == "succeeded" and job.credits_charged == 2
    got = (await api.client.get(f"/v1/loras/{lora['id']}", headers=bearer(user.api_key))).json()
    assert got["status"] == "succeeded" and got["weights_url"]
    assert got["summary"] == {"loss": 0.12, "rank": 16, "steps": 100}
    r = await api.submit(user.api_key, input={"prompt": "p", "loras": [{"id": lora["id"], "scale": 0.8}]})
    assert r.status_code == 202, r.text
    done = await wait_job(api.db, r.json()["id"])
    assert done.status == "succeeded"
    run = next(req for req in api.executor.runs if req.job_id == done.id)
    assert run.input["loras"][0]["weights_key"].endswith("lora.safetensors")
