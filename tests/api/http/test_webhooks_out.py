"""Client webhooks: a durable outbox, signed, filtered, retried on 5xx, never in the runner's way.

The receiving end is a real HTTP server on 127.0.0.1 (its own thread and loop), allow-listed in
the egress policy (``LOOPBACK``); without the allow-list it is refused before any connect.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.db.engine import Database
from api.db.tables import WebhookDelivery
from api.http.webhooks import sign, verify
from tests.fixtures.harness import ApiHarness, LiveServer, wait_job, wait_until

LOOPBACK = {"egress_allow_networks": ["127.0.0.1/32"]}


def deliveries(db: Database, job_id: str) -> list[WebhookDelivery]:
    with db.read() as session:
        return list(session.execute(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                                    .order_by(WebhookDelivery.created_at)).scalars())


@dataclass
class Receiver:
    """Records every delivery; answers ``fail_first`` of them with 500 and sleeps ``delay_s`` each."""

    fail_first: int = 0
    delay_s: float = 0.0
    received: list[tuple[dict[str, str], bytes, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def hook(request: Request) -> JSONResponse:
            body = await request.body()
            with self.lock:
                self.received.append((dict(request.headers), body, time.monotonic()))
                n = len(self.received)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if n <= self.fail_first:
                return JSONResponse({"error": "try again"}, status_code=500)
            return JSONResponse({"ok": True})

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    def events(self) -> list[str]:
        """The job status in each delivery's body, in arrival order."""
        with self.lock:
            return [json.loads(body)["status"] for _, body, _ in self.received]


@pytest.fixture
def receiver_server(live_server: Any) -> Any:
    def start(**kwargs: Any) -> tuple[Receiver, LiveServer]:
        receiver = Receiver(**kwargs)
        return receiver, live_server(receiver.app())
    return start


async def test_deliveries_are_signed_and_carry_the_job(make_api: Any, receiver_server: Any) -> None:
    receiver, srv = receiver_server()
    api: ApiHarness = await make_api(**LOOPBACK)
    user = api.user(credits=10)
    job = (await api.submit(user.api_key, webhook=f"{srv.url}/hook")).json()
    await wait_job(api.db, job["id"])
    await wait_until(lambda: "succeeded" in receiver.events(), 10, what="the completed webhook")
    await api.state.webhooks.join(10)
    assert len(receiver.received) >= 2  # start, output, completed
    for headers, body, _ in receiver.received:
        assert verify(user.webhook_secret, headers, body)
        assert Webhook(user.webhook_secret).verify(body, headers)["id"] == job["id"]  # the library agrees
        assert not verify("whsec_" + "A" * 32, headers, body)  # another secret does not verify
        tampered = body.replace(b'"id"', b'"Id"')
        assert not verify(user.webhook_secret, headers, tampered)
        assert headers["content-type"] == "application/json"
        assert headers["webhook-id"].startswith("msg_")
        assert json.loads(body)["id"] == job["id"]
    ids = [h["webhook-id"] for h, _, _ in receiver.received]
    assert len(set(ids)) == len(ids)  # one id per delivery
    final = json.loads(receiver.received[-1][1])
    assert final["status"] == "succeeded" and final["outputs"] and final["credits"]["charged"] == 1


def test_verify_rejects_old_and_malformed_stamps() -> None:
    secret = "whsec_" + "QUJD" * 8
    body = b'{"a":1}'
    now = int(time.time())
    good = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": sign(secret, "msg_1", now, body)}
    assert verify(secret, good, body)
    assert verify(secret, {k.upper(): v for k, v in good.items()}, body)  # header names in any case
    assert not verify(secret, {**good, "webhook-timestamp": str(now - 3600)}, body)
    assert not verify(secret, {**good, "webhook-timestamp": "soon"}, body)
    assert not verify(secret, {**good, "webhook-id": "msg_2"}, body)
    assert not verify(secret, {k: v for k, v in good.items() if k != "webhook-id"}, body)
    # several signatures (key rotation): any one that matches is enough
    assert verify(secret, {**good, "webhook-signature": "v1,bm9wZQ== " + good["webhook-signature"]}, body)


async def test_event_filter(make_api: Any, receiver_server: Any) -> None:
    receiver, srv = receiver_server()
    api: ApiHarness = await make_api(**LOOPBACK)
    user = api.user(credits=10)
    only_done = (await api.submit(user.api_key, webhook=f"{srv.url}/hook",
                                  webhook_events_filter=["completed"])).json()
    await wait_job(api.db, only_done["id"])
    await wait_until(lambda: bool(receiver.received), 10, what="a delivery")
    await api.state.webhooks.join(10)
    assert receiver.events() == ["succeeded"]

    receiver.received.clear()
    start_only = (await api.submit(user.api_key, webhook=f"{srv.url}/hook", webhook_events_filter=["start"])).json()
    await wait_job(api.db, start_only["id"])
    await wait_until(lambda: bool(receiver.received), 10, what="a delivery")
    await api.state.webhooks.join(10)
    assert len(receiver.received) == 1  # the start, nothing else

    receiver.received.clear()
    none = (await api.submit(user.api_key)).json()  # no webhook at all
    await wait_job(api.db, none["id"])
    await api.state.webhooks.join(10)
    assert receiver.received == []


async def test_retried_on_5xx_with_the_same_id(make_api: Any, receiver_server: Any) -> None:
    receiver, srv = receiver_server(fail_first=2)
    api: ApiHarness = await make_api(**LOOPBACK, webhook_backoff_s=0.05, webhook_max_attempts=5)
    user = api.user(credits=10)
    job = (await api.submit(user.api_key, webhook=f"{srv.url}/hook", webhook_events_filter=["completed"])).json()
    await wait_job(api.db, job["id"])
    await wait_until(lambda: len(receiver.received) >= 3, 15, what="three attempts")
    await api.state.webhooks.join(15)
    assert len(receiver.received) == 3
    assert len({h["webhook-id"] for h, _, _ in receiver.received}) == 1
    assert all(verify(user.webhook_secret, h, b) for h, b, _ in receiver.received)
    [row] = deliveries(api.db, job["id"])
    assert row.id == receiver.received[0][0]["webhook-id"]
    assert (row.attempts, row.last_status, row.delivered_at is not None) == (3, 200, True)


async def test_gives_up_after_max_attempts(make_api: Any, receiver_server: Any) -> None:
    receiver, srv = receiver_server(fail_first=100)
    api: ApiHarness = await make_api(**LOOPBACK, webhook_backoff_s=0.01, webhook_max_attempts=3)
    user = api.user(credits=10)
    job = (await api.submit(user.api_key, webhook=f"{srv.url}/hook", webhook_events_filter=["completed"])).json()
    await wait_job(api.db, job["id"])
    await wait_until(lambda: len(receiver.received) >= 3, 15, what="three attempts")
    await api.state.webhooks.join(15)
    assert len(receiver.received) == 3
    metrics = (await api.client.get("/metrics")).text
    assert 'cineweave_webhook_deliveries_total{result="failed"} 1.0' in metrics


async def test_a_slow_webhook_does_not_delay_the_job(make_api: Any, receiver_server: Any) -> None:
    receiver, srv = receiver_server(delay_s=3.0)
    api: ApiHarness = await make_api(**LOOPBACK, webhook_timeout_s=10.0)
    user = api.user(credits=10)
    started = time.monotonic()
    jobs = [(await api.submit(user.api_key, webhook=f"{srv.url}/hook")).json() for _ in range(3)]
    for job in jobs:
        await wait_job(api.db, job["id"], timeout_s=10)
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, f"jobs waited on the webhook server ({elapsed:.1f}s)"
    assert receiver.received  # deliveries were under way meanwhile


async def test_unreachable_webhook_does_not_fail_the_job(make_api: Any) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    api: ApiHarness = await make_api(**LOOPBACK, webhook_backoff_s=0.01, webhook_max_attempts=2)
    user = api.user(credits=10)
    job = (await api.submit(user.api_key, webhook=f"http://127.0.0.1:{port}/hook")).json()
    done = await wait_job(api.db, job["id"])
    assert done.status == "succeeded"
    await api.state.webhooks.join(15)


def test_signature_is_the_same_wire_format_as_before() -> None:
    """standardwebhooks signs exactly as the hand-written HMAC did, so existing clients verify."""
    import base64
    import hashlib
    import hmac

    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    body, stamp = b'{"id":"job_1","status":"succeeded"}', 1_700_000_000
    digest = hmac.new(b"k" * 24, f"msg_1.{stamp}.".encode() + body, hashlib.sha256).digest()
    assert sign(secret, "msg_1", stamp, body) == "v1," + base64.b64encode(digest).decode()
