"""The web console: static files shipped in this package, served by the API itself.

``GET /`` answers ``static/index.html``; everything else under ``static/`` is served at
``/console/<path>`` (a prefix no API route uses: ``/v1``, ``/replicate``, ``/openai``,
``/healthz``, ``/readyz``, ``/metrics`` stay as they are). No build step and no CDN: the pages
are plain ES modules that call the public v1 API with the key kept in session storage.

Every console response carries a strict Content-Security-Policy: scripts, styles and
connections only from this origin (no inline script), images and media also from ``data:``,
``blob:`` and the storage's origin when presigned URLs point elsewhere (S3/MinIO, or a
``public_url`` that differs from the page's origin).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from api.storage.base import Storage

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PREFIX = "/console"
INDEX = "index.html"

# Explicit types: the platform's mimetypes table varies (``.js`` as ``application/x-javascript``
# on some systems, ``.mjs`` unknown on others), and a browser refuses an ES module served wrong.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}

DEFAULT_ICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
                b'<rect width="16" height="16" rx="3" fill="#4f46e5"/>'
                b'<path d="M11 5.2A3.5 3.5 0 1 0 11 10.8" stroke="#fff" stroke-width="2" fill="none"/></svg>')


def storage_origin(storage: Storage) -> str | None:
    """The scheme://host[:port] of the URLs the storage hands out (computed offline: a local
    signature or an S3 presign with a known region), or None when it cannot tell."""
    try:
        parsed = urlparse(storage.url("console/csp-probe", 60))
    except Exception:  # noqa: BLE001 - the console still works for same-origin files
        logger.warning("console: cannot tell the storage's origin; media only from 'self'", exc_info=True)
        return None
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return None
    return f"{parsed.scheme}://{parsed.netloc}"


def content_security_policy(media_origin: str | None = None) -> str:
    """The console's policy; ``media_origin`` is added where outputs are loaded from (img, video,
    and fetch, e.g. to reuse an output as an upload)."""
    extra = f" {media_origin}" if media_origin else ""
    return "; ".join([
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        f"img-src 'self' data: blob:{extra}",
        f"media-src 'self' blob:{extra}",
        f"connect-src 'self'{extra}",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])


class ConsoleFiles(StaticFiles):
    """StaticFiles with the console's headers and explicit content types (ETag and 304s as usual)."""

    def __init__(self, directory: Path, csp: str) -> None:
        super().__init__(directory=directory, html=False, check_dir=True)
        self.csp = csp

    def file_response(self, full_path: Any, stat_result: Any, scope: Scope, status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        media_type = CONTENT_TYPES.get(Path(str(full_path)).suffix.lower())
        if media_type is not None:
            response.media_type = media_type
            response.headers["content-type"] = media_type
        apply_headers(response, self.csp)
        return response


def apply_headers(response: Response, csp: str) -> None:
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    # revalidate each load (ETag): a new version of the console is picked up at once
    response.headers["Cache-Control"] = "no-cache"


def mount(app: FastAPI, storage: Storage, static_dir: Path = STATIC_DIR) -> None:
    """Serve the console: ``/`` (index.html) and ``/console/<asset>``; not in the OpenAPI schema."""
    if not (static_dir / INDEX).is_file():
        logger.warning("console: %s is missing; the web console is not served", static_dir / INDEX)
        return
    csp = content_security_policy(storage_origin(storage))
    files = ConsoleFiles(static_dir, csp)

    async def index() -> Response:
        path = static_dir / INDEX
        response = Response(path.read_bytes(), media_type=CONTENT_TYPES[".html"])
        apply_headers(response, csp)
        return response

    async def favicon() -> Response:
        """Browsers ask for /favicon.ico unless the page names an icon; a 404 there is a console
        error. ``static/favicon.ico`` when the console ships one, else a small built-in SVG."""
        path = static_dir / "favicon.ico"
        if path.is_file():
            response = Response(path.read_bytes(), media_type=CONTENT_TYPES[".ico"])
        else:
            response = Response(DEFAULT_ICON, media_type=CONTENT_TYPES[".svg"])
        apply_headers(response, csp)
        return response

    app.add_api_route("/", index, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route("/favicon.ico", favicon, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(ASSETS_PREFIX, files, name="console")


__all__ = ["ASSETS_PREFIX", "STATIC_DIR", "content_security_policy", "mount", "storage_origin"]
