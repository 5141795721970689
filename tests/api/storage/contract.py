"""Behaviour every Storage backend shares; test modules subclass :class:`StorageContract`.

A subclass provides a ``store`` fixture with an empty storage.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from api.storage.base import Storage, StoredObject

BAD_KEYS = ["", "/abs/key", "a/../b", "../escape", "a//b", "a/./b", "trailing/", "back\\slash", ".."]
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


class StorageContract:
    def test_is_a_storage(self, store: Storage) -> None:
        assert isinstance(store, Storage)

    def test_put_get_stat_with_content_type(self, store: Storage) -> None:
        stored = store.put_bytes("outputs/u1/j1/0.png", PNG, "image/png")
        assert stored == StoredObject("outputs/u1/j1/0.png", len(PNG), "image/png")
        assert store.get_bytes("outputs/u1/j1/0.png") == PNG
        assert store.stat("outputs/u1/j1/0.png") == StoredObject("outputs/u1/j1/0.png", len(PNG), "image/png")
        assert store.exists("outputs/u1/j1/0.png")

    def test_overwrite_replaces_bytes_and_type(self, store: Storage) -> None:
        store.put_bytes("k/v.bin", b"one", "application/octet-stream")
        store.put_bytes("k/v.bin", b"second", "text/plain")
        assert store.get_bytes("k/v.bin") == b"second"
        assert store.stat("k/v.bin") == StoredObject("k/v.bin", 6, "text/plain")

    def test_missing_keys(self, store: Storage, tmp_path: Path) -> None:
        assert store.stat("nope/missing.txt") is None
        assert not store.exists("nope/missing.txt")
        with pytest.raises(FileNotFoundError):
            store.get_bytes("nope/missing.txt")
        with pytest.raises(FileNotFoundError):
            store.download("nope/missing.txt", tmp_path / "x")
        store.delete("nope/missing.txt")  # deleting what is not there is fine

    def test_put_file_and_download(self, store: Storage, tmp_path: Path) -> None:
        source = tmp_path / "clip.mp4"
        source.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 5000)
        stored = store.put_file("outputs/u/j/clip.mp4", source, "video/mp4")
        assert stored.size == source.stat().st_size and stored.content_type == "video/mp4"
        target = store.download("outputs/u/j/clip.mp4", tmp_path / "deep" / "copy.mp4")
        assert target.read_bytes() == source.read_bytes()
        assert store.stat("outputs/u/j/clip.mp4").content_type == "video/mp4"

    def test_list_and_delete_prefix(self, store: Storage) -> None:
        for key in ("outputs/u1/j1/0.png", "outputs/u1/j1/poster.png", "outputs/u1/j10/0.png",
                    "outputs/u2/j2/0.png", "uploads/u1/a.png"):
            store.put_bytes(key, b"x", "image/png")
        assert store.list("outputs/u1/j1/") == ["outputs/u1/j1/0.png", "outputs/u1/j1/poster.png"]
        # A prefix is a directory: "j1" does not match "j10".
        assert store.list("outputs/u1/j1") == ["outputs/u1/j1/0.png", "outputs/u1/j1/poster.png"]
        assert store.list("outputs/u1/j1/0.png") == ["outputs/u1/j1/0.png"]
        assert store.list("outputs/") == ["outputs/u1/j1/0.png", "outputs/u1/j1/poster.png",
                                          "outputs/u1/j10/0.png", "outputs/u2/j2/0.png"]
        assert store.list("nothing/here") == []
        assert store.delete_prefix("outputs/u1/j1/") == 2
        assert store.list("outputs/u1/") == ["outputs/u1/j10/0.png"]
        assert store.delete_prefix("outputs/u1/j1/") == 0
        assert store.exists("uploads/u1/a.png")

    def test_delete(self, store: Storage) -> None:
        store.put_bytes("a/b.txt", b"hi", "text/plain")
        store.delete("a/b.txt")
        assert not store.exists("a/b.txt")
        assert store.list("a") == []

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_bad_keys_rejected(self, store: Storage, key: str, tmp_path: Path) -> None:
        for call in (lambda: store.put_bytes(key, b"x", "text/plain"),
                     lambda: store.put_file(key, tmp_path / "unused", "text/plain"),
                     lambda: store.get_bytes(key), lambda: store.stat(key), lambda: store.exists(key),
                     lambda: store.delete(key), lambda: store.url(key),
                     lambda: store.download(key, tmp_path / "out")):
            with pytest.raises(ValueError, match="invalid storage key"):
                call()

    def test_traversal_prefix_lists_nothing(self, store: Storage) -> None:
        store.put_bytes("a/b.txt", b"hi", "text/plain")
        assert store.list("../a") == []
