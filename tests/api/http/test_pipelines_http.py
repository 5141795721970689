"""``/v1/pipelines`` over HTTP with the scripted fake executor and its runner: submit, the steps
running in order, GET/list/cancel, the quote, validation (422, nothing charged), SSE with
``step.completed`` carrying downloadable URLs, signed webhooks, and the parent as a job."""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fixtures.fake_executor import TINY_PNG, FakeExecutor
from tests.fixtures.harness import ApiHarness, balance, bearer, job_count, ledger_rows, wait_job, wait_until

STILL = {"name": "still", "model": "tiny-sd", "input": {"prompt": "a cat", "width": 64, "height": 64}}
MOTION = {"name": "motion", "model": "tiny-wan-i2v", "input": {"prompt": "a cat", "image": "step:still"}}
FX = {"name": "fx", "op": "interpolate", "input": {"video": "step:motion", "fps": 24}}
THREE = [STILL, MOTION, FX]


async def submit(api: ApiHarness, key: str, steps: list[dict[str, Any]] | None = None,
                 **extra: Any) -> httpx.Response:
    headers = bearer(key)
    headers.update(extra.pop("headers", {}))
    body = {"steps": steps if steps is not None else THREE, **extra}
    return await api.client.post("/v1/pipelines", json=body, headers=headers)


async def finished(api: ApiHarness, key: str, pipeline_id: str) -> dict[str, Any]:
    await wait_job(api.db, pipeline_id, timeout_s=20)
    r = await api.client.get(f"/v1/pipelines/{pipeline_id}", headers=bearer(key))
    assert r.status_code == 200, r.text
    return r.json()


def local(url: str) -> str:
    """A presigned URL's path and query (the in-process client serves it)."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def test_a_pipeline_runs_its_steps_and_shows_each(api: ApiHarness) -> None:
    user = api.user(credits=1000)
    r = await submit(api, user.api_key)
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["status"] == "queued" and created["object"] == "pipeline"  # waiting shown as queued
    assert [s["name"] for s in created["steps"]] == ["still", "motion", "fx"]
    assert [s["status"] for s in created["steps"]] == ["queued", "waiting", "waiting"]
    assert created["steps"][1]["depends_on"] == ["still"] and created["steps"][2]["op"] == "interpolate"
    total = created["credits"]["reserved"]
    assert total == sum(s["credits"]["reserved"] for s in created["steps"]) > 0
    assert balance(api.db, user.user.id).available == 1000 - total  # the whole price held at once

    view = await finished(api, user.api_key, created["id"])
    assert view["status"] == "succeeded" and view["progress"] == 1.0 and view["stage"] is None
    for step in view["steps"]:
        assert step["status"] == "succeeded" and step["attempts"] == 1
        assert step["credits"]["charged"] == step["credits"]["reserved"] and step["credits"]["refunded"] == 0
        assert step["outputs"] and step["outputs"][0]["url"]
    assert view["credits"] == {"reserved": total, "charged": total, "refunded": 0}
    assert view["outputs"] == view["steps"][-1]["outputs"]  # the final step's
    download = await api.client.get(local(view["outputs"][0]["url"]))
    assert download.status_code == 200 and download.content == TINY_PNG
    assert balance(api.db, user.user.id).available == 1000 - total
    # each step ran once, in order, the later ones on the earlier ones' outputs
    runs = [run.job_id for run in api.executor.runs]
    assert runs == [s["job_id"] for s in view["steps"]]

    # the parent is a job too (kind pipeline); job listings show it, never its steps
    as_job = await api.client.get(f"/v1/jobs/{view['id']}", headers=bearer(user.api_key))
    assert as_job.status_code == 200 and as_job.json()["kind"] == "pipeline"
    listed = (await api.client.get("/v1/jobs", headers=bearer(user.api_key))).json()["data"]
    assert [j["id"] for j in listed] == [view["id"]]
    pipelines = (await api.client.get("/v1/pipelines", headers=bearer(user.api_key))).json()
    assert [p["id"] for p in pipelines["data"]] == [view["id"]] and pipelines["data"][0]["steps"]
    # a plain job is not a pipeline
    job = (await api.submit(user.api_key)).json()
    assert (await api.client.get(f"/v1/pipelines/{job['id']}", headers=bearer(user.api_key))).status_code == 404


async def test_list_filters_and_pages(make_api: Any) -> None:
    api = await make_api(run_runner=False, max_active_jobs=10)
    user = api.user(credits=1000)
    ids = [(await submit(api, user.api_key, [STILL])).json()["id"] for _ in range(3)]
    page = (await api.client.get("/v1/pipelines?limit=2&status=queued", headers=bearer(user.api_key))).json()
    assert [p["id"] for p in page["data"]] == ids[::-1][:2] and page["next_cursor"]
    rest = (await api.client.get(f"/v1/pipelines?limit=2&cursor={page['next_cursor']}",
                                 headers=bearer(user.api_key))).json()
    assert [p["id"] for p in rest["data"]] == [ids[0]] and rest["next_cursor"] is None
    none = (await api.client.get("/v1/pipelines?status=succeeded", headers=bearer(user.api_key))).json()
    assert none["data"] == []
    bad = await api.client.get("/v1/pipelines?status=nope", headers=bearer(user.api_key))
    assert bad.status_code == 422
    unknown_project = await api.client.get("/v1/pipelines?project=prj_none", headers=bearer(user.api_key))
    assert unknown_project.status_code == 404


async def test_idempotency_key_replays_the_pipeline(make_api: Any) -> None:
    api = await make_api(run_runner=False)
    user = api.user(credits=1000)
    first = await submit(api, user.api_key, headers={"Idempotency-Key": "k1"})
    again = await submit(api, user.api_key, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert again.headers.get("Idempotent-Replayed") == "true" and again.json()["id"] == first.json()["id"]
    other = await submit(api, user.api_key, [STILL], headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409
    assert balance(api.db, user.user.id).available == 1000 - first.json()["credits"]["reserved"]


async def test_quote_equals_what_submit_reserves(make_api: Any) -> None:
    api = await make_api(run_runner=False)
    user = api.user(credits=1000)
    q = await api.client.post("/v1/pipelines/quote", json={"steps": THREE}, headers=bearer(user.api_key))
    assert q.status_code == 200, q.text
    quote = q.json()
    assert [s["name"] for s in quote["steps"]] == ["still", "motion", "fx"]
    assert quote["credits"] == sum(s["credits"] for s in quote["steps"])
    assert quote["affordable"] is True and quote["reason"] is None
    assert quote["steps"][0]["output"]["kind"] == "image" and quote["steps"][2]["output"]["fps"] == 24
    assert quote["output"] == quote["steps"][-1]["output"]
    assert balance(api.db, user.user.id).available == 1000 and job_count(api.db) == 0  # nothing written
    created = (await submit(api, user.api_key)).json()
    assert created["credits"]["reserved"] == quote["credits"]
    assert [s["credits"]["reserved"] for s in created["steps"]] == [s["credits"] for s in quote["steps"]]
    reserves = [e for e in ledger_rows(api.db, user.user.id) if e.kind == "reserve"]
    assert sorted(-e.amount if e.amount < 0 else e.amount for e in reserves) == \
        sorted(s["credits"] for s in quote["steps"])  # one reservation per step, none for the parent
    poor = api.user(credits=1)
    q = await api.client.post("/v1/pipelines/quote", json={"steps": THREE}, headers=bearer(poor.api_key))
    assert q.json()["affordable"] is False and q.json()["reason"] == "insufficient_credits"


@pytest.mark.parametrize(("steps", "code", "step"), [
    ([STILL, {**MOTION, "input": {"prompt": "x", "image": "step:nope"}}], "pipeline_unknown_step", "motion"),
    ([{"name": "a", "op": "trim", "input": {"video": "step:b"}},
      {"name": "b", "op": "trim", "input": {"video": "step:a"}}], "pipeline_cycle", "a"),
    ([{"name": "up", "op": "upscale", "input": {"prompt": "a cat", "scale": 2}}], "pipeline_kind_mismatch", "up"),
    ([STILL, {"name": "cut", "op": "trim", "input": {"video": "step:still", "duration_s": 1}}],
     "pipeline_kind_mismatch", "cut"),
    ([{**STILL, "name": f"s{i}"} for i in range(9)], "pipeline_too_many_steps", None),
    ([{**STILL, "input": {"prompt": "a cat", "steps": 10_000}}], "invalid_input", "still"),
])
async def test_validation_errors_are_422_and_charge_nothing(make_api: Any, steps: list[dict[str, Any]],
                                                            code: str, step: str | None) -> None:
    api = await make_api(run_runner=False)
    user = api.user(credits=1000)
    for path in ("/v1/pipelines/quote", "/v1/pipelines"):
        r = await api.client.post(path, json={"steps": steps}, headers=bearer(user.api_key))
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == code, error
        assert error["details"].get("step") == step and "field" in error["details"]
    assert balance(api.db, user.user.id).available == 1000 and balance(api.db, user.user.id).reserved == 0
    assert job_count(api.db) == 0 and ledger_rows(api.db, user.user.id, None)[-1].kind != "reserve"


@pytest.mark.parametrize("body", [{}, {"steps": [STILL], "preset": "still-to-motion"},
                                  {"steps": [STILL], "params": {"prompt": "x"}}, {"steps": "nope"}])
async def test_the_body_needs_steps_or_a_preset(api: ApiHarness, body: dict[str, Any]) -> None:
    user = api.user(credits=10)
    r = await api.client.post("/v1/pipelines", json=body, headers=bearer(user.api_key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    assert job_count(api.db) == 0


async def test_cancel_keeps_the_finished_step_and_refunds_the_rest(make_api: Any, storage: Any) -> None:
    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"hold": gate})
    api = await make_api(executor=executor)
    user = api.user(credits=1000)
    steps = [STILL, {**MOTION, "input": {"prompt": "hold", "image": "step:still"}}, FX]
    created = (await submit(api, user.api_key, steps)).json()
    motion_id = created["steps"][1]["job_id"]
    await wait_until(lambda: any(run.job_id == motion_id for run in executor.runs), 20, what="step 2 running")
    r = await api.client.post(f"/v1/pipelines/{created['id']}/cancel", headers=bearer(user.api_key))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "canceled"
    for step in created["steps"]:  # the running step ends through its runner's cancel
        await wait_job(api.db, step["job_id"], timeout_s=20)
    view = await finished(api, user.api_key, created["id"])
    assert view["status"] == "canceled"
    still, motion, fx = view["steps"]
    assert still["status"] == "succeeded" and still["credits"]["charged"] == still["credits"]["reserved"]
    assert motion["status"] == "canceled" and fx["status"] == "canceled"
    assert motion_id in executor.canceled
    charged = view["steps"][0]["credits"]["charged"]
    assert view["credits"]["charged"] == charged
    assert view["credits"]["refunded"] == view["credits"]["reserved"] - charged
    assert balance(api.db, user.user.id).available == 1000 - charged
    kept = await api.client.get(local(view["steps"][0]["outputs"][0]["url"]))
    assert kept.status_code == 200  # step 1's output is still downloadable


async def read_events(api: ApiHarness, key: str, pipeline_id: str, after: str | None = None) -> list[dict[str, Any]]:
    """The pipeline's SSE stream until ``completed`` (bounded: the stream ends with the pipeline)."""
    headers = bearer(key)
    if after is not None:
        headers["Last-Event-ID"] = after
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    async with api.client.stream("GET", f"/v1/pipelines/{pipeline_id}/events", headers=headers,
                                 timeout=20) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            line = line.rstrip("\r")
            if not line:
                if current.get("event"):
                    events.append(current)
                    if current["event"] == "completed":
                        return events
                current = {}
            elif line.startswith("event:"):
                current["event"] = line[6:].strip()
            elif line.startswith("id:"):
                current["id"] = line[3:].strip()
            elif line.startswith("data:"):
                current["data"] = json.loads(line[5:].strip())
    return events


async def test_sse_carries_step_completed_with_urls_that_download(api: ApiHarness) -> None:
    user = api.user(credits=1000)
    created = (await submit(api, user.api_key)).json()
    events = await read_events(api, user.api_key, created["id"])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "status" and events[0]["data"]["status"] == "queued"  # waiting shown as queued
    steps = [e for e in events if e["event"] == "step.completed"]
    assert [e["data"]["step"] for e in steps] == ["still", "motion", "fx"]
    for event in steps:
        assert event["data"]["job_id"] and event["data"]["credits"] >= 1
        url = event["data"]["outputs"][0]["url"]
        download = await api.client.get(local(url))
        assert download.status_code == 200 and download.content == TINY_PNG
    assert kinds[-1] == "completed" and events[-1]["data"]["pipeline"]["status"] == "succeeded"
    # Last-Event-ID: the rest only, with freshly signed URLs
    rest = await read_events(api, user.api_key, created["id"], after=steps[0]["id"])
    assert [e["data"]["step"] for e in rest if e["event"] == "step.completed"] == ["motion", "fx"]


async def test_webhooks_get_step_completed_and_completed_signed(make_api: Any, live_server: Any) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from api.http.webhooks import verify

    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: Request) -> JSONResponse:
        received.append((dict(request.headers), await request.body()))
        return JSONResponse({"ok": True})

    server = live_server(Starlette(routes=[Route("/hook", hook, methods=["POST"])]))
    api = await make_api(egress_allow_networks=["127.0.0.1/32"], webhook_poll_s=600.0)
    user = api.user(credits=1000)
    created = (await submit(api, user.api_key, webhook=f"{server.url}/hook")).json()
    await wait_job(api.db, created["id"], timeout_s=20)
    await wait_until(lambda: any(json.loads(b)["status"] == "succeeded" for _, b in received), 10,
                     what="the completed webhook")
    await api.state.webhooks.join(10)
    bodies = [json.loads(body) for _, body in received]
    for headers, body in received:
        assert verify(user.webhook_secret, headers, body)
    assert all(b["id"] == created["id"] and b["object"] == "pipeline" for b in bodies)
    step_events = [b["event_step"] for b in bodies if "event_step" in b]
    assert [s["name"] for s in step_events] == ["still", "motion", "fx"]
    for step in step_events:
        download = await api.client.get(local(step["outputs"][0]["url"]))
        assert download.status_code == 200 and download.content == TINY_PNG
    assert bodies[0]["status"] == "running"  # start
    assert bodies[-1]["status"] == "succeeded" and bodies[-1]["outputs"] and len(bodies) == 5

    # a filter of step.completed only
    received.clear()
    only = (await submit(api, user.api_key, [STILL], webhook=f"{server.url}/hook",
                         webhook_events_filter=["step.completed"])).json()
    await wait_job(api.db, only["id"], timeout_s=20)
    await api.state.webhooks.join(10)
    assert [json.loads(b).get("event_step", {}).get("name") for _, b in received] == ["still"]
    bad = await submit(api, user.api_key, [STILL], webhook=f"{server.url}/hook", webhook_events_filter=["nope"])
    assert bad.status_code == 422


async def test_openapi_declares_the_pipeline_models(api: ApiHarness) -> None:
    spec = (await api.client.get("/openapi.json")).json()

    def ok_schema(path: str, method: str) -> str:
        response = spec["paths"][path][method]["responses"]
        code = next(c for c in response if c.startswith("2"))
        return json.dumps(response[code]["content"])

    assert "PipelinePublic" in ok_schema("/v1/pipelines", "post")
    assert "PipelineQuote" in ok_schema("/v1/pipelines/quote", "post")
    assert "PipelineList" in ok_schema("/v1/pipelines", "get")
    assert "PipelinePublic" in ok_schema("/v1/pipelines/{pipeline_id}", "get")
    assert "PipelinePublic" in ok_schema("/v1/pipelines/{pipeline_id}/cancel", "post")
    assert "text/event-stream" in ok_schema("/v1/pipelines/{pipeline_id}/events", "get")
    for path, method in (("/v1/pipelines", "post"), ("/v1/pipelines/{pipeline_id}", "get")):
        assert {"401", "404", "422"} <= set(spec["paths"][path][method]["responses"])
    assert "PipelineStepPublic" in spec["components"]["schemas"]


async def test_a_preset_pipeline_runs_and_shows_its_preset(api: ApiHarness) -> None:
    user = api.user(credits=1000)
    body = {"preset": "still-to-motion", "params": {"prompt": "a cat", "style": "cinematic"}}
    quote = (await api.client.post("/v1/pipelines/quote", json=body, headers=bearer(user.api_key))).json()
    assert quote["preset"] == "still-to-motion" and quote["preset_version"] >= 1
    assert [s["name"] for s in quote["steps"]] == ["still", "motion", "smooth", "final"]
    r = await api.client.post("/v1/pipelines", json=body, headers=bearer(user.api_key))
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["preset"] == "still-to-motion" and created["params"]["prompt"] == "a cat"
    assert created["credits"]["reserved"] == quote["credits"]
    view = await finished(api, user.api_key, created["id"])
    assert view["status"] == "succeeded" and view["credits"]["charged"] == quote["credits"]
    assert [s["op"] for s in view["steps"][2:]] == ["interpolate", "export"]
    unknown = await api.client.post("/v1/pipelines", json={"preset": "nope", "params": {}},
                                    headers=bearer(user.api_key))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    missing = await api.client.post("/v1/pipelines", json={"preset": "still-to-motion", "params": {}},
                                    headers=bearer(user.api_key))
    assert missing.status_code == 422
    assert balance(api.db, user.user.id).available == 1000 - quote["credits"]


async def test_a_team_pipeline_is_paid_by_the_team(api: ApiHarness) -> None:
    owner = api.user(credits=0)
    team = api.state.teams.create(owner.user, "studio").view.team.id
    funded = await api.client.post(f"/v1/admin/users/{team}/credits", json={"amount": 500},
                                   headers=bearer("admin-test-key"))
    assert funded.status_code == 201, funded.text
    r = await submit(api, owner.api_key, [STILL], headers={"X-CineWeave-Team": team})
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["team"] == team and created["submitted_by"] == owner.user.id
    assert balance(api.db, team).available == 500 - created["credits"]["reserved"]
    assert balance(api.db, owner.user.id).available == 0
    listed = (await api.client.get(f"/v1/pipelines?team={team}", headers=bearer(owner.api_key))).json()["data"]
    assert [p["id"] for p in listed] == [created["id"]]
    assert (await api.client.get("/v1/pipelines", headers=bearer(owner.api_key))).json()["data"] == []


async def test_a_pipeline_filed_under_a_project(make_api: Any) -> None:
    api = await make_api(run_runner=False)
    user = api.user(credits=1000)
    project = (await api.client.post("/v1/projects", json={"name": "shorts"}, headers=bearer(user.api_key))).json()
    filed = (await submit(api, user.api_key, [STILL], project=project["id"])).json()
    await submit(api, user.api_key, [STILL])
    assert filed["project"] == project["id"]
    listed = (await api.client.get(f"/v1/pipelines?project={project['id']}", headers=bearer(user.api_key))).json()
    assert [p["id"] for p in listed["data"]] == [filed["id"]]
    other = api.user(credits=1000)
    theirs = await submit(api, other.api_key, [STILL], project=project["id"])
    assert theirs.status_code == 404 and balance(api.db, other.user.id).available == 1000


async def test_a_pipeline_over_http_on_both_databases(backend_settings: Any, make_api: Any) -> None:
    """The path of a pipeline (submit, steps in order, SSE, GET, settlement) on SQLite and PostgreSQL
    (``backend_settings`` first: its database outlives the app's shutdown)."""
    api = await make_api(database_url=backend_settings.database_url)
    user = api.user(credits=1000)
    created = (await submit(api, user.api_key)).json()
    events = await read_events(api, user.api_key, created["id"])
    assert [e["data"]["step"] for e in events if e["event"] == "step.completed"] == ["still", "motion", "fx"]
    view = await finished(api, user.api_key, created["id"])
    assert view["status"] == "succeeded" and view["credits"]["charged"] == view["credits"]["reserved"]
    assert balance(api.db, user.user.id).available == 1000 - view["credits"]["charged"]


async def test_a_failed_step_fails_the_pipeline_and_names_it(make_api: Any, storage: Any) -> None:
    from api.core.events import ErrorEvent

    executor = FakeExecutor(storage=storage, failures={"boom": [ErrorEvent("generation_failed", "it broke")]})
    api = await make_api(executor=executor)
    user = api.user(credits=1000)
    steps = [STILL, {**MOTION, "input": {"prompt": "boom", "image": "step:still"}}, FX]
    created = (await submit(api, user.api_key, steps)).json()
    events = await read_events(api, user.api_key, created["id"])
    failed = [e for e in events if e["event"] == "step.failed"]
    assert [e["data"]["step"] for e in failed] == ["motion"]
    assert failed[0]["data"]["error"]["code"] == "generation_failed"
    for step in created["steps"]:
        await wait_job(api.db, step["job_id"])
    view = (await api.client.get(f"/v1/pipelines/{created['id']}", headers=bearer(user.api_key))).json()
    assert view["status"] == "failed" and view["error"]["step"] == "motion"
    assert view["error"]["code"] == "generation_failed"
    assert [s["status"] for s in view["steps"]] == ["succeeded", "failed", "canceled"]
    charged = view["steps"][0]["credits"]["charged"]
    assert view["credits"] == {"reserved": created["credits"]["reserved"], "charged": charged,
                               "refunded": created["credits"]["reserved"] - charged}
    assert balance(api.db, user.user.id).available == 1000 - charged


async def test_canceling_a_waiting_step_cancels_the_pipeline_and_refunds_the_undelivered(
        make_api: Any, storage: Any) -> None:
    gate = threading.Event()
    executor = FakeExecutor(storage=storage, gates={"hold": gate})
    api = await make_api(executor=executor)
    user = api.user(credits=1000)
    steps = [STILL, {**MOTION, "input": {"prompt": "hold", "image": "step:still"}}, FX]
    created = (await submit(api, user.api_key, steps)).json()
    still_id, motion_id, fx_id = (s["job_id"] for s in created["steps"])
    try:
        await wait_until(lambda: any(run.job_id == motion_id for run in executor.runs), 20, what="step 2 running")
        r = await api.client.post(f"/v1/jobs/{fx_id}/cancel", headers=bearer(user.api_key))  # fx is waiting
        assert r.status_code == 200, r.text
        for step_id in (still_id, motion_id, fx_id):
            await wait_job(api.db, step_id, timeout_s=20)
    finally:
        gate.set()
    view = await finished(api, user.api_key, created["id"])
    assert view["status"] == "canceled"
    assert [s["status"] for s in view["steps"]] == ["succeeded", "canceled", "canceled"]
    charged = view["steps"][0]["credits"]["reserved"]
    assert view["credits"] == {"reserved": created["credits"]["reserved"], "charged": charged,
                               "refunded": created["credits"]["reserved"] - charged}
    for step in view["steps"]:  # one settlement per step: a capture for the delivered one, else a refund
        kinds = [e.kind for e in ledger_rows(api.db, job_id=step["job_id"]) if e.kind != "reserve"]
        assert kinds == (["capture"] if step["job_id"] == still_id else ["refund"])
    assert (balance(api.db, user.user.id).available, balance(api.db, user.user.id).reserved) == (1000 - charged, 0)


async def test_canceling_a_queued_step_cancels_the_pipeline_and_refunds_every_step(make_api: Any) -> None:
    api = await make_api(run_runner=False)
    user = api.user(credits=1000)
    created = (await submit(api, user.api_key)).json()
    still_id = created["steps"][0]["job_id"]
    assert created["steps"][0]["status"] == "queued"
    r = await api.client.post(f"/v1/jobs/{still_id}/cancel", headers=bearer(user.api_key))
    assert r.status_code == 200 and r.json()["status"] == "canceled", r.text
    view = (await api.client.get(f"/v1/pipelines/{created['id']}", headers=bearer(user.api_key))).json()
    assert view["status"] == "canceled" and all(s["status"] == "canceled" for s in view["steps"])
    assert view["credits"] == {"reserved": created["credits"]["reserved"], "charged": 0,
                               "refunded": created["credits"]["reserved"]}
    for step in view["steps"]:
        assert [e.kind for e in ledger_rows(api.db, job_id=step["job_id"]) if e.kind != "reserve"] == ["refund"]
    assert (balance(api.db, user.user.id).available, balance(api.db, user.user.id).reserved) == (1000, 0)
    again = await api.client.post(f"/v1/jobs/{still_id}/cancel", headers=bearer(user.api_key))
    assert again.status_code == 200 and len(ledger_rows(api.db, user.user.id)) == 1 + 3 + 3
