"""Request dependencies: the app state, the caller (API key), the admin check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.core.errors import Forbidden, Unauthorized
from api.db.tables import User
from api.http.state import AppState
from api.services.users import authenticate

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")

ADMIN_SENTINEL_ID = "admin"


def get_state(request: Request) -> AppState:
    return request.app.state.cineweave


def _raw_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    return credentials.credentials


def _is_admin_key(state: AppState, raw: str) -> bool:
    admin_key = state.settings.admin_key
    return bool(admin_key) and hmac.compare_digest(raw.encode(), admin_key.encode())


def current_user(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                 state: AppState = Depends(get_state)) -> User:
    raw = _raw_key(credentials)
    if _is_admin_key(state, raw):
        raise Forbidden("the admin key acts on /v1/admin routes only; use a user's API key here")
    with state.db.read() as session:
        return authenticate(session, raw)


def require_admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                  state: AppState = Depends(get_state)) -> User | None:
    """The admin key, or a user flagged admin. Returns that user, or None for the admin key."""
    raw = _raw_key(credentials)
    if _is_admin_key(state, raw):
        return None
    with state.db.read() as session:
        user = authenticate(session, raw)
    if not user.is_admin:
        raise Forbidden("admin only")
    return user


# what the routes declare: ``def route(user: CurrentUser, state: State)``
State = Annotated[AppState, Depends(get_state)]
CurrentUser = Annotated[User, Depends(current_user)]
AdminCaller = Annotated[User | None, Depends(require_admin)]
