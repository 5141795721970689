"""Uploads (images and ZIP datasets) and local signed file URLs."""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select

from api.db.tables import Upload
from tests.fixtures.harness import ApiHarness, bearer


def image_bytes(fmt: str, size: tuple[int, int] = (40, 20), color: str = "red", **save: Any) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt, **save)
    return out.getvalue()


def oriented_jpeg() -> bytes:
    """A 40×20 JPEG whose EXIF says "rotate 90° clockwise to display" (orientation 6)."""
    img = Image.new("RGB", (40, 20), "white")
    for x in range(10):
        for y in range(20):
            img.putpixel((x, y), (255, 0, 0))  # red stripe on the left edge as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    img.save(out, "JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG file that declares a huge image (a decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


@pytest.fixture
async def h(make_api: Any) -> ApiHarness:
    return await make_api(run_runner=False, max_upload_pixels=1_000_000, max_upload_files=4,
                          max_upload_bytes=200_000)


async def post(h: ApiHarness, key: str, *files: tuple[str, bytes, str]) -> Any:
    return await h.client.post("/v1/uploads", files=[("file", f) for f in files], headers=bearer(key))


def stored(h: ApiHarness) -> tuple[int, list[str]]:
    with h.db.read() as s:
        rows = s.execute(select(func.count()).select_from(Upload)).scalar_one()
    return rows, h.storage.list("uploads")


@pytest.mark.parametrize(("fmt", "ctype"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
async def test_images_are_accepted(h: ApiHarness, fmt: str, ctype: str) -> None:
    user = h.user()
    r = await post(h, user.api_key, (f"x.{fmt.lower()}", image_bytes(fmt), "application/octet-stream"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["kind"], body["content_type"], body["width"], body["height"]) == ("image", ctype, 40, 20)
    assert body["id"].startswith("upl_") and len(body["data"]) == 1
    data = h.storage.get_bytes(f"uploads/{user.user.id}/{body['id']}.{ {'JPEG': 'jpg'}.get(fmt, fmt.lower()) }")
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == fmt and img.size == (40, 20)
    got = await h.client.get(f"/v1/uploads/{body['id']}", headers=bearer(user.api_key))
    assert got.status_code == 200 and got.json()["id"] == body["id"]
    assert [u["id"] for u in (await h.client.get("/v1/uploads", headers=bearer(user.api_key))).json()["data"]] == [
        body["id"]]


async def test_content_is_checked_not_the_name(h: ApiHarness) -> None:
    user = h.user()
    r = await post(h, user.api_key, ("photo.jpg", image_bytes("PNG"), "image/jpeg"))
    assert r.json()["content_type"] == "image/png"


async def test_exif_orientation_is_applied(h: ApiHarness) -> None:
    user = h.user()
    r = await post(h, user.api_key, ("rotated.jpg", oriented_jpeg(), "image/jpeg"))
    assert r.status_code == 201, r.text
    assert (r.json()["width"], r.json()["height"]) == (20, 40)
    [key] = [k for k in h.storage.list(f"uploads/{user.user.id}")]
    with Image.open(io.BytesIO(h.storage.get_bytes(key))) as img:
        assert img.size == (20, 40)
        assert img.getexif().get(0x0112, 1) == 1  # no rotation left to apply twice
        top = img.getpixel((10, 2))
        bottom = img.getpixel((10, 37))
    # the red stripe on the stored image's left edge is at the top once rotated for display
    assert top[0] > 200 and top[1] < 80
    assert bottom[0] > 200 and bottom[1] > 200


@pytest.mark.parametrize(("case", "files", "code"), [
    ("not an image", [("notes.png", b"hello, I am text", "image/png")], "invalid_upload"),
    ("empty file", [("empty.png", b"", "image/png")], "invalid_upload"),
    ("truncated PNG", [("cut.png", image_bytes("PNG", (300, 300), "blue")[:400], "image/png")], "invalid_upload"),
    ("truncated JPEG", [("cut.jpg", image_bytes("JPEG", (300, 300))[:300], "image/jpeg")], "invalid_upload"),
    ("GIF", [("anim.gif", image_bytes("GIF"), "image/gif")], "invalid_upload"),
    ("over the pixel limit", [("big.png", image_bytes("PNG", (1100, 1000)), "image/png")], "image_too_large"),
    ("decompression bomb", [("bomb.png", bomb_png(), "image/png")], "image_too_large"),
    ("over the byte limit", [("huge.bmp", b"BM" + b"\x00" * 250_000, "image/bmp")], "payload_too_large"),
    ("ZIP escaping its folder", [("d.zip", zip_bytes({"../evil.png": image_bytes("PNG")}), "application/zip")],
     "invalid_upload"),
    ("ZIP with an absolute path", [("d.zip", zip_bytes({"/etc/evil.png": image_bytes("PNG")}), "application/zip")],
     "invalid_upload"),
    ("ZIP escaping deep down", [("d.zip", zip_bytes({"a/../../evil.png": image_bytes("PNG")}), "application/zip")],
     "invalid_upload"),
    ("empty ZIP", [("d.zip", zip_bytes({}), "application/zip")], "invalid_upload"),
    ("ZIP without images", [("d.zip", zip_bytes({"a.txt": b"caption"}), "application/zip")], "invalid_upload"),
    ("ZIP with a bad image", [("d.zip", zip_bytes({"a.png": image_bytes("PNG"), "b.png": b"junk"}),
                               "application/zip")], "invalid_upload"),
    ("too many images in a ZIP", [("d.zip", zip_bytes({f"{i}.png": image_bytes("PNG") for i in range(5)}),
                                   "application/zip")], "too_many_files"),
    ("too many files", [(f"{i}.png", image_bytes("PNG"), "image/png") for i in range(5)], "too_many_files"),
    ("one bad file among good ones", [("a.png", image_bytes("PNG"), "image/png"), ("b.png", b"junk", "image/png")],
     "invalid_upload"),
])
async def test_rejected_uploads_store_nothing(h: ApiHarness, case: str, files: list[tuple[str, bytes, str]],
                                              code: str) -> None:
    user = h.user()
    r = await post(h, user.api_key, *files)
    assert r.status_code in (413, 422), r.text
    assert r.json()["error"]["code"] == code, r.text
    assert stored(h) == (0, [])


async def test_no_file_is_422(h: ApiHarness) -> None:
    user = h.user()
    r = await h.client.post("/v1/uploads", headers=bearer(user.api_key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


async def test_zip_dataset_with_captions(h: ApiHarness) -> None:
    user = h.user()
    entries = {"set/a.png": image_bytes("PNG"), "set/a.txt": b"a photo of TOK", "set/b.jpg": image_bytes("JPEG"),
               "__MACOSX/set/._a.png": b"junk", "set/.DS_Store": b"junk", "set/readme.md": b"hi"}
    r = await post(h, user.api_key, ("data.zip", zip_bytes(entries), "application/zip"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["kind"] == "dataset" and body["content_type"] == "application/zip"
    images = body["meta"]["images"]
    assert [(i["name"], i["caption"]) for i in images] == [("set/a", "a photo of TOK"), ("set/b", None)]
    assert body["meta"]["skipped"] == 3
    assert len(h.storage.list(f"uploads/{user.user.id}")) == 2


async def test_delete_upload_removes_the_files(h: ApiHarness) -> None:
    user = h.user()
    body = (await post(h, user.api_key, ("a.png", image_bytes("PNG"), "image/png"))).json()
    r = await h.client.delete(f"/v1/uploads/{body['id']}", headers=bearer(user.api_key))
    assert r.status_code == 204
    assert stored(h) == (0, [])
    assert (await h.client.get(f"/v1/uploads/{body['id']}", headers=bearer(user.api_key))).status_code == 404


# signed file URLs ---------------------------------------------------------------------------
def _path(url: str) -> str:
    return url.split("127.0.0.1:8000", 1)[-1]


async def test_signed_url_valid_expired_tampered(h: ApiHarness) -> None:
    key = "outputs/usr_x/job_y/0.png"
    h.storage.put_bytes(key, b"\x89PNG data", "image/png")
    good = _path(h.storage.url(key, 60))
    r = await h.client.get(good)
    assert r.status_code == 200 and r.content == b"\x89PNG data" and r.headers["content-type"] == "image/png"

    expired = _path(h.storage.url(key, -1))
    r = await h.client.get(expired)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_signature"

    path, query = good.split("?", 1)
    params = dict(p.split("=", 1) for p in query.split("&"))
    later = int(params["expires"]) + 3600
    r = await h.client.get(f"{path}?expires={later}&signature={params['signature']}")
    assert r.status_code == 401  # a longer life is not signed

    flipped = params["signature"][:-1] + ("0" if params["signature"][-1] != "0" else "1")
    r = await h.client.get(f"{path}?expires={params['expires']}&signature={flipped}")
    assert r.status_code == 401

    h.storage.put_bytes("outputs/usr_x/job_y/1.png", b"other", "image/png")
    r = await h.client.get(f"/v1/files/outputs/usr_x/job_y/1.png?{query}")
    assert r.status_code == 401  # another file with this file's signature


async def test_signed_url_of_a_missing_or_escaping_key(h: ApiHarness) -> None:
    missing = _path(h.storage.url("outputs/gone.png", 60))
    assert (await h.client.get(missing)).status_code == 404
    sig = h.storage._signature("../signing.key", int(time.time()) + 60)
    r = await h.client.get(f"/v1/files/..%2Fsigning.key?expires={int(time.time()) + 60}&signature={sig}")
    assert r.status_code == 404
