"""The catalog as the API shows it, and checkpoint swaps handed to the serving stack.

The API cannot import the serving layer; the stack that starts the API passes two callables in:
``availability(spec) -> (bool, reason)`` and ``swap(model_id, source) -> dict``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from api.core.errors import Conflict, InvalidInput, NotFound
from models.catalog import Catalog
from models.spec import ModelSpec, Source

logger = logging.getLogger(__name__)

Availability = Callable[[ModelSpec], tuple[bool, str | None]]
Swapper = Callable[[str, dict[str, Any]], dict[str, Any]]


class ModelService:
    def __init__(self, catalog: Catalog, availability: Availability | None = None,
                 swapper: Swapper | None = None) -> None:
        self.catalog = catalog
        self._availability = availability
        self._swapper = swapper

    def availability(self, spec: ModelSpec) -> tuple[bool, str | None]:
        if self._availability is None:
            return spec.enabled, None if spec.enabled else "disabled"
        return self._availability(spec)

    def swap(self, model_id: str, source: dict[str, Any]) -> dict[str, Any]:
        spec = self.catalog.get(model_id)
        if spec is None:
            raise NotFound(f"model {model_id} not found")
        if spec.remote_only:
            raise InvalidInput(f"{model_id} runs at a provider; it has no checkpoint to swap", {"field": "model"})
        try:
            parsed = Source.model_validate(source)
        except ValidationError as exc:
            raise InvalidInput(f"source: {exc.errors()[0]['msg']}", {"field": "source"}) from None
        if self._swapper is None:
            raise Conflict("checkpoint swaps need the serving stack (cineweave up)", code="not_supported")
        try:
            result = self._swapper(model_id, parsed.model_dump(exclude_none=True))
        except KeyError:
            raise NotFound(f"model {model_id} is not deployed here") from None
        self.catalog.replace(spec.model_copy(update={"source": parsed}))
        logger.info("model %s now serves %s", model_id, result.get("source"))
        return result
