"""The credit ledger: append-only entries and a balance kept in step, in the caller's transaction.

Rules, enforced by the database and not only by this code:
- the balance never goes below zero (CHECK constraints; reservation is a conditional UPDATE);
- every operation has an idempotency key (UNIQUE): doing it twice changes nothing the second time;
- a job has at most one reserve, one capture and one refund (UNIQUE (job_id, kind)), and never
  both a capture and a refund (they share the key ``settle:{job}``);
- debt (``Balance.debt``: a refunded or disputed payment whose credits were already spent or held)
  is paid from whatever becomes available: each credit and each job refund pays
  ``min(debt, available)`` as a DEBT_PAID entry in the same transaction (:func:`pay_debt`), so an
  account in debt has nothing available.

Each operation runs inside a SAVEPOINT, so a lost race (a concurrent duplicate) rolls back only
itself and the caller's transaction goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from api.core.errors import InsufficientCredits, InvalidInput, LedgerError
from api.db.engine import is_postgres
from api.db.tables import Balance, LedgerEntry, utcnow

logger = logging.getLogger(__name__)


class EntryKind(StrEnum):
    GRANT = "grant"
    PURCHASE = "purchase"
    ADJUST = "adjust"
    RESERVE = "reserve"
    CAPTURE = "capture"
    REFUND = "refund"
    EXPIRE = "expire"
    # billing: a refunded or disputed payment takes its credits back (never below zero); what
    # could not be taken is recorded as debt (``Balance.debt``), which later credits pay first
    CLAWBACK = "clawback"
    DEBT = "debt"
    DEBT_PAID = "debt_paid"


CREDIT_KINDS = frozenset({EntryKind.GRANT, EntryKind.PURCHASE, EntryKind.ADJUST})


@dataclass(frozen=True)
class BalanceView:
    available: int
    reserved: int


def ensure_balance(session: Session, user_id: str) -> None:
    if session.get(Balance, user_id) is None:
        session.add(Balance(user_id=user_id))
        session.flush()


def lock_balance(session: Session, user_id: str) -> None:
    """Lock the account's balance row until the transaction ends (PostgreSQL ``FOR UPDATE``;
    SQLite holds its one write lock already). Submissions take it first, so anything that must
    not interleave with an account's submissions (a team's deletion) takes it too."""
    if is_postgres(session.get_bind()):
        ensure_balance(session, user_id)
        session.execute(select(Balance.user_id).where(Balance.user_id == user_id).with_for_update())


def get_balance(session: Session, user_id: str) -> BalanceView:
    row = session.execute(
        select(Balance.available, Balance.reserved).where(Balance.user_id == user_id)).first()
    return BalanceView(0, 0) if row is None else BalanceView(int(row[0]), int(row[1]))


def _existing(session: Session, key: str) -> LedgerEntry | None:
    return session.execute(select(LedgerEntry).where(LedgerEntry.idempotency_key == key)).scalars().first()


def get_debt(session: Session, user_id: str) -> int:
    """Credits owed back (refunds and disputes after they were spent); 0 for an unknown account."""
    value = session.execute(select(Balance.debt).where(Balance.user_id == user_id)).scalar()
    return int(value or 0)


def _apply(session: Session, user_id: str, kind: EntryKind, amount: int, key: str, *,
           job_id: str | None, note: str, d_available: int, d_reserved: int,
           guard_available: int = 0, guard_reserved: int = 0, d_debt: int = 0,
           guard_debt: int = 0, looked_up: bool = False) -> LedgerEntry:
    """Insert the entry and move the balance, atomically and at most once per key.

    ``looked_up``: the caller already looked for an entry of this key and knows the account has
    its balance row (a settlement: the job's reservation made it), two round trips fewer."""
    if amount < 0:
        raise InvalidInput("amount must not be negative", {"amount": amount})
    if not looked_up:
        found = _existing(session, key)
        if found is not None:
            return found
        ensure_balance(session, user_id)
    try:
        with session.begin_nested():
            values = {"available": Balance.available + d_available, "reserved": Balance.reserved + d_reserved,
                      "updated_at": utcnow()}
            guards = [Balance.user_id == user_id, Balance.available >= guard_available,
                      Balance.reserved >= guard_reserved]
            if d_debt or guard_debt:
                values["debt"] = Balance.debt + d_debt
                guards.append(Balance.debt >= guard_debt)
            after = session.execute(  # the balance after the move, in the same round trip
                update(Balance).where(*guards).values(**values).returning(Balance.available, Balance.reserved)
                .execution_options(synchronize_session=False)).first()
            if after is None:
                raise _Short()
            entry = LedgerEntry(user_id=user_id, kind=kind.value, amount=amount, job_id=job_id,
                                idempotency_key=key, note=note, available_after=int(after[0]),
                                reserved_after=int(after[1]))
            session.add(entry)
            session.flush()
    except _Short:
        bal = get_balance(session, user_id)
        if kind is EntryKind.RESERVE:
            raise InsufficientCredits(
                f"this job costs {amount} credits; {bal.available} are available",
                {"required": amount, "available": bal.available}) from None
        raise LedgerError(f"{kind.value} of {amount} does not fit the balance",
                          {"available": bal.available, "reserved": bal.reserved}) from None
    except IntegrityError:
        # A concurrent twin won the race (same key, or same job and kind): that one stands.
        found = _existing(session, key)
        if found is None and job_id is not None:
            found = session.execute(select(LedgerEntry).where(
                LedgerEntry.job_id == job_id, LedgerEntry.kind == kind.value)).scalars().first()
        if found is None:
            raise
        return found
    return entry


class _Short(Exception):
    pass


def credit(session: Session, user_id: str, amount: int, key: str, *, kind: EntryKind = EntryKind.GRANT,
           note: str = "") -> LedgerEntry:
    """Add credits (grant, purchase or adjust). New credits pay the account's debt first."""
    if kind not in CREDIT_KINDS:
        raise InvalidInput(f"{kind} does not add credits")
    found = _existing(session, key)
    if found is not None:
        return found
    entry = _apply(session, user_id, kind, amount, key, job_id=None, note=note,
                   d_available=amount, d_reserved=0)
    pay_debt(session, user_id, f"{key}:debt", note=f"debt paid from {kind.value} {key}")
    return entry


def pay_debt(session: Session, user_id: str, key: str, note: str = "") -> LedgerEntry | None:
    """Pay the account's debt from everything available now: ``min(debt, available)`` as one
    DEBT_PAID entry, once per key; None when there is nothing to pay (no debt or nothing available).

    Called after each movement that adds available credits (a credit, a job's refund), in the
    same transaction: that movement's UPDATE holds the balance row (PostgreSQL row lock, SQLite
    write lock), so the amounts read here cannot change before the payment's guarded UPDATE.
    Paying from all that is available (not only the new credits) keeps ``debt > 0`` meaning
    "nothing is available": credits that came back from a refunded job pay the debt too.
    """
    found = _existing(session, key)
    if found is not None:
        return found
    owed = min(get_debt(session, user_id), get_balance(session, user_id).available)
    if owed <= 0:
        return None
    return _apply(session, user_id, EntryKind.DEBT_PAID, owed, key, job_id=None, note=note,
                  d_available=-owed, d_reserved=0, guard_available=owed, d_debt=-owed, guard_debt=owed)


def claw_back(session: Session, user_id: str, amount: int, key: str, note: str = "") -> tuple[int, int]:
    """Take back ``amount`` credits: what is available now (never below zero), the rest as debt.

    Returns ``(taken, debt_added)``; once per key (a second call returns the first call's split).
    """
    found = _existing(session, key)
    if found is None:
        take = min(amount, get_balance(session, user_id).available)
        found = _apply(session, user_id, EntryKind.CLAWBACK, take, key, job_id=None, note=note,
                       d_available=-take, d_reserved=0, guard_available=take)
        rest = amount - found.amount
        if rest > 0:
            _apply(session, user_id, EntryKind.DEBT, rest, f"{key}:debt", job_id=None, note=note,
                   d_available=0, d_reserved=0, d_debt=rest)
    debt = _existing(session, f"{key}:debt")
    return found.amount, debt.amount if debt is not None else 0


def expire(session: Session, user_id: str, amount: int, key: str, note: str = "") -> LedgerEntry:
    """Remove up to ``amount`` unused credits; never more than are available."""
    found = _existing(session, key)
    if found is not None:
        return found
    take = min(amount, get_balance(session, user_id).available)
    return _apply(session, user_id, EntryKind.EXPIRE, take, key, job_id=None, note=note,
                  d_available=-take, d_reserved=0, guard_available=take)


def reserve(session: Session, user_id: str, job_id: str, amount: int) -> LedgerEntry:
    """Hold credits for a job; raises :class:`InsufficientCredits` and moves nothing if short."""
    return _apply(session, user_id, EntryKind.RESERVE, amount, f"reserve:{job_id}", job_id=job_id,
                  note="", d_available=-amount, d_reserved=amount, guard_available=amount)


def _reserved_for(session: Session, job_id: str) -> LedgerEntry | None:
    return session.execute(select(LedgerEntry).where(
        LedgerEntry.job_id == job_id, LedgerEntry.kind == EntryKind.RESERVE.value)).scalars().first()


def _settled(session: Session, job_id: str) -> LedgerEntry | None:
    return session.execute(select(LedgerEntry).where(
        LedgerEntry.job_id == job_id,
        LedgerEntry.kind.in_([EntryKind.CAPTURE.value, EntryKind.REFUND.value]))).scalars().first()


def capture(session: Session, job_id: str) -> LedgerEntry:
    """Charge what was reserved for a delivered job. Once; never after a refund."""
    return _settle(session, job_id, EntryKind.CAPTURE)


def refund(session: Session, job_id: str) -> LedgerEntry:
    """Return what was reserved for a job that delivered nothing. Once; never after a capture."""
    return _settle(session, job_id, EntryKind.REFUND)


def _settle(session: Session, job_id: str, kind: EntryKind) -> LedgerEntry:
    held = _reserved_for(session, job_id)
    if held is None:
        raise LedgerError(f"job {job_id} has no reservation to {kind.value}")
    done = _settled(session, job_id)
    if done is not None:
        if done.kind == kind.value:
            return done
        raise LedgerError(f"job {job_id} was already settled by {done.kind}", {"settled": done.kind})
    back = held.amount if kind is EntryKind.REFUND else 0
    # One key for capture and refund alike: the database admits only one of the two per job.
    # _settled looked for this key's entry (it is one of the job's capture or refund)
    entry = _apply(session, held.user_id, kind, held.amount, f"settle:{job_id}", job_id=job_id,
                   note="", d_available=back, d_reserved=-held.amount, guard_reserved=held.amount,
                   looked_up=True)
    if entry.kind != kind.value:
        # A concurrent transaction settled the job the other way first (its entry won the key).
        raise LedgerError(f"job {job_id} was already settled by {entry.kind}", {"settled": entry.kind})
    if back:
        # credits that come back pay the account's debt first, like new credits do
        pay_debt(session, held.user_id, f"settle:{job_id}:debt", note=f"debt paid from the refund of job {job_id}")
    return entry


def entries(session: Session, user_id: str, limit: int = 50, before_id: int | None = None) -> list[LedgerEntry]:
    query = select(LedgerEntry).where(LedgerEntry.user_id == user_id)
    if before_id is not None:
        query = query.where(LedgerEntry.id < before_id)
    return list(session.execute(query.order_by(LedgerEntry.id.desc()).limit(limit)).scalars())
