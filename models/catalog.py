"""The model catalog: every ``*.yaml`` in the built-in catalog directory plus an optional extra one.

A later file with the same id replaces an earlier one, so an operator's ``CINEWEAVE_MODELS_DIR``
can override a shipped entry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from models.spec import CatalogError, ModelSpec, load_spec_file

logger = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "catalog"


class Catalog:
    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self._specs[spec.id] = spec

    @classmethod
    def load(cls, extra_dir: Path | None = None, include_builtin: bool = True) -> Catalog:
        dirs = ([BUILTIN_DIR] if include_builtin else []) + ([Path(extra_dir)] if extra_dir else [])
        specs: list[ModelSpec] = []
        for directory in dirs:
            if not directory.is_dir():
                raise CatalogError(f"catalog directory {directory} does not exist")
            for path in sorted(directory.glob("*.yaml")):
                specs.append(load_spec_file(path))
        logger.debug("catalog loaded: %s", [s.id for s in specs])
        return cls(specs)

    def get(self, model_id: str) -> ModelSpec | None:
        return self._specs.get(model_id)

    def all(self) -> list[ModelSpec]:
        return sorted(self._specs.values(), key=lambda s: s.id)

    def enabled(self) -> list[ModelSpec]:
        return [s for s in self.all() if s.enabled]

    def replace(self, spec: ModelSpec) -> None:
        self._specs[spec.id] = spec

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._specs
