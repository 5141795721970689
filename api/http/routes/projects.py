"""Projects: folders of jobs and pipelines in the caller's account or a team's (see
``api/services/projects.py``). Another account's project, and a deleted one, is ``not_found``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Query, Response

from api.http.deps import CurrentUser, State
from api.http.project_schemas import ProjectCreate, ProjectList, ProjectPublic, ProjectUpdate, project_view
from api.http.schemas import error_responses
from api.services.teams import TEAM_HEADER, one_team

router = APIRouter(prefix="/v1/projects", tags=["projects"])

READ = error_responses(401, 403, 404, 422)


@router.post("", status_code=201, response_model=ProjectPublic, responses=READ)
def create_project(body: ProjectCreate, user: CurrentUser, state: State,
                   x_team: str | None = Header(default=None, alias=TEAM_HEADER, max_length=64)) -> dict[str, Any]:
    view = state.projects.create(user, name=body.name, description=body.description,
                                 team=one_team(body.team, x_team))
    return project_view(view, user.id)


@router.get("", response_model=ProjectList, responses=READ)
def list_projects(user: CurrentUser, state: State,
                  cursor: str | None = Query(default=None, max_length=200),
                  limit: int = Query(default=20, ge=1, le=100),
                  team: str | None = Query(default=None, max_length=64, description="a team's projects"),
                  x_team: str | None = Header(default=None, alias=TEAM_HEADER, max_length=64)) -> dict[str, Any]:
    views, next_cursor = state.projects.list(user, team=one_team(team, x_team), cursor=cursor, limit=limit)
    return {"data": [project_view(v, user.id) for v in views], "next_cursor": next_cursor}


@router.get("/{project_id}", response_model=ProjectPublic, responses=READ)
def get_project(project_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    return project_view(state.projects.get(user, project_id), user.id)


@router.patch("/{project_id}", response_model=ProjectPublic, responses=READ)
def update_project(project_id: str, body: ProjectUpdate, user: CurrentUser, state: State) -> dict[str, Any]:
    view = state.projects.update(user, project_id, name=body.name, description=body.description)
    return project_view(view, user.id)


@router.delete("/{project_id}", status_code=204, responses=READ)
def delete_project(project_id: str, user: CurrentUser, state: State) -> Response:
    state.projects.delete(user, project_id)
    return Response(status_code=204)
