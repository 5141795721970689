"""Debt (a refunded or disputed payment whose credits were spent or held) is paid from every credit
that becomes available: new credits and credits a refunded job gives back. On SQLite and, when
``CINEWEAVE_TEST_POSTGRES_URL`` is set, on a fresh PostgreSQL database."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import update

from api.core import ledger
from api.core.ledger import EntryKind
from api.db.engine import Database
from api.db.tables import Balance
from api.services.billing import account_lots
from api.settings import Settings
from tests.fixtures.harness import add_user, balance, ledger_rows


@pytest.fixture
def db(backend_db: Database) -> Database:
    return backend_db


@pytest.fixture
def uid(db: Database, settings: Settings) -> str:
    return add_user(db, settings, credits=0).user.id


def debt(db: Database, user_id: str) -> int:
    with db.read() as s:
        return ledger.get_debt(s, user_id)


def rows(db: Database, user_id: str) -> list[tuple[str, int, int]]:
    return [(e.kind, e.amount, e.available_after) for e in ledger_rows(db, user_id)]


def in_debt_with_held_job(db: Database, uid: str, held: int = 100, bought: int = 100) -> None:
    """Buy ``bought``, hold ``held`` for job_a, then the purchase is refunded: the clawback finds
    ``bought - held`` available and records the rest as debt."""
    with db.session() as s:
        ledger.credit(s, uid, bought, "stripe:cs_1", kind=EntryKind.PURCHASE)
        ledger.reserve(s, uid, "job_a", held)
        ledger.claw_back(s, uid, bought, "clawback:stripe:cs_1:evt_1")
        s.commit()


def test_a_refunded_job_pays_the_debt(db: Database, uid: str) -> None:
    # the reviewer's case: buy 100, hold 100, the pack is refunded (debt 100), the job fails
    in_debt_with_held_job(db, uid)
    assert (balance(db, uid), debt(db, uid)) == (ledger.BalanceView(0, 100), 100)
    with db.session() as s:
        refund = ledger.refund(s, "job_a")
        s.commit()
    assert (refund.kind, refund.amount) == ("refund", 100)  # the refund itself, not the payment
    assert (balance(db, uid), debt(db, uid)) == (ledger.BalanceView(0, 0), 0)
    assert rows(db, uid)[-2:] == [("refund", 100, 100), ("debt_paid", 100, 0)]
    # buying 10 afterwards leaves 10 and no debt (before the fix: 100 available, 90 owed)
    with db.session() as s:
        ledger.credit(s, uid, 10, "stripe:cs_2", kind=EntryKind.PURCHASE)
        s.commit()
    assert (balance(db, uid).available, debt(db, uid)) == (10, 0)
    with db.read() as s:
        assert account_lots(s, uid).total == 10  # billing's lot replay agrees with the balance


def test_a_refund_smaller_than_the_debt_pays_part_of_it(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 100, "stripe:cs_1", kind=EntryKind.PURCHASE)
        ledger.reserve(s, uid, "job_a", 30)
        ledger.reserve(s, uid, "job_b", 50)
        assert ledger.claw_back(s, uid, 100, "clawback:stripe:cs_1:evt_1") == (20, 80)
        s.commit()
    with db.session() as s:
        ledger.refund(s, "job_a")  # 30 back, all of it to the debt
        s.commit()
    assert (balance(db, uid), debt(db, uid)) == (ledger.BalanceView(0, 50), 50)
    with db.session() as s:
        ledger.capture(s, "job_b")  # a capture gives nothing back: no payment
        s.commit()
    assert (balance(db, uid), debt(db, uid)) == (ledger.BalanceView(0, 0), 50)
    with db.session() as s:
        ledger.credit(s, uid, 100, "grant_2")
        s.commit()
    assert (balance(db, uid), debt(db, uid)) == (ledger.BalanceView(50, 0), 0)
    assert [(k, n) for k, n, _ in rows(db, uid) if k == "debt_paid"] == [("debt_paid", 30), ("debt_paid", 50)]
    with db.read() as s:
        assert account_lots(s, uid).total == 50


def test_a_refund_without_debt_pays_nothing(db: Database, uid: str) -> None:
    with db.session() as s:
        ledger.credit(s, uid, 40, "g")
        ledger.reserve(s, uid, "job_a", 40)
        ledger.refund(s, "job_a")
        s.commit()
    assert balance(db, uid) == ledger.BalanceView(40, 0)
    assert [k for k, _, _ in rows(db, uid)] == ["grant", "reserve", "refund"]


def test_a_replayed_refund_pays_once(db: Database, uid: str) -> None:
    in_debt_with_held_job(db, uid, held=60)  # clawback takes the 40 available: debt 60
    assert debt(db, uid) == 60
    for _ in range(2):
        with db.session() as s:
            ledger.refund(s, "job_a")
            s.commit()
    assert (balance(db, uid), debt(db, uid)) == (ledger.BalanceView(0, 0), 0)
    assert [(k, n) for k, n, _ in rows(db, uid)].count(("debt_paid", 60)) == 1


def test_a_credit_pays_from_everything_available(db: Database, uid: str) -> None:
    # credits available beside a debt (an account left so before refunds paid debt): the next
    # credit pays the whole debt, not only its own amount
    with db.session() as s:
        ledger.credit(s, uid, 100, "g")
        s.execute(update(Balance).where(Balance.user_id == uid).values(debt=90))
        s.commit()
    with db.session() as s:
        entry = ledger.credit(s, uid, 10, "stripe:cs_2", kind=EntryKind.PURCHASE)
        s.commit()
    assert (entry.kind, entry.amount) == ("purchase", 10)
    assert (balance(db, uid).available, debt(db, uid)) == (20, 0)
    assert rows(db, uid)[-1] == ("debt_paid", 90, 20)


def test_pay_debt_is_once_per_key_and_never_overdraws(db: Database, uid: str) -> None:
    with db.session() as s:
        assert ledger.pay_debt(s, uid, "p:1") is None  # no debt: no entry
        ledger.credit(s, uid, 5, "g")
        s.execute(update(Balance).where(Balance.user_id == uid).values(debt=30))
        first = ledger.pay_debt(s, uid, "p:2")
        again = ledger.pay_debt(s, uid, "p:2")
        s.commit()
    assert first is not None and again is not None and again.id == first.id
    assert (first.amount, balance(db, uid).available, debt(db, uid)) == (5, 0, 25)


def test_concurrent_refunds_pay_the_debt_exactly(db: Database, uid: str) -> None:
    n = 6
    with db.session() as s:
        ledger.credit(s, uid, 20 * n, "stripe:cs_1", kind=EntryKind.PURCHASE)
        for i in range(n):
            ledger.reserve(s, uid, f"job_{i}", 20)
        ledger.claw_back(s, uid, 100, "clawback:stripe:cs_1:evt_1")  # nothing available: debt 100
        s.commit()
    assert debt(db, uid) == 100
    barrier = threading.Barrier(n, timeout=30)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()
            with db.session() as s:
                ledger.refund(s, f"job_{i}")
                s.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert (balance(db, uid), debt(db, uid)) == (ledger.BalanceView(20, 0), 0)
    paid = [n for k, n, _ in rows(db, uid) if k == "debt_paid"]
    assert sum(paid) == 100 and all(p > 0 for p in paid)
