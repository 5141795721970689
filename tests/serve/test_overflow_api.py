"""Overflow through the whole job layer: HTTP submit → runner → router → provider fake → our storage.

The adapter tests (tests/serve/fallback) cover the provider contracts; these check what a paying
client sees: the job succeeds or fails with the right code, the output is served from our storage,
credits are captured or refunded exactly once, and the route is visible on the job and in stats.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from api.http.app import create_app
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from serve.router import build_overflow_router
from tests.fakes.replicate_server import FakeReplicate, ReplicateBehavior
from tests.fakes.veo_server import FakeVeo, VeoBehavior
from tests.fixtures.fake_executor import FakeExecutor

BASE = "http://127.0.0.1:8000"
ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture
def fakes() -> Any:
    with FakeReplicate(ReplicateBehavior()) as replicate, FakeVeo(VeoBehavior()) as veo:
        yield replicate, veo


def _settings(tmp_path: Path, replicate: FakeReplicate, veo: FakeVeo) -> Settings:
    return Settings(data_dir=tmp_path / "var", admin_key="admin-key", signing_secret="s", _env_file=None,
                    runner_poll_s=0.02, retry_backoff_s=0.01, provider_poll_s=0.02, provider_timeout_s=15,
                    replicate_base_url=replicate.base_url, replicate_api_token=replicate.token,
                    gemini_base_url=veo.url, gemini_api_key=veo.api_key, max_active_jobs=10,
                    rate_limit_per_minute=100, egress_allow_networks=["127.0.0.1/32"])  # fake file hosts


@pytest.fixture
async def client(tmp_path: Path, fakes: Any) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    replicate, veo = fakes
    settings = _settings(tmp_path, replicate, veo)
    storage = LocalStorage(settings.data_dir / "storage", signing_secret="s", base_url=BASE)
    catalog = Catalog.load()
    router = build_overflow_router(FakeExecutor(storage=storage), catalog, settings, storage)
    app = create_app(settings, router, catalog=catalog, storage=storage, run_maintenance=False)
    async with LifespanManager(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                       base_url=BASE) as http:
        made = await http.post("/v1/admin/users", headers=ADMIN, json={"email": "o@x.io", "credits": 300})
        assert made.status_code == 201, made.text
        yield http, {"Authorization": f"Bearer {made.json()['api_key']}"}


async def _finished(http: httpx.AsyncClient, auth: dict[str, str], job_id: str, timeout_s: float = 30) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        job = (await http.get(f"/v1/jobs/{job_id}", headers=auth)).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.parametrize(("model", "provider", "duration", "resolution", "price"), [
    ("veo-3.1", "veo", 4, "720p", 40),
    ("veo-3.1-replicate", "replicate", 8, "1080p", 120),
])
async def test_remote_model_succeeds_served_from_our_storage_and_charged_once(
        client: Any, model: str, provider: str, duration: int, resolution: str, price: int) -> None:
    http, auth = client
    made = await http.post("/v1/jobs", headers=auth, json={"model": model, "input": {
        "prompt": "a fox in snow", "duration": duration, "resolution": resolution, "aspect_ratio": "16:9"}})
    assert made.status_code == 202, made.text
    assert made.json()["credits"]["reserved"] == price
    job = await _finished(http, auth, made.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["provider"] == provider and job["route_reason"] == "remote_only"
    assert job["credits"] == {"reserved": price, "charged": price, "refunded": 0}
    url = job["outputs"][0]["url"]
    assert url.startswith(f"{BASE}/v1/files/outputs/"), url  # ours, not the provider's
    video = await http.get(url.removeprefix(BASE))
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.content[4:8] == b"ftyp"
    assert job["thumbnail_url"] is not None
    credits = (await http.get("/v1/credits", headers=auth)).json()
    assert credits == {"balance": 300 - price, "reserved": 0, "plan": "free"}
    ledger = (await http.get("/v1/credits/transactions", headers=auth)).json()["data"]
    assert [e["kind"] for e in ledger if e["job_id"] == job["id"]].count("capture") == 1
    stats = (await http.get("/v1/admin/stats", headers=ADMIN)).json()
    assert {"provider": provider, "reason": "remote_only"}.items() <= stats["routes"][0].items()


async def test_safety_block_fails_with_content_policy_and_refunds(client: Any, fakes: Any) -> None:
    http, auth = client
    fakes[1].behavior.safety_block = True
    made = await http.post("/v1/jobs", headers=auth, json={"model": "veo-3.1", "input": {
        "prompt": "something the provider refuses", "duration": 4}})
    job = await _finished(http, auth, made.json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "content_policy"
    assert job["attempts"] == 1  # not retried
    assert job["credits"] == {"reserved": 40, "charged": 0, "refunded": 40}
    assert (await http.get("/v1/credits", headers=auth)).json()["balance"] == 300


async def test_limits_of_remote_models_are_checked_before_any_charge(client: Any) -> None:
    http, auth = client
    for bad in ({"duration": 5}, {"duration": 4, "resolution": "1080p"}, {"aspect_ratio": "4:3"},
                {"resolution": "4k"}):
        answer = await http.post("/v1/jobs", headers=auth, json={"model": "veo-3.1", "input": {"prompt": "x", **bad}})
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_input", (bad, answer.text)
    assert (await http.get("/v1/credits", headers=auth)).json() == {"balance": 300, "reserved": 0, "plan": "free"}
    assert (await http.get("/v1/jobs", headers=auth)).json()["data"] == []


async def test_replicate_webhook_with_bad_signature_is_rejected(client: Any) -> None:
    http, _ = client
    answer = await http.post("/v1/webhooks/replicate", content=b'{"id": "p1", "status": "succeeded"}',
                             headers={"webhook-id": "msg_1", "webhook-timestamp": "1700000000",
                                      "webhook-signature": "v1,AAAA", "content-type": "application/json"})
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_signature"


async def test_unknown_provider_webhook_is_404(client: Any) -> None:
    http, _ = client
    answer = await http.post("/v1/webhooks/nobody", content=b"{}")
    assert answer.status_code == 404
