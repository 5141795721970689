"""100 concurrent ``POST /v1/jobs`` from one user whose credits pay for exactly 10, against a real
uvicorn server on 127.0.0.1: exactly 10 accepted, the rest 402, the balance exact afterwards.
On SQLite, and on a fresh PostgreSQL database when ``CINEWEAVE_TEST_POSTGRES_URL`` is set."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest

from api.core import ledger
from api.http.app import create_app
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.harness import add_user, balance, bearer, job_count, ledger_rows

N, AFFORDABLE = 100, 10


async def _burst(url: str, key: str, body: dict[str, Any], headers: dict[str, str] | None = None,
                 n: int = N) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        start = asyncio.Event()

        async def one(i: int) -> httpx.Response:
            await start.wait()
            return await client.post("/v1/jobs", json=body, headers={**bearer(key), **(headers or {})})

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0.05)
        start.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=150)


@pytest.mark.slow
async def test_exactly_ten_of_a_hundred_are_accepted(backend_settings: Settings, storage: LocalStorage,
                                                     live_server: Any) -> None:
    s = backend_settings.model_copy(update={"max_active_jobs": 1000, "rate_limit_per_minute": 1000})
    app = create_app(s, None, storage=storage, run_maintenance=False)  # no runner: reservations stay held
    srv = live_server(app)
    db = app.state.cineweave.db
    # veo-3.1, 4 s at 720p: 40 credits a job
    user = add_user(db, s, credits=40 * AFFORDABLE)
    responses = await _burst(srv.url, user.api_key, {"model": "veo-3.1", "input": {"prompt": "p", "duration": 4}})
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: AFFORDABLE, 402: N - AFFORDABLE}, statuses
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 402} == {"insufficient_credits"}
    accepted = {r.json()["id"] for r in responses if r.status_code == 202}
    assert len(accepted) == AFFORDABLE
    assert job_count(db, user.user.id) == AFFORDABLE
    assert balance(db, user.user.id) == ledger.BalanceView(0, 40 * AFFORDABLE)
    assert Counter(e.kind for e in ledger_rows(db, user.user.id)) == {"grant": 1, "reserve": AFFORDABLE}
    async with httpx.AsyncClient(base_url=srv.url) as client:
        credits = (await client.get("/v1/credits", headers=bearer(user.api_key))).json()
    assert credits == {"balance": 0, "reserved": 40 * AFFORDABLE, "plan": "free"}


@pytest.mark.slow
async def test_concurrent_same_idempotency_key_on_a_real_server(backend_settings: Settings, storage: LocalStorage,
                                                                live_server: Any) -> None:
    s = backend_settings.model_copy(update={"max_active_jobs": 1000, "rate_limit_per_minute": 1000})
    app = create_app(s, None, storage=storage, run_maintenance=False)
    srv = live_server(app)
    db = app.state.cineweave.db
    user = add_user(db, s, credits=100)
    responses = await _burst(srv.url, user.api_key, {"model": "veo-3.1", "input": {"prompt": "p", "duration": 4}},
                             headers={"Idempotency-Key": "one-order"}, n=30)
    assert {r.status_code for r in responses} == {202}, [r.text for r in responses if r.status_code != 202][:3]
    assert len({r.json()["id"] for r in responses}) == 1
    assert job_count(db, user.user.id) == 1
    assert balance(db, user.user.id) == ledger.BalanceView(60, 40)
