"""Users and API keys: sign-up credits, hashed keys, authentication."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from api.core import ledger
from api.core.errors import Conflict, InvalidInput, NotFound, Unauthorized
from api.db.engine import Database
from api.db.tables import ApiKey, PlanGrant
from api.services import users
from api.settings import Settings
from tests.fixtures.harness import add_user, balance, ledger_rows


def test_free_plan_signup_credits(db: Database, settings: Settings) -> None:
    created = add_user(db, settings, email="Free@Example.com", credits=None)
    assert created.user.email == "free@example.com" and created.user.plan == "free"
    assert balance(db, created.user.id) == ledger.BalanceView(100, 0)
    assert [(e.kind, e.amount) for e in ledger_rows(db, created.user.id)] == [("grant", 100)]


def test_paid_plan_gets_this_months_credits(db: Database, settings: Settings) -> None:
    created = add_user(db, settings, plan="starter", credits=None)
    assert balance(db, created.user.id) == ledger.BalanceView(80, 0)
    with db.read() as s:
        grants = s.execute(select(PlanGrant).where(PlanGrant.user_id == created.user.id)).scalars().all()
    assert [(g.plan, g.amount) for g in grants] == [("starter", 80)]


def test_explicit_credits_replace_the_plans(db: Database, settings: Settings) -> None:
    created = add_user(db, settings, plan="creator", credits=7)
    assert balance(db, created.user.id) == ledger.BalanceView(7, 0)
    zero = add_user(db, settings, credits=0)
    assert ledger_rows(db, zero.user.id) == []


@pytest.mark.parametrize(("email", "plan"), [("no-at-sign", None), ("a@b.c", "platinum"),
                                             ("x" * 250 + "@b.cd", None)])
def test_invalid_signups(db: Database, settings: Settings, email: str, plan: str | None) -> None:
    with db.session() as s, pytest.raises(InvalidInput):
        users.create_user(s, settings, email, plan)


def test_duplicate_email(db: Database, settings: Settings) -> None:
    add_user(db, settings, email="dup@example.com")
    with db.session() as s, pytest.raises(Conflict) as info:
        users.create_user(s, settings, " DUP@example.com ")
    assert info.value.code == "user_exists"


def test_keys_are_stored_hashed_and_authenticate(db: Database, settings: Settings) -> None:
    created = add_user(db, settings)
    raw = created.api_key
    assert raw.startswith("cw_")
    with db.read() as s:
        key = s.execute(select(ApiKey).where(ApiKey.user_id == created.user.id)).scalars().one()
        assert key.key_hash == users.hash_key(raw) and raw not in (key.key_hash, key.prefix)
        assert raw.startswith(key.prefix + "_")
        assert users.authenticate(s, raw).id == created.user.id
        for wrong in (raw + "x", raw[:-1], "cw_nope", "Bearer " + raw, ""):
            with pytest.raises(Unauthorized):
                users.authenticate(s, wrong)


def test_revoked_key_and_disabled_user_fail(db: Database, settings: Settings) -> None:
    created = add_user(db, settings)
    with db.session() as s:
        key2, raw2 = users.create_api_key(s, created.user.id, "second")
        s.commit()
    with db.session() as s:
        users.revoke_key(s, created.user.id, key2.id)
        s.commit()
    with db.read() as s:
        with pytest.raises(Unauthorized):
            users.authenticate(s, raw2)
        users.authenticate(s, created.api_key)
    with db.session() as s:
        row = users.get_user(s, created.user.id)
        row.disabled = True
        s.commit()
    with db.read() as s, pytest.raises(Unauthorized):
        users.authenticate(s, created.api_key)


def test_revoke_someone_elses_key_is_not_found(db: Database, settings: Settings) -> None:
    alice, bob = add_user(db, settings), add_user(db, settings)
    with db.read() as s:
        bob_key = s.execute(select(ApiKey).where(ApiKey.user_id == bob.user.id)).scalars().one()
    with db.session() as s, pytest.raises(NotFound):
        users.revoke_key(s, alice.user.id, bob_key.id)


def test_grant_plan_month_once_per_period(db: Database, settings: Settings) -> None:
    created = add_user(db, settings, plan="creator", credits=0)
    with db.session() as s:
        user = users.get_user(s, created.user.id)
        assert users.grant_plan_month(s, settings, user, "2030-01") == 250
        assert users.grant_plan_month(s, settings, user, "2030-01") == 0
        assert users.grant_plan_month(s, settings, user, "2030-02") == 250
        s.commit()
    assert balance(db, created.user.id).available == 500
    free = add_user(db, settings, credits=0)
    with db.session() as s:
        assert users.grant_plan_month(s, settings, users.get_user(s, free.user.id), "2030-01") == 0


def test_find_user_by_email(db: Database, settings: Settings) -> None:
    created = add_user(db, settings, email="find@example.com")
    with db.read() as s:
        assert users.find_user_by_email(s, "FIND@example.com ").id == created.user.id
        with pytest.raises(NotFound):
            users.find_user_by_email(s, "missing@example.com")
