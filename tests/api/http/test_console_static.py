"""The web console's static files: served at / and /console/..., right types, strict CSP, shipped."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from api.http import console
from api.storage.local import LocalStorage
from api.storage.s3 import S3Storage
from tests.fixtures.harness import ApiHarness

REPO = Path(__file__).resolve().parents[3]


def directives(csp: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in csp.split(";"):
        name, *values = part.split()
        out[name] = values
    return out


async def test_index_at_root_with_a_strict_policy(api: ApiHarness) -> None:
    r = await api.client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.content == (console.STATIC_DIR / "index.html").read_bytes()
    csp = directives(r.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"]  # no inline script, no eval, no CDN
    assert csp["object-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    assert {"'self'", "data:", "blob:"} <= set(csp["img-src"])
    assert not any("unsafe" in v for values in csp.values() for v in values)
    assert r.headers["x-content-type-options"] == "nosniff"
    head = await api.client.head("/")
    assert head.status_code == 200 and head.headers["content-security-policy"]


async def test_api_routes_are_untouched(api: ApiHarness) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    assert (await api.client.get("/v1/models")).status_code == 200
    r = await api.client.get("/v1/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    schema = (await api.client.get("/openapi.json")).json()
    assert "/" not in schema["paths"] and not any(p.startswith("/console") for p in schema["paths"])


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    root = tmp_path / "static"
    (root / "lib").mkdir(parents=True)
    (root / "index.html").write_text('<!doctype html><script type="module" src="/console/app.js"></script>')
    (root / "app.js").write_text('import { x } from "./lib/x.mjs";\nconsole.log(x);\n')
    (root / "lib" / "x.mjs").write_text("export const x = 1;\n")
    (root / "style.css").write_text("body { margin: 0; }\n")
    (root / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    return root


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_assets_with_module_types_and_caching(assets: Path, storage: LocalStorage) -> None:
    app = FastAPI()
    console.mount(app, storage, assets)
    async with client_for(app) as client:
        for path, ctype in [("/console/app.js", "text/javascript; charset=utf-8"),
                            ("/console/lib/x.mjs", "text/javascript; charset=utf-8"),
                            ("/console/style.css", "text/css; charset=utf-8"),
                            ("/console/logo.svg", "image/svg+xml")]:
            r = await client.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"] == ctype, path
            assert "script-src 'self'" in r.headers["content-security-policy"], path
            assert r.headers["x-content-type-options"] == "nosniff"
        etag = (await client.get("/console/app.js")).headers["etag"]
        again = await client.get("/console/app.js", headers={"If-None-Match": etag})
        assert again.status_code == 304
        assert (await client.get("/console/missing.js")).status_code == 404
        # no way out of the static directory
        secret = assets.parent / "secret.txt"
        secret.write_text("nope")
        for path in ("/console/../secret.txt", "/console/%2e%2e/secret.txt", "/console/..%2fsecret.txt"):
            r = await client.get(path)
            assert r.status_code == 404 or b"nope" not in r.content, path


async def test_favicon_never_404s(assets: Path, storage: LocalStorage) -> None:
    app = FastAPI()
    console.mount(app, storage, assets)
    async with client_for(app) as client:
        r = await client.get("/favicon.ico")
        assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml"
        assert r.content.startswith(b"<svg")
        (assets / "favicon.ico").write_bytes(b"\x00\x00\x01\x00")
        r = await client.get("/favicon.ico")
        assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
        assert r.content == b"\x00\x00\x01\x00"


async def test_no_index_no_console(tmp_path: Path, storage: LocalStorage) -> None:
    app = FastAPI()
    console.mount(app, storage, tmp_path)  # an empty directory: nothing mounted, API unaffected
    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 404


@pytest.mark.parametrize("url, origin", [
    ("s3://ak:sk@minio.internal:9000/bucket?secure=false&region=us-east-1", "http://minio.internal:9000"),
    ("s3://ak:sk@minio:9000/outputs?secure=false&region=us-east-1&public_url=https://files.example.com",
     "https://files.example.com"),
])
def test_policy_names_the_s3_origin_of_presigned_urls(url: str, origin: str) -> None:
    storage = S3Storage.from_url(url)
    assert console.storage_origin(storage) == origin
    csp = directives(console.content_security_policy(console.storage_origin(storage)))
    for name in ("img-src", "media-src", "connect-src"):
        assert origin in csp[name], name
    assert origin not in csp["script-src"]


def test_policy_with_local_storage(storage: LocalStorage) -> None:
    assert console.storage_origin(storage) == "http://127.0.0.1:8000"
    assert console.storage_origin(LocalStorage(storage.root, signing_secret="s")) is None  # relative URLs


def static_files() -> list[Path]:
    return [p for p in console.STATIC_DIR.rglob("*") if p.is_file()]


@pytest.mark.parametrize("path", static_files(), ids=lambda p: str(p.relative_to(console.STATIC_DIR)))
def test_static_files_need_no_inline_code_and_no_cdn(path: Path) -> None:
    """What the policy would block anyway, caught here with the file's name: inline scripts and
    handlers, and anything loaded from another origin (the machine may be offline)."""
    if path.suffix not in (".html", ".js", ".mjs", ".css"):
        return
    text = path.read_text()
    if path.suffix == ".html":
        for tag in re.findall(r"<script\b[^>]*>", text, flags=re.I):
            assert re.search(r"\bsrc=", tag), f"inline <script> in {path.name}: {tag}"
        assert not re.search(r"\son[a-z]+\s*=", text, flags=re.I), f"inline event handler in {path.name}"
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text, flags=re.I), f"external resource in {path.name}"
    else:
        assert not re.search(r"""(import|from)\s*\(?\s*["'](https?:)?//""", text), f"CDN import in {path.name}"
        assert not re.search(r"@import\s+(url\()?[\"']?(https?:)?//", text), f"CDN import in {path.name}"


@pytest.mark.slow
def test_the_wheel_ships_the_console(tmp_path: Path) -> None:
    """A non-editable install has the pages: the built wheel holds every file under static/."""
    src = tmp_path / "src"  # a copy of the packaged tree: the build leaves nothing in the checkout
    for name in ("api", "serve", "models", "training", "ops"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("cineweave-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"api/http/console/" + str(p.relative_to(console.STATIC_DIR.parent)) for p in static_files()}
    assert "api/http/console/static/index.html" in expected
    assert expected <= names, sorted(expected - names)


def test_every_page_stylesheet_loads_with_the_shell() -> None:
    """A page's sheet linked only when its module runs is applied after the page is laid out (a
    wide table, a light card in the dark theme): index.html links every one up front."""
    index = (console.STATIC_DIR / "index.html").read_text()
    sheets = sorted(p.relative_to(console.STATIC_DIR).as_posix() for p in console.STATIC_DIR.rglob("*.css"))
    assert sheets, "the console ships stylesheets"
    for sheet in sheets:
        assert f'href="/console/{sheet}"' in index, f"{sheet} is not linked from index.html"
