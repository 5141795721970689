"""Drop-in API shapes over the one job store: Replicate's (``/replicate/v1``) and OpenAI's
(``/openai/v1``). Each module is a thin translator onto ``api.services`` with its own request and
response models and its own error shape; it exposes ``PREFIX``, ``router`` and ``shape_error``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from api.http.compat import openai, replicate

ErrorShaper = Callable[[int, str, str, dict[str, Any], dict[str, str] | None], JSONResponse]

_SHAPES: tuple[tuple[str, ErrorShaper], ...] = (
    (replicate.PREFIX, replicate.shape_error),
    (openai.PREFIX, openai.shape_error),
)


def include(app: FastAPI) -> None:
    app.include_router(replicate.router)
    app.include_router(openai.router)


def error_shaper_for(path: str) -> ErrorShaper | None:
    """The error shape of the compat API that serves ``path``; None for the native API."""
    for prefix, shaper in _SHAPES:
        if path == prefix or path.startswith(prefix + "/"):
            return shaper
    return None
