"""Provider file downloads go through the egress policy: a file URL a provider names is not trusted.

The provider's own (configured) origin is reached with the adapter's client; any other hop is
checked and fetched over a pinned connection. Refused hops never reach a socket.
"""

from __future__ import annotations

import httpx
import pytest

from api.services.egress import EgressPolicy
from serve.fallback.http import Deadline, ProviderError, RetryPolicy, download
from tests.api.services.test_egress import Listener

FAST = RetryPolicy(attempts=2, initial_s=0.01, max_s=0.02, max_retry_after_s=1.0, request_timeout_s=2.0)


def _no_dns(host: str, port: int) -> list[str]:
    raise OSError("no DNS in tests")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/out.mp4", "http://10.0.0.1/out.mp4",
                                 "http://169.254.169.254/latest/", "http://[::ffff:127.0.0.1]/x", "file:///etc/passwd"])
async def test_refused_file_urls_never_connect(url: str) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(200, content=b"video")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ProviderError, match="not allowed") as info:
            await download(client, url, deadline=Deadline(5), policy=FAST, what="downloading the output",
                           egress=EgressPolicy(resolve=_no_dns))
    assert info.value.retryable is False
    assert calls == []


async def test_a_redirect_from_the_provider_to_an_internal_address_is_refused() -> None:
    """The provider's API (trusted configuration) answers with a redirect to a private address."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(302, headers={"location": "http://10.0.0.1/bucket/out.mp4"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ProviderError, match="not allowed"):
            await download(client, "https://provider.test/v1/files/1:download", deadline=Deadline(5), policy=FAST,
                           what="downloading the video", auth_headers={"x-key": "k"},
                           auth_origin="https://provider.test", egress=EgressPolicy(resolve=_no_dns))
    assert calls == ["https://provider.test/v1/files/1:download"]


async def test_allow_listed_file_host_is_fetched_pinned() -> None:
    with Listener() as files:
        files.routes["/out.mp4"] = (200, {"content-type": "video/mp4"}, b"MP4DATA")
        policy = EgressPolicy(allow_hosts=frozenset({"cdn.test"}), resolve=lambda host, port: ["127.0.0.1"])
        async with httpx.AsyncClient() as unused:  # the adapter's client is not used off its origin
            got = await download(unused, f"http://cdn.test:{files.port}/out.mp4", deadline=Deadline(5),
                                 policy=FAST, what="downloading the output", egress=policy)
        assert got.content == b"MP4DATA" and got.content_type == "video/mp4"
        assert files.hits == [("GET", "/out.mp4", f"cdn.test:{files.port}")]
