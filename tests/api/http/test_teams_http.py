"""Teams over HTTP: the routes, submitting as the team (body, header, the compat shapes), the
shared balance under 100 concurrent submissions from 5 members and the member cap under
concurrency (real uvicorn on 127.0.0.1, SQLite and PostgreSQL), removal mid-job, roles, and
cross-team access (404)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from api.core import ledger
from api.db.engine import Database
from api.db.tables import Job, TeamInvitation
from api.http.app import create_app
from api.http.webhooks import verify
from api.services.teams import TeamService
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import (
    ADMIN_KEY,
    ApiHarness,
    add_user,
    balance,
    bearer,
    get_job,
    ledger_rows,
    wait_for,
    wait_job,
    wait_until,
)

PRICE = 40  # veo-3.1, 4 s at 720p
VIDEO = {"model": "veo-3.1", "input": {"prompt": "p", "duration": 4}}
TEAM = "X-CineWeave-Team"


async def make_team(client: httpx.AsyncClient, owner: NewUser, *members: NewUser, name: str = "T",
                    role: str = "member") -> str:
    r = await client.post("/v1/teams", json={"name": name}, headers=bearer(owner.api_key))
    assert r.status_code == 201, r.text
    team_id = r.json()["id"]
    for member in members:
        inv = await client.post(f"/v1/teams/{team_id}/invitations", json={"email": member.user.email, "role": role},
                                headers=bearer(owner.api_key))
        assert inv.status_code == 201, inv.text
        ok = await client.post(f"/v1/invitations/{inv.json()['token']}/accept", headers=bearer(member.api_key))
        assert ok.status_code == 200, ok.text
    return team_id


async def grant(client: httpx.AsyncClient, account_id: str, amount: int) -> None:
    r = await client.post(f"/v1/admin/users/{account_id}/credits", json={"amount": amount},
                          headers=bearer(ADMIN_KEY))
    assert r.status_code == 201, r.text


@pytest.fixture
async def idle(make_api: Any) -> ApiHarness:
    """No runner: jobs stay queued."""
    return await make_api(run_runner=False, max_active_jobs=100, rate_limit_per_minute=1000)


async def test_a_team_over_http(idle: ApiHarness) -> None:
    h, client = idle, idle.client
    alice, bob, carol = h.user(credits=100), h.user(credits=100), h.user(credits=100)
    r = await client.post("/v1/teams", json={"name": "Studio"}, headers=bearer(alice.api_key))
    assert r.status_code == 201
    created = r.json()
    team_id = created["id"]
    assert (created["name"], created["role"], created["plan"], created["created_by"]) == (
        "Studio", "owner", "free", alice.user.id)
    assert created["webhook_secret"].startswith("whsec_")
    assert (await client.get(f"/v1/teams/{team_id}/credits", headers=bearer(alice.api_key))).json() == {
        "balance": 0, "reserved": 0, "plan": "free", "debt": 0}  # no sign-up credits for a team

    # invitations: the token once; another address is 404; a replay is 409; an expired one is 410
    inv = await client.post(f"/v1/teams/{team_id}/invitations", json={"email": bob.user.email},
                            headers=bearer(alice.api_key))
    assert inv.status_code == 201 and inv.json()["status"] == "pending" and inv.json()["role"] == "member"
    token = inv.json()["token"]
    listed = (await client.get(f"/v1/teams/{team_id}/invitations", headers=bearer(alice.api_key))).json()["data"]
    assert [i["id"] for i in listed] == [inv.json()["id"]] and "token" not in listed[0]
    wrong = await client.post(f"/v1/invitations/{token}/accept", headers=bearer(carol.api_key))
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (404, "not_found")
    ok = await client.post(f"/v1/invitations/{token}/accept", headers=bearer(bob.api_key))
    assert ok.status_code == 200 and (ok.json()["id"], ok.json()["role"]) == (team_id, "member")
    again = await client.post(f"/v1/invitations/{token}/accept", headers=bearer(bob.api_key))
    assert (again.status_code, again.json()["error"]["code"]) == (409, "invitation_used")
    late = await client.post(f"/v1/teams/{team_id}/invitations", json={"email": carol.user.email},
                             headers=bearer(alice.api_key))
    with h.db.session() as s:
        s.execute(update(TeamInvitation).where(TeamInvitation.id == late.json()["id"])
                  .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        s.commit()
    expired = await client.post(f"/v1/invitations/{late.json()['token']}/accept", headers=bearer(carol.api_key))
    assert (expired.status_code, expired.json()["error"]["code"]) == (410, "invitation_expired")

    assert [t["id"] for t in (await client.get("/v1/teams", headers=bearer(bob.api_key))).json()["data"]] == [team_id]
    members = (await client.get(f"/v1/teams/{team_id}/members", headers=bearer(bob.api_key))).json()["data"]
    assert {(m["user_id"], m["role"]) for m in members} == {(alice.user.id, "owner"), (bob.user.id, "member")}

    # submitting as the team: body "team" or the header; charged to the team, not to Bob
    await grant(client, team_id, 5 * PRICE)
    by_body = await h.submit(bob.api_key, VIDEO["model"], VIDEO["input"], team=team_id)
    assert by_body.status_code == 202, by_body.text
    assert (by_body.json()["team"], by_body.json()["submitted_by"]) == (team_id, bob.user.id)
    by_header = await h.submit(bob.api_key, VIDEO["model"], VIDEO["input"], headers={TEAM: team_id})
    assert by_header.status_code == 202 and by_header.json()["team"] == team_id
    personal = await h.submit(bob.api_key, "tiny-sd")
    assert personal.status_code == 202 and "team" not in personal.json() and "submitted_by" not in personal.json()
    two = await h.submit(bob.api_key, VIDEO["model"], VIDEO["input"], team=team_id, headers={TEAM: "team_other"})
    assert (two.status_code, two.json()["error"]["code"]) == (422, "invalid_input")
    # the Replicate and OpenAI shapes take the header
    pred = await client.post("/replicate/v1/predictions", json={"version": "cineweave/veo-3.1",
                                                                "input": {"prompt": "p", "duration": 4}},
                             headers={**bearer(bob.api_key), TEAM: team_id})
    assert pred.status_code == 201, pred.text
    video = await client.post("/openai/v1/videos", json={"model": "veo-3.1", "prompt": "p", "seconds": "4"},
                              headers={**bearer(bob.api_key), TEAM: team_id})
    assert video.status_code == 200, video.text
    assert get_job(h.db, pred.json()["id"]).user_id == team_id
    assert get_job(h.db, video.json()["id"]).submitted_by == bob.user.id
    assert balance(h.db, team_id) == ledger.BalanceView(PRICE, 4 * PRICE)
    assert balance(h.db, bob.user.id).available == 100 - personal.json()["credits"]["reserved"]

    # the team's jobs: listed with ?team= (or the header), seen and canceled by any member
    team_jobs = {by_body.json()["id"], by_header.json()["id"], pred.json()["id"], video.json()["id"]}
    for params, headers in (({"team": team_id}, {}), ({}, {TEAM: team_id})):
        page = await client.get("/v1/jobs", params=params, headers={**bearer(alice.api_key), **headers})
        assert {j["id"] for j in page.json()["data"]} == team_jobs
    mine = (await client.get("/v1/jobs", headers=bearer(bob.api_key))).json()["data"]
    assert [j["id"] for j in mine] == [personal.json()["id"]]
    seen = await client.get(f"/v1/jobs/{by_body.json()['id']}", headers=bearer(alice.api_key))
    assert seen.status_code == 200 and seen.json()["submitted_by"] == bob.user.id
    canceled = await client.post(f"/v1/jobs/{by_body.json()['id']}/cancel", headers=bearer(alice.api_key))
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    rep = await client.get(f"/replicate/v1/predictions/{pred.json()['id']}", headers=bearer(alice.api_key))
    assert rep.status_code == 200
    # the compat list routes list the team's jobs with the header, the caller's own without it
    team_headers = {**bearer(alice.api_key), TEAM: team_id}
    preds = await client.get("/replicate/v1/predictions", headers=team_headers)
    assert preds.status_code == 200 and {p["id"] for p in preds.json()["results"]} == team_jobs
    videos = await client.get("/openai/v1/videos", headers=team_headers)
    assert videos.status_code == 200 and {v["id"] for v in videos.json()["data"]} == team_jobs
    assert (await client.get("/replicate/v1/predictions", headers=bearer(alice.api_key))).json()["results"] == []
    assert (await client.get("/openai/v1/videos", headers=bearer(alice.api_key))).json()["data"] == []

    # usage per member and the team's ledger
    usage = (await client.get(f"/v1/teams/{team_id}/usage", headers=bearer(bob.api_key))).json()
    assert usage["period"] == datetime.now(UTC).strftime("%Y-%m")
    by = {m["user_id"]: m for m in usage["members"]}
    assert by[bob.user.id]["jobs"] == 4 and by[bob.user.id]["jobs_by_status"] == {"canceled": 1, "queued": 3}
    assert by[bob.user.id]["credits"] == {"reserved": 3 * PRICE, "charged": 0, "refunded": PRICE,
                                          "spent": 3 * PRICE}
    assert by[alice.user.id]["jobs"] == 0 and usage["total"]["jobs"] == 4
    old = await client.get(f"/v1/teams/{team_id}/usage", params={"period": "2020-01"}, headers=bearer(bob.api_key))
    assert old.json()["total"]["jobs"] == 0
    bad = await client.get(f"/v1/teams/{team_id}/usage", params={"period": "2020-13"}, headers=bearer(bob.api_key))
    assert bad.status_code == 422
    tx = (await client.get(f"/v1/teams/{team_id}/credits/transactions", headers=bearer(bob.api_key))).json()
    assert Counter(e["kind"] for e in tx["data"]) == {"grant": 1, "reserve": 4, "refund": 1}

    # the member's cap, set by the owner: the next team job over it is 402 member_cap_exceeded
    capped = await client.patch(f"/v1/teams/{team_id}/members/{bob.user.id}", json={"monthly_cap": 3 * PRICE},
                                headers=bearer(alice.api_key))
    assert capped.status_code == 200 and capped.json()["monthly_cap"] == 3 * PRICE
    assert capped.json()["spent_this_month"] == 3 * PRICE
    over = await h.submit(bob.api_key, VIDEO["model"], VIDEO["input"], team=team_id)
    assert (over.status_code, over.json()["error"]["code"]) == (402, "member_cap_exceeded")
    lifted = await client.patch(f"/v1/teams/{team_id}/members/{bob.user.id}", json={"monthly_cap": None},
                                headers=bearer(alice.api_key))
    assert lifted.json()["monthly_cap"] is None
    assert (await h.submit(bob.api_key, VIDEO["model"], VIDEO["input"], team=team_id)).status_code == 202

    # Carol is no member: every team route and team job is 404, and she cannot submit as the team
    for method, url in (("GET", f"/v1/teams/{team_id}"), ("GET", f"/v1/teams/{team_id}/members"),
                        ("GET", f"/v1/teams/{team_id}/credits"), ("GET", f"/v1/teams/{team_id}/usage"),
                        ("GET", f"/v1/jobs/{by_header.json()['id']}"),
                        ("POST", f"/v1/jobs/{by_header.json()['id']}/cancel"),
                        ("GET", f"/v1/jobs/{by_header.json()['id']}/events"),
                        ("GET", f"/v1/jobs?team={team_id}"),
                        ("GET", f"/replicate/v1/predictions/{pred.json()['id']}"),
                        ("GET", f"/openai/v1/videos/{video.json()['id']}")):
        r = await client.request(method, url, headers=bearer(carol.api_key))
        assert r.status_code == 404, (method, url, r.status_code)
    r = await h.submit(carol.api_key, VIDEO["model"], VIDEO["input"], team=team_id)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    assert get_job(h.db, by_header.json()["id"]).status == "queued"


async def test_roles_over_http(idle: ApiHarness) -> None:
    """Members read every team route; only owners and admins change; an owner-only act is 403 for an admin."""
    h, client = idle, idle.client
    owner, admin, member, other, outsider = (h.user(credits=0) for _ in range(5))
    team_id = await make_team(client, owner, member, other)
    await make_team(client, owner, name="unused")
    inv = await client.post(f"/v1/teams/{team_id}/invitations", json={"email": admin.user.email, "role": "admin"},
                            headers=bearer(owner.api_key))
    await client.post(f"/v1/invitations/{inv.json()['token']}/accept", headers=bearer(admin.api_key))
    pending = (await client.post(f"/v1/teams/{team_id}/invitations", json={"email": "x@example.com"},
                                 headers=bearer(owner.api_key))).json()["id"]
    reads = [f"/v1/teams/{team_id}", f"/v1/teams/{team_id}/members", f"/v1/teams/{team_id}/invitations",
             f"/v1/teams/{team_id}/credits", f"/v1/teams/{team_id}/credits/transactions",
             f"/v1/teams/{team_id}/usage"]
    changes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("PATCH", f"/v1/teams/{team_id}", {"name": "x"}),
        ("PATCH", f"/v1/teams/{team_id}/members/{other.user.id}", {"monthly_cap": 1}),
        ("POST", f"/v1/teams/{team_id}/invitations", {"email": "y@example.com"}),
        ("DELETE", f"/v1/teams/{team_id}/invitations/{pending}", None),
        ("POST", f"/v1/teams/{team_id}/webhooks/secret", None),
        ("DELETE", f"/v1/teams/{team_id}/members/{other.user.id}", None),
        ("DELETE", f"/v1/teams/{team_id}", None),
    ]

    async def call(user: NewUser, method: str, url: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return await client.request(method, url, json=body, headers=bearer(user.api_key))

    for url in reads:
        for user, status in ((owner, 200), (admin, 200), (member, 200), (outsider, 404)):
            assert (await call(user, "GET", url)).status_code == status, (url, status)
    for method, url, body in changes:
        for user, status in ((outsider, 404), (member, 403)):
            r = await call(user, method, url, body)
            assert r.status_code == status, (method, url, status, r.text)
    r = await call(admin, "DELETE", f"/v1/teams/{team_id}")
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    r = await call(admin, "PATCH", f"/v1/teams/{team_id}/members/{owner.user.id}", {"role": "member"})
    assert r.status_code == 403  # an admin never touches an owner
    r = await call(admin, "DELETE", f"/v1/teams/{team_id}/members/{owner.user.id}")
    assert r.status_code == 403
    r = await call(owner, "DELETE", f"/v1/teams/{team_id}/members/{owner.user.id}")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "last_owner")
    for method, url, body in changes[:-1]:  # an admin does the rest
        r = await call(admin, method, url, body)
        assert r.status_code in (200, 201, 204), (method, url, r.text)
    assert (await call(other, "GET", f"/v1/teams/{team_id}")).status_code == 404  # removed above
    r = await call(member, "DELETE", f"/v1/teams/{team_id}/members/{member.user.id}")  # leaving
    assert r.status_code == 204
    assert (await call(owner, "DELETE", f"/v1/teams/{team_id}")).status_code == 204
    assert (await call(owner, "GET", f"/v1/teams/{team_id}")).status_code == 404
    assert [t["name"] for t in (await call(owner, "GET", "/v1/teams")).json()["data"]] == ["unused"]


async def test_removal_mid_job_the_job_finishes_charged_to_the_team(make_api: Any, storage: LocalStorage) -> None:
    gate = threading.Event()
    h = await make_api(executor=FakeExecutor(storage=storage, gates={"held": gate}))
    client = h.client
    owner, member = h.user(credits=0), h.user(credits=0)
    team_id = await make_team(client, owner, member)
    await grant(client, team_id, 100)
    r = await h.submit(member.api_key, "tiny-sd", {"prompt": "held"}, team=team_id)
    assert r.status_code == 202
    job_id, price = r.json()["id"], r.json()["credits"]["reserved"]
    try:
        await wait_job(h.db, job_id, {"running"})
        gone = await client.delete(f"/v1/teams/{team_id}/members/{member.user.id}", headers=bearer(owner.api_key))
        assert gone.status_code == 204
        assert (await client.get(f"/v1/jobs/{job_id}", headers=bearer(member.api_key))).status_code == 404
        refused = await h.submit(member.api_key, "tiny-sd", {"prompt": "again"}, team=team_id)
        assert (refused.status_code, refused.json()["error"]["code"]) == (404, "not_found")
    finally:
        gate.set()
    done = await wait_job(h.db, job_id)
    assert (done.status, done.credits_charged, done.user_id, done.submitted_by) == (
        "succeeded", price, team_id, member.user.id)
    assert balance(h.db, team_id) == ledger.BalanceView(100 - price, 0)
    assert [(e.kind, e.user_id) for e in ledger_rows(h.db, job_id=job_id)] == [
        ("reserve", team_id), ("capture", team_id)]
    assert balance(h.db, member.user.id) == ledger.BalanceView(0, 0)
    seen = (await client.get(f"/v1/jobs/{job_id}", headers=bearer(owner.api_key))).json()
    assert (seen["status"], seen["submitted_by"]) == ("succeeded", member.user.id)
    usage = (await client.get(f"/v1/teams/{team_id}/usage", headers=bearer(owner.api_key))).json()
    removed = next(m for m in usage["members"] if m["user_id"] == member.user.id)
    assert (removed["active"], removed["credits"]["charged"]) == (False, price)


async def test_cross_team_access_is_404(idle: ApiHarness) -> None:
    h, client = idle, idle.client
    a_owner, a_member, b_owner = h.user(credits=0), h.user(credits=0), h.user(credits=0)
    team_a = await make_team(client, a_owner, a_member, name="A")
    team_b = await make_team(client, b_owner, name="B")
    await grant(client, team_b, PRICE)
    b_job = (await h.submit(b_owner.api_key, VIDEO["model"], VIDEO["input"], team=team_b)).json()["id"]
    for user in (a_owner, a_member):
        for method, url in (("GET", f"/v1/teams/{team_b}"), ("GET", f"/v1/teams/{team_b}/usage"),
                            ("PATCH", f"/v1/teams/{team_b}"), ("DELETE", f"/v1/teams/{team_b}"),
                            ("GET", f"/v1/jobs/{b_job}"), ("POST", f"/v1/jobs/{b_job}/cancel"),
                            ("DELETE", f"/v1/jobs/{b_job}"), ("GET", f"/v1/jobs?team={team_b}")):
            r = await client.request(method, url, headers=bearer(user.api_key), json={} if method == "PATCH" else None)
            assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found"), (method, url)
        r = await h.submit(user.api_key, VIDEO["model"], VIDEO["input"], team=team_b)
        assert r.status_code == 404
    # a team's id is no person: naming a person's id (or one's own team's account) as "team" is 404
    r = await h.submit(a_member.api_key, VIDEO["model"], VIDEO["input"], team=b_owner.user.id)
    assert r.status_code == 404
    assert get_job(h.db, b_job).status == "queued" and balance(h.db, team_b) == ledger.BalanceView(0, PRICE)
    assert team_a != team_b


# concurrency on a real server ------------------------------------------------------------------
async def _burst(url: str, calls: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    """POST /v1/jobs for each (key, body), all released at once."""
    limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=len(calls))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        start = asyncio.Event()
        ready = 0

        async def one(key: str, body: dict[str, Any]) -> httpx.Response:
            nonlocal ready
            ready += 1
            await start.wait()
            return await client.post("/v1/jobs", json=body, headers=bearer(key))

        tasks = [asyncio.create_task(one(k, b)) for k, b in calls]
        while ready < len(tasks):  # every task is waiting on start (one loop pass each; no clock)
            await asyncio.sleep(0)
        start.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=150)


def _team_on(db: Database, settings: Settings, owner: NewUser, members: list[NewUser], credits: int) -> str:
    teams = TeamService(db, settings)
    team_id = teams.create(owner.user, "T").view.team.id
    for m in members:
        teams.accept(m.user, teams.invite(owner.user, team_id, m.user.email, "member").token)
    with db.session() as s:
        ledger.credit(s, team_id, credits, f"test:{team_id}")
        s.commit()
    return team_id


@pytest.mark.slow
async def test_shared_balance_under_100_concurrent_submits_from_5_members(
        backend_settings: Settings, storage: LocalStorage, live_server: Any) -> None:
    """The team pays for exactly 30 of 100 jobs; the runner runs and charges them meanwhile."""
    affordable, n = 30, 100
    s = backend_settings.model_copy(update={"max_active_jobs": 1000, "rate_limit_per_minute": 1000})
    app = create_app(s, FakeExecutor(storage=storage), storage=storage, run_maintenance=False)
    srv = live_server(app)
    db = app.state.cineweave.db
    owner = add_user(db, s, credits=0)
    members = [owner] + [add_user(db, s, credits=7) for _ in range(4)]
    team_id = _team_on(db, s, owner, members[1:], affordable * PRICE)
    body = {**VIDEO, "team": team_id}
    responses = await _burst(srv.url, [(members[i % 5].api_key, body) for i in range(n)])
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: affordable, 402: n - affordable}, statuses
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 402} == {"insufficient_credits"}
    accepted = [r.json()["id"] for r in responses if r.status_code == 202]

    def all_done() -> bool:
        with db.read() as session:
            left = session.execute(select(func.count()).select_from(Job).where(
                Job.id.in_(accepted), Job.status.in_(["queued", "running"]))).scalar_one()
        return left == 0

    wait_for(all_done, "the accepted jobs to finish", timeout_s=120)
    with db.read() as session:
        jobs = session.execute(select(Job).where(Job.user_id == team_id)).scalars().all()
    assert len(jobs) == affordable and {j.status for j in jobs} == {"succeeded"}
    charged = sum(j.credits_charged for j in jobs)
    final = balance(db, team_id)
    assert final.available + final.reserved + charged == affordable * PRICE  # nothing made or lost
    assert (final, charged) == (ledger.BalanceView(0, 0), affordable * PRICE)
    assert Counter(e.kind for e in ledger_rows(db, team_id)) == {"grant": 1, "reserve": affordable,
                                                                 "capture": affordable}
    assert {j.submitted_by for j in jobs} <= {m.user.id for m in members}
    per_member = Counter(j.submitted_by for j in jobs)
    assert sum(per_member.values()) == affordable
    for m in members[1:]:
        assert balance(db, m.user.id) == ledger.BalanceView(7, 0)  # their own credits: untouched


@pytest.mark.slow
async def test_member_cap_under_concurrent_submits(backend_settings: Settings, storage: LocalStorage,
                                                   live_server: Any) -> None:
    s = backend_settings.model_copy(update={"max_active_jobs": 1000, "rate_limit_per_minute": 1000})
    app = create_app(s, None, storage=storage, run_maintenance=False)  # no runner: reservations stay held
    srv = live_server(app)
    db = app.state.cineweave.db
    owner, member = add_user(db, s, credits=0), add_user(db, s, credits=0)
    team_id = _team_on(db, s, owner, [member], 100 * PRICE)
    app.state.cineweave.teams.update_member(owner.user, team_id, member.user.id, monthly_cap=5 * PRICE,
                                            set_cap=True)
    body = {**VIDEO, "team": team_id}
    responses = await _burst(srv.url, [(member.api_key, body)] * 30 + [(owner.api_key, body)] * 5)
    codes = Counter((r.json().get("error") or {}).get("code", r.status_code) for r in responses)
    assert codes == {202: 10, "member_cap_exceeded": 25}, codes  # the owner has no cap
    assert balance(db, team_id) == ledger.BalanceView(90 * PRICE, 10 * PRICE)
    with db.read() as session:
        by = Counter(session.execute(select(Job.submitted_by).where(Job.user_id == team_id)).scalars())
    assert by == {member.user.id: 5, owner.user.id: 5}


async def test_a_team_jobs_webhooks_are_the_teams(make_api: Any, live_server: Any) -> None:
    """Signed with the team's secret (shown at creation, rotated by owners and admins), and they
    say the team and the member."""
    from tests.api.http.test_webhooks_out import LOOPBACK, Receiver

    receiver = Receiver()
    srv = live_server(receiver.app())
    h = await make_api(**LOOPBACK)
    owner, member = h.user(credits=0), h.user(credits=0)
    created = (await h.client.post("/v1/teams", json={"name": "T"}, headers=bearer(owner.api_key))).json()
    team_id, secret = created["id"], created["webhook_secret"]
    inv = await h.client.post(f"/v1/teams/{team_id}/invitations", json={"email": member.user.email},
                              headers=bearer(owner.api_key))
    await h.client.post(f"/v1/invitations/{inv.json()['token']}/accept", headers=bearer(member.api_key))
    await grant(h.client, team_id, 10)
    job = (await h.submit(member.api_key, "tiny-sd", team=team_id, webhook=f"{srv.url}/hook")).json()
    await wait_job(h.db, job["id"])
    await wait_until(lambda: "succeeded" in receiver.events(), 10, what="the completed webhook")
    await h.state.webhooks.join(10)
    assert receiver.received
    for headers, body, _ in receiver.received:
        assert verify(secret, headers, body)
        assert not verify(member.webhook_secret, headers, body)
    final = json.loads(receiver.received[-1][1])
    assert (final["status"], final["team"], final["submitted_by"]) == ("succeeded", team_id, member.user.id)
    rotated = await h.client.post(f"/v1/teams/{team_id}/webhooks/secret", headers=bearer(owner.api_key))
    assert rotated.status_code == 200 and rotated.json()["webhook_secret"] not in (secret, "")
