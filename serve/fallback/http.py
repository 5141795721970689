"""HTTP plumbing shared by the provider adapters: deadlines, retries, downloads, redaction.

- :class:`Deadline`: one per job (``settings.provider_timeout_s``); every sleep, retry wait and
  request timeout is cut to what is left of it.
- :func:`send_with_retry`: retries 429 and 5xx (and transport errors) with exponential backoff and
  jitter (tenacity), honouring ``Retry-After`` and the Gemini API's ``RetryInfo.retryDelay``.
  A request that is not idempotent (creating a prediction) is retried only when the provider
  cannot have acted on it (connection errors, 429, 502–504), so a retry never starts a second
  paid generation.
- :func:`download`: GET with a size cap that follows redirects by hand, sending the credential
  headers only to the provider's own origin (httpx would forward custom headers such as
  ``x-goog-api-key`` to any host a redirect names). With an egress policy, every hop that is not
  the provider's own (configured) origin is checked by :mod:`api.services.egress` and fetched
  over a connection pinned to the checked address: a provider's answer names the file URL, so
  it is not trusted more than user input.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from api.services.egress import EgressError, EgressPolicy, pinned_client

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
DEFAULT_REQUEST_TIMEOUT_S = 60.0
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# A non-idempotent request answered with one of these was not acted on, so it is safe to resend.
RETRYABLE_STATUS_NOT_IDEMPOTENT = frozenset({429, 502, 503, 504})
_SAFE_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


# errors --------------------------------------------------------------------------------------
class ProviderError(Exception):
    """A failure that ends a provider run with ``ErrorEvent(code, message, retryable)``."""

    code = "provider_failed"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


class ProviderUnavailable(ProviderError):
    """The provider kept answering 429/5xx (or could not be reached) through all retries."""

    code, retryable = "provider_unavailable", True


class ProviderTimeout(ProviderError):
    """The job did not finish at the provider within ``provider_timeout_s``."""

    code, retryable = "provider_timeout", False


class ContentPolicyBlocked(ProviderError):
    code, retryable = "content_policy", False


class ProviderHTTPError(ProviderError):
    """A non-retryable HTTP answer (4xx other than 429) from the provider."""

    def __init__(self, status: int, detail: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class _RetryableResponse(Exception):
    def __init__(self, status: int, retry_after_s: float | None, detail: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after_s = retry_after_s
        self.detail = detail


# deadlines and policy ------------------------------------------------------------------------
class Deadline:
    """A point in (monotonic) time after which a job stops waiting."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self.at = self.start + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def cap(self, seconds: float) -> float:
        return max(0.0, min(seconds, self.remaining()))


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to retry one request (each wait is also cut by the deadline)."""

    attempts: int = 6
    initial_s: float = 1.0
    max_s: float = 30.0
    max_retry_after_s: float = 120.0
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def backoff(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * 2 ** max(0, attempt - 1))
        return base + random.uniform(0.0, base * 0.25)


# Retry-After / RetryInfo -----------------------------------------------------------------------
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def parse_retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait: ``Retry-After`` (seconds or an HTTP date) or Gemini's ``retryDelay``."""
    header = response.headers.get("retry-after")
    if header:
        header = header.strip()
        try:
            return max(0.0, float(header))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(header)
            except (TypeError, ValueError):
                when = None
            if when is not None:
                return max(0.0, when.timestamp() - time.time())
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return None
    details = body.get("error", {}).get("details") if isinstance(body, dict) and isinstance(
        body.get("error"), dict) else None
    for detail in details or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


# redaction -------------------------------------------------------------------------------------
class Redactor:
    """Replaces secrets in any text we log or hand back (error messages echo provider text)."""

    def __init__(self, *secrets: str | None) -> None:
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 4 and secret not in self._secrets:
            self._secrets = sorted([*self._secrets, secret], key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


def error_detail(response: httpx.Response, limit: int = 300) -> str:
    """The useful part of a provider's error body (RFC 7807 ``detail`` or Google ``error.message``)."""
    try:
        body: Any = response.json()
    except (ValueError, UnicodeDecodeError):
        return response.text[:limit].strip() or response.reason_phrase
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            err = body["error"]
            return str(err.get("message") or err.get("status") or err)[:limit]
        for field in ("detail", "title", "error", "message"):
            if body.get(field):
                return str(body[field])[:limit]
    return json.dumps(body)[:limit]


def same_origin(a: str | httpx.URL, b: str | httpx.URL) -> bool:
    ua, ub = httpx.URL(str(a)), httpx.URL(str(b))
    return (ua.scheme, ua.host, ua.port) == (ub.scheme, ub.host, ub.port)


# requests with retries -------------------------------------------------------------------------
class _Answer:
    """A finished response (status, headers, body) whatever the way it was read."""

    def __init__(self, status_code: int, headers: httpx.Headers, content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content


def _retry_after(status: int, headers: httpx.Headers, content: bytes) -> float | None:
    return parse_retry_after(httpx.Response(status, headers={k: v for k, v in headers.items()
                                                             if k.lower() != "content-encoding"},
                                            content=content))


async def _with_retries(attempt: Any, *, deadline: Deadline, policy: RetryPolicy, what: str,
                        idempotent: bool) -> Any:
    """Run ``attempt`` (which raises :class:`_RetryableResponse` or httpx errors) under the policy."""

    def retryable(exc: BaseException) -> bool:
        if isinstance(exc, _RetryableResponse):
            return True
        if isinstance(exc, httpx.TransportError):
            return idempotent or isinstance(exc, _SAFE_TRANSPORT_ERRORS)
        return False

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = exc.retry_after_s if isinstance(exc, _RetryableResponse) else None
        if hinted is not None:
            return min(hinted, policy.max_retry_after_s)
        return policy.backoff(state.attempt_number)

    def out_of_time(state: RetryCallState) -> bool:
        return state.upcoming_sleep >= deadline.remaining()

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        reason = f"HTTP {exc.status}" if isinstance(exc, _RetryableResponse) else type(exc).__name__
        logger.info("%s: %s; retry %d/%d in %.2fs", what, reason, state.attempt_number,
                    policy.attempts - 1, state.upcoming_sleep)

    retrying = AsyncRetrying(stop=stop_after_attempt(policy.attempts) | out_of_time, wait=wait,
                             retry=retry_if_exception(retryable), reraise=True, sleep=asyncio.sleep,
                             before_sleep=log_retry)
    try:
        return await retrying(attempt)
    except _RetryableResponse as exc:
        raise ProviderUnavailable(f"{what}: the provider answered HTTP {exc.status} ({exc.detail}) "
                                  f"through {state_attempts(retrying)} attempt(s)") from None
    except httpx.TransportError as exc:
        if deadline.expired and isinstance(exc, httpx.TimeoutException):
            raise ProviderTimeout(f"{what}: timed out (provider_timeout_s={deadline.seconds:g})") from None
        raise ProviderUnavailable(f"{what}: cannot reach the provider ({type(exc).__name__})") from None


def state_attempts(retrying: AsyncRetrying) -> int:
    return int(retrying.statistics.get("attempt_number", 0)) or 1


async def send_with_retry(client: httpx.AsyncClient, method: str, url: str, *, deadline: Deadline,
                          policy: RetryPolicy, what: str, idempotent: bool = True,
                          timeout_s: float | None = None, **kwargs: Any) -> httpx.Response:
    """Send a request, retrying throttling and server errors; return the first other answer.

    Raises :class:`ProviderUnavailable` when the retries (or the deadline) run out while the
    provider still throttles or fails, and :class:`ProviderTimeout` when no time is left to try.
    """
    statuses = RETRYABLE_STATUS if idempotent else RETRYABLE_STATUS_NOT_IDEMPOTENT

    async def attempt() -> httpx.Response:
        if deadline.expired:
            raise ProviderTimeout(f"{what}: no time left (provider_timeout_s={deadline.seconds:g})")
        timeout = max(deadline.cap(timeout_s or policy.request_timeout_s), 0.001)
        response = await client.request(method, url, timeout=timeout, **kwargs)
        if response.status_code in statuses:
            raise _RetryableResponse(response.status_code, parse_retry_after(response),
                                     error_detail(response, 160))
        return response

    return await _with_retries(attempt, deadline=deadline, policy=policy, what=what, idempotent=idempotent)


def expect_json(response: httpx.Response, what: str, redact: Redactor | None = None) -> dict[str, Any]:
    """The JSON object of a 2xx answer; otherwise a :class:`ProviderHTTPError`."""
    if not response.is_success:
        detail = error_detail(response)
        raise ProviderHTTPError(response.status_code, redact(detail) if redact else detail, what)
    try:
        body = response.json()
    except ValueError:
        raise ProviderError(f"{what}: the provider answered with something that is not JSON") from None
    if not isinstance(body, dict):
        raise ProviderError(f"{what}: expected a JSON object from the provider")
    return body


# downloads -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Downloaded:
    content: bytes
    content_type: str
    url: str


class OutputGone(ProviderError):
    """The provider deleted the output before we copied it (Replicate ``data_removed``, a 404)."""

    code, retryable = "provider_failed", False


async def download(client: httpx.AsyncClient, url: str, *, deadline: Deadline, policy: RetryPolicy,
                   what: str, auth_headers: dict[str, str] | None = None, auth_origin: str | None = None,
                   max_bytes: int = 2 * 1024**3, egress: EgressPolicy | None = None) -> Downloaded:
    """GET ``url`` into memory, following redirects by hand.

    ``auth_headers`` go only to URLs on ``auth_origin`` (the provider's API); a redirect to any
    other host (the storage that actually serves the file) gets no credentials. With ``egress``,
    each hop off ``auth_origin`` must pass the egress policy and uses a pinned connection.
    """
    current = url
    hops = MAX_REDIRECTS if egress is None else min(MAX_REDIRECTS, egress.max_redirects)
    for _hop in range(hops + 1):
        trusted = bool(auth_origin and same_origin(current, auth_origin))
        headers = dict(auth_headers or {}) if trusted else {}
        if egress is None or trusted:
            answer = await _get_capped(client, current, headers=headers, deadline=deadline, policy=policy,
                                       what=what, max_bytes=max_bytes)
        else:
            try:
                hop_client = await pinned_client(egress, current, field=what)
            except EgressError as exc:
                logger.warning("%s: refused by the egress policy (%s)", what, getattr(exc, "reason", exc.code))
                raise ProviderError(f"{what}: the provider's file URL is not allowed", retryable=False) from None
            async with hop_client:
                answer = await _get_capped(hop_client, current, headers=headers, deadline=deadline,
                                           policy=policy, what=what, max_bytes=max_bytes)
        if answer.status_code in (301, 302, 303, 307, 308):
            location = answer.headers.get("location")
            if not location:
                raise ProviderError(f"{what}: a redirect without a Location header")
            current = str(httpx.URL(current).join(location))
            continue
        if answer.status_code in (404, 410):
            raise OutputGone(f"{what}: the provider no longer has the output (HTTP {answer.status_code})")
        if not 200 <= answer.status_code < 300:
            raise ProviderHTTPError(answer.status_code, answer.content[:200].decode("utf-8", "replace"), what)
        content_type = answer.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
        return Downloaded(answer.content, content_type, current)
    raise ProviderError(f"{what}: more than {hops} redirects")


async def _get_capped(client: httpx.AsyncClient, url: str, *, headers: dict[str, str], deadline: Deadline,
                      policy: RetryPolicy, what: str, max_bytes: int) -> _Answer:
    """A GET (with retries) whose body may not exceed ``max_bytes``; redirects are not followed."""

    async def attempt() -> _Answer:
        if deadline.expired:
            raise ProviderTimeout(f"{what}: no time left (provider_timeout_s={deadline.seconds:g})")
        # A large file may take longer than an API call: five request timeouts, within the deadline.
        timeout = max(deadline.cap(policy.request_timeout_s * 5), 0.001)
        request = client.build_request("GET", url, headers=headers, timeout=timeout)
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            declared = int(response.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise ProviderError(f"{what}: the output is {declared} bytes, more than {max_bytes}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ProviderError(f"{what}: the output is more than {max_bytes} bytes")
                chunks.append(chunk)
        finally:
            await response.aclose()
        answer = _Answer(response.status_code, response.headers, b"".join(chunks))
        if answer.status_code in RETRYABLE_STATUS:
            raise _RetryableResponse(answer.status_code,
                                     _retry_after(answer.status_code, answer.headers, answer.content),
                                     answer.content[:160].decode("utf-8", "replace"))
        return answer

    return await _with_retries(attempt, deadline=deadline, policy=policy, what=what, idempotent=True)


__all__ = [
    "ContentPolicyBlocked", "Deadline", "Downloaded", "OutputGone", "ProviderError", "ProviderHTTPError",
    "ProviderTimeout", "ProviderUnavailable", "Redactor", "RetryPolicy", "download", "error_detail",
    "expect_json", "parse_retry_after", "same_origin", "send_with_retry",
]
