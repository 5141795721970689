"""Storage in an S3 bucket (MinIO, SeaweedFS, AWS…) through the ``minio`` client.

Same interface as :class:`api.storage.local.LocalStorage`; ``url`` is a presigned GET.

Built from ``s3://ACCESS:SECRET@HOST:PORT/BUCKET[/PREFIX]?secure=false&region=us-east-1`` by
:meth:`S3Storage.from_url` (credentials may be percent-encoded). Query parameters:

- ``secure`` (default ``true``): HTTPS to the endpoint;
- ``region`` (default ``us-east-1``): the signing region; given, presigning needs no network call;
- ``public_url`` (optional, e.g. ``https://files.example.com``): the scheme and host clients use,
  when it differs from the endpoint the API reaches (a container name, a private address);
  presigned URLs are signed for that host.

The bucket is created on first use if it does not exist. The client is blocking (urllib3): call
it from a worker thread in async code (``asyncio.to_thread``).
"""

from __future__ import annotations

import io
import logging
import mimetypes
import os
import threading
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from api.storage.base import StoredObject, validate_key

logger = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
MAX_PRESIGN_S = 7 * 24 * 3600  # the S3 limit for SigV4 presigned URLs
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"})
_URL_OPTIONS = frozenset({"secure", "region", "public_url"})


def _truthy(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def _http_client(secure: bool) -> urllib3.PoolManager:
    """Bounded timeouts and a few retries on 5xx (the minio default waits up to 5 minutes)."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10.0, read=120.0),
        maxsize=16,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


class S3Storage:
    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, *,
                 secure: bool = True, region: str | None = DEFAULT_REGION, prefix: str = "",
                 public_url: str | None = None, create_bucket: bool = True) -> None:
        if not bucket:
            raise ValueError("an S3 storage URL needs a bucket: s3://ACCESS:SECRET@HOST:PORT/BUCKET")
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        self.region = region or DEFAULT_REGION
        self.prefix = validate_key(prefix.strip("/")) + "/" if prefix.strip("/") else ""
        self._client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                             region=self.region, http_client=_http_client(secure))
        self._presigner = self._client
        if public_url:
            public = urlparse(public_url)
            if public.scheme not in ("http", "https") or not public.netloc:
                raise ValueError(f"public_url must be http(s)://host[:port], got {public_url!r}")
            public_secure = public.scheme == "https"
            # Presigning is computed offline (the region is known), so this client never connects.
            self._presigner = Minio(public.netloc, access_key=access_key, secret_key=secret_key,
                                    secure=public_secure, region=self.region,
                                    http_client=_http_client(public_secure))
        self._create_bucket = create_bucket
        self._bucket_ready = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the credentials
        scheme = "https" if self.secure else "http"
        return f"S3Storage({scheme}://{self.endpoint}/{self.bucket}/{self.prefix})"

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        """``s3://ACCESS:SECRET@HOST:PORT/BUCKET[/PREFIX]?secure=false&region=…&public_url=…``."""
        parsed = urlparse(url)
        if parsed.scheme != "s3":
            raise ValueError("an S3 storage URL starts with s3://")
        if not parsed.hostname:
            raise ValueError("an S3 storage URL needs a host: s3://ACCESS:SECRET@HOST:PORT/BUCKET")
        if parsed.username is None or parsed.password is None:
            raise ValueError("an S3 storage URL needs credentials: s3://ACCESS:SECRET@HOST:PORT/BUCKET")
        query = {k: v[-1] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
        unknown = set(query) - _URL_OPTIONS
        if unknown:
            raise ValueError(f"unknown S3 storage URL option(s) {sorted(unknown)}; known: {sorted(_URL_OPTIONS)}")
        host = parsed.hostname
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        endpoint = f"{host}:{parsed.port}" if parsed.port else host
        bucket, _, prefix = parsed.path.lstrip("/").partition("/")
        return cls(endpoint, unquote(parsed.username), unquote(parsed.password), bucket,
                   secure=_truthy(query.get("secure", "true")),
                   region=query.get("region") or DEFAULT_REGION, prefix=prefix,
                   public_url=query.get("public_url") or None)

    # internals ---------------------------------------------------------------------------
    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._lock:
            if self._bucket_ready:
                return
            if not self._client.bucket_exists(self.bucket):
                if not self._create_bucket:
                    raise FileNotFoundError(f"bucket {self.bucket} does not exist")
                try:
                    self._client.make_bucket(self.bucket)
                    logger.info("created bucket %s on %s", self.bucket, self.endpoint)
                except S3Error as exc:  # another process created it meanwhile
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    @staticmethod
    def _missing(exc: S3Error) -> bool:
        return exc.code in _MISSING_CODES

    # the Storage interface -----------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        name = self._name(key)
        self._ensure_bucket()
        self._client.put_object(self.bucket, name, io.BytesIO(data), len(data), content_type=content_type)
        return StoredObject(key, len(data), content_type)

    def put_file(self, key: str, path: Path, content_type: str) -> StoredObject:
        name = self._name(key)
        self._ensure_bucket()
        size = Path(path).stat().st_size
        self._client.fput_object(self.bucket, name, str(path), content_type=content_type)
        return StoredObject(key, size, content_type)

    def get_bytes(self, key: str) -> bytes:
        name = self._name(key)
        self._ensure_bucket()
        try:
            response = self._client.get_object(self.bucket, name)
        except S3Error as exc:
            if self._missing(exc):
                raise FileNotFoundError(key) from None
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def download(self, key: str, path: Path) -> Path:
        name = self._name(key)
        self._ensure_bucket()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client.fget_object(self.bucket, name, str(path))
        except S3Error as exc:
            if self._missing(exc):
                raise FileNotFoundError(key) from None
            raise
        return path

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def stat(self, key: str) -> StoredObject | None:
        name = self._name(key)
        self._ensure_bucket()
        try:
            info = self._client.stat_object(self.bucket, name)
        except S3Error as exc:
            if self._missing(exc):
                return None
            raise
        content_type = info.content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
        return StoredObject(key, int(info.size or 0), content_type)

    def content_type(self, key: str) -> str:
        found = self.stat(key)
        if found is not None:
            return found.content_type
        return mimetypes.guess_type(key)[0] or "application/octet-stream"

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._ensure_bucket()
        self._client.remove_object(self.bucket, name)  # idempotent: no error for a missing key

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        if not keys:
            return 0
        errors = list(self._client.remove_objects(self.bucket, [DeleteObject(self.prefix + k) for k in keys]))
        if errors:
            raise OSError(f"could not delete {len(errors)} of {len(keys)} objects under {prefix!r}: "
                          f"{errors[0].code} {errors[0].message}")
        return len(keys)

    def list(self, prefix: str) -> list[str]:
        """Keys equal to ``prefix`` or under the directory ``prefix/`` (as LocalStorage does)."""
        self._ensure_bucket()
        base = prefix.strip("/")
        if not base:
            wanted = self.prefix
        else:
            if any(part in ("", ".", "..") for part in base.split("/")):
                return []
            wanted = f"{self.prefix}{base}"
        keys: list[str] = []
        for item in self._client.list_objects(self.bucket, prefix=wanted or None, recursive=True):
            name = item.object_name or ""
            if getattr(item, "is_dir", False) or not name.startswith(self.prefix):
                continue
            key = name[len(self.prefix):]
            # "a/b" must not match "a/bc/…": only the key itself or what lies under "a/b/".
            if base and key != base and not key.startswith(base + "/"):
                continue
            keys.append(key)
        return sorted(keys)

    def url(self, key: str, ttl_s: int = 3600) -> str:
        name = self._name(key)
        ttl = max(1, min(int(ttl_s), MAX_PRESIGN_S))
        return self._presigner.presigned_get_object(self.bucket, name, expires=timedelta(seconds=ttl))


__all__ = ["DEFAULT_REGION", "S3Storage"]
