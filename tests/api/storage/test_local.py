"""LocalStorage: the shared storage contract plus its HMAC-signed URLs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from api.storage.base import make_storage
from api.storage.local import FILES_ROUTE, LocalStorage
from tests.api.storage.contract import StorageContract


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage", signing_secret="s3cret", base_url="http://127.0.0.1:8000")


def _parse(url: str) -> tuple[str, int, str]:
    parsed = urlparse(url)
    assert parsed.path.startswith(FILES_ROUTE)
    query = parse_qs(parsed.query)
    return unquote(parsed.path[len(FILES_ROUTE):]), int(query["expires"][0]), query["signature"][0]


class TestLocalStorage(StorageContract):
    def test_signed_url_verifies_and_expires(self, store: LocalStorage) -> None:
        store.put_bytes("outputs/u/j/0.png", b"png", "image/png")
        url = store.url("outputs/u/j/0.png", ttl_s=60)
        assert url.startswith("http://127.0.0.1:8000/v1/files/outputs/u/j/0.png?")
        key, expires, signature = _parse(url)
        assert key == "outputs/u/j/0.png"
        assert store.verify(key, expires, signature)
        assert not store.verify("outputs/u/j/other.png", expires, signature)
        assert not store.verify(key, expires + 1, signature)
        key, expires, signature = _parse(store.url("outputs/u/j/0.png", ttl_s=-1))
        assert not store.verify(key, expires, signature)

    def test_other_secret_does_not_verify(self, store: LocalStorage, tmp_path: Path) -> None:
        other = LocalStorage(tmp_path / "storage", signing_secret="another")
        key, expires, signature = _parse(other.url("a/b.png"))
        assert not store.verify(key, expires, signature)

    def test_content_type_survives_a_new_instance(self, store: LocalStorage) -> None:
        store.put_bytes("a/clip.bin", b"x", "video/mp4")
        again = LocalStorage(store.root, signing_secret="s3cret")
        assert again.stat("a/clip.bin").content_type == "video/mp4"

    def test_make_storage_builds_local(self, tmp_path: Path) -> None:
        built = make_storage(f"file://{tmp_path / 'st'}", signing_secret="x")
        assert isinstance(built, LocalStorage) and built.root == (tmp_path / "st").resolve()
