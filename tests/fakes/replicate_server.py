"""A fake Replicate HTTP API v1 on 127.0.0.1, following the public contract.

Predictions move ``starting → processing → succeeded | failed`` on timers; the output is a real
tiny MP4 served from ``/files/…`` (no auth, like replicate.delivery). Knobs (``fake.behavior``,
changeable while it runs): latency, N throttled answers (429 + ``Retry-After``), N server errors,
a full outage, a safety block (E005), a failure, a prediction that never finishes, outputs that
expire (404 + ``data_removed``), webhooks (signed; duplicated; signed with a wrong secret; stale).
Everything the adapter does is recorded (``requests``, ``created``, ``cancels``, ``webhooks``,
``file_requests``) for assertions.

    with FakeReplicate() as fake:
        settings = Settings(replicate_base_url=fake.base_url, replicate_api_token=fake.token, ...)
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.media import tiny_mp4
from tests.fakes.server import ServerThread

SAFETY_ERROR = "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"
VEO_FIELDS = {"prompt", "aspect_ratio", "duration", "resolution", "image", "last_frame", "negative_prompt", "seed",
              "generate_audio"}


@dataclass
class ReplicateBehavior:
    latency_s: float = 0.0
    start_s: float = 0.02
    run_s: float = 0.2
    throttle: int = 0
    """The next N API answers are 429 with ``Retry-After: retry_after``."""
    retry_after: str = "1"
    server_errors: int = 0
    """The next N API answers are 503."""
    outage: bool = False
    safety_block: bool = False
    fail_with: str | None = None
    hang: bool = False
    output_ttl_s: float | None = None
    webhook_copies: int = 1
    webhook_secret_override: str | None = None
    webhook_timestamp_offset_s: float = 0.0
    max_prefer_wait_s: float = 60.0


@dataclass
class FakePrediction:
    id: str
    model: str
    version: str | None
    input: dict[str, Any]
    webhook: str | None
    events_filter: list[str]
    created_at: float = field(default_factory=time.time)
    status: str = "starting"
    logs: str = ""
    output: Any = None
    error: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def _problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"type": "https://replicate.com/docs/reference/http#errors", "title": title,
                         "status": status, "detail": detail}, status_code=status, headers=headers,
                        media_type="application/problem+json")


class FakeReplicate:
    def __init__(self, behavior: ReplicateBehavior | None = None, token: str | None = None,
                 mp4: bytes | None = None) -> None:
        self.behavior = behavior or ReplicateBehavior()
        self.token = token or "r8_" + secrets.token_urlsafe(24)
        self.webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        self.mp4 = mp4 if mp4 is not None else tiny_mp4()
        self.predictions: dict[str, FakePrediction] = {}
        self.requests: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []
        self.cancels: list[str] = []
        self.webhooks: list[dict[str, Any]] = []
        self.file_requests: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        app = Starlette(routes=[
            Route("/v1/models/{owner}/{name}/predictions", self._create_for_model, methods=["POST"]),
            Route("/v1/predictions", self._create_for_version, methods=["POST"]),
            Route("/v1/predictions/{id}", self._get, methods=["GET"]),
            Route("/v1/predictions/{id}/cancel", self._cancel, methods=["POST"]),
            Route("/v1/webhooks/default/secret", self._secret, methods=["GET"]),
            Route("/files/{id}/{filename}", self._file, methods=["GET"]),
        ])
        self.server = ServerThread(app, name="fake-replicate")

    # lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/v1"

    def __enter__(self) -> FakeReplicate:
        self.server.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.stop()

    def api_calls(self, method: str, path_prefix: str = "") -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and r["path"].startswith(path_prefix)]

    # helpers -------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _expired(self, p: FakePrediction) -> bool:
        ttl = self.behavior.output_ttl_s
        return ttl is not None and p.completed_at is not None and time.time() > p.completed_at + ttl

    def as_json(self, p: FakePrediction) -> dict[str, Any]:
        removed = self._expired(p)
        return {
            "id": p.id, "model": p.model, "version": p.version or "hidden", "input": p.input, "logs": p.logs,
            "output": None if removed else p.output, "error": p.error, "status": p.status,
            "data_removed": removed, "created_at": _iso(p.created_at), "started_at": _iso(p.started_at),
            "completed_at": _iso(p.completed_at),
            "metrics": {"predict_time": round(p.completed_at - p.started_at, 3)}
            if p.completed_at and p.started_at else {},
            "urls": {"get": f"{self.base_url}/predictions/{p.id}",
                     "cancel": f"{self.base_url}/predictions/{p.id}/cancel",
                     "stream": f"{self.url}/stream/{p.id}"},
        }

    async def _gate(self, request: Request) -> Response | None:
        """Latency, auth and the failure knobs, applied to every API call."""
        b = self.behavior
        record = {"method": request.method, "path": request.url.path, "time": time.monotonic(),
                  "authorized": request.headers.get("authorization") == f"Bearer {self.token}",
                  "prefer": request.headers.get("prefer")}
        self.requests.append(record)
        if b.latency_s:
            await asyncio.sleep(b.latency_s)
        if b.outage:
            record["status"] = 503
            return _problem(503, "Service Unavailable", "Replicate is temporarily unavailable")
        if b.throttle > 0:
            b.throttle -= 1
            record["status"] = 429
            return _problem(429, "Too Many Requests", "Request was throttled. Your rate limit resets in ~1s.",
                            headers={"Retry-After": b.retry_after})
        if b.server_errors > 0:
            b.server_errors -= 1
            record["status"] = 503
            return _problem(503, "Service Unavailable", "upstream connect error")
        if not record["authorized"]:
            record["status"] = 401
            return _problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        record["status"] = 200
        return None

    # webhooks ------------------------------------------------------------------------------
    def sign(self, webhook_id: str, timestamp: str, body: bytes, secret: str | None = None) -> str:
        stamp = datetime.fromtimestamp(int(timestamp), UTC)
        return Webhook(secret or self.webhook_secret).sign(webhook_id, stamp, body.decode())

    def _notify(self, p: FakePrediction, event: str) -> None:
        if p.webhook and event in p.events_filter:
            body = json.dumps(self.as_json(p)).encode()
            self._spawn(self._deliver(p.webhook, event, "msg_" + secrets.token_hex(12), body, p.status))

    async def _deliver(self, url: str, event: str, webhook_id: str, body: bytes, status: str) -> None:
        b = self.behavior
        timestamp = str(int(time.time() + b.webhook_timestamp_offset_s))
        headers = {"content-type": "application/json", "webhook-id": webhook_id, "webhook-timestamp": timestamp,
                   "webhook-signature": self.sign(webhook_id, timestamp, body, b.webhook_secret_override)}
        async with httpx.AsyncClient(timeout=5.0) as client:
            for copy in range(max(1, b.webhook_copies)):
                try:
                    answer = (await client.post(url, content=body, headers=headers)).status_code
                except httpx.HTTPError as exc:
                    answer = type(exc).__name__
                self.webhooks.append({"event": event, "webhook_id": webhook_id, "copy": copy,
                                      "prediction_status": status, "answer": answer})

    # the prediction lifecycle --------------------------------------------------------------
    async def _drive(self, p: FakePrediction) -> None:
        b = self.behavior
        await asyncio.sleep(b.start_s)
        if p.status != "starting":
            return
        p.status, p.started_at, p.logs = "processing", time.time(), "Loading model\n"
        self._notify(p, "logs")
        if b.hang:
            return
        await asyncio.sleep(b.run_s / 2)
        if p.status != "processing":
            return
        p.logs += " 50%|█████     | 2/4 [00:01<00:01,  1.00it/s]\n"
        self._notify(p, "logs")
        await asyncio.sleep(b.run_s / 2)
        if p.status != "processing":
            return
        p.completed_at = time.time()
        if b.safety_block:
            p.status, p.error = "failed", SAFETY_ERROR
        elif b.fail_with:
            p.status, p.error = "failed", b.fail_with
        else:
            p.logs += "100%|██████████| 4/4 [00:02<00:00,  1.00it/s]\n"
            p.status, p.output = "succeeded", f"{self.url}/files/{p.id}/output.mp4"
            self._notify(p, "output")
        p.finished.set()
        self._notify(p, "completed")

    def _check_veo_input(self, data: dict[str, Any]) -> str | None:
        unknown = set(data) - VEO_FIELDS
        if unknown:
            return f"unexpected input fields: {sorted(unknown)}"
        if not isinstance(data.get("prompt"), str) or not data["prompt"]:
            return "prompt is required"
        duration = data.get("duration", 8)
        if not isinstance(duration, int) or isinstance(duration, bool) or duration not in (4, 6, 8):
            return f"duration must be one of 4, 6, 8 (an integer), got {duration!r}"
        if data.get("resolution", "720p") not in ("720p", "1080p"):
            return "resolution must be 720p or 1080p"
        if data.get("aspect_ratio", "16:9") not in ("16:9", "9:16"):
            return "aspect_ratio must be 16:9 or 9:16"
        if "seed" in data and not isinstance(data["seed"], int):
            return "seed must be an integer"
        return None

    async def _start(self, request: Request, model: str, version: str | None) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _problem(400, "Bad Request", "the body is not JSON")
        data = body.get("input")
        if not isinstance(data, dict):
            return _problem(422, "Unprocessable Entity", "input is required")
        if model.startswith("google/veo"):
            problem = self._check_veo_input(data)
            if problem:
                return _problem(422, "Input validation failed", problem)
        self.created.append(body)
        p = FakePrediction(id=secrets.token_hex(10), model=model, version=version, input=data,
                           webhook=body.get("webhook"),
                           events_filter=body.get("webhook_events_filter") or ["start", "output", "logs", "completed"])
        self.predictions[p.id] = p
        self._spawn(self._drive(p))
        self._notify(p, "start")
        prefer = request.headers.get("prefer", "")
        if prefer.startswith("wait"):
            _, _, seconds = prefer.partition("=")
            hold = min(float(seconds) if seconds else 60.0, self.behavior.max_prefer_wait_s)
            try:
                await asyncio.wait_for(p.finished.wait(), hold)
            except TimeoutError:
                pass
        return JSONResponse(self.as_json(p), status_code=201)

    # routes --------------------------------------------------------------------------------
    async def _create_for_model(self, request: Request) -> Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        return await self._start(request, f"{request.path_params['owner']}/{request.path_params['name']}", None)

    async def _create_for_version(self, request: Request) -> Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        try:
            version = str(json.loads(await request.body()).get("version") or "")
        except ValueError:
            return _problem(400, "Bad Request", "the body is not JSON")
        if not version:
            return _problem(422, "Unprocessable Entity", "version is required")
        model, _, ver = version.rpartition(":")
        return await self._start(request, model or "owner/model", ver or version)

    async def _get(self, request: Request) -> Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        p = self.predictions.get(request.path_params["id"])
        if p is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        return JSONResponse(self.as_json(p))

    async def _cancel(self, request: Request) -> Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        p = self.predictions.get(request.path_params["id"])
        if p is None:
            return _problem(404, "Not found", "The requested resource could not be found.")
        self.cancels.append(p.id)
        if p.status in ("starting", "processing"):
            p.status, p.completed_at = "canceled", time.time()
            p.finished.set()
            self._notify(p, "completed")
        return JSONResponse(self.as_json(p))

    async def _secret(self, request: Request) -> Response:
        if (gated := await self._gate(request)) is not None:
            return gated
        return JSONResponse({"key": self.webhook_secret})

    async def _file(self, request: Request) -> Response:
        p = self.predictions.get(request.path_params["id"])
        record = {"path": request.url.path, "authorization": request.headers.get("authorization")}
        self.file_requests.append(record)
        if p is None or p.status != "succeeded" or self._expired(p):
            record["status"] = 404
            return Response("not found", status_code=404)
        record["status"] = 200
        return Response(self.mp4, media_type="video/mp4")
