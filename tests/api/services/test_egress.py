"""The egress policy: refused addresses never see a connection; allow-listed ones do; pinning holds."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from api.services import egress
from api.services.egress import (
    EgressPolicy,
    UrlFetchFailed,
    UrlNotAllowed,
    check_url,
    fetch,
    fetch_sync,
    post,
)
from api.settings import Settings


class Listener:
    """A loopback HTTP server that counts every request; ``routes`` maps a path to (status, headers, body)."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str, str]] = []  # (method, path, Host header)
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.hits.append((self.command, self.path, self.headers.get("host", "")))
                status, headers, body = outer.routes.get(self.path, (200, {"content-type": "image/png"}, b"ok"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener() as server:
        yield server


def stub_resolver(table: dict[str, list[str]]) -> Any:
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in table:
            raise OSError("no such host")
        return table[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


PUBLIC = "93.184.215.14"  # a public address; never connected to (only checked)


def policy(**kw: Any) -> EgressPolicy:
    kw.setdefault("resolve", stub_resolver({"public.test": [PUBLIC], "loop.test": ["127.0.0.1"],
                                            "mixed.test": [PUBLIC, "10.1.2.3"]}))
    return EgressPolicy(**kw)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x", "http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data/", "http://[::1]/",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/", "http://[::127.0.0.1]/", "http://[2002:7f00:1::]/",
    "http://[64:ff9b::a00:1]/", "http://[fd00:ec2::254]/", "http://100.100.100.200/", "http://0.0.0.0/",
    "http://224.0.0.1/", "http://240.0.0.1/", "http://192.168.1.1/", "http://172.16.0.1/", "http://[fe80::1]/",
    "http://loop.test/", "http://mixed.test/", "http://metadata.google.internal/computeMetadata/v1/",
    "http://localhost/", "ftp://public.test/", "file:///etc/passwd", "gopher://public.test/",
    "http://user:pw@public.test/", "http://100.64.0.1/",
])
def test_refused(url: str) -> None:
    with pytest.raises(UrlNotAllowed) as info:
        check_url(policy(), url, field="input.image")
    assert info.value.code == "url_not_allowed" and info.value.status == 422
    assert info.value.message == "input.image: this URL cannot be fetched"
    assert info.value.details == {"field": "input.image"}


@pytest.mark.parametrize("url", ["http://2130706433/", "http://0x7f000001/", "http://127.1/", "http://0177.0.0.1/",
                                 "http://[fec0::1]/", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/"])
def test_odd_spellings_of_internal_addresses(url: str) -> None:
    """Numeric host forms the system resolver parses locally (no DNS) still end up checked."""
    with pytest.raises(UrlNotAllowed):
        check_url(EgressPolicy(resolve=egress.socket_resolve), url, field="f")


def test_public_allowed_and_resolved_once() -> None:
    p = policy()
    assert check_url(p, "https://public.test/a.png", field="f") == [PUBLIC]
    assert p.resolve.calls == ["public.test"]  # type: ignore[attr-defined]


def test_dns_failure_at_submit_reads_like_a_refused_url() -> None:
    """A caller cannot tell an internal name that exists from one that does not resolve."""
    with pytest.raises(UrlNotAllowed) as unresolved:
        check_url(policy(), "http://nowhere.test/", field="f")
    with pytest.raises(UrlNotAllowed) as refused:
        check_url(policy(), "http://loop.test/", field="f")
    assert unresolved.value.code == refused.value.code == "url_not_allowed"
    assert unresolved.value.message == refused.value.message
    assert unresolved.value.details == refused.value.details


def test_fetch_failures_say_whether_a_retry_may_help(listener: Listener) -> None:
    import socket as socket_module

    p = EgressPolicy(allow_networks=(egress.ipaddress.ip_network("127.0.0.1/32"),))
    listener.routes["/gone"] = (404, {}, b"")
    listener.routes["/busy"] = (503, {}, b"")
    with pytest.raises(UrlFetchFailed) as gone:
        fetch_sync(p, f"http://127.0.0.1:{listener.port}/gone", field="f", max_bytes=100)
    with pytest.raises(UrlFetchFailed) as busy:
        fetch_sync(p, f"http://127.0.0.1:{listener.port}/busy", field="f", max_bytes=100)
    closed = socket_module.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    with pytest.raises(UrlFetchFailed) as refused:
        fetch_sync(p, f"http://127.0.0.1:{port}/x", field="f", max_bytes=100)
    assert not gone.value.retryable and busy.value.retryable
    assert refused.value.reason == "connect" and refused.value.retryable


def test_from_settings_allow_lists(tmp_path: Any) -> None:
    s = Settings(data_dir=tmp_path, egress_allow_hosts=["Loop.Test"], egress_allow_networks=["10.0.0.0/8"],
                 egress_max_redirects=1, egress_timeout_s=3)
    p = EgressPolicy.from_settings(s, resolve=stub_resolver({"loop.test": ["127.0.0.1"]}))
    assert check_url(p, "http://loop.test:8080/", field="f") == ["127.0.0.1"]
    assert check_url(p, "http://10.9.9.9/", field="f") == ["10.9.9.9"]
    with pytest.raises(UrlNotAllowed):
        check_url(p, "http://127.0.0.1/", field="f")
    assert p.max_redirects == 1 and p.timeout_s == 3


def test_refused_fetch_never_connects(listener: Listener) -> None:
    for url in (f"http://127.0.0.1:{listener.port}/", f"http://[::ffff:127.0.0.1]:{listener.port}/",
                f"http://loop.test:{listener.port}/"):
        with pytest.raises(UrlNotAllowed):
            fetch_sync(policy(), url, field="input.image", max_bytes=100)
    assert listener.hits == []


def test_allow_listed_network_fetches(listener: Listener) -> None:
    p = policy(allow_networks=(egress.ipaddress.ip_network("127.0.0.1/32"),))
    body = fetch_sync(p, f"http://127.0.0.1:{listener.port}/img", field="f", max_bytes=100)
    assert body.content == b"ok" and body.content_type == "image/png" and body.status == 200
    assert len(listener.hits) == 1


def test_pinned_to_checked_address_keeps_host_header(listener: Listener) -> None:
    """The name resolves (once) to loopback; the connection goes there with the original Host header."""
    p = policy(allow_hosts=frozenset({"pinned.test"}), resolve=stub_resolver({"pinned.test": ["127.0.0.1"]}))
    fetch_sync(p, f"http://pinned.test:{listener.port}/x", field="f", max_bytes=100)
    assert listener.hits == [("GET", "/x", f"pinned.test:{listener.port}")]
    assert p.resolve.calls == ["pinned.test"]  # type: ignore[attr-defined]


def test_redirect_to_loopback_refused(listener: Listener) -> None:
    with Listener() as counting:
        listener.routes["/r"] = (302, {"location": f"http://127.0.0.1:{counting.port}/"}, b"")
        p = policy(allow_hosts=frozenset({"redirector.test"}),
                   resolve=stub_resolver({"redirector.test": ["127.0.0.1"]}))
        with pytest.raises(UrlNotAllowed):
            fetch_sync(p, f"http://redirector.test:{listener.port}/r", field="f", max_bytes=100)
        assert len(listener.hits) == 1 and counting.hits == []


def test_redirects_bounded(listener: Listener) -> None:
    listener.routes["/loop"] = (302, {"location": "/loop"}, b"")
    p = policy(allow_networks=(egress.ipaddress.ip_network("127.0.0.0/8"),), max_redirects=2)
    with pytest.raises(UrlFetchFailed) as info:
        fetch_sync(p, f"http://127.0.0.1:{listener.port}/loop", field="f", max_bytes=100)
    assert "redirected too many times" in info.value.message
    assert len(listener.hits) == 3


def test_size_cap_and_safe_status_error(listener: Listener) -> None:
    listener.routes["/big"] = (200, {}, b"x" * 1000)
    listener.routes["/err"] = (500, {}, b"secret internal detail")
    p = policy(allow_networks=(egress.ipaddress.ip_network("127.0.0.0/8"),))
    with pytest.raises(UrlFetchFailed) as info:
        fetch_sync(p, f"http://127.0.0.1:{listener.port}/big", field="f", max_bytes=999)
    assert "too large" in info.value.message
    with pytest.raises(UrlFetchFailed) as info:
        fetch_sync(p, f"http://127.0.0.1:{listener.port}/err", field="f", max_bytes=999)
    assert "secret" not in info.value.message and info.value.details["status"] == 500


async def test_async_fetch_and_post(listener: Listener) -> None:
    ok = policy(allow_networks=(egress.ipaddress.ip_network("127.0.0.0/8"),))
    body = await fetch(ok, f"http://127.0.0.1:{listener.port}/a", field="f", max_bytes=100)
    assert body.content == b"ok"
    listener.routes["/hook"] = (302, {"location": "/elsewhere"}, b"")
    status = await post(ok, f"http://127.0.0.1:{listener.port}/hook", content=b"{}",
                        headers={"content-type": "application/json"}, timeout_s=5)
    assert status == 302  # never followed
    assert [h[:2] for h in listener.hits] == [("GET", "/a"), ("POST", "/hook")]
    with pytest.raises(UrlNotAllowed):
        await post(policy(), f"http://127.0.0.1:{listener.port}/hook", content=b"{}", headers={}, timeout_s=5)
    with pytest.raises(UrlNotAllowed):
        await fetch(policy(), f"http://loop.test:{listener.port}/a", field="f", max_bytes=100)
    assert len(listener.hits) == 2


# TLS: the connection is pinned to the checked address, the certificate checked against the name ----
@pytest.fixture
def tls_listener() -> Iterator[tuple[Listener, Any, list[str]]]:
    """An HTTPS listener with a certificate for ``pinned.test`` (test CA); records the SNI names."""
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("pinned.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    sni: list[str] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name or "")  # type: ignore[assignment,misc,func-returns-value]
    listener = Listener()
    listener.server.socket = server_ctx.wrap_socket(listener.server.socket, server_side=True)
    with listener:
        yield listener, ca, sni


def test_https_pinned_with_sni_and_certificate_of_the_name(tls_listener: tuple[Listener, Any, list[str]]) -> None:
    import ssl

    listener, ca, sni = tls_listener
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    p = policy(allow_hosts=frozenset({"pinned.test", "other.test"}), ssl_context=client_ctx,
               resolve=stub_resolver({"pinned.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}))
    body = fetch_sync(p, f"https://pinned.test:{listener.port}/tls", field="f", max_bytes=100)
    assert body.content == b"ok"
    assert listener.hits == [("GET", "/tls", f"pinned.test:{listener.port}")]
    assert sni == ["pinned.test"]
    # the same address under another name: the certificate does not match, nothing is fetched
    with pytest.raises(UrlFetchFailed):
        fetch_sync(p, f"https://other.test:{listener.port}/tls", field="f", max_bytes=100)
    assert len(listener.hits) == 1


async def test_post_dns_failure_is_a_transport_error_and_big_answers_are_not_read(listener: Listener) -> None:
    import httpx

    with pytest.raises(httpx.ConnectError):
        await post(policy(), "http://nowhere.test/hook", content=b"{}", headers={}, timeout_s=5)
    listener.routes["/hook"] = (200, {}, b"x" * 5_000_000)
    ok = policy(allow_networks=(egress.ipaddress.ip_network("127.0.0.1/32"),))
    assert await post(ok, f"http://127.0.0.1:{listener.port}/hook", content=b"{}", headers={}, timeout_s=5) == 200


class Trickler:
    """A loopback server that answers one header byte every ``gap`` seconds (at most ``limit``
    bytes, then it closes): per-read timeouts never fire against it."""

    def __init__(self, gap: float = 0.2, limit: int = 100) -> None:
        import socket as socket_module

        self.sock = socket_module.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.gap, self.limit = gap, limit
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.sock.settimeout(10)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            payload = b"HTTP/1.1 200 OK\r\n" + b"x-slow: " + b"a" * self.limit
            for byte in payload[: self.limit]:
                if self.stop.wait(self.gap):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def __enter__(self) -> Trickler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(15)


def test_trickled_headers_are_cut_at_the_total_deadline() -> None:
    import time

    with Trickler() as server:  # 100 bytes * 0.2 s: 20 s without a total cap
        p = EgressPolicy(allow_networks=(egress.ipaddress.ip_network("127.0.0.1/32"),))
        started = time.monotonic()
        with pytest.raises(UrlFetchFailed) as info:
            fetch_sync(p, f"http://127.0.0.1:{server.port}/slow", field="input.image", max_bytes=1000,
                       timeout_s=1.0)
        assert info.value.reason == "timeout" and info.value.retryable
        assert time.monotonic() - started < 6


def test_each_connect_gets_only_the_time_left() -> None:
    import time

    import httpcore

    seen: list[float | None] = []

    class Refusing(httpcore.SyncBackend):
        def connect_tcp(self, host: str, port: int, timeout: float | None = None, **kw: Any) -> Any:
            seen.append(timeout)
            raise httpcore.ConnectTimeout("stub")

    backend = egress._PinnedBackend(["127.0.0.1", "::1"], 80, end=time.monotonic() + 1.0)
    backend._inner = Refusing()
    with pytest.raises(httpcore.ConnectTimeout):
        backend.connect_tcp("public.test", 80, timeout=20.0)
    assert len(seen) == 2 and all(t is not None and t <= 1.0 for t in seen)
    late = egress._PinnedBackend(["127.0.0.1"], 80, end=time.monotonic() - 1)
    late._inner = Refusing()
    seen.clear()
    with pytest.raises(httpcore.ConnectTimeout):
        late.connect_tcp("public.test", 80, timeout=20.0)
    assert seen == []  # past the deadline: no connect is even tried
