"""Bad submissions over HTTP: the documented status and code, no credit moved, no job created."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from api.core import ledger
from tests.fixtures.harness import ApiHarness, balance, bearer, job_count, ledger_rows

JSON_CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown model", {"model": "no-such-model", "input": {"prompt": "a cat"}}, 422, "invalid_input"),
    ("prompt over the limit", {"model": "tiny-sd", "input": {"prompt": "x" * 501}}, 422, "invalid_input"),
    ("negative prompt over the limit", {"model": "tiny-sd", "input": {"prompt": "p", "negative_prompt": "n" * 501}},
     422, "invalid_input"),
    ("empty prompt", {"model": "tiny-sd", "input": {"prompt": ""}}, 422, "invalid_input"),
    ("missing prompt", {"model": "tiny-sd", "input": {}}, 422, "invalid_input"),
    ("width too large", {"model": "tiny-sd", "input": {"prompt": "p", "width": 1024}}, 422, "invalid_input"),
    ("height too small", {"model": "tiny-sd", "input": {"prompt": "p", "height": 8}}, 422, "invalid_input"),
    ("size not a multiple", {"model": "tiny-sd", "input": {"prompt": "p", "width": 100}}, 422, "invalid_input"),
    ("too many steps", {"model": "tiny-sd", "input": {"prompt": "p", "steps": 500}}, 422, "invalid_input"),
    ("frames off the grid", {"model": "tiny-wan", "input": {"prompt": "p", "num_frames": 18}}, 422, "invalid_input"),
    ("too many frames", {"model": "tiny-wan", "input": {"prompt": "p", "num_frames": 97}}, 422, "invalid_input"),
    ("duration not offered", {"model": "veo-3.1", "input": {"prompt": "p", "duration": 5}}, 422, "invalid_input"),
    ("duration too long", {"model": "veo-3.1", "input": {"prompt": "p", "duration": 30}}, 422, "invalid_input"),
    ("1080p below 8 s", {"model": "veo-3.1", "input": {"prompt": "p", "duration": 4, "resolution": "1080p"}},
     422, "invalid_input"),
    ("aspect ratio not offered", {"model": "veo-3.1", "input": {"prompt": "p", "aspect_ratio": "4:3"}},
     422, "invalid_input"),
    ("image to a text-only model", {"model": "tiny-wan", "input": {"prompt": "p", "image": "upl_x"}},
     422, "invalid_input"),
    ("someone's upload", {"model": "tiny-sd", "input": {"prompt": "p", "image": "upl_not_mine"}},
     422, "invalid_input"),
    ("too many loras", {"model": "tiny-sd", "input": {"prompt": "p", "loras": [{"id": f"l{i}"} for i in range(4)]}},
     422, "invalid_input"),
    ("width as text", {"model": "tiny-sd", "input": {"prompt": "p", "width": "wide"}}, 422, "invalid_input"),
    ("steps as float", {"model": "tiny-sd", "input": {"prompt": "p", "steps": 2.5}}, 422, "invalid_input"),
    ("prompt as number", {"model": "tiny-sd", "input": {"prompt": 42}}, 422, "invalid_input"),
    ("input as text", {"model": "tiny-sd", "input": "a cat"}, 422, "invalid_input"),
    ("input as list", {"model": "tiny-sd", "input": ["a cat"]}, 422, "invalid_input"),
    ("model as number", {"model": 7, "input": {"prompt": "p"}}, 422, "invalid_input"),
    ("missing model", {"input": {"prompt": "p"}}, 422, "invalid_input"),
    ("missing input", {"model": "tiny-sd"}, 422, "invalid_input"),
    ("unknown top-level field", {"model": "tiny-sd", "input": {"prompt": "p"}, "priority": 9}, 422, "invalid_input"),
    ("unknown input field", {"model": "tiny-sd", "input": {"prompt": "p", "sampler": "euler"}}, 422, "invalid_input"),
    ("webhook not http", {"model": "tiny-sd", "input": {"prompt": "p"}, "webhook": "ftp://x/y"}, 422, "invalid_input"),
    ("unknown webhook event", {"model": "tiny-sd", "input": {"prompt": "p"}, "webhook": "https://example.com/h",
                               "webhook_events_filter": ["finished"]}, 422, "invalid_input"),
    ("policy word", {"model": "tiny-sd", "input": {"prompt": "a Forbidden thing"}}, 422, "content_policy"),
    ("policy phrase in the negative prompt", {"model": "tiny-sd", "input": {"prompt": "p",
                                              "negative_prompt": "very bad words"}}, 422, "content_policy"),
    ("more than the balance", {"model": "veo-3.1", "input": {"prompt": "p", "duration": 8, "resolution": "1080p"}},
     402, "insufficient_credits"),
]


@pytest.fixture
async def h(make_api: Any) -> ApiHarness:
    return await make_api(run_runner=False, content_policy_words=["forbidden", "bad words"])


async def _nothing_moved(h: ApiHarness, user_id: str, key: str, credits: int) -> None:
    assert job_count(h.db, user_id) == 0
    assert balance(h.db, user_id) == ledger.BalanceView(credits, 0)
    assert [e.kind for e in ledger_rows(h.db, user_id)] == ["grant"]
    r = await h.client.get("/v1/credits", headers=bearer(key))
    assert r.json() == {"balance": credits, "reserved": 0, "plan": "free"}
    listed = await h.client.get("/v1/jobs", headers=bearer(key))
    assert listed.json() == {"data": [], "next_cursor": None}


@pytest.mark.parametrize(("case", "body", "status", "code"), JSON_CASES, ids=[c[0] for c in JSON_CASES])
async def test_bad_json_submissions(h: ApiHarness, case: str, body: dict[str, Any], status: int, code: str) -> None:
    user = h.user(credits=100)
    r = await h.client.post("/v1/jobs", json=body, headers=bearer(user.api_key))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    assert isinstance(error["details"], dict)
    await _nothing_moved(h, user.user.id, user.api_key, 100)


@pytest.mark.parametrize(("case", "content", "content_type"), [
    ("malformed JSON", b'{"model": "tiny-sd", "input": {"prompt": "p"', "application/json"),
    ("trailing garbage", b'{"model": "tiny-sd", "input": {"prompt": "p"}} xx', "application/json"),
    ("empty body", b"", "application/json"),
    ("JSON array", b'[{"model": "tiny-sd"}]', "application/json"),
    ("not UTF-8", b'{"model": "\xff\xfe"}', "application/json"),
    ("form data", b"model=tiny-sd&prompt=p", "application/x-www-form-urlencoded"),
])
async def test_bad_bodies(h: ApiHarness, case: str, content: bytes, content_type: str) -> None:
    user = h.user(credits=100)
    headers = {**bearer(user.api_key), "content-type": content_type}
    r = await h.client.post("/v1/jobs", content=content, headers=headers)
    # 422 for what FastAPI can decode; 400 for a body it cannot even read as text (not UTF-8)
    assert r.status_code == (400 if case == "not UTF-8" else 422), r.text
    assert r.json()["error"]["code"] == "invalid_input"
    await _nothing_moved(h, user.user.id, user.api_key, 100)


async def test_malformed_json_says_so(h: ApiHarness) -> None:
    user = h.user(credits=100)
    r = await h.client.post("/v1/jobs", content=b'{"model": ', headers={**bearer(user.api_key),
                                                                          "content-type": "application/json"})
    assert r.json()["error"]["message"] == "the request body is not valid JSON"


async def test_validation_errors_name_the_field(h: ApiHarness) -> None:
    user = h.user(credits=100)
    r = await h.client.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": "p", "width": 1000}},
                            headers=bearer(user.api_key))
    assert r.json()["error"]["details"]["field"] == "width"
    r = await h.client.post("/v1/jobs", json={"model": "veo-3.1", "input": {"prompt": "p", "duration": 5}},
                            headers=bearer(user.api_key))
    assert r.json()["error"]["details"] == {"field": "duration", "allowed": [4.0, 6.0, 8.0]}


@pytest.mark.parametrize("key", ["", "k" * 201])
async def test_bad_idempotency_key(h: ApiHarness, key: str) -> None:
    user = h.user(credits=100)
    r = await h.client.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": "p"}},
                            headers={**bearer(user.api_key), "Idempotency-Key": key})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    await _nothing_moved(h, user.user.id, user.api_key, 100)


async def test_limits_answer_429_and_move_nothing_more(h: ApiHarness, make_api: Any) -> None:
    user = h.user(credits=100)
    body = {"model": "tiny-sd", "input": {"prompt": "p"}}
    for _ in range(3):
        assert (await h.client.post("/v1/jobs", json=body, headers=bearer(user.api_key))).status_code == 202
    r = await h.client.post("/v1/jobs", json=body, headers=bearer(user.api_key))
    assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency_limit"
    assert r.headers["retry-after"] == "60"
    assert job_count(h.db, user.user.id) == 3 and balance(h.db, user.user.id) == ledger.BalanceView(97, 3)

    rated = await make_api(run_runner=False, max_active_jobs=100)
    other = rated.user(credits=100)
    for _ in range(5):
        assert (await rated.client.post("/v1/jobs", json=body, headers=bearer(other.api_key))).status_code == 202
    r = await rated.client.post("/v1/jobs", json=body, headers=bearer(other.api_key))
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert "retry-after" in r.headers
    assert job_count(rated.db, other.user.id) == 5 and balance(rated.db, other.user.id) == ledger.BalanceView(95, 5)


async def test_other_bad_queries(h: ApiHarness) -> None:
    user = h.user(credits=100)
    headers = bearer(user.api_key)
    naive = base64.urlsafe_b64encode(b"2026-01-01T00:00:00|job_x").decode().rstrip("=")
    for query in ("status=done", "kind=audio", "limit=0", "limit=1000", "cursor=%%%", "cursor=bm90LWEtY3Vyc29y",
                  f"cursor={naive}"):
        r = await h.client.get(f"/v1/jobs?{query}", headers=headers)
        assert r.status_code == 422, (query, r.text)
        assert r.json()["error"]["code"] == "invalid_input"
    r = await h.client.get("/v1/credits/transactions?cursor=0", headers=headers)
    assert r.status_code == 422


async def test_out_of_range_numbers_and_odd_signatures_are_4xx(h: ApiHarness) -> None:
    """Found by schemathesis: these were 500s (an int64 overflow in the driver, a non-ASCII HMAC compare)."""
    from tests.fixtures.harness import ADMIN_KEY

    user = h.user(credits=100)
    huge = "59716541581652295637088413736239104"
    r = await h.client.get(f"/v1/credits/transactions?cursor={huge}", headers=bearer(user.api_key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    r = await h.client.get(f"/v1/admin/users?offset={huge}", headers=bearer(ADMIN_KEY))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    r = await h.client.get("/v1/admin/users?offset=9223372036854775807", headers=bearer(ADMIN_KEY))
    assert r.status_code == 200 and r.json()["data"] == []
    for signature in ("é" * 64, "Z" * 64, "0" * 63):
        r = await h.client.get("/v1/files/outputs/x.png", params={"expires": 1981036390, "signature": signature})
        assert r.status_code == 422, signature
