"""Request bodies and answers of the billing routes (``/v1/billing/*``, ``/v1/webhooks/stripe``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.db.tables import Subscription
from api.http.schemas import Public, iso


class CheckoutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plan: str | None = Field(default=None, min_length=1, max_length=64, description="a plan id (subscription)")
    pack: str | None = Field(default=None, min_length=1, max_length=64, description="a credit pack id (one-off)")
    team: str | None = Field(default=None, max_length=64,
                             description="buy for this team's account (its owners and admins only)")

    @model_validator(mode="after")
    def _one_of(self) -> CheckoutCreate:
        if (self.plan is None) == (self.pack is None):
            raise ValueError("give exactly one of plan or pack")
        return self


class PortalCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    team: str | None = Field(default=None, max_length=64)


class CheckoutPublic(Public):
    id: str = Field(description="the Checkout Session id (cs_...)")
    url: str = Field(description="send the user here")
    mode: str = Field(description="subscription (a plan) or payment (a credit pack)")
    account_id: str


class PortalPublic(Public):
    url: str


class SubscriptionInfo(Public):
    id: str
    plan: str
    status: str
    current_period_end: str | None = None
    cancel_at_period_end: bool
    downgrade_at: str | None = Field(default=None, description="the paid plan is kept until then")


class SubscriptionPublic(Public):
    account_id: str
    plan: str = Field(description="the plan in effect now")
    subscription: SubscriptionInfo | None = None


class ExpiryPublic(Public):
    at: str
    credits: int


class UsagePublic(Public):
    account_id: str
    plan: str
    period: str = Field(description="YYYY-MM (UTC calendar month)")
    period_start: str
    period_end: str
    credits_granted: int = Field(description="plan grants, purchases and adjustments this period")
    credits_spent: int = Field(description="captured by finished jobs this period")
    credits_expired: int
    credits_clawed_back: int
    balance: int
    reserved: int
    debt: int = Field(description="owed after a refund or dispute; blocks new jobs (402 account_in_debt)")
    next_expiry: ExpiryPublic | None = None


def subscription_view(data: dict[str, Any]) -> dict[str, Any]:
    sub: Subscription | None = data["subscription"]
    view = None
    if sub is not None:
        view = {"id": sub.id, "plan": sub.plan, "status": sub.status,
                "current_period_end": iso(sub.current_period_end),
                "cancel_at_period_end": sub.cancel_at_period_end, "downgrade_at": iso(sub.downgrade_at)}
    return {"account_id": data["account_id"], "plan": data["plan"], "subscription": view}


def usage_view(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: (iso(v) if isinstance(v, datetime) else v) for k, v in data.items() if k != "next_expiry"}
    nxt = data["next_expiry"]
    out["next_expiry"] = {"at": iso(nxt["at"]), "credits": nxt["credits"]} if nxt else None
    return out
