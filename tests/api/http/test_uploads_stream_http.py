"""``POST /v1/uploads`` streams: the limits answer 413 before the body is read, nothing is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select

from api.db.tables import Upload
from tests.api.services.test_uploads_limits import CTYPE, END, part_head, png
from tests.fixtures.harness import ApiHarness, bearer


@pytest.fixture
async def h(make_api: Any) -> ApiHarness:
    return await make_api(run_runner=False, max_upload_bytes=10_000, max_upload_files=2,
                          max_upload_request_bytes=50_000)


def stored(h: ApiHarness) -> tuple[int, list[str]]:
    with h.db.read() as s:
        return s.execute(select(func.count()).select_from(Upload)).scalar_one(), h.storage.list("uploads")


class Counting:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.pulled = chunks, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk


async def test_declared_length_over_the_cap_is_413(h: ApiHarness) -> None:
    user = h.user()
    body = part_head() + png() + b"\r\n" + END
    r = await h.client.post("/v1/uploads", content=body, headers={
        **bearer(user.api_key), "content-type": CTYPE, "content-length": str(60_000)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert stored(h) == (0, [])


async def test_chunked_body_over_a_part_limit_is_cut_short(h: ApiHarness) -> None:
    user = h.user()
    body = Counting([part_head(), b"\x89PNG" + b"\0" * 8_000] + [b"\0" * 8_000] * 20 + [b"\r\n", END])
    r = await h.client.post("/v1/uploads", content=body, headers={**bearer(user.api_key), "content-type": CTYPE})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert body.pulled < 5  # refused a few chunks in, not after the 160 kB were sent
    assert stored(h) == (0, [])


async def test_too_many_files_is_refused_before_their_bodies(h: ApiHarness) -> None:
    user = h.user()
    image = png()
    chunks: list[bytes] = []
    for i in range(3):
        chunks += [part_head(filename=f"{i}.png"), image, b"\r\n"]
    body = Counting(chunks + [END])
    r = await h.client.post("/v1/uploads", content=body, headers={**bearer(user.api_key), "content-type": CTYPE})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_files"
    assert body.pulled == 7  # the third file's body was never read
    assert stored(h) == (0, [])


async def test_unauthenticated_upload_is_not_read(h: ApiHarness) -> None:
    body = Counting([part_head(), png(), b"\r\n", END])
    r = await h.client.post("/v1/uploads", content=body, headers={"content-type": CTYPE})
    assert r.status_code == 401
    assert body.pulled == 0


async def test_multipart_upload_still_works(h: ApiHarness) -> None:
    user = h.user()
    r = await h.client.post("/v1/uploads", files=[("file", ("a.png", png(), "image/png")),
                                                  ("file", ("b.png", png(), "image/png"))],
                            headers=bearer(user.api_key))
    assert r.status_code == 201, r.text
    assert len(r.json()["data"]) == 2 and stored(h)[0] == 2


def test_over_a_real_socket(settings: Any, storage: Any, live_server: Any) -> None:
    """uvicorn: a multipart upload works; a chunked body (no Content-Length) over the cap gets 413.

    The body is kept small (64 kB) so the client finishes sending before the server answers;
    that the server stops reading early is shown in-process above (chunks pulled).
    """
    import httpx

    from api.http.app import create_app
    from tests.fixtures.fake_executor import FakeExecutor
    from tests.fixtures.harness import add_user

    s = settings.model_copy(update={"max_upload_bytes": 10_000, "max_upload_files": 2,
                                    "max_upload_request_bytes": 50_000})
    app = create_app(s, FakeExecutor(storage=storage), storage=storage, run_runner=False, run_maintenance=False)
    srv = live_server(app)
    user = add_user(app.state.cineweave.db, s)

    def chunks() -> Any:
        yield part_head(filename="z.zip") + b"PK\x03\x04"
        for _ in range(8):
            yield b"\0" * 8_000
        yield b"\r\n" + END

    with httpx.Client(base_url=srv.url, headers=bearer(user.api_key), timeout=30) as client:
        ok = client.post("/v1/uploads", files=[("file", ("a.png", png(), "image/png"))])
        assert ok.status_code == 201, ok.text
        refused = client.post("/v1/uploads", content=chunks(), headers={"content-type": CTYPE})
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "payload_too_large"
    with app.state.cineweave.db.read() as session:
        assert session.execute(select(func.count()).select_from(Upload)).scalar_one() == 1


class Held:
    """A body that sends its first chunk, then waits for ``release`` (bounded) before the rest."""

    def __init__(self, chunks: list[bytes]) -> None:
        import asyncio

        self.chunks = chunks
        self.started, self.release = asyncio.Event(), asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        import asyncio

        yield self.chunks[0]
        self.started.set()
        await asyncio.wait_for(self.release.wait(), 20)
        for chunk in self.chunks[1:]:
            yield chunk


async def test_concurrent_uploads_are_bounded_with_retry_after(make_api: Any) -> None:
    import asyncio

    h = await make_api(run_runner=False, max_concurrent_uploads=1, upload_retry_after_s=7)
    user = h.user()
    headers = {**bearer(user.api_key), "content-type": CTYPE}
    body = [part_head(), png(), b"\r\n", END]
    held = Held(body)
    first = asyncio.create_task(h.client.post("/v1/uploads", content=held, headers=headers))
    await asyncio.wait_for(held.started.wait(), 20)  # the first upload holds the only slot
    busy = await h.client.post("/v1/uploads", content=b"".join(body), headers=headers)
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "uploads_busy"
    assert busy.headers["retry-after"] == "7"
    held.release.set()
    assert (await asyncio.wait_for(first, 20)).status_code == 201
    again = await h.client.post("/v1/uploads", content=b"".join(body), headers=headers)
    assert again.status_code == 201  # the slot was given back
    refused = await h.client.post("/v1/uploads", content=b"not multipart", headers=headers)
    assert refused.status_code == 422
    assert (await h.client.post("/v1/uploads", content=b"".join(body), headers=headers)).status_code == 201


async def test_an_upload_must_arrive_within_the_read_deadline(make_api: Any) -> None:
    h = await make_api(run_runner=False, upload_read_timeout_s=0.3)
    user = h.user()
    held = Held([part_head(), png(), b"\r\n", END])  # never released: the deadline ends it
    r = await h.client.post("/v1/uploads", content=held, headers={**bearer(user.api_key), "content-type": CTYPE})
    assert r.status_code == 408 and r.json()["error"]["code"] == "upload_timeout"
    assert stored(h) == (0, [])
