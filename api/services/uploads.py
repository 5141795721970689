"""Uploads: images for image-to-image/video and LoRA datasets (images, or one ZIP with captions),
and audio (WAV, MP3, OGG, M4A, FLAC) for the pipelines' ``audio`` operation.

The content is checked by decoding it, never trusted by name: the file size, the pixel count
(decompression bombs) and the number of files are limited; ZIP entries that would escape their
folder are refused; EXIF orientation is applied. Nothing is stored unless everything is valid.

Limits are checked before the work they bound. :func:`read_multipart` parses the request body as
it streams in (python-multipart's push parser): a declared ``Content-Length`` over the request
cap is refused before a byte is read, the file count is checked when a part's headers arrive
(before its body), and each part and the whole body are counted as they arrive, so memory is
bounded by ``max_upload_request_bytes`` (and a part by its own cap), never by what a client sends.
A ZIP's member count and total uncompressed size are checked from its central directory before
any member is read, and enforced again while reading (headers can lie); an image's pixel count is
read from its header before it is decoded. An audio file is recognized by its magic bytes and
decoded in full by the ffmpeg binary (the demuxer forced to the recognized format, the file
protocol only, at most ``MAX_AUDIO_S`` + 1 s decoded, within ``AUDIO_PROBE_TIMEOUT_S``): what
does not decode as audio, or is longer than ``MAX_AUDIO_S``, is refused.
"""

from __future__ import annotations

import asyncio
import io
import logging
import posixpath
import re
import subprocess
import tempfile
import threading
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from sqlalchemy import select
from sqlmodel import Session

from api.core.errors import CineWeaveError, InvalidInput, NotFound, RateLimited
from api.db.engine import Database
from api.db.tables import Upload, User, new_id
from api.settings import Settings
from api.storage.base import Storage

logger = logging.getLogger(__name__)

IMAGE_FORMATS = {"JPEG": ("image/jpeg", "jpg"), "PNG": ("image/png", "png"), "WEBP": ("image/webp", "webp")}
ZIP_MAGIC = b"PK\x03\x04"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
READ_CHUNK = 64 * 1024
# audio: the ffmpeg demuxer each recognized format is read with, its content type and extension
AUDIO_FORMATS = {"wav": ("wav", "audio/wav", "wav"), "mp3": ("mp3", "audio/mpeg", "mp3"),
                 "ogg": ("ogg", "audio/ogg", "ogg"), "m4a": ("mov", "audio/mp4", "m4a"),
                 "flac": ("flac", "audio/flac", "flac")}
M4A_BRANDS = (b"M4A ", b"M4B ", b"mp42", b"mp41", b"isom", b"iso2", b"dash")
MAX_AUDIO_S = 600.0  # ten minutes
AUDIO_PROBE_TIMEOUT_S = 60.0
Blob = bytes | bytearray  # uploads stay in the buffer they were read into (no copies)


class PayloadTooLarge(CineWeaveError):
    """An upload (or a part, or a ZIP's content) over its byte limit."""

    code, status = "payload_too_large", 413


class UploadTimeout(CineWeaveError):
    """The upload body did not arrive within ``upload_read_timeout_s``."""

    code, status = "upload_timeout", 408


def zip_file_limit(settings: Settings) -> int:
    """Bytes a ZIP file itself may have (compressed); its content is bounded by max_upload_zip_bytes."""
    return settings.max_upload_bytes * 10


# streaming multipart -------------------------------------------------------------------------
@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    limit: int = 0


class _UploadStream:
    """Callbacks for python-multipart's push parser that enforce the limits as bytes arrive."""

    def __init__(self, settings: Settings, file_fields: frozenset[str] = frozenset({"file"})) -> None:
        self.settings = settings
        self.file_fields = file_fields
        self.files: list[tuple[str, Blob]] = []
        self.by_field: dict[str, list[tuple[str, Blob]]] = {}  # the files again, by form field
        self.fields: dict[str, str] = {}  # the other (small) form fields
        self.part = _Part()
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}

    def on_part_begin(self) -> None:
        self.part = _Part()
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field = self.header_value = b""

    def on_headers_finished(self) -> None:
        _kind, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.part.name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self.part.filename = filename.decode("utf-8", "replace") if filename is not None else None
        if self.part.name in self.file_fields:
            if len(self.files) + 1 > self.settings.max_upload_files:  # before this file's body
                raise InvalidInput(f"more than {self.settings.max_upload_files} files; the limit is "
                                   f"{self.settings.max_upload_files}",
                                   {"max_files": self.settings.max_upload_files}, code="too_many_files")
            self.part.limit = zip_file_limit(self.settings)  # narrowed once the first bytes say what it is
        else:
            if len(self.fields) >= 100:
                raise InvalidInput("more than 100 form fields", code="invalid_input")
            self.part.limit = 64 * 1024  # other form fields are small

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        part.data += memoryview(data)[start:end]  # no intermediate copy of the chunk
        if part.name in self.file_fields and len(part.data) >= 4 and part.data[:4] != ZIP_MAGIC:
            part.limit = self.settings.max_upload_bytes
        if len(part.data) > part.limit:
            name = part.filename or part.name or "file"
            raise PayloadTooLarge(f"{name} is larger than {part.limit} bytes", {"file": name, "max_bytes": part.limit})

    def on_part_end(self) -> None:
        if self.part.name in self.file_fields:
            # the buffer itself, not a copy (bytes-like for everything downstream)
            item = (self.part.filename or self.part.name, self.part.data)
            self.files.append(item)
            self.by_field.setdefault(self.part.name, []).append(item)
        elif self.part.name:
            self.fields[self.part.name] = bytes(self.part.data).decode("utf-8", "replace")
        self.part = _Part()


async def read_multipart(chunks: AsyncIterator[bytes], content_type: str, content_length: str | None,
                         settings: Settings) -> list[tuple[str, Blob]]:
    """The ``file`` parts of a multipart/form-data body, read with every limit enforced as it streams."""
    return (await _read_stream(chunks, content_type, content_length, settings, frozenset({"file"}))).files


async def read_form(chunks: AsyncIterator[bytes], content_type: str, content_length: str | None,
                    settings: Settings, file_fields: frozenset[str],
                    ) -> tuple[dict[str, str], dict[str, list[tuple[str, Blob]]]]:
    """A multipart form's small fields and its files (by field name, of ``file_fields``), read
    with the limits of ``read_multipart`` enforced as it streams (the compat shapes' forms)."""
    sink = await _read_stream(chunks, content_type, content_length, settings, file_fields)
    return sink.fields, sink.by_field


async def _read_stream(chunks: AsyncIterator[bytes], content_type: str, content_length: str | None,
                       settings: Settings, file_fields: frozenset[str]) -> _UploadStream:
    cap = settings.max_upload_request_bytes
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise InvalidInput("bad Content-Length", code="invalid_input") from None
        if declared > cap:
            raise PayloadTooLarge(f"the request is {declared} bytes; the limit is {cap}", {"max_bytes": cap})
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidInput("send the files as multipart/form-data (field 'file')", {"field": "file"})
    sink = _UploadStream(settings, file_fields)
    callbacks = {name: getattr(sink, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
        "on_part_data", "on_part_end")}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async with asyncio.timeout(settings.upload_read_timeout_s):  # the whole body, not each chunk
            async for chunk in chunks:
                received += len(chunk)
                if received > cap:
                    raise PayloadTooLarge(f"the request is more than {cap} bytes", {"max_bytes": cap})
                parser.write(chunk)
        parser.finalize()
    except MultipartParseError:
        raise InvalidInput("the multipart body is malformed", {"field": "file"}) from None
    except TimeoutError:
        raise UploadTimeout(f"the upload did not arrive within {settings.upload_read_timeout_s:g} s",
                            {"timeout_s": settings.upload_read_timeout_s}) from None
    return sink


@dataclass(frozen=True)
class CheckedImage:
    data: Blob
    content_type: str
    extension: str
    width: int
    height: int


def check_image(data: Blob, settings: Settings, name: str = "file") -> CheckedImage:
    """Decode fully; refuse what is not a JPEG/PNG/WebP, is truncated, or has too many pixels."""
    if not data:
        raise InvalidInput(f"{name} is empty", {"file": name}, code="invalid_upload")
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"{name} is larger than {settings.max_upload_bytes} bytes",
                              {"file": name, "max_bytes": settings.max_upload_bytes})
    try:
        # Image.open reads the header only: the size is known before anything is decoded.
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


@dataclass(frozen=True)
class CheckedAudio:
    content_type: str
    extension: str
    format: str  # wav | mp3 | ogg | m4a | flac
    duration_s: float
    sample_rate: int | None
    channels: int | None


def audio_format(data: Blob) -> str | None:
    """Which audio format the magic bytes say (None: not one of ours)."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:
        return "mp3"  # an ID3 tag, or an MPEG audio frame sync with a layer set
    if head[4:8] == b"ftyp" and head[8:12] in M4A_BRANDS:
        return "m4a"
    return None


_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_TIME = re.compile(r"time=(\d+):(\d\d):(\d\d(?:\.\d+)?)")
_AUDIO_STREAM = re.compile(r"Stream #0:\d+[^:]*: Audio: [^,\n]+(?:, (\d+) Hz)?(?:, (mono|stereo|[0-9.]+ channels|[^,\n]+))?")


def _seconds(match: re.Match[str]) -> float:
    return int(match.group(1)) * 3600 + int(match.group(2)) * 60 + float(match.group(3))


def check_audio(data: Blob, settings: Settings, name: str = "file", fmt: str | None = None) -> CheckedAudio:
    """Decode the whole file with ffmpeg (the demuxer its magic bytes name); refuse what does not
    decode as audio (``invalid_upload``) or lasts over ``MAX_AUDIO_S`` (``audio_too_long``)."""
    import imageio_ffmpeg

    fmt = fmt or audio_format(data)
    if fmt is None:
        raise InvalidInput(f"{name} is not a WAV, MP3, OGG, M4A or FLAC file", {"file": name}, code="invalid_upload")
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"{name} is larger than {settings.max_upload_bytes} bytes",
                              {"file": name, "max_bytes": settings.max_upload_bytes})
    demuxer, content_type, ext = AUDIO_FORMATS[fmt]
    with tempfile.TemporaryDirectory(prefix="cw-audio-") as tmp:
        path = Path(tmp) / f"in.{ext}"
        path.write_bytes(data)
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-protocol_whitelist", "file",
               "-f", demuxer, "-i", str(path), "-map", "0:a:0", "-vn", "-sn", "-dn",
               "-t", f"{MAX_AUDIO_S + 1:g}", "-f", "null", "-"]
        try:
            run = subprocess.run(cmd, capture_output=True, timeout=AUDIO_PROBE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise InvalidInput(f"{name} could not be decoded in {AUDIO_PROBE_TIMEOUT_S:g} s", {"file": name},
                               code="invalid_upload") from None
    log = run.stderr.decode("utf-8", "replace")
    stream = _AUDIO_STREAM.search(log)
    if run.returncode != 0 or stream is None:
        logger.info("audio upload %s refused: ffmpeg rc=%s %s", name, run.returncode, log[-300:])
        raise InvalidInput(f"{name} is not a readable {fmt.upper()} audio file", {"file": name, "format": fmt},
                           code="invalid_upload")
    if fmt == "m4a" and re.search(r"Stream #0:\d+[^:]*: Video: (?![^\n]*attached pic)", log):
        raise InvalidInput(f"{name} is a video; upload audio only (an M4A)", {"file": name}, code="invalid_upload")
    times = _TIME.findall(log)
    declared = _DURATION.search(log)
    if times:
        h, m, sec = times[-1]
        duration = int(h) * 3600 + int(m) * 60 + float(sec)  # what actually decoded
    elif declared is not None:
        duration = _seconds(declared)
    else:
        duration = 0.0
    if declared is not None:
        duration = max(duration, _seconds(declared))  # a header claiming more is refused too
    if duration <= 0:
        raise InvalidInput(f"{name} holds no audio", {"file": name}, code="invalid_upload")
    if duration > MAX_AUDIO_S:
        raise InvalidInput(f"{name} lasts {duration:.0f} s; the limit is {MAX_AUDIO_S:g} s",
                           {"file": name, "max_duration_s": MAX_AUDIO_S}, code="audio_too_long")
    rate = int(stream.group(1)) if stream.group(1) else None
    layout = stream.group(2) or ""
    channels = 1 if layout == "mono" else 2 if layout == "stereo" else (
        int(float(layout.split()[0])) if layout.endswith("channels") else None)
    return CheckedAudio(content_type, ext, fmt, round(duration, 3), rate, channels)


def _safe_entry(name: str) -> str | None:
    """The normalized path of a ZIP entry, or None for one that escapes its folder."""
    if name.startswith(("/", "\\")) or "\\" in name or ":" in name.split("/")[0]:
        return None
    norm = posixpath.normpath(name)
    if norm.startswith("..") or norm == ".":
        return None
    return norm


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, budget: list[int]) -> bytearray:
    """A member's bytes, cut at ``limit`` and at what is left of the ZIP's budget (sizes can lie)."""
    out = bytearray()
    with archive.open(info) as member:
        while chunk := member.read(READ_CHUNK):
            out += chunk
            budget[0] -= len(chunk)
            if len(out) > limit:
                raise PayloadTooLarge(f"ZIP entry {info.filename} is larger than {limit} bytes",
                                      {"entry": info.filename, "max_bytes": limit})
            if budget[0] < 0:
                raise PayloadTooLarge("the ZIP's content is larger than its limit", {"entry": info.filename})
    return out  # not copied again


def check_zip(data: Blob, settings: Settings) -> tuple[list[tuple[str, CheckedImage, str | None]], int]:
    """Images of a dataset ZIP with their sidecar captions. Returns (items, skipped_entries).

    Everything the central directory says is checked before a member is read: member count,
    paths, image count, each size and the total uncompressed size.
    """
    if len(data) > zip_file_limit(settings):
        raise PayloadTooLarge("the ZIP is too large", {"max_bytes": zip_file_limit(settings)})
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError):
        raise InvalidInput("not a valid ZIP file", code="invalid_upload") from None
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        # An image and its caption per file, and some room for clutter (.DS_Store, __MACOSX).
        max_members = settings.max_upload_files * 2 + 16
        if len(infos) > max_members:
            raise InvalidInput(f"the ZIP holds {len(infos)} entries; the limit is {max_members}",
                               {"max_files": settings.max_upload_files}, code="too_many_files")
        plan: list[tuple[zipfile.ZipInfo, str, str]] = []  # (info, path, "image" | "caption")
        skipped = 0
        for info in infos:
            path = _safe_entry(info.filename)
            if path is None:
                raise InvalidInput(f"ZIP entry {info.filename!r} escapes its folder",
                                   {"entry": info.filename}, code="invalid_upload")
            base = posixpath.basename(path)
            if base.startswith(".") or path.startswith("__MACOSX/"):
                skipped += 1
                continue
            if info.flag_bits & 0x1:
                raise InvalidInput(f"ZIP entry {path} is encrypted", {"entry": path}, code="invalid_upload")
            ext = posixpath.splitext(path)[1].lower()
            if ext == ".txt":
                plan.append((info, path, "caption"))
            elif ext in IMAGE_EXTENSIONS:
                if info.file_size > settings.max_upload_bytes:
                    raise PayloadTooLarge(f"ZIP entry {path} is too large",
                                          {"entry": path, "max_bytes": settings.max_upload_bytes})
                plan.append((info, path, "image"))
            else:
                skipped += 1
        n_images = sum(1 for _, _, what in plan if what == "image")
        if not n_images:
            raise InvalidInput("the ZIP holds no JPEG, PNG or WebP images", code="invalid_upload")
        if n_images > settings.max_upload_files:
            raise InvalidInput(f"the ZIP holds {n_images} images; the limit is {settings.max_upload_files}",
                               {"max_files": settings.max_upload_files}, code="too_many_files")
        declared = sum(info.file_size for info, _, _ in plan)
        if declared > settings.max_upload_zip_bytes:
            raise PayloadTooLarge(f"the ZIP's content is {declared} bytes; the limit is "
                                  f"{settings.max_upload_zip_bytes}", {"max_bytes": settings.max_upload_zip_bytes})
        budget = [settings.max_upload_zip_bytes]
        images: dict[str, CheckedImage] = {}
        captions: dict[str, str] = {}
        try:
            for info, path, what in plan:
                stem = posixpath.splitext(path)[0]
                if what == "caption":
                    text = _read_member(archive, info, 64 * 1024, budget)
                    captions[stem] = text.decode("utf-8", errors="replace").strip()[:1000]
                else:
                    images[stem] = check_image(_read_member(archive, info, settings.max_upload_bytes, budget),
                                               settings, name=path)
        # RuntimeError: an encrypted member the directory did not flag; zlib.error: a corrupt deflate stream
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError,
                RuntimeError, zlib.error):
            raise InvalidInput("a ZIP entry could not be read", code="invalid_upload") from None
    return [(stem, img, captions.get(stem)) for stem, img in sorted(images.items())], skipped


class UploadService:
    def __init__(self, db: Database, settings: Settings, storage: Storage) -> None:
        self.db = db
        self.settings = settings
        self.storage = storage
        # process-wide: each upload in flight may buffer up to max_upload_request_bytes
        self._slots = threading.BoundedSemaphore(max(1, settings.max_concurrent_uploads))

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of ``max_concurrent_uploads`` slots while a request is read and checked; when
        all are taken the request is refused at once (429, Retry-After) rather than queued in memory."""
        if not self._slots.acquire(blocking=False):
            retry = self.settings.upload_retry_after_s
            raise RateLimited("too many uploads in progress; retry shortly", {"retry_after_s": retry},
                              code="uploads_busy")
        try:
            yield
        finally:
            self._slots.release()

    def create(self, user: User, files: list[tuple[str, Blob]], ids: list[str] | None = None) -> list[Upload]:
        """Check every file first; store only when all pass. A ZIP becomes one ``dataset`` upload.
        ``ids``: the uploads' ids (one per file) when the caller derives them; else new ones."""
        if not files:
            raise InvalidInput("no file was sent (multipart field 'file')", code="invalid_upload")
        if len(files) > self.settings.max_upload_files:
            raise InvalidInput(f"{len(files)} files; the limit is {self.settings.max_upload_files}",
                               {"max_files": self.settings.max_upload_files}, code="too_many_files")
        planned: list[tuple[Upload, list[tuple[str, Blob, str]]]] = []
        for i_file, (filename, data) in enumerate(files):
            upload_id = ids[i_file] if ids is not None else new_id("upl")
            prefix = f"uploads/{user.id}/{upload_id}"
            if data[:4] == ZIP_MAGIC:
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
            elif (fmt := audio_format(data)) is not None:
                audio = check_audio(data, self.settings, name=filename or "file", fmt=fmt)
                key = f"{prefix}.{audio.extension}"
                upload = Upload(id=upload_id, user_id=user.id, key=key, filename=filename,
                                content_type=audio.content_type, size=len(data), kind="audio",
                                meta={"duration_s": audio.duration_s, "format": audio.format,
                                      "sample_rate": audio.sample_rate, "channels": audio.channels})
                planned.append((upload, [(key, data, audio.content_type)]))
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
        elif upload.kind == "image":
            out.append({"key": upload.key, "caption": None})
        else:  # an audio or video upload is no training image
            raise InvalidInput(f"upload {upload_id} is {upload.kind}, not an image or a dataset",
                               {"field": "images", "upload": upload_id, "kind": upload.kind})
    return out
