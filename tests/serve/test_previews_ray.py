"""Step previews over the real path: HTTP API → runner → RayExecutor → the tiny-sd Serve replica →
SSE ``preview`` events, never stored.

Ordered by the replica's step hook, not by sleeps: job A (its own bucket) holds the pipeline while
job B queues behind it at the replica, so B's stream is connected before B's first step; B is then
held after step 3 (its step-2 preview is on its way) until the stream shows the preview.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from api.db.tables import JobEvent
from tests.fixtures.ray import RayApi

pytestmark = pytest.mark.ray

TIMEOUT_S = 90.0


class StreamReader(threading.Thread):
    """Reads one job's SSE stream to its end in a thread; flags its first event and first preview."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.events: list[dict[str, Any]] = []
        self.first = threading.Event()
        self.preview = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            current: dict[str, Any] = {}
            deadline = time.monotonic() + TIMEOUT_S
            with httpx.Client(timeout=httpx.Timeout(TIMEOUT_S)) as client, client.stream(
                    "GET", self.url, headers={"Authorization": f"Bearer {self.key}"}) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if time.monotonic() > deadline:
                        raise AssertionError("the stream did not end")
                    if not line:
                        if "event" in current:
                            self.events.append(current)
                            self.first.set()
                            if current["event"] == "preview":
                                self.preview.set()
                        current = {}
                    elif not line.startswith(":"):
                        name, _, value = line.partition(":")
                        value = value.removeprefix(" ")
                        current[name] = json.loads(value) if name == "data" else value
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.first.set()
            self.preview.set()


def test_tiny_sd_job_streams_previews_over_sse(ray_api: RayApi) -> None:
    user = ray_api.user()
    blocker_token = ray_api.hold(step=1)
    blocker = ray_api.submit(user.api_key, "tiny-sd", {"prompt": f"blocker {blocker_token}", "steps": 2,
                                                        "width": 32, "height": 32})
    ray_api.wait_held(blocker["id"])
    token = ray_api.hold(step=3)
    job = ray_api.submit(user.api_key, "tiny-sd", {"prompt": f"a lighthouse {token}", "steps": 6, "seed": 3})
    reader = StreamReader(f"{ray_api.url}/v1/jobs/{job['id']}/events", user.api_key)
    try:
        ray_api.wait(user.api_key, job["id"], TIMEOUT_S, statuses={"running"})  # sent to the replica, queued there
        reader.start()
        assert reader.first.wait(TIMEOUT_S), "the stream never started"
        ray_api.release(blocker["id"])  # the pipeline is free: job B runs while its stream listens
        ray_api.wait_held(job["id"])
        assert reader.preview.wait(TIMEOUT_S), "no preview while the job was held"
    finally:
        ray_api.release(token)
        ray_api.release(blocker_token)
    reader.join(TIMEOUT_S)
    assert reader.error is None, reader.error
    types = [e["event"] for e in reader.events]
    assert types[-1] == "completed" and reader.events[-1]["data"]["status"] == "succeeded", types
    previews = [e for e in reader.events if e["event"] == "preview"]
    assert previews and previews[0]["data"]["step"] == 2
    for event in previews:
        data = event["data"]
        assert "id" not in event and data["total"] == 6 and (data["width"], data["height"]) == (64, 64)
        image = Image.open(io.BytesIO(base64.b64decode(data["image"].split(",", 1)[1])))
        assert image.format == "JPEG" and image.size == (64, 64)
    with ray_api.db.read() as session:
        stored = list(session.execute(select(JobEvent.type).where(JobEvent.job_id == job["id"])).scalars())
    assert "preview" not in stored
    assert ray_api.stats("tiny-sd")["previews"]["sent"] >= 1
