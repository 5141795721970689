"""Upload limits are checked before the work they bound: streaming multipart, ZIP directory, image header."""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import func, select

from api.core.errors import CineWeaveError
from api.db.engine import Database
from api.db.tables import Upload
from api.services import uploads
from api.services.uploads import PayloadTooLarge, UploadService, check_zip, read_multipart
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.harness import add_user

BOUNDARY = "b0undary"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, "PNG")
    return out.getvalue()


def part_head(name: str = "file", filename: str = "a.png") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


END = f"--{BOUNDARY}--\r\n".encode()


class Body:
    """An async body that records how many of its chunks were pulled."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk


def parts(*bodies: bytes) -> list[bytes]:
    """Header and body of each part as separate chunks (so a refusal shows which were read)."""
    chunks: list[bytes] = []
    for i, body in enumerate(bodies):
        chunks += [part_head(filename=f"{i}.png"), body, b"\r\n"]
    return chunks + [END]


@pytest.fixture
def limits(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_upload_bytes": 10_000, "max_upload_files": 2,
                                       "max_upload_request_bytes": 50_000, "max_upload_zip_bytes": 30_000})


async def test_streams_the_files(limits: Settings) -> None:
    image = png()
    got = await read_multipart(Body(parts(image, image)), CTYPE, None, limits)
    assert got == [("0.png", image), ("1.png", image)]


async def test_declared_length_over_the_cap_reads_nothing(limits: Settings) -> None:
    body = Body(parts(png()))
    with pytest.raises(PayloadTooLarge) as info:
        await read_multipart(body, CTYPE, str(limits.max_upload_request_bytes + 1), limits)
    assert (info.value.status, info.value.code) == (413, "payload_too_large")
    assert body.pulled == 0


async def test_stream_over_the_cap_stops_reading(limits: Settings) -> None:
    """No Content-Length (chunked): refused as soon as the count passes the cap, the rest unread."""
    chunks = [part_head(filename="z.zip"), b"PK\x03\x04"] + [b"\0" * 20_000] * 10 + [b"\r\n", END]
    limits = limits.model_copy(update={"max_upload_bytes": 100_000})  # a ZIP part may be 1 MB here
    body = Body(chunks)
    with pytest.raises(PayloadTooLarge):
        await read_multipart(body, CTYPE, None, limits)
    assert body.pulled == 5  # head, magic, 3 × 20 kB: the third passes the 50 kB cap; 7 chunks never read


async def test_an_image_part_over_its_limit_stops_reading(limits: Settings) -> None:
    body = Body([part_head(), b"\x89PNG" + b"\0" * 6_000, b"\0" * 6_000, b"\0" * 6_000, b"\r\n", END])
    with pytest.raises(PayloadTooLarge) as info:
        await read_multipart(body, CTYPE, None, limits)
    assert info.value.details["max_bytes"] == limits.max_upload_bytes
    assert body.pulled == 3


async def test_file_count_is_checked_before_the_extra_body(limits: Settings) -> None:
    body = Body(parts(png(), png(), b"THIRD BODY"))
    with pytest.raises(CineWeaveError) as info:
        await read_multipart(body, CTYPE, None, limits)
    assert info.value.code == "too_many_files"
    assert body.pulled == 7  # two parts (3 chunks each) and the third part's headers, not its body


@pytest.mark.parametrize("ctype", ["application/json", "multipart/form-data", ""])
async def test_not_multipart(limits: Settings, ctype: str) -> None:
    with pytest.raises(CineWeaveError) as info:
        await read_multipart(Body([b"{}"]), ctype, None, limits)
    assert info.value.code == "invalid_input"


# ZIP ---------------------------------------------------------------------------------------
def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the images check_image was asked to decode, and a count of PIL full decodes."""
    names: list[str] = []
    real = uploads.check_image

    def spy(data: bytes, settings: Settings, name: str = "file") -> Any:
        names.append(name)
        return real(data, settings, name)

    monkeypatch.setattr(uploads, "check_image", spy)
    return names


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    real = Image.Image.load

    def load(self: Image.Image) -> Any:
        seen.append(self.size)
        return real(self)

    monkeypatch.setattr(Image.Image, "load", load)
    return seen


def test_member_count_checked_before_any_member_is_read(limits: Settings, decoded: list[str]) -> None:
    many = zip_of({f"junk{i}.bin": b"x" for i in range(limits.max_upload_files * 2 + 17)} | {"a.png": png()})
    with pytest.raises(CineWeaveError) as info:
        check_zip(many, limits)
    assert info.value.code == "too_many_files" and decoded == []


def test_image_count_checked_before_decoding(limits: Settings, decoded: list[str]) -> None:
    with pytest.raises(CineWeaveError) as info:
        check_zip(zip_of({f"{i}.png": png() for i in range(3)}), limits)
    assert info.value.code == "too_many_files" and decoded == []


def test_total_uncompressed_size_from_the_directory(limits: Settings, decoded: list[str]) -> None:
    """A deflate bomb: small on the wire, large declared content; refused before inflating."""
    bomb = zip_of({"a.png": png(), "b.png": b"\0" * 9_000, "c.txt": b"\0" * 25_000})
    assert len(bomb) < 2_000
    with pytest.raises(PayloadTooLarge):
        check_zip(bomb, limits.model_copy(update={"max_upload_files": 5}))
    assert decoded == []


def _lie_about_sizes(data: bytes, name: bytes, size: int) -> bytes:
    """Rewrite ``name``'s uncompressed size in the local header and the central directory."""
    out = bytearray(data)
    local = out.find(b"PK\x03\x04")
    while local != -1:
        name_len = struct.unpack_from("<H", out, local + 26)[0]
        if out[local + 30:local + 30 + name_len] == name:
            struct.pack_into("<I", out, local + 22, size)
        local = out.find(b"PK\x03\x04", local + 4)
    central = out.find(b"PK\x01\x02")
    while central != -1:
        name_len = struct.unpack_from("<H", out, central + 28)[0]
        if out[central + 46:central + 46 + name_len] == name:
            struct.pack_into("<I", out, central + 24, size)
        central = out.find(b"PK\x01\x02", central + 4)
    return bytes(out)


def test_a_lying_size_is_enforced_while_reading(limits: Settings, decoded: list[str]) -> None:
    """The directory claims 100 bytes for a member that inflates to 9 000: it is never taken whole.

    zipfile stops at the declared size and the CRC then fails; ``_read_member``'s own caps (tested
    below) hold even if a reader did not.
    """
    honest = zip_of({"a.png": png(), "b.txt": b"caption " * 1_125})
    liar = _lie_about_sizes(honest, b"b.txt", 100)
    with pytest.raises(CineWeaveError) as info:
        check_zip(liar, limits.model_copy(update={"max_upload_zip_bytes": 1_000}))
    assert info.value.code == "invalid_upload"


def test_read_member_enforces_the_budget() -> None:
    archive = zipfile.ZipFile(io.BytesIO(zip_of({"a.bin": b"x" * 5_000})))
    with pytest.raises(PayloadTooLarge):
        uploads._read_member(archive, archive.getinfo("a.bin"), 10_000, [4_000])
    with pytest.raises(PayloadTooLarge):
        uploads._read_member(archive, archive.getinfo("a.bin"), 1_000, [100_000])
    assert uploads._read_member(archive, archive.getinfo("a.bin"), 5_000, [5_000]) == b"x" * 5_000


def test_pixels_checked_from_the_header_before_decoding(limits: Settings, loads: list[tuple[int, int]]) -> None:
    big = zip_of({"big.png": png((200, 200))})  # 40 000 px, small file
    loads.clear()  # saving the test image decoded it
    with pytest.raises(CineWeaveError) as info:
        check_zip(big, limits.model_copy(update={"max_upload_pixels": 10_000}))
    assert info.value.code == "image_too_large"
    assert loads == []  # never decoded


# nothing stored when refused ------------------------------------------------------------------
@pytest.mark.parametrize("case", ["too many members", "bomb", "pixels", "one bad among good"])
def test_refused_uploads_store_nothing(db: Database, limits: Settings, storage: LocalStorage, case: str) -> None:
    user = add_user(db, limits).user
    service = UploadService(db, limits.model_copy(update={"max_upload_pixels": 10_000}), storage)
    files = {
        "too many members": [("d.zip", zip_of({f"{i}.png": png() for i in range(3)}))],
        "bomb": [("d.zip", zip_of({"a.png": png(), "b.txt": b"\0" * 40_000}))],
        "pixels": [("a.png", png()), ("d.zip", zip_of({"big.png": png((200, 200))}))],
        "one bad among good": [("a.png", png()), ("b.png", b"junk")],
    }[case]
    with pytest.raises(CineWeaveError):
        service.create(user, files)
    with db.read() as session:
        assert session.execute(select(func.count()).select_from(Upload)).scalar_one() == 0
    assert storage.list("uploads") == []


def _flag_encrypted(data: bytes) -> bytes:
    """Set the 'encrypted' bit of every entry, in the local headers and the central directory."""
    out = bytearray(data)
    for magic, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = out.find(magic)
        while at != -1:
            out[at + offset] |= 0x1
            at = out.find(magic, at + 4)
    return bytes(out)


def _corrupt_deflate(data: bytes) -> bytes:
    """Replace the first member's compressed bytes with an invalid deflate stream (CRC untouched)."""
    info = zipfile.ZipFile(io.BytesIO(data)).infolist()[0]
    start = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[start + 26:start + 30])
    body = start + 30 + name_len + extra_len
    return data[:body] + b"\xff" * info.compress_size + data[body + info.compress_size:]


@pytest.mark.parametrize("spoil", [_flag_encrypted, _corrupt_deflate])
def test_unreadable_members_are_a_422_not_a_500(limits: Settings, spoil: Any) -> None:
    data = spoil(zip_of({"a.png": png(), "a.txt": b"a caption"}))
    with pytest.raises(CineWeaveError) as info:
        check_zip(data, limits)
    assert info.value.status == 422 and info.value.code == "invalid_upload"
