"""The Replicate shape, judged by the official ``replicate`` client, unmodified.

The server is a real uvicorn on 127.0.0.1 over TLS (a trustme CA): the client turns only
``https:`` output URLs into file objects, so the storage signs URLs on the server's https base and
the client fetches them as given. Jobs run on the FakeExecutor, which here stores a real PNG.
"""

from __future__ import annotations

import io
import json
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate
import trustme
from PIL import Image
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput
from standardwebhooks.webhooks import Webhook

from api.core.events import ErrorEvent, ExecutorEvent, OutputEvent
from api.core.executor import ExecutionRequest
from api.http.app import create_app
from api.http.compat.replicate import version_id
from api.services.users import NewUser
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fakes.webhook_sink import CountingReceiver
from tests.fixtures.fake_executor import FakeExecutor
from tests.fixtures.harness import LiveServer, add_user, balance, get_job, ledger_rows, wait_for

WAIT_S = 20.0


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class PngExecutor(FakeExecutor):
    """The FakeExecutor, storing a real PNG of the requested size as its output."""

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        async for event in super().run(request):
            if isinstance(event, OutputEvent) and self.storage is not None:
                self.storage.put_bytes(event.key, png_bytes(request.input["width"], request.input["height"]),
                                       "image/png")
            yield event


@dataclass
class TlsServer(LiveServer):
    """The harness's live server, with TLS (the socket is bound before the app exists)."""

    certfile: str = ""
    keyfile: str = ""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def config_kwargs(self) -> dict[str, Any]:
        return {"ssl_certfile": self.certfile, "ssl_keyfile": self.keyfile}


@dataclass
class Rep:
    server: TlsServer
    settings: Settings
    storage: LocalStorage
    executor: PngExecutor
    ssl: ssl.SSLContext
    gates: dict[str, threading.Event] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def state(self) -> Any:
        return self.server.app.state.cineweave

    def user(self, **kwargs: Any) -> NewUser:
        return add_user(self.state.db, self.settings, **kwargs)

    def client(self, key: str, **kwargs: Any) -> replicate.Client:
        # the client wraps its own transport (retries): our CA goes to that transport
        client = replicate.Client(api_token=key, base_url=self.url + "/replicate",
                                  transport=httpx.HTTPTransport(verify=self.ssl), **kwargs)
        client.poll_interval = 0.05
        return client

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url + "/replicate", verify=self.ssl, timeout=30,
                            headers={"Authorization": f"Bearer {key}"})



@pytest.fixture
def make_rep(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Rep]]:
    """``make_rep(failures=..., **settings_overrides)``: the app over TLS, with gates for prompts."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    started: list[Rep] = []

    def factory(failures: dict[str, list[ErrorEvent]] | None = None, **overrides: Any) -> Rep:
        server = TlsServer(app=None, certfile=str(certfile), keyfile=str(keyfile))
        base = f"https://127.0.0.1:{server.port}"
        updates = {"public_url": base, "max_active_jobs": 20, "rate_limit_per_minute": 100, **overrides}
        s = settings.model_copy(update=updates)
        storage = LocalStorage(s.data_dir / "storage", signing_secret="test-secret", base_url=base)
        gates = {"held": threading.Event(), "held2": threading.Event()}
        executor = PngExecutor(storage=storage, gates=gates, failures=dict(failures or {}))
        server.app = create_app(s, executor, storage=storage, run_maintenance=False)
        server.start()
        rep = Rep(server, s, storage, executor, context, gates)
        started.append(rep)
        return rep

    yield factory
    for rep in reversed(started):
        for gate in rep.gates.values():
            gate.set()
        rep.server.stop()


def output_key(rep: Rep, job_id: str) -> str:
    job = get_job(rep.state.db, job_id)
    assert len(job.outputs) == 1, job.outputs
    return str(job.outputs[0]["key"])


# run, versions, credits ------------------------------------------------------------------------
def test_run_returns_file_outputs_with_the_png_our_storage_holds(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep()
    user = rep.user(credits=100)
    client = rep.client(user.api_key)
    out = client.run("cineweave/tiny-sd", input={"prompt": "a red cat", "width": 64, "height": 48})
    assert isinstance(out, FileOutput)
    data = out.read()
    page = client.predictions.list()
    assert len(page.results) == 1
    prediction = page.results[0]
    assert prediction.status == "succeeded" and prediction.model == "cineweave/tiny-sd"
    assert data == rep.storage.get_bytes(output_key(rep, prediction.id))
    assert Image.open(io.BytesIO(data)).size == (64, 48)
    assert prediction.metrics is not None and prediction.metrics["predict_time"] is not None
    assert prediction.progress is not None and prediction.progress.current == prediction.progress.total == 3
    assert get_job(rep.state.db, prediction.id).api_shape == "replicate"


def test_versions_and_model_names_all_reach_the_model(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep()
    user = rep.user(credits=100)
    client = rep.client(user.api_key)
    model = client.models.get("cineweave/tiny-sd")
    spec = rep.state.catalog.get("tiny-sd")
    assert model.latest_version is not None and model.latest_version.id == version_id(spec)
    assert {m.name for m in client.models.list()} == {s.id for s in rep.state.catalog.enabled()}
    vid = model.latest_version.id
    by_id = client.predictions.create(version=vid, input={"prompt": "by id"})
    by_ref = client.predictions.create(version=f"cineweave/tiny-sd:{vid}", input={"prompt": "by ref"})
    by_name = client.predictions.create(version="cineweave/tiny-sd", input={"prompt": "by name"})
    by_deployment = client.predictions.create(deployment="cineweave/tiny-sd", input={"prompt": "deployed"})
    for p in (by_id, by_ref, by_name, by_deployment):
        p.wait()
        assert p.status == "succeeded" and p.version == vid
    # run with owner/name:version fetches the version (GET .../versions/{id}) and runs it
    assert isinstance(client.run(f"cineweave/tiny-sd:{vid}", input={"prompt": "pinned"}), FileOutput)
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(version="cineweave/tiny-sd:" + "0" * 64, input={"prompt": "old"})
    assert info.value.status == 422 and "is not served" in (info.value.detail or "")


def test_credits_move_exactly_as_for_a_native_job(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep()
    native_user, rep_user = rep.user(credits=100), rep.user(credits=100)
    body = {"prompt": "same", "width": 128, "height": 128, "steps": 10}
    with httpx.Client(base_url=rep.url, verify=rep.ssl, timeout=30,
                      headers={"Authorization": f"Bearer {native_user.api_key}"}) as http:
        native = http.post("/v1/jobs", json={"model": "tiny-sd", "input": body}).json()
    rep.client(rep_user.api_key).run("cineweave/tiny-sd", input=body)
    wait_for(lambda: get_job(rep.state.db, native["id"]).status == "succeeded", "the native job")
    native_ledger = [(r.kind, r.amount) for r in ledger_rows(rep.state.db, native_user.user.id)]
    rep_ledger = [(r.kind, r.amount) for r in ledger_rows(rep.state.db, rep_user.user.id)]
    assert native_ledger == rep_ledger
    assert [k for k, _ in rep_ledger] == ["grant", "reserve", "capture"]
    assert balance(rep.state.db, rep_user.user.id) == balance(rep.state.db, native_user.user.id)


# create, get, wait, cancel, list ---------------------------------------------------------------
def test_create_get_cancel_and_wait(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep()
    user = rep.user(credits=100)
    client = rep.client(user.api_key)
    held = client.predictions.create(model="cineweave/tiny-sd", input={"prompt": "held"})
    assert held.status == "starting" and held.urls is not None
    assert held.urls["get"] == f"{rep.url}/replicate/v1/predictions/{held.id}"
    wait_for(lambda: client.predictions.get(held.id).status == "processing", "the job to start")
    held.cancel()
    held.wait()
    assert held.status == "canceled"
    job = get_job(rep.state.db, held.id)
    assert job.credits_refunded == job.credits_reserved and job.credits_charged == 0
    assert balance(rep.state.db, user.user.id).available == 100

    quick = client.predictions.create(model="cineweave/tiny-sd", input={"prompt": "quick"})
    quick.wait()
    assert quick.status == "succeeded"
    assert isinstance(quick.output, str) and quick.output.startswith(rep.url + "/v1/files/")
    with pytest.raises(ReplicateError) as info:
        client.predictions.get("job_doesnotexist")
    assert info.value.status == 404


def test_list_pages_forward_and_back(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep()
    user, other = rep.user(credits=100), rep.user(credits=100)
    client = rep.client(user.api_key)
    made = [client.predictions.create(model="cineweave/tiny-sd", input={"prompt": f"p{i}"}).id for i in range(5)]
    rep.client(other.api_key).predictions.create(model="cineweave/tiny-sd", input={"prompt": "not yours"})
    # the client GETs whatever URL it is given as a cursor: a first page of two
    first = client.predictions.list(cursor=f"{rep.url}/replicate/v1/predictions?limit=2")
    assert first.previous is None and first.next is not None
    second = client.predictions.list(first.next)
    third = client.predictions.list(second.next)
    assert third.next is None
    seen = [p.id for page in (first, second, third) for p in page]
    assert seen == list(reversed(made))  # newest first, each once, only the caller's
    assert second.previous is not None
    back = client.predictions.list(second.previous)
    assert [p.id for p in back] == [p.id for p in first] and back.previous is None
    with pytest.raises(ReplicateError) as info:
        client.predictions.list(f"{rep.url}/replicate/v1/predictions?cursor=garbage")
    assert info.value.status == 422


# Prefer: wait --------------------------------------------------------------------------------
def test_prefer_wait_holds_until_done_or_n_seconds(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep()
    user = rep.user(credits=100)
    client = rep.client(user.api_key)
    # (predictions.create(model=...) drops ``wait`` in the client; version= and models.predictions keep it)
    done = client.predictions.create(version="cineweave/tiny-sd", input={"prompt": "quick"}, wait=True)
    assert done.status == "succeeded" and isinstance(done.output, str)  # in the create answer itself

    # held until the job ends: its gate is opened only once the job runs, while the request is held
    answered = threading.Event()
    answered_at_opening: list[bool] = []

    def open_when_running() -> None:
        wait_for(lambda: any(r.input.get("prompt") == "held2" for r in rep.executor.runs), "the job to run")
        answered_at_opening.append(answered.is_set())
        rep.gates["held2"].set()

    opener = threading.Thread(target=open_when_running, name="opener", daemon=True)
    opener.start()
    waited = client.models.predictions.create(model="cineweave/tiny-sd", input={"prompt": "held2"}, wait=60)
    answered.set()
    opener.join(timeout=WAIT_S)
    assert answered_at_opening == [False]  # the gate opened before the answer came back
    assert waited.status == "succeeded" and isinstance(waited.output, str)  # terminal in the create answer

    # ... or until N seconds: the answer comes back while the job is still held by its shut gate
    held = client.models.predictions.create(model="cineweave/tiny-sd", input={"prompt": "held"}, wait=1)
    assert not rep.gates["held"].is_set()
    assert held.status == "starting"  # not done yet: the client polls on (as on Replicate)
    assert client.predictions.get(held.id).status == "processing"
    rep.gates["held"].set()
    held.wait()
    assert held.status == "succeeded"
    with rep.http(user.api_key) as http:
        bad = http.post("/v1/models/cineweave/tiny-sd/predictions", json={"input": {"prompt": "x"}},
                        headers={"Prefer": "wait=61"})
    assert bad.status_code == 422 and "Prefer" in bad.json()["detail"]


# webhooks ----------------------------------------------------------------------------------------
def test_a_webhook_is_the_prediction_signed_as_our_webhooks_are(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep()
    user = rep.user(credits=100)
    receiver = CountingReceiver().start()
    try:
        client = rep.client(user.api_key)
        p = client.predictions.create(model="cineweave/tiny-sd", input={"prompt": "hooked"},
                                      webhook=receiver.url, webhook_events_filter=["start", "completed"])
        p.wait()
        wait_for(lambda: len(receiver.received) >= 2, "two webhooks")
        bodies = []
        for headers, body in receiver.received:
            bodies.append(Webhook(user.webhook_secret).verify(body, headers))  # raises if the signature is wrong
        assert [b["status"] for b in bodies] == ["processing", "succeeded"]
        final = bodies[-1]
        assert final["id"] == p.id and final["model"] == "cineweave/tiny-sd"
        assert final["urls"]["get"] == f"{rep.url}/replicate/v1/predictions/{p.id}"
        with httpx.Client(verify=rep.ssl, timeout=30) as http:
            fetched = http.get(final["output"])
        assert fetched.status_code == 200 and fetched.content == rep.storage.get_bytes(output_key(rep, p.id))
        # the legacy webhook_completed: the completion only
        legacy = client.predictions.create(version="cineweave/tiny-sd", input={"prompt": "legacy"},
                                           webhook_completed=receiver.url)
        legacy.wait()
        wait_for(lambda: len(receiver.received) >= 3, "the legacy webhook")
        late = [json.loads(body) for _, body in receiver.received[2:]]
        assert [(b["id"], b["status"]) for b in late] == [(legacy.id, "succeeded")]
        tampered = dict(receiver.received[-1][0])
        with pytest.raises(Exception):  # noqa: B017 - the library's verification error
            Webhook(user.webhook_secret).verify(receiver.received[-1][1] + b" ", tampered)
    finally:
        receiver.stop()


# Cancel-After --------------------------------------------------------------------------------------
def test_cancel_after_aborts_a_queued_prediction_and_refunds_it(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep(runner_concurrency=1)
    user = rep.user(credits=100)
    client = rep.client(user.api_key)
    busy = client.predictions.create(model="cineweave/tiny-sd", input={"prompt": "held"})
    wait_for(lambda: client.predictions.get(busy.id).status == "processing", "the runner to be busy")
    deadline_client = rep.client(user.api_key, headers={"Cancel-After": "1s"})
    late = deadline_client.predictions.create(model="cineweave/tiny-sd", input={"prompt": "too late"})
    assert late.status == "starting"
    with rep.http(user.api_key) as http:
        # aborted is a status the client's model does not list: read it over plain HTTP
        wait_for(lambda: http.get(f"/v1/predictions/{late.id}").json()["status"] == "aborted", "the abort")
        body = http.get(f"/v1/predictions/{late.id}").json()
    assert body["error"] and "Cancel-After" in body["error"] and body["output"] is None
    job = get_job(rep.state.db, late.id)
    assert job.status == "canceled" and job.error_code == "start_deadline_exceeded"
    assert [(r.kind, r.amount) for r in ledger_rows(rep.state.db, job_id=late.id)] == [
        ("reserve", job.credits_reserved), ("refund", job.credits_reserved)]
    assert "too late" not in [r.input.get("prompt") for r in rep.executor.runs]  # never ran
    held_job = get_job(rep.state.db, busy.id)
    assert balance(rep.state.db, user.user.id).available == 100 - held_job.credits_reserved
    rep.gates["held"].set()
    busy.wait()
    assert busy.status == "succeeded"
    with pytest.raises(ReplicateError) as info:
        rep.client(user.api_key, headers={"Cancel-After": "soon"}).predictions.create(
            model="cineweave/tiny-sd", input={"prompt": "x"})
    assert info.value.status == 422 and "Cancel-After" in (info.value.detail or "")


def test_cancel_after_cancels_a_running_prediction(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep()
    user = rep.user(credits=100)
    client = rep.client(user.api_key, headers={"Cancel-After": "1h"})
    p = client.predictions.create(model="cineweave/tiny-sd", input={"prompt": "held"})
    # held by its gate: running, and far from its deadline
    wait_for(lambda: client.predictions.get(p.id).status == "processing", "the job to start")
    deadline = get_job(rep.state.db, p.id).start_deadline_at
    assert deadline is not None
    # the server's watcher, one round as if the deadline had come (no waiting for a real clock)
    watcher = rep.state.extras["deadlines"]
    assert watcher.enforce_due(now=deadline - timedelta(seconds=1)) == 0  # not yet due: left running
    assert watcher.enforce_due(now=deadline + timedelta(seconds=1)) == 1
    p.wait()  # the gate is still shut: only the deadline ended it
    assert p.status == "canceled"
    assert not rep.gates["held"].is_set()
    job = get_job(rep.state.db, p.id)
    assert job.started_at is not None and job.error_code is None
    assert job.credits_refunded == job.credits_reserved


# streaming -------------------------------------------------------------------------------------
def test_stream_gives_logs_output_and_done(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep()
    user = rep.user(credits=100)
    events = list(rep.client(user.api_key).stream("cineweave/tiny-sd", input={"prompt": "streamed"}))
    kinds = [e.event.value for e in events]
    assert kinds[-1] == "done" and "output" in kinds and "logs" in kinds
    output = next(e for e in events if e.event.value == "output")
    assert isinstance(output.data, FileOutput)
    assert Image.open(io.BytesIO(output.data.read())).format == "PNG"
    assert any("3/3" in e.data for e in events if e.event.value == "logs")


# errors through the client ----------------------------------------------------------------------
def test_errors_are_the_clients_own_exceptions_with_our_message(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep(failures={"boom": [ErrorEvent("out_of_memory", "CUDA OOM at /secret/path", False)]})
    poor, user = rep.user(credits=0), rep.user(credits=100)
    with pytest.raises(ReplicateError) as info:
        rep.client(poor.api_key).run("cineweave/tiny-sd", input={"prompt": "a"})
    assert info.value.status == 402 and info.value.title == "Insufficient credit"
    assert "credits" in (info.value.detail or "")
    client = rep.client(user.api_key)
    with pytest.raises(ReplicateError) as info:
        client.run("cineweave/no-such-model", input={"prompt": "a"})
    assert info.value.status == 404 and info.value.detail == "model cineweave/no-such-model not found"
    with pytest.raises(ReplicateError) as info:
        client.run("cineweave/tiny-sd", input={"prompt": "a", "width": 65})
    assert info.value.status == 422 and info.value.detail == "width must be a multiple of 8"
    with pytest.raises(ModelError) as failed:
        client.run("cineweave/tiny-sd", input={"prompt": "boom"})
    assert str(failed.value) == "the model ran out of GPU memory; try a smaller size, fewer frames or fewer steps"
    assert balance(rep.state.db, poor.user.id).available == 0
    with pytest.raises(ReplicateError) as info:
        rep.client("cw_not_a_key").predictions.list()
    assert info.value.status == 401 and info.value.title == "Unauthenticated"


def test_a_rate_limit_is_a_429_with_retry_after(make_rep: Callable[..., Rep]) -> None:
    rep = make_rep(rate_limit_per_minute=1)
    user = rep.user(credits=100)
    client = rep.client(user.api_key)
    client.predictions.create(model="cineweave/tiny-sd", input={"prompt": "one"})
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(model="cineweave/tiny-sd", input={"prompt": "two"})
    assert info.value.status == 429 and "per minute" in (info.value.detail or "")
    with rep.http(user.api_key) as http:
        answer = http.post("/v1/models/cineweave/tiny-sd/predictions", json={"input": {"prompt": "three"}})
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) > 0
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert json.loads(answer.text)["status"] == 429


def test_every_route_declares_its_response_model() -> None:
    from api.http.compat.replicate import router

    for route in router.routes:
        if getattr(route, "path", "").endswith("/stream"):
            continue  # SSE
        assert getattr(route, "response_model", None) is not None, route.path  # type: ignore[attr-defined]

