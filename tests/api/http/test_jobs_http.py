"""Jobs over HTTP: the shapes clients rely on, Idempotency-Key, pagination and filters, cancel, delete."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from api.core import ledger
from tests.fixtures.harness import ApiHarness, balance, bearer, job_count, ledger_rows, wait_job

JOB_KEYS = {"id", "model", "kind", "status", "stage", "progress", "input", "outputs", "thumbnail_url", "error",
            "credits", "provider", "attempts", "created_at", "started_at", "completed_at", "metrics"}
OUTPUT_KEYS = {"url", "content_type", "width", "height", "num_frames", "fps", "duration_s"}


@pytest.fixture
async def idle(make_api: Any) -> ApiHarness:
    """No runner: jobs stay queued."""
    return await make_api(run_runner=False, max_active_jobs=100, rate_limit_per_minute=1000)


async def test_job_shape_through_its_life(api: ApiHarness) -> None:
    user = api.user(credits=100)
    r = await api.submit(user.api_key, input={"prompt": "a cat", "width": 128, "height": 128, "seed": 42})
    assert r.status_code == 202
    job = r.json()
    assert JOB_KEYS <= job.keys()
    assert (job["status"], job["kind"], job["model"], job["progress"]) == ("queued", "image", "tiny-sd", 0.0)
    assert job["credits"] == {"reserved": 4, "charged": 0, "refunded": 0}
    assert job["input"]["seed"] == 42 and job["input"]["width"] == 128
    assert job["error"] is None and job["outputs"] == [] and job["created_at"].endswith("Z")
    done = await wait_job(api.db, job["id"])
    assert done.status == "succeeded"
    got = (await api.client.get(f"/v1/jobs/{job['id']}", headers=bearer(user.api_key))).json()
    assert got["status"] == "succeeded" and got["progress"] == 1.0 and got["attempts"] == 1
    assert got["credits"] == {"reserved": 4, "charged": 4, "refunded": 0}
    assert got["metrics"]["queue_s"] is not None and got["metrics"]["run_s"] is not None
    assert got["started_at"] and got["completed_at"]
    [output] = got["outputs"]
    assert OUTPUT_KEYS <= output.keys()
    assert (output["content_type"], output["width"], output["height"]) == ("image/png", 128, 128)
    # the output URL is a signed link this API serves
    path = output["url"].split("127.0.0.1:8000", 1)[-1]
    file = await api.client.get(path)
    assert file.status_code == 200 and file.content.startswith(b"\x89PNG")
    assert file.headers["content-type"] == "image/png"
    credits = (await api.client.get("/v1/credits", headers=bearer(user.api_key))).json()
    assert credits == {"balance": 96, "reserved": 0, "plan": "free"}


async def test_failed_job_shows_its_error_and_refund(make_api: Any, storage: Any) -> None:
    from api.core.events import ErrorEvent
    from tests.fixtures.fake_executor import FakeExecutor

    executor = FakeExecutor(storage=storage, failures={"bad": [ErrorEvent("nsfw", "refused by the model")]})
    api = await make_api(executor=executor)
    user = api.user(credits=10)
    r = await api.submit(user.api_key, input={"prompt": "bad"})
    await wait_job(api.db, r.json()["id"])
    got = (await api.client.get(f"/v1/jobs/{r.json()['id']}", headers=bearer(user.api_key))).json()
    assert got["status"] == "failed" and got["error"] == {"code": "nsfw", "message": "generation failed"}
    assert got["credits"] == {"reserved": 1, "charged": 0, "refunded": 1} and got["outputs"] == []
    assert (await api.client.get("/v1/credits", headers=bearer(user.api_key))).json()["balance"] == 10


# Idempotency-Key ------------------------------------------------------------------------------
async def test_same_key_and_body_returns_the_same_job(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    headers = {"Idempotency-Key": "order-1"}
    body = {"prompt": "a cat", "seed": 7}
    first = await idle.submit(user.api_key, input=body, headers=headers)
    second = await idle.submit(user.api_key, input=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert "idempotent-replayed" not in first.headers and second.headers["idempotent-replayed"] == "true"
    assert job_count(idle.db, user.user.id) == 1
    assert balance(idle.db, user.user.id) == ledger.BalanceView(99, 1)


async def test_same_key_other_body_is_409(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    headers = {"Idempotency-Key": "order-1"}
    first = await idle.submit(user.api_key, input={"prompt": "a cat", "seed": 1}, headers=headers)
    for other in ({"input": {"prompt": "a dog", "seed": 1}}, {"input": {"prompt": "a cat", "seed": 2}},
                  {"model": "veo-3.1", "input": {"prompt": "a cat", "duration": 4}},
                  {"input": {"prompt": "a cat", "seed": 1}, "webhook": "https://example.com/h"}):
        r = await idle.submit(user.api_key, headers=headers, **other)
        assert r.status_code == 409, other
        assert r.json()["error"]["code"] == "idempotency_conflict"
        assert r.json()["error"]["details"]["job_id"] == first.json()["id"]
    assert job_count(idle.db, user.user.id) == 1
    assert balance(idle.db, user.user.id) == ledger.BalanceView(99, 1)


async def test_same_key_concurrently_charges_once(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    headers = {"Idempotency-Key": "burst"}
    body = {"prompt": "a cat", "seed": 3}
    responses = await asyncio.gather(*(idle.submit(user.api_key, input=body, headers=headers) for _ in range(12)))
    assert {r.status_code for r in responses} == {202}, [r.text for r in responses if r.status_code != 202]
    assert len({r.json()["id"] for r in responses}) == 1
    assert job_count(idle.db, user.user.id) == 1
    assert [e.kind for e in ledger_rows(idle.db, user.user.id)] == ["grant", "reserve"]
    assert balance(idle.db, user.user.id) == ledger.BalanceView(99, 1)


async def test_key_without_seed_replays_even_though_seeds_are_drawn(idle: ApiHarness) -> None:
    """The stored seed is drawn per request, but the key's body is what the client sent."""
    user = idle.user(credits=100)
    headers = {"Idempotency-Key": "no-seed"}
    first = await idle.submit(user.api_key, input={"prompt": "a cat"}, headers=headers)
    again = await idle.submit(user.api_key, input={"prompt": "a cat"}, headers=headers)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]


async def test_keys_are_per_user(idle: ApiHarness) -> None:
    alice, bob = idle.user(credits=10), idle.user(credits=10)
    headers = {"Idempotency-Key": "same"}
    a = await idle.submit(alice.api_key, headers=headers)
    b = await idle.submit(bob.api_key, headers=headers)
    assert a.json()["id"] != b.json()["id"] and "idempotent-replayed" not in b.headers


async def test_a_refused_submission_does_not_burn_the_key(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    headers = {"Idempotency-Key": "retry-me"}
    bad = await idle.submit(user.api_key, input={"prompt": "p", "width": 1000}, headers=headers)
    assert bad.status_code == 422
    good = await idle.submit(user.api_key, input={"prompt": "p"}, headers=headers)
    assert good.status_code == 202 and "idempotent-replayed" not in good.headers


# listing -------------------------------------------------------------------------------------
async def test_cursor_pagination(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    ids = [(await idle.submit(user.api_key, input={"prompt": f"p{i}"})).json()["id"] for i in range(7)]
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        query = "/v1/jobs?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = (await idle.client.get(query, headers=bearer(user.api_key))).json()
        assert len(page["data"]) <= 3
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


async def test_status_and_kind_filters(idle: ApiHarness) -> None:
    user, other = idle.user(credits=200), idle.user(credits=200)
    image = (await idle.submit(user.api_key)).json()["id"]
    video = (await idle.submit(user.api_key, model="veo-3.1", input={"prompt": "p", "duration": 4})).json()["id"]
    canceled = (await idle.submit(user.api_key)).json()["id"]
    await idle.client.post(f"/v1/jobs/{canceled}/cancel", headers=bearer(user.api_key))
    await idle.submit(other.api_key)

    async def ids(query: str = "") -> set[str]:
        r = await idle.client.get(f"/v1/jobs{query}", headers=bearer(user.api_key))
        assert r.status_code == 200, r.text
        return {j["id"] for j in r.json()["data"]}

    assert await ids() == {image, video, canceled}
    assert await ids("?status=queued") == {image, video}
    assert await ids("?status=canceled") == {canceled}
    assert await ids("?status=queued,canceled") == {image, video, canceled}
    assert await ids("?status=succeeded") == set()
    assert await ids("?kind=video") == {video}
    assert await ids("?kind=image") == {image, canceled}
    assert await ids("?kind=image&status=queued") == {image}
    assert await ids("?model=veo-3.1") == {video}


async def test_transactions_page_newest_first(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    for _ in range(3):
        await idle.submit(user.api_key)
    headers = bearer(user.api_key)
    first = (await idle.client.get("/v1/credits/transactions?limit=2", headers=headers)).json()
    assert [t["kind"] for t in first["data"]] == ["reserve", "reserve"]
    rest = (await idle.client.get(f"/v1/credits/transactions?limit=2&cursor={first['next_cursor']}",
                                  headers=headers)).json()
    assert [t["kind"] for t in rest["data"]] == ["reserve", "grant"] and rest["next_cursor"] is None
    assert rest["data"][-1]["amount"] == 100 and first["data"][0]["balance"] == 97


# cancel and delete ---------------------------------------------------------------------------
async def test_cancel_queued_over_http(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    job = (await idle.submit(user.api_key, model="veo-3.1", input={"prompt": "p", "duration": 4})).json()
    assert (await idle.client.get("/v1/credits", headers=bearer(user.api_key))).json()["reserved"] == 40
    r = await idle.client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(user.api_key))
    assert r.status_code == 200
    assert r.json()["status"] == "canceled" and r.json()["credits"]["refunded"] == 40
    assert (await idle.client.get("/v1/credits", headers=bearer(user.api_key))).json() == {
        "balance": 100, "reserved": 0, "plan": "free"}
    again = await idle.client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(user.api_key))
    assert again.status_code == 200 and again.json()["status"] == "canceled"
    assert [e.kind for e in ledger_rows(idle.db, job_id=job["id"])] == ["reserve", "refund"]


async def test_cancel_running_over_http(make_api: Any, storage: Any) -> None:
    from tests.fixtures.fake_executor import FakeExecutor

    executor = FakeExecutor(storage=storage, hang={"forever"})
    api = await make_api(executor=executor)
    user = api.user(credits=100)
    job = (await api.submit(user.api_key, input={"prompt": "forever"})).json()
    await wait_job(api.db, job["id"], {"running"})
    r = await api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(user.api_key))
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    done = await wait_job(api.db, job["id"])
    assert done.status == "canceled" and executor.canceled == [job["id"]]
    assert (await api.client.get("/v1/credits", headers=bearer(user.api_key))).json()["balance"] == 100


async def test_delete_outputs(api: ApiHarness) -> None:
    user = api.user(credits=100)
    job = (await api.submit(user.api_key)).json()
    done = await wait_job(api.db, job["id"])
    key = done.outputs[0]["key"]
    assert api.storage.exists(key)
    r = await api.client.delete(f"/v1/jobs/{job['id']}", headers=bearer(user.api_key))
    assert r.status_code == 200 and r.json()["outputs"] == [] and r.json()["status"] == "succeeded"
    assert not api.storage.exists(key)
    assert r.json()["credits"]["charged"] == 1  # deleting outputs refunds nothing


async def test_delete_an_active_job_is_409(idle: ApiHarness) -> None:
    user = idle.user(credits=100)
    job = (await idle.submit(user.api_key)).json()
    r = await idle.client.delete(f"/v1/jobs/{job['id']}", headers=bearer(user.api_key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_active"
