"""Billing service: Stripe events applied once in any order, refunds and debt, plan changes at
period end, monthly grants and expiry of plan credits (fixed clocks, no sleeps)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select

from api.core import ledger
from api.core.errors import AccountInDebt, CineWeaveError, NotFound
from api.db.engine import Database
from api.db.tables import BillingCustomer, CreditPurchase, LedgerEntry, StripeEvent, Subscription, User
from api.services.billing import BillingService, credit_lots, plan_grant_expiry
from api.services.jobs import JobService, Submission
from api.services.maintenance import Maintenance
from api.services.users import get_user, new_webhook_secret
from api.settings import CreditPack, Settings
from api.storage.local import LocalStorage
from tests.fakes.stripe_server import WEBHOOK_SECRET, event, sign
from tests.fixtures.harness import add_user, balance, ledger_rows, wait_for

PRICES = {"starter": "price_starter", "creator": "price_creator", "studio": "price_studio"}
PACK = CreditPack(id="pack_100", credits=100, stripe_price_id="price_pack_100")


def billing_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"stripe_webhook_secret": WEBHOOK_SECRET, "stripe_plan_prices": PRICES,
                                       "credit_packs": [PACK], "max_active_jobs": 100,
                                       "rate_limit_per_minute": 1000})


@pytest.fixture
def bset(settings: Settings) -> Settings:
    return billing_settings(settings)


@pytest.fixture
def svc(db: Database, bset: Settings) -> BillingService:
    return BillingService(db, bset)


def deliver(svc: BillingService, payload: bytes, now: datetime | None = None) -> str:
    return svc.handle_webhook(payload, sign(payload), now=now)


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc]


def pack_session(account_id: str, session_id: str | None = None, pi: str | None = None) -> dict[str, Any]:
    return {"id": session_id or "cs_test_" + uuid.uuid4().hex[:12], "object": "checkout.session",
            "mode": "payment", "payment_status": "paid", "amount_total": 1000, "customer": None,
            "payment_intent": pi or "pi_" + uuid.uuid4().hex[:12],
            "metadata": {"account_id": account_id, "pack": PACK.id, "credits": "100"}}


def charge(pi: str, amount: int = 1000, refunded: int = 1000) -> dict[str, Any]:
    return {"id": "ch_" + uuid.uuid4().hex[:12], "object": "charge", "payment_intent": pi, "amount": amount,
            "amount_refunded": refunded, "refunded": refunded >= amount}


def spend(db: Database, user_id: str, amount: int) -> None:
    with db.session() as s:
        job = "job_" + uuid.uuid4().hex[:12]
        ledger.reserve(s, user_id, job, amount)
        ledger.capture(s, job)
        s.commit()


def debt(db: Database, user_id: str) -> int:
    with db.read() as s:
        return ledger.get_debt(s, user_id)


def count(db: Database, table: Any) -> int:
    with db.read() as s:
        return int(s.execute(select(func.count()).select_from(table)).scalar_one())


def with_customer(db: Database, user_id: str) -> str:
    cus = "cus_" + uuid.uuid4().hex[:10]
    with db.session() as s:
        s.add(BillingCustomer(account_id=user_id, stripe_customer_id=cus))
        s.commit()
    return cus


# ---- lots (the rollover rule) --------------------------------------------------------------


def _entry(i: int, kind: str, amount: int, key: str, job: str | None = None) -> LedgerEntry:
    return LedgerEntry(id=i, user_id="u", kind=kind, amount=amount, idempotency_key=key, job_id=job,
                       available_after=0, reserved_after=0)


def test_spending_takes_oldest_expiring_credits_first() -> None:
    lots = credit_lots([
        _entry(1, "grant", 100, "signup:u"),              # never expires
        _entry(2, "grant", 80, "plan:u:2031-03"),         # expires 2031-05-01
        _entry(3, "purchase", 50, "stripe:cs_1"),         # never expires
        _entry(4, "grant", 80, "plan:u:2031-04"),         # expires 2031-06-01
        _entry(5, "reserve", 100, "reserve:j1", "j1"),    # March's 80, then 20 of April's
        _entry(6, "capture", 100, "settle:j1", "j1"),
        _entry(7, "reserve", 30, "reserve:j2", "j2"),
        _entry(8, "refund", 30, "settle:j2", "j2"),       # given back where it came from
    ])
    left = {k: lot.remaining for k, lot in lots.lots.items()}
    assert left == {"signup:u": 100, "plan:u:2031-03": 0, "stripe:cs_1": 50, "plan:u:2031-04": 60}
    assert lots.lots["plan:u:2031-03"].expires_at == datetime(2031, 5, 1, tzinfo=UTC)
    assert plan_grant_expiry("2031-12") == datetime(2032, 2, 1, tzinfo=UTC)
    assert lots.total == 210


def test_credits_held_while_their_lot_expired_come_back_for_good() -> None:
    lots = credit_lots([
        _entry(1, "grant", 80, "plan:u:2031-03"),
        _entry(2, "reserve", 30, "reserve:j1", "j1"),
        _entry(3, "expire", 50, "expire:u:2031-03"),
        _entry(4, "refund", 30, "settle:j1", "j1"),
    ])
    assert lots.total == 30 and lots.lots["returned:j1"].expires_at is None


def test_clawback_and_debt_payment_take_their_own_lot_first() -> None:
    lots = credit_lots([
        _entry(1, "grant", 80, "plan:u:2031-03"),
        _entry(2, "purchase", 100, "stripe:cs_1"),
        _entry(3, "clawback", 100, "clawback:stripe:cs_1:evt_1"),
        _entry(4, "purchase", 100, "stripe:cs_2"),
        _entry(5, "debt_paid", 40, "stripe:cs_2:debt"),
    ])
    assert {k: lot.remaining for k, lot in lots.lots.items()} == {
        "plan:u:2031-03": 80, "stripe:cs_1": 0, "stripe:cs_2": 60}


# ---- events applied once -------------------------------------------------------------------


def test_pack_purchase_is_credited_once_under_duplicates(db: Database, bset: Settings, svc: BillingService) -> None:
    user = add_user(db, bset, credits=0).user
    payload = event("checkout.session.completed", pack_session(user.id))
    assert deliver(svc, payload).startswith("credited 100")
    assert deliver(svc, payload) == "duplicate"
    # the same session in another event (Stripe may send a new event for the same object)
    again = event("checkout.session.completed", pack_session(user.id, session_id=_session_id(payload)))
    assert "already credited" in deliver(svc, again)
    assert balance(db, user.id).available == 100
    assert count(db, CreditPurchase) == 1 and count(db, StripeEvent) == 2


def _session_id(payload: bytes) -> str:
    import json

    return json.loads(payload)["data"]["object"]["id"]


def test_concurrent_duplicates_apply_once(backend_db: Database, backend_settings: Settings) -> None:
    bset = billing_settings(backend_settings)
    svc = BillingService(backend_db, bset)
    user = add_user(backend_db, bset, credits=0).user
    payload = event("checkout.session.completed", pack_session(user.id))
    results: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def post() -> None:
        try:
            start.wait(10)
            results.append(svc.handle_webhook(payload, sign(payload)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(r.split(" ")[0] for r in results) == ["credited"] + ["duplicate"] * 7
    assert balance(backend_db, user.id).available == 100
    assert [e.kind for e in ledger_rows(backend_db, user.id)] == ["purchase"]


def test_forged_stale_and_unknown_events_change_nothing(db: Database, bset: Settings, svc: BillingService) -> None:
    user = add_user(db, bset, credits=0).user
    payload = event("checkout.session.completed", pack_session(user.id))
    forged = payload.replace(b'"pack_100"', b'"pack_100", "x": 1')
    with pytest.raises(CineWeaveError) as bad:
        svc.handle_webhook(forged, sign(payload))  # signature of another body
    assert (bad.value.status, bad.value.code) == (400, "invalid_signature")
    with pytest.raises(CineWeaveError):
        svc.handle_webhook(payload, sign(payload, secret="whsec_someone_else"))
    with pytest.raises(CineWeaveError):
        svc.handle_webhook(payload, sign(payload, timestamp=int(time.time()) - 3600))  # stale
    with pytest.raises(CineWeaveError):
        svc.handle_webhook(payload, None)
    assert balance(db, user.id).available == 0 and count(db, StripeEvent) == 0
    unknown = event("customer.tax_id.created", {"id": "txi_1", "customer": "cus_x"})
    assert deliver(svc, unknown) == "ignored: event type not handled"
    assert count(db, StripeEvent) == 1 and ledger_rows(db, user.id) == []


def test_webhook_without_secret_is_not_an_endpoint(db: Database, settings: Settings) -> None:
    payload = event("checkout.session.completed", {})
    with pytest.raises(NotFound):
        BillingService(db, settings).handle_webhook(payload, sign(payload))


# ---- refunds, disputes, debt ---------------------------------------------------------------


def test_refund_after_spending_leaves_zero_and_debt_that_blocks_jobs(
        db: Database, bset: Settings, svc: BillingService, jobs: JobService) -> None:
    jobs.settings = bset
    user = add_user(db, bset, credits=0).user
    session = pack_session(user.id)
    deliver(svc, event("checkout.session.completed", session))
    spend(db, user.id, 70)
    assert deliver(svc, event("charge.refunded", charge(session["payment_intent"]))) == "clawed back 30, debt 70"
    assert (balance(db, user.id).available, debt(db, user.id)) == (0, 70)
    # debt blocks new jobs; nothing is reserved or created
    with db.read() as s:
        caller = get_user(s, user.id)
    before = len(ledger_rows(db, user.id))
    with pytest.raises(AccountInDebt) as refused:
        jobs.submit(caller, Submission("tiny-sd", {"prompt": "a cat"}))
    assert (refused.value.status, refused.value.code, refused.value.details) == (402, "account_in_debt", {"debt": 70})
    assert len(ledger_rows(db, user.id)) == before
    # a dispute of the same (already refunded) payment takes nothing more
    dispute = {"id": "dp_1", "object": "dispute", "charge": "ch_x", "payment_intent": session["payment_intent"],
               "amount": 1000}
    assert deliver(svc, event("charge.dispute.created", dispute)) == "nothing more to claw back"
    # the next purchase pays the debt first
    deliver(svc, event("checkout.session.completed", pack_session(user.id)))
    assert (balance(db, user.id).available, debt(db, user.id)) == (30, 0)
    assert [e.kind for e in ledger_rows(db, user.id)][-4:] == ["clawback", "debt", "purchase", "debt_paid"]
    job, created = jobs.submit(caller, Submission("tiny-sd", {"prompt": "a cat"}))
    assert created and job.status == "queued"


def test_scheduled_grant_pays_debt_first(db: Database, bset: Settings, svc: BillingService,
                                         storage: LocalStorage) -> None:
    user = add_user(db, bset, credits=0, plan="starter").user
    session = pack_session(user.id)
    deliver(svc, event("checkout.session.completed", session))
    spend(db, user.id, 100)
    deliver(svc, event("charge.dispute.created", {"id": "dp_2", "object": "dispute", "charge": "ch_y",
                                                   "payment_intent": session["payment_intent"]}))
    assert (balance(db, user.id).available, debt(db, user.id)) == (0, 100)
    Maintenance(db, bset, storage).run_once("2031-03", now=datetime(2031, 3, 1, tzinfo=UTC))
    assert (balance(db, user.id).available, debt(db, user.id)) == (0, 20)


def test_partial_refund_claws_back_its_share(db: Database, bset: Settings, svc: BillingService) -> None:
    user = add_user(db, bset, credits=0).user
    session = pack_session(user.id)
    deliver(svc, event("checkout.session.completed", session))
    ch = charge(session["payment_intent"], refunded=250)
    assert deliver(svc, event("charge.refunded", ch, created=100)) == "clawed back 25, debt 0"
    # a second partial refund: Stripe's amount_refunded is cumulative
    assert deliver(svc, event("charge.refunded", {**ch, "amount_refunded": 1000}, created=200)) == \
        "clawed back 75, debt 0"
    assert balance(db, user.id).available == 0


def test_refund_that_arrives_before_its_purchase(db: Database, bset: Settings, svc: BillingService) -> None:
    user = add_user(db, bset, credits=10).user
    session = pack_session(user.id)
    refund = event("charge.refunded", charge(session["payment_intent"]), created=200)
    assert deliver(svc, refund) == "pending: no purchase for this payment yet"
    result = deliver(svc, event("checkout.session.completed", session, created=100))
    assert result == "credited 100 (credit pack pack_100); clawed back 100, debt 0"
    assert (balance(db, user.id).available, debt(db, user.id)) == (10, 0)
    assert deliver(svc, refund) == "duplicate"


# ---- subscriptions ---------------------------------------------------------------------------


def sub_obj(sub_id: str, customer: str, price: str, status: str = "active", period_end: int = 0,
            cancel: bool = False) -> dict[str, Any]:
    return {"id": sub_id, "object": "subscription", "customer": customer, "status": status,
            "cancel_at_period_end": cancel, "metadata": {},
            "items": {"object": "list", "data": [{"id": "si_1", "price": {"id": price},
                                                  "current_period_end": period_end}]}}


def invoice(inv_id: str, customer: str, sub_id: str, price: str, start: int, reason: str = "subscription_cycle",
            pi: str | None = None) -> dict[str, Any]:
    return {"id": inv_id, "object": "invoice", "customer": customer, "billing_reason": reason, "amount_paid": 1000,
            "status": "paid", "payment_intent": pi,
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub_id,
                                                                                "metadata": {}}},
            "lines": {"object": "list", "data": [{"id": "il_1", "pricing": {"price_details": {"price": price}},
                                                  "period": {"start": start, "end": start + 31 * 86400}}]}}


def plan_of(db: Database, user_id: str) -> str:
    with db.read() as s:
        return get_user(s, user_id).plan


def test_invoice_grant_once_per_period_and_no_scheduled_double(
        db: Database, bset: Settings, svc: BillingService, storage: LocalStorage) -> None:
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    march = ts(2031, 3, 15)
    first = invoice("in_1", cus, "sub_1", "price_starter", march, reason="subscription_create")
    assert deliver(svc, event("invoice.paid", first), now=datetime(2031, 3, 15, tzinfo=UTC)).startswith(
        "granted 80 for 2031-03")
    assert plan_of(db, user.id) == "starter"
    assert deliver(svc, event("invoice.paid", first)) == "no grant: 2031-03 already granted"
    # the scheduled grant leaves an account paid through Stripe alone
    report = Maintenance(db, bset, storage).run_once("2031-04", now=datetime(2031, 4, 1, tzinfo=UTC))
    assert report.plan_grants == 0 and balance(db, user.id).available == 80
    april = invoice("in_2", cus, "sub_1", "price_starter", ts(2031, 4, 15))
    assert deliver(svc, event("invoice.paid", april)).startswith("granted 80 for 2031-04")
    assert balance(db, user.id).available == 160
    # an invoice that is not a period's (a proration) grants nothing
    assert deliver(svc, event("invoice.paid", invoice("in_3", cus, "sub_1", "price_creator", ts(2031, 4, 20),
                                                      reason="subscription_update"))).startswith("no grant")
    assert balance(db, user.id).available == 160


def test_scheduled_grant_first_then_invoice_same_period(db: Database, bset: Settings, svc: BillingService,
                                                       storage: LocalStorage) -> None:
    user = add_user(db, bset, credits=None, plan="starter").user  # granted this month at sign-up
    cus = with_customer(db, user.id)
    now = datetime.now(UTC)
    inv = invoice("in_9", cus, "sub_9", "price_starter", int(now.timestamp()), reason="subscription_create")
    assert deliver(svc, event("invoice.paid", inv)).startswith("no grant")
    assert balance(db, user.id).available == 80


def test_subscription_events_in_any_order(db: Database, bset: Settings, svc: BillingService) -> None:
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    end = ts(2031, 4, 15)
    newer = event("customer.subscription.updated", sub_obj("sub_2", cus, "price_creator", period_end=end),
                  created=2000)
    older = event("customer.subscription.created", sub_obj("sub_2", cus, "price_starter", status="incomplete",
                                                          period_end=end), created=1000)
    now = datetime(2031, 3, 20, tzinfo=UTC)
    deliver(svc, newer, now)
    assert deliver(svc, older, now) == "stale: a newer event was applied"
    with db.read() as s:
        sub = s.get(Subscription, "sub_2")
        assert sub is not None and (sub.plan, sub.status, sub.event_created) == ("creator", "active", 2000)
    assert plan_of(db, user.id) == "creator"


def test_downgrade_and_cancellation_keep_the_paid_plan_until_period_end(
        db: Database, bset: Settings, svc: BillingService) -> None:
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    end = ts(2031, 4, 15)
    mid = datetime(2031, 3, 20, tzinfo=UTC)
    deliver(svc, event("customer.subscription.updated", sub_obj("sub_3", cus, "price_studio", period_end=end),
                       created=100), mid)
    assert plan_of(db, user.id) == "studio"
    deliver(svc, event("customer.subscription.updated", sub_obj("sub_3", cus, "price_starter", period_end=end),
                       created=200), mid)
    assert plan_of(db, user.id) == "studio"  # paid until the period's end
    assert svc.apply_downgrades(datetime(2031, 4, 14, tzinfo=UTC)) == 0
    assert svc.apply_downgrades(datetime(2031, 4, 15, tzinfo=UTC)) == 1
    assert plan_of(db, user.id) == "starter"
    # canceled: the plan stays until the period's end, then the default plan
    end2 = ts(2031, 5, 15)
    deliver(svc, event("customer.subscription.deleted",
                       sub_obj("sub_3", cus, "price_starter", status="canceled", period_end=end2), created=300),
            datetime(2031, 4, 20, tzinfo=UTC))
    assert plan_of(db, user.id) == "starter"
    assert svc.apply_downgrades(datetime(2031, 5, 15, tzinfo=UTC)) == 1
    assert plan_of(db, user.id) == "free"
    assert svc.apply_downgrades(datetime(2031, 6, 1, tzinfo=UTC)) == 0


def test_checkout_for_a_subscription_links_it(db: Database, bset: Settings, svc: BillingService) -> None:
    user = add_user(db, bset, credits=0).user
    obj = {"id": "cs_sub", "object": "checkout.session", "mode": "subscription", "subscription": "sub_4",
           "customer": "cus_none", "payment_status": "paid", "metadata": {"account_id": user.id, "plan": "creator"}}
    assert deliver(svc, event("checkout.session.completed", obj)) == "linked subscription sub_4 (creator)"
    assert plan_of(db, user.id) == "creator"
    assert balance(db, user.id).available == 0  # credits come with the paid invoice


# ---- monthly grants and expiry (people and teams) ------------------------------------------


def team_account(db: Database, plan: str) -> str:
    team_id = "team_" + uuid.uuid4().hex[:12]
    with db.session() as s:
        s.add(User(id=team_id, email=f"{team_id}@teams.invalid", plan=plan, kind="team",
                   webhook_secret=new_webhook_secret()))
        s.commit()
    return team_id


def test_plan_credits_roll_over_one_month_then_expire(db: Database, bset: Settings, storage: LocalStorage) -> None:
    person = add_user(db, bset, credits=0, plan="starter").user.id
    team = team_account(db, "creator")
    maintenance = Maintenance(db, bset, storage)

    def run(period: str) -> Any:
        return maintenance.run_once(period, now=period_start_utc(period))

    first = run("2031-03")
    assert (first.plan_grants, first.credits_granted, first.credits_expired) == (2, 330, 0)
    spend(db, person, 30)        # from March's 80
    with db.session() as s:      # a purchase never expires
        ledger.credit(s, person, 100, "stripe:cs_keep", kind=ledger.EntryKind.PURCHASE)
        s.commit()
    second = run("2031-04")
    assert second.credits_expired == 0  # March's credits are good through April
    assert balance(db, person).available == 50 + 100 + 80
    spend(db, person, 60)        # 50 left of March, then 10 of April's
    third = run("2031-05")       # March's remainder (0 for the person, 250 for the team) expires
    assert (third.grants_expired, third.credits_expired) == (2, 250)
    assert balance(db, person).available == 100 + 70 + 80
    assert balance(db, team).available == 250 + 250
    again = run("2031-05")
    assert (again.plan_grants, again.grants_expired, again.credits_expired) == (0, 0, 0)
    fourth = run("2031-06")      # April's: 70 for the person, 250 for the team
    assert fourth.credits_expired == 320
    assert balance(db, person).available == 100 + 80 + 80
    assert [e.note for e in ledger_rows(db, team) if e.kind == "expire"] == [
        "plan credits of 2031-03 expired", "plan credits of 2031-04 expired"]


def period_start_utc(period: str) -> datetime:
    year, month = (int(p) for p in period.split("-"))
    return datetime(year, month, 1, tzinfo=UTC)


def test_usage_shows_this_period_and_next_expiry(db: Database, bset: Settings, svc: BillingService) -> None:
    user = add_user(db, bset, credits=None, plan="starter").user  # this month's 80
    with db.session() as s:
        ledger.credit(s, user.id, 20, "stripe:cs_usage", kind=ledger.EntryKind.PURCHASE)
        s.commit()
    spend(db, user.id, 30)
    now = datetime.now(UTC)
    usage = svc.usage(user, now=now)
    assert (usage["credits_granted"], usage["credits_spent"], usage["balance"], usage["debt"]) == (100, 30, 70, 0)
    assert usage["next_expiry"]["credits"] == 50  # this month's plan credits were spent first
    assert usage["next_expiry"]["at"] == plan_grant_expiry(now.strftime("%Y-%m"))


def test_team_billing_needs_an_owner_or_admin(db: Database, bset: Settings) -> None:
    from api.core.errors import Forbidden
    from api.db.tables import Team, TeamMember

    svc = BillingService(db, bset.model_copy(update={"stripe_secret_key": "sk_test_unused"}))
    owner = add_user(db, bset, credits=0).user
    member = add_user(db, bset, credits=0).user
    stranger = add_user(db, bset, credits=0).user
    team = team_account(db, "free")
    with db.session() as s:
        s.add(Team(id=team, name="t", created_by=owner.id))
        s.flush()
        s.add(TeamMember(team_id=team, user_id=owner.id, role="owner"))
        s.add(TeamMember(team_id=team, user_id=member.id, role="member"))
        s.commit()
    assert svc.usage(owner, team)["account_id"] == team
    assert svc.usage(member, team)["account_id"] == team  # members see it
    with pytest.raises(Forbidden):
        svc.checkout(member, pack=PACK.id, team=team)  # only owners and admins buy
    for call in (lambda: svc.usage(stranger, team), lambda: svc.subscription(stranger, team),
                 lambda: svc.checkout(stranger, pack=PACK.id, team=team)):
        with pytest.raises(NotFound):
            call()


# ---- the ledger's clawback and debt ----------------------------------------------------------


def test_claw_back_is_once_per_key_and_credits_pay_debt_first(db: Database, bset: Settings) -> None:
    uid = add_user(db, bset, credits=30).user.id
    with db.session() as s:
        assert ledger.claw_back(s, uid, 100, "clawback:stripe:cs_1:evt_1") == (30, 70)
        assert ledger.claw_back(s, uid, 100, "clawback:stripe:cs_1:evt_1") == (30, 70)  # replay: same split
        s.commit()
    assert (balance(db, uid).available, debt(db, uid)) == (0, 70)
    with db.session() as s:
        ledger.credit(s, uid, 50, "stripe:cs_2", kind=ledger.EntryKind.PURCHASE)
        ledger.credit(s, uid, 50, "stripe:cs_2", kind=ledger.EntryKind.PURCHASE)  # replay: nothing more
        s.commit()
    assert (balance(db, uid).available, debt(db, uid)) == (0, 20)
    with db.session() as s:
        ledger.credit(s, uid, 50, "stripe:cs_3", kind=ledger.EntryKind.PURCHASE)
        s.commit()
    assert (balance(db, uid).available, debt(db, uid)) == (30, 0)
    rows = [(e.kind, e.amount, e.available_after) for e in ledger_rows(db, uid)]
    assert rows[1:] == [("clawback", 30, 0), ("debt", 70, 0), ("purchase", 50, 50), ("debt_paid", 50, 0),
                        ("purchase", 50, 50), ("debt_paid", 20, 30)]
    with db.read() as s:
        assert account_lots_total(s, uid) == 30


def account_lots_total(session: Any, uid: str) -> int:
    from api.services.billing import account_lots

    return account_lots(session, uid).total


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_subscription_signup_ends_the_same_in_any_order(db: Database, bset: Settings, svc: BillingService,
                                                         order: tuple[int, ...]) -> None:
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    start = ts(2031, 3, 10)
    now = datetime(2031, 3, 10, 0, 5, tzinfo=UTC)
    events = [
        event("checkout.session.completed", {"id": "cs_" + cus, "object": "checkout.session", "mode": "subscription",
                                             "subscription": "sub_" + cus, "customer": cus, "payment_status": "paid",
                                             "metadata": {"account_id": user.id, "plan": "starter"}}, created=start),
        event("customer.subscription.created", sub_obj("sub_" + cus, cus, "price_starter",
                                                       period_end=ts(2031, 4, 10)), created=start),
        event("invoice.paid", invoice("in_" + cus, cus, "sub_" + cus, "price_starter", start,
                                      reason="subscription_create"), created=start + 1),
    ]
    for i in order:
        deliver(svc, events[i], now)
    for payload in events:  # and every one again
        assert deliver(svc, payload, now) == "duplicate"
    assert plan_of(db, user.id) == "starter"
    assert balance(db, user.id).available == 80
    with db.read() as s:
        sub = s.get(Subscription, "sub_" + cus)
        assert sub is not None and (sub.status, sub.plan, sub.downgrade_at) == ("active", "starter", None)
        assert s.execute(select(func.count()).select_from(CreditPurchase)).scalar_one() == 1


# ---- concurrency: refunds of one payment, and a refund racing its purchase -----------------


def _run_concurrently(*calls: Any) -> list[Any]:
    """Run ``calls`` in threads released together; returns their results (raises the first error)."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls))

    def run(i: int, call: Any) -> None:
        try:
            start.wait(10)
            results[i] = call()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


def _pg_waiting(db: Database) -> int:
    """Backends of this database waiting on a lock (PostgreSQL)."""
    with db.engine.connect() as conn:
        return int(conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").scalar_one())


def _purchase_of(db: Database, session_id: str) -> CreditPurchase:
    with db.read() as s:
        row = s.execute(select(CreditPurchase).where(CreditPurchase.stripe_object_id == session_id)).scalars().one()
    return row


def test_concurrent_refunds_of_one_payment_take_back_at_most_the_purchase(
        backend_db: Database, backend_settings: Settings) -> None:
    """Two refund events of one charge (50 %, then cumulative 100 %) at once take back 100, not 150.

    On PostgreSQL the account's balance row is held locked until both deliveries wait on a lock,
    so both are in flight together whatever the scheduling."""
    from api.db.engine import is_postgres
    from api.db.tables import Balance

    bset = billing_settings(backend_settings)
    svc = BillingService(backend_db, bset)
    user = add_user(backend_db, bset, credits=0).user
    session = pack_session(user.id)
    deliver(svc, event("checkout.session.completed", session))
    ch = charge(session["payment_intent"], refunded=500)
    half = event("charge.refunded", ch, created=100)
    full = event("charge.refunded", {**ch, "amount_refunded": 1000}, created=200)
    calls = [lambda: deliver(svc, half), lambda: deliver(svc, full)]
    if is_postgres(backend_db.engine):
        with backend_db.session() as holder:
            holder.execute(select(Balance.user_id).where(Balance.user_id == user.id).with_for_update())
            threads = [threading.Thread(target=c) for c in calls]
            for t in threads:
                t.start()
            wait_for(lambda: _pg_waiting(backend_db) >= 2, "both refunds to wait on a lock", timeout_s=20)
            holder.commit()
            for t in threads:
                t.join(30)
            assert not any(t.is_alive() for t in threads)
    else:
        _run_concurrently(*calls)
    assert (balance(backend_db, user.id).available, debt(backend_db, user.id)) == (0, 0)
    assert _purchase_of(backend_db, session["id"]).clawed_back == 100
    taken = [e.amount for e in ledger_rows(backend_db, user.id) if e.kind in ("clawback", "debt")]
    assert sum(taken) == 100, taken


def test_a_refund_racing_its_purchase_is_applied(backend_db: Database, backend_settings: Settings) -> None:
    """A pack's checkout and its refund delivered at the same moment: the refund is never lost.

    On PostgreSQL each delivery, once it has looked for the other's row (the purchase for its
    refunds, the refund for its purchase) and before it commits, waits until the other has looked
    too or waits on a lock: without serialization per payment both look before either commits."""
    from api.db.engine import is_postgres

    bset = billing_settings(backend_settings)
    svc = BillingService(backend_db, bset)
    user = add_user(backend_db, bset, credits=0).user
    session = pack_session(user.id)
    paid = event("checkout.session.completed", session, created=100)
    refund = event("charge.refunded", charge(session["payment_intent"]), created=200)
    if is_postgres(backend_db.engine):
        looked = {"purchase": threading.Event(), "refund": threading.Event()}

        def after(name: str, other: str, call: Any) -> Any:
            def wrapped(*args: Any) -> Any:
                result = call(*args)
                looked[name].set()
                wait_for(lambda: looked[other].is_set() or _pg_waiting(backend_db) >= 1,
                         f"the {other} to look or to wait on a lock", timeout_s=20)
                return result
            return wrapped

        svc._purchase = after("purchase", "refund", svc._purchase)  # type: ignore[method-assign]
        svc._on_refund = after("refund", "purchase", svc._on_refund)  # type: ignore[method-assign]
    _run_concurrently(lambda: deliver(svc, paid), lambda: deliver(svc, refund))
    assert _purchase_of(backend_db, session["id"]).clawed_back == 100
    assert (balance(backend_db, user.id).available, debt(backend_db, user.id)) == (0, 0)


# ---- the plan follows the account's subscriptions ------------------------------------------


def sub_row(db: Database, sub_id: str) -> Subscription:
    with db.read() as s:
        sub = s.get(Subscription, sub_id)
    assert sub is not None, sub_id
    return sub


def test_an_old_canceled_subscription_does_not_downgrade_a_newer_live_one(
        db: Database, bset: Settings, svc: BillingService) -> None:
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    deliver(svc, event("customer.subscription.updated", sub_obj("sub_old", cus, "price_starter",
                                                                period_end=ts(2031, 4, 15)), created=100),
            datetime(2031, 3, 1, tzinfo=UTC))
    deliver(svc, event("customer.subscription.deleted", sub_obj("sub_old", cus, "price_starter", status="canceled",
                                                                period_end=ts(2031, 4, 15)), created=200),
            datetime(2031, 3, 10, tzinfo=UTC))
    assert plan_of(db, user.id) == "starter" and sub_row(db, "sub_old").downgrade_at is not None
    deliver(svc, event("customer.subscription.created", sub_obj("sub_new", cus, "price_creator",
                                                                period_end=ts(2031, 4, 12)), created=300),
            datetime(2031, 3, 12, tzinfo=UTC))
    assert plan_of(db, user.id) == "creator"
    assert sub_row(db, "sub_old").downgrade_at is None  # stale: a live subscription governs
    assert svc.apply_downgrades(datetime(2031, 4, 16, tzinfo=UTC)) == 0
    assert plan_of(db, user.id) == "creator"


def test_a_newer_cheaper_subscription_applies_when_the_old_paid_period_ends(
        db: Database, bset: Settings, svc: BillingService) -> None:
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    mid = datetime(2031, 3, 10, tzinfo=UTC)
    deliver(svc, event("customer.subscription.updated", sub_obj("sub_a", cus, "price_studio",
                                                                period_end=ts(2031, 4, 15)), created=100), mid)
    deliver(svc, event("customer.subscription.deleted", sub_obj("sub_a", cus, "price_studio", status="canceled",
                                                                period_end=ts(2031, 4, 15)), created=200), mid)
    deliver(svc, event("customer.subscription.created", sub_obj("sub_b", cus, "price_starter",
                                                                period_end=ts(2031, 4, 20)), created=300), mid)
    assert plan_of(db, user.id) == "studio"  # paid until April 15
    assert svc.apply_downgrades(datetime(2031, 4, 14, tzinfo=UTC)) == 0
    assert svc.apply_downgrades(datetime(2031, 4, 15, tzinfo=UTC)) == 1
    assert plan_of(db, user.id) == "starter"  # the live subscription's plan, not the default
    assert (sub_row(db, "sub_a").downgrade_at, sub_row(db, "sub_b").downgrade_at) == (None, None)


def subscription_checkout(user_id: str, cus: str, sub_id: str, payment_status: str) -> dict[str, Any]:
    return {"id": "cs_" + sub_id, "object": "checkout.session", "mode": "subscription", "subscription": sub_id,
            "customer": cus, "payment_status": payment_status,
            "metadata": {"account_id": user_id, "plan": "starter"}}


def test_an_unpaid_checkout_gives_no_plan_and_no_scheduled_grant(
        db: Database, bset: Settings, svc: BillingService, storage: LocalStorage) -> None:
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    now = datetime(2031, 3, 10, tzinfo=UTC)
    result = deliver(svc, event("checkout.session.completed", subscription_checkout(user.id, cus, "sub_u", "unpaid"),
                                created=ts(2031, 3, 10)), now)
    assert result == "linked subscription sub_u (starter): incomplete, not paid yet"
    deliver(svc, event("customer.subscription.created", sub_obj("sub_u", cus, "price_starter", status="incomplete",
                                                                period_end=ts(2031, 4, 10)),
                       created=ts(2031, 3, 10, 0, 0, 1)), now)
    assert plan_of(db, user.id) == "free" and sub_row(db, "sub_u").status == "incomplete"
    report = Maintenance(db, bset, storage).run_once("2031-03", now=now)
    assert (report.plan_grants, balance(db, user.id).available, plan_of(db, user.id)) == (0, 0, "free")
    # the payment settles: the first invoice is paid
    paid = invoice("in_u", cus, "sub_u", "price_starter", ts(2031, 3, 10), reason="subscription_create")
    assert deliver(svc, event("invoice.paid", paid, created=ts(2031, 3, 11)), now).startswith("granted 80")
    assert (plan_of(db, user.id), sub_row(db, "sub_u").status, balance(db, user.id).available) == (
        "starter", "active", 80)


@pytest.mark.parametrize("status", ["unpaid", "incomplete_expired", "paused"])
def test_falling_unpaid_takes_the_plan_back_at_once(db: Database, bset: Settings, svc: BillingService,
                                                    status: str) -> None:
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    deliver(svc, event("customer.subscription.updated", sub_obj("sub_p", cus, "price_creator",
                                                                period_end=ts(2031, 4, 15)), created=100),
            datetime(2031, 3, 15, tzinfo=UTC))
    assert plan_of(db, user.id) == "creator"
    deliver(svc, event("customer.subscription.updated", sub_obj("sub_p", cus, "price_creator", status=status,
                                                                period_end=ts(2031, 4, 15)), created=200),
            datetime(2031, 3, 20, tzinfo=UTC))
    assert plan_of(db, user.id) == "free"  # no grace until April 15
    assert sub_row(db, "sub_p").downgrade_at is None


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_events_of_the_same_second_end_active_in_any_order(db: Database, bset: Settings, svc: BillingService,
                                                          order: tuple[int, ...]) -> None:
    """Stripe sends subscription.created (incomplete), subscription.updated (active) and the first
    invoice.paid within one second: the incomplete state never wins."""
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    t = ts(2031, 3, 10)
    now = datetime(2031, 3, 10, 0, 1, tzinfo=UTC)
    events = [
        event("customer.subscription.created", sub_obj("sub_s", cus, "price_starter", status="incomplete",
                                                       period_end=ts(2031, 4, 10)), created=t),
        event("customer.subscription.updated", sub_obj("sub_s", cus, "price_starter", period_end=ts(2031, 4, 10)),
              created=t),
        event("invoice.paid", invoice("in_s", cus, "sub_s", "price_starter", t, reason="subscription_create"),
              created=t),
    ]
    for i in order:
        deliver(svc, events[i], now)
    sub = sub_row(db, "sub_s")
    assert (sub.status, sub.plan, sub.downgrade_at) == ("active", "starter", None)
    assert (plan_of(db, user.id), balance(db, user.id).available) == ("starter", 80)


@pytest.mark.parametrize("canceled_first", [False, True])
def test_canceled_beats_active_in_the_same_second(db: Database, bset: Settings, svc: BillingService,
                                                  canceled_first: bool) -> None:
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    end = ts(2031, 4, 10)
    active = event("customer.subscription.updated", sub_obj("sub_c", cus, "price_starter", period_end=end),
                   created=500)
    canceled = event("customer.subscription.deleted", sub_obj("sub_c", cus, "price_starter", status="canceled",
                                                              period_end=end), created=500)
    for payload in ([canceled, active] if canceled_first else [active, canceled]):
        deliver(svc, payload, datetime(2031, 3, 20, tzinfo=UTC))
    assert sub_row(db, "sub_c").status == "canceled"
    assert svc.apply_downgrades(datetime(2031, 4, 10, tzinfo=UTC)) == (0 if canceled_first else 1)
    assert plan_of(db, user.id) == "free"


# ---- refunds of expired plan credits, and the expiry cutover ---------------------------------


def test_refunding_an_invoice_after_its_credits_expired_takes_only_what_was_left(
        db: Database, bset: Settings, svc: BillingService, storage: LocalStorage) -> None:
    user = add_user(db, bset, credits=0).user
    cus = with_customer(db, user.id)
    inv = invoice("in_e", cus, "sub_e", "price_starter", ts(2031, 3, 5), reason="subscription_create", pi="pi_inv_e")
    deliver(svc, event("invoice.paid", inv), datetime(2031, 3, 5, tzinfo=UTC))
    spend(db, user.id, 30)
    with db.session() as s:  # a pack, which never expires
        ledger.credit(s, user.id, 100, "stripe:cs_e", kind=ledger.EntryKind.PURCHASE)
        s.commit()
    assert svc.expire_credits(datetime(2031, 5, 1, tzinfo=UTC)) == (1, 50)  # March's 80 less 30 spent
    assert balance(db, user.id).available == 100
    # the invoice refunded in full: of its 80 credits, 50 already expired, 30 were spent
    assert deliver(svc, event("charge.refunded", charge("pi_inv_e"))) == "clawed back 30, debt 0"
    assert (balance(db, user.id).available, debt(db, user.id)) == (70, 0)


def test_plan_credits_granted_before_the_cutover_never_expire(
        db: Database, bset: Settings, storage: LocalStorage, svc: BillingService) -> None:
    later = bset.model_copy(update={"credit_expiry_from": "2031-04"})
    person = add_user(db, later, credits=0, plan="starter").user
    maintenance = Maintenance(db, later, storage)
    maintenance.run_once("2031-03", now=datetime(2031, 3, 1, tzinfo=UTC))   # before the cutover
    maintenance.run_once("2031-04", now=datetime(2031, 4, 1, tzinfo=UTC))
    usage = BillingService(db, later).usage(person, now=datetime(2031, 4, 2, tzinfo=UTC))
    assert usage["next_expiry"] == {"at": datetime(2031, 6, 1, tzinfo=UTC), "credits": 80}  # April's only
    report = maintenance.run_once("2031-05", now=datetime(2031, 5, 1, tzinfo=UTC))
    assert (report.grants_expired, report.credits_expired) == (0, 0)
    assert balance(db, person.id).available == 3 * 80
    report = maintenance.run_once("2031-06", now=datetime(2031, 6, 1, tzinfo=UTC))
    assert (report.grants_expired, report.credits_expired) == (1, 80)  # April's (spent after March's: none)


def test_by_default_grants_before_december_2026_never_expire(db: Database, bset: Settings,
                                                             storage: LocalStorage) -> None:
    assert Settings().credit_expiry_from == "2026-12"
    person = add_user(db, bset, credits=0, plan="starter").user
    maintenance = Maintenance(db, bset, storage)
    maintenance.run_once("2026-11", now=datetime(2026, 11, 1, tzinfo=UTC))
    maintenance.run_once("2026-12", now=datetime(2026, 12, 1, tzinfo=UTC))
    assert maintenance.run_once("2027-01", now=datetime(2027, 1, 1, tzinfo=UTC)).credits_expired == 0
    assert maintenance.run_once("2027-02", now=datetime(2027, 2, 1, tzinfo=UTC)).credits_expired == 80
    assert [e.idempotency_key for e in ledger_rows(db, person.id) if e.kind == "expire"] == [
        f"expire:{person.id}:2026-12"]
