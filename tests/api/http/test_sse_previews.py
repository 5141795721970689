"""Step previews over SSE: a ``preview`` event reaches a live stream, is never stored (no JobEvent,
not replayed), never becomes a webhook (native or Replicate shape), only the newest pending one is
sent, and on PostgreSQL it crosses to another API process's streams through NOTIFY.

The executor holds each job after its first step until the test's stream is connected (a
threading.Event set once the stream delivered its first event), so the previews are published
while someone listens; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from api.core.events import (
    DoneEvent,
    ErrorEvent,
    ExecutorEvent,
    OutputEvent,
    PreviewEvent,
    ProgressEvent,
    StageEvent,
    event_from_dict,
    event_to_wire,
)
from api.core.executor import ExecutionRequest
from api.db.tables import JobEvent, WebhookDelivery
from api.http.app import create_app
from api.services.events import EventBus, webhook_event
from api.settings import Settings
from api.storage.local import LocalStorage
from models.previews import encode_data_url
from tests.fixtures.fake_executor import TINY_PNG
from tests.fixtures.harness import LiveServer, add_user, bearer, wait_for

STREAM_TIMEOUT_S = 30.0
LOOPBACK: dict[str, Any] = {"egress_allow_networks": ["127.0.0.1/32"], "webhook_poll_s": 600.0,
                            "max_active_jobs": 10}


def preview_url(shade: int) -> str:
    return encode_data_url(np.full((8, 8, 3), shade, np.uint8), (64, 64))


@dataclass
class PreviewingExecutor:
    """Stage, a first step, (held until ``go``), then previews at steps 2 and 3, the rest, done."""

    storage: LocalStorage
    go: threading.Event = field(default_factory=threading.Event)
    previews: int = 2
    runs: list[str] = field(default_factory=list)

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        self.runs.append(request.job_id)
        yield StageEvent("generating")
        yield ProgressEvent(1, 4)
        if not await asyncio.to_thread(self.go.wait, STREAM_TIMEOUT_S):  # set by the test, bounded
            yield ErrorEvent("test_timeout", "the stream never connected")
            return
        for index in range(self.previews):
            step = 2 + index
            yield PreviewEvent(step=step, total=4, image=preview_url(40 * step), width=64, height=64)
            yield ProgressEvent(step, 4)
        key = f"{request.output_prefix}0.png"
        self.storage.put_bytes(key, TINY_PNG, "image/png")
        yield OutputEvent(key=key, content_type="image/png", width=64, height=64)
        yield DoneEvent({"seed": 1})

    async def cancel(self, job_id: str) -> None:
        return None


def read_stream(client: httpx.Client, url: str, headers: dict[str, str],
                on_first: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """Read an SSE stream to its end (bounded); ``on_first`` runs once the first event arrived."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    deadline = time.monotonic() + STREAM_TIMEOUT_S
    with client.stream("GET", url, headers=headers, timeout=httpx.Timeout(STREAM_TIMEOUT_S)) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            assert time.monotonic() < deadline, "the stream did not end"
            if not line:
                if "event" in current:
                    events.append(current)
                    if len(events) == 1:
                        on_first()
                current = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            current[name] = json.loads(value) if name == "data" else value
    return events


def check_preview(event: dict[str, Any]) -> None:
    assert "id" not in event  # live only: not part of the Last-Event-ID sequence
    data = event["data"]
    assert set(data) == {"step", "total", "image", "width", "height"}
    assert data["total"] == 4 and data["width"] == data["height"] == 64
    prefix = "data:image/jpeg;base64,"
    assert data["image"].startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(data["image"][len(prefix):])))
    assert image.format == "JPEG" and image.size == (64, 64)


def start(settings: Settings, storage: LocalStorage, live_server: Any, executor: Any,
          **overrides: Any) -> tuple[LiveServer, Any]:
    s = settings.model_copy(update={**LOOPBACK, **overrides})
    app = create_app(s, executor, storage=storage, run_maintenance=False)
    return live_server(app), app


def test_preview_reaches_the_stream_and_is_never_stored_nor_a_webhook(
        settings: Settings, storage: LocalStorage, live_server: Any) -> None:
    executor = PreviewingExecutor(storage)
    srv, app = start(settings, storage, live_server, executor)
    db = app.state.cineweave.db
    user = add_user(db, settings, credits=100)
    with httpx.Client(base_url=srv.url, timeout=20) as client:
        job = client.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": "a cat", "steps": 4},
                                            "webhook": "http://127.0.0.1:9/hook"},
                          headers=bearer(user.api_key)).json()
        live = read_stream(client, f"/v1/jobs/{job['id']}/events", bearer(user.api_key), executor.go.set)
        types = [e["event"] for e in live]
        assert types[-1] == "completed"
        previews = [e for e in live if e["event"] == "preview"]
        assert previews, types
        for event in previews:
            check_preview(event)
        assert types.index("preview") < types.index("completed")

        # not stored: no JobEvent row, so a replay (or a resume) has none
        with db.read() as session:
            stored = list(session.execute(select(JobEvent.type).where(JobEvent.job_id == job["id"])).scalars())
        assert "preview" not in stored and "output" in stored
        replay = read_stream(client, f"/v1/jobs/{job['id']}/events", bearer(user.api_key))
        assert "preview" not in [e["event"] for e in replay]
        assert [e["event"] for e in replay] == [e["event"] for e in live if e["event"] != "preview"]

        # never a webhook: the outbox has the job's start/output/completed rows, none with a preview
        with db.read() as session:
            rows = list(session.execute(select(WebhookDelivery).where(WebhookDelivery.job_id == job["id"])).scalars())
        assert {r.event for r in rows} == {"start", "output", "completed"}
        assert not any("data:image" in json.dumps(r.payload) for r in rows)
        assert webhook_event("preview", previews[0]["data"]) is None


def test_replicate_prediction_webhooks_carry_no_preview(settings: Settings, storage: LocalStorage,
                                                         live_server: Any) -> None:
    executor = PreviewingExecutor(storage)
    executor.go.set()
    srv, app = start(settings, storage, live_server, executor)
    db = app.state.cineweave.db
    user = add_user(db, settings, credits=100)
    with httpx.Client(base_url=srv.url, timeout=20) as client:
        answer = client.post(f"/replicate/v1/models/{settings.replicate_owner}/tiny-sd/predictions",
                             json={"input": {"prompt": "a cat"}, "webhook": "http://127.0.0.1:9/hook"},
                             headers=bearer(user.api_key))
        assert answer.status_code in (200, 201, 202), answer.text
        prediction = answer.json()

        def done() -> bool:
            got = client.get(f"/replicate/v1/predictions/{prediction['id']}", headers=bearer(user.api_key)).json()
            return got["status"] in ("succeeded", "failed", "canceled")

        wait_for(done, "the prediction to finish")
    with db.read() as session:
        rows = list(session.execute(select(WebhookDelivery).where(WebhookDelivery.job_id == prediction["id"]))
                    .scalars())
        stored = list(session.execute(select(JobEvent.type).where(JobEvent.job_id == prediction["id"])).scalars())
    assert rows and "completed" in {r.event for r in rows}
    assert not any("data:image" in json.dumps(r.payload) for r in rows)
    assert "preview" not in stored


def test_bus_keeps_only_the_newest_preview_and_none_from_before_a_stream() -> None:
    bus = EventBus()
    before = bus.preview_seq()
    for step in (2, 4, 6):  # three previews while the stream was busy: only the newest is pending
        bus.publish_preview("job_a", {"step": step})
    pending = bus.preview("job_a", before)
    assert pending is not None and pending[1] == {"step": 6}
    assert bus.preview("job_a", pending[0]) is None  # sent: nothing newer
    later = bus.preview_seq()
    assert bus.preview("job_a", later) is None  # a stream started now gets none of the old ones
    bus.publish_preview("job_b", {"step": 2})
    assert bus.preview("job_a", later) is None and bus.preview("job_b", later) is not None
    seen: list[str] = []
    bus.add_listener(lambda job, type_, data: seen.append(type_))
    bus.publish_preview("job_a", {"step": 8})
    assert seen == []  # listeners (webhooks, deadlines, the runner) never see previews
    bus.publish("job_a", "completed", {"status": "succeeded"})
    assert bus.preview("job_a", 0) is None  # dropped with the job's end


def test_preview_event_on_the_wire() -> None:
    event = PreviewEvent(step=2, total=4, image="data:image/jpeg;base64,AA==", width=64, height=48)
    wire = event_to_wire(event)
    assert wire["type"] == "preview" and wire["v"] == 1
    assert event_from_dict({**wire, "newer_field": 1}) == event  # unknown fields ignored


@pytest.mark.postgres
@pytest.mark.slow
def test_preview_crosses_to_another_api_process_over_notify(settings: Settings, storage: LocalStorage,
                                                             live_server: Any, pg_url: str) -> None:
    """App A runs the job; the stream is on app B (no runner, its SSE poll far beyond the wait):
    B's previews can only come through PostgreSQL NOTIFY."""
    executor = PreviewingExecutor(storage)
    srv_a, app_a = start(settings, storage, live_server, executor, database_url=pg_url)
    srv_b, _ = start(settings, storage, live_server, None, database_url=pg_url, sse_poll_s=120.0)
    user = add_user(app_a.state.cineweave.db, settings, credits=100)
    with httpx.Client(base_url=srv_a.url, timeout=20) as a, httpx.Client(base_url=srv_b.url, timeout=20) as b:
        job = a.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": "a cat", "steps": 4}},
                     headers=bearer(user.api_key)).json()
        live = read_stream(b, f"/v1/jobs/{job['id']}/events", bearer(user.api_key), executor.go.set)
    previews = [e for e in live if e["event"] == "preview"]
    assert previews and live[-1]["event"] == "completed"
    for event in previews:
        check_preview(event)


async def test_runner_hands_every_preview_to_the_bus_and_stores_none(make_api: Any, storage: LocalStorage) -> None:
    """The shared fake executor's previews (``preview_every``) go to the bus, one per preview, never to
    the event table; the job settles as usual."""
    from tests.fixtures.fake_executor import FakeExecutor
    from tests.fixtures.harness import wait_job

    api = await make_api(FakeExecutor(storage=storage, steps=3, preview_every=1))
    published: list[tuple[str, dict[str, Any]]] = []
    real = api.state.bus.publish_preview

    def spy(job_id: str, data: dict[str, Any]) -> None:
        published.append((job_id, data))
        real(job_id, data)

    api.state.bus.publish_preview = spy  # type: ignore[method-assign]
    user = api.user(credits=10)
    answer = await api.submit(user.api_key, input={"prompt": "a cat", "steps": 3})
    assert answer.status_code == 202, answer.text
    job = await wait_job(api.db, answer.json()["id"])
    assert job.status == "succeeded"
    assert [(j, d["step"], d["total"]) for j, d in published] == [(job.id, 1, 3), (job.id, 2, 3)]
    assert all(d["image"].startswith("data:image/jpeg;base64,") for _, d in published)
    with api.db.read() as session:
        stored = list(session.execute(select(JobEvent.type).where(JobEvent.job_id == job.id)).scalars())
    assert "preview" not in stored and "completed" in stored


async def test_stream_sends_a_pending_preview_before_the_completed_event(make_api: Any) -> None:
    """A preview pending when the stream reads the job's ``completed`` event from the table (stored
    by another process whose announcement this bus has not heard yet: heard, it drops the preview)
    still reaches the stream, ahead of ``completed``, which ends it. The stream is driven directly;
    its request stub says when the stream is about to wait."""
    from api.http.routes.jobs import _stream

    api = await make_api(run_runner=False)  # nothing runs the job: the test stores its events
    user = api.user(credits=10)
    answer = await api.submit(user.api_key, input={"prompt": "a cat", "steps": 4})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    waiting = asyncio.Event()

    class Request:
        async def is_disconnected(self) -> bool:
            waiting.set()  # the stream's next step is the wait for a wake-up
            return False

    stream = _stream(api.state, Request(), job_id, 0)  # type: ignore[arg-type]
    seen: list[str] = []
    for _ in range(20):  # the stored events so far, until the stream waits
        step = asyncio.ensure_future(stream.__anext__())
        waiter = asyncio.ensure_future(waiting.wait())
        await asyncio.wait({step, waiter}, timeout=STREAM_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if step.done():
            waiter.cancel()
            seen.append(step.result()["event"])
            continue
        assert waiting.is_set(), "the stream neither sent an event nor waited"
        break
    else:
        raise AssertionError(f"the stream never waited: {seen}")
    assert "completed" not in seen
    # the last preview and the job's end land together, before the stream reads again; the end
    # is announced as a plain wake (a change stored elsewhere), which drops no preview
    api.state.bus.publish_preview(job_id, {"step": 4, "total": 4, "image": "data:image/jpeg;base64,AA=="})
    with api.db.session() as session:
        session.add(JobEvent(job_id=job_id, type="completed", data={"status": "succeeded"}))
        session.commit()
    api.state.bus.wake(job_id)
    first = await asyncio.wait_for(step, STREAM_TIMEOUT_S)
    rest = [first["event"]]
    async for event in stream:  # ends at completed (bounded: it returns right after)
        rest.append(event["event"])
        assert len(rest) < 10, rest
    assert rest == ["preview", "completed"], rest
    await stream.aclose()


async def test_a_wake_by_a_preview_alone_sends_it_without_reading_the_table(
        make_api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step preview wakes the stream, which sends it without reading the job's events (nothing
    stored changed); an announced change is read."""
    import api.http.routes.jobs as routes
    from api.http.routes.jobs import _stream

    api = await make_api(run_runner=False, sse_poll_s=3600.0)  # no safety poll: every read is counted
    user = api.user(credits=10)
    answer = await api.submit(user.api_key, input={"prompt": "a cat", "steps": 4})
    job_id = answer.json()["id"]
    reads: list[int] = []
    real = routes.events_after

    def counted(session: Any, job: str, after: int, *rest: Any) -> Any:
        reads.append(after)
        return real(session, job, after, *rest)

    monkeypatch.setattr(routes, "events_after", counted)
    waiting = asyncio.Event()

    class Request:
        async def is_disconnected(self) -> bool:
            waiting.set()
            return False

    stream = _stream(api.state, Request(), job_id, 0)  # type: ignore[arg-type]

    async def next_or_wait() -> dict[str, Any] | None:
        """The stream's next event, or None once it waits for a wake-up."""
        waiting.clear()
        step = asyncio.ensure_future(stream.__anext__())
        waited = asyncio.ensure_future(waiting.wait())
        await asyncio.wait({step, waited}, timeout=STREAM_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        waited.cancel()
        if step.done():
            return step.result()
        assert waiting.is_set(), "the stream neither sent an event nor waited"
        pending.append(step)
        return None

    pending: list[asyncio.Future[Any]] = []
    for _ in range(20):  # the stored events so far, until the stream waits
        if await next_or_wait() is None:
            break
    assert len(reads) == 1
    api.state.bus.publish_preview(job_id, {"step": 2, "total": 4, "image": "data:image/jpeg;base64,AA=="})
    preview = await asyncio.wait_for(pending.pop(), STREAM_TIMEOUT_S)
    assert preview["event"] == "preview" and len(reads) == 1  # sent, and the table not read
    assert await next_or_wait() is None  # waiting again
    with api.db.session() as session:
        session.add(JobEvent(job_id=job_id, type="completed", data={"status": "succeeded"}))
        session.commit()
    api.state.bus.wake(job_id)  # the change announced
    completed = await asyncio.wait_for(pending.pop(), STREAM_TIMEOUT_S)
    assert completed["event"] == "completed" and len(reads) == 2
    assert json.loads(completed["data"])["job"]["id"] == job_id  # the job view, read in the same hop
    await stream.aclose()


def test_bus_drops_a_preview_when_another_process_says_the_job_completed() -> None:
    bus = EventBus()
    bus.publish_preview("job_a", {"step": 2})
    bus.publish_preview("job_b", {"step": 2})
    # the completed event's notification, as record_event announces it (from any process)
    bus.on_notification({"k": "events", "job": "job_a", "type": "completed"})
    assert bus.preview("job_a", 0) is None
    assert bus.preview("job_b", 0) is not None  # another job's stays
    bus.on_notification({"k": "events", "job": "job_b", "type": "progress"})
    assert bus.preview("job_b", 0) is not None  # only the end drops it


def test_bus_ignores_previews_of_a_job_whose_end_it_saw() -> None:
    bus = EventBus()
    bus.on_notification({"k": "events", "job": "job_a", "type": "completed"})
    # a preview NOTIFY in flight when the job ended, and a local one
    bus.on_notification({"k": "events", "job": "job_a", "type": "preview", "preview": {"step": 4}})
    bus.publish_preview("job_a", {"step": 4})
    assert bus.preview("job_a", 0) is None
    bus.publish("job_c", "completed", {"status": "succeeded"})  # this process's end counts too
    bus.publish_preview("job_c", {"step": 4})
    assert bus.preview("job_c", 0) is None
    bus.publish_preview("job_b", {"step": 4})  # a live job's preview is held as before
    assert bus.preview("job_b", 0) is not None


def test_bus_remembers_a_bounded_number_of_ended_jobs() -> None:
    from api.services.events import COMPLETED_KEPT

    bus = EventBus()
    for index in range(COMPLETED_KEPT + 10):
        bus.on_notification({"k": "events", "job": f"job_{index}", "type": "completed"})
    assert len(bus._completed) == COMPLETED_KEPT
    bus.publish_preview("job_0", {"step": 1})  # forgotten (oldest): a preview is held again
    assert bus.preview("job_0", 0) is not None
    bus.publish_preview(f"job_{COMPLETED_KEPT + 9}", {"step": 1})  # the newest are remembered
    assert bus.preview(f"job_{COMPLETED_KEPT + 9}", 0) is None


def test_bus_rejects_a_preview_over_64_kb() -> None:
    from api.services.events import MAX_PREVIEW_BYTES

    bus = EventBus()
    big = {"step": 2, "image": "data:image/jpeg;base64," + "A" * MAX_PREVIEW_BYTES}
    assert bus.publish_preview("job_a", big) is False
    assert bus.preview("job_a", 0) is None
    small = {"step": 2, "image": "data:image/jpeg;base64," + "A" * 4000}
    assert bus.publish_preview("job_a", small) is True
    assert bus.preview("job_a", 0) is not None
