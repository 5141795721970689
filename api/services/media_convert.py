"""Server-side image conversion for the OpenAI shape's ``output_format`` (png | jpeg | webp).

Replicas store PNGs. A request for JPEG or WebP is answered by converting the stored PNG once
and storing the result next to it (``outputs/{user}/{job}/0.q80.jpeg``), so it is signed, served
and deleted (with the job's outputs prefix) like any output, and converted once however often it
is read. ``output_compression`` (0–100, OpenAI's default 100) is the encoder's quality: 100 keeps
the most detail, lower values give smaller files. PNG is lossless and ignores it.
"""

from __future__ import annotations

import io
import logging
import posixpath

from PIL import Image

from api.storage.base import Storage

logger = logging.getLogger(__name__)

FORMATS: dict[str, tuple[str, str]] = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}
DEFAULT_COMPRESSION = 100


def content_type(fmt: str) -> str:
    return FORMATS[fmt][1]


def convert_image(data: bytes, fmt: str, compression: int | None = None) -> bytes:
    """``data`` (any image Pillow reads) re-encoded as ``fmt``; alpha is flattened for JPEG."""
    pil_format, _ = FORMATS[fmt]
    quality = DEFAULT_COMPRESSION if compression is None else compression
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        out = img
        if fmt == "jpeg" and img.mode not in ("RGB", "L"):
            out = img.convert("RGB")
        buf = io.BytesIO()
        if fmt == "png":
            out.save(buf, format=pil_format)
        else:
            out.save(buf, format=pil_format, quality=max(1, min(100, quality)))
    return buf.getvalue()


def converted_key(key: str, fmt: str, compression: int | None = None) -> str:
    """Where the ``fmt`` version of ``key`` is kept: beside it, named by format and quality."""
    stem, _ext = posixpath.splitext(key)
    if fmt == "png":
        return f"{stem}.png"
    quality = DEFAULT_COMPRESSION if compression is None else compression
    return f"{stem}.q{quality}.{fmt}"


def ensure_format(storage: Storage, key: str, source_type: str | None, fmt: str,
                  compression: int | None = None) -> tuple[str, bytes | None]:
    """The key of ``key``'s image in ``fmt`` (converted and stored on first use) and, when it was
    just converted, its bytes (so a caller that wants them does not read them back)."""
    if source_type == content_type(fmt) and (fmt == "png" or compression is None):
        return key, None
    target = converted_key(key, fmt, compression)
    if target == key:
        return key, None
    if storage.exists(target):
        return target, None
    data = convert_image(storage.get_bytes(key), fmt, compression)
    storage.put_bytes(target, data, content_type(fmt))
    logger.debug("converted %s to %s (%d bytes)", key, target, len(data))
    return target, data
