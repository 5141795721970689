"""One policy for every URL the server fetches or posts to (image URLs, client webhooks, provider files).

Only http(s); the host is resolved once and every address it resolves to is checked: loopback,
private, link-local, multicast, reserved, unspecified, shared (CGNAT) and the cloud metadata
addresses are refused, and so are IPv6 forms that embed such an IPv4 address (IPv4-mapped,
IPv4-compatible, 6to4, Teredo, NAT64). ``egress_allow_hosts`` / ``egress_allow_networks`` let
chosen hosts or networks through (development and tests).

A request connects only to the address that was checked: the connection is pinned to it by a
network backend that ignores the name httpcore asks for (the URL, the ``Host`` header and TLS SNI
keep the real name), so DNS rebinding cannot swap the address between check and connect.
Redirects are followed by hand, each hop checked again, at most ``egress_max_redirects``.
Bodies are streamed and cut at ``max_bytes``; the whole request is bounded in time. Errors carry
a stable code and a safe message; the detail goes to the log only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from api.core.errors import InvalidInput
from api.settings import Settings

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Names refused whatever they resolve to (they are metadata services on the clouds we run on).
BLOCKED_NAMES = frozenset({"metadata.google.internal", "metadata", "metadata.goog", "instance-data",
                           "instance-data.ec2.internal", "localhost", "localhost.localdomain"})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")


# errors ----------------------------------------------------------------------------------------
class EgressError(InvalidInput):
    """An outbound request that was refused or failed; the message is safe to show the caller."""

    code = "url_fetch_failed"


class UrlNotAllowed(EgressError):
    code, status = "url_not_allowed", 422

    def __init__(self, field: str, reason: str = "") -> None:
        super().__init__(f"{field}: this URL cannot be fetched", {"field": field})
        self.reason = reason  # for the log only


# Failures worth another attempt later (the network or the host's server, not the URL itself).
RETRYABLE_REASONS = frozenset({"timeout", "dns", "connect"})
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class UrlFetchFailed(EgressError):
    code, status = "url_fetch_failed", 422

    def __init__(self, field: str, what: str = "could not fetch the URL", *, reason: str = "",
                 status_code: int | None = None) -> None:
        details: dict[str, Any] = {"field": field}
        if status_code is not None:
            details["status"] = status_code
        super().__init__(f"{field}: {what}", details)
        self.reason = reason
        # read by the runner: a job whose input fetch timed out or could not connect is retried
        self.retryable = reason in RETRYABLE_REASONS or status_code in RETRYABLE_STATUSES


# policy ----------------------------------------------------------------------------------------
def default_resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (``socket.getaddrinfo``), in the order returned."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]
        if address not in seen:
            seen.append(address)
    return seen


socket_resolve = default_resolve  # the system resolver, under a name tests do not replace


@dataclass(frozen=True)
class EgressPolicy:
    schemes: frozenset[str] = frozenset({"http", "https"})
    allow_hosts: frozenset[str] = frozenset()          # lower-case host names (or IP literals)
    allow_networks: tuple[IPNetwork, ...] = ()
    max_redirects: int = 3
    timeout_s: float = 20.0
    resolve: Resolver = field(default=default_resolve, compare=False)
    # TLS trust for https (None: the system's CAs); the certificate is verified against the URL's name
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, resolve: Resolver | None = None) -> EgressPolicy:
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in settings.egress_allow_networks)
        return cls(allow_hosts=frozenset(h.strip().lower().strip("[]") for h in settings.egress_allow_hosts),
                   allow_networks=networks, max_redirects=settings.egress_max_redirects,
                   timeout_s=settings.egress_timeout_s, resolve=resolve or default_resolve)

    def allows_address(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.allow_networks)


def _embedded_v4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64)."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    packed = address.packed
    if packed[:12] == bytes(12) and int(address) > 1:  # ::a.b.c.d (deprecated IPv4-compatible)
        found.append(ipaddress.IPv4Address(packed[12:]))
    if address in _NAT64:
        found.append(ipaddress.IPv4Address(packed[12:]))
    return found


def forbidden_reason(address: IPAddress) -> str | None:
    """Why ``address`` may not be reached from the server, or None when it is a public address."""
    if address in METADATA_ADDRESSES:
        return "metadata"
    checks = (("loopback", address.is_loopback), ("unspecified", address.is_unspecified),
              ("link-local", address.is_link_local), ("multicast", address.is_multicast),
              ("private", address.is_private), ("reserved", address.is_reserved))
    for name, hit in checks:
        if hit:
            return name
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "shared"
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return "site-local"
        for inner in _embedded_v4(address):
            reason = forbidden_reason(inner)
            if reason:
                return f"embedded-{reason}"
    if not address.is_global:
        return "not-global"
    return None


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str
    port: int
    addresses: list[str]


def _target(policy: EgressPolicy, url: str | httpx.URL, field: str) -> _Target:
    try:
        parsed = httpx.URL(str(url))
    except (httpx.InvalidURL, ValueError, TypeError):
        raise UrlNotAllowed(field, "unparseable") from None
    scheme = parsed.scheme.lower()
    if scheme not in policy.schemes:
        raise UrlNotAllowed(field, f"scheme {scheme!r}")
    host = (parsed.host or "").lower().rstrip(".")
    if not host:
        raise UrlNotAllowed(field, "no host")
    if parsed.userinfo:
        raise UrlNotAllowed(field, "credentials in the URL")
    port = parsed.port or (443 if scheme == "https" else 80)
    host_allowed = host in policy.allow_hosts
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        if not host_allowed and (host in BLOCKED_NAMES or host.endswith((".localhost", ".internal"))):
            raise UrlNotAllowed(field, f"blocked name {host}")
        try:
            addresses = list(policy.resolve(host, port))
        except (OSError, UnicodeError) as exc:
            logger.info("egress: %s does not resolve: %s", host, exc)
            raise UrlFetchFailed(field, reason="dns") from None
        if not addresses:
            raise UrlFetchFailed(field, reason="dns")
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            raise UrlNotAllowed(field, f"bad address {text!r}") from None
        if host_allowed or policy.allows_address(address):
            continue
        reason = forbidden_reason(address)
        if reason:
            logger.info("egress refused for %s: %s resolves to %s (%s)", field, host, address, reason)
            raise UrlNotAllowed(field, f"{reason} address")
    return _Target(parsed, host, port, addresses)


def check_url(policy: EgressPolicy, url: str, *, field: str) -> list[str]:
    """Check ``url`` against the policy (scheme, host, every address it resolves to).

    Returns the checked addresses; raises :class:`UrlNotAllowed`, also when the name does not
    resolve: at submit the caller gets one answer for both, so it cannot use the difference to
    map which internal names exist.
    """
    try:
        return _target(policy, url, field).addresses
    except UrlFetchFailed as exc:
        raise UrlNotAllowed(field, exc.reason) from None


# pinned connections ---------------------------------------------------------------------------
def _bounded(timeout: float | None, end: float | None, error: type[Exception]) -> float | None:
    """``timeout`` cut to what is left before ``end`` (a ``time.monotonic`` instant); ``error`` once
    it has passed. httpx timeouts are per operation: this is what bounds the whole request."""
    if end is None:
        return timeout
    left = end - time.monotonic()
    if left <= 0:
        raise error("egress: the request's time is up")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every read, write and TLS handshake ends by the request's deadline
    (a server trickling a byte at a time cannot hold a fetch past it)."""

    def __init__(self, inner: httpcore.NetworkStream, end: float | None) -> None:
        self._inner, self._end = inner, end

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, self._end, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, self._end, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname,
                                      _bounded(timeout, self._end, httpcore.ConnectTimeout))
        return _DeadlineStream(inner, self._end)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _AsyncDeadlineStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream, end: float | None) -> None:
        self._inner, self._end = inner, end

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, _bounded(timeout, self._end, httpcore.ReadTimeout))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, _bounded(timeout, self._end, httpcore.WriteTimeout))

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        inner = await self._inner.start_tls(ssl_context, server_hostname,
                                            _bounded(timeout, self._end, httpcore.ConnectTimeout))
        return _AsyncDeadlineStream(inner, self._end)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the checked addresses (in order, the next on failure) whatever name httpcore
    asks for; TLS still uses the name. With ``end`` (a ``time.monotonic`` instant) every connect,
    read and write is cut to the time left, so ``end`` bounds the whole request."""

    def __init__(self, addresses: list[str], port: int, end: float | None = None) -> None:
        self._addresses, self._port, self._end = list(addresses), port, end
        self._inner: httpcore.NetworkBackend = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        if port != self._port:
            raise httpcore.ConnectError("egress: connection to an unchecked port")
        error: Exception = httpcore.ConnectError("egress: no address to connect to")
        for address in self._addresses:
            try:
                stream = self._inner.connect_tcp(
                    address, port, timeout=_bounded(timeout, self._end, httpcore.ConnectTimeout),
                    local_address=local_address, socket_options=socket_options)
                return _DeadlineStream(stream, self._end)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("egress: unix sockets are not allowed")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _PinnedAsyncBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, addresses: list[str], port: int, end: float | None = None) -> None:
        self._addresses, self._port, self._end = list(addresses), port, end
        self._inner: httpcore.AsyncNetworkBackend = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        if port != self._port:
            raise httpcore.ConnectError("egress: connection to an unchecked port")
        error: Exception = httpcore.ConnectError("egress: no address to connect to")
        for address in self._addresses:
            try:
                stream = await self._inner.connect_tcp(
                    address, port, timeout=_bounded(timeout, self._end, httpcore.ConnectTimeout),
                    local_address=local_address, socket_options=socket_options)
                return _AsyncDeadlineStream(stream, self._end)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("egress: unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PinnedTransport(httpx.HTTPTransport):
    """An httpx transport whose every connection goes to one checked address.

    httpcore still does TLS with the URL's host name (SNI and certificate check) and httpx sends
    it as ``Host``; only the TCP connect is redirected to the pinned address.
    """

    def __init__(self, addresses: list[str], port: int, ssl_context: ssl.SSLContext | None = None,
                 *, deadline: float | None = None) -> None:
        super().__init__(retries=0)
        self._pool = httpcore.ConnectionPool(ssl_context=ssl_context or httpx.create_ssl_context(),
                                             max_connections=1, retries=0,
                                             network_backend=_PinnedBackend(addresses, port, deadline))


class AsyncPinnedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, addresses: list[str], port: int, ssl_context: ssl.SSLContext | None = None,
                 *, deadline: float | None = None) -> None:
        super().__init__(retries=0)
        self._pool = httpcore.AsyncConnectionPool(ssl_context=ssl_context or httpx.create_ssl_context(),
                                                  max_connections=1, retries=0,
                                                  network_backend=_PinnedAsyncBackend(addresses, port, deadline))


def _client(policy: EgressPolicy, target: _Target, deadline: float | None = None) -> httpx.Client:
    """Pinned to the checked addresses; no redirects, no proxies from the environment; every
    network operation ends by ``deadline`` (a ``time.monotonic`` instant) when given."""
    transport = PinnedTransport(target.addresses, target.port, policy.ssl_context, deadline=deadline)
    return httpx.Client(transport=transport, trust_env=False, follow_redirects=False)


def _async_client(policy: EgressPolicy, target: _Target, deadline: float | None = None,
                  **kwargs: Any) -> httpx.AsyncClient:
    transport = AsyncPinnedTransport(target.addresses, target.port, policy.ssl_context, deadline=deadline)
    return httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False, **kwargs)


# fetch / post ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FetchedBody:
    content: bytes
    content_type: str
    url: str          # the final URL, after redirects
    status: int


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self, field: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise UrlFetchFailed(field, "the URL took too long to answer", reason="timeout")
        return left


def _next_url(current: httpx.URL, response: httpx.Response, field: str) -> str:
    location = response.headers.get("location")
    if not location:
        raise UrlFetchFailed(field, "the URL redirected without a location", reason="redirect")
    return str(current.join(location))


def _final(response: httpx.Response, chunks: list[bytes], url: httpx.URL) -> FetchedBody:
    content_type = response.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    return FetchedBody(b"".join(chunks), content_type, str(url), response.status_code)


def _too_large(field: str) -> UrlFetchFailed:
    return UrlFetchFailed(field, "the URL's content is too large", reason="too_large")


def _status_failed(field: str, status: int) -> UrlFetchFailed:
    return UrlFetchFailed(field, f"the URL answered with HTTP {status}", reason="status", status_code=status)


def _network_failed(field: str, exc: Exception) -> UrlFetchFailed:
    logger.info("egress fetch for %s failed: %s: %s", field, type(exc).__name__, exc)
    transient = isinstance(exc, (httpx.TransportError, httpcore.ConnectError))
    return UrlFetchFailed(field, reason="connect" if transient else type(exc).__name__)


class _Body:
    """A non-redirect answer's body, checked and collected the same way by both fetch loops:
    a 2xx status, a declared length within ``max_bytes``, and the bytes as they arrive."""

    def __init__(self, response: httpx.Response, field: str, max_bytes: int) -> None:
        if not 200 <= response.status_code < 300:
            raise _status_failed(field, response.status_code)
        if int(response.headers.get("content-length") or 0) > max_bytes:
            raise _too_large(field)
        self.response, self.field, self.max_bytes = response, field, max_bytes
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise _too_large(self.field)
        self.chunks.append(chunk)

    def result(self, url: httpx.URL) -> FetchedBody:
        return _final(self.response, self.chunks, url)


def fetch_sync(policy: EgressPolicy, url: str, *, field: str, max_bytes: int,
               timeout_s: float | None = None) -> FetchedBody:
    """GET ``url`` under the policy (see the module docstring); the body must be a 2xx answer."""
    deadline = _Deadline(timeout_s or policy.timeout_s)
    current: str = url
    for _hop in range(policy.max_redirects + 1):
        target = _target(policy, current, field)
        try:
            with _client(policy, target, deadline.end) as client:
                with client.stream("GET", target.url, timeout=deadline.remaining(field)) as response:
                    if response.status_code in REDIRECT_STATUSES:
                        current = _next_url(target.url, response, field)
                        continue
                    body = _Body(response, field, max_bytes)
                    for chunk in response.iter_bytes():
                        body.add(chunk)
                        deadline.remaining(field)
                    return body.result(target.url)
        except httpx.TimeoutException:
            raise UrlFetchFailed(field, "the URL took too long to answer", reason="timeout") from None
        except (httpx.HTTPError, httpcore.ConnectError, ValueError) as exc:
            raise _network_failed(field, exc) from None
    raise UrlFetchFailed(field, "the URL redirected too many times", reason="redirects")


async def fetch(policy: EgressPolicy, url: str, *, field: str, max_bytes: int,
                timeout_s: float | None = None) -> FetchedBody:
    """Async twin of :func:`fetch_sync`. Name resolution runs in a thread."""
    seconds = timeout_s or policy.timeout_s
    deadline = _Deadline(seconds)
    try:
        async with asyncio.timeout(seconds):
            return await _fetch_async(policy, url, field=field, max_bytes=max_bytes, deadline=deadline)
    except TimeoutError:
        raise UrlFetchFailed(field, "the URL took too long to answer", reason="timeout") from None


async def _fetch_async(policy: EgressPolicy, url: str, *, field: str, max_bytes: int,
                       deadline: _Deadline) -> FetchedBody:
    current: str = url
    for _hop in range(policy.max_redirects + 1):
        target = await asyncio.to_thread(_target, policy, current, field)
        try:
            async with _async_client(policy, target, deadline.end) as client:
                async with client.stream("GET", target.url, timeout=deadline.remaining(field)) as response:
                    if response.status_code in REDIRECT_STATUSES:
                        current = _next_url(target.url, response, field)
                        continue
                    body = _Body(response, field, max_bytes)
                    async for chunk in response.aiter_bytes():
                        body.add(chunk)
                    return body.result(target.url)
        except httpx.TimeoutException:
            raise UrlFetchFailed(field, "the URL took too long to answer", reason="timeout") from None
        except (httpx.HTTPError, httpcore.ConnectError, ValueError) as exc:
            raise _network_failed(field, exc) from None
    raise UrlFetchFailed(field, "the URL redirected too many times", reason="redirects")


async def pinned_client(policy: EgressPolicy, url: str, *, field: str, **kwargs: Any) -> httpx.AsyncClient:
    """Check ``url`` (resolution in a thread) and return a client whose connections go only to the
    checked address (no redirects, no proxies from the environment). The caller closes it."""
    target = await asyncio.to_thread(_target, policy, url, field)
    return _async_client(policy, target, **kwargs)


async def post(policy: EgressPolicy, url: str, *, content: bytes, headers: dict[str, str],
               timeout_s: float, field: str = "webhook_url") -> int:
    """POST ``content`` to ``url`` (checked and pinned; redirects are never followed).

    Returns the HTTP status. Raises :class:`UrlNotAllowed` (an :class:`EgressError`) when the URL
    is refused and ``httpx.TransportError`` when the network fails (a name that does not resolve
    is one: ``httpx.ConnectError``, worth a retry) or the exchange takes over twice ``timeout_s``.
    """
    try:
        target = await asyncio.to_thread(_target, policy, url, field)
    except UrlFetchFailed:
        raise httpx.ConnectError("the webhook host does not resolve") from None
    try:
        async with asyncio.timeout(timeout_s * 2):  # the whole exchange, not just each read
            async with _async_client(policy, target, time.monotonic() + timeout_s * 2) as client:
                # streamed and closed unread: a receiver's (maybe huge) answer body is never loaded
                async with client.stream("POST", target.url, content=content, headers=headers,
                                         timeout=timeout_s) as response:
                    return response.status_code
    except TimeoutError:
        raise httpx.ReadTimeout("the webhook receiver took too long") from None


__all__ = [
    "AsyncPinnedTransport", "EgressError", "EgressPolicy", "FetchedBody", "PinnedTransport",
    "UrlFetchFailed", "UrlNotAllowed", "check_url", "default_resolve", "fetch", "fetch_sync",
    "forbidden_reason", "pinned_client", "post",
]
