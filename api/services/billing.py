"""Billing with Stripe: Checkout and the Customer Portal out, signed webhook events in, and the
rules for monthly credits (grants, rollover, expiry).

Accounts. An account is a ``users`` row: a person, or a team's account (``User.kind == "team"``).
A person acts on their own account; on a team's account when they are its owner or admin.

Events. Every Stripe event is applied at most once: its id is inserted into ``stripe_events`` in
the same transaction as its effects (a concurrent duplicate waits on the primary key and then
changes nothing). Events may come in any order: a subscription event older than the one applied
(``Subscription.event_created``; within the same second, an earlier state of the lifecycle, see
``STATUS_ORDER``) changes nothing; a refund or dispute that comes before its purchase is kept
(``StripeEvent.ref``) and applied when the purchase is. One payment's purchase and refunds are
serialized (:meth:`BillingService._lock_payment`), so neither misses the other.

Plans. The account's plan follows its subscriptions (:func:`apply_plan`): the best live one, an
upgrade at once, a downgrade or an end at the paid period's end; one that is not paid gives none.

Credits (the rollover rule; README "Billing with Stripe"):
- a plan's monthly credits for period ``YYYY-MM`` (ledger key ``plan:{account}:{period}``, granted
  by a paid invoice or by the scheduled grant, never both) expire at the end of the following
  month: one month of rollover;
- sign-up credits, purchased packs and admin grants never expire;
- credits are spent oldest-expiring first (so rolled-over plan credits go before this month's,
  and both before credits that never expire).
The ledger keeps one ``available`` figure; which lot a credit belongs to is computed by replaying
the account's ledger (:func:`credit_lots`), so nothing else in the stack has to know about lots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import stripe
from sqlalchemy import func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from api.core import ledger
from api.core.errors import CineWeaveError, Conflict, Forbidden, InvalidInput, NotFound
from api.core.ledger import EntryKind
from api.db.engine import Database, is_postgres
from api.db.tables import (
    Balance,
    BillingCustomer,
    CreditPurchase,
    LedgerEntry,
    StripeEvent,
    Subscription,
    User,
    utcnow,
)
from api.services import teams
from api.services.jobs import lock_user
from api.services.users import grant_plan_month
from api.settings import Settings

logger = logging.getLogger(__name__)

# Stripe subscription statuses in which the plan is paid for (or being retried)
LIVE_STATUSES = frozenset({"active", "trialing", "past_due"})
# not paid: never give the plan; a subscription that gave it and falls into one of these takes it
# back at once (no grace until the period's end)
UNPAID_STATUSES = frozenset({"incomplete", "incomplete_expired", "unpaid", "paused"})
# two subscription events with the same ``created`` second: the later state of the lifecycle wins
STATUS_ORDER = {"incomplete": 0, "trialing": 1, "active": 2, "past_due": 3, "unpaid": 4, "paused": 4,
                "incomplete_expired": 5, "canceled": 6}
REFUND_EVENTS = ("charge.refunded", "charge.dispute.created")
# pg_advisory_xact_lock(PAYMENT_LOCK_SPACE, hashtext(ref)): one payment's purchase and refunds
# (the two-key space does not overlap the one-key space the migration lock uses)
PAYMENT_LOCK_SPACE = 1_400_014


class BillingNotConfigured(CineWeaveError):
    """This deployment sells nothing through Stripe (no secret key): like a route it does not have."""

    code, status = "billing_not_configured", 404


class BillingProviderError(CineWeaveError):
    code, status = "billing_provider_error", 502


class InvalidSignature(CineWeaveError):
    code, status = "invalid_signature", 400


# ---- periods and credit lots ---------------------------------------------------------------


def period_of(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m")


def period_start(period: str) -> datetime:
    year, month = (int(p) for p in period.split("-"))
    return datetime(year, month, 1, tzinfo=UTC)


def add_months(period: str, months: int) -> str:
    year, month = (int(p) for p in period.split("-"))
    index = year * 12 + (month - 1) + months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def plan_grant_expiry(period: str) -> datetime:
    """Plan credits of ``period`` are usable through the following month, then expire."""
    return period_start(add_months(period, 2))


def plan_grant_period(key: str) -> str | None:
    """The period of a plan-grant ledger key ``plan:{account}:{YYYY-MM}``; None for other keys."""
    if not key.startswith("plan:"):
        return None
    period = key.rsplit(":", 1)[-1]
    if len(period) != 7 or period[4] != "-" or not (period[:4] + period[5:]).isdigit():
        return None
    return period


def expire_key(account_id: str, period: str) -> str:
    return f"expire:{account_id}:{period}"


def grant_expires(period: str, expire_from: str | None) -> bool:
    """Whether plan credits of ``period`` expire: those of ``expire_from`` (``Settings.credit_expiry_from``)
    and later. Grants of earlier periods were made before credits expired and keep never expiring."""
    return expire_from is None or period >= expire_from


@dataclass
class Lot:
    key: str
    remaining: int
    expires_at: datetime | None
    seq: int
    closed: bool = False


@dataclass
class Lots:
    lots: dict[str, Lot] = field(default_factory=dict)

    def spend_order(self) -> list[Lot]:
        far = datetime.max.replace(tzinfo=UTC)
        return sorted((lot for lot in self.lots.values() if not lot.closed),
                      key=lambda lot: (lot.expires_at is None, lot.expires_at or far, lot.seq))

    def take(self, amount: int, first: str | None = None) -> list[tuple[str, int]]:
        taken: list[tuple[str, int]] = []
        order = self.spend_order()
        if first is not None and first in self.lots and not self.lots[first].closed:
            order = [self.lots[first]] + [lot for lot in order if lot.key != first]
        for lot in order:
            if amount <= 0:
                break
            n = min(amount, lot.remaining)
            if n:
                lot.remaining -= n
                amount -= n
                taken.append((lot.key, n))
        return taken

    @property
    def total(self) -> int:
        return sum(lot.remaining for lot in self.lots.values() if not lot.closed)


def credit_lots(entries: Iterable[LedgerEntry], expire_from: str | None = None) -> Lots:
    """Replay an account's ledger (in id order) into lots, spending oldest-expiring first.

    Plan grants of periods before ``expire_from`` never expire (see :func:`grant_expires`)."""
    lots = Lots()
    held: dict[str, list[tuple[str, int]]] = {}
    for e in entries:
        kind, key, seq = e.kind, e.idempotency_key, e.id or 0
        if kind in ledger.CREDIT_KINDS:
            period = plan_grant_period(key) if kind == EntryKind.GRANT else None
            expires = plan_grant_expiry(period) if period and grant_expires(period, expire_from) else None
            lots.lots[key] = Lot(key, e.amount, expires, seq)
        elif kind == EntryKind.RESERVE and e.job_id:
            held[e.job_id] = lots.take(e.amount)
        elif kind == EntryKind.REFUND and e.job_id:
            for lot_key, n in held.pop(e.job_id, []):
                lot = lots.lots[lot_key]
                if lot.closed:
                    # held by a job while its lot expired, then refunded: the account keeps them
                    lot = lots.lots.setdefault(f"returned:{e.job_id}", Lot(f"returned:{e.job_id}", 0, None, seq))
                lot.remaining += n
        elif kind == EntryKind.CAPTURE and e.job_id:
            held.pop(e.job_id, None)
        elif kind == EntryKind.EXPIRE:
            target = None
            if key.startswith("expire:") and plan_grant_period("plan:" + key[len("expire:"):]):
                target = "plan:" + key[len("expire:"):]
            lots.take(e.amount, first=target)
            if target in lots.lots:
                lots.lots[target].closed = True
        elif kind == EntryKind.CLAWBACK:
            # key "clawback:{lot key}:{event id}": the refunded purchase's own credits go first
            lot_key = key[len("clawback:"):].rsplit(":", 1)[0] if key.startswith("clawback:") else None
            lots.take(e.amount, first=lot_key)
        elif kind == EntryKind.DEBT_PAID:
            lots.take(e.amount, first=key.removesuffix(":debt"))
    return lots


def account_lots(session: Session, account_id: str, expire_from: str | None = None) -> Lots:
    rows = session.execute(select(LedgerEntry).where(LedgerEntry.user_id == account_id)
                           .order_by(LedgerEntry.id)).scalars()
    return credit_lots(rows, expire_from)


# ---- plans ---------------------------------------------------------------------------------


def _rank(settings: Settings, plan_id: str) -> tuple[int, float]:
    try:
        plan = settings.plan(plan_id)
    except KeyError:
        return (-1, 0.0)
    return (plan.monthly_credits, plan.price_usd)


def apply_plan(session: Session, settings: Settings, account: User, now: datetime) -> None:
    """Make ``account.plan`` follow the account's subscriptions (the caller holds the account's lock).

    The best live subscription governs (highest plan, then the newest); with none live, the one
    whose paid period is ending (``downgrade_at``) does; with neither, the plan is left alone (an
    admin's, or the default). An upgrade applies at once. A downgrade, a cancellation at period
    end or a canceled subscription keep the paid plan until ``downgrade_at`` (the period's end;
    "now" for a subscription that fell unpaid), then the governing subscription's plan (downgrade)
    or the default plan (ended). A pending downgrade of any other subscription is stale and
    cleared: its earliest time carries over to a downgrade of the governing one, which is what
    the paid plan was paid until.
    """
    session.flush()
    subs = list(session.execute(select(Subscription).where(Subscription.account_id == account.id)
                                .order_by(Subscription.id).execution_options(populate_existing=True)).scalars())
    live = [s for s in subs if s.status in LIVE_STATUSES]
    ending = [s for s in subs if s.downgrade_at is not None]
    if live:
        gov = max(live, key=lambda s: (_rank(settings, s.plan), s.event_created, s.id))
    elif ending:
        gov = min(ending, key=lambda s: (s.downgrade_at, s.id))
    else:
        return
    pending = [s.downgrade_at for s in ending if s is not gov and s.downgrade_at is not None]
    for other in subs:
        if other is not gov and other.downgrade_at is not None:
            other.downgrade_at = None
            session.add(other)
    is_live = gov.status in LIVE_STATUSES
    if is_live and _rank(settings, gov.plan) >= _rank(settings, account.plan):
        account.plan = gov.plan  # an upgrade (or the first plan) applies at once
    target = gov.plan if is_live and not gov.cancel_at_period_end else settings.default_plan
    if account.plan == target:
        gov.downgrade_at = None
    else:
        if gov.downgrade_at is None:
            gov.downgrade_at = min(pending) if pending else (gov.current_period_end or now)
        if now >= gov.downgrade_at:
            logger.info("account %s: plan %s -> %s (subscription %s %s)", account.id, account.plan, target,
                        gov.id, gov.status)
            account.plan = target
            gov.downgrade_at = None
    session.add(account)
    session.add(gov)


def _status_key(created: int, status: str) -> tuple[int, int]:
    """The order of subscription states: the event's ``created``, then the lifecycle."""
    return (created, STATUS_ORDER.get(status, 2))


def stripe_managed_accounts() -> Any:
    """Accounts whose monthly grants come from paid invoices, not from the scheduled grant."""
    return select(Subscription.account_id).where(or_(Subscription.status.in_(LIVE_STATUSES),
                                                     Subscription.downgrade_at.is_not(None)))


# ---- the service ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckoutResult:
    id: str
    url: str
    mode: str
    account_id: str


def _get(obj: Any, *path: str | int) -> Any:
    """``obj[a][b]...`` through dicts and lists, None where anything is missing."""
    for part in path:
        if isinstance(part, int):
            if not isinstance(obj, list) or len(obj) <= part:
                return None
            obj = obj[part]
        else:
            if not isinstance(obj, dict):
                return None
            obj = obj.get(part)
        if obj is None:
            return None
    return obj


def _ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if value else None


class BillingService:
    def __init__(self, db: Database, settings: Settings, client: stripe.StripeClient | None = None) -> None:
        self.db = db
        self.settings = settings
        self._client = client

    # the Stripe client ------------------------------------------------------------------
    def _require_configured(self) -> None:
        if self._client is None and not self.settings.stripe_secret_key:
            raise BillingNotConfigured("billing is not configured (CINEWEAVE_STRIPE_SECRET_KEY)")

    @property
    def client(self) -> stripe.StripeClient:
        if self._client is None:
            self._require_configured()
            base = {"api": self.settings.stripe_api_base} if self.settings.stripe_api_base else None
            self._client = stripe.StripeClient(self.settings.stripe_secret_key, base_addresses=base,  # type: ignore[arg-type]
                                               max_network_retries=2)
        return self._client

    def plan_for_price(self, price_id: str | None) -> str | None:
        for plan_id, price in self.settings.stripe_plan_prices.items():
            if price == price_id:
                return plan_id
        return None

    def pack(self, pack_id: str) -> Any:
        for pack in self.settings.credit_packs:
            if pack.id == pack_id:
                return pack
        raise InvalidInput(f"unknown credit pack {pack_id!r}", {"field": "pack",
                           "packs": [p.id for p in self.settings.credit_packs]})

    # whose account ----------------------------------------------------------------------
    def account_for(self, session: Session, caller: User, team: str | None = None, *,
                    manage: bool = False) -> User:
        """The account ``caller`` acts on: their own, or a team's they are a member of.

        Buying (``manage``) for a team takes its owner or admin. Membership is the teams
        service's rule (:func:`api.services.teams.membership`); non-members get 404.
        """
        if team is None or team == caller.id:
            return caller
        member = teams.membership(session, caller.id, team)
        account = session.get(User, team) if member is not None else None
        if member is None or account is None or account.kind != "team":
            raise NotFound(f"team {team} not found", {"team": team})
        if manage and member.role not in teams.MANAGERS:
            raise Forbidden("only a team's owners and admins manage its billing",
                            {"role": member.role, "required": sorted(teams.MANAGERS)})
        return account

    def _customer(self, account: User) -> str:
        """The account's Stripe customer, created once (Stripe idempotency key + unique row)."""
        with self.db.read() as session:
            row = session.get(BillingCustomer, account.id)
        if row is not None:
            return row.stripe_customer_id
        try:
            customer = self.client.v1.customers.create(
                params={"email": account.email, "metadata": {"account_id": account.id, "kind": account.kind}},
                options={"idempotency_key": f"cineweave-customer-{account.id}"})
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe refused to create the customer: {exc.user_message or exc}") from None
        try:
            with self.db.session() as session:
                session.add(BillingCustomer(account_id=account.id, stripe_customer_id=customer.id))
                session.commit()
        except IntegrityError:
            with self.db.read() as session:
                row = session.get(BillingCustomer, account.id)
            if row is None:
                raise
            return row.stripe_customer_id
        return customer.id

    # checkout and portal ----------------------------------------------------------------
    def checkout(self, caller: User, *, plan: str | None = None, pack: str | None = None,
                 team: str | None = None) -> CheckoutResult:
        """A Checkout Session: a plan's subscription, or a credit pack paid once."""
        if (plan is None) == (pack is None):
            raise InvalidInput("give exactly one of plan or pack", {"field": "plan"})
        self._require_configured()
        with self.db.read() as session:
            account = self.account_for(session, caller, team, manage=True)
            live = session.execute(select(Subscription.id).where(
                Subscription.account_id == account.id, Subscription.status.in_(LIVE_STATUSES))).first()
        metadata = {"account_id": account.id}
        params: dict[str, Any] = {"success_url": self.settings.stripe_success_url,
                                  "cancel_url": self.settings.stripe_cancel_url,
                                  "client_reference_id": account.id}
        if plan is not None:
            price = self.settings.stripe_plan_prices.get(plan)
            if price is None:
                raise InvalidInput(f"plan {plan!r} is not sold through Stripe",
                                   {"field": "plan", "plans": sorted(self.settings.stripe_plan_prices)})
            if live is not None:
                raise Conflict("this account already has a subscription: change it in the customer portal",
                               {"subscription": live[0]}, code="subscription_exists")
            metadata["plan"] = plan
            params.update(mode="subscription", line_items=[{"price": price, "quantity": 1}],
                          subscription_data={"metadata": dict(metadata)})
        else:
            assert pack is not None
            chosen = self.pack(pack)
            metadata.update(pack=chosen.id, credits=str(chosen.credits))
            params.update(mode="payment", line_items=[{"price": chosen.stripe_price_id, "quantity": 1}],
                          payment_intent_data={"metadata": dict(metadata)})
        params["metadata"] = metadata
        params["customer"] = self._customer(account)
        try:
            session_obj = self.client.v1.checkout.sessions.create(params=params)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe refused the checkout: {exc.user_message or exc}") from None
        logger.info("checkout %s for %s: %s", session_obj.id, account.id, plan or pack)
        return CheckoutResult(session_obj.id, session_obj.url or "", params["mode"], account.id)

    def portal(self, caller: User, team: str | None = None) -> str:
        with self.db.read() as session:
            account = self.account_for(session, caller, team, manage=True)
        self._require_configured()
        customer = self._customer(account)
        try:
            portal = self.client.v1.billing_portal.sessions.create(
                params={"customer": customer, "return_url": self.settings.stripe_portal_return_url})
        except stripe.StripeError as exc:
            raise BillingProviderError(f"Stripe refused the portal session: {exc.user_message or exc}") from None
        return portal.url

    # reading ----------------------------------------------------------------------------
    def subscription(self, caller: User, team: str | None = None) -> dict[str, Any]:
        with self.db.read() as session:
            account = self.account_for(session, caller, team)
            sub = session.execute(select(Subscription).where(Subscription.account_id == account.id)
                                  .order_by(Subscription.updated_at.desc())).scalars().first()
        return {"account_id": account.id, "plan": account.plan, "subscription": sub}

    def usage(self, caller: User, team: str | None = None, now: datetime | None = None) -> dict[str, Any]:
        """This calendar month's credits granted and spent, the balance, the debt, what expires next."""
        now = now or utcnow()
        period = period_of(now)
        start, end = period_start(period), period_start(add_months(period, 1))
        with self.db.read() as session:
            account = self.account_for(session, caller, team)
            sums = dict(session.execute(select(LedgerEntry.kind, func.coalesce(func.sum(LedgerEntry.amount), 0))
                                        .where(LedgerEntry.user_id == account.id,
                                               LedgerEntry.created_at >= start, LedgerEntry.created_at < end)
                                        .group_by(LedgerEntry.kind)).all())
            bal = session.get(Balance, account.id)
            lots = account_lots(session, account.id, self.settings.credit_expiry_from)
        expiring = [lot for lot in lots.spend_order() if lot.expires_at is not None and lot.remaining > 0]
        nxt = expiring[0] if expiring else None
        return {"account_id": account.id, "plan": account.plan, "period": period,
                "period_start": start, "period_end": end,
                "credits_granted": int(sum(sums.get(k.value, 0) for k in ledger.CREDIT_KINDS)),
                "credits_spent": int(sums.get(EntryKind.CAPTURE.value, 0)),
                "credits_expired": int(sums.get(EntryKind.EXPIRE.value, 0)),
                "credits_clawed_back": int(sums.get(EntryKind.CLAWBACK.value, 0)),
                "balance": bal.available if bal else 0, "reserved": bal.reserved if bal else 0,
                "debt": bal.debt if bal else 0,
                "next_expiry": {"at": nxt.expires_at, "credits": nxt.remaining} if nxt else None}

    # webhooks ---------------------------------------------------------------------------
    def handle_webhook(self, payload: bytes, signature: str | None, now: datetime | None = None) -> str:
        """Verify a Stripe event and apply it once. Returns what was done (for the log and tests)."""
        secret = self.settings.stripe_webhook_secret
        if not secret:  # as for any provider without an endpoint
            raise NotFound("no webhook endpoint for stripe (CINEWEAVE_STRIPE_WEBHOOK_SECRET is not set)")
        try:
            stripe.Webhook.construct_event(payload, signature or "", secret,
                                           tolerance=self.settings.stripe_webhook_tolerance_s)
        except stripe.SignatureVerificationError:
            raise InvalidSignature("the Stripe-Signature header does not verify (or is too old)") from None
        except ValueError:
            raise InvalidSignature("the event is not valid JSON") from None
        event = json.loads(payload)
        event_id, kind, created = str(event.get("id") or ""), str(event.get("type") or ""), int(event.get("created") or 0)
        obj = _get(event, "data", "object") or {}
        if not event_id.startswith("evt_") or not isinstance(obj, dict):
            raise InvalidInput("not a Stripe event", {"field": "id"})
        return self.apply_event(event_id, kind, created, obj, now or utcnow())

    def apply_event(self, event_id: str, kind: str, created: int, obj: dict[str, Any], now: datetime) -> str:
        with self.db.session() as session:
            row = StripeEvent(id=event_id, type=kind, created=created)
            if kind in REFUND_EVENTS:
                row.ref = obj.get("payment_intent") or (obj.get("charge") if kind != "charge.refunded"
                                                        else obj.get("id"))
                row.data = {"charge": obj.get("id") if kind == "charge.refunded" else obj.get("charge"),
                            "amount": obj.get("amount"), "amount_refunded": obj.get("amount_refunded")}
            try:
                with session.begin_nested():
                    session.add(row)
                    session.flush()
            except IntegrityError:
                logger.info("stripe event %s (%s) already applied", event_id, kind)
                return "duplicate"
            handler = {
                "checkout.session.completed": self._on_checkout,
                "checkout.session.async_payment_succeeded": self._on_checkout,
                "invoice.paid": self._on_invoice_paid,
                "customer.subscription.created": self._on_subscription,
                "customer.subscription.updated": self._on_subscription,
                "customer.subscription.deleted": self._on_subscription,
                "charge.refunded": self._on_refund,
                "charge.dispute.created": self._on_refund,
            }.get(kind)
            result = handler(session, row, obj, now) if handler else "ignored: event type not handled"
            row.result = result[:500]
            session.add(row)
            session.commit()
        logger.info("stripe event %s (%s): %s", event_id, kind, result)
        return result

    def _account(self, session: Session, obj: dict[str, Any], *metadata_paths: tuple[str, ...]) -> User | None:
        """The account an object is about: our metadata, else its Stripe customer."""
        for path in (("metadata",), *metadata_paths):
            account_id = _get(obj, *path, "account_id")
            if account_id:
                user = session.get(User, str(account_id))
                if user is not None:
                    return user
        customer = obj.get("customer")
        if customer:
            row = session.execute(select(BillingCustomer.account_id).where(
                BillingCustomer.stripe_customer_id == str(customer))).first()
            if row is not None:
                return session.get(User, row[0])
        return None

    def _locked(self, session: Session, account: User) -> User:
        """Lock the account (its balance row, as jobs do) and read it again: a row read before the
        lock may be stale on PostgreSQL."""
        lock_user(session, account.id)
        return session.get(User, account.id, populate_existing=True) or account

    @staticmethod
    def _lock_payment(session: Session, *refs: Any) -> None:
        """Serialize one payment's purchase and its refunds and disputes, so each sees the other's rows.

        PostgreSQL: a transaction-scoped advisory lock per payment reference (payment intent or
        charge id; sorted, so two lockers never deadlock), always taken before the account's lock.
        SQLite runs one writing transaction at a time already.
        """
        if not is_postgres(session.get_bind()):
            return
        for ref in sorted({str(r) for r in refs if r}):
            session.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:ref))"),
                            {"space": PAYMENT_LOCK_SPACE, "ref": ref})

    @staticmethod
    def _mark_paid(sub: Subscription, created: int, period_end: datetime | None = None) -> bool:
        """A paid first (or retried) payment makes an incomplete, past-due or unpaid subscription
        active, unless a newer subscription event was applied. Returns whether it changed."""
        if sub.status not in ("incomplete", "past_due", "unpaid") or created < sub.event_created:
            return False
        sub.status = "active"
        sub.event_created = created
        if sub.current_period_end is None and period_end is not None:
            sub.current_period_end = period_end
        return True

    def _on_checkout(self, session: Session, event: StripeEvent, obj: dict[str, Any], now: datetime) -> str:
        account = self._account(session, obj)
        if account is None:
            return "ignored: unknown account"
        self._lock_payment(session, obj.get("payment_intent"))
        account = self._locked(session, account)
        paid = obj.get("payment_status") in ("paid", "no_payment_required")
        if obj.get("mode") == "subscription":
            sub_id = obj.get("subscription")
            if not sub_id:
                return "ignored: no subscription"
            sub = session.get(Subscription, str(sub_id), populate_existing=True)
            if sub is None:
                plan = _get(obj, "metadata", "plan")
                if plan not in self.settings.stripe_plan_prices:
                    return f"ignored: unknown plan {plan!r}"
                # not paid yet (a delayed payment method): incomplete, no plan until it is
                sub = Subscription(id=str(sub_id), account_id=account.id, plan=str(plan),
                                   status="active" if paid else "incomplete",
                                   stripe_price_id=self.settings.stripe_plan_prices[str(plan)],
                                   event_created=event.created)
                session.add(sub)
                apply_plan(session, self.settings, account, now)
                return f"linked subscription {sub_id} ({plan})" + ("" if paid else ": incomplete, not paid yet")
            if paid and self._mark_paid(sub, event.created):
                session.add(sub)
                apply_plan(session, self.settings, account, now)
                return f"subscription {sub_id} paid: active; account plan {account.plan}"
            return f"subscription {sub_id} already known"
        if not paid:
            return "pending: payment not settled yet"
        pack_id = _get(obj, "metadata", "pack")
        try:
            pack = self.pack(str(pack_id))
        except InvalidInput:
            return f"ignored: unknown pack {pack_id!r}"
        key = f"stripe:{obj['id']}"
        return self._purchase(session, account, "pack", str(obj["id"]), key, pack.credits,
                              obj.get("payment_intent"), None, int(obj.get("amount_total") or 0),
                              f"credit pack {pack.id}")

    def _purchase(self, session: Session, account: User, source: str, object_id: str, key: str, credits: int,
                  payment_intent: str | None, charge: str | None, amount_cents: int, note: str) -> str:
        """Credits for a payment, once per Stripe object; then any refund that came first.

        The caller holds the payment's lock (:meth:`_lock_payment`), then the account's."""
        if session.execute(select(CreditPurchase.id).where(CreditPurchase.stripe_object_id == object_id)).first():
            return f"{object_id} already credited"
        purchase = CreditPurchase(account_id=account.id, source=source, stripe_object_id=object_id,
                                  payment_intent=payment_intent, charge_id=charge, credits=credits,
                                  amount_cents=amount_cents, ledger_key=key)
        session.add(purchase)
        session.flush()
        if source == "pack":
            ledger.credit(session, account.id, credits, key, kind=EntryKind.PURCHASE, note=note)
        result = f"credited {credits} ({note})"
        refs = [r for r in (payment_intent, charge) if r]
        if refs:
            early = session.execute(select(StripeEvent).where(StripeEvent.ref.in_(refs),
                                                               StripeEvent.type.in_(REFUND_EVENTS))
                                    .order_by(StripeEvent.created)).scalars().all()
            for ev in early:
                result += "; " + self._claw(session, purchase, ev)
        return result

    def _on_invoice_paid(self, session: Session, event: StripeEvent, obj: dict[str, Any], now: datetime) -> str:
        line = _get(obj, "lines", "data", 0) or {}
        account = self._account(session, obj, ("parent", "subscription_details", "metadata"),
                                ("subscription_details", "metadata"))
        if account is None:
            return "ignored: unknown account"
        payment_intent = obj.get("payment_intent") or _get(obj, "payments", "data", 0, "payment", "payment_intent")
        self._lock_payment(session, payment_intent, obj.get("charge"))
        account = self._locked(session, account)
        reason = obj.get("billing_reason")
        if reason not in ("subscription_create", "subscription_cycle"):
            return f"no grant: billing_reason {reason}"
        price = (_get(line, "price", "id") or _get(line, "pricing", "price_details", "price")
                 or _get(line, "plan", "id"))
        plan = self.plan_for_price(price)
        if plan is None:
            return f"ignored: price {price!r} is not a configured plan"
        start = _ts(_get(line, "period", "start")) or _ts(obj.get("period_start")) or _ts(obj.get("created")) or now
        period = period_of(start)
        sub_id = obj.get("subscription") or _get(obj, "parent", "subscription_details", "subscription")
        if sub_id:
            period_end = _ts(_get(line, "period", "end"))
            sub = session.get(Subscription, str(sub_id), populate_existing=True)
            if sub is None:
                sub = Subscription(id=str(sub_id), account_id=account.id, plan=plan, status="active",
                                   stripe_price_id=price, event_created=event.created, current_period_end=period_end)
            else:
                self._mark_paid(sub, event.created, period_end)  # paid: no longer incomplete
            session.add(sub)
            apply_plan(session, self.settings, account, now)
        granted = grant_plan_month(session, self.settings, account, period, plan_id=plan)
        if not granted:
            return f"no grant: {period} already granted"
        result = self._purchase(session, account, "invoice", str(obj["id"]), f"plan:{account.id}:{period}",
                                granted, payment_intent, obj.get("charge"), int(obj.get("amount_paid") or 0),
                                f"{plan} {period}")
        return f"granted {granted} for {period}; {result}"

    def _on_subscription(self, session: Session, event: StripeEvent, obj: dict[str, Any], now: datetime) -> str:
        account = self._account(session, obj)
        if account is None:
            return "ignored: unknown account"
        account = self._locked(session, account)
        sub = session.get(Subscription, str(obj["id"]), populate_existing=True)
        status = "canceled" if event.type == "customer.subscription.deleted" else str(obj.get("status"))
        # older than what was applied; the same second: the later state of the lifecycle wins
        if sub is not None and _status_key(event.created, status) < _status_key(sub.event_created, sub.status):
            return "stale: a newer event was applied"
        item = _get(obj, "items", "data", 0) or {}
        price = _get(item, "price", "id") or _get(obj, "plan", "id")
        plan = self.plan_for_price(price) or (sub.plan if sub else _get(obj, "metadata", "plan"))
        if plan is None:
            return f"ignored: price {price!r} is not a configured plan"
        before = sub.status if sub is not None else None
        if sub is None:
            sub = Subscription(id=str(obj["id"]), account_id=account.id, plan=str(plan), status=status)
        sub.plan = str(plan)
        sub.stripe_price_id = price
        sub.status = status
        sub.current_period_end = _ts(obj.get("current_period_end") or item.get("current_period_end"))
        sub.cancel_at_period_end = bool(obj.get("cancel_at_period_end"))
        sub.event_created = event.created
        sub.updated_at = now
        if before in LIVE_STATUSES and status not in LIVE_STATUSES:
            # it gave the plan: fallen unpaid, that ends now; ended, at the paid period's end
            if status in UNPAID_STATUSES:
                sub.downgrade_at = now
            elif sub.downgrade_at is None:
                sub.downgrade_at = sub.current_period_end or now
        session.add(sub)
        apply_plan(session, self.settings, account, now)
        return f"subscription {sub.id}: {sub.status} {sub.plan}; account plan {account.plan}"

    def _on_refund(self, session: Session, event: StripeEvent, obj: dict[str, Any], now: datetime) -> str:
        refs = [r for r in (event.ref, event.data.get("charge")) if r]
        self._lock_payment(session, *refs)
        found = session.execute(select(CreditPurchase.id, CreditPurchase.account_id).where(or_(
            CreditPurchase.payment_intent.in_(refs), CreditPurchase.charge_id.in_(refs)))
            .order_by(CreditPurchase.id)).first()
        if found is None:
            return "pending: no purchase for this payment yet"
        lock_user(session, found.account_id)
        # read again under the locks: a concurrent refund of the same payment may have just committed
        purchase = session.execute(select(CreditPurchase).where(CreditPurchase.id == found.id).with_for_update()
                                   .execution_options(populate_existing=True)).scalars().one()
        return self._claw(session, purchase, event)

    def _claw(self, session: Session, purchase: CreditPurchase, event: StripeEvent) -> str:
        """Take back the refunded share of a purchase (a dispute: all of it), once per event.

        Plan credits that already expired are gone: they lower what is taken back."""
        if event.type == "charge.dispute.created":
            target = purchase.credits
        else:
            amount = int(event.data.get("amount") or 0)
            refunded = int(event.data.get("amount_refunded") or 0)
            target = purchase.credits if amount <= 0 or refunded >= amount else purchase.credits * refunded // amount
        period = plan_grant_period(purchase.ledger_key) if purchase.source == "invoice" else None
        if period is not None:
            expired = session.execute(select(LedgerEntry.amount).where(
                LedgerEntry.idempotency_key == expire_key(purchase.account_id, period))).scalar()
            target = max(0, target - int(expired or 0))
        claw = target - purchase.clawed_back
        if claw <= 0:
            return "nothing more to claw back"
        taken, debt = ledger.claw_back(session, purchase.account_id, claw,
                                       f"clawback:{purchase.ledger_key}:{event.id}",
                                       note=f"{event.type} {purchase.stripe_object_id}")
        session.execute(update(CreditPurchase).where(CreditPurchase.id == purchase.id)
                        .values(clawed_back=CreditPurchase.clawed_back + claw)
                        .execution_options(synchronize_session=False))
        session.refresh(purchase, ["clawed_back"])
        return f"clawed back {taken}, debt {debt}"

    # scheduled ---------------------------------------------------------------------------
    def expire_credits(self, now: datetime | None = None) -> tuple[int, int]:
        """Expire what is left of each plan grant past its expiry; returns (grants, credits).

        Grants of periods before ``Settings.credit_expiry_from`` never expire."""
        now = now or utcnow()
        expire_from = self.settings.credit_expiry_from
        with self.db.read() as session:
            keys = session.execute(select(LedgerEntry.user_id, LedgerEntry.idempotency_key).where(
                LedgerEntry.kind == EntryKind.GRANT.value, LedgerEntry.idempotency_key.like("plan:%"))).all()
            done = set(session.execute(select(LedgerEntry.idempotency_key).where(
                LedgerEntry.kind == EntryKind.EXPIRE.value, LedgerEntry.idempotency_key.like("expire:%"))
                ).scalars())
        due: list[tuple[str, str]] = []
        for account_id, key in keys:
            period = plan_grant_period(key)
            if (period and grant_expires(period, expire_from) and plan_grant_expiry(period) <= now
                    and expire_key(account_id, period) not in done):
                due.append((account_id, period))
        grants = credits = 0
        for account_id, period in sorted(due, key=lambda d: d[1]):
            with self.db.session() as session:
                lock_user(session, account_id)
                lot = account_lots(session, account_id, expire_from).lots.get(f"plan:{account_id}:{period}")
                left = lot.remaining if lot is not None and not lot.closed else 0
                entry = ledger.expire(session, account_id, left, expire_key(account_id, period),
                                      note=f"plan credits of {period} expired")
                session.commit()
            grants += 1
            credits += entry.amount
        return grants, credits

    def apply_downgrades(self, now: datetime | None = None) -> int:
        """Accounts whose paid period ended: the subscription's plan (or the default plan) now."""
        now = now or utcnow()
        with self.db.read() as session:
            account_ids = session.execute(select(Subscription.account_id).where(Subscription.downgrade_at <= now)
                                          .distinct()).scalars().all()
        changed = 0
        for account_id in account_ids:
            with self.db.session() as session:
                lock_user(session, account_id)
                # the account and its subscriptions are read after the lock (apply_plan reads them again)
                account = session.get(User, account_id, populate_existing=True)
                if account is None:
                    continue
                before = account.plan
                apply_plan(session, self.settings, account, now)
                session.commit()
                changed += before != account.plan
        return changed
