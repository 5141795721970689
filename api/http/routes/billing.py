"""Billing: Stripe Checkout and Customer Portal sessions, the subscription and usage, and the
signed Stripe webhook. Thin: parse, call :class:`~api.services.billing.BillingService`, shape."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool

from api.http.billing_schemas import (
    CheckoutCreate,
    CheckoutPublic,
    PortalCreate,
    PortalPublic,
    SubscriptionPublic,
    UsagePublic,
    subscription_view,
    usage_view,
)
from api.http.bodies import WEBHOOK_BODY_BYTES, read_capped
from api.http.deps import CurrentUser, State
from api.http.schemas import Accepted, error_responses
from api.http.state import AppState
from api.services.billing import BillingService

router = APIRouter(prefix="/v1")

TeamQuery = Annotated[str | None, Query(max_length=64, description="a team's account (owners and admins)")]


def billing(state: AppState) -> BillingService:
    """One service (and one Stripe client) per app."""
    service = state.extras.get("billing")
    if service is None:
        service = state.extras["billing"] = BillingService(state.db, state.settings)
    return service


@router.post("/billing/checkout", tags=["billing"], status_code=201, response_model=CheckoutPublic,
             responses=error_responses(401, 403, 404, 409, 422, 502))
def create_checkout(body: CheckoutCreate, user: CurrentUser, state: State) -> dict[str, Any]:
    """A Stripe Checkout Session for a plan (subscription) or a credit pack (one-off payment)."""
    result = billing(state).checkout(user, plan=body.plan, pack=body.pack, team=body.team)
    return {"id": result.id, "url": result.url, "mode": result.mode, "account_id": result.account_id}


@router.post("/billing/portal", tags=["billing"], status_code=201, response_model=PortalPublic,
             responses=error_responses(401, 403, 404, 502))
def create_portal(user: CurrentUser, state: State, body: PortalCreate | None = None) -> dict[str, Any]:
    """A Stripe Customer Portal session (change plan, cancel, payment methods, invoices)."""
    return {"url": billing(state).portal(user, team=body.team if body else None)}


@router.get("/billing/subscription", tags=["billing"], response_model=SubscriptionPublic,
            responses=error_responses(401, 403, 404))
def get_subscription(user: CurrentUser, state: State, team: TeamQuery = None) -> dict[str, Any]:
    return subscription_view(billing(state).subscription(user, team))


@router.get("/billing/usage", tags=["billing"], response_model=UsagePublic,
            responses=error_responses(401, 403, 404))
def get_usage(user: CurrentUser, state: State, team: TeamQuery = None) -> dict[str, Any]:
    """This month's credits granted and spent, the balance, the debt, and what expires next."""
    return usage_view(billing(state).usage(user, team))


@router.post("/webhooks/stripe", tags=["billing"], response_model=Accepted, responses=error_responses(400, 404, 413))
async def stripe_webhook(request: Request, state: State,
                         stripe_signature: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    """Stripe events, verified with the endpoint's signing secret; each applied once."""
    payload = await read_capped(request, WEBHOOK_BODY_BYTES)
    await run_in_threadpool(billing(state).handle_webhook, payload, stripe_signature)
    return {"ok": True}
