"""Presets over HTTP: everyone reads the shipped presets (param schema, step names), admins see
the templates, create and change them; an invalid definition is 422 when saved."""

from __future__ import annotations

from typing import Any

from api.services.presets import expand
from tests.fixtures.harness import ADMIN_KEY, ApiHarness, bearer

ADMIN = bearer(ADMIN_KEY)
BODY: dict[str, Any] = {
    "name": "my-preset", "title": "Mine", "description": "words",
    "params": {"prompt": {"type": "string", "required": True, "max_length": 100, "description": "what"},
               "size": {"type": "enum", "default": "small", "values": {
                   "small": {"merge": {"still": {"width": 64, "height": 64}}},
                   "large": {"merge": {"still": {"width": 128, "height": 128}}}}}},
    "steps": [{"name": "still", "model": "tiny-sd", "input": {"prompt": "${prompt}"}},
              {"name": "fx", "op": "upscale", "input": {"image": "step:still", "scale": 2}}],
}


async def test_shipped_presets_are_seeded_and_listed(api: ApiHarness) -> None:
    user = api.user()
    r = await api.client.get("/v1/presets", headers=bearer(user.api_key))
    assert r.status_code == 200
    by_name = {p["name"]: p for p in r.json()["data"]}
    assert set(by_name) == {"cinematic-short", "loop-gif", "still-to-motion"}
    still = by_name["still-to-motion"]
    assert still["version"] == 1 and still["enabled"] is True
    assert still["params"]["prompt"] == {"type": "string", "required": True, "max_length": 500,
                                         "description": "What the picture shows."}
    assert still["params"]["aspect_ratio"]["values"] == ["1:1", "16:9", "9:16"]  # merges not shown
    # a user sees which models and operations run, not the templates
    assert still["steps"] == [{"name": "still", "model": "tiny-sd"}, {"name": "motion", "model": "tiny-wan-i2v"},
                              {"name": "smooth", "op": "interpolate"}, {"name": "final", "op": "export"}]
    assert "definition" not in still and "created_by" not in still


async def test_admin_sees_templates(api: ApiHarness) -> None:
    admin = api.user(admin=True)
    r = await api.client.get("/v1/presets/loop-gif", headers=bearer(admin.api_key))
    assert r.status_code == 200
    body = r.json()
    assert body["steps"][2] == {"name": "loop", "op": "loop",
                                 "input": {"video": "step:motion", "mode": "boomerang", "count": 2}}
    assert body["definition"]["params"]["style"]["values"]["pixel_art"]["merge"]


async def test_unknown_preset_is_404(api: ApiHarness) -> None:
    user = api.user()
    r = await api.client.get("/v1/presets/nothing-here", headers=bearer(user.api_key))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await api.client.patch("/v1/presets/nothing-here", json={"title": "x"}, headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_only_admins_change_presets(api: ApiHarness) -> None:
    user = api.user()
    assert (await api.client.post("/v1/presets", json=BODY, headers=bearer(user.api_key))).status_code == 403
    r = await api.client.patch("/v1/presets/loop-gif", json={"enabled": False}, headers=bearer(user.api_key))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert (await api.client.post("/v1/presets", json=BODY)).status_code == 401


async def test_create_then_patch_adds_versions(api: ApiHarness) -> None:
    user = api.user()
    r = await api.client.post("/v1/presets", json=BODY, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert (r.json()["name"], r.json()["version"], r.json()["created_by"]) == ("my-preset", 1, "admin")
    assert (await api.client.post("/v1/presets", json=BODY, headers=ADMIN)).json()["error"]["code"] == "conflict"
    r = await api.client.patch("/v1/presets/my-preset", json={"steps": BODY["steps"][:1], "title": "v2"},
                               headers=ADMIN)
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["title"] == "v2"
    assert r.json()["description"] == "words"  # kept
    r = await api.client.get("/v1/presets/my-preset", headers=bearer(user.api_key))
    assert r.json()["version"] == 2 and [s["name"] for s in r.json()["steps"]] == ["still"]
    with api.db.read() as session:
        out = expand(session, "my-preset", {"prompt": "a fox", "size": "large"})
    assert out.version == 2 and out.steps == [
        {"name": "still", "model": "tiny-sd", "input": {"prompt": "a fox", "width": 128, "height": 128}}]
    # an older version stays readable by number
    r = await api.client.get("/v1/presets/my-preset?version=1", headers=bearer(user.api_key))
    assert r.json()["version"] == 1 and len(r.json()["steps"]) == 2


async def test_disable_hides_from_users(api: ApiHarness) -> None:
    user = api.user()
    r = await api.client.patch("/v1/presets/loop-gif", json={"enabled": False}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["version"] == 1
    assert (await api.client.get("/v1/presets/loop-gif", headers=bearer(user.api_key))).status_code == 404
    names = [p["name"] for p in (await api.client.get("/v1/presets", headers=bearer(user.api_key))).json()["data"]]
    assert "loop-gif" not in names
    admin = api.user(admin=True)
    r = await api.client.get("/v1/presets?include_disabled=true", headers=bearer(admin.api_key))
    assert "loop-gif" in [p["name"] for p in r.json()["data"]]
    r = await api.client.get("/v1/presets?include_disabled=true", headers=bearer(user.api_key))
    assert "loop-gif" not in [p["name"] for p in r.json()["data"]]  # only admins see disabled ones


async def test_invalid_definitions_are_422_at_save(api: ApiHarness) -> None:
    cases = [
        ({"steps": [{"name": "still", "model": "tiny-sd", "input": {"prompt": "${ghost}"}}]}, "steps.0.input.prompt"),
        ({"steps": [{"name": "still", "model": "tiny-sd", "input": {"seed": {"$param": "seed"}}}]},
         "steps.0.input.seed"),
        ({"params": {"n": {"type": "integer", "min": 5, "max": 1}}}, "params.n.min"),
        ({"params": {"n": {"type": "list"}}}, "params.n.type"),
        ({"steps": [{"name": "a", "model": "tiny-sd"}, {"name": "a", "op": "trim"}]}, "steps.1.name"),
        ({"steps": [{"name": "a", "model": "tiny-sd", "op": "trim"}]}, "steps.0"),
        ({"steps": [{"name": "a", "model": "tiny-sd"}]}, "params.size.values.small.merge.still"),
        ({"steps": [{"name": "still", "model": "tiny-sd", "input": {"prompt": "costs $5"}}]},
         "steps.0.input.prompt"),
        ({"steps": [{"name": "still", "model": "tiny-sd", "input": {"prompt": "{prompt.__class__} $x"}}]},
         "steps.0.input.prompt"),
    ]
    for change, field in cases:
        body = {**BODY, **change}
        r = await api.client.post("/v1/presets", json=body, headers=ADMIN)
        assert r.status_code == 422, (change, r.text)
        assert r.json()["error"]["code"] == "invalid_input" and r.json()["error"]["details"]["field"] == field
        assert (await api.client.post("/v1/presets", json={**body, "name": "other"}, headers=ADMIN)).status_code == 422
    assert (await api.client.post("/v1/presets", json={**BODY, "name": "Bad Name"}, headers=ADMIN)).status_code == 422
    # a PATCH that breaks the definition adds no version
    steps = [{"name": "still", "model": "tiny-sd", "input": {"n": "${nope}"}}, {"name": "motion", "model": "x"}]
    r = await api.client.patch("/v1/presets/loop-gif", json={"steps": steps}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "steps.0.input.n"
    assert (await api.client.get("/v1/presets/loop-gif", headers=ADMIN)).status_code == 403  # admin key: user route
    with api.db.read() as session:
        assert expand(session, "loop-gif", {"prompt": "x"}).version == 1


async def _quote_every_variant(api: ApiHarness) -> list[str]:
    """Quote each shipped preset with each enum value and the bounds of each number param: every
    variant passes the pipeline validator (models' limits, op params, inferred media)."""
    user = api.user(credits=100_000)
    problems = []
    rows = (await api.client.get("/v1/presets", headers=bearer(user.api_key))).json()["data"]
    assert len(rows) == 3
    for preset in rows:
        variants: list[dict[str, Any]] = [{}]
        for name, spec in preset["params"].items():
            if spec["type"] == "enum":
                variants += [{name: v} for v in spec["values"]]
            elif spec["type"] in ("number", "integer"):
                variants += [{name: spec["min"]}, {name: spec["max"]}]
        for extra in variants:
            params = {"prompt": "a lighthouse at dusk", **extra}
            r = await api.client.post("/v1/pipelines/quote", json={"preset": preset["name"], "params": params},
                                      headers=bearer(user.api_key))
            if r.status_code != 200:
                problems.append(f"{preset['name']} {extra}: {r.status_code} {r.text[:300]}")
    return problems


async def test_shipped_tiny_presets_pass_the_pipeline_validator(api: ApiHarness) -> None:
    assert not await _quote_every_variant(api)


async def test_shipped_production_presets_pass_the_pipeline_validator(make_api: Any) -> None:
    api = await make_api(preset_profile="production")
    assert not await _quote_every_variant(api)
