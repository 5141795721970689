"""The replica's LoRA file cache stays bounded and never drops a file the set being loaded needs."""

from __future__ import annotations

from pathlib import Path

from api.storage.local import LocalStorage
from serve.lora_cache import WEIGHTS_NAME, LoraFileCache


def _storage(tmp_path: Path, n: int) -> LocalStorage:
    storage = LocalStorage(tmp_path / "store", signing_secret="s", base_url="http://127.0.0.1:1")
    for i in range(n):
        storage.put_bytes(f"loras/u/l{i}/{WEIGHTS_NAME}", f"weights {i}".encode(), "application/octet-stream")
    return storage


def test_downloads_once_then_serves_from_disk(tmp_path: Path) -> None:
    cache = LoraFileCache(tmp_path / "cache", _storage(tmp_path, 1), max_entries=4)
    first = cache.path("l0", f"loras/u/l0/{WEIGHTS_NAME}")
    again = cache.path("l0", f"loras/u/l0/{WEIGHTS_NAME}")
    assert first == again and first.read_bytes() == b"weights 0"
    assert cache.downloads == 1


def test_least_recently_used_are_evicted_past_the_bound(tmp_path: Path) -> None:
    cache = LoraFileCache(tmp_path / "cache", _storage(tmp_path, 6), max_entries=3)
    paths = [cache.path(f"l{i}", f"loras/u/l{i}/{WEIGHTS_NAME}") for i in range(3)]
    cache.path("l0", f"loras/u/l0/{WEIGHTS_NAME}")  # l0 used again: l1 is now the oldest
    for i in (3, 4):
        cache.path(f"l{i}", f"loras/u/l{i}/{WEIGHTS_NAME}")
    assert len(cache.entries()) == 3
    assert paths[0].exists() and not paths[1].exists() and not paths[2].exists()


def test_files_of_the_set_being_loaded_are_never_evicted(tmp_path: Path) -> None:
    cache = LoraFileCache(tmp_path / "cache", _storage(tmp_path, 3), max_entries=1)
    kept: set[Path] = set()
    for i in range(3):  # one set of three LoRAs on a cache of one: all three stay until it is loaded
        kept.add(cache.path(f"l{i}", f"loras/u/l{i}/{WEIGHTS_NAME}", kept).parent)
    assert all((p / WEIGHTS_NAME).exists() for p in kept)
    cache.path("l0", f"loras/u/l0/{WEIGHTS_NAME}")  # the next load trims back to the bound
    assert cache.entries() == [p.name for p in kept if p.name.startswith("l0-")]


def test_a_retrained_lora_with_new_weights_is_fetched_anew(tmp_path: Path) -> None:
    storage = _storage(tmp_path, 1)
    storage.put_bytes("loras/u/l0/v2.safetensors", b"weights v2", "application/octet-stream")
    cache = LoraFileCache(tmp_path / "cache", storage, max_entries=4)
    assert cache.path("l0", f"loras/u/l0/{WEIGHTS_NAME}").read_bytes() == b"weights 0"
    assert cache.path("l0", "loras/u/l0/v2.safetensors").read_bytes() == b"weights v2"
