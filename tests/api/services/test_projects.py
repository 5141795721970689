"""ProjectService: who may act on a project, job counts (a pipeline once), soft delete."""

from __future__ import annotations

import pytest

from api.core.errors import InvalidInput, NotFound
from api.db.engine import Database
from api.db.tables import Job
from api.services.jobs import check_project
from api.services.projects import ProjectService
from api.services.teams import TeamService
from api.settings import Settings
from tests.fixtures.harness import add_user


def _job(user_id: str, project_id: str | None, parent_id: str | None = None) -> Job:
    return Job(user_id=user_id, submitted_by=user_id, model="tiny-sd", kind="image", task="t2i",
               input={}, status="queued", project_id=project_id, parent_id=parent_id)


def test_counts_top_level_jobs_only(backend_db: Database, backend_settings: Settings) -> None:
    service = ProjectService(backend_db, backend_settings)
    alice = add_user(backend_db, backend_settings).user
    project = service.create(alice, name="p").project
    other = service.create(alice, name="q").project
    with backend_db.session() as session:
        parent = _job(alice.id, project.id)
        parent.kind = "pipeline"
        session.add(parent)
        session.flush()
        session.add_all([_job(alice.id, project.id, parent.id), _job(alice.id, project.id, parent.id),
                         _job(alice.id, project.id), _job(alice.id, None)])
        session.commit()
    assert service.get(alice, project.id).jobs == 2  # the pipeline and one job; steps not counted
    views, _ = service.list(alice)
    assert {v.project.id: v.jobs for v in views} == {project.id: 2, other.id: 0}


def test_team_projects_follow_membership(db: Database, settings: Settings) -> None:
    service, teams = ProjectService(db, settings), TeamService(db, settings)
    alice, carol, bob = (add_user(db, settings).user for _ in range(3))
    team = teams.create(alice, "studio").view.team.id
    teams.accept(carol, teams.invite(alice, team, carol.email, "member").token)
    project = service.create(carol, name="shared", team=team).project
    assert project.account_id == team and project.created_by == carol.id
    assert service.get(alice, project.id).project.name == "shared"
    with pytest.raises(NotFound):
        service.get(bob, project.id)
    with pytest.raises(NotFound):
        service.create(bob, name="x", team=team)
    with db.read() as session:
        check_project(session, team, project.id)  # submissions as the team may name it
        with pytest.raises(NotFound):
            check_project(session, alice.id, project.id)  # not as alice herself


def test_soft_delete(db: Database, settings: Settings) -> None:
    service = ProjectService(db, settings)
    alice = add_user(db, settings).user
    project = service.create(alice, name="p", description="d").project
    service.delete(alice, project.id)
    for call in (lambda: service.get(alice, project.id), lambda: service.update(alice, project.id, name="n"),
                 lambda: service.delete(alice, project.id)):
        with pytest.raises(NotFound):
            call()
    with db.read() as session:
        with pytest.raises(NotFound):
            check_project(session, alice.id, project.id)
    assert service.list(alice)[0] == []


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, None, 5])
def test_bad_names(db: Database, settings: Settings, name: object) -> None:
    alice = add_user(db, settings).user
    with pytest.raises(InvalidInput) as exc:
        ProjectService(db, settings).create(alice, name=name)
    assert exc.value.details["field"] == "name"
