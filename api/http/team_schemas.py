"""Request bodies and answers of the team routes (``api/http/routes/teams.py``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.db.tables import Balance, TeamInvitation, User
from api.http.schemas import CreditsPublic, Public, iso
from api.services.teams import (
    MemberUsage,
    MemberView,
    NewInvitation,
    TeamUsage,
    TeamView,
    UsageRow,
    invitation_status,
)

RoleName = Literal["owner", "admin", "member"]


class TeamCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)


class TeamUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=100)


class MemberUpdate(BaseModel):
    """Only the fields sent change; ``"monthly_cap": null`` lifts the cap."""

    model_config = ConfigDict(extra="forbid")

    role: RoleName | None = None
    monthly_cap: int | None = Field(default=None, ge=0, le=1_000_000_000,
                                    description="credits the member may spend from the team per calendar month")


class InvitationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(min_length=3, max_length=254)
    role: RoleName = "member"


# answers ------------------------------------------------------------------------------------
class TeamPublic(Public):
    id: str
    name: str
    plan: str
    role: str = Field(description="the caller's role: owner | admin | member")
    created_by: str
    created_at: str | None = None


class TeamCreated(TeamPublic):
    webhook_secret: str = Field(description="signs the webhooks of the team's jobs; shown once")


class TeamList(Public):
    data: list[TeamPublic]


class MemberPublic(Public):
    user_id: str
    email: str
    role: str
    monthly_cap: int | None = None
    spent_this_month: int = Field(description="credits reserved or charged (less refunds) from the team "
                                              "this calendar month: what the cap bounds")
    joined_at: str | None = None


class MemberList(Public):
    data: list[MemberPublic]


class InvitationPublic(Public):
    id: str
    team_id: str
    email: str
    role: str
    status: str = Field(description="pending | accepted | revoked | expired")
    invited_by: str
    created_at: str | None = None
    expires_at: str | None = None
    accepted_at: str | None = None


class InvitationCreated(InvitationPublic):
    token: str = Field(description="the invitation's secret, shown once: the app sends it to the address")


class InvitationList(Public):
    data: list[InvitationPublic]


class TeamCreditsPublic(CreditsPublic):
    debt: int = Field(default=0, description="credits owed after a refunded or disputed payment")


class UsageCredits(Public):
    reserved: int = Field(description="held now by the period's active jobs")
    charged: int
    refunded: int
    spent: int = Field(description="reserved + charged: what counts against a monthly cap")


class UsagePublic(Public):
    jobs: int
    jobs_by_status: dict[str, int]
    credits: UsageCredits


class MemberUsagePublic(UsagePublic):
    user_id: str
    email: str | None = None
    role: str | None = None
    active: bool = Field(description="false for a member removed since")
    monthly_cap: int | None = None


class TeamUsagePublic(Public):
    team_id: str
    period: str = Field(description="YYYY-MM (UTC)")
    start: str
    end: str
    total: UsagePublic
    members: list[MemberUsagePublic]


# views --------------------------------------------------------------------------------------
def team_view(view: TeamView) -> dict[str, Any]:
    return {"id": view.team.id, "name": view.team.name, "plan": view.account.plan, "role": view.role,
            "created_by": view.team.created_by, "created_at": iso(view.team.created_at)}


def member_view(view: MemberView) -> dict[str, Any]:
    m = view.member
    return {"user_id": m.user_id, "email": view.email, "role": m.role, "monthly_cap": m.monthly_cap,
            "spent_this_month": view.spent_this_month, "joined_at": iso(m.joined_at)}


def invitation_view(inv: TeamInvitation) -> dict[str, Any]:
    return {"id": inv.id, "team_id": inv.team_id, "email": inv.email, "role": inv.role,
            "status": invitation_status(inv), "invited_by": inv.invited_by, "created_at": iso(inv.created_at),
            "expires_at": iso(inv.expires_at), "accepted_at": iso(inv.accepted_at)}


def invitation_created_view(new: NewInvitation) -> dict[str, Any]:
    return {**invitation_view(new.invitation), "token": new.token}


def credits_view(account: User, balance: Balance) -> dict[str, Any]:
    return {"balance": balance.available, "reserved": balance.reserved, "plan": account.plan,
            "debt": balance.debt or 0}


def _usage_view(row: UsageRow) -> dict[str, Any]:
    return {"jobs": row.jobs, "jobs_by_status": dict(sorted(row.by_status.items())),
            "credits": {"reserved": row.reserved, "charged": row.charged, "refunded": row.refunded,
                        "spent": row.spent}}


def _member_usage_view(u: MemberUsage) -> dict[str, Any]:
    return {"user_id": u.user_id, "email": u.email, "role": u.role, "active": u.active,
            "monthly_cap": u.monthly_cap, **_usage_view(u.usage)}


def usage_view(usage: TeamUsage) -> dict[str, Any]:
    return {"team_id": usage.team_id, "period": usage.period, "start": iso(usage.start), "end": iso(usage.end),
            "total": _usage_view(usage.total), "members": [_member_usage_view(u) for u in usage.members]}
