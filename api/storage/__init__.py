"""Object storage for uploads and outputs: a local directory (embedded) or any S3 (MinIO)."""

from api.storage.base import Storage, StoredObject, make_storage

__all__ = ["Storage", "StoredObject", "make_storage"]
