"""OpenAI's images and videos API under ``/openai/v1`` over the job store.

``OpenAI(api_key=<CineWeave key>, base_url=URL + "/openai/v1")`` works unmodified. Every request
becomes an ordinary job (``api_shape="openai"``): the same validation, pricing, limits, credits,
storage and events as ``POST /v1/jobs``. What is OpenAI's own:

- ``n`` images are one job of ``num_outputs`` images, generated as one batch and priced n × one
  image; ``quality`` picks the step count (:func:`steps_for_quality`); ``output_format`` jpeg/webp
  is a conversion of the stored PNG (:mod:`api.services.media_convert`).
- ``usage`` counts credits, not tokens: ``output_tokens`` = ``total_tokens`` = the credits the job
  was charged (``input_tokens`` 0), so a client that meters usage meters what it paid.
- A synchronous images call holds for its job up to ``openai_wait_s`` (60 s, as Prefer: wait); if
  the job has not finished by then the answer is a 408 ``generation_pending`` error naming the
  job id and the absolute URL to poll on the native API, ``GET <base>/v1/jobs/{id}`` (never a 504), marked ``x-should-retry: false`` so the
  client does not submit (and pay for) it again.
- Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``. As OpenAI does, invalid
  requests are 400 (not 422) and an account that cannot pay gets 429 ``insufficient_quota``;
  only rate limits (429 ``rate_limited``/``concurrency_limit``) and server errors may be retried
  by the client, every other error carries ``x-should-retry: false``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import IntegrityError
from starlette.background import BackgroundTask

from api.core.errors import CineWeaveError, InvalidInput, NotFound
from api.core.jobs import JobStatus
from api.db.tables import Job, Upload, User
from api.http.bodies import read_capped
from api.http.deps import CurrentUser, State
from api.http.state import AppState
from api.services import media_convert
from api.services.jobs import Submission, encode_cursor
from api.services.teams import TEAM_HEADER
from api.services.uploads import ZIP_MAGIC, PayloadTooLarge, UploadTimeout, read_form
from api.services.waiting import is_terminal, wait_for_job
from api.storage.local import LocalStorage
from models.spec import ModelSpec

logger = logging.getLogger(__name__)

PREFIX = "/openai"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
               403: "permission_error", 404: "invalid_request_error", 408: "timeout",
               409: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error"}
RETRYABLE_CODES = {"rate_limited", "concurrency_limit", "uploads_busy"}
FINAL_CODES = {"generation_failed", "result_unavailable"}  # server-side, but a retry would only submit the job again
SIZE_RE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")

router = APIRouter(prefix=f"{PREFIX}/v1", tags=["openai"])


def shape_error(status: int, code: str, message: str, details: dict[str, Any],
                headers: dict[str, str] | None) -> JSONResponse:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI answers errors."""
    headers = dict(headers or {})
    type_ = ERROR_TYPES.get(status, "server_error")
    if code == "insufficient_credits":  # OpenAI: 429 insufficient_quota (retrying cannot help)
        status, type_, code = 429, "insufficient_quota", "insufficient_quota"
    elif status == 422:  # OpenAI answers every invalid request with 400
        status = 400
    param = details.get("field") if isinstance(details.get("field"), str) else None
    if param is None and isinstance(details.get("errors"), list) and details["errors"]:
        first = details["errors"][0]
        param = first.get("field") if isinstance(first, dict) and first.get("field") else None
    error: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    if isinstance(details.get("job_id"), str):
        error["job_id"] = details["job_id"]
    if (status < 500 and code not in RETRYABLE_CODES) or code in FINAL_CODES:
        headers["x-should-retry"] = "false"
    return JSONResponse({"error": error}, status_code=status, headers=headers)


class GenerationPending(CineWeaveError):
    """The synchronous wait ended before the job did: poll the job (its id is in the error)."""

    code, status = "generation_pending", 408


class GenerationFailed(CineWeaveError):
    """The job ended failed or canceled (its credits are refunded)."""

    code, status = "generation_failed", 500


class ResultUnavailable(CineWeaveError):
    """The job exists (and may be charged) but its answer could not be built: final, so the
    client does not retry and submit (and pay for) a new job; the error names the job."""

    code, status = "result_unavailable", 500


# request and response models ---------------------------------------------------------------
Quality = Literal["low", "medium", "high", "auto", "standard", "hd"]
OutputFormat = Literal["png", "jpeg", "webp"]


class ImageRequest(BaseModel):
    """The fields of ``images.generate`` (and, from the form, ``images.edit``) that we honour."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = Field(default=None, max_length=64)
    n: int = Field(default=1, ge=1, le=10)
    size: str = Field(default="auto", max_length=20, description="WxH within the model's limits, or auto")
    quality: Quality = "auto"
    response_format: Literal["url", "b64_json"] = "url"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["auto", "low"] | None = None
    style: Literal["vivid", "natural"] | None = None
    stream: Literal[False] | None = None
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)


class ImageEditRequest(ImageRequest):
    input_fidelity: Literal["high", "low"] | None = None


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class TokenDetails(BaseModel):
    image_tokens: int = 0
    text_tokens: int = 0


class Usage(BaseModel):
    """OpenAI's usage object, counted in credits (see the module docstring)."""

    input_tokens: int
    input_tokens_details: TokenDetails
    output_tokens: int
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    quality: Literal["low", "medium", "high"]
    size: str
    usage: Usage


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: int | None
    expires_at: int | None
    error: VideoError | None
    model: str
    prompt: str | None
    seconds: str
    size: str
    remixed_from_video_id: str | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


# translation ---------------------------------------------------------------------------------
def steps_for_quality(spec: ModelSpec, quality: str) -> int | None:
    """The step count a ``quality`` asks of ``spec``: the one place the mapping lives.

    ``auto``: None (the model's default steps). ``low``: half the default. ``medium`` and
    ``standard``: the default. ``high`` and ``hd``: twice the default. Always within
    1 … ``limits.max_steps``.
    """
    if quality == "auto":
        return None
    factor = {"low": 0.5, "medium": 1.0, "standard": 1.0, "high": 2.0, "hd": 2.0}[quality]
    return max(1, min(spec.limits.max_steps, round(spec.defaults.steps * factor)))


def quality_label(quality: str) -> Literal["low", "medium", "high"]:
    """The level the response reports: ``standard``/``auto`` are medium, ``hd`` is high."""
    return {"low": "low", "high": "high", "hd": "high"}.get(quality, "medium")  # type: ignore[return-value]


def supports_mask(spec: ModelSpec) -> bool:
    """Inpainting needs a family that takes a mask; none of ours does (tasks t2i/i2i/t2v/i2v)."""
    return "inpaint" in spec.tasks


def _model(state: AppState, model: str | None, kind: str) -> ModelSpec:
    default = (state.settings.openai_default_image_model if kind == "image"
               else state.settings.openai_default_video_model)
    model_id = model or default
    if not model_id:
        raise InvalidInput("you must provide a model parameter", {"field": "model"}, code="missing_model")
    spec = state.catalog.get(model_id)
    if spec is None or not spec.enabled:
        raise NotFound(f"The model '{model_id}' does not exist or you do not have access to it.",
                       {"field": "model"}, code="model_not_found")
    if spec.kind != kind:
        where = "/videos" if spec.kind == "video" else "/images/generations"
        raise InvalidInput(f"{spec.id} is a {spec.kind} model: use {where}", {"field": "model"},
                           code="invalid_model")
    return spec


def parse_size(spec: ModelSpec, size: str) -> tuple[int, int] | None:
    """``WxH`` checked against the model's limits; ``auto`` is None (the model's default size)."""
    if size == "auto":
        return None
    match = SIZE_RE.match(size)
    lim = spec.limits
    supported = (f"{spec.id} takes WxH with width {lim.min_width}–{lim.max_width} and height "
                 f"{lim.min_height}–{lim.max_height}, multiples of {lim.size_multiple}, or auto")
    if match is None:
        raise InvalidInput(f"Invalid size '{size}': {supported}", {"field": "size"}, code="invalid_size")
    width, height = int(match[1]), int(match[2])
    if spec.remote_only:
        return width, height
    if not (lim.min_width <= width <= lim.max_width and lim.min_height <= height <= lim.max_height
            and width % lim.size_multiple == 0 and height % lim.size_multiple == 0):
        raise InvalidInput(f"Invalid size '{size}': {supported}", {"field": "size"}, code="invalid_size")
    return width, height


def image_input(spec: ModelSpec, req: ImageRequest, image: Upload | None = None) -> dict[str, Any]:
    """The native input of an images request (an edit's ``image`` is an upload id)."""
    out: dict[str, Any] = {"prompt": req.prompt, "num_outputs": req.n}
    size = parse_size(spec, req.size)
    if size is None and image is not None and image.width and image.height:
        with contextlib.suppress(InvalidInput):  # the input's own size when the model can make it
            size = parse_size(spec, f"{image.width}x{image.height}")
    if size is not None:
        out["width"], out["height"] = size
    steps = steps_for_quality(spec, req.quality)
    if steps is not None:
        out["steps"] = steps
    if image is not None:
        out["image"] = image.id
    return out


def _aspect(width: int, height: int) -> str:
    from math import gcd

    g = gcd(width, height)
    return f"{width // g}:{height // g}"


def video_input(spec: ModelSpec, prompt: str, seconds: str | None, size: str | None,
                image: Upload | None) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": prompt}
    if seconds is not None:
        try:
            duration = float(seconds)
        except ValueError:
            raise InvalidInput(f"Invalid seconds '{seconds}': a number of seconds", {"field": "seconds"},
                               code="invalid_seconds") from None
        if not 0 < duration <= 600:
            raise InvalidInput(f"Invalid seconds '{seconds}'", {"field": "seconds"}, code="invalid_seconds")
        out["duration"] = int(duration) if duration.is_integer() else duration
    parsed = parse_size(spec, size or "auto")
    if parsed is not None:
        width, height = parsed
        if spec.remote_only:  # providers take a resolution and an aspect ratio
            out["resolution"] = f"{min(width, height)}p"
            out["aspect_ratio"] = _aspect(width, height)
        else:
            out["width"], out["height"] = width, height
    if image is not None:
        out["image"] = image.id
    return out


def _ts(value: Any) -> int | None:
    return None if value is None else int(value.timestamp())


def video_view(job: Job, retention_days: int) -> Video:
    status = {JobStatus.QUEUED: "queued", JobStatus.RUNNING: "in_progress",
              JobStatus.SUCCEEDED: "completed"}.get(JobStatus(job.status), "failed")
    error = None
    if job.status == JobStatus.CANCELED:
        error = VideoError(code=job.error_code or "canceled", message=job.error_message or "the video was canceled")
    elif job.status == JobStatus.FAILED:
        error = VideoError(code=job.error_code or "failed", message=job.error_message or "generation failed")
    inp = job.input or {}
    if inp.get("width") and inp.get("height"):
        size = f"{inp['width']}x{inp['height']}"
    else:
        size = str(inp.get("resolution") or "")
    expires = None
    if job.completed_at is not None and retention_days > 0 and status == "completed":
        expires = _ts(job.completed_at) + retention_days * 86400  # type: ignore[operator]
    duration = float(inp.get("duration") or 0)
    progress = 100 if status == "completed" else int(round((job.progress or 0) * 100))
    return Video(id=job.id, status=status, progress=max(0, min(100, progress)),  # type: ignore[arg-type]
                 created_at=_ts(job.created_at) or 0, completed_at=_ts(job.completed_at), expires_at=expires,
                 error=error, model=job.model, prompt=inp.get("prompt"), seconds=f"{duration:g}", size=size)


# request bodies ------------------------------------------------------------------------------
Files = dict[str, list[tuple[str, bytes]]]


FILE_FIELDS = frozenset({"image", "image[]", "mask", "input_reference"})
JSON_BODY_BYTES = 1024 * 1024


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


def upload_slot(request: Request, state: AppState) -> contextlib.AbstractContextManager[None]:
    """One of the upload service's slots for a multipart request (read, checked and stored under
    it, as /v1/uploads); a JSON body takes none."""
    return state.uploads.admit() if is_multipart(request) else contextlib.nullcontext()


async def read_body(request: Request, state: AppState) -> tuple[dict[str, Any], Files]:
    """A JSON object or a multipart form: its fields, and its files by field name (``image[]``
    counts as ``image``). The multipart body streams through the upload service's parser, so its
    limits hold as bytes arrive: the request's bytes, each file's, the number of files and the
    read deadline. A JSON body is capped at ``JSON_BODY_BYTES``."""
    s = state.settings
    ctype = request.headers.get("content-type", "")
    declared = request.headers.get("content-length")
    if ctype.startswith("application/json") or not ctype:
        if declared is not None and declared.isdigit() and int(declared) > JSON_BODY_BYTES:
            raise PayloadTooLarge(f"the request is {declared} bytes; the limit is {JSON_BODY_BYTES}",
                                  {"max_bytes": JSON_BODY_BYTES})
        try:
            async with asyncio.timeout(s.upload_read_timeout_s):
                raw = await read_capped(request, JSON_BODY_BYTES)
        except TimeoutError:
            raise UploadTimeout(f"the body did not arrive within {s.upload_read_timeout_s:g} s",
                                {"timeout_s": s.upload_read_timeout_s}) from None
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise InvalidInput("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidInput("the request body must be a JSON object")
        return body, {}
    if not ctype.startswith("multipart/form-data"):
        raise InvalidInput("send JSON or multipart/form-data", code="unsupported_content_type")
    fields, by_field = await read_form(request.stream(), ctype, declared, s, FILE_FIELDS)
    files: Files = {}
    for name, items in by_field.items():
        files.setdefault(name.removesuffix("[]"), []).extend((fn, bytes(data)) for fn, data in items)
    return {k.removesuffix("[]"): v for k, v in fields.items()}, files


def _validated(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidInput(f"{field}: {first['msg']}", {"field": field}) from None


def upload_id_for(user: User, data: bytes) -> str:
    """The same bytes from the same user are the same upload, so an Idempotency-Key replay of an
    edit sends the same input (and one image is stored once)."""
    return "upl_" + hashlib.sha256(user.id.encode() + b"\0" + data).hexdigest()[:24]


def _upload_one(state: AppState, user: User, files: list[tuple[str, bytes]], field: str) -> tuple[Upload, bool]:
    """One image through the upload service (the same decoding checks and limits as /v1/uploads);
    ``(upload, created)``: ``created`` is False when the user had already sent these bytes.
    Called under the request's upload slot (:func:`upload_slot`)."""
    if len(files) != 1:
        raise InvalidInput(f"send exactly one {field} image (got {len(files)})", {"field": field})
    data = files[0][1]
    if data[:4] == ZIP_MAGIC:
        raise InvalidInput(f"{field} must be a PNG, JPEG or WebP image, not a ZIP", {"field": field},
                           code="invalid_upload")
    upload_id = upload_id_for(user, data)
    with contextlib.suppress(NotFound):
        return state.uploads.get(user, upload_id), False
    try:
        upload = state.uploads.create(user, files, ids=[upload_id])[0]
    except IntegrityError:  # the same bytes stored concurrently by another request
        return state.uploads.get(user, upload_id), False
    return upload, True


async def _submit_with_upload(state: AppState, user: User, sub: Submission, idempotency_key: str | None,
                              upload: Upload | None, created: bool) -> Job:
    """Submit; when the submit is refused, the upload this request stored goes too."""
    try:
        job, _created = await run_in_threadpool(state.jobs.submit, user, sub, idempotency_key)
    except Exception:
        if upload is not None and created:
            with contextlib.suppress(Exception):
                await run_in_threadpool(state.uploads.delete, user, upload.id)
        raise
    return job


# images --------------------------------------------------------------------------------------
def native_job_url(request: Request, state: AppState, job_id: str) -> str:
    """The absolute URL of the job on the native API (not under the OpenAI base URL)."""
    base = (state.settings.public_url or str(request.base_url)).rstrip("/")
    return f"{base}/v1/jobs/{job_id}"


async def _generate(request: Request, state: AppState, user: User, spec: ModelSpec, req: ImageRequest,
                    native: dict[str, Any], idempotency_key: str | None,
                    upload: Upload | None = None, upload_created: bool = False) -> ImagesResponse:
    job = await _submit_with_upload(state, user, Submission(spec.id, native, api_shape="openai",
                                                            team=request.headers.get(TEAM_HEADER)),  # teams
                                    idempotency_key, upload, upload_created)
    url = native_job_url(request, state, job.id)
    job_id = job.id
    try:
        job = await wait_for_job(state.jobs, user, job_id, state.settings.openai_wait_s)
        if not is_terminal(job):
            raise GenerationPending(f"the images of job {job_id} are still being generated (status "
                                    f"{job.status}): poll GET {url} on the native API (not under the "
                                    "OpenAI base URL)", {"job_id": job_id})
        if job.status != JobStatus.SUCCEEDED:
            raise GenerationFailed(f"job {job_id} {job.status}: {job.error_message or job.error_code or 'no output'}"
                                   " (its credits are refunded)", {"job_id": job_id})
        return await run_in_threadpool(_images_response, state, job, req)
    except (GenerationPending, GenerationFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - once the job exists, a retry would pay for a new one
        logger.exception("job %s: building the images answer failed", job_id)
        raise ResultUnavailable(f"job {job_id} was created but its images could not be returned "
                                f"({type(exc).__name__}); do not resubmit: fetch it with GET {url} "
                                "on the native API", {"job_id": job_id}) from exc


def _images_response(state: AppState, job: Job, req: ImageRequest) -> ImagesResponse:
    data = []
    for out in job.outputs:
        if not str(out.get("content_type", "")).startswith("image/") or out.get("role", "output") != "output":
            continue
        key, fresh = media_convert.ensure_format(state.storage, out["key"], out.get("content_type"),
                                                 req.output_format, req.output_compression)
        item = ImageData(revised_prompt=job.input.get("prompt"))
        if req.response_format == "b64_json":
            blob = fresh if fresh is not None else state.storage.get_bytes(key)
            item.b64_json = base64.b64encode(blob).decode()
        else:
            item.url = state.storage.url(key, state.settings.url_ttl_s)
        data.append(item)
    charged = job.credits_charged or 0
    return ImagesResponse(created=_ts(job.created_at) or 0, data=data, output_format=req.output_format,
                          quality=quality_label(req.quality), size=f"{job.input['width']}x{job.input['height']}",
                          usage=Usage(input_tokens=0, input_tokens_details=TokenDetails(),
                                      output_tokens=charged, total_tokens=charged))


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def create_image(request: Request, body: ImageRequest, user: CurrentUser,
                       state: State,
                       idempotency_key: str | None = Header(default=None, alias="Idempotency-Key")) -> ImagesResponse:
    """``images.generate``: one job of ``n`` images; answers when it is done."""
    spec = _model(state, body.model, "image")
    return await _generate(request, state, user, spec, body, image_input(spec, body), idempotency_key)


_EDIT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {"image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"},
                   "prompt": {"type": "string"}, "model": {"type": "string"}, "n": {"type": "integer"},
                   "size": {"type": "string"}, "quality": {"type": "string"},
                   "response_format": {"type": "string"}, "output_format": {"type": "string"}}}}}}}


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
             openapi_extra=_EDIT_BODY)
async def edit_image(request: Request, user: CurrentUser, state: State,
                     idempotency_key: str | None = Header(default=None, alias="Idempotency-Key")) -> ImagesResponse:
    """``images.edit``: the image is uploaded (checked as /v1/uploads does), then an i2i job."""
    with upload_slot(request, state):
        fields, files = await read_body(request, state)
        req: ImageEditRequest = _validated(ImageEditRequest, fields)
        spec = _model(state, req.model, "image")
        if "i2i" not in spec.tasks:
            raise InvalidInput(f"{spec.id} does not edit images (tasks: {', '.join(spec.tasks)})",
                               {"field": "model"}, code="invalid_model")
        if files.get("mask") and not supports_mask(spec):
            raise InvalidInput(f"{spec.id} does not support masks (inpainting): send the image without a mask "
                               "for image-to-image", {"field": "mask"}, code="mask_not_supported")
        if not files.get("image"):
            raise InvalidInput("image is required (multipart file field 'image')", {"field": "image"})
        parse_size(spec, req.size)  # refused before anything is stored
        upload, created = await run_in_threadpool(_upload_one, state, user, files["image"], "image")
        del files, fields
    return await _generate(request, state, user, spec, req, image_input(spec, req, upload), idempotency_key,
                           upload, created)


# videos --------------------------------------------------------------------------------------
class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = Field(default=None, max_length=64)
    seconds: str | int | float | None = None
    size: str | None = Field(default=None, max_length=20)


_VIDEO_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["prompt"], "properties": {
        "prompt": {"type": "string"}, "model": {"type": "string"}, "seconds": {"type": "string"},
        "size": {"type": "string"}, "input_reference": {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": {"type": "object", "required": ["prompt"], "properties": {
        "prompt": {"type": "string"}, "model": {"type": "string"}, "seconds": {"type": "string"},
        "size": {"type": "string"}}}}}}}


def _video_job(state: AppState, user: User, video_id: str) -> Job:
    job = state.jobs.get(user, video_id)
    if job.kind != "video":
        raise NotFound(f"video {video_id} not found", code="video_not_found")
    return job


@router.post("/videos", response_model=Video, openapi_extra=_VIDEO_BODY)
async def create_video(request: Request, user: CurrentUser, state: State,
                       idempotency_key: str | None = Header(default=None, alias="Idempotency-Key")) -> Video:
    """``videos.create``: a queued video job (t2v, or i2v from ``input_reference``)."""
    with upload_slot(request, state):
        fields, files = await read_body(request, state)
        req: VideoRequest = _validated(VideoRequest, fields)
        spec = _model(state, req.model, "video")
        references = files.get("input_reference") or []
        if references and "i2v" not in spec.tasks:
            raise InvalidInput(f"{spec.id} does not take an input_reference (tasks: {', '.join(spec.tasks)})",
                               {"field": "input_reference"})
        seconds = None if req.seconds is None else str(req.seconds)
        video_input(spec, req.prompt, seconds, req.size, None)  # refused before anything is stored
        upload, created = None, False
        if references:
            upload, created = await run_in_threadpool(_upload_one, state, user, references, "input_reference")
        del files, fields, references
    native = video_input(spec, req.prompt, seconds, req.size, upload)
    job = await _submit_with_upload(state, user, Submission(spec.id, native, api_shape="openai",
                                                            team=request.headers.get(TEAM_HEADER)),  # teams
                                    idempotency_key, upload, created)
    return video_view(job, state.settings.output_retention_days)


@router.get("/videos", response_model=VideoList)
def list_videos(request: Request, user: CurrentUser, state: State,
                after: str | None = Query(default=None, max_length=64),
                limit: int = Query(default=20, ge=1, le=100),
                order: Literal["asc", "desc"] = Query(default="desc")) -> VideoList:
    """The caller's videos, newest first (``order=asc``: oldest first), after the video ``after``."""
    cursor = encode_cursor(_video_job(state, user, after)) if after else None
    jobs, next_cursor = state.jobs.list(user, kind="video", cursor=cursor, limit=limit,
                                        ascending=order == "asc",
                                        team=request.headers.get(TEAM_HEADER))  # a team's, with the header
    days = state.settings.output_retention_days
    data = [video_view(j, days) for j in jobs]
    return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                     has_more=next_cursor is not None)


@router.get("/videos/{video_id}", response_model=Video)
def get_video(video_id: str, user: CurrentUser, state: State) -> Video:
    return video_view(_video_job(state, user, video_id), state.settings.output_retention_days)


@router.get("/videos/{video_id}/content", response_class=FileResponse,
            responses={200: {"content": {"video/mp4": {}, "image/png": {}}}})
def get_video_content(video_id: str, user: CurrentUser, state: State,
                      variant: Literal["video", "thumbnail", "spritesheet"] = Query(default="video")) -> FileResponse:
    """The MP4 (``variant=thumbnail``: its poster), streamed from storage."""
    job = _video_job(state, user, video_id)
    if job.status != JobStatus.SUCCEEDED:
        raise InvalidInput(f"video {job.id} is not completed (status {job.status})", {"field": "video_id"},
                           code="video_not_ready")
    if variant == "spritesheet":
        raise InvalidInput("variant spritesheet is not available; use video or thumbnail", {"field": "variant"})
    video = next((o for o in job.outputs if str(o.get("content_type", "")).startswith("video/")), None)
    if video is None or job.outputs_deleted_at is not None:
        raise NotFound(f"video {job.id} has no content (deleted or expired)", code="content_not_found")
    key = video["key"] if variant == "video" else video.get("thumbnail_key")
    if not key:
        raise NotFound(f"video {job.id} has no thumbnail", code="content_not_found")
    return _stream(state, key, video["content_type"] if variant == "video" else "image/png")


def _stream(state: AppState, key: str, media_type: str) -> FileResponse:
    storage = state.storage
    if isinstance(storage, LocalStorage):
        path = storage.local_path(key)
        if not path.is_file():
            raise NotFound("content not found", code="content_not_found")
        return FileResponse(path, media_type=media_type)
    tmp = Path(tempfile.mkstemp(suffix=Path(key).suffix)[1])  # an object store: via a temp file, not memory
    try:
        storage.download(key, tmp)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    return FileResponse(tmp, media_type=media_type, background=BackgroundTask(tmp.unlink, missing_ok=True))


@router.delete("/videos/{video_id}", response_model=VideoDeleted)
def delete_video(video_id: str, user: CurrentUser,
                 state: State) -> VideoDeleted:
    """Deletes the video's files (the job and its ledger stay, as ``DELETE /v1/jobs/{id}``)."""
    job = _video_job(state, user, video_id)
    state.jobs.delete_outputs(user, job.id)
    return VideoDeleted(id=job.id, deleted=True)


# models --------------------------------------------------------------------------------------
@router.get("/models", response_model=ModelList)
def list_models(user: CurrentUser, state: State) -> ModelList:
    owner = state.settings.replicate_owner
    return ModelList(data=[ModelObject(id=spec.id, created=0, owned_by=owner) for spec in state.catalog.enabled()])


@router.get("/models/{model_id}", response_model=ModelObject)
def get_model(model_id: str, user: CurrentUser, state: State) -> ModelObject:
    spec = state.catalog.get(model_id)
    if spec is None or not spec.enabled:
        raise NotFound(f"The model '{model_id}' does not exist or you do not have access to it.",
                       {"field": "model"}, code="model_not_found")
    return ModelObject(id=spec.id, created=0, owned_by=state.settings.replicate_owner)
