"""LoRA adapters on a loaded pipeline: load once, keep a few (LRU), activate a set per call.

Training lives elsewhere; this is the inference side the LoRA issue builds on. An adapter set is a
sequence of :class:`LoraAdapter` (name, weights path, scale). Requests in one batch share one set,
which is why the set is part of the batching key (:func:`adapter_key`).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    """Unique id of the adapter (e.g. the LoRA's id); also its peft adapter name, sanitized."""
    path: Path
    """A ``.safetensors`` file or a directory holding ``pytorch_lora_weights.safetensors``."""
    scale: float = 1.0


AdapterSet = Sequence[LoraAdapter]


def adapter_key(adapters: AdapterSet | None) -> tuple[tuple[str, float], ...]:
    """Order-insensitive identity of an adapter set, for batching keys."""
    return tuple(sorted((a.name, float(a.scale)) for a in adapters or ()))


def _peft_name(name: str) -> str:
    return "lora_" + re.sub(r"[^0-9A-Za-z_]", "_", name)


class AdapterManager:
    """Keeps up to ``max_loaded`` LoRAs loaded in ``pipe`` and switches between sets.

    Pipelines made with ``from_pipe`` share the denoiser and text encoders with ``pipe``, so an
    adapter activated here applies to them too.
    """

    def __init__(self, pipe: Any, max_loaded: int = 4, hotswap_rank: int | None = None) -> None:
        """``hotswap_rank``: for a compiled denoiser, load LoRAs into fixed adapter slots and swap
        weights in place (``enable_lora_hotswap``), so a new LoRA never triggers a recompile;
        every LoRA's rank must then be at most this."""
        self.pipe = pipe
        self.max_loaded = max(1, max_loaded)
        self._loaded: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._active: tuple[tuple[str, float], ...] = ()
        self.hotswap_rank = hotswap_rank
        self._slot_of: dict[str, str] = {}
        self._free_slots: list[str] = []
        self._slots_made = 0
        self.hotswaps = 0
        if hotswap_rank:
            pipe.enable_lora_hotswap(target_rank=hotswap_rank)

    def _adapter_name(self, name: str) -> str:
        return self._slot_of[name] if self.hotswap_rank else _peft_name(name)

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def active(self) -> tuple[tuple[str, float], ...]:
        return self._active

    def activate(self, adapters: AdapterSet | None) -> None:
        """Make exactly ``adapters`` (at their scales) active; an empty set disables LoRA."""
        wanted = list(adapters or ())
        key = adapter_key(wanted)
        if key == self._active:
            for a in wanted:
                self._loaded.move_to_end(a.name)
            return
        if not wanted:
            if self._loaded:
                self.pipe.disable_lora()
            self._active = ()
            return
        if len(wanted) > self.max_loaded:
            raise ValueError(f"{len(wanted)} adapters requested, at most {self.max_loaded} can be loaded")
        keep = {a.name for a in wanted}
        for adapter in wanted:
            if adapter.name in self._loaded:
                self._loaded.move_to_end(adapter.name)
                continue
            self._evict(keep, room_for=1)
            self._load(adapter)
        self._evict(keep, room_for=0)
        self.pipe.enable_lora()
        self.pipe.set_adapters([self._adapter_name(a.name) for a in wanted],
                               adapter_weights=[float(a.scale) for a in wanted])
        self._active = key

    def _evict(self, keep: set[str], room_for: int) -> None:
        """Unload least recently used adapters outside ``keep`` until ``room_for`` more fit."""
        while len(self._loaded) + room_for > self.max_loaded:
            victim = next((n for n in self._loaded if n not in keep), None)
            if victim is None:
                return
            self.unload(victim)

    def unload(self, name: str) -> None:
        if self._loaded.pop(name, None) is not None:
            if self.hotswap_rank:
                self._free_slots.append(self._slot_of.pop(name))  # its weights get swapped over later
            else:
                self.pipe.delete_adapters(_peft_name(name))
            self._active = tuple(x for x in self._active if x[0] != name)
            logger.info("unloaded LoRA %s", name)

    def _load(self, adapter: LoraAdapter) -> None:
        path = Path(adapter.path)
        where = {"weight_name": path.name} if path.is_file() else {}
        source = str(path.parent if path.is_file() else path)
        if self.hotswap_rank:
            if self._free_slots:  # swap the weights of a slot in place: no new modules, no recompile
                slot = self._free_slots.pop(0)
                self.pipe.load_lora_weights(source, adapter_name=slot, hotswap=True, **where)
                self.hotswaps += 1
            else:
                slot = f"slot_{self._slots_made}"
                self._slots_made += 1
                self.pipe.load_lora_weights(source, adapter_name=slot, **where)
            self._slot_of[adapter.name] = slot
        else:
            self.pipe.load_lora_weights(source, adapter_name=_peft_name(adapter.name), **where)
        self._loaded[adapter.name] = adapter
        logger.info("loaded LoRA %s from %s", adapter.name, path)
