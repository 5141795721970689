"""Projects: folders of work in an account (a person's, or a team's with ``X-CineWeave-Team``).

- Who: the account's owner, or any active member of the team whose account it is
  (:func:`api.services.teams.may_act_on`, the rule jobs use). Anyone else, and any id that names
  nothing or a deleted project, gets ``not_found``.
- Delete is soft (``deleted_at``): jobs keep their ``project_id``, the project is then not found,
  and ``GET /v1/jobs?project=`` of it 404s (``api.services.jobs.check_project``).
- A view counts the project's jobs (top-level ones: a pipeline counts once, not per step).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlmodel import Session

from api.core.errors import InvalidInput, NotFound
from api.db.engine import Database
from api.db.tables import Job, Project, User, utcnow
from api.services.teams import account_for, may_act_on
from api.settings import Settings

logger = logging.getLogger(__name__)

NAME_MAX = 100
DESCRIPTION_MAX = 2000


@dataclass(frozen=True)
class ProjectView:
    project: Project
    jobs: int


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > NAME_MAX:
        raise InvalidInput(f"name is 1–{NAME_MAX} characters (not only spaces)", {"field": "name"})
    return value.strip()


def _description(value: Any) -> str:
    if not isinstance(value, str) or len(value) > DESCRIPTION_MAX:
        raise InvalidInput(f"description is at most {DESCRIPTION_MAX} characters", {"field": "description"})
    return value


def _cursor(project: Project) -> str:
    raw = f"{project.created_at.isoformat()}|{project.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, project_id = raw.split("|", 1)
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None:
            raise ValueError("naive timestamp")
        return created_at, project_id
    except Exception:  # noqa: BLE001 - any garbage is the same client error
        raise InvalidInput("cursor is not valid", {"field": "cursor"}) from None


def _job_counts(session: Session, ids: list[str]) -> dict[str, int]:
    if not ids:
        return {}
    rows = session.execute(select(Job.project_id, func.count()).where(
        Job.project_id.in_(ids), Job.parent_id.is_(None)).group_by(Job.project_id)).all()
    return {pid: int(n) for pid, n in rows}


def _live(session: Session, user: User, project_id: str) -> Project:
    """The project, if it is live and ``user`` may act on its account (else not found)."""
    project = session.get(Project, project_id)
    if project is None or project.deleted_at is not None or not may_act_on(session, user.id, project.account_id):
        raise NotFound(f"project {project_id} not found", {"field": "project"})
    return project


class ProjectService:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    def create(self, user: User, *, name: Any, description: Any = "", team: str | None = None) -> ProjectView:
        name, description = _name(name), _description(description or "")
        with self.db.session() as session:
            account = account_for(session, user, team)
            project = Project(account_id=account.id, name=name, description=description, created_by=user.id)
            session.add(project)
            session.commit()
        logger.info("project %s created in %s", project.id, project.account_id)
        return ProjectView(project, 0)

    def list(self, user: User, *, team: str | None = None, cursor: str | None = None,
             limit: int = 20) -> tuple[list[ProjectView], str | None]:
        """Newest first; ``team``: that team's projects instead of the caller's own."""
        limit = max(1, min(limit, 100))
        with self.db.read() as session:
            account = account_for(session, user, team)
            query = select(Project).where(Project.account_id == account.id, Project.deleted_at.is_(None))
            if cursor:
                created, project_id = _decode(cursor)
                query = query.where(or_(Project.created_at < created,
                                        and_(Project.created_at == created, Project.id < project_id)))
            rows = list(session.execute(query.order_by(Project.created_at.desc(), Project.id.desc())
                                        .limit(limit + 1)).scalars())
            page = rows[:limit]
            counts = _job_counts(session, [p.id for p in page])
        next_cursor = _cursor(page[-1]) if len(rows) > limit else None
        return [ProjectView(p, counts.get(p.id, 0)) for p in page], next_cursor

    def get(self, user: User, project_id: str) -> ProjectView:
        with self.db.read() as session:
            project = _live(session, user, project_id)
            return ProjectView(project, _job_counts(session, [project.id]).get(project.id, 0))

    def update(self, user: User, project_id: str, *, name: Any = None, description: Any = None) -> ProjectView:
        """Only the fields given change."""
        with self.db.session() as session:
            project = _live(session, user, project_id)
            if name is not None:
                project.name = _name(name)
            if description is not None:
                project.description = _description(description)
            project.updated_at = utcnow()
            session.add(project)
            session.commit()
            count = _job_counts(session, [project.id]).get(project.id, 0)
        return ProjectView(project, count)

    def delete(self, user: User, project_id: str) -> None:
        """Soft delete: the jobs keep their ``project_id``; the project is not found from now on."""
        with self.db.session() as session:
            project = _live(session, user, project_id)
            project.deleted_at = project.updated_at = utcnow()
            session.add(project)
            session.commit()
        logger.info("project %s deleted by %s", project_id, user.id)
