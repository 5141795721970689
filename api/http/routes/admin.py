"""Admin routes (the admin key, or a user flagged admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from api.db.tables import User
from api.http.deps import State, require_admin
from api.http.schemas import (
    AdminJobList,
    AdminJobPublic,
    AdminStats,
    AdminUserList,
    AdminUserPublic,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRevoked,
    CreditGrant,
    JobPublic,
    LedgerEntryPublic,
    ModelSwap,
    ModelSwapResult,
    UserCreate,
    UserCreated,
    UserPublic,
    UserUpdate,
    error_responses,
    iso,
    ledger_view,
    user_view,
)
from api.services import users

# every admin route answers 401 without a key and 403 for a key that is not an admin's
router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=error_responses(401, 403))


def _with_balance(user: User, balance: Any) -> dict[str, Any]:
    return {**user_view(user), "credits": {"balance": balance.available, "reserved": balance.reserved}}


@router.get("/users", response_model=AdminUserList, responses=error_responses(422))
def list_users(state: State, limit: int = Query(default=100, ge=1, le=1000),
               offset: int = Query(default=0, ge=0, le=2**63 - 1),
               q: str | None = Query(default=None, max_length=254,
                                     description="only users whose email contains this (any case)")) -> dict[str, Any]:
    return {"data": [_with_balance(u, b) for u, b in state.admin.list_users(limit, offset, q)]}


@router.post("/users", status_code=201, response_model=UserCreated, responses=error_responses(409, 422))
def create_user(body: UserCreate, state: State) -> dict[str, Any]:
    with state.db.session() as session:
        created = users.create_user(session, state.settings, body.email, body.plan, body.credits, body.is_admin)
        session.commit()
    return {**user_view(created.user), "api_key": created.api_key, "webhook_secret": created.webhook_secret}


@router.get("/users/{user_id}", response_model=AdminUserPublic, responses=error_responses(404))
def get_user(user_id: str, state: State) -> dict[str, Any]:
    return _with_balance(*state.admin.user(user_id))


@router.patch("/users/{user_id}", response_model=UserPublic, responses=error_responses(404, 422))
def update_user(user_id: str, body: UserUpdate, state: State) -> dict[str, Any]:
    return user_view(state.admin.update_user(user_id, body.plan, body.disabled))


@router.post("/users/{user_id}/keys", status_code=201, response_model=ApiKeyCreated,
             responses=error_responses(404, 422))
def create_key(user_id: str, body: ApiKeyCreate, state: State) -> dict[str, Any]:
    with state.db.session() as session:
        users.get_user(session, user_id)
        key, raw = users.create_api_key(session, user_id, body.name)
        session.commit()
    return {"id": key.id, "prefix": key.prefix, "name": key.name, "api_key": raw}


@router.delete("/users/{user_id}/keys/{key_id}", response_model=ApiKeyRevoked, responses=error_responses(404))
def revoke_key(user_id: str, key_id: str, state: State) -> dict[str, Any]:
    with state.db.session() as session:
        key = users.revoke_key(session, user_id, key_id)
        session.commit()
    return {"id": key.id, "prefix": key.prefix, "revoked_at": iso(key.revoked_at)}


@router.post("/users/{user_id}/credits", status_code=201, response_model=LedgerEntryPublic,
             responses=error_responses(404, 409, 422))
def grant_credits(user_id: str, body: CreditGrant, state: State) -> dict[str, Any]:
    return ledger_view(state.admin.grant(user_id, body.amount, body.kind, body.note, body.idempotency_key))


@router.get("/jobs", response_model=AdminJobList, response_model_exclude_unset=True, responses=error_responses(422))
def list_jobs(state: State, status: str | None = Query(default=None),
              model: str | None = Query(default=None, max_length=64),
              cursor: str | None = Query(default=None, max_length=200),
              limit: int = Query(default=50, ge=1, le=200)) -> dict[str, Any]:
    jobs, next_cursor = state.jobs.list(None, status=status, model=model, cursor=cursor, limit=limit)
    queue = state.queue.estimates(jobs)
    return {"data": [{**state.job_view(j, queue.get(j.id)), "user_id": j.user_id} for j in jobs],
            "next_cursor": next_cursor}


@router.get("/jobs/{job_id}", response_model=AdminJobPublic, response_model_exclude_unset=True,
            responses=error_responses(404))
def get_job(job_id: str, state: State) -> dict[str, Any]:
    job = state.jobs.get(None, job_id)
    return {**state.job_view(job, state.queue.estimate(job)), "user_id": job.user_id, "provider_job_id": job.provider_job_id,
            "cost_usd": job.cost_usd}


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic, response_model_exclude_unset=True,
             responses=error_responses(404))
def cancel_job(job_id: str, state: State) -> dict[str, Any]:
    return state.job_view(state.jobs.cancel(None, job_id))


@router.post("/models/{model_id}/swap", response_model=ModelSwapResult, responses=error_responses(404, 409, 422))
def swap_model(model_id: str, body: ModelSwap, state: State) -> dict[str, Any]:
    """Point a deployed model at another checkpoint; replicas load it beside the old one."""
    return state.models.swap(model_id, body.source)


@router.get("/stats", response_model=AdminStats)
def stats(state: State) -> dict[str, Any]:
    return state.admin.stats()
