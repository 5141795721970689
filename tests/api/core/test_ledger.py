"""Every ledger path: credits, reserve, capture, refund, expire, idempotency keys."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from api.core import ledger
from api.core.errors import InsufficientCredits, InvalidInput, LedgerError
from api.core.ledger import EntryKind
from api.db.engine import Database
from api.db.tables import LedgerEntry
from api.settings import Settings
from tests.fixtures.harness import add_user, balance, ledger_rows


@pytest.fixture
def uid(db: Database, settings: Settings) -> str:
    return add_user(db, settings, credits=0).user.id


def _kinds(db: Database, user_id: str) -> list[tuple[str, int]]:
    return [(e.kind, e.amount) for e in ledger_rows(db, user_id)]


@pytest.mark.parametrize("kind", [EntryKind.GRANT, EntryKind.PURCHASE, EntryKind.ADJUST])
def test_credit_kinds_add_to_available(db: Database, uid: str, kind: EntryKind) -> None:
    with db.session() as s:
        entry = ledger.credit(s, uid, 25, f"k-{kind}", kind=kind, note="n")
        s.commit()
    assert (entry.kind, entry.amount, entry.available_after, entry.reserved_after) == (kind.value, 25, 25, 0)
    assert balance(db, uid) == ledger.BalanceView(25, 0)


@pytest.mark.parametrize("kind", [EntryKind.RESERVE, EntryKind.CAPTURE, EntryKind.REFUND, EntryKind.EXPIRE])
def test_credit_refuses_kinds_that_do_not_add(db: Database, uid: str, kind: EntryKind) -> None:
    with db.session() as s, pytest.raises(InvalidInput):
        ledger.credit(s, uid, 5, "k", kind=kind)
    assert balance(db, uid) == ledger.BalanceView(0, 0)
    assert ledger_rows(db, uid) == []


def test_negative_amount_is_refused(db: Database, uid: str) -> None:
    with db.session() as s:
        with pytest.raises(InvalidInput):
            ledger.credit(s, uid, -1, "neg")
        with pytest.raises(InvalidInput):
            ledger.reserve(s, uid, "job_x", -3)
    assert ledger_rows(db, uid) == []


def test_credit_is_idempotent_by_key(db: Database, uid: str) -> None:
    with db.session() as s:
        first = ledger.credit(s, uid, 10, "same-key")
        s.commit()
    with db.session() as s:
        again = ledger.credit(s, uid, 10, "same-key")
        other = ledger.credit(s, uid, 10, "other-key")
        s.commit()
    assert again.id == first.id and other.id != first.id
    assert balance(db, uid).available == 20


def test_reserve_moves_available_to_reserved(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 50, "g")
        entry = ledger.reserve(s, uid, "job_a", 30)
        s.commit()
    assert (entry.kind, entry.job_id, entry.amount) == ("reserve", "job_a", 30)
    assert (entry.available_after, entry.reserved_after) == (20, 30)
    assert balance(db, uid) == ledger.BalanceView(20, 30)


def test_reserve_of_everything_available_is_allowed(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 40, "g")
        ledger.reserve(s, uid, "job_a", 40)
        s.commit()
    assert balance(db, uid) == ledger.BalanceView(0, 40)


def test_reserve_insufficient_moves_nothing(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 9, "g")
        s.commit()
    with db.session() as s:
        with pytest.raises(InsufficientCredits) as info:
            ledger.reserve(s, uid, "job_a", 10)
        # The failed reservation rolled back only its savepoint: the session is still usable.
        assert ledger.get_balance(s, uid) == ledger.BalanceView(9, 0)
        s.commit()
    assert info.value.details == {"required": 10, "available": 9}
    assert info.value.status == 402 and info.value.code == "insufficient_credits"
    assert balance(db, uid) == ledger.BalanceView(9, 0)
    assert _kinds(db, uid) == [("grant", 9)]


def test_reserve_twice_for_one_job_holds_once(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 100, "g")
        first = ledger.reserve(s, uid, "job_a", 30)
        second = ledger.reserve(s, uid, "job_a", 30)
        s.commit()
    assert first.id == second.id
    assert balance(db, uid) == ledger.BalanceView(70, 30)


def _reserved(db: Database, uid: str, job: str = "job_a", amount: int = 30, granted: int = 100) -> None:
    with db.session() as s:
        ledger.credit(s, uid, granted, f"g-{job}")
        ledger.reserve(s, uid, job, amount)
        s.commit()


def test_capture_charges_what_was_reserved(db: Database, uid: str) -> None:
    _reserved(db, uid)
    with db.session() as s:
        entry = ledger.capture(s, "job_a")
        s.commit()
    assert (entry.kind, entry.amount, entry.job_id) == ("capture", 30, "job_a")
    assert balance(db, uid) == ledger.BalanceView(70, 0)


def test_a_capture_takes_few_round_trips_and_records_the_balance_after_it(db: Database, uid: str) -> None:
    """A settlement is on every job's path: the reservation, the settled check, the guarded
    balance update returning the balance after it, the entry (plus the savepoint's begin and
    release), with no separate look-up of its key, of the balance row, or of the balance after."""
    from sqlalchemy import event

    _reserved(db, uid)
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement.split()[0].upper())

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        with db.session() as s:
            entry = ledger.capture(s, "job_a")
            s.commit()
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
    assert statements.count("SELECT") == 2, statements  # the reservation, the settled check
    assert statements.count("UPDATE") == 1 and statements.count("INSERT") == 1, statements
    assert (entry.available_after, entry.reserved_after) == (70, 0)


def test_refund_returns_what_was_reserved(db: Database, uid: str) -> None:
    _reserved(db, uid)
    with db.session() as s:
        entry = ledger.refund(s, "job_a")
        s.commit()
    assert (entry.kind, entry.amount) == ("refund", 30)
    assert balance(db, uid) == ledger.BalanceView(100, 0)


def test_double_capture_is_idempotent(db: Database, uid: str) -> None:
    _reserved(db, uid)
    with db.session() as s:
        first = ledger.capture(s, "job_a")
        s.commit()
    with db.session() as s:
        second = ledger.capture(s, "job_a")
        s.commit()
    assert first.id == second.id
    assert balance(db, uid) == ledger.BalanceView(70, 0)
    assert [k for k, _ in _kinds(db, uid)].count("capture") == 1


def test_double_refund_is_idempotent(db: Database, uid: str) -> None:
    _reserved(db, uid)
    with db.session() as s:
        first = ledger.refund(s, "job_a")
        second = ledger.refund(s, "job_a")
        s.commit()
    assert first.id == second.id
    assert balance(db, uid) == ledger.BalanceView(100, 0)


def test_capture_after_refund_is_refused(db: Database, uid: str) -> None:
    _reserved(db, uid)
    with db.session() as s:
        ledger.refund(s, "job_a")
        s.commit()
    with db.session() as s, pytest.raises(LedgerError) as info:
        ledger.capture(s, "job_a")
    assert info.value.details == {"settled": "refund"}
    assert balance(db, uid) == ledger.BalanceView(100, 0)
    assert [k for k, _ in _kinds(db, uid)] == ["grant", "reserve", "refund"]


def test_refund_after_capture_is_refused(db: Database, uid: str) -> None:
    _reserved(db, uid)
    with db.session() as s:
        ledger.capture(s, "job_a")
        s.commit()
    with db.session() as s, pytest.raises(LedgerError):
        ledger.refund(s, "job_a")
    assert balance(db, uid) == ledger.BalanceView(70, 0)


def test_settling_a_job_without_reservation_is_refused(db: Database, uid: str) -> None:
    with db.session() as s:
        with pytest.raises(LedgerError):
            ledger.capture(s, "job_none")
        with pytest.raises(LedgerError):
            ledger.refund(s, "job_none")
    assert ledger_rows(db, uid) == []


def test_settlement_touches_only_its_own_job(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 100, "g")
        ledger.reserve(s, uid, "job_a", 10)
        ledger.reserve(s, uid, "job_b", 20)
        ledger.capture(s, "job_a")
        ledger.refund(s, "job_b")
        s.commit()
    assert balance(db, uid) == ledger.BalanceView(90, 0)


def test_expire_takes_at_most_what_is_available(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 50, "g")
        ledger.reserve(s, uid, "job_a", 30)
        entry = ledger.expire(s, uid, 100, "exp-1")
        s.commit()
    assert (entry.kind, entry.amount) == ("expire", 20)
    # Reserved credits are held for a job: expiry never touches them, and nothing goes below zero.
    assert balance(db, uid) == ledger.BalanceView(0, 30)


def test_expire_less_than_available(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 50, "g")
        entry = ledger.expire(s, uid, 15, "exp-1")
        s.commit()
    assert entry.amount == 15
    assert balance(db, uid) == ledger.BalanceView(35, 0)


def test_expire_on_empty_balance_records_zero(db: Database, uid: str) -> None:
    with db.session() as s:
        entry = ledger.expire(s, uid, 10, "exp-1")
        s.commit()
    assert entry.amount == 0
    assert balance(db, uid) == ledger.BalanceView(0, 0)


def test_expire_is_idempotent_by_key(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 50, "g")
        first = ledger.expire(s, uid, 10, "exp-1")
        s.commit()
    with db.session() as s:
        again = ledger.expire(s, uid, 10, "exp-1")
        s.commit()
    assert again.id == first.id
    assert balance(db, uid) == ledger.BalanceView(40, 0)


def test_balance_after_columns_follow_every_entry(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 100, "g")
        ledger.reserve(s, uid, "job_a", 40)
        ledger.reserve(s, uid, "job_b", 10)
        ledger.capture(s, "job_a")
        ledger.refund(s, "job_b")
        ledger.expire(s, uid, 5, "e")
        s.commit()
    rows = ledger_rows(db, uid)
    assert [(r.kind, r.available_after, r.reserved_after) for r in rows] == [
        ("grant", 100, 0), ("reserve", 60, 40), ("reserve", 50, 50), ("capture", 50, 10),
        ("refund", 60, 0), ("expire", 55, 0)]


def test_entries_newest_first_with_cursor(db: Database, uid: str) -> None:
    with db.session() as s:
        for i in range(5):
            ledger.credit(s, uid, i + 1, f"g{i}")
        s.commit()
    with db.read() as s:
        page = ledger.entries(s, uid, limit=3)
        rest = ledger.entries(s, uid, limit=3, before_id=page[-1].id)
    assert [e.amount for e in page] == [5, 4, 3]
    assert [e.amount for e in rest] == [2, 1]


def test_get_balance_of_unknown_user_is_zero(db: Database) -> None:
    with db.read() as s:
        assert ledger.get_balance(s, "usr_nobody") == ledger.BalanceView(0, 0)


def test_capture_and_refund_share_one_settlement_key(db: Database, uid: str) -> None:
    _reserved(db, uid)
    with db.session() as s:
        ledger.capture(s, "job_a")
        s.commit()
    with db.read() as s:
        keys = s.execute(select(LedgerEntry.idempotency_key).where(LedgerEntry.job_id == "job_a")
                         ).scalars().all()
    assert sorted(keys) == ["reserve:job_a", "settle:job_a"]
