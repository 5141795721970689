"""The show test of queue positions (issue 10): one runner slot held busy, 5 jobs queued from 3
users (one on the studio plan, submitting last): each job's ``queue_position`` — on
``GET /v1/jobs/{id}``, in ``GET /v1/jobs`` and in the SSE ``queue`` event — matches the order in
which the jobs then start. Against a real server on 127.0.0.1; the jobs are held by gates."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx

from api.http.app import create_app
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import add_user, bearer, wait_job, wait_until

STREAM_TIMEOUT_S = 30.0


async def queue_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The data of each ``queue`` event of an open SSE response."""
    current: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if current.get("event") == "queue":
                assert "id" not in current  # not a stored event: Last-Event-ID resume is unaffected
                yield json.loads(current["data"])
            current = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        current[name] = value.removeprefix(" ")


async def test_queue_positions_match_the_start_order(settings: Settings, storage: LocalStorage,
                                                      live_server: Any) -> None:
    busy, first = threading.Event(), threading.Event()
    executor = FakeExecutor(storage=storage, steps=1, gates={"busy": busy, "first": first})
    s = settings.model_copy(update={"runner_concurrency": 1, "max_active_jobs": 10, "rate_limit_per_minute": 100})
    app = create_app(s, executor, storage=storage, run_maintenance=False)
    srv = live_server(app)
    db = app.state.cineweave.db
    alice, bob = add_user(db, s, credits=100), add_user(db, s, credits=100)
    carol = add_user(db, s, credits=100, plan="studio")

    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        async def submit(user: Any, prompt: str) -> str:
            r = await client.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": prompt}},
                                  headers=bearer(user.api_key))
            assert r.status_code == 202, r.text
            return str(r.json()["id"])

        holder = await submit(alice, "busy")  # takes the one slot and holds it
        await wait_until(lambda: [r.job_id for r in executor.runs] == [holder], 20, what="the slot to be busy")
        owners = {}
        for user, prompt in ((alice, "a1"), (bob, "b1"), (alice, "a2"), (bob, "b2"), (carol, "first")):
            owners[await submit(user, prompt)] = user
        queued = list(owners)

        positions: dict[str, int] = {}
        for job_id, user in owners.items():
            body = (await client.get(f"/v1/jobs/{job_id}", headers=bearer(user.api_key))).json()
            assert body["status"] == "queued" and body["eta_s"] is None  # nothing measured yet
            positions[job_id] = body["queue_position"]
        assert sorted(positions.values()) == [0, 1, 2, 3, 4]
        assert positions[queued[-1]] == 0  # the studio plan's job, submitted last, starts next
        for user in (alice, bob, carol):  # the list shows the same positions (computed once per page)
            listed = (await client.get("/v1/jobs", headers=bearer(user.api_key))).json()["data"]
            for job in listed:
                if job["id"] in positions:
                    assert job["queue_position"] == positions[job["id"]], job["id"]
        holder_view = (await client.get(f"/v1/jobs/{holder}", headers=bearer(alice.api_key))).json()
        assert holder_view["status"] == "running" and holder_view["queue_position"] is None

        # SSE: the last job's stream tells its position, and tells it again when it moves
        last = max(positions, key=positions.__getitem__)
        seen: list[int] = []
        async with asyncio.timeout(STREAM_TIMEOUT_S), client.stream(
                "GET", f"/v1/jobs/{last}/events", headers=bearer(owners[last].api_key)) as response:
            assert response.status_code == 200
            async for data in queue_events(response):
                seen.append(data["queue_position"])
                if data["queue_position"] == positions[last]:
                    busy.set()  # the holder finishes; the studio job takes the slot (held by its gate)
                if data["queue_position"] == positions[last] - 1:
                    break
        assert seen[0] == positions[last] and seen[-1] == positions[last] - 1

        first.set()
        for job_id in [holder, *queued]:
            assert (await wait_job(db, job_id, timeout_s=30)).status == "succeeded"

        # measured now (six runs of tiny-sd here): the ETA is a number for the next ones
        again = executor.gates["again"] = threading.Event()
        busy_again = await submit(alice, "again")
        await wait_until(lambda: executor.runs[-1].job_id == busy_again, 20, what="the slot to be busy again")
        waiting = await submit(bob, "after")
        body = (await client.get(f"/v1/jobs/{waiting}", headers=bearer(bob.api_key))).json()
        assert body["queue_position"] == 0 and body["eta_s"] is not None and body["eta_s"] >= 0
        running = (await client.get(f"/v1/jobs/{busy_again}", headers=bearer(alice.api_key))).json()
        assert running["queue_position"] is None and running["eta_s"] is not None
        assert body["eta_s"] >= running["eta_s"]  # it starts after the running one ends
        again.set()
        assert (await wait_job(db, waiting, timeout_s=30)).status == "succeeded"
    started = [r.job_id for r in executor.runs][:6]
    assert started[0] == holder and sorted(started[1:]) == sorted(queued)
    assert [positions[j] for j in started[1:]] == [0, 1, 2, 3, 4], (started, positions)
