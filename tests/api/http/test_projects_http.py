"""Projects over HTTP: the caller's or a team's (X-CineWeave-Team), names 1–100 characters, job
counts, soft delete (the jobs keep their project; the project and ?project= of it are then 404)."""

from __future__ import annotations

from api.db.tables import Project
from tests.fixtures.harness import ApiHarness, bearer, get_job


async def test_create_list_get_update(api: ApiHarness) -> None:
    alice = api.user()
    h = bearer(alice.api_key)
    r = await api.client.post("/v1/projects", json={"name": "  Trailer ", "description": "cuts"}, headers=h)
    assert r.status_code == 201, r.text
    project = r.json()
    assert (project["name"], project["description"], project["jobs"], project["team"]) == ("Trailer", "cuts", 0, None)
    assert project["account_id"] == alice.user.id and project["created_by"] == alice.user.id
    second = (await api.client.post("/v1/projects", json={"name": "B"}, headers=h)).json()
    listed = (await api.client.get("/v1/projects", headers=h)).json()
    assert [p["id"] for p in listed["data"]] == [second["id"], project["id"]] and listed["next_cursor"] is None
    page = (await api.client.get("/v1/projects?limit=1", headers=h)).json()
    assert [p["id"] for p in page["data"]] == [second["id"]]
    rest = (await api.client.get(f"/v1/projects?limit=1&cursor={page['next_cursor']}", headers=h)).json()
    assert [p["id"] for p in rest["data"]] == [project["id"]] and rest["next_cursor"] is None
    r = await api.client.patch(f"/v1/projects/{project['id']}", json={"name": "Teaser"}, headers=h)
    assert r.status_code == 200 and r.json()["name"] == "Teaser" and r.json()["description"] == "cuts"
    assert (await api.client.get(f"/v1/projects/{project['id']}", headers=h)).json()["name"] == "Teaser"


async def test_names_are_checked(api: ApiHarness) -> None:
    h = bearer(api.user().api_key)
    for name in ("", " " * 3, "x" * 101):
        r = await api.client.post("/v1/projects", json={"name": name}, headers=h)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", name
    assert (await api.client.post("/v1/projects", json={"name": "x" * 100}, headers=h)).status_code == 201
    pid = (await api.client.post("/v1/projects", json={"name": "ok"}, headers=h)).json()["id"]
    assert (await api.client.patch(f"/v1/projects/{pid}", json={"name": "  "}, headers=h)).status_code == 422
    assert (await api.client.post("/v1/projects", json={"name": "a", "x": 1}, headers=h)).status_code == 422


async def test_jobs_are_counted_and_delete_is_soft(api: ApiHarness) -> None:
    alice = api.user(credits=1000)
    h = bearer(alice.api_key)
    pid = (await api.client.post("/v1/projects", json={"name": "p"}, headers=h)).json()["id"]
    job = (await api.submit(alice.api_key, project=pid)).json()
    await api.submit(alice.api_key)  # not in the project
    assert job["project"] == pid
    assert (await api.client.get(f"/v1/projects/{pid}", headers=h)).json()["jobs"] == 1
    assert (await api.client.get("/v1/projects", headers=h)).json()["data"][0]["jobs"] == 1
    listed = (await api.client.get(f"/v1/jobs?project={pid}", headers=h)).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]

    assert (await api.client.delete(f"/v1/projects/{pid}", headers=h)).status_code == 204
    for r in (await api.client.get(f"/v1/projects/{pid}", headers=h),
              await api.client.patch(f"/v1/projects/{pid}", json={"name": "again"}, headers=h),
              await api.client.delete(f"/v1/projects/{pid}", headers=h),
              await api.client.get(f"/v1/jobs?project={pid}", headers=h),
              await api.submit(alice.api_key, project=pid)):
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    assert (await api.client.get("/v1/projects", headers=h)).json()["data"] == []
    assert get_job(api.db, job["id"]).project_id == pid  # the job keeps it
    with api.db.read() as session:
        assert session.get(Project, pid).deleted_at is not None


async def test_another_users_project_is_not_found(api: ApiHarness) -> None:
    alice, bob = api.user(), api.user()
    pid = (await api.client.post("/v1/projects", json={"name": "mine"}, headers=bearer(alice.api_key))).json()["id"]
    hb = bearer(bob.api_key)
    for r in (await api.client.get(f"/v1/projects/{pid}", headers=hb),
              await api.client.patch(f"/v1/projects/{pid}", json={"name": "theirs"}, headers=hb),
              await api.client.delete(f"/v1/projects/{pid}", headers=hb),
              await api.client.get(f"/v1/jobs?project={pid}", headers=hb),
              await api.submit(bob.api_key, project=pid)):
        assert r.status_code == 404, r.text
    assert (await api.client.get("/v1/projects", headers=hb)).json()["data"] == []
    r = await api.client.get(f"/v1/projects/{pid}", headers=bearer(alice.api_key))
    assert r.json()["name"] == "mine"


async def test_team_projects(api: ApiHarness) -> None:
    alice, carol, bob = api.user(), api.user(), api.user()
    teams = api.state.teams
    team = teams.create(alice.user, "studio").view.team.id
    teams.accept(carol.user, teams.invite(alice.user, team, carol.user.email, "member").token)
    ha, hc, hb = bearer(alice.api_key), bearer(carol.api_key), bearer(bob.api_key)
    r = await api.client.post("/v1/projects", json={"name": "shared"}, headers={**ha, "X-CineWeave-Team": team})
    assert r.status_code == 201 and r.json()["account_id"] == team and r.json()["team"] == team
    pid = r.json()["id"]
    # the team's list, by header or query; not in alice's own
    assert [p["id"] for p in (await api.client.get("/v1/projects", headers={**hc, "X-CineWeave-Team": team})
                              ).json()["data"]] == [pid]
    assert [p["id"] for p in (await api.client.get(f"/v1/projects?team={team}", headers=hc)).json()["data"]] == [pid]
    assert (await api.client.get("/v1/projects", headers=ha)).json()["data"] == []
    # a member reads and renames it; a non-member gets 404 everywhere
    assert (await api.client.patch(f"/v1/projects/{pid}", json={"name": "renamed"}, headers=hc)).status_code == 200
    assert (await api.client.get(f"/v1/projects/{pid}", headers=hb)).status_code == 404
    r = await api.client.post("/v1/projects", json={"name": "x"}, headers={**hb, "X-CineWeave-Team": team})
    assert r.status_code == 404
    assert (await api.client.get("/v1/projects", headers={**hb, "X-CineWeave-Team": team})).status_code == 404
    # naming two teams is refused
    r = await api.client.post("/v1/projects", json={"name": "x", "team": team},
                              headers={**ha, "X-CineWeave-Team": "tm_other"})
    assert r.status_code == 422
    # a removed member no longer sees it
    teams.remove_member(alice.user, team, carol.user.id)
    assert (await api.client.get(f"/v1/projects/{pid}", headers=hc)).status_code == 404


async def test_bad_cursor_is_422(api: ApiHarness) -> None:
    r = await api.client.get("/v1/projects?cursor=garbage", headers=bearer(api.user().api_key))
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "cursor"
