"""Replicate's HTTP API v1 under ``/replicate/v1``: predictions and models over the job store."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

PREFIX = "/replicate"
TITLES = {400: "Bad Request", 401: "Unauthenticated", 402: "Insufficient credit", 403: "Forbidden",
          404: "Not found", 409: "Conflict", 413: "Payload too large", 422: "Invalid input",
          429: "Too many requests", 500: "Internal server error"}

router = APIRouter(prefix=f"{PREFIX}/v1", tags=["replicate"])


def shape_error(status: int, code: str, message: str, details: dict[str, Any],
                headers: dict[str, str] | None) -> JSONResponse:
    """Problem details, as Replicate answers errors (the client reads ``detail`` and ``title``)."""
    body = {"title": TITLES.get(status, "Error"), "detail": message, "status": status, "code": code}
    return JSONResponse(body, status_code=status, headers=headers,
                        media_type="application/problem+json")
