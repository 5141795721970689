"""Teams: the team, its members and roles, invitations, its credits and its usage per member.

Every route answers ``not_found`` to anyone who is not an active member of the team (see
``api/services/teams.py`` for who may change what).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response

from api.core.errors import InvalidInput
from api.http.deps import CurrentUser, State
from api.http.schemas import LedgerList, WebhookSecret, error_responses, ledger_view
from api.http.team_schemas import (
    InvitationCreate,
    InvitationCreated,
    InvitationList,
    InvitationPublic,
    MemberList,
    MemberPublic,
    MemberUpdate,
    TeamCreate,
    TeamCreated,
    TeamCreditsPublic,
    TeamList,
    TeamPublic,
    TeamUpdate,
    TeamUsagePublic,
    credits_view,
    invitation_created_view,
    invitation_view,
    member_view,
    team_view,
    usage_view,
)

router = APIRouter(prefix="/v1", tags=["teams"])

READ = error_responses(401, 403, 404, 422)
CHANGE = error_responses(401, 403, 404, 409, 422)


@router.post("/teams", status_code=201, response_model=TeamCreated, responses=error_responses(401, 403, 422))
def create_team(body: TeamCreate, user: CurrentUser, state: State) -> dict[str, Any]:
    """The caller becomes the team's owner; the team gets its own account (balance, plan, ledger)."""
    new = state.teams.create(user, body.name)
    return {**team_view(new.view), "webhook_secret": new.webhook_secret}


@router.get("/teams", response_model=TeamList, responses=error_responses(401, 403))
def list_teams(user: CurrentUser, state: State) -> dict[str, Any]:
    return {"data": [team_view(v) for v in state.teams.list_for(user)]}


@router.get("/teams/{team_id}", response_model=TeamPublic, responses=READ)
def get_team(team_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    return team_view(state.teams.get(user, team_id))


@router.patch("/teams/{team_id}", response_model=TeamPublic, responses=CHANGE)
def update_team(team_id: str, body: TeamUpdate, user: CurrentUser, state: State) -> dict[str, Any]:
    return team_view(state.teams.rename(user, team_id, body.name))


@router.delete("/teams/{team_id}", status_code=204, response_class=Response, responses=CHANGE)
def delete_team(team_id: str, user: CurrentUser, state: State) -> Response:
    state.teams.delete(user, team_id)
    return Response(status_code=204)


@router.post("/teams/{team_id}/webhooks/secret", response_model=WebhookSecret, responses=CHANGE)
def rotate_team_webhook_secret(team_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    """A new secret for the webhooks of the team's jobs; shown once, here."""
    return {"webhook_secret": state.teams.rotate_webhook_secret(user, team_id)}


# members --------------------------------------------------------------------------------------
@router.get("/teams/{team_id}/members", response_model=MemberList, responses=READ)
def list_members(team_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    return {"data": [member_view(m) for m in state.teams.members(user, team_id)]}


@router.patch("/teams/{team_id}/members/{member_id}", response_model=MemberPublic, responses=CHANGE)
def update_member(team_id: str, member_id: str, body: MemberUpdate, user: CurrentUser,
                  state: State) -> dict[str, Any]:
    given = body.model_fields_set
    if "role" in given and body.role is None:
        raise InvalidInput("role must be owner, admin or member", {"field": "role"})
    return member_view(state.teams.update_member(
        user, team_id, member_id, role=body.role, set_role="role" in given,
        monthly_cap=body.monthly_cap, set_cap="monthly_cap" in given))


@router.delete("/teams/{team_id}/members/{member_id}", status_code=204, response_class=Response,
               responses=CHANGE)
def remove_member(team_id: str, member_id: str, user: CurrentUser, state: State) -> Response:
    """Remove a member, or leave (your own id). Their running jobs finish, charged to the team."""
    state.teams.remove_member(user, team_id, member_id)
    return Response(status_code=204)


# invitations ----------------------------------------------------------------------------------
@router.post("/teams/{team_id}/invitations", status_code=201, response_model=InvitationCreated,
             responses=CHANGE)
def create_invitation(team_id: str, body: InvitationCreate, user: CurrentUser, state: State) -> dict[str, Any]:
    """The token is in this answer only: the app sends it to the address (no mail goes out from here)."""
    return invitation_created_view(state.teams.invite(user, team_id, body.email, body.role))


@router.get("/teams/{team_id}/invitations", response_model=InvitationList, responses=READ)
def list_invitations(team_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    return {"data": [invitation_view(i) for i in state.teams.invitations(user, team_id)]}


@router.delete("/teams/{team_id}/invitations/{invitation_id}", response_model=InvitationPublic,
               responses=CHANGE)
def revoke_invitation(team_id: str, invitation_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    return invitation_view(state.teams.revoke_invitation(user, team_id, invitation_id))


@router.post("/invitations/{token}/accept", response_model=TeamPublic,
             responses=error_responses(401, 403, 404, 409, 410, 422))
def accept_invitation(token: str, user: CurrentUser, state: State) -> dict[str, Any]:
    """Join the team; the signed-in caller's email must be the invited address."""
    return team_view(state.teams.accept(user, token))


# credits and usage ----------------------------------------------------------------------------
@router.get("/teams/{team_id}/credits", response_model=TeamCreditsPublic, responses=READ)
def team_credits(team_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    return credits_view(*state.teams.credits(user, team_id))


@router.get("/teams/{team_id}/credits/transactions", response_model=LedgerList, responses=READ)
def team_transactions(team_id: str, user: CurrentUser, state: State,
                      cursor: int | None = Query(default=None, ge=1, le=2**63 - 1),
                      limit: int = Query(default=50, ge=1, le=200)) -> dict[str, Any]:
    rows = state.teams.transactions(user, team_id, limit + 1, cursor)
    next_cursor = str(rows[limit - 1].id) if len(rows) > limit else None
    return {"data": [ledger_view(e) for e in rows[:limit]], "next_cursor": next_cursor}


@router.get("/teams/{team_id}/usage", response_model=TeamUsagePublic, responses=READ)
def team_usage(team_id: str, user: CurrentUser, state: State,
               period: str | None = Query(default=None, pattern=r"^\d{4}-(0[1-9]|1[0-2])$",
                                          description="YYYY-MM (UTC); default: this month")) -> dict[str, Any]:
    return usage_view(state.teams.usage(user, team_id, period))
