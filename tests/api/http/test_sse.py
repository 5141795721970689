"""SSE ``GET /v1/jobs/{id}/events`` against a real server: live events, replay, Last-Event-ID resume,
and the stream ends after ``completed``."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest

from api.http.app import create_app
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import LiveServer, add_user, bearer


def read_events(client: httpx.Client, url: str, headers: dict[str, str], timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """Read one SSE stream to its end; fail if it does not end within ``timeout_s``."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    with client.stream("GET", url, headers=headers, timeout=httpx.Timeout(timeout_s)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < deadline, "the stream did not end"
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            current[field] = json.loads(value) if field == "data" else value
    return events


@pytest.fixture
def server(settings: Settings, storage: LocalStorage, live_server: Any) -> tuple[LiveServer, NewUser, FakeExecutor]:
    executor = FakeExecutor(storage=storage, steps=5, step_s=0.25)
    s = settings.model_copy(update={"max_active_jobs": 10})
    app = create_app(s, executor, storage=storage, run_maintenance=False)
    srv = live_server(app)
    user = add_user(app.state.cineweave.db, s, credits=100)
    return srv, user, executor


@pytest.mark.slow
def test_live_stream_replay_and_resume(server: tuple[LiveServer, NewUser, FakeExecutor]) -> None:
    srv, user, _ = server
    with httpx.Client(base_url=srv.url, timeout=20) as client:
        job = client.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": "slow"}},
                          headers=bearer(user.api_key)).json()
        started = time.monotonic()
        live = read_events(client, f"/v1/jobs/{job['id']}/events", bearer(user.api_key))
        assert time.monotonic() - started >= 0.5  # it followed the job as it ran, then ended
        types = [e["event"] for e in live]
        assert types[0] == "status" and live[0]["data"]["status"] == "queued"
        assert "progress" in types and "output" in types
        assert types[-1] == "completed" and types.count("completed") == 1
        assert live[-1]["data"]["status"] == "succeeded"
        assert live[-1]["data"]["job"]["id"] == job["id"] and live[-1]["data"]["job"]["outputs"]
        ids = [int(e["id"]) for e in live]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)

        # A finished job replays everything, then ends.
        replay = read_events(client, f"/v1/jobs/{job['id']}/events", bearer(user.api_key))
        assert [(e["id"], e["event"]) for e in replay] == [(e["id"], e["event"]) for e in live]

        # Last-Event-ID resumes after that event.
        middle = live[len(live) // 2]
        resumed = read_events(client, f"/v1/jobs/{job['id']}/events",
                              {**bearer(user.api_key), "Last-Event-ID": middle["id"]})
        assert [e["id"] for e in resumed] == [e["id"] for e in live if int(e["id"]) > int(middle["id"])]
        assert resumed[-1]["event"] == "completed"


@pytest.mark.slow
def test_resume_mid_run(server: tuple[LiveServer, NewUser, FakeExecutor]) -> None:
    """Drop the connection while the job runs, reconnect with Last-Event-ID: nothing lost, nothing twice."""
    srv, user, _ = server
    with httpx.Client(base_url=srv.url, timeout=20) as client:
        job = client.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": "slow"}},
                          headers=bearer(user.api_key)).json()
        first: list[dict[str, Any]] = []
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=bearer(user.api_key)) as response:
            current: dict[str, Any] = {}
            for line in response.iter_lines():
                if not line and current:
                    first.append(current)
                    current = {}
                    if len(first) == 2:
                        break  # hang up early
                elif line and not line.startswith(":"):
                    k, _, v = line.partition(":")
                    current[k] = v.strip()
        assert len(first) == 2
        rest = read_events(client, f"/v1/jobs/{job['id']}/events",
                           {**bearer(user.api_key), "Last-Event-ID": first[-1]["id"]})
        everything = read_events(client, f"/v1/jobs/{job['id']}/events", bearer(user.api_key))
        assert [e["id"] for e in first] + [e["id"] for e in rest] == [e["id"] for e in everything]
        assert rest[-1]["event"] == "completed"


@pytest.mark.slow
def test_canceled_queued_job_stream_ends(settings: Settings, storage: LocalStorage, live_server: Any) -> None:
    app = create_app(settings, None, storage=storage, run_maintenance=False)
    srv = live_server(app)
    user = add_user(app.state.cineweave.db, settings, credits=10)
    with httpx.Client(base_url=srv.url, timeout=20) as client:
        job = client.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": "p"}},
                          headers=bearer(user.api_key)).json()
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(user.api_key))
        events = read_events(client, f"/v1/jobs/{job['id']}/events", bearer(user.api_key))
    assert [e["event"] for e in events] == ["status", "status", "completed"]
    assert events[-1]["data"]["status"] == "canceled"


async def test_other_users_stream_is_404(api: Any) -> None:
    alice, bob = api.user(credits=10), api.user(credits=10)
    job = (await api.submit(alice.api_key)).json()
    r = await api.client.get(f"/v1/jobs/{job['id']}/events", headers=bearer(bob.api_key))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
