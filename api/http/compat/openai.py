"""OpenAI's images and videos API under ``/openai/v1`` over the job store."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

PREFIX = "/openai"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
               403: "permission_error", 404: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}

router = APIRouter(prefix=f"{PREFIX}/v1", tags=["openai"])


def shape_error(status: int, code: str, message: str, details: dict[str, Any],
                headers: dict[str, str] | None) -> JSONResponse:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI answers errors."""
    param = details.get("field") if isinstance(details.get("field"), str) else None
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
