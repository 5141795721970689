"""Uploads: images for image-to-image/video and LoRA datasets (images, or one ZIP with captions).

The content is checked by decoding it, never trusted by name: the file size, the pixel count
(decompression bombs) and the number of files are limited; ZIP entries that would escape their
folder are refused; EXIF orientation is applied. Nothing is stored unless everything is valid.
"""

from __future__ import annotations

import io
import logging
import posixpath
import zipfile
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from sqlalchemy import select
from sqlmodel import Session

from api.core.errors import InvalidInput, NotFound
from api.db.engine import Database
from api.db.tables import Upload, User, new_id
from api.settings import Settings
from api.storage.base import Storage

logger = logging.getLogger(__name__)

IMAGE_FORMATS = {"JPEG": ("image/jpeg", "jpg"), "PNG": ("image/png", "png"), "WEBP": ("image/webp", "webp")}


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    content_type: str
    extension: str
    width: int
    height: int


def check_image(data: bytes, settings: Settings, name: str = "file") -> CheckedImage:
    """Decode fully; refuse what is not a JPEG/PNG/WebP, is truncated, or has too many pixels."""
    if not data:
        raise InvalidInput(f"{name} is empty", {"file": name}, code="invalid_upload")
    if len(data) > settings.max_upload_bytes:
        raise InvalidInput(f"{name} is larger than {settings.max_upload_bytes} bytes",
                           {"file": name, "max_bytes": settings.max_upload_bytes}, code="upload_too_large")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format or ""
            width, height = probe.size
    except Image.DecompressionBombError:
        # Pillow refuses to even open images this large (it is not an OSError: catch it by name).
        raise InvalidInput(f"{name} declares more pixels than the limit of {settings.max_upload_pixels}",
                           {"file": name, "max_pixels": settings.max_upload_pixels},
                           code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidInput(f"{name} is not an image (JPEG, PNG or WebP)", {"file": name},
                           code="invalid_upload") from None
    if fmt not in IMAGE_FORMATS:
        raise InvalidInput(f"{name}: {fmt or 'unknown'} images are not accepted (JPEG, PNG or WebP)",
                           {"file": name, "format": fmt}, code="invalid_upload")
    if width * height > settings.max_upload_pixels:
        raise InvalidInput(f"{name} has {width}×{height} pixels; the limit is {settings.max_upload_pixels}",
                           {"file": name, "max_pixels": settings.max_upload_pixels}, code="image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: a truncated file fails here
            orientation = img.getexif().get(0x0112, 1)
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
                out = io.BytesIO()
                save_fmt = "PNG" if fmt == "PNG" else fmt
                img.save(out, format=save_fmt, **({"quality": 95} if save_fmt == "JPEG" else {}))
                data = out.getvalue()
                width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"{name} could not be decoded ({exc})", {"file": name},
                           code="invalid_upload") from None
    content_type, ext = IMAGE_FORMATS[fmt]
    return CheckedImage(data, content_type, ext, width, height)


def _safe_entry(name: str) -> str | None:
    """The normalized path of a ZIP entry, or None for one that escapes its folder."""
    if name.startswith(("/", "\\")) or "\\" in name or ":" in name.split("/")[0]:
        return None
    norm = posixpath.normpath(name)
    if norm.startswith("..") or norm == ".":
        return None
    return norm


def check_zip(data: bytes, settings: Settings) -> tuple[list[tuple[str, CheckedImage, str | None]], int]:
    """Images of a dataset ZIP with their sidecar captions. Returns (items, skipped_entries)."""
    if len(data) > settings.max_upload_bytes * 10:
        raise InvalidInput("the ZIP is too large", {"max_bytes": settings.max_upload_bytes * 10},
                           code="upload_too_large")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InvalidInput("not a valid ZIP file", code="invalid_upload") from None
    images: dict[str, CheckedImage] = {}
    captions: dict[str, str] = {}
    skipped = 0
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            path = _safe_entry(info.filename)
            if path is None:
                raise InvalidInput(f"ZIP entry {info.filename!r} escapes its folder",
                                   {"entry": info.filename}, code="invalid_upload")
            base = posixpath.basename(path)
            if base.startswith(".") or path.startswith("__MACOSX/"):
                skipped += 1
                continue
            stem, ext = posixpath.splitext(path)
            if info.file_size > settings.max_upload_bytes:
                raise InvalidInput(f"ZIP entry {path} is too large", {"entry": path}, code="upload_too_large")
            if ext.lower() == ".txt":
                captions[stem] = archive.read(info).decode("utf-8", errors="replace").strip()[:1000]
            elif ext.lower() in (".jpg", ".jpeg", ".png", ".webp"):
                images[stem] = check_image(archive.read(info), settings, name=path)
            else:
                skipped += 1
    if not images:
        raise InvalidInput("the ZIP holds no JPEG, PNG or WebP images", code="invalid_upload")
    if len(images) > settings.max_upload_files:
        raise InvalidInput(f"the ZIP holds {len(images)} images; the limit is {settings.max_upload_files}",
                           {"max_files": settings.max_upload_files}, code="too_many_files")
    return [(stem, img, captions.get(stem)) for stem, img in sorted(images.items())], skipped


class UploadService:
    def __init__(self, db: Database, settings: Settings, storage: Storage) -> None:
        self.db = db
        self.settings = settings
        self.storage = storage

    def create(self, user: User, files: list[tuple[str, bytes]]) -> list[Upload]:
        """Check every file first; store only when all pass. A ZIP becomes one ``dataset`` upload."""
        if not files:
            raise InvalidInput("no file was sent (multipart field 'file')", code="invalid_upload")
        if len(files) > self.settings.max_upload_files:
            raise InvalidInput(f"{len(files)} files; the limit is {self.settings.max_upload_files}",
                               {"max_files": self.settings.max_upload_files}, code="too_many_files")
        planned: list[tuple[Upload, list[tuple[str, bytes, str]]]] = []
        for filename, data in files:
            upload_id = new_id("upl")
            prefix = f"uploads/{user.id}/{upload_id}"
            if data[:4] == b"PK\x03\x04":
                items, skipped = check_zip(data, self.settings)
                blobs = []
                entries: list[dict[str, Any]] = []
                for i, (stem, img, caption) in enumerate(items):
                    key = f"{prefix}/{i:03d}.{img.extension}"
                    blobs.append((key, img.data, img.content_type))
                    entries.append({"key": key, "name": stem, "caption": caption, "width": img.width,
                                    "height": img.height})
                upload = Upload(id=upload_id, user_id=user.id, key=entries[0]["key"], filename=filename,
                                content_type="application/zip", size=len(data), kind="dataset",
                                meta={"images": entries, "skipped": skipped})
                planned.append((upload, blobs))
            else:
                img = check_image(data, self.settings, name=filename or "file")
                key = f"{prefix}.{img.extension}"
                upload = Upload(id=upload_id, user_id=user.id, key=key, filename=filename,
                                content_type=img.content_type, size=len(img.data), width=img.width,
                                height=img.height, kind="image")
                planned.append((upload, [(key, img.data, img.content_type)]))
        for _, blobs in planned:
            for key, blob, ctype in blobs:
                self.storage.put_bytes(key, blob, ctype)
        with self.db.session() as session:
            for upload, _ in planned:
                session.add(upload)
            session.commit()
        return [u for u, _ in planned]

    def get(self, user: User, upload_id: str) -> Upload:
        with self.db.read() as session:
            upload = session.get(Upload, upload_id)
        if upload is None or upload.user_id != user.id:
            raise NotFound(f"upload {upload_id} not found")
        return upload

    def list(self, user: User, limit: int = 50) -> list[Upload]:
        with self.db.read() as session:
            return list(session.execute(select(Upload).where(Upload.user_id == user.id)
                                        .order_by(Upload.created_at.desc()).limit(limit)).scalars())

    def delete(self, user: User, upload_id: str) -> None:
        upload = self.get(user, upload_id)
        self.storage.delete_prefix(f"uploads/{user.id}/{upload.id}")
        for entry in (upload.meta or {}).get("images", []):
            self.storage.delete(entry["key"])
        self.storage.delete(upload.key)
        with self.db.session() as session:
            row = session.get(Upload, upload.id)
            if row is not None:
                session.delete(row)
            session.commit()


def image_keys(session: Session, user_id: str, ids: list[str]) -> list[dict[str, Any]]:
    """Images (key, caption) behind a list of upload ids owned by the user; datasets expand."""
    out: list[dict[str, Any]] = []
    for upload_id in ids:
        upload = session.get(Upload, upload_id)
        if upload is None or upload.user_id != user_id:
            raise InvalidInput(f"upload {upload_id} not found", {"field": "images"})
        if upload.kind == "dataset":
            out.extend({"key": e["key"], "caption": e.get("caption")} for e in upload.meta.get("images", []))
        else:
            out.append({"key": upload.key, "caption": None})
    return out
