"""The ledger's rules hold in the database itself: raw writes that break them are refused.

Run on SQLite and (marked ``postgres``) on a fresh PostgreSQL database.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import insert, text, update
from sqlalchemy.exc import IntegrityError

from api.core import ledger
from api.core.errors import LedgerError
from api.db.engine import Database
from api.db.tables import Balance, Job, LedgerEntry
from api.settings import Settings
from tests.fixtures.harness import add_user, balance, ledger_rows


@pytest.fixture
def uid(backend_db: Database, backend_settings: Settings) -> str:
    user = add_user(backend_db, backend_settings, credits=50).user.id
    with backend_db.session() as s:
        ledger.reserve(s, user, "job_a", 20)
        ledger.capture(s, "job_a")
        s.commit()
    return user


def _raw_entry(user_id: str, **values: object) -> dict[str, object]:
    row: dict[str, object] = {"user_id": user_id, "kind": "grant", "amount": 1, "job_id": None,
                              "idempotency_key": "raw-1", "note": "", "available_after": 0, "reserved_after": 0}
    row.update(values)
    return row


def _refused(db: Database, statement: object) -> None:
    with db.session() as s:
        with pytest.raises(IntegrityError):
            s.execute(statement)  # type: ignore[call-overload]
            s.flush()
        s.rollback()


def test_negative_available_is_refused(backend_db: Database, uid: str) -> None:
    _refused(backend_db, update(Balance).where(Balance.user_id == uid).values(available=-1))
    assert balance(backend_db, uid) == ledger.BalanceView(30, 0)


def test_negative_reserved_is_refused(backend_db: Database, uid: str) -> None:
    _refused(backend_db, update(Balance).where(Balance.user_id == uid).values(reserved=Balance.reserved - 1))
    assert balance(backend_db, uid) == ledger.BalanceView(30, 0)


def test_a_debit_larger_than_available_is_refused(backend_db: Database, uid: str) -> None:
    _refused(backend_db, update(Balance).where(Balance.user_id == uid).values(available=Balance.available - 31))


def test_second_capture_for_a_job_is_refused(backend_db: Database, uid: str) -> None:
    _refused(backend_db, insert(LedgerEntry).values(**_raw_entry(uid, kind="capture", job_id="job_a",
                                                                  idempotency_key="other-key", amount=20)))
    assert [e.kind for e in ledger_rows(backend_db, job_id="job_a")] == ["reserve", "capture"]


def test_second_reserve_for_a_job_is_refused(backend_db: Database, uid: str) -> None:
    _refused(backend_db, insert(LedgerEntry).values(**_raw_entry(uid, kind="reserve", job_id="job_a",
                                                                  idempotency_key="reserve-again")))


def test_refund_with_the_settlement_key_of_a_captured_job_is_refused(backend_db: Database, uid: str) -> None:
    # Capture and refund share the key settle:{job}: the database admits one of the two.
    _refused(backend_db, insert(LedgerEntry).values(**_raw_entry(uid, kind="refund", job_id="job_a",
                                                                  idempotency_key="settle:job_a", amount=20)))


def test_duplicate_idempotency_key_is_refused(backend_db: Database, uid: str) -> None:
    _refused(backend_db, insert(LedgerEntry).values(**_raw_entry(uid, idempotency_key="reserve:job_a")))


def test_negative_entry_amount_is_refused(backend_db: Database, uid: str) -> None:
    _refused(backend_db, insert(LedgerEntry).values(**_raw_entry(uid, amount=-5, idempotency_key="neg")))


def test_entry_for_unknown_user_is_refused(backend_db: Database, uid: str) -> None:
    _refused(backend_db, insert(LedgerEntry).values(**_raw_entry("usr_ghost", idempotency_key="ghost")))


def test_same_idempotency_key_twice_for_one_user_job_is_refused(backend_db: Database, uid: str) -> None:
    row = {"user_id": uid, "model": "tiny-sd", "kind": "image", "task": "t2i", "input": {}, "outputs": [],
           "resume": {}, "result": {}, "idempotency_key": "idem-1"}
    with backend_db.session() as s:
        s.add(Job(**row))
        s.commit()
    with backend_db.session() as s:
        s.add(Job(**row))
        with pytest.raises(IntegrityError):
            s.flush()


@pytest.mark.postgres
def test_concurrent_capture_and_refund_settle_once(pg_url: str, settings: Settings) -> None:
    """Two transactions settle one job at once (PostgreSQL, row locks): exactly one settlement stands."""
    s_pg = settings.model_copy(update={"database_url": pg_url})
    db = Database(s_pg)
    db.migrate()
    try:
        user = add_user(db, s_pg, credits=100).user.id
        with db.session() as s:
            ledger.reserve(s, user, "job_a", 20)
            ledger.reserve(s, user, "job_b", 30)  # more held than job_a: the balance guard alone cannot tell
            s.commit()
        first_done = threading.Event()
        outcome: dict[str, object] = {}

        def capture() -> None:
            with db.session() as s:
                outcome["capture"] = ledger.capture(s, "job_a").kind
                time.sleep(0.5)  # hold the transaction open while the refund starts
                s.commit()
            first_done.set()

        def refund() -> None:
            time.sleep(0.15)
            try:
                with db.session() as s:
                    entry = ledger.refund(s, "job_a")
                    s.commit()
                outcome["refund"] = entry.kind
            except LedgerError as exc:
                outcome["refund"] = exc

        threads = [threading.Thread(target=capture), threading.Thread(target=refund)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert first_done.is_set()
        assert outcome["capture"] == "capture"
        # The refund must not report success: the job was captured.
        assert isinstance(outcome["refund"], LedgerError), outcome
        kinds = [e.kind for e in ledger_rows(db, job_id="job_a")]
        assert kinds == ["reserve", "capture"]
        assert balance(db, user) == ledger.BalanceView(50, 30)
    finally:
        db.dispose()


def test_sqlite_runs_in_wal_mode(db: Database) -> None:
    with db.read() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1
