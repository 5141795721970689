"""Replicate's HTTP API v1 under ``/replicate/v1``: predictions and models over the job store.

A prediction is a native job (``api_shape = "replicate"``): submitted, priced, limited, settled
and authorized by the same services; these routes only translate the shape. The official client
(``replicate.Client(api_token=KEY, base_url=URL + "/replicate")``) is the judge of the contract:

- models are ``{replicate_owner}/{id}`` for every enabled catalog model; a version id is a hash
  of the spec's serving-relevant content (a checkpoint swap gives a new one), and
  ``POST /v1/predictions`` takes ``owner/name``, ``owner/name:version`` or a bare version id;
- statuses: queued → ``starting``, running → ``processing``, then ``succeeded``, ``failed``,
  ``canceled``; a job canceled by its ``Cancel-After`` deadline before it started is ``aborted``;
- ``Prefer: wait[=N]`` holds the create request until the job ends or N seconds (60 by default,
  1–60). As Replicate does, an answer given before the end says ``starting`` (the client's
  ``run()`` polls only then; it takes any other status for the final one);
- ``output`` is one signed storage URL (a list when a job made several), fetched by the client as
  given; ``logs`` are the job's log lines plus tqdm-style progress lines (``prediction.progress``
  parses them); ``urls.stream`` serves SSE ``output``/``logs``/``error``/``done`` events.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from api.core.aio import wait_event
from api.core.errors import InvalidInput, NotFound
from api.core.jobs import TERMINAL, JobStatus
from api.db.tables import Job, JobEvent, User, utcnow
from api.http.deps import CurrentUser, State
from api.http.state import AppState
from api.services.deadlines import is_aborted, parse_cancel_after
from api.services.events import events_after, events_of
from api.services.jobs import Submission
from api.services.teams import TEAM_HEADER
from api.services.waiting import wait_for_job
from models.spec import ModelSpec

PREFIX = "/replicate"
TITLES = {400: "Bad Request", 401: "Unauthenticated", 402: "Insufficient credit", 403: "Forbidden",
          404: "Not found", 409: "Conflict", 413: "Payload too large", 422: "Invalid input",
          429: "Too many requests", 500: "Internal server error"}

router = APIRouter(prefix=f"{PREFIX}/v1", tags=["replicate"])

# waiting: a pipeline (or a step) whose work has not started yet is "starting" to a Replicate client
STATUSES = {JobStatus.WAITING.value: "starting", JobStatus.QUEUED.value: "starting",
            JobStatus.RUNNING.value: "processing",
            JobStatus.SUCCEEDED.value: "succeeded", JobStatus.FAILED.value: "failed",
            JobStatus.CANCELED.value: "canceled"}
COG_VERSION = "0.9.0"  # ≥ 0.3.9: the client reads our array outputs as plain lists, not iterators
DEFAULT_WAIT_S = 60
MAX_PAGE = 100
MAX_CURSOR_DEPTH = 32  # pages of "previous" history a cursor carries
LOG_EVENTS = ("logs", "progress")
STREAM_MAX_S = 3600.0
# the spec fields that change what a version computes (a checkpoint swap changes ``source``)
_VERSION_FIELDS = {"id", "kind", "tasks", "family", "source", "dtype", "scheduler", "pipeline_kwargs",
                   "defaults", "limits", "overflow"}


def shape_error(status: int, code: str, message: str, details: dict[str, Any],
                headers: dict[str, str] | None) -> JSONResponse:
    """Problem details, as Replicate answers errors (the client reads ``detail`` and ``title``)."""
    body = {"title": TITLES.get(status, "Error"), "detail": message, "status": status, "code": code}
    return JSONResponse(body, status_code=status, headers=headers,
                        media_type="application/problem+json")


# request and response models -------------------------------------------------------------------
class PredictionCreate(BaseModel):
    """The body of both create routes (``version`` only on ``POST /v1/predictions``)."""

    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(default=None, min_length=1, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)
    webhook: str | None = Field(default=None, max_length=2048)
    webhook_completed: str | None = Field(default=None, max_length=2048, description="legacy: webhook on completion")
    webhook_events_filter: list[str] | None = None
    stream: bool | None = Field(default=None, description="urls.stream is always given; accepted for the client")


class PredictionUrls(BaseModel):
    get: str
    cancel: str
    stream: str


class ReplicatePrediction(BaseModel):
    id: str
    model: str
    version: str
    input: dict[str, Any]
    output: str | list[str] | None
    logs: str
    error: str | None
    status: Literal["starting", "processing", "succeeded", "failed", "canceled", "aborted"]
    created_at: str | None
    started_at: str | None
    completed_at: str | None
    source: Literal["api", "web"] = "api"
    data_removed: bool
    metrics: dict[str, float | None]
    urls: PredictionUrls


class PredictionPage(BaseModel):
    previous: str | None
    next: str | None
    results: list[ReplicatePrediction]


class ReplicateVersion(BaseModel):
    id: str
    created_at: str
    cog_version: str
    openapi_schema: dict[str, Any]


class VersionPage(BaseModel):
    previous: str | None
    next: str | None
    results: list[ReplicateVersion]


class ReplicateModel(BaseModel):
    url: str
    owner: str
    name: str
    description: str | None
    visibility: Literal["public", "private"]
    github_url: str | None
    paper_url: str | None
    license_url: str | None
    run_count: int
    cover_image_url: str | None
    default_example: ReplicatePrediction | None
    latest_version: ReplicateVersion | None


class ModelPage(BaseModel):
    previous: str | None
    next: str | None
    results: list[ReplicateModel]


# versions and schemas --------------------------------------------------------------------------
def version_id(spec: ModelSpec) -> str:
    """A stable id of what the model computes: 64 hex digits, new when the checkpoint changes."""
    content = spec.model_dump(mode="json", include=_VERSION_FIELDS)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Our optional fields take ``null`` (the default then applies), as native validation does."""
    out = dict(schema)
    out["type"] = [schema["type"], "null"]
    out["nullable"] = True
    return out


def _range(lo: int | float | None, hi: int | float | None, floor: float, ceil: float) -> dict[str, Any]:
    out: dict[str, Any] = {"minimum": max(floor, lo) if lo is not None else floor}
    out["maximum"] = min(ceil, hi) if hi is not None else ceil
    return out


def input_schema(spec: ModelSpec, max_prompt_chars: int) -> dict[str, Any]:
    """The ``Input`` schema of a model: what :func:`api.core.requests.normalize_input` accepts.

    Mirrors its checks: the request fields and their bounds, then the spec's limits (size and its
    multiple, steps, frames as ``multiple·k + offset``, fps, the remote model's enums and which
    durations a resolution allows), which tasks take an image. Content policy, LoRA ownership and
    upload existence are checked at submission, not here.
    """
    d, lim = spec.defaults, spec.limits
    text = {"type": "string", "maxLength": max_prompt_chars}
    props: dict[str, Any] = {
        "prompt": {**text, "minLength": 1, "title": "Prompt", "x-order": 0},
        "negative_prompt": _nullable({**text, "default": d.negative_prompt, "title": "Negative Prompt",
                                      "x-order": 1}),
        "seed": _nullable({"type": "integer", "minimum": 0, "maximum": 2**32 - 1, "title": "Seed",
                           "description": "random when not given", "x-order": 9}),
    }
    takes_image = bool({"i2i", "i2v"} & set(spec.tasks))
    needs_image = not ({"t2i", "t2v"} & set(spec.tasks))
    if takes_image:
        image = {"type": "string", "minLength": 1, "maxLength": 2048, "title": "Image",
                 "description": "an upload id, job:<id> of a finished image job, or an http(s) URL", "x-order": 2}
        props["image"] = image if needs_image else _nullable(image)
    props["strength"] = _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1, "title": "Strength",
                                   "x-order": 3})
    lora = {"type": "object", "additionalProperties": False, "required": ["id"],
            "properties": {"id": {"type": "string", "minLength": 1, "maxLength": 64},
                           "scale": {"type": "number", "minimum": -4, "maximum": 4, "default": 1.0}}}
    if spec.kind == "image":  # a batch of images in one job (one output URL each)
        props["num_outputs"] = _nullable({"type": "integer", "minimum": 1, "maximum": 10, "default": 1,
                                          "title": "Number of outputs", "x-order": 8})
    else:
        props["num_outputs"] = {"type": "null", "description": "one video per job"}
    props["loras"] = {"type": "array", "items": lora, "maxItems": 0 if spec.remote_only else lim.max_loras,
                      "default": [], "title": "LoRAs", "x-order": 10}
    schema: dict[str, Any] = {"type": "object", "title": "Input", "additionalProperties": False,
                              "required": ["prompt", "image"] if needs_image else ["prompt"]}
    if spec.remote_only:
        # validated as request fields, then not used by a remote model
        props["width"] = _nullable({"type": "integer", "minimum": 1, "maximum": 16384})
        props["height"] = _nullable({"type": "integer", "minimum": 1, "maximum": 16384})
        props["steps"] = _nullable({"type": "integer", "minimum": 1, "maximum": 1000})
        props["guidance"] = _nullable({"type": "number", "minimum": 0, "maximum": 50})
        props["fps"] = _nullable({"type": "integer", "minimum": 1, "maximum": 240, "default": d.fps})
        props["num_frames"] = _nullable({"type": "integer", "minimum": 1, "maximum": 10000,
                                         "description": "this model takes duration; num_frames only with it"})
        duration: dict[str, Any] = {"type": "number", "exclusiveMinimum": 0, "maximum": 600,
                                    "default": d.duration, "title": "Duration (s)", "x-order": 4}
        if lim.durations:
            duration["enum"] = list(lim.durations)
        props["duration"] = _nullable(duration)
        for name, allowed, default in (("resolution", lim.resolutions, d.resolution),
                                       ("aspect_ratio", lim.aspect_ratios, d.aspect_ratio)):
            field: dict[str, Any] = {"type": "string", "default": default, "x-order": 5}
            if allowed:
                field["enum"] = list(allowed)
            props[name] = _nullable(field)
        schema["dependentRequired"] = {"num_frames": ["duration"]}
        rules = []
        for resolution, durations in (lim.resolutions_by_duration or {}).items():
            # absent resolution means the default one: the rule applies then too
            when: dict[str, Any] = {"properties": {"resolution": {"const": resolution}}}
            if d.resolution != resolution:
                when["required"] = ["resolution"]
            then: dict[str, Any] = {"properties": {"duration": {"enum": list(durations)}}}
            if d.duration not in durations:
                then["required"] = ["duration"]
            rules.append({"if": when, "then": then})
        if rules:
            schema["allOf"] = rules
    else:
        for name, lo, hi, default in (("width", lim.min_width, lim.max_width, d.width),
                                      ("height", lim.min_height, lim.max_height, d.height)):
            props[name] = _nullable({"type": "integer", **_range(lo, hi, 1, 16384),
                                     "multipleOf": lim.size_multiple, "default": default,
                                     "title": name.title(), "x-order": 5})
        props["steps"] = _nullable({"type": "integer", **_range(1, lim.max_steps, 1, 1000), "default": d.steps,
                                    "title": "Steps", "x-order": 6})
        props["guidance"] = _nullable({"type": "number", "minimum": 0, "maximum": 50, "default": d.guidance,
                                       "title": "Guidance", "x-order": 7})
        if spec.kind == "video":
            frames: dict[str, Any] = {"type": "integer", **_range(lim.min_frames, lim.max_frames, 1, 10000),
                                      "default": d.num_frames, "title": "Frames", "x-order": 4}
            mult = lim.frame_multiple or 1
            if lim.frame_offset and frames["maximum"] - frames["minimum"] <= 4096:
                frames["enum"] = [n for n in range(int(frames["minimum"]), int(frames["maximum"]) + 1)
                                  if (n - lim.frame_offset) % mult == 0]
                frames["description"] = f"{mult}·k + {lim.frame_offset}"
            elif not lim.frame_offset and mult > 1:
                frames["multipleOf"] = mult
            props["num_frames"] = _nullable(frames)
            props["fps"] = _nullable({"type": "integer", **_range(lim.min_fps, lim.max_fps, 1, 240),
                                      "default": d.fps, "title": "FPS", "x-order": 4})
            props["duration"] = _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 600,
                                           "title": "Duration (s)", "x-order": 4,
                                           "description": "used when num_frames is not given"})
            props["resolution"] = _nullable({"type": "string"})
            props["aspect_ratio"] = _nullable({"type": "string"})
        else:
            # accepted by native validation and not used by an image model
            props["num_frames"] = _nullable({"type": "integer", "minimum": 1, "maximum": 10000})
            props["fps"] = _nullable({"type": "integer", "minimum": 1, "maximum": 240})
            props["duration"] = _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 600})
            props["resolution"] = _nullable({"type": "string"})
            props["aspect_ratio"] = _nullable({"type": "string"})
    schema["properties"] = props
    return schema


def openapi_schema(spec: ModelSpec, max_prompt_chars: int) -> dict[str, Any]:
    uri = {"type": "string", "format": "uri"}
    return {
        "openapi": "3.0.2",
        "info": {"title": spec.name or spec.id, "version": version_id(spec)[:12]},
        "paths": {},
        "components": {"schemas": {
            "Input": input_schema(spec, max_prompt_chars),
            # one file per job; a job that made several answers a list
            "Output": {"title": "Output", "anyOf": [uri, {"type": "array", "items": uri}]},
        }},
    }


# views -------------------------------------------------------------------------------------------
def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def status_of(job: Job) -> str:
    return "aborted" if is_aborted(job) else STATUSES.get(job.status, job.status)


def progress_line(step: int, total: int) -> str:
    """A tqdm-style line: the client's ``Prediction.progress`` parses these from ``logs``."""
    pct = int(100 * step / total) if total else 0
    filled = pct // 10
    return f"{pct:3d}%|{'█' * filled}{' ' * (10 - filled)}| {step}/{total}"


def log_line(event: JobEvent) -> str | None:
    if event.type == "logs" and event.data.get("message"):
        return str(event.data["message"])
    if event.type == "progress" and event.data.get("step") is not None and event.data.get("total"):
        return progress_line(int(event.data["step"]), int(event.data["total"]))
    return None


class Views:
    """Renders jobs and models in Replicate's shape for one app (its storage, catalog, settings)."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        # when this process first served a version (a spec carries no timestamp of its own)
        self._seen: dict[str, datetime] = state.extras.setdefault("replicate_versions_seen", {})

    @property
    def owner(self) -> str:
        return self.state.settings.replicate_owner

    def version(self, spec: ModelSpec, max_prompt_chars: int) -> dict[str, Any]:
        vid = version_id(spec)
        seen = self._seen.setdefault(vid, utcnow())
        return {"id": vid, "created_at": _iso(seen), "cog_version": COG_VERSION,
                "openapi_schema": openapi_schema(spec, max_prompt_chars)}

    def model(self, spec: ModelSpec, base: str, max_prompt_chars: int) -> dict[str, Any]:
        return {"url": f"{base}/v1/models/{self.owner}/{spec.id}", "owner": self.owner, "name": spec.id,
                "description": spec.description or spec.name, "visibility": "public", "github_url": None,
                "paper_url": None, "license_url": None, "run_count": 0, "cover_image_url": None,
                "default_example": None, "latest_version": self.version(spec, max_prompt_chars)}

    def logs(self, job_id: str) -> str:
        return self.logs_of([job_id])[job_id]

    def logs_of(self, job_ids: list[str]) -> dict[str, str]:
        """The logs of each job, read in one query (a list page does not query once per job)."""
        with self.state.db.read() as session:
            events = events_of(session, job_ids, LOG_EVENTS)
        return {job_id: "\n".join(line for line in map(log_line, evs) if line) for job_id, evs in events.items()}

    def output(self, job: Job) -> str | list[str] | None:
        ttl = self.state.settings.url_ttl_s
        urls = [self.state.storage.url(o["key"], ttl) for o in job.outputs
                if o.get("key") and o.get("role", "output") == "output"]
        if not urls:
            return None
        return urls[0] if len(urls) == 1 else urls

    def prediction(self, job: Job, base: str, *, logs: str | None = None, blocking: bool = False) -> dict[str, Any]:
        spec = self.state.catalog.get(job.model)
        status = status_of(job)
        if blocking and job.status not in {s.value for s in TERMINAL}:
            status = "starting"  # Replicate's blocking answer before the end: the client polls on
        url = f"{base}/v1/predictions/{job.id}"
        return {
            "id": job.id, "model": f"{self.owner}/{job.model}",
            "version": version_id(spec) if spec is not None else "",
            "input": job.input, "output": self.output(job),
            "logs": self.logs(job.id) if logs is None else logs,
            "error": job.error_message if job.error_code else None,
            "status": status, "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
            "completed_at": _iso(job.completed_at), "source": "api",
            "data_removed": job.outputs_deleted_at is not None,
            "metrics": {"predict_time": job.run_s, "queue_time": job.queue_s},
            "urls": {"get": url, "cancel": f"{url}/cancel", "stream": f"{url}/stream"},
        }


def webhook_renderer(state: AppState) -> Callable[[Job], dict[str, Any]]:
    """The body of a Replicate-shaped job's webhook: the prediction object (URLs from public_url)."""
    views = Views(state)
    settings = state.settings
    base = (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/") + f"{PREFIX}"

    def render(job: Job) -> dict[str, Any]:
        return views.prediction(job, base)

    return render


# helpers -------------------------------------------------------------------------------------
def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + PREFIX


def _max_chars(state: AppState, user: User) -> int:
    return state.settings.limits_for(user.plan)[2]


def _spec(state: AppState, owner: str, name: str) -> ModelSpec:
    spec = state.catalog.get(name)
    if owner != state.settings.replicate_owner or spec is None or not spec.enabled:
        raise NotFound(f"model {owner}/{name} not found")
    return spec


def _by_version(state: AppState, ref: str) -> ModelSpec:
    """``owner/name``, ``owner/name:version`` or a bare version id (only current versions run)."""
    if "/" in ref:
        owner, _, rest = ref.partition("/")
        name, _, wanted = rest.partition(":")
        spec = _spec(state, owner, name)
        if wanted and wanted != version_id(spec):
            raise InvalidInput(f"version {wanted} of {owner}/{name} is not served (current: {version_id(spec)})",
                               {"field": "version", "current": version_id(spec)})
        return spec
    for spec in state.catalog.enabled():
        if version_id(spec) == ref:
            return spec
    raise InvalidInput(f"invalid version or not permitted: {ref}", {"field": "version"})


def parse_prefer(value: str | None) -> int | None:
    """Seconds to hold a create request: ``Prefer: wait`` (60) or ``wait=N`` (1–60); else None."""
    if not value:
        return None
    for token in value.split(","):
        name, has_arg, arg = token.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not has_arg:
            return DEFAULT_WAIT_S
        arg = arg.strip()
        if not arg.isdigit() or not 1 <= int(arg) <= 60:
            raise InvalidInput(f"Prefer: wait=N needs N between 1 and 60 (got {arg!r})", {"field": "Prefer"})
        return int(arg)
    return None


def _encode_page(cursor: str | None, stack: list[str | None], limit: int) -> str:
    raw = json.dumps({"c": cursor, "s": stack[-MAX_CURSOR_DEPTH:], "l": limit}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page(token: str) -> tuple[str | None, list[str | None], int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor, stack, limit = data["c"], list(data["s"]), int(data["l"])
        if not (cursor is None or isinstance(cursor, str)) or not 1 <= limit <= MAX_PAGE \
                or not all(c is None or isinstance(c, str) for c in stack):
            raise ValueError("bad cursor")
        return cursor, stack, limit
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidInput("cursor is not valid", {"field": "cursor"}) from None


# models ------------------------------------------------------------------------------------------
@router.get("/models", response_model=ModelPage)
def list_models(request: Request, user: CurrentUser,
                state: State) -> dict[str, Any]:
    views, chars = Views(state), _max_chars(state, user)
    return {"previous": None, "next": None,
            "results": [views.model(s, _base(request), chars) for s in state.catalog.enabled()]}


@router.get("/models/{owner}/{name}", response_model=ReplicateModel)
def get_model(owner: str, name: str, request: Request, user: CurrentUser,
              state: State) -> dict[str, Any]:
    return Views(state).model(_spec(state, owner, name), _base(request), _max_chars(state, user))


@router.get("/models/{owner}/{name}/versions", response_model=VersionPage)
def list_versions(owner: str, name: str, user: CurrentUser,
                  state: State) -> dict[str, Any]:
    spec = _spec(state, owner, name)
    return {"previous": None, "next": None, "results": [Views(state).version(spec, _max_chars(state, user))]}


@router.get("/models/{owner}/{name}/versions/{version}", response_model=ReplicateVersion)
def get_version(owner: str, name: str, version: str, user: CurrentUser,
                state: State) -> dict[str, Any]:
    spec = _spec(state, owner, name)
    if version != version_id(spec):
        raise NotFound(f"version {version} of {owner}/{name} not found")
    return Views(state).version(spec, _max_chars(state, user))


# predictions -------------------------------------------------------------------------------------
async def _create(request: Request, state: AppState, user: User, spec: ModelSpec, body: PredictionCreate,
                  prefer: str | None, cancel_after: str | None, idempotency_key: str | None) -> dict[str, Any]:
    wait_s = parse_prefer(prefer)
    cancel_s = parse_cancel_after(cancel_after) if cancel_after is not None else None
    webhook, events = body.webhook, body.webhook_events_filter
    if webhook is None and body.webhook_completed is not None:
        webhook, events = body.webhook_completed, ["completed"]
    sub = Submission(spec.id, body.input, webhook, events, api_shape="replicate", cancel_after_s=cancel_s,
                     team=request.headers.get(TEAM_HEADER))  # teams: submit as the team
    job, _created = await run_in_threadpool(state.jobs.submit, user, sub, idempotency_key)
    if wait_s:
        job = await wait_for_job(state.jobs, user, job.id, wait_s)
    return await run_in_threadpool(Views(state).prediction, job, _base(request), blocking=bool(wait_s))


_PREFER = Header(default=None, alias="Prefer", description="wait or wait=N (1-60 s): hold until done")
_CANCEL_AFTER = Header(default=None, alias="Cancel-After", description="e.g. 90s, 5m, 1h30m")
_IDEMPOTENCY = Header(default=None, alias="Idempotency-Key")


@router.post("/predictions", status_code=201, response_model=ReplicatePrediction)
async def create_prediction(body: PredictionCreate, request: Request, user: CurrentUser,
                            state: State, prefer: str | None = _PREFER,
                            cancel_after: str | None = _CANCEL_AFTER,
                            idempotency_key: str | None = _IDEMPOTENCY) -> dict[str, Any]:
    if not body.version:
        raise InvalidInput("version is required: owner/name, owner/name:version or a version id",
                           {"field": "version"})
    spec = _by_version(state, body.version)
    return await _create(request, state, user, spec, body, prefer, cancel_after, idempotency_key)


@router.post("/models/{owner}/{name}/predictions", status_code=201, response_model=ReplicatePrediction)
async def create_model_prediction(owner: str, name: str, body: PredictionCreate, request: Request,
                                  user: CurrentUser, state: State,
                                  prefer: str | None = _PREFER, cancel_after: str | None = _CANCEL_AFTER,
                                  idempotency_key: str | None = _IDEMPOTENCY) -> dict[str, Any]:
    spec = _spec(state, owner, name)
    if body.version:
        raise InvalidInput("version is not taken here: the model's latest version runs", {"field": "version"})
    return await _create(request, state, user, spec, body, prefer, cancel_after, idempotency_key)


@router.post("/deployments/{owner}/{name}/predictions", status_code=201, response_model=ReplicatePrediction)
async def create_deployment_prediction(owner: str, name: str, body: PredictionCreate, request: Request,
                                       user: CurrentUser, state: State,
                                       prefer: str | None = _PREFER, cancel_after: str | None = _CANCEL_AFTER,
                                       idempotency_key: str | None = _IDEMPOTENCY) -> dict[str, Any]:
    """A deployment is the model of the same name (each model is served as one deployment here)."""
    return await create_model_prediction(owner, name, body, request, user, state, prefer, cancel_after,
                                         idempotency_key)


@router.get("/predictions", response_model=PredictionPage)
def list_predictions(request: Request, user: CurrentUser, state: State,
                     cursor: str | None = Query(default=None, max_length=8192),
                     limit: int = Query(default=MAX_PAGE, ge=1, le=MAX_PAGE)) -> dict[str, Any]:
    """The caller's jobs, newest first; ``next``/``previous`` are absolute URLs (the client GETs them)."""
    native, stack = None, []
    if cursor is not None:
        native, stack, limit = _decode_page(cursor)
    # LoRA trainings are Replicate trainings, not predictions
    jobs, next_native = state.jobs.list(user, cursor=native, limit=limit, exclude_kind="training",
                                        team=request.headers.get(TEAM_HEADER))  # a team's, with the header
    base, views = _base(request), Views(state)
    logs = views.logs_of([j.id for j in jobs])
    here = f"{base}/v1/predictions?cursor="
    return {"results": [views.prediction(j, base, logs=logs[j.id]) for j in jobs],
            "next": here + _encode_page(next_native, [*stack, native], limit) if next_native else None,
            "previous": here + _encode_page(stack[-1], stack[:-1], limit) if stack else None}


@router.get("/predictions/{prediction_id}", response_model=ReplicatePrediction)
def get_prediction(prediction_id: str, request: Request, user: CurrentUser,
                   state: State) -> dict[str, Any]:
    return Views(state).prediction(state.jobs.get(user, prediction_id), _base(request))


@router.post("/predictions/{prediction_id}/cancel", response_model=ReplicatePrediction)
def cancel_prediction(prediction_id: str, request: Request, user: CurrentUser,
                      state: State) -> dict[str, Any]:
    return Views(state).prediction(state.jobs.cancel(user, prediction_id), _base(request))


@router.get("/predictions/{prediction_id}/stream", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def stream_prediction(prediction_id: str, request: Request, user: CurrentUser,
                            state: State) -> EventSourceResponse:
    """SSE as Replicate streams: ``output`` (a file URL), ``logs`` (a line), ``error``, ``done``."""
    await run_in_threadpool(state.jobs.get, user, prediction_id)
    return EventSourceResponse(_stream(state, request, prediction_id), ping=15)


async def _stream(state: AppState, request: Request, job_id: str) -> AsyncIterator[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STREAM_MAX_S
    after = 0

    def fetch(last: int) -> list[JobEvent]:
        with state.db.read() as session:
            return events_after(session, job_id, last)

    while loop.time() < deadline:
        waiter = state.bus.waiter(job_id)
        try:
            for event in await run_in_threadpool(fetch, after):
                after = event.id
                eid = str(event.id)
                line = log_line(event)
                if line is not None:
                    yield {"id": eid, "event": "logs", "data": line}
                elif event.type == "output" and (event.data.get("output") or {}).get("key"):
                    key = event.data["output"]["key"]
                    yield {"id": eid, "event": "output", "data": state.storage.url(key, state.settings.url_ttl_s)}
                elif event.type == "completed":
                    job = await run_in_threadpool(state.jobs.get, None, job_id)
                    status = status_of(job)
                    if status == "failed":
                        yield {"id": eid, "event": "error", "data": json.dumps({"detail": job.error_message})}
                    reason = {"canceled": "canceled", "aborted": "aborted"}.get(status)
                    yield {"id": eid, "event": "done", "data": json.dumps({"reason": reason} if reason else {})}
                    return
            if await request.is_disconnected():
                return
            await wait_event(waiter, state.settings.sse_poll_s)
        finally:
            state.bus.release(job_id, waiter)
