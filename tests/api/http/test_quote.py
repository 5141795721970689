"""``POST /v1/jobs/quote`` and ``POST /v1/loras/quote``: the same checks and price as submitting,
and nothing moves (no job, no ledger entry, no limit counted)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from api.core import ledger
from api.db.tables import Lora
from tests.api.http.test_bad_input import JSON_CASES
from tests.fixtures.harness import ADMIN_KEY, ApiHarness, balance, bearer, job_count, ledger_rows

QUOTE_FIELDS = {"model", "kind", "task", "credits", "input", "balance", "affordable", "reason"}
# bodies a quote and a submission must price alike (images, video by frames, remote video by duration)
PRICED: list[tuple[str, dict[str, Any]]] = [
    ("image defaults", {"model": "tiny-sd", "input": {"prompt": "a cat"}}),
    ("image sized", {"model": "tiny-sd", "input": {"prompt": "a cat", "width": 128, "height": 64, "steps": 4,
                                                   "seed": 7, "negative_prompt": "blur"}}),
    ("video frames", {"model": "tiny-wan", "input": {"prompt": "a cat", "num_frames": 9, "fps": 8}}),
    ("remote video 8 s 1080p", {"model": "veo-3.1", "input": {"prompt": "a cat", "duration": 8,
                                                              "resolution": "1080p"}}),
    ("remote video 4 s", {"model": "veo-3.1", "input": {"prompt": "a cat", "duration": 4}}),
]


@pytest.fixture
async def h(make_api: Any) -> ApiHarness:
    return await make_api(run_runner=False, content_policy_words=["forbidden", "bad words"])


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(out, "PNG")
    return out.getvalue()


async def quote(h: ApiHarness, key: str, body: dict[str, Any], path: str = "/v1/jobs/quote") -> Any:
    return await h.client.post(path, json=body, headers=bearer(key))


@pytest.mark.parametrize(("case", "body"), PRICED, ids=[c[0] for c in PRICED])
async def test_quote_prices_as_the_job_it_would_create(h: ApiHarness, case: str, body: dict[str, Any]) -> None:
    user = h.user(credits=1000)
    q = await quote(h, user.api_key, body)
    assert q.status_code == 200, q.text
    answer = q.json()
    assert set(answer) == QUOTE_FIELDS
    assert answer["balance"] == {"available": 1000, "reserved": 0, "debt": 0} and answer["affordable"] is True
    assert answer["reason"] is None
    assert job_count(h.db, user.user.id) == 0
    seeded = {**body, "input": {**body["input"], "seed": answer["input"]["seed"]}}  # a seed is drawn when absent
    r = await h.client.post("/v1/jobs", json=seeded, headers=bearer(user.api_key))
    assert r.status_code == 202, r.text
    job = r.json()
    assert answer["credits"] == job["credits"]["reserved"] > 0
    assert (answer["model"], answer["kind"], answer["task"]) == (job["model"], job["kind"], job["task"])
    assert answer["input"] == job["input"]  # normalized the same way (defaults filled in)
    after = (await quote(h, user.api_key, body)).json()
    assert after["balance"] == {"available": 1000 - job["credits"]["reserved"],
                                "reserved": job["credits"]["reserved"], "debt": 0}


QUOTE_ERRORS = [c for c in JSON_CASES if c[3] != "insufficient_credits"]


@pytest.mark.parametrize(("case", "body", "status", "code"), QUOTE_ERRORS, ids=[c[0] for c in QUOTE_ERRORS])
async def test_bad_bodies_get_the_submissions_error(h: ApiHarness, case: str, body: dict[str, Any], status: int,
                                                    code: str) -> None:
    user = h.user(credits=100)
    submitted = await h.client.post("/v1/jobs", json=body, headers=bearer(user.api_key))
    quoted = await quote(h, user.api_key, body)
    assert (quoted.status_code, quoted.json()["error"]["code"]) == (status, code), quoted.text
    assert (submitted.status_code, submitted.json()["error"]["code"]) == (status, code)
    assert quoted.json()["error"]["details"] == submitted.json()["error"]["details"]
    assert job_count(h.db, user.user.id) == 0


async def test_more_than_the_balance_is_a_price_not_an_error(h: ApiHarness) -> None:
    user = h.user(credits=100)
    body = {"model": "veo-3.1", "input": {"prompt": "p", "duration": 8, "resolution": "1080p"}}
    q = await quote(h, user.api_key, body)
    assert q.status_code == 200
    assert q.json()["credits"] == 120 and q.json()["affordable"] is False
    assert q.json()["reason"] == "insufficient_credits"
    assert q.json()["balance"] == {"available": 100, "reserved": 0, "debt": 0}
    r = await h.client.post("/v1/jobs", json=body, headers=bearer(user.api_key))
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_credits"


async def test_an_account_in_debt_cannot_afford_anything(h: ApiHarness) -> None:
    user = h.user(credits=10)
    with h.db.session() as s:
        ledger.claw_back(s, user.user.id, 15, "dispute-1")  # 10 taken, 5 owed
        s.commit()
    body = {"model": "tiny-sd", "input": {"prompt": "a cat"}}
    q = await quote(h, user.api_key, body)
    assert q.status_code == 200 and q.json()["affordable"] is False
    assert q.json()["reason"] == "account_in_debt"
    assert q.json()["balance"] == {"available": 0, "reserved": 0, "debt": 5}
    r = await h.client.post("/v1/jobs", json=body, headers=bearer(user.api_key))
    assert r.status_code == 402 and r.json()["error"]["code"] == "account_in_debt"
    lq = await quote(h, user.api_key, {"name": "me", "base_model": "tiny-sd", "steps": 600}, "/v1/loras/quote")
    assert lq.json()["affordable"] is False and lq.json()["balance"]["debt"] == 5


async def test_quotes_move_nothing_and_count_toward_no_limit(h: ApiHarness) -> None:
    user = h.user(credits=100)  # free plan: 3 active jobs, 5 generations a minute
    body = {"model": "tiny-sd", "input": {"prompt": "a cat"}}
    for _ in range(8):
        assert (await quote(h, user.api_key, body)).status_code == 200
    assert job_count(h.db, user.user.id) == 0
    assert [e.kind for e in ledger_rows(h.db, user.user.id)] == ["grant"]
    assert balance(h.db, user.user.id) == ledger.BalanceView(100, 0)
    assert (await h.client.get("/v1/jobs", headers=bearer(user.api_key))).json()["data"] == []
    for _ in range(3):  # the quotes used none of the limits
        assert (await h.client.post("/v1/jobs", json=body, headers=bearer(user.api_key))).status_code == 202
    # at the active-jobs limit a submission is refused; a quote still answers (it is only a price)
    assert (await h.client.post("/v1/jobs", json=body, headers=bearer(user.api_key))).status_code == 429
    q = await quote(h, user.api_key, body)
    assert q.status_code == 200 and q.json()["balance"] == {"available": 97, "reserved": 3, "debt": 0}


async def test_a_quote_ignores_idempotency_keys(h: ApiHarness) -> None:
    user = h.user(credits=100)
    body = {"model": "tiny-sd", "input": {"prompt": "a cat", "seed": 1}}
    headers = {**bearer(user.api_key), "Idempotency-Key": "k1"}
    assert (await h.client.post("/v1/jobs/quote", json=body, headers=headers)).status_code == 200
    r = await h.client.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers  # the quote used no key


async def test_authorization_and_references(h: ApiHarness) -> None:
    alice, bob = h.user(credits=100), h.user(credits=100)
    body = {"model": "tiny-sd", "input": {"prompt": "a cat"}}
    r = await h.client.post("/v1/jobs/quote", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await h.client.post("/v1/jobs/quote", json=body, headers=bearer("cw_0000_not-a-key"))
    assert r.status_code == 401
    r = await h.client.post("/v1/jobs/quote", json=body, headers=bearer(ADMIN_KEY))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"

    # an image input: one's own upload is priced; someone else's is refused as a submission refuses it
    mine = h.state.uploads.create(alice.user, [("a.png", png())])[0].id
    theirs = h.state.uploads.create(bob.user, [("b.png", png())])[0].id
    i2i = {"model": "tiny-sd", "input": {"prompt": "a cat", "image": mine, "strength": 0.5}}
    q = await quote(h, alice.api_key, i2i)
    assert q.status_code == 200, q.text
    assert q.json()["task"] == "i2i" and q.json()["input"]["image"] == mine
    for path in ("/v1/jobs/quote", "/v1/jobs"):
        r = await h.client.post(path, json={**i2i, "input": {**i2i["input"], "image": theirs}},
                                headers=bearer(alice.api_key))
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", (path, r.text)
        assert r.json()["error"]["details"]["field"] == "image"

    # LoRAs: someone else's is not found (404), as on submission; one's own trained LoRA is priced
    with h.db.session() as s:
        own = Lora(user_id=alice.user.id, name="a", base_model="tiny-sd", status="succeeded", weights_key="w")
        other = Lora(user_id=bob.user.id, name="b", base_model="tiny-sd", status="succeeded", weights_key="w")
        s.add_all([own, other])
        s.commit()
        own_id, other_id = own.id, other.id
    with_lora = {"model": "tiny-sd", "input": {"prompt": "a cat", "loras": [{"id": own_id, "scale": 0.7}]}}
    q = await quote(h, alice.api_key, with_lora)
    assert q.status_code == 200 and q.json()["input"]["loras"][0]["id"] == own_id
    for path in ("/v1/jobs/quote", "/v1/jobs"):
        r = await h.client.post(path, json={**with_lora, "input": {"prompt": "a cat", "loras": [{"id": other_id}]}},
                                headers=bearer(alice.api_key))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
    assert job_count(h.db, alice.user.id) == 0


async def test_webhook_egress_is_checked_too(make_api: Any) -> None:
    strict = await make_api(run_runner=False, egress_allow_networks=[])
    user = strict.user(credits=100)
    body = {"model": "tiny-sd", "input": {"prompt": "a cat"}, "webhook": "http://127.0.0.1:9/hook"}
    submitted = await strict.client.post("/v1/jobs", json=body, headers=bearer(user.api_key))
    quoted = await strict.client.post("/v1/jobs/quote", json=body, headers=bearer(user.api_key))
    assert submitted.status_code == quoted.status_code == 422
    assert quoted.json()["error"]["code"] == submitted.json()["error"]["code"]
    assert quoted.json()["error"]["details"] == submitted.json()["error"]["details"]


# LoRA training ------------------------------------------------------------------------------
async def test_lora_quote_prices_as_the_training_job(h: ApiHarness) -> None:
    user = h.user(credits=1000)
    uploads = [u.id for u in h.state.uploads.create(user.user, [(f"{i}.png", png()) for i in range(3)])]
    body = {"name": "me", "base_model": "tiny-sd", "steps": 600, "images": uploads}
    q = await quote(h, user.api_key, body, "/v1/loras/quote")
    assert q.status_code == 200, q.text
    answer = q.json()
    assert answer["images"] == 3 and answer["base_model"] == "tiny-sd" and answer["steps"] == 600
    assert answer["balance"] == {"available": 1000, "reserved": 0, "debt": 0} and answer["affordable"] is True
    assert job_count(h.db, user.user.id) == 0
    r = await h.client.post("/v1/loras", json=body, headers=bearer(user.api_key))
    assert r.status_code == 202, r.text
    assert answer["credits"] == r.json()["job"]["credits"]["reserved"] > 0
    # before the photos are in, the steps still have their price
    early = await quote(h, user.api_key, {"name": "me", "base_model": "tiny-sd", "steps": 600}, "/v1/loras/quote")
    assert early.status_code == 200 and early.json()["images"] == 0
    assert early.json()["credits"] == answer["credits"]
    more = await quote(h, user.api_key, {"name": "me", "base_model": "tiny-sd", "steps": 2000}, "/v1/loras/quote")
    assert more.json()["credits"] > answer["credits"]


@pytest.mark.parametrize(("case", "changes", "status", "code"), [
    ("not trainable", {"base_model": "tiny-wan"}, 422, "invalid_input"),
    ("unknown base model", {"base_model": "nope"}, 422, "invalid_input"),
    ("steps out of range", {"steps": 100_000}, 422, "invalid_input"),
    ("bad trigger word", {"trigger_word": "two words"}, 422, "invalid_input"),
    ("someone's upload", {"images": ["upl_not_mine"]}, 422, "invalid_input"),
    ("unknown field", {"rate": 1}, 422, "invalid_input"),
])
async def test_lora_quote_errors_match_training(h: ApiHarness, case: str, changes: dict[str, Any], status: int,
                                               code: str) -> None:
    user = h.user(credits=1000)
    upload = h.state.uploads.create(user.user, [("a.png", png())])[0].id
    body = {"name": "me", "base_model": "tiny-sd", "steps": 600, "images": [upload], **changes}
    created = await h.client.post("/v1/loras", json=body, headers=bearer(user.api_key))
    quoted = await quote(h, user.api_key, body, "/v1/loras/quote")
    assert (quoted.status_code, quoted.json()["error"]["code"]) == (status, code), quoted.text
    assert (created.status_code, created.json()["error"]["code"]) == (status, code), created.text
    assert job_count(h.db, user.user.id) == 0


async def test_lora_quote_moves_nothing(h: ApiHarness) -> None:
    user = h.user(credits=10)
    body = {"name": "me", "base_model": "tiny-sd", "steps": 2000}
    q = await quote(h, user.api_key, body, "/v1/loras/quote")
    assert q.status_code == 200 and q.json()["affordable"] is (q.json()["credits"] <= 10)
    assert (await h.client.post("/v1/loras/quote", json=body)).status_code == 401
    assert job_count(h.db, user.user.id) == 0 and balance(h.db, user.user.id) == ledger.BalanceView(10, 0)
    with h.db.read() as s:
        assert s.query(Lora).filter(Lora.user_id == user.user.id).count() == 0


async def test_a_team_members_cap_makes_the_quote_unaffordable_as_submit_refuses(h: ApiHarness) -> None:
    """A member over their monthly cap on a team: the submission is 402 member_cap_exceeded, so
    the quote (as it treats too few credits or a debt: a price, not an error) says not affordable,
    with that code, though the team's balance covers it."""
    from tests.api.http.test_teams_http import PRICE, VIDEO, grant, make_team

    owner, member = h.user(credits=0), h.user(credits=0)
    team_id = await make_team(h.client, owner, member)
    await grant(h.client, team_id, 10 * PRICE)
    capped = await h.client.patch(f"/v1/teams/{team_id}/members/{member.user.id}", json={"monthly_cap": PRICE},
                                  headers=bearer(owner.api_key))
    assert capped.status_code == 200, capped.text
    body = {**VIDEO, "team": team_id}
    first = await quote(h, member.api_key, body)
    assert first.status_code == 200, first.text
    assert (first.json()["credits"], first.json()["affordable"], first.json()["reason"]) == (PRICE, True, None)
    assert (await h.client.post("/v1/jobs", json=body, headers=bearer(member.api_key))).status_code == 202
    # the cap is spent: the next one is refused, and the quote says so (the team could pay it)
    q = await quote(h, member.api_key, body)
    assert q.status_code == 200, q.text
    assert (q.json()["affordable"], q.json()["reason"]) == (False, "member_cap_exceeded")
    assert q.json()["balance"]["available"] == 9 * PRICE
    r = await h.client.post("/v1/jobs", json=body, headers=bearer(member.api_key))
    assert (r.status_code, r.json()["error"]["code"]) == (402, "member_cap_exceeded")
    # the owner has no cap: the same body is affordable for them
    mine = await quote(h, owner.api_key, body)
    assert (mine.json()["affordable"], mine.json()["reason"]) == (True, None)
