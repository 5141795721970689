"""The storage port. Keys are ``/``-separated paths such as ``outputs/{user}/{job}/0.png``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlparse


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    content_type: str


@runtime_checkable
class Storage(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject: ...

    def put_file(self, key: str, path: Path, content_type: str) -> StoredObject: ...

    def get_bytes(self, key: str) -> bytes: ...

    def download(self, key: str, path: Path) -> Path: ...

    def exists(self, key: str) -> bool: ...

    def stat(self, key: str) -> StoredObject | None: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def list(self, prefix: str) -> list[str]: ...

    def url(self, key: str, ttl_s: int = 3600) -> str:
        """A URL a client can GET without our API key, valid for ``ttl_s`` seconds."""
        ...


def validate_key(key: str) -> str:
    """Reject keys that could escape the namespace (``..``, absolute paths, empty parts)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"invalid storage key: {key!r}")
    return key


def make_storage(url: str, *, signing_secret: str = "", public_base_url: str = "") -> Storage:
    """Build storage from ``file:///dir`` or ``s3://ACCESS:SECRET@HOST:PORT/BUCKET?secure=false``."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        from api.storage.local import LocalStorage

        return LocalStorage(Path(parsed.path if parsed.scheme else url), signing_secret=signing_secret,
                            base_url=public_base_url)
    if parsed.scheme == "s3":
        from api.storage.s3 import S3Storage

        return S3Storage.from_url(url)
    raise ValueError(f"unsupported storage URL scheme {parsed.scheme!r} (use file:// or s3://)")
