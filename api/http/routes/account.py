"""The caller's credits, ledger, API keys, webhook secret and uploads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from api.core import ledger
from api.db.tables import User
from api.http.deps import CurrentUser, State
from api.http.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyRevoked,
    CreditsPublic,
    LedgerList,
    UploadCreated,
    UploadList,
    UploadPublic,
    WebhookSecret,
    error_responses,
    iso,
    ledger_view,
    upload_view,
)
from api.services import users
from api.services.uploads import read_multipart

router = APIRouter(prefix="/v1")


@router.get("/credits", tags=["credits"], response_model=CreditsPublic, responses=error_responses(401, 403))
def get_credits(user: CurrentUser, state: State) -> dict[str, Any]:
    with state.db.read() as session:
        balance = ledger.get_balance(session, user.id)
    return {"balance": balance.available, "reserved": balance.reserved, "plan": user.plan}


@router.get("/credits/transactions", tags=["credits"], response_model=LedgerList,
            responses=error_responses(401, 403, 422))
def list_transactions(user: CurrentUser, state: State,
                      cursor: int | None = Query(default=None, ge=1, le=2**63 - 1),
                      limit: int = Query(default=50, ge=1, le=200)) -> dict[str, Any]:
    with state.db.read() as session:
        rows = ledger.entries(session, user.id, limit=limit + 1, before_id=cursor)
    next_cursor = str(rows[limit - 1].id) if len(rows) > limit else None
    return {"data": [ledger_view(e) for e in rows[:limit]], "next_cursor": next_cursor}


@router.get("/keys", tags=["account"], response_model=ApiKeyList, responses=error_responses(401, 403))
def list_keys(user: CurrentUser, state: State) -> dict[str, Any]:
    from sqlalchemy import select

    from api.db.tables import ApiKey

    with state.db.read() as session:
        keys = session.execute(select(ApiKey).where(ApiKey.user_id == user.id)
                               .order_by(ApiKey.created_at)).scalars().all()
    return {"data": [{"id": k.id, "prefix": k.prefix, "name": k.name, "created_at": iso(k.created_at),
                      "revoked_at": iso(k.revoked_at)} for k in keys]}


@router.post("/keys", tags=["account"], status_code=201, response_model=ApiKeyCreated,
             responses=error_responses(401, 403, 422))
def create_key(body: ApiKeyCreate, user: CurrentUser, state: State) -> dict[str, Any]:
    with state.db.session() as session:
        key, raw = users.create_api_key(session, user.id, body.name)
        session.commit()
    return {"id": key.id, "prefix": key.prefix, "name": key.name, "api_key": raw}


@router.delete("/keys/{key_id}", tags=["account"], response_model=ApiKeyRevoked,
               responses=error_responses(401, 403, 404))
def revoke_key(key_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    with state.db.session() as session:
        key = users.revoke_key(session, user.id, key_id)
        session.commit()
    return {"id": key.id, "prefix": key.prefix, "revoked_at": iso(key.revoked_at)}


@router.post("/webhooks/secret", tags=["account"], response_model=WebhookSecret,
             responses=error_responses(401, 403))
def rotate_webhook_secret(user: CurrentUser, state: State) -> dict[str, Any]:
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


@router.post("/uploads", tags=["uploads"], status_code=201, openapi_extra=_UPLOAD_BODY, response_model=UploadCreated,
             responses=error_responses(401, 403, 408, 413, 415, 422, 429))
async def create_upload(request: Request, user: CurrentUser, state: State) -> dict[str, Any]:
    """Multipart field ``file``. The body is parsed as it streams in, limits checked on the way."""
    with state.uploads.admit():  # bounds the memory all uploads in flight hold together
        files = await read_multipart(request.stream(), request.headers.get("content-type", ""),
                                     request.headers.get("content-length"), state.settings)
        uploads = await run_in_threadpool(state.uploads.create, user, files)
    views = [upload_view(u, state.storage, state.settings.url_ttl_s) for u in uploads]
    return {**views[0], "data": views}


@router.get("/uploads", tags=["uploads"], response_model=UploadList, responses=error_responses(401, 403))
def list_uploads(user: CurrentUser, state: State) -> dict[str, Any]:
    return {"data": [upload_view(u, state.storage, state.settings.url_ttl_s)
                     for u in state.uploads.list(user)]}


@router.get("/uploads/{upload_id}", tags=["uploads"], response_model=UploadPublic,
            responses=error_responses(401, 403, 404))
def get_upload(upload_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    return upload_view(state.uploads.get(user, upload_id), state.storage, state.settings.url_ttl_s)


@router.delete("/uploads/{upload_id}", tags=["uploads"], status_code=204, responses=error_responses(401, 403, 404))
def delete_upload(upload_id: str, user: CurrentUser, state: State) -> None:
    state.uploads.delete(user, upload_id)
