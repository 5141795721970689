"""S3Storage against a real S3 server (SeaweedFS, started by the ``s3_server`` fixture)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import pytest

from api.storage.base import make_storage
from api.storage.s3 import S3Storage
from tests.api.storage.contract import StorageContract
from tests.fixtures.s3 import S3Server

pytestmark = pytest.mark.s3


def _bucket() -> str:
    return "cw-" + secrets.token_hex(6)


@pytest.fixture
def store(s3_server: S3Server) -> S3Storage:
    """An empty storage: a fresh key prefix in the shared bucket (every bucket costs volumes)."""
    return S3Storage.from_url(s3_server.url_for(s3_server.bucket, prefix="t-" + secrets.token_hex(6)))


class TestS3Storage(StorageContract):
    def test_presigned_get_serves_the_bytes_then_expires(self, store: S3Storage) -> None:
        store.put_bytes("outputs/u/j/0.png", b"\x89PNG-bytes", "image/png")
        signed_at = time.monotonic()
        url = store.url("outputs/u/j/0.png", ttl_s=2)  # S3 counts whole seconds: 1 s could lapse at once
        assert "X-Amz-Signature=" in url and "X-Amz-Expires=2" in url
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200
        assert response.content == b"\x89PNG-bytes"
        assert response.headers["content-type"] == "image/png"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # bounded: poll until the link lapses
            time.sleep(0.25)
            response = httpx.get(url, timeout=10)
            if response.status_code != 200:
                break
        assert response.status_code == 403
        assert time.monotonic() - signed_at >= 1.0

    def test_presigned_url_of_a_missing_key_is_404(self, store: S3Storage) -> None:
        store.put_bytes("a/present.txt", b"x", "text/plain")
        assert httpx.get(store.url("a/absent.txt", ttl_s=60), timeout=10).status_code == 404

    def test_bucket_is_created_on_first_use(self, s3_server: S3Server) -> None:
        from minio import Minio

        bucket = _bucket()
        admin = Minio(s3_server.endpoint, access_key=s3_server.access_key, secret_key=s3_server.secret_key,
                      secure=False, region=s3_server.region)
        assert not admin.bucket_exists(bucket)
        store = S3Storage.from_url(s3_server.url_for(bucket))
        store.put_bytes("x/y.txt", b"hello", "text/plain")
        assert admin.bucket_exists(bucket)
        # A second instance on the same (now existing) bucket sees the object.
        assert S3Storage.from_url(s3_server.url_for(bucket)).get_bytes("x/y.txt") == b"hello"

    def test_key_prefix_in_the_url(self, s3_server: S3Server) -> None:
        bucket = _bucket()
        scoped = S3Storage.from_url(s3_server.url_for(bucket, prefix="tenant-a"))
        scoped.put_bytes("outputs/u/j/0.png", b"a", "image/png")
        whole = S3Storage.from_url(s3_server.url_for(bucket))
        assert whole.list("") == ["tenant-a/outputs/u/j/0.png"]
        assert scoped.list("") == ["outputs/u/j/0.png"]
        assert httpx.get(scoped.url("outputs/u/j/0.png"), timeout=10).content == b"a"
        assert scoped.delete_prefix("outputs") == 1 and whole.list("") == []

    def test_wrong_credentials_fail(self, s3_server: S3Server) -> None:
        from minio.error import S3Error

        bad = S3Server(s3_server.host, s3_server.port, s3_server.access_key, "wrong-secret")
        store = S3Storage.from_url(bad.url_for(_bucket()))
        with pytest.raises(S3Error):
            store.put_bytes("a/b", b"x", "text/plain")

    def test_make_storage_builds_s3(self, s3_server: S3Server, tmp_path: Path) -> None:
        built = make_storage(s3_server.url_for(s3_server.bucket, prefix="t-" + secrets.token_hex(6)))
        assert isinstance(built, S3Storage)
        built.put_bytes("k/v.txt", b"v", "text/plain")
        assert built.get_bytes("k/v.txt") == b"v"


class TestFromUrl:
    """URL parsing needs no server."""

    def test_credentials_are_url_decoded(self) -> None:
        store = S3Storage.from_url("s3://AK%2F1:s%40cr%3At%2Fx@minio.local:9000/media?secure=false&region=eu-west-1")
        assert (store.endpoint, store.bucket, store.secure, store.region) == ("minio.local:9000", "media", False,
                                                                               "eu-west-1")
        assert store._client._provider.retrieve().access_key == "AK/1"
        assert store._client._provider.retrieve().secret_key == "s@cr:t/x"

    def test_defaults_and_repr_hide_the_secret(self) -> None:
        store = S3Storage.from_url("s3://key:topsecret@s3.example.com/bucket")
        assert store.secure is True and store.region == "us-east-1" and store.prefix == ""
        assert "topsecret" not in repr(store) and "key" not in repr(store)

    def test_public_url_signs_for_the_public_host(self) -> None:
        store = S3Storage.from_url("s3://k:s@minio:9000/media?secure=false&public_url=https://files.example.com")
        url = store.url("outputs/u/j/0.png", ttl_s=60)
        assert url.startswith("https://files.example.com/media/outputs/u/j/0.png?")

    @pytest.mark.parametrize("url", [
        "s3://k:s@host:9000/",                      # no bucket
        "s3://host:9000/bucket",                    # no credentials
        "s3://k:s@host:9000/bucket?secure=maybe",   # not a boolean
        "s3://k:s@host:9000/bucket?scure=false",    # a typo is an error, not a silent default
        "file:///tmp/x",
    ])
    def test_bad_urls(self, url: str) -> None:
        with pytest.raises(ValueError):
            S3Storage.from_url(url)
