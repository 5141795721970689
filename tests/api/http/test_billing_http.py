"""Billing over HTTP against a fake Stripe API on 127.0.0.1: what the official library sends for
Checkout and the Customer Portal, signed webhooks, and debt refusing new jobs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from api.db.tables import BillingCustomer
from api.settings import CreditPack
from tests.fakes.stripe_server import WEBHOOK_SECRET, FakeStripe, event, sign
from tests.fixtures.harness import ApiHarness, balance, bearer, job_count, ledger_rows

PRICES = {"starter": "price_starter", "creator": "price_creator"}


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    with FakeStripe() as fake:
        yield fake


@pytest.fixture
async def bapi(make_api: Any, fake_stripe: FakeStripe) -> ApiHarness:
    return await make_api(run_runner=False, stripe_secret_key=fake_stripe.api_key,
                          stripe_api_base=fake_stripe.base_url, stripe_webhook_secret=WEBHOOK_SECRET,
                          stripe_plan_prices=PRICES, stripe_success_url="https://app.example.com/ok",
                          stripe_cancel_url="https://app.example.com/no",
                          stripe_portal_return_url="https://app.example.com/account",
                          credit_packs=[CreditPack(id="pack_100", credits=100, stripe_price_id="price_pack_100")],
                          max_active_jobs=100, rate_limit_per_minute=1000)


async def post_event(api: ApiHarness, kind: str, obj: dict[str, Any], *, signature: str | None = None,
                     payload: bytes | None = None) -> Any:
    body = payload or event(kind, obj)
    return await api.client.post("/v1/webhooks/stripe", content=body,
                                 headers={"Stripe-Signature": signature or sign(body),
                                          "Content-Type": "application/json"})


async def test_checkout_for_a_plan_sends_a_subscription_session(bapi: ApiHarness, fake_stripe: FakeStripe) -> None:
    user = bapi.user(credits=0)
    r = await bapi.client.post("/v1/billing/checkout", json={"plan": "starter"}, headers=bearer(user.api_key))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("cs_test_") and body["url"].startswith("https://checkout.stripe.com/")
    assert (body["mode"], body["account_id"]) == ("subscription", user.user.id)
    [customer] = fake_stripe.calls("/v1/customers")
    assert customer.form["email"] == user.user.email
    assert customer.form["metadata[account_id]"] == user.user.id
    assert customer.headers["idempotency-key"] == f"cineweave-customer-{user.user.id}"
    [sent] = fake_stripe.calls("/v1/checkout/sessions")
    assert sent.headers["authorization"] == f"Bearer {fake_stripe.api_key}"
    form = sent.form
    assert form["mode"] == "subscription"
    assert (form["line_items[0][price]"], form["line_items[0][quantity]"]) == ("price_starter", "1")
    assert form["customer"] == next(iter(fake_stripe.customers))
    assert (form["metadata[account_id]"], form["metadata[plan]"]) == (user.user.id, "starter")
    assert form["subscription_data[metadata][account_id]"] == user.user.id
    assert form["client_reference_id"] == user.user.id
    assert (form["success_url"], form["cancel_url"]) == ("https://app.example.com/ok", "https://app.example.com/no")


async def test_checkout_for_a_pack_is_a_payment_and_reuses_the_customer(
        bapi: ApiHarness, fake_stripe: FakeStripe) -> None:
    user = bapi.user(credits=0)
    for _ in range(2):
        r = await bapi.client.post("/v1/billing/checkout", json={"pack": "pack_100"}, headers=bearer(user.api_key))
        assert r.status_code == 201 and r.json()["mode"] == "payment"
    assert len(fake_stripe.calls("/v1/customers")) == 1  # created once, stored
    with bapi.db.read() as s:
        assert s.execute(select(func.count()).select_from(BillingCustomer)).scalar_one() == 1
    sessions = fake_stripe.calls("/v1/checkout/sessions")
    assert len({c.form["customer"] for c in sessions}) == 1
    form = sessions[0].form
    assert (form["mode"], form["line_items[0][price]"]) == ("payment", "price_pack_100")
    assert (form["metadata[pack]"], form["metadata[credits]"]) == ("pack_100", "100")
    assert form["payment_intent_data[metadata][account_id]"] == user.user.id


async def test_checkout_refuses_bad_requests(bapi: ApiHarness, fake_stripe: FakeStripe) -> None:
    user = bapi.user(credits=0)
    for body, code in (({"plan": "studio"}, "invalid_input"), ({"pack": "nope"}, "invalid_input"),
                       ({}, "invalid_input"), ({"plan": "starter", "pack": "pack_100"}, "invalid_input"),
                       ({"plan": "starter", "team": "team_nope"}, "not_found")):
        r = await bapi.client.post("/v1/billing/checkout", json=body, headers=bearer(user.api_key))
        assert r.json()["error"]["code"] == code, (body, r.text)
    assert fake_stripe.calls("/v1/checkout/sessions") == []


async def test_portal_session(bapi: ApiHarness, fake_stripe: FakeStripe) -> None:
    user = bapi.user(credits=0)
    r = await bapi.client.post("/v1/billing/portal", headers=bearer(user.api_key))
    assert r.status_code == 201 and r.json()["url"].startswith("https://billing.stripe.com/p/session/")
    [sent] = fake_stripe.calls("/v1/billing_portal/sessions")
    assert sent.form == {"customer": next(iter(fake_stripe.customers)),
                         "return_url": "https://app.example.com/account"}


def pack_completed(account_id: str) -> dict[str, Any]:
    return {"id": "cs_test_" + uuid.uuid4().hex[:12], "object": "checkout.session", "mode": "payment",
            "payment_status": "paid", "amount_total": 1000, "payment_intent": "pi_" + uuid.uuid4().hex[:12],
            "metadata": {"account_id": account_id, "pack": "pack_100", "credits": "100"}}


async def test_webhook_applies_once_and_refuses_bad_signatures(bapi: ApiHarness) -> None:
    user = bapi.user(credits=0)
    payload = event("checkout.session.completed", pack_completed(user.user.id))
    for _ in range(3):
        r = await post_event(bapi, "", {}, payload=payload)
        assert r.status_code == 200 and r.json() == {"ok": True}
    assert balance(bapi.db, user.user.id).available == 100
    other = event("checkout.session.completed", pack_completed(user.user.id))
    for signature in (sign(payload), sign(other, secret="whsec_wrong"), sign(other, timestamp=int(time.time()) - 900),
                      "t=1,v1=00"):
        r = await post_event(bapi, "", {}, payload=other, signature=signature)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature", signature
    unsigned = await bapi.client.post("/v1/webhooks/stripe", content=other)
    assert unsigned.status_code == 400 and unsigned.json()["error"]["code"] == "invalid_signature"
    unknown = await post_event(bapi, "payout.paid", {"id": "po_1"})
    assert unknown.status_code == 200
    assert balance(bapi.db, user.user.id).available == 100 and len(ledger_rows(bapi.db, user.user.id)) == 1


async def test_debt_blocks_jobs_and_a_purchase_pays_it(bapi: ApiHarness) -> None:
    user = bapi.user(credits=0)
    bought = pack_completed(user.user.id)
    assert (await post_event(bapi, "checkout.session.completed", bought)).status_code == 200
    for _ in range(4):  # queued jobs hold (reserve) part of the pack
        assert (await bapi.submit(user.api_key, input={"prompt": "a cat", "width": 128, "height": 128})
                ).status_code == 202
    spent = 100 - balance(bapi.db, user.user.id).available
    refund = {"id": "ch_1", "object": "charge", "payment_intent": bought["payment_intent"], "amount": 1000,
              "amount_refunded": 1000}
    assert (await post_event(bapi, "charge.refunded", refund)).status_code == 200
    assert balance(bapi.db, user.user.id).available == 0
    usage = (await bapi.client.get("/v1/billing/usage", headers=bearer(user.api_key))).json()
    assert (usage["balance"], usage["debt"], usage["credits_granted"], usage["credits_clawed_back"]) == (
        0, spent, 100, 100 - spent)
    jobs_before, ledger_before = job_count(bapi.db, user.user.id), len(ledger_rows(bapi.db, user.user.id))
    r = await bapi.submit(user.api_key)
    assert r.status_code == 402 and r.json()["error"]["code"] == "account_in_debt"
    assert r.json()["error"]["details"] == {"debt": spent}
    assert job_count(bapi.db, user.user.id) == jobs_before
    assert len(ledger_rows(bapi.db, user.user.id)) == ledger_before  # nothing charged
    assert (await post_event(bapi, "checkout.session.completed", pack_completed(user.user.id))).status_code == 200
    assert balance(bapi.db, user.user.id).available == 100 - spent
    assert (await bapi.submit(user.api_key)).status_code == 202


async def test_subscription_and_usage_views(bapi: ApiHarness) -> None:
    user = bapi.user(credits=0)
    empty = (await bapi.client.get("/v1/billing/subscription", headers=bearer(user.api_key))).json()
    assert empty == {"account_id": user.user.id, "plan": "free", "subscription": None}
    with bapi.db.session() as s:
        s.add(BillingCustomer(account_id=user.user.id, stripe_customer_id="cus_view"))
        s.commit()
    end = int(time.time()) + 20 * 86400
    sub = {"id": "sub_view", "object": "subscription", "customer": "cus_view", "status": "active",
           "cancel_at_period_end": True, "metadata": {},
           "items": {"data": [{"price": {"id": "price_creator"}, "current_period_end": end}]}}
    assert (await post_event(bapi, "customer.subscription.updated", sub)).status_code == 200
    got = (await bapi.client.get("/v1/billing/subscription", headers=bearer(user.api_key))).json()
    assert got["plan"] == "creator"
    assert {k: got["subscription"][k] for k in ("id", "plan", "status", "cancel_at_period_end")} == {
        "id": "sub_view", "plan": "creator", "status": "active", "cancel_at_period_end": True}
    assert got["subscription"]["downgrade_at"] == got["subscription"]["current_period_end"]
    # a plan checkout while subscribed is refused (change plans in the portal)
    r = await bapi.client.post("/v1/billing/checkout", json={"plan": "starter"}, headers=bearer(user.api_key))
    assert r.status_code == 409 and r.json()["error"]["code"] == "subscription_exists"
    usage = (await bapi.client.get("/v1/billing/usage", headers=bearer(user.api_key))).json()
    assert {"period", "period_start", "period_end", "credits_granted", "credits_spent", "balance", "debt",
            "reserved", "next_expiry"} <= usage.keys()
    assert json.dumps(usage)  # plain JSON


async def test_a_team_admin_buys_for_the_team(bapi: ApiHarness, fake_stripe: FakeStripe) -> None:
    from api.db.tables import Team, TeamMember, User
    from api.services.users import new_webhook_secret

    admin, member = bapi.user(credits=0), bapi.user(credits=0)
    team_id = "team_" + uuid.uuid4().hex[:12]
    with bapi.db.session() as s:
        s.add(User(id=team_id, email=f"{team_id}@teams.invalid", kind="team", webhook_secret=new_webhook_secret()))
        s.flush()
        s.add(Team(id=team_id, name="t", created_by=admin.user.id))
        s.flush()
        s.add(TeamMember(team_id=team_id, user_id=admin.user.id, role="admin"))
        s.add(TeamMember(team_id=team_id, user_id=member.user.id, role="member"))
        s.commit()
    r = await bapi.client.post("/v1/billing/checkout", json={"pack": "pack_100", "team": team_id},
                               headers=bearer(admin.api_key))
    assert r.status_code == 201 and r.json()["account_id"] == team_id
    [sent] = fake_stripe.calls("/v1/checkout/sessions")
    assert sent.form["metadata[account_id]"] == team_id
    [customer] = fake_stripe.calls("/v1/customers")
    assert customer.form["metadata[account_id]"] == team_id and customer.form["metadata[kind]"] == "team"
    refused = await bapi.client.post("/v1/billing/checkout", json={"pack": "pack_100", "team": team_id},
                                     headers=bearer(member.api_key))
    assert refused.status_code == 403
    usage = await bapi.client.get(f"/v1/billing/usage?team={team_id}", headers=bearer(admin.api_key))
    assert usage.status_code == 200 and usage.json()["account_id"] == team_id


async def test_an_oversized_webhook_body_is_refused_unread(bapi: ApiHarness) -> None:
    """A signed-looking body past the cap is 413 before any parsing: nothing is applied or stored."""
    from api.http.bodies import WEBHOOK_BODY_BYTES

    user = bapi.user(credits=0)
    obj = pack_completed(user.user.id)
    obj["metadata"]["padding"] = "x" * (WEBHOOK_BODY_BYTES + 1)
    payload = event("checkout.session.completed", obj)
    r = await post_event(bapi, "", {}, payload=payload)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert balance(bapi.db, user.user.id).available == 0 and ledger_rows(bapi.db, user.user.id) == []
    replicate = await bapi.client.post("/v1/webhooks/replicate", content=b"{" + b" " * WEBHOOK_BODY_BYTES + b"}")
    assert replicate.status_code in (404, 413)  # 404 when this stack has no provider receiver


async def test_a_plan_checkout_paid_later_gives_the_plan_only_when_paid(bapi: ApiHarness) -> None:
    """A delayed payment method: the Checkout completes unpaid (no plan, the subscription is
    incomplete), then ``checkout.session.async_payment_succeeded`` makes it active."""
    user = bapi.user(credits=0)
    with bapi.db.session() as s:
        s.add(BillingCustomer(account_id=user.user.id, stripe_customer_id="cus_async"))
        s.commit()
    obj = {"id": "cs_async", "object": "checkout.session", "mode": "subscription", "subscription": "sub_async",
           "customer": "cus_async", "payment_status": "unpaid",
           "metadata": {"account_id": user.user.id, "plan": "creator"}}
    assert (await post_event(bapi, "checkout.session.completed", obj)).status_code == 200
    got = (await bapi.client.get("/v1/billing/subscription", headers=bearer(user.api_key))).json()
    assert (got["plan"], got["subscription"]["status"]) == ("free", "incomplete")
    later = event("checkout.session.async_payment_succeeded", {**obj, "payment_status": "paid"},
                  created=int(time.time()) + 1)
    assert (await post_event(bapi, "", {}, payload=later)).status_code == 200
    got = (await bapi.client.get("/v1/billing/subscription", headers=bearer(user.api_key))).json()
    assert (got["plan"], got["subscription"]["status"]) == ("creator", "active")
