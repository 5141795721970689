"""A replica's LoRA weight files on local disk, bounded: the least recently used are deleted.

Serve's ``multiplexed`` keeps at most a few adapter *sets* loaded per replica, but every distinct
LoRA a replica ever served left its weights file on disk for good. This cache keeps at most
``max_entries`` LoRA directories (a directory per LoRA id and weights key, so a retrained LoRA is
fetched anew), by last use, and never deletes one that the set being loaded needs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from api.storage.base import Storage

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_MAX_ENTRIES = 64


class LoraFileCache:
    def __init__(self, root: Path, storage: Storage, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.root = root
        self.storage = storage
        self.max_entries = max(1, max_entries)
        self.downloads = 0
        self._lock = threading.Lock()

    def _dir(self, lora_id: str, weights_key: str) -> Path:
        digest = hashlib.sha256(weights_key.encode()).hexdigest()[:16]
        safe_id = "".join(c if c.isalnum() or c in "-_" else "_" for c in lora_id)[:64]
        return self.root / f"{safe_id}-{digest}"

    def path(self, lora_id: str, weights_key: str, keep: set[Path] | None = None) -> Path:
        """The local weights file of one LoRA, downloaded when missing (blocking: call in a thread).

        ``keep``: directories of the same set, which eviction must leave alone.
        """
        directory = self._dir(lora_id, weights_key)
        target = directory / WEIGHTS_NAME
        with self._lock:
            if not target.exists():
                partial = directory / f".{WEIGHTS_NAME}.{os.getpid()}.part"
                self.storage.download(weights_key, partial)
                partial.replace(target)  # a reader never sees a half-written file
                self.downloads += 1
            now = time.time()
            os.utime(directory, (now, now))
            self._evict({directory, *(keep or set())})
        return target

    def _evict(self, protected: set[Path]) -> None:
        entries = [p for p in self.root.iterdir() if p.is_dir()] if self.root.exists() else []
        excess = len(entries) - self.max_entries
        if excess <= 0:
            return
        for old in sorted((p for p in entries if p not in protected), key=lambda p: p.stat().st_mtime)[:excess]:
            logger.info("LoRA cache: evicting %s", old.name)
            shutil.rmtree(old, ignore_errors=True)

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.exists() else []
