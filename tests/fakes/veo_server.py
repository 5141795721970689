"""A fake Gemini API for Veo (``predictLongRunning`` + operations + file download) on 127.0.0.1.

Operations finish ``run_s`` after they start. The video URI points at this server's
``/v1beta/files/{id}:download?alt=media`` (needs the key), which redirects to a second server — a
different origin, like Google's storage — that serves the real tiny MP4 and records whether the
API key reached it (it must not). Knobs (``fake.behavior``): latency, N throttled answers (429
``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` delay), N server errors, an outage, a safety block
(``raiMediaFilteredCount``), an operation error, a never-finishing operation, outputs that expire,
and whether ``:cancel`` is supported. Like the real API it refuses ``seed`` and ``generateAudio``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.fakes.media import tiny_mp4
from tests.fakes.server import ServerThread

PARAMETERS = {"aspectRatio", "durationSeconds", "resolution", "negativePrompt", "personGeneration", "sampleCount"}
_CREATE = re.compile(r"^models/(?P<model>[^/:]+):predictLongRunning$")
_OPERATION = re.compile(r"^(?P<name>models/[^/:]+/operations/[^/:]+)(?P<cancel>:cancel)?$")
_FILE = re.compile(r"^files/(?P<id>[^/:]+):download$")


@dataclass
class VeoBehavior:
    latency_s: float = 0.0
    run_s: float = 0.2
    throttle: int = 0
    retry_delay: str = "0.05s"
    server_errors: int = 0
    outage: bool = False
    safety_block: bool = False
    fail_with: tuple[int, str] | None = None
    hang: bool = False
    output_ttl_s: float | None = None
    cancel_supported: bool = True


@dataclass
class FakeOperation:
    name: str
    model: str
    body: dict[str, Any]
    created: float = field(default_factory=time.monotonic)
    canceled: bool = False
    file_id: str = field(default_factory=lambda: secrets.token_hex(8))
    done_at: float | None = None


def _error(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": status, "message": message, "status": code}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status)


class FakeVeo:
    def __init__(self, behavior: VeoBehavior | None = None, api_key: str | None = None,
                 mp4: bytes | None = None) -> None:
        self.behavior = behavior or VeoBehavior()
        self.api_key = api_key or "AIza" + secrets.token_urlsafe(26)
        self.mp4 = mp4 if mp4 is not None else tiny_mp4()
        self.operations: dict[str, FakeOperation] = {}
        self.requests: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []
        self.cancels: list[str] = []
        self.blob_requests: list[dict[str, Any]] = []
        self.server = ServerThread(Starlette(routes=[
            Route("/v1beta/{rest:path}", self._api, methods=["GET", "POST"])]), name="fake-gemini")
        self.storage = ServerThread(Starlette(routes=[
            Route("/blob/{id}", self._blob, methods=["GET"])]), name="fake-gemini-storage")

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> FakeVeo:
        self.server.start()
        try:
            self.storage.start()
        except BaseException:
            self.server.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.storage.stop()
        self.server.stop()

    def api_calls(self, method: str, contains: str = "") -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and contains in r["path"]]

    # state ---------------------------------------------------------------------------------
    def _done(self, op: FakeOperation) -> bool:
        if op.canceled:
            return True
        if self.behavior.hang:
            return False
        if time.monotonic() - op.created >= self.behavior.run_s:
            if op.done_at is None:
                op.done_at = time.monotonic()
            return True
        return False

    def _expired(self, op: FakeOperation) -> bool:
        ttl = self.behavior.output_ttl_s
        return ttl is not None and op.done_at is not None and time.monotonic() > op.done_at + ttl

    def as_json(self, op: FakeOperation) -> dict[str, Any]:
        if not self._done(op):
            return {"name": op.name, "done": False}
        if op.canceled:
            return {"name": op.name, "done": True, "error": {"code": 1, "message": "CANCELLED"}}
        b = self.behavior
        if b.fail_with:
            return {"name": op.name, "done": True, "error": {"code": b.fail_with[0], "message": b.fail_with[1]}}
        response: dict[str, Any] = {"@type": "type.googleapis.com/google.ai.generativelanguage.v1beta."
                                             "PredictLongRunningResponse"}
        if b.safety_block:
            response["generateVideoResponse"] = {
                "raiMediaFilteredCount": 1,
                "raiMediaFilteredReasons": ["Video generation was blocked by a safety filter (people)."]}
        else:
            uri = f"{self.url}/v1beta/files/{op.file_id}:download?alt=media"
            response["generateVideoResponse"] = {"generatedSamples": [{"video": {"uri": uri}}]}
        return {"name": op.name, "done": True, "response": response}

    # validation ----------------------------------------------------------------------------
    @staticmethod
    def _check(body: dict[str, Any]) -> str | None:
        instances = body.get("instances")
        if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
            return "instances must hold one instance"
        instance = instances[0]
        if not isinstance(instance.get("prompt"), str) or not instance["prompt"]:
            return "instances[0].prompt is required"
        unknown = set(instance) - {"prompt", "image", "lastFrame"}
        if unknown:
            return f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r}"
        if "image" in instance:
            image = instance["image"]
            if not isinstance(image, dict) or not image.get("mimeType", "").startswith("image/"):
                return "instances[0].image needs bytesBase64Encoded and an image mimeType"
            try:
                base64.b64decode(image.get("bytesBase64Encoded", ""), validate=True)
            except (binascii.Error, ValueError):
                return "instances[0].image.bytesBase64Encoded is not base64"
        params = body.get("parameters") or {}
        for refused in ("seed", "generateAudio"):
            if refused in params:
                return f"`{refused}` isn't supported by this model. Please remove it and try again."
        unknown = set(params) - PARAMETERS
        if unknown:
            return f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r}"
        duration = params.get("durationSeconds", 8)
        if not isinstance(duration, int) or duration not in (4, 6, 8):
            return f"durationSeconds must be 4, 6 or 8, got {duration!r}"
        if params.get("resolution", "720p") not in ("720p", "1080p"):
            return "resolution must be 720p or 1080p"
        if params.get("resolution") == "1080p" and duration != 8:
            return "1080p needs durationSeconds 8"
        if params.get("aspectRatio", "16:9") not in ("16:9", "9:16"):
            return "aspectRatio must be 16:9 or 9:16"
        return None

    # routes --------------------------------------------------------------------------------
    async def _api(self, request: Request) -> Response:
        b = self.behavior
        rest = request.path_params["rest"]
        record = {"method": request.method, "path": rest, "time": time.monotonic(),
                  "authorized": request.headers.get("x-goog-api-key") == self.api_key,
                  "query_has_key": "key" in request.query_params}
        self.requests.append(record)
        if b.latency_s:
            await asyncio.sleep(b.latency_s)
        if b.outage:
            record["status"] = 503
            return _error(503, "UNAVAILABLE", "The service is currently unavailable.")
        if b.throttle > 0:
            b.throttle -= 1
            record["status"] = 429
            return _error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).",
                          [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": b.retry_delay}])
        if b.server_errors > 0:
            b.server_errors -= 1
            record["status"] = 500
            return _error(500, "INTERNAL", "An internal error has occurred.")
        if not record["authorized"]:
            record["status"] = 400
            return _error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
        record["status"] = 200
        if request.method == "POST" and (match := _CREATE.match(rest)):
            return await self._create(request, match.group("model"))
        if match := _OPERATION.match(rest):
            op = self.operations.get(match.group("name"))
            if op is None:
                return _error(404, "NOT_FOUND", "Operation not found.")
            if match.group("cancel"):
                if request.method != "POST":
                    return _error(405, "METHOD_NOT_ALLOWED", "use POST")
                self.cancels.append(op.name)
                if not b.cancel_supported:
                    return _error(501, "UNIMPLEMENTED", "Operation cancellation is not supported.")
                if not self._done(op):
                    op.canceled = True
                return JSONResponse({})
            return JSONResponse(self.as_json(op))
        if request.method == "GET" and (match := _FILE.match(rest)):
            op = next((o for o in self.operations.values() if o.file_id == match.group("id")), None)
            if op is None or not self._done(op) or op.canceled or self._expired(op):
                return _error(404, "NOT_FOUND", "File not found.")
            return RedirectResponse(f"{self.storage.url}/blob/{op.file_id}?sig={secrets.token_hex(8)}",
                                    status_code=302)
        return _error(404, "NOT_FOUND", f"no route for {request.method} /v1beta/{rest}")

    async def _create(self, request: Request, model: str) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        problem = self._check(body)
        if problem:
            return _error(400, "INVALID_ARGUMENT", problem)
        self.created.append(body)
        op = FakeOperation(name=f"models/{model}/operations/{secrets.token_hex(6)}", model=model, body=body)
        self.operations[op.name] = op
        return JSONResponse({"name": op.name})

    async def _blob(self, request: Request) -> Response:
        file_id = request.path_params["id"]
        self.blob_requests.append({"id": file_id, "api_key_sent": "x-goog-api-key" in request.headers})
        op = next((o for o in self.operations.values() if o.file_id == file_id), None)
        if op is None or self._expired(op):
            return Response("gone", status_code=404)
        return Response(self.mp4, media_type="video/mp4")
