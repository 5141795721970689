"""Signed file URLs for local storage, and signed callbacks from overflow providers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from api.core.errors import NotFound, Unauthorized
from api.core.executor import ProviderWebhookReceiver
from api.http.bodies import WEBHOOK_BODY_BYTES, read_capped
from api.http.deps import State
from api.http.schemas import Accepted, error_responses
from api.storage.local import LocalStorage

router = APIRouter()


@router.get("/v1/files/{key:path}", tags=["files"], response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "the file, with its own content type"},
                       **error_responses(401, 404, 422)})
def get_file(key: str, state: State, expires: int = Query(..., ge=0, le=2**40),
             signature: str = Query(..., pattern="^[0-9a-f]{64}$")) -> FileResponse:
    storage = state.storage
    if not isinstance(storage, LocalStorage):
        raise NotFound("files are served by the object store")
    try:
        valid = storage.verify(key, expires, signature)
        path = storage.local_path(key)
    except ValueError:
        raise NotFound("file not found") from None
    if not valid:
        raise Unauthorized("the link is invalid or has expired", code="invalid_signature")
    if not path.is_file():
        raise NotFound("file not found")
    return FileResponse(path, media_type=storage.content_type(key),
                        headers={"Cache-Control": "private, max-age=300"})


@router.post("/v1/webhooks/{provider}", tags=["providers"], response_model=Accepted,
             responses=error_responses(401, 404, 413))
async def provider_webhook(provider: str, request: Request, state: State) -> dict[str, Any]:
    """Callbacks from an overflow provider (Replicate). Signature and timestamp are verified."""
    receiver = state.executor
    if provider not in ("replicate",) or not isinstance(receiver, ProviderWebhookReceiver):
        raise NotFound(f"no webhook endpoint for {provider}")
    body = await read_capped(request, WEBHOOK_BODY_BYTES)
    accepted = await receiver.handle_webhook(provider, dict(request.headers), body)
    if not accepted:
        raise Unauthorized("webhook signature or timestamp is invalid", code="invalid_signature")
    return {"ok": True}
