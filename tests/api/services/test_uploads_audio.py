"""Audio uploads: WAV/MP3/OGG/M4A/FLAC recognized by magic bytes, decoded by ffmpeg for their
duration (at most ten minutes); garbage, a renamed text file or a video is 422 and stores nothing."""

from __future__ import annotations

import io
import math
import struct
import subprocess
import wave
from pathlib import Path

import imageio_ffmpeg
import pytest

from api.core.errors import InvalidInput
from api.db.engine import Database
from api.services import uploads as uploads_module
from api.services.uploads import UploadService, audio_format
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.harness import ApiHarness, add_user, bearer


def make_wav(seconds: float, rate: int = 8000, channels: int = 1, width: int = 2) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        frames = int(seconds * rate)
        if width == 1:
            w.writeframes(bytes(128 + int(60 * math.sin(i / 5)) for i in range(frames)) * channels)
        else:
            w.writeframes(b"".join(struct.pack("<h", int(3000 * math.sin(i / 5))) * channels for i in range(frames)))
    return out.getvalue()


def convert(tmp_path: Path, wav: bytes, ext: str, *extra: str) -> bytes:
    src, dst = tmp_path / "in.wav", tmp_path / f"out.{ext}"
    src.write_bytes(wav)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", str(src), *extra, str(dst)],
                   check=True, timeout=60)
    return dst.read_bytes()


@pytest.fixture
def service(db: Database, settings: Settings, storage: LocalStorage) -> UploadService:
    return UploadService(db, settings, storage)


def test_wav_is_stored_as_audio_with_its_duration(db: Database, settings: Settings, storage: LocalStorage,
                                                  service: UploadService) -> None:
    user = add_user(db, settings).user
    data = make_wav(1.5, rate=8000, channels=2)
    [upload] = service.create(user, [("voice.wav", data)])
    assert (upload.kind, upload.content_type, upload.size) == ("audio", "audio/wav", len(data))
    assert upload.key == f"uploads/{user.id}/{upload.id}.wav"
    assert upload.meta == {"duration_s": 1.5, "format": "wav", "sample_rate": 8000, "channels": 2}
    assert storage.get_bytes(upload.key) == data
    assert service.get(user, upload.id).meta["duration_s"] == 1.5


@pytest.mark.parametrize(("ext", "extra", "fmt", "ctype"), [
    ("mp3", (), "mp3", "audio/mpeg"),
    ("ogg", ("-c:a", "libopus"), "ogg", "audio/ogg"),
    ("m4a", ("-c:a", "aac"), "m4a", "audio/mp4"),
    ("flac", (), "flac", "audio/flac"),
])
def test_other_formats(tmp_path: Path, db: Database, settings: Settings, service: UploadService, ext: str,
                       extra: tuple[str, ...], fmt: str, ctype: str) -> None:
    data = convert(tmp_path, make_wav(2.0, rate=16000), ext, *extra)
    assert audio_format(data) == fmt
    [upload] = service.create(add_user(db, settings).user, [(f"a.{ext}", data)])
    assert (upload.kind, upload.content_type, upload.meta["format"]) == ("audio", ctype, fmt)
    assert upload.meta["duration_s"] == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("data", [
    b"just some text, renamed to song.mp3\n" * 10,
    b"RIFF\x24\x00\x00\x00WAVE" + b"\x00garbage" * 50,  # WAV magic, nothing behind it
    b"OggS" + bytes(range(256)) * 4,
    b"fLaC" + b"\xff" * 500,
    b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"not an mp3 at all" * 30,
    b"\x00\x00\x00\x18ftypM4A \x00\x00\x02\x00" + b"\x00" * 200,
])
def test_garbage_is_refused_and_nothing_is_stored(db: Database, settings: Settings, storage: LocalStorage,
                                                  service: UploadService, data: bytes) -> None:
    user = add_user(db, settings).user
    with pytest.raises(InvalidInput) as exc:
        service.create(user, [("good.wav", make_wav(0.5)), ("song.mp3", data)])
    assert exc.value.status == 422 and exc.value.code == "invalid_upload"
    assert service.list(user) == []
    assert not list((settings.data_dir / "storage").rglob("*.wav"))


def test_over_ten_minutes_is_refused(db: Database, settings: Settings, service: UploadService) -> None:
    long = make_wav(uploads_module.MAX_AUDIO_S + 2, rate=1000, width=1)  # ~600 KB
    with pytest.raises(InvalidInput) as exc:
        service.create(add_user(db, settings).user, [("long.wav", long)])
    assert exc.value.code == "audio_too_long" and exc.value.details["max_duration_s"] == 600


def test_exactly_at_the_limit_is_fine(db: Database, settings: Settings, service: UploadService,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads_module, "MAX_AUDIO_S", 3.0)
    [upload] = service.create(add_user(db, settings).user, [("a.wav", make_wav(3.0))])
    assert upload.meta["duration_s"] == 3.0
    with pytest.raises(InvalidInput):
        service.create(add_user(db, settings).user, [("a.wav", make_wav(3.5))])


def test_a_video_renamed_m4a_is_refused(tmp_path: Path, db: Database, settings: Settings,
                                        service: UploadService) -> None:
    dst = tmp_path / "v.m4a"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc=size=32x32:rate=4:duration=1", "-f", "lavfi", "-i", "sine=duration=1",
                    "-c:v", "libx264", "-c:a", "aac", "-shortest", "-f", "mp4", "-brand", "M4A ", str(dst)], check=True, timeout=60)
    data = dst.read_bytes()
    assert audio_format(data) == "m4a"
    with pytest.raises(InvalidInput, match="video"):
        service.create(add_user(db, settings).user, [("v.m4a", data)])


def test_over_the_size_cap(db: Database, settings: Settings, storage: LocalStorage) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 10_000})
    service = UploadService(db, small, storage)
    with pytest.raises(Exception) as exc:
        service.create(add_user(db, settings).user, [("a.wav", make_wav(2.0))])
    assert getattr(exc.value, "code", None) == "payload_too_large"


async def test_upload_route_takes_audio(api: ApiHarness) -> None:
    user = api.user()
    files = {"file": ("clip.wav", make_wav(1.0), "audio/wav")}
    r = await api.client.post("/v1/uploads", files=files, headers=bearer(user.api_key))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["kind"] == "audio" and body["content_type"] == "audio/wav" and body["meta"]["duration_s"] == 1.0
    assert body["width"] is None and body["url"]
    bad = await api.client.post("/v1/uploads", files={"file": ("clip.wav", b"hello world", "audio/wav")},
                                headers=bearer(user.api_key))
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_upload"


async def test_an_audio_upload_is_no_lora_training_image(api: ApiHarness) -> None:
    """Only image and dataset uploads train a LoRA: an audio one is 422 before any charge."""
    from tests.fixtures.harness import balance, job_count

    user = api.user(credits=100)
    files = {"file": ("clip.wav", make_wav(0.5), "audio/wav")}
    upload = (await api.client.post("/v1/uploads", files=files, headers=bearer(user.api_key))).json()["id"]
    body = {"name": "me", "base_model": "tiny-sd", "images": [upload], "steps": 100}
    for path in ("/v1/loras/quote", "/v1/loras"):
        r = await api.client.post(path, json=body, headers=bearer(user.api_key))
        assert r.status_code == 422, r.text
        assert r.json()["error"]["details"]["field"] == "images"
    assert job_count(api.db, user.user.id) == 0
    assert (balance(api.db, user.user.id).available, balance(api.db, user.user.id).reserved) == (100, 0)
