"""Authorization over every route of the app, table-driven.

Every (method, path) the app serves must be classified below; a new route that is not fails
``test_every_route_is_classified``. Then, for each route: no key or a bad key is 401; a user's key on
an admin route is 403; the admin key on a user route is 403; another user's resource is 404 (and
left untouched); the owner (or the admin) gets through.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import update

from api.db.tables import ApiKey, Job, Lora, utcnow
from api.http.compat.replicate import version_id
from api.services.jobs import Submission
from api.services.users import NewUser, create_api_key
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import ADMIN_KEY, ApiHarness, bearer, get_job

PUBLIC = "public"        # no key needed
SIGNED = "signed"        # no key; a signature in the URL or the headers instead
USER = "user"            # the caller's own data; no id in the path
OWNED = "owned"          # an id in the path names one of the caller's resources
ADMIN = "admin"          # the admin key, or a user flagged admin

ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/v1/models"): PUBLIC,
    ("GET", "/v1/plans"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/oauth2-redirect"): PUBLIC,
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/"): PUBLIC,  # the web console (its assets under /console/ are a static mount)
    ("GET", "/favicon.ico"): PUBLIC,
    ("GET", "/v1/files/{key}"): SIGNED,
    ("POST", "/v1/webhooks/{provider}"): SIGNED,
    ("POST", "/v1/webhooks/stripe"): SIGNED,
    ("POST", "/v1/billing/checkout"): USER,
    ("POST", "/v1/billing/portal"): USER,
    ("GET", "/v1/billing/subscription"): USER,
    ("GET", "/v1/billing/usage"): USER,
    ("POST", "/v1/jobs"): USER,
    ("POST", "/v1/jobs/quote"): USER,
    ("POST", "/v1/loras/quote"): USER,
    ("GET", "/v1/jobs"): USER,
    ("GET", "/v1/credits"): USER,
    ("GET", "/v1/credits/transactions"): USER,
    ("GET", "/v1/keys"): USER,
    ("POST", "/v1/keys"): USER,
    ("POST", "/v1/webhooks/secret"): USER,
    ("POST", "/v1/uploads"): USER,
    ("GET", "/v1/uploads"): USER,
    ("POST", "/v1/loras"): USER,
    ("GET", "/v1/loras"): USER,
    ("GET", "/v1/jobs/{job_id}"): OWNED,
    ("DELETE", "/v1/jobs/{job_id}"): OWNED,
    ("POST", "/v1/jobs/{job_id}/cancel"): OWNED,
    ("GET", "/v1/jobs/{job_id}/events"): OWNED,
    ("DELETE", "/v1/keys/{key_id}"): OWNED,
    ("GET", "/v1/uploads/{upload_id}"): OWNED,
    ("DELETE", "/v1/uploads/{upload_id}"): OWNED,
    ("GET", "/v1/loras/{lora_id}"): OWNED,
    ("DELETE", "/v1/loras/{lora_id}"): OWNED,
    ("GET", "/v1/admin/users"): ADMIN,
    ("POST", "/v1/admin/users"): ADMIN,
    ("GET", "/v1/admin/users/{user_id}"): ADMIN,
    ("PATCH", "/v1/admin/users/{user_id}"): ADMIN,
    ("POST", "/v1/admin/users/{user_id}/keys"): ADMIN,
    ("DELETE", "/v1/admin/users/{user_id}/keys/{key_id}"): ADMIN,
    ("POST", "/v1/admin/users/{user_id}/credits"): ADMIN,
    ("GET", "/v1/admin/jobs"): ADMIN,
    ("GET", "/v1/admin/jobs/{job_id}"): ADMIN,
    ("POST", "/v1/admin/jobs/{job_id}/cancel"): ADMIN,
    ("POST", "/v1/admin/models/{model_id}/swap"): ADMIN,
    ("GET", "/v1/admin/stats"): ADMIN,
    # the OpenAI shape
    ("GET", "/openai/v1/models"): USER,
    ("GET", "/openai/v1/models/{model_id}"): USER,
    ("GET", "/openai/v1/videos"): USER,
    ("POST", "/openai/v1/videos"): USER,
    ("POST", "/openai/v1/images/generations"): USER,
    ("POST", "/openai/v1/images/edits"): USER,
    ("GET", "/openai/v1/videos/{video_id}"): OWNED,
    ("DELETE", "/openai/v1/videos/{video_id}"): OWNED,
    ("GET", "/openai/v1/videos/{video_id}/content"): OWNED,
    # the Replicate shape
    ("GET", "/replicate/v1/models"): USER,
    ("GET", "/replicate/v1/models/{owner}/{name}"): USER,
    ("GET", "/replicate/v1/models/{owner}/{name}/versions"): USER,
    ("GET", "/replicate/v1/models/{owner}/{name}/versions/{version}"): USER,
    ("GET", "/replicate/v1/predictions"): USER,
    ("POST", "/replicate/v1/predictions"): USER,
    ("POST", "/replicate/v1/models/{owner}/{name}/predictions"): USER,
    ("POST", "/replicate/v1/deployments/{owner}/{name}/predictions"): USER,
    ("GET", "/replicate/v1/predictions/{prediction_id}"): OWNED,
    ("POST", "/replicate/v1/predictions/{prediction_id}/cancel"): OWNED,
    ("GET", "/replicate/v1/predictions/{prediction_id}/stream"): OWNED,
    # teams: a team's members get through (Alice owns hers); anyone else's team id is 404
    ("POST", "/v1/teams"): USER,
    ("GET", "/v1/teams"): USER,
    ("GET", "/v1/teams/{team_id}"): OWNED,
    ("PATCH", "/v1/teams/{team_id}"): OWNED,
    ("DELETE", "/v1/teams/{team_id}"): OWNED,
    ("POST", "/v1/teams/{team_id}/webhooks/secret"): OWNED,
    ("GET", "/v1/teams/{team_id}/members"): OWNED,
    ("PATCH", "/v1/teams/{team_id}/members/{member_id}"): OWNED,
    ("DELETE", "/v1/teams/{team_id}/members/{member_id}"): OWNED,
    ("POST", "/v1/teams/{team_id}/invitations"): OWNED,
    ("GET", "/v1/teams/{team_id}/invitations"): OWNED,
    ("DELETE", "/v1/teams/{team_id}/invitations/{invitation_id}"): OWNED,
    ("GET", "/v1/teams/{team_id}/credits"): OWNED,
    ("GET", "/v1/teams/{team_id}/credits/transactions"): OWNED,
    ("GET", "/v1/teams/{team_id}/usage"): OWNED,
    # presets: everyone reads them (an unknown name is 404: test_presets_http); admins change them
    ("GET", "/v1/presets"): USER,
    ("GET", "/v1/presets/{name}"): USER,
    ("POST", "/v1/presets"): ADMIN,
    ("PATCH", "/v1/presets/{name}"): ADMIN,
    # projects: the caller's (or a team's of theirs); another's or a deleted one is 404
    ("POST", "/v1/projects"): USER,
    ("GET", "/v1/projects"): USER,
    ("GET", "/v1/projects/{project_id}"): OWNED,
    ("PATCH", "/v1/projects/{project_id}"): OWNED,
    ("DELETE", "/v1/projects/{project_id}"): OWNED,
    ("POST", "/v1/invitations/{token}/accept"): OWNED,  # "another's": an invitation to another address
    # pipelines (a parent job with step jobs)
    ("POST", "/v1/pipelines"): USER,
    ("POST", "/v1/pipelines/quote"): USER,
    ("GET", "/v1/pipelines"): USER,
    ("GET", "/v1/pipelines/{pipeline_id}"): OWNED,
    ("POST", "/v1/pipelines/{pipeline_id}/cancel"): OWNED,
    ("GET", "/v1/pipelines/{pipeline_id}/events"): OWNED,
}


def app_routes(app: FastAPI) -> Iterator[tuple[str, str]]:
    """Every (method, path) the app serves, including routes of included routers."""
    try:
        from fastapi.routing import iter_route_contexts
        routes: Any = list(iter_route_contexts(app.routes))
    except ImportError:  # older FastAPI: routers are flattened into app.routes
        routes = app.routes
    for route in routes:
        path = route.path
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue  # answered by the GET route
            yield method, path.replace("{key:path}", "{key}")


class WebhookExecutor(FakeExecutor):
    """A fake executor that also receives provider callbacks, accepting one shared secret."""

    async def handle_webhook(self, provider: str, headers: dict[str, str], body: bytes) -> bool:
        return headers.get("webhook-signature") == "good"


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, "PNG")
    return out.getvalue()


@dataclass
class World:
    h: ApiHarness
    alice: NewUser
    bob: NewUser
    admin_user: NewUser
    alice_job: str
    alice_done_job: str
    alice_upload: str
    alice_doomed_upload: str
    alice_spare_key: str
    alice_lora: str
    alice_doomed_lora: str
    bob_job: str
    bob_upload: str
    bob_key: str
    bob_lora: str
    alice_video: str
    alice_done_video: str
    alice_doomed_video: str
    bob_video: str
    teams: dict[str, str] = field(default_factory=dict)  # see _team_world
    projects: dict[str, str] = field(default_factory=dict)  # alice's, a doomed one of hers, bob's
    pipelines: dict[str, str] = field(default_factory=dict)  # see _pipeline_world


@pytest.fixture
async def world(make_api: Any, storage: Any) -> World:
    # no runner: a synchronous OpenAI images call answers 408 (still pending) after openai_wait_s;
    # alice submits on many routes, so her limits are raised
    h = await make_api(executor=WebhookExecutor(storage=storage), run_runner=False, openai_wait_s=0.2,
                       max_active_jobs=100, rate_limit_per_minute=1000)
    alice, bob = h.user(credits=10_000), h.user(credits=10_000)
    admin_user = h.user(credits=0, admin=True)
    jobs = h.state.jobs
    alice_job, _ = jobs.submit(alice.user, Submission("tiny-sd", {"prompt": "a"}))
    alice_done, _ = jobs.submit(alice.user, Submission("tiny-sd", {"prompt": "a"}))
    jobs.cancel(alice.user, alice_done.id)  # finished: its event stream ends, its outputs can be deleted
    bob_job, _ = jobs.submit(bob.user, Submission("tiny-sd", {"prompt": "b"}))
    alice_video, _ = jobs.submit(alice.user, Submission("tiny-wan", {"prompt": "a"}))
    alice_done_video, _ = jobs.submit(alice.user, Submission("tiny-wan", {"prompt": "a"}))
    alice_doomed_video, _ = jobs.submit(alice.user, Submission("tiny-wan", {"prompt": "a"}))
    jobs.cancel(alice.user, alice_doomed_video.id)  # finished: its files can be deleted
    bob_video, _ = jobs.submit(bob.user, Submission("tiny-wan", {"prompt": "b"}))
    # a video that succeeded, with its MP4 and poster in storage (for /content)
    prefix = f"outputs/{alice.user.id}/{alice_done_video.id}/"
    h.storage.put_bytes(prefix + "0.mp4", b"\x00\x00\x00\x18ftypmp42", "video/mp4")
    h.storage.put_bytes(prefix + "0.poster.png", png(), "image/png")
    alice_upload, alice_doomed = (u.id for u in h.state.uploads.create(
        alice.user, [("a.png", png()), ("doomed.png", png())]))
    bob_upload = h.state.uploads.create(bob.user, [("b.png", png())])[0].id
    with h.db.session() as s:
        spare, _ = create_api_key(s, alice.user.id, "spare")
        loras = [Lora(user_id=u.user.id, name=n, base_model="tiny-sd", status="succeeded", weights_key="w")
                 for u, n in ((alice, "a"), (alice, "doomed"), (bob, "b"))]
        s.add_all(loras)
        s.execute(update(Job).where(Job.id == alice_done_video.id).values(
            status="succeeded", completed_at=utcnow(),
            outputs=[{"key": prefix + "0.mp4", "content_type": "video/mp4", "thumbnail_key": prefix + "0.poster.png"}]))
        s.commit()
        bob_key = s.query(ApiKey).filter(ApiKey.user_id == bob.user.id).one().id
    teams = _team_world(h, alice, bob)
    projects = {"mine": h.state.projects.create(alice.user, name="mine").project.id,
                "doomed": h.state.projects.create(alice.user, name="doomed").project.id,
                "bob": h.state.projects.create(bob.user, name="bob's").project.id}
    return World(h, alice, bob, admin_user, alice_job.id, alice_done.id, alice_upload, alice_doomed, spare.id,
                 loras[0].id, loras[1].id, bob_job.id, bob_upload, bob_key, loras[2].id,
                 alice_video.id, alice_done_video.id, alice_doomed_video.id, bob_video.id, teams, projects,
                 pipelines=_pipeline_world(h, alice, bob))


PIPELINE_STEPS = [{"name": "still", "model": "tiny-sd", "input": {"prompt": "a"}}]


def _pipeline_world(h: ApiHarness, alice: NewUser, bob: NewUser) -> dict[str, str]:
    """Alice's pipeline (queued), a finished one of hers (its event stream ends), and Bob's."""
    from api.services.pipelines import PipelineSubmission

    pipelines = h.state.pipelines
    mine, _ = pipelines.submit(alice.user, PipelineSubmission(steps=PIPELINE_STEPS))
    done, _ = pipelines.submit(alice.user, PipelineSubmission(steps=PIPELINE_STEPS))
    pipelines.cancel(alice.user, done.id)
    theirs, _ = pipelines.submit(bob.user, PipelineSubmission(steps=PIPELINE_STEPS))
    return {"mine": mine.id, "done": done.id, "theirs": theirs.id}


def _team_world(h: ApiHarness, alice: NewUser, bob: NewUser) -> dict[str, str]:
    """Alice's team (members to change and to remove, an invitation to revoke), a team of hers to
    delete, Bob's team (a member, an invitation), and invitations to Alice's and another address."""
    teams = h.state.teams
    carol, dave, erin = h.user(credits=0), h.user(credits=0), h.user(credits=0)
    mine = teams.create(alice.user, "alice's").view.team.id
    doomed = teams.create(alice.user, "doomed").view.team.id
    theirs = teams.create(bob.user, "bob's").view.team.id
    for team, owner, member in ((mine, alice, carol), (mine, alice, dave), (theirs, bob, erin)):
        teams.accept(member.user, teams.invite(owner.user, team, member.user.email, "member").token)
    return {"team": mine, "doomed_team": doomed, "bob_team": theirs, "member": dave.user.id,
            "doomed_member": carol.user.id, "bob_member": erin.user.id,
            "invitation": teams.invite(alice.user, mine, "pending@example.com", "member").invitation.id,
            "bob_invitation": teams.invite(bob.user, theirs, "pending@example.com", "member").invitation.id,
            "token": teams.invite(bob.user, theirs, alice.user.email, "member").token,
            "bob_token": teams.invite(bob.user, theirs, "zed@example.com", "member").token}


def _team_values(world: World, method: str, path: str, mine: bool) -> dict[str, str]:
    t = world.teams
    if not mine:
        return {"team_id": t["bob_team"], "member_id": t["bob_member"], "invitation_id": t["bob_invitation"],
                "token": t["bob_token"]}
    return {"team_id": t["doomed_team"] if (method, path) == ("DELETE", "/v1/teams/{team_id}") else t["team"],
            "member_id": t["doomed_member"] if method == "DELETE" else t["member"],
            "invitation_id": t["invitation"], "token": t["token"]}


def _url(world: World, method: str, path: str, owner: str) -> str:
    """Fill the path's ids with ``owner``'s resources ("alice" = the caller's, "bob" = someone else's)."""
    mine = owner == "alice"
    # an event stream (native /events, Replicate /stream) of a finished job ends
    finished = method == "DELETE" or path.endswith(("/events", "/stream"))
    job = (world.alice_done_job if finished else world.alice_job) if mine else world.bob_job
    doomed = method == "DELETE"  # deleting must not take away what the other routes are tried on
    if not mine:
        video = world.bob_video
    elif doomed:
        video = world.alice_doomed_video
    elif path.endswith("/content"):
        video = world.alice_done_video  # succeeded, with its files
    else:
        video = world.alice_video
    spec = world.h.state.catalog.get("tiny-sd")
    values = {
        "job_id": job,
        "prediction_id": job,
        "video_id": video,
        "owner": world.h.settings.replicate_owner,
        "name": spec.id,
        "version": version_id(spec),
        "upload_id": (world.alice_doomed_upload if doomed else world.alice_upload) if mine else world.bob_upload,
        "lora_id": (world.alice_doomed_lora if doomed else world.alice_lora) if mine else world.bob_lora,
        "key_id": world.alice_spare_key if mine else world.bob_key,
        "user_id": world.alice.user.id,
        "model_id": "tiny-sd",
        "provider": "replicate",
        "key": "outputs/none.png",
        "pipeline_id": (world.pipelines["done"] if finished else world.pipelines["mine"]) if mine
        else world.pipelines["theirs"],
        "project_id": (world.projects["doomed"] if doomed else world.projects["mine"]) if mine
        else world.projects["bob"],
        **_team_values(world, method, path, mine),
    }
    if path.startswith("/v1/presets/"):
        values["name"] = "still-to-motion"  # a shipped preset (presets are everyone's)
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    return path


def _body(method: str, path: str) -> dict[str, Any]:
    if method not in ("POST", "PATCH"):
        return {}
    if path in ("/v1/jobs", "/v1/jobs/quote"):
        return {"json": {"model": "tiny-sd", "input": {"prompt": "a cat"}}}
    if path in ("/v1/pipelines", "/v1/pipelines/quote"):
        return {"json": {"steps": PIPELINE_STEPS}}
    if path == "/v1/loras/quote":  # the images may wait: the price is the steps'
        return {"json": {"name": "me", "base_model": "tiny-sd", "steps": 100}}
    if path == "/openai/v1/images/generations":
        return {"json": {"model": "tiny-sd", "prompt": "a cat"}}
    if path == "/v1/teams":
        return {"json": {"name": "a team"}}
    if path == "/v1/projects":
        return {"json": {"name": "a project"}}
    if path == "/v1/presets" and method == "POST":
        return {"json": {"name": "a-preset", "steps": [{"name": "still", "model": "tiny-sd",
                                                         "input": {"prompt": "a cat"}}]}}
    if path.endswith("/invitations"):
        return {"json": {"email": "someone@example.com"}}
    if path == "/openai/v1/images/edits":
        return {"data": {"model": "tiny-sd", "prompt": "a cat"}, "files": {"image": ("x.png", png(), "image/png")}}
    if path == "/openai/v1/videos":
        return {"json": {"model": "tiny-wan", "prompt": "a cat"}}
    if path == "/replicate/v1/predictions":
        return {"json": {"version": "cineweave/tiny-sd", "input": {"prompt": "a cat"}}}
    if path.startswith("/replicate/v1/") and path.endswith("/predictions"):
        return {"json": {"input": {"prompt": "a cat"}}}
    if path == "/v1/uploads":
        return {"files": {"file": ("x.png", png(), "image/png")}}
    if path == "/v1/admin/users":
        return {"json": {"email": "new-user@example.com", "credits": 1}}
    if path == "/v1/loras":
        return {"json": {"name": "me", "base_model": "tiny-sd", "images": ["upl_none"], "steps": 100}}
    if path.endswith("/swap"):
        return {"json": {"source": {"tiny": "tiny-sd"}}}
    if path.endswith("/credits"):
        return {"json": {"amount": 5}}
    if path.endswith("/keys"):
        return {"json": {"name": "k"}}
    if path.startswith("/v1/admin/users/"):
        return {"json": {"plan": "starter"}}
    if path == "/v1/billing/checkout":
        return {"json": {"plan": "starter"}}
    return {"json": {}}


def _unknown(path: str) -> str:
    """``path`` with its last id (the resource the route acts on) replaced by one that names nothing."""
    return re.sub(r"\{[a-z_]+\}(?!.*\{)", "nothing_here", path)


def _error_code(path: str, response: httpx.Response) -> str | None:
    """The stable error code, where each shape puts it (Replicate: top level; OpenAI, native: ``error``)."""
    body = response.json()
    if path.startswith("/replicate/"):
        return body.get("code")
    return body.get("error", {}).get("code")


async def _call(client: httpx.AsyncClient, method: str, url: str, key: str | None, path: str) -> httpx.Response:
    headers = bearer(key) if key else {}
    # bounded: an event stream let through by mistake would otherwise run until the job ends
    try:
        return await asyncio.wait_for(client.request(method, url, headers=headers, **_body(method, path)), 10)
    except TimeoutError:
        raise AssertionError(f"{method} {url} with key {key!r} did not answer within 10 s") from None


def test_every_route_is_classified(tmp_path: Any) -> None:
    from api.http.app import create_app
    from api.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, signing_secret="x", _env_file=None), None)
    served = set(app_routes(app))
    unclassified = sorted(served - ROUTES.keys())
    assert not unclassified, f"classify these routes in ROUTES: {unclassified}"
    gone = sorted(ROUTES.keys() - served)
    assert not gone, f"ROUTES lists routes the app no longer serves: {gone}"


async def test_route_authorization(world: World) -> None:
    client, h = world.h.client, world.h
    problems: list[str] = []

    def expect(route: str, what: str, response: httpx.Response, statuses: set[int], code: str | None = None) -> None:
        ok = response.status_code in statuses
        if ok and code is not None and response.status_code >= 400:
            ok = _error_code(route.split(" ", 1)[1], response) == code
        if not ok:
            problems.append(f"{route} {what}: {response.status_code} {response.text[:160]}")

    for method, path in sorted(app_routes(h.app)):
        kind = ROUTES[(method, path)]
        route = f"{method} {path}"
        mine = _url(world, method, path, "alice")
        if kind in (PUBLIC, SIGNED):
            continue  # below
        for bad in (None, "cw_0000_not-a-key", "garbage"):
            expect(route, f"key={bad}", await _call(client, method, mine, bad, path), {401}, "unauthorized")
        if kind == ADMIN:
            expect(route, "user key", await _call(client, method, mine, world.alice.api_key, path), {403}, "forbidden")
            continue
        expect(route, "admin key", await _call(client, method, mine, ADMIN_KEY, path), {403}, "forbidden")
        if kind == OWNED:
            theirs = _url(world, method, path, "bob")
            expect(route, "other user's id", await _call(client, method, theirs, world.alice.api_key, path),
                   {404}, "not_found")
            unknown = _url(world, method, _unknown(path), "alice")
            expect(route, "unknown id", await _call(client, method, unknown, world.alice.api_key, path),
                   {404}, "not_found")

    # Someone else's resources came through untouched.
    assert get_job(h.db, world.bob_job).status == "queued"
    assert get_job(h.db, world.bob_video).status == "queued"
    assert get_job(h.db, world.pipelines["theirs"]).status == "waiting"
    assert (await client.get(f"/v1/uploads/{world.bob_upload}", headers=bearer(world.bob.api_key))).status_code == 200
    assert (await client.get("/v1/credits", headers=bearer(world.bob.api_key))).status_code == 200
    bob_team = await client.get(f"/v1/teams/{world.teams['bob_team']}/members", headers=bearer(world.bob.api_key))
    assert {m["user_id"] for m in bob_team.json()["data"]} == {world.bob.user.id, world.teams["bob_member"]}

    # The owner and the admins get through (so the 401/403/404 above are about who asks).
    for method, path in sorted(app_routes(h.app)):
        kind = ROUTES[(method, path)]
        route = f"{method} {path}"
        if kind in (USER, OWNED):
            body = _body(method, path)
            if path == "/v1/loras" and method == "POST":
                body["json"]["images"] = [world.alice_upload]
            r = await asyncio.wait_for(client.request(
                method, _url(world, method, path, "alice"), headers=bearer(world.alice.api_key), **body), 10)
            if path.startswith("/openai/v1/images/"):
                # let through and submitted; with no runner the synchronous wait ends still pending
                expect(route, "owner", r, {408}, "generation_pending")
            elif method == "POST" and path.startswith("/v1/billing/"):
                # let through; no Stripe key in this world (test_billing_http covers Stripe)
                expect(route, "owner", r, {404}, "billing_not_configured")
            else:
                expect(route, "owner", r, {200, 201, 202, 204})
        elif kind == ADMIN:
            for key in (ADMIN_KEY, world.admin_user.api_key):
                url = _url(world, method, path, "alice")
                if method == "DELETE" and "/keys/" in path:
                    with h.db.session() as s:
                        fresh, _ = create_api_key(s, world.alice.user.id, "to-revoke")
                        s.commit()
                    url = url.replace(world.alice_spare_key, fresh.id)
                body = _body(method, path)
                if path == "/v1/admin/users" and method == "POST":
                    body = {"json": {"email": f"new-{key[:6]}@example.com", "credits": 1}}
                if path == "/v1/presets" and method == "POST":  # a preset's name is taken once
                    body["json"]["name"] = "by-admin-key" if key == ADMIN_KEY else "by-admin-user"
                r = await client.request(method, url, headers=bearer(key), **body)
                # no serving stack here: a swap is understood, then refused as not supported
                expect(route, f"admin {key[:8]}", r, {409} if path.endswith("/swap") else {200, 201})
        elif kind == PUBLIC:
            r = await client.get(path)
            expect(route, "anonymous", r, {200})
    assert not problems, "\n".join(problems)


async def test_signed_routes_need_their_signature(world: World) -> None:
    client, h = world.h.client, world.h
    key = f"outputs/{world.alice.user.id}/x.png"
    h.storage.put_bytes(key, b"\x89PNG", "image/png")
    url = h.storage.url(key, 60).replace("http://127.0.0.1:8000", "")
    assert (await client.get(url)).status_code == 200
    # An API key is no substitute for the signature.
    unsigned = await client.get(f"/v1/files/{key}", headers=bearer(world.alice.api_key))
    assert unsigned.status_code == 422
    forged = await client.get(f"/v1/files/{key}?expires=9999999999&signature={'0' * 64}")
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "invalid_signature"

    ok = await client.post("/v1/webhooks/replicate", content=b"{}", headers={"webhook-signature": "good"})
    assert ok.status_code == 200 and ok.json() == {"ok": True}
    bad = await client.post("/v1/webhooks/replicate", content=b"{}", headers={"webhook-signature": "bad"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_signature"
    unknown = await client.post("/v1/webhooks/stripe", content=b"{}", headers={"webhook-signature": "good"})
    assert unknown.status_code == 404


async def test_revoked_and_disabled_keys_are_401(world: World) -> None:
    client = world.h.client
    r = await client.post("/v1/keys", json={"name": "temp"}, headers=bearer(world.alice.api_key))
    temp = r.json()
    assert (await client.get("/v1/credits", headers=bearer(temp["api_key"]))).status_code == 200
    await client.delete(f"/v1/keys/{temp['id']}", headers=bearer(world.alice.api_key))
    assert (await client.get("/v1/credits", headers=bearer(temp["api_key"]))).status_code == 401
    await client.patch(f"/v1/admin/users/{world.bob.user.id}", json={"disabled": True}, headers=bearer(ADMIN_KEY))
    r = await client.get("/v1/credits", headers=bearer(world.bob.api_key))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


async def test_wrong_scheme_is_401(world: World) -> None:
    for header in (f"Basic {world.alice.api_key}", world.alice.api_key, "Bearer"):
        r = await world.h.client.get("/v1/credits", headers={"Authorization": header})
        assert r.status_code == 401, header


async def test_team_job_outputs_are_deleted_by_their_submitter_and_the_teams_managers(world: World) -> None:
    """Every member sees a team job; deleting its outputs (native and OpenAI shapes) is for the
    member who submitted it and the team's owners and admins: another member is 403, a non-member 404."""
    client, h, team = world.h.client, world.h, world.teams["team"]
    submitter, member, admin = h.user(credits=0), h.user(credits=0), h.user(credits=0)
    for who, role in ((submitter, "member"), (member, "member"), (admin, "admin")):
        h.state.teams.accept(who.user, h.state.teams.invite(world.alice.user, team, who.user.email, role).token)
    funded = await client.post(f"/v1/admin/users/{team}/credits", json={"amount": 1000}, headers=bearer(ADMIN_KEY))
    assert funded.status_code == 201, funded.text

    def finished(model: str) -> str:
        job, _ = h.state.jobs.submit(submitter.user, Submission(model, {"prompt": "a"}, team=team))
        return h.state.jobs.cancel(submitter.user, job.id).id

    image, video, for_admin, for_owner = (finished(m) for m in ("tiny-sd", "tiny-wan", "tiny-sd", "tiny-sd"))
    problems: list[str] = []
    cases = [  # (caller, method, url, status, code)
        (member, f"/v1/jobs/{image}", 403, "forbidden"),
        (member, f"/openai/v1/videos/{video}", 403, "forbidden"),
        (world.bob, f"/v1/jobs/{image}", 404, "not_found"),
        (world.bob, f"/openai/v1/videos/{video}", 404, "not_found"),
        (submitter, f"/v1/jobs/{image}", 200, None),
        (submitter, f"/openai/v1/videos/{video}", 200, None),
        (admin, f"/v1/jobs/{for_admin}", 200, None),
        (world.alice, f"/v1/jobs/{for_owner}", 200, None),
    ]
    for caller, url, status, code in cases:
        if status != 200:  # a refused call changes nothing
            assert get_job(h.db, url.rsplit("/", 1)[1]).outputs_deleted_at is None
        r = await client.delete(url, headers=bearer(caller.api_key))
        if r.status_code != status or (code is not None and _error_code(url, r) != code):
            problems.append(f"DELETE {url} by {caller.user.email}: {r.status_code} {r.text[:160]}")
    assert (await client.get(f"/v1/jobs/{image}", headers=bearer(member.api_key))).status_code == 200
    assert not problems, "\n".join(problems)


def test_the_dependencies_that_do_no_io_run_on_the_event_loop() -> None:
    """FastAPI runs a plain ``def`` dependency in its thread pool: a worker-thread round trip per
    dependency per request (≈ 1 ms of a job submission here). Only the caller's look-up reads the
    database; the app state and the user behind the caller are taken on the loop."""
    import inspect

    from api.http import deps

    assert inspect.iscoroutinefunction(deps.get_state)
    assert inspect.iscoroutinefunction(deps.current_user)
    assert not inspect.iscoroutinefunction(deps.current_caller)  # it reads the database: a thread
