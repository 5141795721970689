"""The Replicate adapter (HTTP API v1), e.g. ``google/veo-3.1`` for the ``veo-3.1-replicate`` model.

One job is one prediction:

1. create: ``POST {base}/models/{owner}/{name}/predictions`` (or ``POST {base}/predictions`` with
   a version when the catalog's ``overflow.model`` is ``owner/name:<version>`` or a bare version)
   with ``Prefer: wait=N``; the answer may already be final;
2. follow it: poll ``urls.get`` every ``provider_poll_s``; or, when ``settings.public_url`` is set,
   ask Replicate to call ``{public_url}/v1/webhooks/replicate`` and take updates from
   :meth:`ReplicateExecutor.handle_webhook` (signature checked, 5-minute timestamp tolerance,
   ``webhook-id`` de-duplicated), polling only as a slow fallback (``provider_poll_s`` ×
   ``slow_poll_factor``) in case a webhook is lost;
3. on ``succeeded`` download the output at once (Replicate deletes it within the hour) into our
   storage under the job's output prefix, with a poster frame;
4. :meth:`cancel` posts to ``urls.cancel``.

A failure naming E005 ("flagged as sensitive") is a safety block: ``content_policy``, not retried.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections import Counter, OrderedDict
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
    OutputGone,
    ProviderError,
    ProviderHTTPError,
    RetryPolicy,
    download,
    expect_json,
    same_origin,
    send_with_retry,
)

logger = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
_RANK = {"starting": 0, "processing": 1}
STAGES = {"starting": "queued", "processing": "generating"}
SAFETY_MARKERS = ("e005", "flagged as sensitive")
WEBHOOK_EVENTS = ["start", "output", "logs", "completed"]
_VERSION = re.compile(r"^[0-9a-f]{64}$")
_TQDM = re.compile(r"(\d+)/(\d+) \[")
_PERCENT = re.compile(r"(\d{1,3})%")


def is_safety_block(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in SAFETY_MARKERS)


def parse_progress(logs: str | None) -> tuple[int, int] | None:
    """The last ``step/total`` (tqdm) or ``NN%`` in a prediction's logs."""
    if not logs:
        return None
    tail = logs[-2000:]
    steps = _TQDM.findall(tail)
    if steps:
        step, total = (int(x) for x in steps[-1])
        return (min(step, total), total) if total > 0 else None
    percents = _PERCENT.findall(tail)
    if percents:
        return min(int(percents[-1]), 100), 100
    return None


def output_urls(output: Any) -> list[str]:
    """The file URLs in a prediction's output (a string, a list of them, or a mapping of them)."""
    if isinstance(output, str):
        return [output]
    if isinstance(output, list):
        return [item for item in output if isinstance(item, str)]
    if isinstance(output, dict):
        return [item for item in output.values() if isinstance(item, str) and
                item.startswith(("http://", "https://", "data:"))]
    return []


def map_input(model_name: str, data: dict[str, Any]) -> dict[str, Any]:
    """Our normalized job input in the provider's field names.

    ``google/veo*``: prompt, aspect_ratio, duration (an integer number of seconds), resolution,
    image (a URL or data URI), negative_prompt, seed. Other models get the same common fields under
    the same names plus num_frames/fps/width/height when the job has them.
    """
    out: dict[str, Any] = {"prompt": data["prompt"]}
    if data.get("negative_prompt"):
        out["negative_prompt"] = data["negative_prompt"]
    if data.get("seed") is not None:
        out["seed"] = int(data["seed"])
    if data.get("image"):
        out["image"] = data["image"]
    if data.get("duration") is not None:
        duration = float(data["duration"])
        out["duration"] = int(round(duration)) if model_name.startswith("google/veo") or \
            duration.is_integer() else duration
    for name in ("resolution", "aspect_ratio"):
        if data.get(name):
            out[name] = data[name]
    if not model_name.startswith("google/veo"):
        for name in ("num_frames", "fps", "width", "height"):
            if data.get(name) is not None:
                out[name] = data[name]
    return out


def _decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise ProviderError("the provider returned a data URI that is not base64")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderError("the provider returned an unreadable data URI") from exc


class ReplicateExecutor(ProviderExecutor):
    """Runs jobs as Replicate predictions; also the receiver of Replicate's webhooks."""

    provider = "replicate"

    def __init__(self, settings: Settings, storage: Storage, catalog: Any | None = None, *,
                 client_factory: ClientFactory | None = None, retry: RetryPolicy | None = None,
                 prefer_wait_s: int = 60, webhook_tolerance_s: float = 300.0, slow_poll_factor: float = 6.0,
                 remembered_webhooks: int = 10_000) -> None:
        super().__init__(settings, storage, catalog, client_factory=client_factory, retry=retry)
        self.prefer_wait_s = max(0, min(60, prefer_wait_s))
        self.webhook_tolerance_s = webhook_tolerance_s
        self.slow_poll_factor = slow_poll_factor
        self._webhook_secret = settings.replicate_webhook_secret
        self.redact.add(settings.replicate_api_token)
        self.redact.add(self._webhook_secret)
        self._by_prediction: dict[str, RunState] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        # Webhooks for a prediction we have not registered yet (its create call is still
        # answering): kept briefly and applied when the create call returns.
        self._early: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._remembered = remembered_webhooks
        self.webhook_stats: Counter[str] = Counter()

    # configuration -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.settings.replicate_base_url.rstrip("/")

    def cost_per_second(self) -> float:
        return self.settings.replicate_cost_per_second_usd

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.replicate_api_token}", "Content-Type": "application/json"}

    def webhook_url(self) -> str | None:
        public = self.settings.public_url
        return f"{public.rstrip('/')}/v1/webhooks/replicate" if public else None

    async def webhook_secret(self, deadline: Deadline) -> str | None:
        """The signing secret: configured, or fetched once from ``GET /webhooks/default/secret``."""
        if self._webhook_secret:
            return self._webhook_secret
        try:
            response = await send_with_retry(self.client(), "GET", f"{self.base_url}/webhooks/default/secret",
                                             headers=self._headers(), deadline=deadline, policy=self.retry,
                                             what="fetching the webhook secret")
            key = expect_json(response, "fetching the webhook secret", self.redact).get("key")
        except ProviderError as exc:
            logger.warning("replicate: no webhook secret (%s); following predictions by polling",
                           self.redact(exc.message))
            return None
        if isinstance(key, str) and key.startswith("whsec_"):
            self._webhook_secret = key
            self.redact.add(key)
            return key
        logger.warning("replicate: the webhook secret endpoint answered without a whsec_ key")
        return None

    # API calls -----------------------------------------------------------------------------
    async def _create(self, model_name: str, body: dict[str, Any], deadline: Deadline) -> dict[str, Any]:
        if _VERSION.match(model_name) or ":" in model_name:
            url = f"{self.base_url}/predictions"
            body = {**body, "version": model_name}
        else:
            owner, _, name = model_name.partition("/")
            if not owner or not name:
                raise ProviderError(f"overflow.model {model_name!r} is not owner/name[:version]",
                                    code="provider_not_configured")
            url = f"{self.base_url}/models/{owner}/{name}/predictions"
        headers = self._headers()
        hold = min(self.prefer_wait_s, int(deadline.remaining()) - 1)
        if hold >= 1:
            headers["Prefer"] = f"wait={hold}"
        response = await send_with_retry(self.client(), "POST", url, json=body, headers=headers,
                                         deadline=deadline, policy=self.retry, idempotent=False,
                                         timeout_s=max(hold, 0) + self.retry.request_timeout_s,
                                         what="creating the prediction")
        try:
            prediction = expect_json(response, "creating the prediction", self.redact)
        except ProviderHTTPError as exc:
            if is_safety_block(exc.detail):
                raise ContentPolicyBlocked(f"the provider's safety filter refused the input: {exc.detail}") from None
            raise
        if not prediction.get("id"):
            raise ProviderError("the provider answered the create call without a prediction id")
        return prediction

    def _get_url(self, state: RunState) -> str:
        urls = (state.latest or {}).get("urls") or {}
        url = urls.get("get")
        # Our token goes only to the API we were configured with.
        if isinstance(url, str) and same_origin(url, self.base_url):
            return url
        return f"{self.base_url}/predictions/{state.provider_job_id}"

    async def _fetch(self, state: RunState, deadline: Deadline) -> dict[str, Any]:
        response = await send_with_retry(self.client(), "GET", self._get_url(state), headers=self._headers(),
                                         deadline=deadline, policy=self.retry, what="polling the prediction")
        return expect_json(response, "polling the prediction", self.redact)

    async def _cancel_remote(self, state: RunState, deadline: Deadline) -> None:
        url = state.cancel_url
        if not (isinstance(url, str) and same_origin(url, self.base_url)):
            url = f"{self.base_url}/predictions/{state.provider_job_id}/cancel"
        response = await send_with_retry(self.client(), "POST", url, headers=self._headers(), deadline=deadline,
                                         policy=self.retry, what="canceling the prediction")
        if response.status_code not in (200, 201, 202, 204):
            expect_json(response, "canceling the prediction", self.redact)

    # state ---------------------------------------------------------------------------------
    @staticmethod
    def _apply(state: RunState, prediction: dict[str, Any]) -> bool:
        """Take a newer view of the prediction (from a poll or a webhook); never go backwards."""
        if prediction.get("id") != state.provider_job_id:
            return False
        status = prediction.get("status")
        current = state.latest or {}
        rank = 2 if status in TERMINAL else _RANK.get(str(status), -1)
        current_rank = 2 if current.get("status") in TERMINAL else _RANK.get(str(current.get("status")), -1)
        if rank < current_rank or (current_rank == 2 and current):
            return False
        state.latest = prediction
        urls = prediction.get("urls") or {}
        if isinstance(urls.get("cancel"), str):
            state.cancel_url = urls["cancel"]
        return True

    def _unregister(self, state: RunState) -> None:
        super()._unregister(state)
        if state.provider_job_id and self._by_prediction.get(state.provider_job_id) is state:
            del self._by_prediction[state.provider_job_id]

    # the run -------------------------------------------------------------------------------
    async def _execute(self, request: ExecutionRequest, state: RunState,
                       deadline: Deadline) -> AsyncIterator[ExecutorEvent]:
        model_name = self.provider_model(request)
        if not self.settings.replicate_api_token:
            raise ProviderError("CINEWEAVE_REPLICATE_API_TOKEN is not set", code="provider_not_configured")
        yield StageEvent("submitting")
        body: dict[str, Any] = {"input": map_input(model_name, request.input)}
        webhook = self.webhook_url()
        if webhook and await self.webhook_secret(deadline):
            body["webhook"] = webhook
            body["webhook_events_filter"] = WEBHOOK_EVENTS
        else:
            webhook = None
        prediction = await self._create(model_name, body, deadline)
        state.provider_job_id = str(prediction["id"])
        self._by_prediction[state.provider_job_id] = state
        self._apply(state, prediction)
        early = self._early.pop(state.provider_job_id, None)
        if early is not None:
            self._apply(state, early)
        cost = self.cost_usd(request)
        logger.info("replicate: job %s is prediction %s (%s, %s)", request.job_id, state.provider_job_id,
                    model_name, "webhooks" if webhook else "polling")
        yield ProviderEvent(self.provider, state.provider_job_id, None, cost)
        if state.cancel_requested.is_set():
            raise RunCanceled()

        poll_every = self.settings.provider_poll_s * (self.slow_poll_factor if webhook else 1.0)
        last_status: str | None = None
        last_progress: tuple[int, int] | None = None
        while True:
            current = state.latest or prediction
            status = str(current.get("status"))
            if status != last_status and status in STAGES:
                yield StageEvent(STAGES[status])
            last_status = status
            progress = parse_progress(current.get("logs"))
            if progress and progress != last_progress:
                last_progress = progress
                yield ProgressEvent(step=progress[0], total=progress[1], stage="generating")
            if status in TERMINAL:
                state.finished = True
                break
            woke = await self.pause(state, poll_every, deadline)
            if not woke:  # the timer, not a webhook: ask
                self._apply(state, await self._fetch(state, deadline))

        final = state.latest or prediction
        if status == "succeeded":
            async for event in self._deliver(request, state, final, cost):
                yield event
            return
        error = str(final.get("error") or "")
        if status == "failed" and is_safety_block(error):
            raise ContentPolicyBlocked(f"the provider's safety filter blocked this generation: {error[:300]}")
        if status == "failed":
            raise ProviderError(f"the prediction failed: {error[:300] or 'no reason given'}")
        if status == "canceled":
            if state.cancel_requested.is_set():
                raise RunCanceled()
            raise ProviderError("the prediction was canceled at the provider")
        raise ProviderError(f"the provider aborted the prediction before it ran: {error[:200]}", retryable=True)

    async def _deliver(self, request: ExecutionRequest, state: RunState, prediction: dict[str, Any],
                       cost: float | None) -> AsyncIterator[ExecutorEvent]:
        if prediction.get("data_removed"):
            raise OutputGone("the provider deleted the output before we copied it (data_removed)")
        urls = output_urls(prediction.get("output"))
        if not urls:
            raise ProviderError("the prediction succeeded without an output file")
        yield StageEvent("downloading")
        # Downloading a finished, paid-for video gets its own time budget.
        download_deadline = Deadline(self.settings.provider_timeout_s)
        for index, url in enumerate(urls):
            if url.startswith("data:"):
                data = _decode_data_uri(url)
            else:  # output files need no credentials: never send our token to the file host
                data = (await download(self.client(), url, deadline=download_deadline, policy=self.retry,
                                       what="downloading the output", egress=self.egress)).content
            yield await self.store_output(request, data, index)
        metrics = prediction.get("metrics") or {}
        yield DoneEvent(result={"provider": self.provider, "provider_job_id": state.provider_job_id,
                                "cost_usd": cost, "predict_time_s": metrics.get("predict_time")})

    # webhooks ------------------------------------------------------------------------------
    def verify_webhook(self, headers: dict[str, str], body: bytes, secret: str,
                       now: float | None = None) -> str | None:
        """The ``webhook-id`` if the signature and timestamp are good, else None (Standard
        Webhooks, checked by the ``standardwebhooks`` library; our own tolerance on top)."""
        from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError

        lowered = {k.lower(): v for k, v in headers.items()}
        webhook_id = lowered.get("webhook-id", "")
        stamp = lowered.get("webhook-timestamp", "")
        if not webhook_id or not stamp.isdigit() or not lowered.get("webhook-signature"):
            return None
        if abs((time.time() if now is None else now) - int(stamp)) > self.webhook_tolerance_s:
            return None
        try:
            hook = Webhook(secret)
        except (ValueError, EmptyWebhookSecretError):  # binascii.Error is a ValueError
            logger.error("replicate: the webhook secret is not whsec_<base64>")
            return None
        try:
            hook.verify(body, lowered, json_parse=False)
        except (WebhookVerificationError, ValueError, binascii.Error):
            return None
        return webhook_id

    def _remember(self, webhook_id: str) -> None:
        self._seen[webhook_id] = None
        while len(self._seen) > self._remembered:
            self._seen.popitem(last=False)

    async def handle_webhook(self, provider: str, headers: dict[str, str], body: bytes) -> bool:
        """Apply a prediction update from Replicate; False (→ 401) when it is not authentic."""
        if provider != self.provider:
            return False
        self.webhook_stats["received"] += 1
        secret = self._webhook_secret
        if not secret:
            self.webhook_stats["rejected"] += 1
            logger.warning("replicate: webhook refused: no webhook secret known")
            return False
        webhook_id = self.verify_webhook(headers, body, secret)
        if webhook_id is None:
            self.webhook_stats["rejected"] += 1
            logger.warning("replicate: webhook refused: bad signature or timestamp")
            return False
        if webhook_id in self._seen:
            self.webhook_stats["duplicate"] += 1
            return True
        self._remember(webhook_id)
        try:
            prediction = json.loads(body)
        except ValueError:
            self.webhook_stats["malformed"] += 1
            return True  # authentic but unreadable: a retry would not read better
        if not isinstance(prediction, dict) or not prediction.get("id"):
            self.webhook_stats["malformed"] += 1
            return True
        prediction_id = str(prediction["id"])
        state = self._by_prediction.get(prediction_id)
        if state is None:  # not ours, from before a restart, or its create call is still answering
            self.webhook_stats["unknown"] += 1
            self._early[prediction_id] = prediction
            while len(self._early) > 1000:
                self._early.popitem(last=False)
            return True
        self.webhook_stats["applied"] += 1
        if state.loop is not None and state.loop is not asyncio.get_running_loop():
            state.loop.call_soon_threadsafe(self._update, state, prediction)  # asyncio.Event is not thread-safe
        else:
            self._update(state, prediction)
        return True

    def _update(self, state: RunState, prediction: dict[str, Any]) -> None:
        if self._apply(state, prediction):
            state.wake.set()


__all__ = ["ReplicateExecutor", "is_safety_block", "map_input", "output_urls", "parse_progress"]
