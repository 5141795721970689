"""Refused URLs at ``POST /v1/jobs``: 422 ``url_not_allowed``, no job, no credit moved, no request sent.

Every refused URL points at a counting loopback listener (or at an address that is refused
before any connect); the listener must see zero requests.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable, Iterator

import pytest
from PIL import Image

from api.services import egress
from tests.api.services.test_egress import Listener
from tests.fixtures.harness import ApiHarness, balance, job_count, ledger_rows, wait_job


@pytest.fixture
def counting() -> Iterator[Listener]:
    with Listener() as server:
        yield server


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """A stub resolver (no DNS): ``loop.test`` and ``redirector.test`` resolve to loopback."""
    table: dict[str, list[str]] = {"loop.test": ["127.0.0.1"], "redirector.test": ["127.0.0.1"],
                                   "public.test": ["93.184.215.14"]}

    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    monkeypatch.setattr(egress, "default_resolve", resolve)
    return table


def refused_urls(port: int) -> list[str]:
    return [f"http://127.0.0.1:{port}/x", "http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data/",
            f"http://[::1]:{port}/x", f"http://[::ffff:127.0.0.1]:{port}/x", f"http://loop.test:{port}/x",
            "http://metadata.google.internal/computeMetadata/v1/"]


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("where", ["image", "webhook"])
async def test_refused_at_submit(make_api: Callable[..., Awaitable[ApiHarness]], counting: Listener,
                                 names: dict[str, list[str]], where: str) -> None:
    api = await make_api(egress_allow_networks=[], egress_allow_hosts=[])
    user = api.user(credits=50)
    before, rows = balance(api.db, user.user.id), len(ledger_rows(api.db, user.user.id))
    for url in refused_urls(counting.port):
        if where == "image":
            r = await api.submit(user.api_key, input={"prompt": "a cat", "image": url})
            field = "input.image"
        else:
            r = await api.submit(user.api_key, webhook=url)
            field = "webhook"
        assert r.status_code == 422, (url, r.text)
        error = r.json()["error"]
        assert error == {"code": "url_not_allowed", "message": f"{field}: this URL cannot be fetched",
                         "details": {"field": field}}, url
    assert job_count(api.db, user.user.id) == 0
    assert balance(api.db, user.user.id) == before
    assert len(ledger_rows(api.db, user.user.id)) == rows
    assert counting.hits == []


async def test_public_url_redirecting_to_loopback_fails_uncharged(
        make_api: Callable[..., Awaitable[ApiHarness]], counting: Listener, names: dict[str, list[str]]) -> None:
    """The redirector is allow-listed (by name); the loopback address it redirects to is not."""
    with Listener() as redirector:
        redirector.routes["/img.png"] = (302, {"location": f"http://127.0.0.1:{counting.port}/secret"}, b"")
        api = await make_api(egress_allow_networks=[], egress_allow_hosts=["redirector.test"])
        user = api.user(credits=50)
        before = balance(api.db, user.user.id)
        r = await api.submit(user.api_key, input={"prompt": "a cat",
                                                  "image": f"http://redirector.test:{redirector.port}/img.png"})
        assert r.status_code == 202, r.text  # the first hop is allowed: checked again when fetched
        job = await wait_job(api.db, r.json()["id"])
        assert job.status == "failed"
        assert job.error_code == "url_not_allowed"
        assert len(redirector.hits) == 1
    assert counting.hits == []
    after = balance(api.db, user.user.id)
    assert (after.available, after.reserved) == (before.available, before.reserved)


async def test_allow_listed_test_server_is_fetched(make_api: Callable[..., Awaitable[ApiHarness]],
                                                   counting: Listener) -> None:
    counting.routes["/cat.png"] = (200, {"content-type": "image/png"}, png())
    api = await make_api(egress_allow_networks=["127.0.0.1/32"])
    user = api.user(credits=50)
    r = await api.submit(user.api_key, input={"prompt": "a cat", "image": f"http://127.0.0.1:{counting.port}/cat.png"})
    assert r.status_code == 202, r.text
    job = await wait_job(api.db, r.json()["id"])
    assert job.status == "succeeded", job.error_message
    assert [h[:2] for h in counting.hits] == [("GET", "/cat.png")]


async def test_name_that_changes_to_loopback_after_submit_is_refused_at_fetch(
        make_api: Callable[..., Awaitable[ApiHarness]], counting: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: public when submitted, loopback when fetched. The fetch re-checks: refused, refunded."""
    answers = iter([["93.184.215.14"]])

    def resolve(host: str, port: int) -> list[str]:
        assert host == "flip.test"
        return next(answers, ["127.0.0.1"])

    monkeypatch.setattr(egress, "default_resolve", resolve)
    api = await make_api(egress_allow_networks=[], egress_allow_hosts=[])
    user = api.user(credits=50)
    before = balance(api.db, user.user.id)
    r = await api.submit(user.api_key, input={"prompt": "a cat", "image": f"http://flip.test:{counting.port}/a.png"})
    assert r.status_code == 202, r.text
    job = await wait_job(api.db, r.json()["id"])
    assert (job.status, job.error_code) == ("failed", "url_not_allowed")
    assert counting.hits == []
    after = balance(api.db, user.user.id)
    assert (after.available, after.reserved) == (before.available, before.reserved)
