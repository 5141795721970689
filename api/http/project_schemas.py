"""Request bodies and answers of the project routes (``api/http/routes/projects.py``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.http.schemas import Public, iso
from api.services.projects import DESCRIPTION_MAX, NAME_MAX, ProjectView


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=NAME_MAX)
    description: str = Field(default="", max_length=DESCRIPTION_MAX)
    team: str | None = Field(default=None, max_length=64, description="create it in this team (like X-CineWeave-Team)")


class ProjectUpdate(BaseModel):
    """Only the fields sent change."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=NAME_MAX)
    description: str | None = Field(default=None, max_length=DESCRIPTION_MAX)


class ProjectPublic(Public):
    id: str
    name: str
    description: str
    account_id: str = Field(description="the account it belongs to: the caller's, or a team's")
    team: str | None = Field(default=None, description="the team's id when it belongs to a team")
    created_by: str | None = None
    jobs: int = Field(description="jobs filed under it (a pipeline counts once)")
    created_at: str | None = None
    updated_at: str | None = None


class ProjectList(Public):
    data: list[ProjectPublic]
    next_cursor: str | None = None


def project_view(view: ProjectView, owner_id: str) -> dict[str, Any]:
    """``owner_id``: the caller's id (a project in another account is a team's)."""
    p = view.project
    return {"id": p.id, "name": p.name, "description": p.description, "account_id": p.account_id,
            "team": None if p.account_id == owner_id else p.account_id, "created_by": p.created_by,
            "jobs": view.jobs, "created_at": iso(p.created_at), "updated_at": iso(p.updated_at)}
