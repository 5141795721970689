"""Request dependencies: the app state, the caller (API key or an end user's JWT), the admin check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.core.errors import Forbidden, Unauthorized
from api.db.tables import User
from api.http.state import AppState
from api.services.identity import Caller

bearer = HTTPBearer(auto_error=False,
                     description="Authorization: Bearer <API key, or a JWT from a configured identity provider>")

ADMIN_SENTINEL_ID = "admin"


async def get_state(request: Request) -> AppState:
    """``async`` (it does no I/O): FastAPI runs a plain ``def`` dependency in its thread pool, a
    round trip to a worker thread for each, on every request."""
    return request.app.state.cineweave


def _raw_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("missing credentials: send Authorization: Bearer <API key or token>")
    return credentials.credentials


def _is_admin_key(state: AppState, raw: str) -> bool:
    admin_key = state.settings.admin_key
    return bool(admin_key) and hmac.compare_digest(raw.encode(), admin_key.encode())


def current_caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                   state: AppState = Depends(get_state)) -> Caller:
    """The caller behind an API key or a JWT (never the admin key)."""
    raw = _raw_key(credentials)
    if _is_admin_key(state, raw):
        raise Forbidden("the admin key acts on /v1/admin routes only; use a user's API key here")
    return state.identity.authenticate(raw)


async def current_user(caller: Caller = Depends(current_caller)) -> User:
    """``async`` for the reason :func:`get_state` is (``current_caller`` reads the database: a thread)."""
    return caller.user


def require_admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                  state: AppState = Depends(get_state)) -> User | None:
    """The admin key, a user flagged admin (API key), or a JWT whose issuer's admin_claim holds.
    Returns that user, or None for the admin key."""
    raw = _raw_key(credentials)
    if _is_admin_key(state, raw):
        return None
    caller = state.identity.authenticate(raw)
    if not caller.is_admin:  # a JWT is an admin only through its issuer's configured admin_claim
        raise Forbidden("admin only")
    return caller.user


# what the routes declare: ``def route(user: CurrentUser, state: State)``
State = Annotated[AppState, Depends(get_state)]
CurrentUser = Annotated[User, Depends(current_user)]
# how the caller signed in (API key or JWT, and the issuer), for routes that care
CurrentCaller = Annotated[Caller, Depends(current_caller)]
AdminCaller = Annotated[User | None, Depends(require_admin)]
