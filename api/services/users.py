"""Users and API keys. Keys are shown once; only their SHA-256 and a short prefix are stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from api.core import ledger
from api.core.errors import Conflict, InvalidInput, NotFound, Unauthorized
from api.db.tables import ApiKey, PlanGrant, User, utcnow
from api.settings import Settings

KEY_PREFIX = "cw_"


@dataclass(frozen=True)
class NewUser:
    user: User
    api_key: str
    webhook_secret: str


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def new_webhook_secret() -> str:
    import base64

    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def create_api_key(session: Session, user_id: str, name: str = "") -> tuple[ApiKey, str]:
    prefix = secrets.token_hex(4)
    raw = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(24)}"
    key = ApiKey(user_id=user_id, prefix=f"{KEY_PREFIX}{prefix}", key_hash=hash_key(raw), name=name)
    session.add(key)
    session.flush()
    return key, raw


def create_user(session: Session, settings: Settings, email: str, plan: str | None = None,
                credits: int | None = None, is_admin: bool = False) -> NewUser:
    """Create a user with a balance, one API key and the plan's sign-up credits (or ``credits``)."""
    email = email.strip().lower()
    if "@" not in email or len(email) > 254:
        raise InvalidInput("email is not valid", {"field": "email"})
    plan_id = plan or settings.default_plan
    try:
        plan_obj = settings.plan(plan_id)
    except KeyError:
        raise InvalidInput(f"unknown plan {plan_id!r}", {"field": "plan",
                           "plans": [p.id for p in settings.plans]}) from None
    if session.execute(select(User.id).where(User.email == email)).first():
        raise Conflict(f"a user with email {email} exists", {"field": "email"}, code="user_exists")
    secret = new_webhook_secret()
    user = User(email=email, plan=plan_id, is_admin=is_admin, webhook_secret=secret)
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"a user with email {email} exists", {"field": "email"}, code="user_exists") from None
    ledger.ensure_balance(session, user.id)
    _, raw = create_api_key(session, user.id, name="default")
    amount = credits if credits is not None else plan_obj.one_time_credits
    if amount:
        ledger.credit(session, user.id, amount, f"signup:{user.id}", note=f"sign-up credits ({plan_id})")
    if plan_obj.monthly_credits and credits is None:
        grant_plan_month(session, settings, user)
    return NewUser(user, raw, secret)


def grant_plan_month(session: Session, settings: Settings, user: User, period: str | None = None,
                     plan_id: str | None = None) -> int:
    """Grant a paid plan's monthly credits for ``period`` (YYYY-MM) once; returns credits granted.

    One grant per (account, period) whoever asks: the scheduled grant and a paid Stripe invoice
    (``plan_id``: the invoice's plan) share the ``plan_grants`` row and the ledger key, so the
    same period is never granted twice. The key ``plan:{account}:{period}`` also marks the
    credits as expiring (see ``api/services/billing.py``).
    """
    try:
        plan = settings.plan(plan_id or user.plan)
    except KeyError:
        return 0
    if not plan.monthly_credits:
        return 0
    period = period or utcnow().strftime("%Y-%m")
    if session.execute(select(PlanGrant.id).where(PlanGrant.user_id == user.id,
                                                  PlanGrant.period == period)).first():
        return 0
    session.add(PlanGrant(user_id=user.id, plan=plan.id, period=period, amount=plan.monthly_credits))
    ledger.credit(session, user.id, plan.monthly_credits, f"plan:{user.id}:{period}",
                  note=f"{plan.name} monthly credits {period}")
    return plan.monthly_credits


def authenticate(session: Session, raw_key: str) -> User:
    if not raw_key.startswith(KEY_PREFIX):
        raise Unauthorized("invalid API key")
    row = session.execute(select(ApiKey, User).join(User, User.id == ApiKey.user_id).where(
        ApiKey.key_hash == hash_key(raw_key), ApiKey.revoked_at.is_(None))).first()
    if row is None or row[1].disabled:
        raise Unauthorized("invalid API key")
    return row[1]


def get_user(session: Session, user_id: str) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


def find_user_by_email(session: Session, email: str) -> User:
    user = session.execute(select(User).where(User.email == email.strip().lower())).scalars().first()
    if user is None:
        raise NotFound(f"no user with email {email}")
    return user


def revoke_key(session: Session, user_id: str, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None or key.user_id != user_id:
        raise NotFound(f"API key {key_id} not found")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    return key
