"""Storage in a local directory; URLs are HMAC-signed, expiring links served by the API."""

from __future__ import annotations

import hashlib
import hmac
import logging
import mimetypes
import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from api.storage.base import StoredObject, validate_key

logger = logging.getLogger(__name__)

FILES_ROUTE = "/v1/files/"


class LocalStorage:
    def __init__(self, root: Path, *, signing_secret: str, base_url: str = "") -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._secret = signing_secret.encode()
        self.base_url = base_url.rstrip("/")

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid storage key: {key!r}")
        return path

    def _meta(self, path: Path) -> Path:
        return path.with_name(path.name + ".ctype")

    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        self._meta(path).write_text(content_type)
        return StoredObject(key, len(data), content_type)

    def put_file(self, key: str, path: Path, content_type: str) -> StoredObject:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        self._meta(target).write_text(content_type)
        return StoredObject(key, target.stat().st_size, content_type)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path.read_bytes()

    def download(self, key: str, path: Path) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def content_type(self, key: str) -> str:
        meta = self._meta(self._path(key))
        if meta.is_file():
            return meta.read_text()
        return mimetypes.guess_type(key)[0] or "application/octet-stream"

    def stat(self, key: str) -> StoredObject | None:
        path = self._path(key)
        if not path.is_file():
            return None
        return StoredObject(key, path.stat().st_size, self.content_type(key))

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._meta(path).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir() or not base.resolve().is_relative_to(self.root):
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".ctype") and not p.name.startswith(".tmp-"))

    # signed URLs -------------------------------------------------------------------------
    def _signature(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, key: str, ttl_s: int = 3600) -> str:
        validate_key(key)
        expires = int(time.time()) + ttl_s
        return (f"{self.base_url}{FILES_ROUTE}{quote(key)}?expires={expires}"
                f"&signature={self._signature(key, expires)}")

    def verify(self, key: str, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        return hmac.compare_digest(self._signature(key, expires), signature)
