"""The caller's credits, ledger, API keys, webhook secret and uploads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from api.core import ledger
from api.db.tables import User
from api.http.deps import current_user, get_state
from api.http.schemas import ApiKeyCreate, iso, ledger_view, upload_view
from api.http.state import AppState
from api.services import users
from api.services.uploads import read_multipart

router = APIRouter(prefix="/v1")


@router.get("/credits", tags=["credits"])
def get_credits(user: User = Depends(current_user), state: AppState = Depends(get_state)) -> dict[str, Any]:
    with state.db.read() as session:
        balance = ledger.get_balance(session, user.id)
    return {"balance": balance.available, "reserved": balance.reserved, "plan": user.plan}


@router.get("/credits/transactions", tags=["credits"])
def list_transactions(user: User = Depends(current_user), state: AppState = Depends(get_state),
                      cursor: int | None = Query(default=None, ge=1, le=2**63 - 1),
                      limit: int = Query(default=50, ge=1, le=200)) -> dict[str, Any]:
    with state.db.read() as session:
        rows = ledger.entries(session, user.id, limit=limit + 1, before_id=cursor)
    next_cursor = str(rows[limit - 1].id) if len(rows) > limit else None
    return {"data": [ledger_view(e) for e in rows[:limit]], "next_cursor": next_cursor}


@router.get("/keys", tags=["account"])
def list_keys(user: User = Depends(current_user), state: AppState = Depends(get_state)) -> dict[str, Any]:
    from sqlalchemy import select

    from api.db.tables import ApiKey

    with state.db.read() as session:
        keys = session.execute(select(ApiKey).where(ApiKey.user_id == user.id)
                               .order_by(ApiKey.created_at)).scalars().all()
    return {"data": [{"id": k.id, "prefix": k.prefix, "name": k.name, "created_at": iso(k.created_at),
                      "revoked_at": iso(k.revoked_at)} for k in keys]}


@router.post("/keys", tags=["account"], status_code=201)
def create_key(body: ApiKeyCreate, user: User = Depends(current_user),
               state: AppState = Depends(get_state)) -> dict[str, Any]:
    with state.db.session() as session:
        key, raw = users.create_api_key(session, user.id, body.name)
        session.commit()
    return {"id": key.id, "prefix": key.prefix, "name": key.name, "api_key": raw}


@router.delete("/keys/{key_id}", tags=["account"])
def revoke_key(key_id: str, user: User = Depends(current_user), state: AppState = Depends(get_state)) -> dict[str, Any]:
    with state.db.session() as session:
        key = users.revoke_key(session, user.id, key_id)
        session.commit()
    return {"id": key.id, "prefix": key.prefix, "revoked_at": iso(key.revoked_at)}


@router.post("/webhooks/secret", tags=["account"])
def rotate_webhook_secret(user: User = Depends(current_user), state: AppState = Depends(get_state)) -> dict[str, Any]:
    """A new secret for verifying our webhooks; shown once, here."""
    with state.db.session() as session:
        row = session.get(User, user.id)
        assert row is not None
        row.webhook_secret = users.new_webhook_secret()
        session.commit()
        return {"webhook_secret": row.webhook_secret}


_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                            "description": "one or more images, or one ZIP"}}}}}}}


@router.post("/uploads", tags=["uploads"], status_code=201, openapi_extra=_UPLOAD_BODY)
async def create_upload(request: Request, user: User = Depends(current_user),
                        state: AppState = Depends(get_state)) -> dict[str, Any]:
    """Multipart field ``file``. The body is parsed as it streams in, limits checked on the way."""
    with state.uploads.admit():  # bounds the memory all uploads in flight hold together
        files = await read_multipart(request.stream(), request.headers.get("content-type", ""),
                                     request.headers.get("content-length"), state.settings)
        uploads = await run_in_threadpool(state.uploads.create, user, files)
    views = [upload_view(u, state.storage, state.settings.url_ttl_s) for u in uploads]
    return {**views[0], "data": views}


@router.get("/uploads", tags=["uploads"])
def list_uploads(user: User = Depends(current_user), state: AppState = Depends(get_state)) -> dict[str, Any]:
    return {"data": [upload_view(u, state.storage, state.settings.url_ttl_s)
                     for u in state.uploads.list(user)]}


@router.get("/uploads/{upload_id}", tags=["uploads"])
def get_upload(upload_id: str, user: User = Depends(current_user), state: AppState = Depends(get_state)) -> dict[str, Any]:
    return upload_view(state.uploads.get(user, upload_id), state.storage, state.settings.url_ttl_s)


@router.delete("/uploads/{upload_id}", tags=["uploads"], status_code=204)
def delete_upload(upload_id: str, user: User = Depends(current_user), state: AppState = Depends(get_state)) -> None:
    state.uploads.delete(user, upload_id)
