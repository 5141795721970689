"""Health, readiness, catalog and plans, CORS, and /metrics after jobs."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from tests.fixtures.harness import ApiHarness, bearer, wait_job


async def test_health_and_readiness(api: ApiHarness, make_api: Any) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "storage": "ok", "runner": "ok"}}
    without = await make_api(executor=None)
    assert (await without.client.get("/readyz")).json()["checks"]["runner"] == "off"


async def test_readyz_reports_a_broken_database(api: ApiHarness) -> None:
    api.db.engine.dispose()
    original = api.db._read_engine
    from sqlalchemy import create_engine

    api.db._read_engine = create_engine("sqlite:////nonexistent/dir/x.db")
    try:
        r = await api.client.get("/readyz")
    finally:
        api.db._read_engine = original
    assert r.status_code == 503 and r.json()["checks"]["database"].startswith("error")


async def test_models_and_plans(api: ApiHarness) -> None:
    models = {m["id"]: m for m in (await api.client.get("/v1/models")).json()["data"]}
    assert {"tiny-sd", "tiny-wan", "veo-3.1"} <= models.keys()
    assert models["tiny-sd"]["kind"] == "image" and models["veo-3.1"]["remote_only"] is True
    assert models["veo-3.1"]["limits"]["durations"] == [4.0, 6.0, 8.0]
    plans = (await api.client.get("/v1/plans")).json()
    by_id = {p["id"]: p for p in plans["data"]}
    assert by_id["free"]["one_time_credits"] == 100 and by_id["creator"]["monthly_credits"] == 250
    assert by_id["studio"]["limits"] == {"max_active_jobs": 6, "rate_limit_per_minute": 20, "max_prompt_chars": 500}
    assert plans["pricing"] == {"video_credits_per_second": 10.0, "video_1080p_multiplier": 1.5}


async def test_cors_when_configured(make_api: Any) -> None:
    api = await make_api(cors_origins=["https://app.example.com"])
    r = await api.client.get("/healthz", headers={"Origin": "https://app.example.com"})
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    pre = await api.client.options("/v1/jobs", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,idempotency-key"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "idempotency-key" in pre.headers["access-control-allow-headers"].lower()
    other = await api.client.get("/healthz", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in other.headers


async def test_no_cors_by_default(api: ApiHarness) -> None:
    r = await api.client.get("/healthz", headers={"Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in r.headers


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0] if "{" not in line else
                                line[line.index("{"):line.index("}") + 1]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_expose_job_series(api: ApiHarness) -> None:
    before = (await api.client.get("/metrics")).text
    assert _value(before, "cineweave_jobs_submitted_total", model="tiny-sd") is None
    user = api.user(credits=100)
    ids = [(await api.submit(user.api_key)).json()["id"] for _ in range(2)]
    for job_id in ids:
        await wait_job(api.db, job_id)
    await api.client.post("/v1/jobs", json={"model": "nope", "input": {"prompt": "p"}}, headers=bearer(user.api_key))
    await asyncio.to_thread(api.state.metrics.refresh)  # the gauges are refreshed in the background
    r = await api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _value(text, "cineweave_jobs_submitted_total", model="tiny-sd", kind="image") == 2.0
    assert _value(text, "cineweave_jobs_finished_total", model="tiny-sd", status="succeeded") == 2.0
    assert _value(text, "cineweave_jobs", status="succeeded", model="tiny-sd") == 2.0
    assert _value(text, "cineweave_jobs_rejected_total", code="invalid_input") == 1.0
    assert _value(text, "cineweave_job_run_seconds_count", model="tiny-sd", status="succeeded") == 2.0
    assert _value(text, "cineweave_job_queue_seconds_count", model="tiny-sd") == 2.0
    assert _value(text, "cineweave_credits_moved_total", kind="capture") == 2.0


async def test_metrics_queue_depth(make_api: Any) -> None:
    api = await make_api(run_runner=False)
    user = api.user(credits=100)
    for _ in range(3):
        await api.submit(user.api_key)
    await asyncio.to_thread(api.state.metrics.refresh)  # the gauges are refreshed in the background
    text = (await api.client.get("/metrics")).text
    assert _value(text, "cineweave_queue_depth", model="tiny-sd") == 3.0
    wait = _value(text, "cineweave_queue_oldest_wait_seconds", model="tiny-sd")
    assert wait is not None and wait >= 0
