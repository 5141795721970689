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

# the receiver's network allow-listed; the deliverer's idle poll far beyond every bounded wait here,
# so each delivery below proves the deliverer is woken on enqueue (or at the retry's due time)
LOOPBACK: dict[str, Any] = {"egress_allow_networks": ["127.0.0.1/32"], "webhook_poll_s": 600.0}


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
    await wait_until(lambda: bool(receiver.received), 10, what="deliveries under way")


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


# the outbox deliverer, unit by unit ------------------------------------------------------------
def _render(job: Any) -> dict[str, Any]:
    return {"id": job.id, "status": job.status}


def _outbox_rows(db: Database, settings: Any, n: int, url: str = "http://hooks.example.test/h") -> list[str]:
    from api.db.tables import Job
    from api.services.events import job_snapshot
    from tests.fixtures.harness import add_user

    user = add_user(db, settings)
    ids: list[str] = []
    with db.session() as session:
        for i in range(n):
            job = Job(user_id=user.user.id, model="tiny-sd", kind="image", task="t2i", input={"i": i})
            row = WebhookDelivery(job_id=job.id, user_id=user.user.id, event="completed", url=url,
                                  payload=job_snapshot(job))
            session.add(row)
            ids.append(row.id)
        session.commit()
    return ids


class ScriptedPost:
    """Stands in for ``egress.post``: answers from a script, records each call; no network."""

    def __init__(self, *answers: int | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, dict[str, str], bytes]] = []

    async def __call__(self, _policy: Any, url: str, *, content: bytes, headers: dict[str, str],
                       timeout_s: float) -> int:
        self.calls.append((url, headers, content))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _row(db: Database, row_id: str) -> WebhookDelivery:
    with db.read() as session:
        row = session.get(WebhookDelivery, row_id)
    assert row is not None
    return row


def test_a_due_row_is_claimed_by_exactly_one_of_two_deliverers(backend_settings: Any) -> None:
    """Two processes' deliverers (own Database objects) claim at the same time: no row twice."""
    from api.http.webhooks import WebhookDeliverer

    db_a, db_b = Database(backend_settings), Database(backend_settings)
    db_a.migrate()
    try:
        ids = _outbox_rows(db_a, backend_settings, 40)
        a = WebhookDeliverer(db_a, backend_settings, _render, owner="replica-a")
        b = WebhookDeliverer(db_b, backend_settings, _render, owner="replica-b")
        got: dict[str, list[str]] = {"a": [], "b": []}
        barrier = threading.Barrier(2)

        def take(name: str, deliverer: WebhookDeliverer) -> None:
            barrier.wait(10)
            for _ in range(20):  # bounded: each round takes up to 5
                rows = deliverer.claim(5)
                got[name].extend(r.id for r in rows)
                if not rows:
                    return

        threads = [threading.Thread(target=take, args=("a", a)), threading.Thread(target=take, args=("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not set(got["a"]) & set(got["b"])
        assert sorted(got["a"] + got["b"]) == sorted(ids)
        owners = {_row(db_a, i).claimed_by for i in got["a"]} | {_row(db_a, i).claimed_by for i in got["b"]}
        assert owners == {"replica-a", "replica-b"} or len(owners) == 1
        assert all(_row(db_a, i).attempts == 1 for i in ids)
        assert a.claim(5) == [] and b.claim(5) == []  # all held until the claims expire
    finally:
        db_a.dispose()
        db_b.dispose()


def test_an_expired_claim_is_taken_again_and_the_old_owner_cannot_finish_it(db: Database, settings: Any) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from api.db.tables import utcnow
    from api.http.webhooks import WebhookDeliverer

    [row_id] = _outbox_rows(db, settings, 1)
    dead = WebhookDeliverer(db, settings, _render, owner="dead")
    [row] = dead.claim(5)
    with db.session() as session:  # the dead process's claim runs out
        session.execute(update(WebhookDelivery).values(claim_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    alive = WebhookDeliverer(db, settings, _render, owner="alive")
    [again] = alive.claim(5)
    assert (again.id, again.attempts, again.claimed_by) == (row_id, 2, "alive")
    dead._finish(row, "delivered", 200, None)  # too late: not its claim any more
    assert _row(db, row_id).delivered_at is None and _row(db, row_id).claimed_by == "alive"


def test_backoff_schedule(settings: Any) -> None:
    from api.http.webhooks import MAX_BACKOFF_S, backoff_s

    s = settings.model_copy(update={"webhook_backoff_s": 2.0})
    assert [backoff_s(s, n) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert backoff_s(s, 40) == MAX_BACKOFF_S


@pytest.mark.parametrize(("answer", "outcome"), [
    (200, "delivered"), (204, "delivered"), (500, "retry"), (503, "retry"), (429, "retry"), (408, "retry"),
    (400, "final"), (404, "final"), (410, "final"),
])
async def test_status_decides_retry_or_final(db: Database, settings: Any, answer: int, outcome: str) -> None:
    import httpx  # noqa: F401 - the same exception types as the real post

    from api.db.tables import utcnow
    from api.http.webhooks import WebhookDeliverer

    [row_id] = _outbox_rows(db, settings, 1)
    post = ScriptedPost(answer)
    deliverer = WebhookDeliverer(db, settings.model_copy(update={"webhook_backoff_s": 30.0}), _render, post=post)
    before = utcnow()
    assert await deliverer.run_once() == 1
    row = _row(db, row_id)
    assert row.last_status == answer and row.claimed_by is None and row.attempts == 1
    if outcome == "delivered":
        assert row.delivered_at is not None and row.failed_at is None
    elif outcome == "retry":
        assert row.delivered_at is None and row.failed_at is None
        assert 29.0 <= (row.next_attempt_at - before).total_seconds() <= 60.0  # first backoff: 30 s
        assert await deliverer.run_once() == 0  # not due before then
    else:
        assert row.failed_at is not None and row.last_error == f"HTTP {answer}"
        assert await deliverer.run_once() == 0  # never again
    assert len(post.calls) == 1


async def test_network_errors_are_retried_until_max_attempts(db: Database, settings: Any) -> None:
    import httpx

    from api.http.webhooks import WebhookDeliverer
    from api.metrics import Metrics

    [row_id] = _outbox_rows(db, settings, 1)
    post = ScriptedPost(httpx.ConnectError("refused"))
    metrics = Metrics()
    deliverer = WebhookDeliverer(db, settings.model_copy(update={"webhook_backoff_s": 0.0, "webhook_max_attempts": 3}),
                                 _render, post=post, metrics=metrics)
    for _ in range(5):  # bounded; backoff 0 makes each retry due at once
        await deliverer.run_once()
    row = _row(db, row_id)
    assert len(post.calls) == 3 and row.attempts == 3 and row.failed_at is not None
    assert row.last_error == "network error (ConnectError)"
    assert len({h["webhook-id"] for _, h, _ in post.calls}) == 1  # the same id on every try
    assert metrics.webhooks.labels("failed")._value.get() == 1


async def test_a_refused_url_fails_for_good_and_nothing_is_sent(db: Database, settings: Any,
                                                               receiver_server: Any) -> None:
    """The real egress policy (no allow-list): a loopback webhook is refused before any connect."""
    from api.http.webhooks import WebhookDeliverer

    receiver, srv = receiver_server()
    [row_id] = _outbox_rows(db, settings, 1, url=f"{srv.url}/hook")
    strict = settings.model_copy(update={"egress_allow_networks": [], "egress_allow_hosts": []})
    deliverer = WebhookDeliverer(db, strict, _render)
    assert await deliverer.run_once() == 1
    row = _row(db, row_id)
    assert row.failed_at is not None and row.attempts == 1 and row.last_status is None
    assert row.last_error is not None and row.last_error.startswith("url_not_allowed")
    assert await deliverer.run_once() == 0
    assert receiver.received == []  # the listener counted no hit


async def test_the_signature_verifies_with_the_standardwebhooks_library(db: Database, settings: Any) -> None:
    from api.db.tables import User
    from api.http.webhooks import WebhookDeliverer

    [row_id] = _outbox_rows(db, settings, 1)
    post = ScriptedPost(200)
    await WebhookDeliverer(db, settings, _render, post=post).run_once()
    [(_, headers, body)] = post.calls
    row = _row(db, row_id)
    with db.read() as session:
        user = session.get(User, row.user_id)
    assert user is not None
    assert Webhook(user.webhook_secret).verify(body, headers) == {"id": row.job_id, "status": "queued"}
    assert headers["webhook-id"] == row_id


def test_finished_rows_are_pruned_after_the_retention(db: Database, settings: Any) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from api.db.tables import utcnow
    from api.http.webhooks import WebhookDeliverer

    old, recent, pending = _outbox_rows(db, settings, 3)
    with db.session() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == old)
                        .values(delivered_at=utcnow() - timedelta(days=8)))
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == recent)
                        .values(failed_at=utcnow() - timedelta(hours=1)))
        session.commit()
    assert WebhookDeliverer(db, settings, _render).prune() == 1
    with db.read() as session:
        left = set(session.execute(select(WebhookDelivery.id)).scalars())
    assert left == {recent, pending}


async def test_stop_lets_the_delivery_in_flight_finish(db: Database, settings: Any) -> None:
    """A graceful stop (deploy) waits for the POST under way and records it: not sent twice."""
    from api.http.webhooks import WebhookDeliverer

    [row_id] = _outbox_rows(db, settings, 1)
    posted, answer = asyncio.Event(), asyncio.Event()

    async def slow_post(_policy: Any, _url: str, **_kwargs: Any) -> int:
        posted.set()
        await asyncio.wait_for(answer.wait(), 10)
        return 200

    deliverer = WebhookDeliverer(db, settings, _render, post=slow_post)
    deliverer.start()
    await asyncio.wait_for(posted.wait(), 10)
    stopping = asyncio.ensure_future(deliverer.stop(grace_s=10))
    await asyncio.sleep(0)  # stop() has begun: no new claims from here
    answer.set()
    await asyncio.wait_for(stopping, 15)
    row = _row(db, row_id)
    assert row.delivered_at is not None and row.claimed_by is None and row.attempts == 1


async def test_stop_releases_a_claim_whose_post_outlives_the_grace(db: Database, settings: Any) -> None:
    from api.http.webhooks import WebhookDeliverer

    [row_id] = _outbox_rows(db, settings, 1)
    posted = asyncio.Event()

    async def stuck_post(_policy: Any, _url: str, **_kwargs: Any) -> int:
        posted.set()
        await asyncio.Event().wait()  # never answers (canceled by stop)
        return 200

    deliverer = WebhookDeliverer(db, settings, _render, post=stuck_post)
    deliverer.start()
    await asyncio.wait_for(posted.wait(), 10)
    await asyncio.wait_for(deliverer.stop(grace_s=0.05), 10)
    row = _row(db, row_id)
    assert row.delivered_at is None and row.claimed_by is None  # another process may take it at once
    assert len(WebhookDeliverer(db, settings, _render, owner="next").claim(5)) == 1


async def test_a_payload_that_cannot_be_rendered_fails_for_good(db: Database, settings: Any) -> None:
    from api.http.webhooks import WebhookDeliverer

    [row_id] = _outbox_rows(db, settings, 1)

    def broken(_job: Any) -> dict[str, Any]:
        raise KeyError("key")

    post = ScriptedPost(200)
    assert await WebhookDeliverer(db, settings, broken, post=post).run_once() == 1
    row = _row(db, row_id)
    assert row.failed_at is not None and row.last_error == "internal error rendering the payload"
    assert post.calls == []


async def test_the_outbox_backlog_is_a_metric(make_api: Any, receiver_server: Any) -> None:
    receiver, srv = receiver_server(fail_first=1000)
    api: ApiHarness = await make_api(**LOOPBACK, webhook_backoff_s=60.0, metrics_refresh_s=0.05)
    user = api.user(credits=10)
    job = (await api.submit(user.api_key, webhook=f"{srv.url}/hook", webhook_events_filter=["completed"])).json()
    await wait_job(api.db, job["id"])
    await wait_until(lambda: len(receiver.received) >= 1, 10, what="the first (failing) attempt")

    async def backlog_shown() -> bool:
        text = (await api.client.get("/metrics")).text
        return "cineweave_webhooks_pending 1.0" in text

    await wait_until(backlog_shown, 10, what="the pending webhook in /metrics")


def test_the_outbox_row_commits_with_its_change_or_not_at_all(backend_db: Database, backend_settings: Any) -> None:
    """record_event queues the webhook in the change's own transaction, filtered, with the job's
    state at that moment."""
    from api.db.tables import Job
    from api.services.events import record_event
    from tests.fixtures.harness import add_user

    user = add_user(backend_db, backend_settings)
    with backend_db.session() as session:
        job = Job(user_id=user.user.id, model="tiny-sd", kind="image", task="t2i", input={"prompt": "p"},
                  webhook="http://hooks.example.test/h", webhook_events_filter=["start", "completed"])
        session.add(job)
        session.commit()
        job_id = job.id
    with backend_db.session() as session:
        row = session.get(Job, job_id)
        assert row is not None
        row.status = "running"
        record_event(session, job_id, "status", {"status": "running", "attempt": 1})
        session.rollback()  # the change did not happen: neither did its webhook
    assert deliveries(backend_db, job_id) == []
    with backend_db.session() as session:
        row = session.get(Job, job_id)
        assert row is not None
        row.status, row.attempts = "running", 1
        record_event(session, job_id, "status", {"status": "running", "attempt": 1})  # start
        record_event(session, job_id, "progress", {"progress": 0.5})  # never a webhook
        record_event(session, job_id, "output", {"output": {}})  # filtered out
        session.commit()
    with backend_db.session() as session:
        row = session.get(Job, job_id)
        assert row is not None
        row.status = "succeeded"
        record_event(session, job_id, "completed", {"status": "succeeded"})
        session.commit()
    rows = deliveries(backend_db, job_id)
    assert [(r.event, r.payload["status"]) for r in rows] == [("start", "running"), ("completed", "succeeded")]
    assert all(r.url == "http://hooks.example.test/h" and r.attempts == 0 for r in rows)
    assert "lease_owner" not in rows[0].payload and "request_hash" not in rows[0].payload


def _one_job_rows(db: Database, settings: Any, n: int) -> list[str]:
    """``n`` outbox rows of ONE job, written one after another (created_at increasing)."""
    from datetime import timedelta

    from api.db.tables import Job, utcnow
    from api.services.events import job_snapshot
    from tests.fixtures.harness import add_user

    user = add_user(db, settings)
    start = utcnow()
    ids: list[str] = []
    with db.session() as session:
        job = Job(user_id=user.user.id, model="tiny-sd", kind="image", task="t2i", input={})
        for i in range(n):
            row = WebhookDelivery(job_id=job.id, user_id=user.user.id, event=f"e{i}",
                                  url="http://hooks.example.test/h", payload=job_snapshot(job),
                                  created_at=start + timedelta(milliseconds=i), next_attempt_at=start)
            session.add(row)
            ids.append(row.id)
        session.commit()
    return ids


def test_only_a_jobs_oldest_row_is_claimed(backend_db: Database, backend_settings: Any) -> None:
    """One claim per job: rows after it cannot sit claimed (and expire) while it is being POSTed,
    so no other process takes them meanwhile (no duplicates)."""
    from api.http.webhooks import WebhookDeliverer

    first, second, third = _one_job_rows(backend_db, backend_settings, 3)
    [other] = _outbox_rows(backend_db, backend_settings, 1)  # another job: claimed alongside
    a = WebhookDeliverer(backend_db, backend_settings, _render, owner="replica-a")
    b = WebhookDeliverer(backend_db, backend_settings, _render, owner="replica-b")
    assert sorted(r.id for r in a.claim(10)) == sorted([first, other])
    assert b.claim(10) == []  # the second row waits for the first, even for another process
    assert _row(backend_db, second).attempts == 0 and _row(backend_db, third).claimed_by is None
    a._finish(_row(backend_db, first), "delivered", 200, None)
    assert [r.id for r in b.claim(10)] == [second]


async def test_a_retried_row_holds_back_the_rest_of_its_job(db: Database, settings: Any) -> None:
    """Deliveries of one job arrive in the order written, a retry included."""
    from datetime import timedelta

    from sqlalchemy import update

    from api.db.tables import utcnow
    from api.http.webhooks import WebhookDeliverer

    ids = _one_job_rows(db, settings, 3)
    post = ScriptedPost(500, 200)
    deliverer = WebhookDeliverer(db, settings.model_copy(update={"webhook_backoff_s": 60.0}), _render, post=post)
    assert await deliverer.run_once() == 1  # the first row, answered 500
    assert await deliverer.run_once() == 0  # the others wait behind it
    assert await asyncio.to_thread(deliverer._next_due_in, 600.0) > 30.0  # and do not make it spin
    assert not await asyncio.to_thread(deliverer._busy)
    with db.session() as session:  # the retry comes due
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id == ids[0])
                        .values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    for _ in range(5):  # bounded
        await deliverer.run_once()
    assert [h["webhook-id"] for _, h, _ in post.calls] == [ids[0], ids[0], ids[1], ids[2]]
    assert all(_row(db, i).delivered_at is not None for i in ids)
