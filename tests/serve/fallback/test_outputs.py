"""Storing a provider's video: the MP4 header probe and the stored objects."""

from __future__ import annotations

from api.storage.local import LocalStorage
from serve.fallback.outputs import VideoInfo, probe_mp4, store_video
from tests.fakes.media import tiny_mp4
from tests.serve.fallback.conftest import have_posters


def test_probe_reads_the_mp4_header() -> None:
    assert probe_mp4(tiny_mp4()) == VideoInfo(width=64, height=64, num_frames=8, fps=8.0, duration_s=1.0)
    assert probe_mp4(tiny_mp4(frames=12, fps=24, size=32)) == VideoInfo(32, 32, 12, 24.0, 0.5)


def test_probe_of_something_else_is_empty() -> None:
    assert probe_mp4(b"") == VideoInfo()
    assert probe_mp4(b"\x00\x00\x00\x08moov") == VideoInfo()
    assert probe_mp4(tiny_mp4()[:200]) == VideoInfo()


async def test_store_video_writes_the_video_and_a_poster(storage: LocalStorage) -> None:
    event = await store_video(storage, "outputs/u/j/", tiny_mp4(), fps_hint=24, duration_hint=8.0)
    assert event.key == "outputs/u/j/0.mp4" and storage.get_bytes(event.key) == tiny_mp4()
    assert (event.width, event.height, event.num_frames, event.fps, event.duration_s) == (64, 64, 8, 8.0, 1.0)
    if have_posters():
        assert event.thumbnail_key == "outputs/u/j/0.poster.png"
        assert storage.get_bytes(event.thumbnail_key).startswith(b"\x89PNG")


async def test_an_unreadable_video_is_stored_without_a_poster(storage: LocalStorage) -> None:
    event = await store_video(storage, "outputs/u/j/", b"not a video", fps_hint=24, duration_hint=4.0)
    assert storage.get_bytes(event.key) == b"not a video"
    assert event.thumbnail_key is None and not storage.exists("outputs/u/j/0.poster.png")
    assert (event.fps, event.duration_s, event.width) == (24, 4.0, None)  # the hints stand in


def test_make_providers_builds_the_configured_ones(tmp_path, storage: LocalStorage) -> None:  # noqa: ANN001
    from serve.fallback import ReplicateExecutor, VeoExecutor, make_providers
    from tests.serve.fallback.conftest import make_settings

    assert make_providers(make_settings(tmp_path), storage) == {}
    both = make_providers(make_settings(tmp_path, replicate_api_token="r8_x", gemini_api_key="AIzaX"), storage)
    assert isinstance(both["replicate"], ReplicateExecutor) and isinstance(both["veo"], VeoExecutor)
