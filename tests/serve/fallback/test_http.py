"""Retry, deadline, redirect and redaction helpers (httpx MockTransport: no sockets at all)."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from serve.fallback.http import (
    Deadline,
    OutputGone,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    Redactor,
    RetryPolicy,
    download,
    parse_retry_after,
    send_with_retry,
)

FAST = RetryPolicy(attempts=4, initial_s=0.01, max_s=0.02, max_retry_after_s=5.0, request_timeout_s=2.0)


def _client(handler) -> httpx.AsyncClient:  # noqa: ANN001 - an httpx handler
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(("headers", "body", "expected"), [
    ({"Retry-After": "7"}, b"", 7.0),
    ({"Retry-After": "1.5"}, b"", 1.5),
    ({}, b'{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": ['
         b'{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}}', 30.0),
    ({}, b'{"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.25s"}]}}',
     0.25),
    ({}, b'{"detail": "Request was throttled."}', None),
    ({}, b"not json", None),
])
def test_parse_retry_after(headers: dict[str, str], body: bytes, expected: float | None) -> None:
    assert parse_retry_after(httpx.Response(429, headers=headers, content=body)) == expected


def test_parse_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 15 < parse_retry_after(httpx.Response(429, headers={"Retry-After": when})) <= 20


async def test_idempotent_requests_retry_500_but_creates_do_not() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        return httpx.Response(500, json={"detail": "boom"})

    async with _client(handler) as client:
        with pytest.raises(ProviderUnavailable, match="HTTP 500"):
            await send_with_retry(client, "GET", "http://p/x", deadline=Deadline(5), policy=FAST, what="get")
        assert calls == ["GET"] * FAST.attempts
        calls.clear()
        # A 500 to a create call may have started a paid job: hand it back, do not resend.
        response = await send_with_retry(client, "POST", "http://p/x", deadline=Deadline(5), policy=FAST,
                                         what="create", idempotent=False)
        assert response.status_code == 500 and calls == ["POST"]


async def test_creates_retry_only_errors_that_prove_nothing_was_sent() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("refused", request=request)
        if calls == 2:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(201, json={"id": "p"})

    async with _client(handler) as client:
        with pytest.raises(ProviderUnavailable, match="ReadTimeout"):
            await send_with_retry(client, "POST", "http://p/x", deadline=Deadline(5), policy=FAST, what="create",
                                  idempotent=False)
    assert calls == 2  # the connect error was retried; the read timeout (maybe created) was not


async def test_a_long_retry_after_is_cut_by_the_deadline() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "100"})

    started = time.monotonic()
    async with _client(handler) as client:
        with pytest.raises(ProviderUnavailable, match="429"):
            await send_with_retry(client, "GET", "http://p/x", deadline=Deadline(0.5),
                                  policy=RetryPolicy(attempts=10, max_retry_after_s=200), what="get")
    assert time.monotonic() - started < 1.0


async def test_no_time_left_is_a_timeout() -> None:
    async with _client(lambda request: httpx.Response(200)) as client:
        with pytest.raises(ProviderTimeout):
            await send_with_retry(client, "GET", "http://p/x", deadline=Deadline(0), policy=FAST, what="get")


async def test_download_sends_the_key_only_to_the_api_origin() -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers.get("x-goog-api-key")))
        if request.url.host == "api.test" and request.url.path == "/files/1":
            return httpx.Response(302, headers={"Location": "/files/1/hop"})
        if request.url.host == "api.test":
            return httpx.Response(307, headers={"Location": "https://storage.test/blob?sig=1"})
        return httpx.Response(200, content=b"video", headers={"Content-Type": "video/mp4"})

    async with _client(handler) as client:
        got = await download(client, "https://api.test/files/1", deadline=Deadline(5), policy=FAST, what="dl",
                             auth_headers={"x-goog-api-key": "KEY"}, auth_origin="https://api.test")
    assert got.content == b"video" and got.content_type == "video/mp4"
    assert seen == [("api.test", "KEY"), ("api.test", "KEY"), ("storage.test", None)]


async def test_download_limits() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/gone":
            return httpx.Response(404)
        if request.url.path == "/big":
            return httpx.Response(200, content=b"x" * 2048)
        return httpx.Response(302, headers={"Location": "/loop"})

    async with _client(handler) as client:
        with pytest.raises(OutputGone):
            await download(client, "http://f/gone", deadline=Deadline(5), policy=FAST, what="dl")
        with pytest.raises(ProviderError, match="more than 1024"):
            await download(client, "http://f/big", deadline=Deadline(5), policy=FAST, what="dl", max_bytes=1024)
        with pytest.raises(ProviderError, match="redirects"):
            await download(client, "http://f/loop", deadline=Deadline(5), policy=FAST, what="dl")


async def test_download_caps_a_stream_without_a_length() -> None:
    async def chunks():  # noqa: ANN202 - an async byte stream (no Content-Length)
        for _ in range(8):
            yield b"x" * 512

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    async with _client(handler) as client:
        with pytest.raises(ProviderError, match="more than 1024 bytes"):
            await download(client, "http://f/stream", deadline=Deadline(5), policy=FAST, what="dl", max_bytes=1024)
        got = await download(client, "http://f/stream", deadline=Deadline(5), policy=FAST, what="dl")
    assert got.content == b"x" * 4096


def test_redactor() -> None:
    redact = Redactor("r8_secret-token", None, "")
    redact.add("whsec_abcdef")
    assert redact("token r8_secret-token and whsec_abcdef!") == "token [redacted] and [redacted]!"
    assert redact("nothing here") == "nothing here"
