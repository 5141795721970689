"""Admin routes (the admin key, or a user flagged admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from api.db.tables import User
from api.http.deps import get_state, require_admin
from api.http.schemas import (
    ApiKeyCreate,
    CreditGrant,
    ModelSwap,
    UserCreate,
    UserUpdate,
    iso,
    ledger_view,
    user_view,
)
from api.http.state import AppState
from api.services import users

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


def _with_balance(user: User, balance: Any) -> dict[str, Any]:
    return {**user_view(user), "credits": {"balance": balance.available, "reserved": balance.reserved}}


@router.get("/users")
def list_users(state: AppState = Depends(get_state), limit: int = Query(default=100, ge=1, le=1000),
               offset: int = Query(default=0, ge=0, le=2**63 - 1)) -> dict[str, Any]:
    return {"data": [_with_balance(u, b) for u, b in state.admin.list_users(limit, offset)]}


@router.post("/users", status_code=201)
def create_user(body: UserCreate, state: AppState = Depends(get_state)) -> dict[str, Any]:
    with state.db.session() as session:
        created = users.create_user(session, state.settings, body.email, body.plan, body.credits, body.is_admin)
        session.commit()
    return {**user_view(created.user), "api_key": created.api_key, "webhook_secret": created.webhook_secret}


@router.get("/users/{user_id}")
def get_user(user_id: str, state: AppState = Depends(get_state)) -> dict[str, Any]:
    return _with_balance(*state.admin.user(user_id))


@router.patch("/users/{user_id}")
def update_user(user_id: str, body: UserUpdate, state: AppState = Depends(get_state)) -> dict[str, Any]:
    return user_view(state.admin.update_user(user_id, body.plan, body.disabled))


@router.post("/users/{user_id}/keys", status_code=201)
def create_key(user_id: str, body: ApiKeyCreate, state: AppState = Depends(get_state)) -> dict[str, Any]:
    with state.db.session() as session:
        users.get_user(session, user_id)
        key, raw = users.create_api_key(session, user_id, body.name)
        session.commit()
    return {"id": key.id, "prefix": key.prefix, "name": key.name, "api_key": raw}


@router.delete("/users/{user_id}/keys/{key_id}")
def revoke_key(user_id: str, key_id: str, state: AppState = Depends(get_state)) -> dict[str, Any]:
    with state.db.session() as session:
        key = users.revoke_key(session, user_id, key_id)
        session.commit()
    return {"id": key.id, "prefix": key.prefix, "revoked_at": iso(key.revoked_at)}


@router.post("/users/{user_id}/credits", status_code=201)
def grant_credits(user_id: str, body: CreditGrant, state: AppState = Depends(get_state)) -> dict[str, Any]:
    return ledger_view(state.admin.grant(user_id, body.amount, body.kind, body.note, body.idempotency_key))


@router.get("/jobs")
def list_jobs(state: AppState = Depends(get_state), status: str | None = Query(default=None),
              model: str | None = Query(default=None, max_length=64),
              cursor: str | None = Query(default=None, max_length=200),
              limit: int = Query(default=50, ge=1, le=200)) -> dict[str, Any]:
    jobs, next_cursor = state.jobs.list(None, status=status, model=model, cursor=cursor, limit=limit)
    return {"data": [{**state.job_view(j), "user_id": j.user_id} for j in jobs], "next_cursor": next_cursor}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, state: AppState = Depends(get_state)) -> dict[str, Any]:
    job = state.jobs.get(None, job_id)
    return {**state.job_view(job), "user_id": job.user_id, "provider_job_id": job.provider_job_id,
            "cost_usd": job.cost_usd}


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, state: AppState = Depends(get_state)) -> dict[str, Any]:
    return state.job_view(state.jobs.cancel(None, job_id))


@router.post("/models/{model_id}/swap")
def swap_model(model_id: str, body: ModelSwap, state: AppState = Depends(get_state)) -> dict[str, Any]:
    """Point a deployed model at another checkpoint; replicas load it beside the old one."""
    return state.models.swap(model_id, body.source)


@router.get("/stats")
def stats(state: AppState = Depends(get_state)) -> dict[str, Any]:
    return state.admin.stats()
