"""The Google Veo adapter, through the Gemini API (``veo-3.1`` in the catalog).

1. ``POST {base}/v1beta/models/{model}:predictLongRunning`` with ``x-goog-api-key``; the answer
   names a long-running operation;
2. poll ``GET {base}/v1beta/{operation}`` every ``provider_poll_s`` until ``done``;
3. download ``response.generateVideoResponse.generatedSamples[].video.uri`` with the key, following
   redirects by hand so the key goes only to the Gemini API's origin, never to the storage host
   it redirects to; store it (Gemini keeps it two days) with a poster frame.

An empty ``generatedSamples`` with ``raiMediaFilteredCount > 0`` is a safety block
(``content_policy``, not retried). The Gemini API refuses ``seed`` (and ``generateAudio``): they are
not sent, so a Veo job is not reproducible by seed. :meth:`cancel` stops the job on our side and
asks ``POST {base}/v1beta/{operation}:cancel`` (the standard long-running-operations call; the API
may not honour it, in which case the provider finishes and bills the video anyway).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from api.core.events import DoneEvent, ExecutorEvent, ProgressEvent, ProviderEvent, StageEvent
from api.core.executor import ExecutionRequest
from api.settings import Settings
from api.storage.base import Storage
from serve.fallback.base import ClientFactory, ProviderExecutor, RunCanceled, RunState
from serve.fallback.http import (
    ContentPolicyBlocked,
    Deadline,
    ProviderError,
    ProviderHTTPError,
    ProviderUnavailable,
    RetryPolicy,
    download,
    expect_json,
    send_with_retry,
)

logger = logging.getLogger(__name__)

# google.rpc.Code values in a finished operation's error
RPC_CANCELLED, RPC_RESOURCE_EXHAUSTED, RPC_UNAVAILABLE = 1, 8, 14
SAFETY_MARKERS = ("responsible ai", "raimediafiltered", "safety filter", "usage guidelines")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.S)


def is_safety_message(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in SAFETY_MARKERS)


def build_body(data: dict[str, Any], image: dict[str, str] | None = None) -> dict[str, Any]:
    """The predictLongRunning body for our normalized input (no seed: the Gemini API refuses it)."""
    instance: dict[str, Any] = {"prompt": data["prompt"]}
    if image is not None:
        instance["image"] = image
    parameters: dict[str, Any] = {"sampleCount": 1}
    if data.get("aspect_ratio"):
        parameters["aspectRatio"] = data["aspect_ratio"]
    if data.get("duration") is not None:
        parameters["durationSeconds"] = int(round(float(data["duration"])))
    if data.get("resolution"):
        parameters["resolution"] = data["resolution"]
    if data.get("negative_prompt"):
        parameters["negativePrompt"] = data["negative_prompt"]
    return {"instances": [instance], "parameters": parameters}


def parse_data_uri(uri: str) -> tuple[str, bytes]:
    match = _DATA_URI.match(uri)
    if not match:
        raise ProviderError("the input image is a data URI that is not base64", code="invalid_input")
    try:
        payload = base64.b64decode(match.group("data"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderError("the input image data URI is not valid base64", code="invalid_input") from exc
    return match.group("mime") or "application/octet-stream", payload


class VeoExecutor(ProviderExecutor):
    """Runs jobs as Veo long-running operations on the Gemini API."""

    provider = "veo"

    def __init__(self, settings: Settings, storage: Storage, catalog: Any | None = None, *,
                 client_factory: ClientFactory | None = None, retry: RetryPolicy | None = None) -> None:
        super().__init__(settings, storage, catalog, client_factory=client_factory, retry=retry)
        self.redact.add(settings.gemini_api_key)

    @property
    def base_url(self) -> str:
        return self.settings.gemini_base_url.rstrip("/")

    def cost_per_second(self) -> float:
        return self.settings.veo_cost_per_second_usd

    def _headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.settings.gemini_api_key or "", "Content-Type": "application/json"}

    async def image_part(self, image: str, deadline: Deadline) -> dict[str, str]:
        """``{"bytesBase64Encoded", "mimeType"}`` from a data URI or a URL (fetched without our key)."""
        if image.startswith("data:"):
            mime, payload = parse_data_uri(image)
        elif image.startswith(("http://", "https://")):
            fetched = await download(self.client(), image, deadline=deadline, policy=self.retry,
                                     what="fetching the input image", max_bytes=self.settings.max_upload_bytes,
                                     egress=self.egress)
            mime, payload = fetched.content_type, fetched.content
        else:
            raise ProviderError("the input image must be a URL or a data: URI by the time it reaches Veo",
                                code="invalid_input")
        if not mime.startswith("image/"):
            raise ProviderError(f"the input image has content type {mime!r}, not an image", code="invalid_input")
        return {"bytesBase64Encoded": base64.b64encode(payload).decode(), "mimeType": mime}

    def _operation_url(self, name: str, suffix: str = "") -> str:
        return f"{self.base_url}/v1beta/{name.lstrip('/')}{suffix}"

    async def _cancel_remote(self, state: RunState, deadline: Deadline) -> None:
        response = await send_with_retry(self.client(), "POST", self._operation_url(state.provider_job_id or "",
                                                                                   ":cancel"),
                                         headers=self._headers(), json={}, deadline=deadline, policy=self.retry,
                                         what="canceling the operation")
        if response.status_code in (404, 501):
            logger.info("veo: the API does not cancel %s (HTTP %d); it may still finish and bill",
                        state.provider_job_id, response.status_code)
            return
        expect_json(response, "canceling the operation", self.redact)

    @staticmethod
    def _raise_for_operation_error(error: dict[str, Any], canceled_by_us: bool) -> None:
        code = error.get("code")
        message = str(error.get("message") or error.get("status") or "no reason given")[:300]
        if code == RPC_CANCELLED and canceled_by_us:
            raise RunCanceled()
        if is_safety_message(message):
            raise ContentPolicyBlocked(f"the provider's safety filter blocked this generation: {message}")
        if code in (RPC_RESOURCE_EXHAUSTED, RPC_UNAVAILABLE):
            raise ProviderUnavailable(f"the operation failed: {message} (code {code})")
        raise ProviderError(f"the operation failed: {message} (code {code})")

    async def _execute(self, request: ExecutionRequest, state: RunState,
                       deadline: Deadline) -> AsyncIterator[ExecutorEvent]:
        model = self.provider_model(request)
        if not self.settings.gemini_api_key:
            raise ProviderError("CINEWEAVE_GEMINI_API_KEY is not set", code="provider_not_configured")
        yield StageEvent("submitting")
        image = None
        if request.input.get("image"):
            image = await self.image_part(str(request.input["image"]), deadline)
        if request.input.get("seed") is not None:
            logger.debug("veo: job %s: the Gemini API takes no seed; it is not sent", request.job_id)
        response = await send_with_retry(
            self.client(), "POST", f"{self.base_url}/v1beta/models/{model}:predictLongRunning",
            json=build_body(request.input, image), headers=self._headers(), deadline=deadline,
            policy=self.retry, idempotent=False, what="starting the generation")
        try:
            operation = expect_json(response, "starting the generation", self.redact)
        except ProviderHTTPError as exc:
            if is_safety_message(exc.detail):
                raise ContentPolicyBlocked(f"the provider's safety filter refused the input: {exc.detail}") from None
            raise
        name = operation.get("name")
        if not isinstance(name, str) or not name:
            raise ProviderError("the provider answered without an operation name")
        state.provider_job_id = name
        cost = self.cost_usd(request)
        logger.info("veo: job %s is operation %s (%s)", request.job_id, name, model)
        yield ProviderEvent(self.provider, name, None, cost)
        if state.cancel_requested.is_set():
            raise RunCanceled()
        yield StageEvent("generating")

        polls = 0
        while not operation.get("done"):
            await self.pause(state, self.settings.provider_poll_s, deadline)
            response = await send_with_retry(self.client(), "GET", self._operation_url(name),
                                             headers=self._headers(), deadline=deadline, policy=self.retry,
                                             what="polling the operation")
            operation = expect_json(response, "polling the operation", self.redact)
            polls += 1
        state.finished = True
        logger.info("veo: operation %s done after %d polls (%.1fs)", name, polls, deadline.elapsed())

        if isinstance(operation.get("error"), dict):
            self._raise_for_operation_error(operation["error"], state.cancel_requested.is_set())
        result = (operation.get("response") or {}).get("generateVideoResponse") or {}
        samples = [s for s in result.get("generatedSamples") or [] if isinstance(s, dict)]
        if not samples:
            if int(result.get("raiMediaFilteredCount") or 0) > 0:
                reasons = "; ".join(str(r) for r in result.get("raiMediaFilteredReasons") or [])
                raise ContentPolicyBlocked("the provider's safety filter blocked this generation"
                                           + (f": {reasons[:300]}" if reasons else ""))
            raise ProviderError("the operation finished without a video")
        yield ProgressEvent(step=1, total=1, stage="generating")
        yield StageEvent("downloading")
        download_deadline = Deadline(self.settings.provider_timeout_s)
        for index, sample in enumerate(samples):
            video = sample.get("video") or {}
            if video.get("bytesBase64Encoded"):
                data = base64.b64decode(video["bytesBase64Encoded"])
            elif video.get("uri"):
                data = (await download(self.client(), str(video["uri"]), deadline=download_deadline,
                                       policy=self.retry, what="downloading the video",
                                       auth_headers={"x-goog-api-key": self.settings.gemini_api_key},
                                       auth_origin=self.base_url, egress=self.egress)).content
            else:
                raise ProviderError("a generated sample has neither a URI nor bytes")
            yield await self.store_output(request, data, index)
        yield DoneEvent(result={"provider": self.provider, "provider_job_id": name, "cost_usd": cost})


__all__ = ["VeoExecutor", "build_body", "is_safety_message", "parse_data_uri"]
