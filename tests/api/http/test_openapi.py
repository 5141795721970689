"""Typed OpenAPI (issue 10 item 5): every operation of the app declares what it returns, and real
answers are exactly what their declared models describe."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from api.http import schemas
from tests.fixtures.harness import ADMIN_KEY, ApiHarness, bearer, wait_job

# Operations that answer a stream or a file rather than JSON; each must declare its media type.
# Add a route here only if it is streaming or binary.
MEDIA_ROUTES = {
    ("get", "/metrics"): "text/plain",
    ("get", "/v1/jobs/{job_id}/events"): "text/event-stream",
    ("get", "/v1/pipelines/{pipeline_id}/events"): "text/event-stream",
    ("get", "/v1/files/{key}"): "application/octet-stream",
    ("get", "/replicate/v1/predictions/{prediction_id}/stream"): "text/event-stream",
    ("get", "/openai/v1/videos/{video_id}/content"): "video/mp4",
}
# Operations whose errors must be documented in the native error shape, and with which statuses.
DOCUMENTED_ERRORS = {
    ("post", "/v1/jobs"): {"401", "402", "404", "422", "429"},
    ("get", "/v1/jobs"): {"401", "422"},
    ("get", "/v1/jobs/{job_id}"): {"401", "404"},
    ("post", "/v1/jobs/{job_id}/cancel"): {"401", "404"},
    ("get", "/v1/credits"): {"401"},
    ("post", "/v1/uploads"): {"401", "413", "422", "429"},
    ("post", "/v1/loras"): {"401", "402", "422"},
    ("get", "/v1/admin/stats"): {"401", "403"},
}
METHODS = {"get", "post", "put", "patch", "delete"}


def has_ref(schema: Any) -> bool:
    if isinstance(schema, dict):
        return "$ref" in schema or any(has_ref(v) for v in schema.values())
    if isinstance(schema, list):
        return any(has_ref(v) for v in schema)
    return False


async def test_every_operation_declares_its_answer(api: ApiHarness) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    missing: list[str] = []
    operations = 0
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            operations += 1
            name = f"{method.upper()} {path}"
            ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
            if not ok:
                missing.append(f"{name}: no 2xx response")
                continue
            media = MEDIA_ROUTES.get((method, path))
            for code, response in ok.items():
                content = response.get("content") or {}
                if code == "204":
                    if content:
                        missing.append(f"{name}: 204 with a body")
                    continue
                if media is not None:
                    if media not in content:
                        missing.append(f"{name}: should declare {media}, has {sorted(content)}")
                    continue
                schema = (content.get("application/json") or {}).get("schema")
                if not has_ref(schema):
                    missing.append(f"{name} {code}: no response model (a JSON answer needs one; a stream or "
                                   "file answer goes in MEDIA_ROUTES with its media type)")
    assert operations >= 35
    assert not missing, "\n".join(missing)
    for method, path in MEDIA_ROUTES:
        if path.startswith("/v1/") or not path.startswith(("/replicate/", "/openai/")):
            assert method in spec["paths"].get(path, {}), f"MEDIA_ROUTES names a route that is gone: {path}"


async def test_errors_are_documented_in_the_native_shape(api: ApiHarness) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    error_ref = "#/components/schemas/ErrorResponse"
    assert set(spec["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error"}
    assert set(spec["components"]["schemas"]["ErrorBody"]["properties"]) == {"code", "message", "details"}
    for (method, path), statuses in DOCUMENTED_ERRORS.items():
        responses = spec["paths"][path][method]["responses"]
        for status in statuses:
            assert status in responses, (method, path, status)
            assert responses[status]["content"]["application/json"]["schema"]["$ref"] == error_ref
    # the queue fields are described where clients read them
    job = spec["components"]["schemas"]["JobPublic"]["properties"]
    assert {"queue_position", "eta_s", "outputs", "credits", "metrics"} <= set(job)


def described(model: type[BaseModel], data: Any) -> BaseModel:
    """``data`` validates against ``model`` and every key in it, at every level, is a declared field
    (the models allow extra keys so that nothing is dropped; here nothing may be undeclared)."""
    instance = model.model_validate(data)
    pending: list[Any] = [instance]
    while pending:
        value = pending.pop()
        if isinstance(value, BaseModel):
            assert not value.model_extra, f"{type(value).__name__} does not declare {sorted(value.model_extra)}"
            pending.extend(getattr(value, name) for name in type(value).model_fields)
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(v for v in value.values() if isinstance(v, BaseModel))
    return instance


async def test_real_answers_match_their_models(api: ApiHarness) -> None:
    user = api.user(credits=100)
    key = bearer(user.api_key)
    submitted = await api.submit(user.api_key)
    assert submitted.status_code == 202
    described(schemas.JobPublic, submitted.json())
    job_id = submitted.json()["id"]
    await wait_job(api.db, job_id)
    body = (await api.client.get(f"/v1/jobs/{job_id}", headers=key)).json()
    job = described(schemas.JobPublic, body)
    assert job.status == "succeeded" and job.outputs and job.queue_position is None  # type: ignore[attr-defined]
    assert "role" not in body["outputs"][0]  # a key a view leaves out stays out
    described(schemas.JobList, (await api.client.get("/v1/jobs", headers=key)).json())
    described(schemas.CreditsPublic, (await api.client.get("/v1/credits", headers=key)).json())
    described(schemas.LedgerList, (await api.client.get("/v1/credits/transactions", headers=key)).json())
    described(schemas.ApiKeyList, (await api.client.get("/v1/keys", headers=key)).json())
    described(schemas.ModelList, (await api.client.get("/v1/models")).json())
    described(schemas.PlanList, (await api.client.get("/v1/plans")).json())
    described(schemas.Health, (await api.client.get("/healthz")).json())
    described(schemas.Readiness, (await api.client.get("/readyz")).json())
    admin = bearer(ADMIN_KEY)
    described(schemas.AdminStats, (await api.client.get("/v1/admin/stats", headers=admin)).json())
    described(schemas.AdminUserList, (await api.client.get("/v1/admin/users", headers=admin)).json())
    described(schemas.AdminJobPublic, (await api.client.get(f"/v1/admin/jobs/{job_id}", headers=admin)).json())
    described(schemas.AdminJobList, (await api.client.get("/v1/admin/jobs", headers=admin)).json())
    created = await api.client.post("/v1/admin/users", headers=admin, json={"email": "new@example.com"})
    described(schemas.UserCreated, created.json())
    missing = await api.client.get("/v1/jobs/job_nope", headers=key)
    assert missing.status_code == 404
    described(schemas.ErrorResponse, missing.json())
