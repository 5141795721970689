"""Input resolution of URL images: a reclaimed attempt reuses the copy the first attempt stored."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from api.db.tables import Job
from api.services import inputs
from api.services.egress import FetchedBody, UrlFetchFailed
from api.services.inputs import InputResolver
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_second_attempt_reuses_the_fetched_copy(settings: Settings, storage: LocalStorage,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fetch_once(policy: Any, url: str, **kw: Any) -> FetchedBody:
        calls.append(url)
        if len(calls) > 1:  # the URL is gone by the second attempt
            raise UrlFetchFailed("input.image", "the URL answered with HTTP 404", reason="status",
                                 status_code=404)
        return FetchedBody(_png(), "image/png", url, 200)

    monkeypatch.setattr(inputs, "fetch_sync", fetch_once)
    resolver = InputResolver(None, settings, storage, Catalog([]))  # type: ignore[arg-type]
    job = Job(id="job1", user_id="u1", model="m", input={"image": "https://example.com/a.png"})
    first = resolver(job)
    assert first["image_key"] == "uploads/u1/fetched-job1.png"
    second = resolver(job)  # the reclaimed attempt
    assert second["image_key"] == first["image_key"]
    assert calls == ["https://example.com/a.png"]
    other = Job(id="job2", user_id="u1", model="m", input={"image": "https://example.com/a.png"})
    with pytest.raises(UrlFetchFailed):  # another job does fetch (and here fails)
        resolver(other)
