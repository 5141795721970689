"""Teams through the services (no HTTP): the team account, roles, invitations, submitting as the
team, the member's monthly cap (also under concurrency), removal, usage. On SQLite and, when
``CINEWEAVE_TEST_POSTGRES_URL`` is set, on a fresh PostgreSQL database."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from api.core import ledger
from api.core.errors import CineWeaveError, Conflict, Forbidden, InsufficientCredits, InvalidInput, NotFound
from api.core.jobs import JobStatus
from api.db.engine import Database, is_postgres
from api.db.tables import Balance, Job, Team, TeamInvitation, TeamMember, User
from api.services import teams
from api.services.jobs import JobService, Submission
from api.services.settlement import finish_job
from api.services.teams import TeamService
from api.services.users import NewUser
from api.settings import Settings
from tests.fixtures.harness import add_user, balance, get_job, ledger_rows, wait_for

PRICE = 40  # veo-3.1, 4 s at 720p


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # 5 members submit concurrently as one team: its per-account limits would refuse them otherwise
    return settings.model_copy(update={"max_active_jobs": 1000, "rate_limit_per_minute": 1000})


@pytest.fixture
def db(backend_db: Database) -> Database:
    return backend_db


@pytest.fixture
def svc(db: Database, settings: Settings) -> TeamService:
    return TeamService(db, settings)


@pytest.fixture
def person(db: Database, settings: Settings) -> Callable[..., NewUser]:
    def make(credits: int = 0, email: str | None = None) -> NewUser:
        return add_user(db, settings, credits=credits, email=email)
    return make


def video(team: str | None = None, prompt: str = "p") -> Submission:
    return Submission("veo-3.1", {"prompt": prompt, "duration": 4}, team=team)


def fund(db: Database, account_id: str, amount: int) -> None:
    with db.session() as s:
        ledger.credit(s, account_id, amount, f"test-grant:{account_id}:{amount}")
        s.commit()


def join(svc: TeamService, owner: NewUser, team_id: str, user: NewUser, role: str = "member") -> None:
    invitation = svc.invite(owner.user, team_id, user.user.email, role)
    svc.accept(user.user, invitation.token)


def code_of(exc: pytest.ExceptionInfo[CineWeaveError]) -> str:
    return exc.value.code


# the team and its account ------------------------------------------------------------------
def test_create_makes_an_owner_and_a_team_account_without_sign_up_credits(
        svc: TeamService, db: Database, settings: Settings, person: Callable[..., NewUser]) -> None:
    alice = person(credits=100)
    new = svc.create(alice.user, "  Studio  ")
    team_id = new.view.team.id
    assert team_id.startswith("team_") and new.view.role == "owner" and new.view.team.name == "Studio"
    assert new.webhook_secret.startswith("whsec_")
    with db.read() as s:
        account = s.get(User, team_id)
        assert account is not None
        assert (account.kind, account.email, account.plan, account.webhook_secret, account.is_admin) == (
            "team", f"{team_id}@teams.invalid", settings.default_plan, new.webhook_secret, False)
        assert s.get(Balance, team_id) is not None
        members = s.execute(select(TeamMember).where(TeamMember.team_id == team_id)).scalars().all()
    assert [(m.user_id, m.role, m.monthly_cap) for m in members] == [(alice.user.id, "owner", None)]
    assert balance(db, team_id) == ledger.BalanceView(0, 0)
    assert ledger_rows(db, team_id) == []  # no sign-up credits for a team
    assert balance(db, alice.user.id) == ledger.BalanceView(100, 0)  # the creator's own are untouched
    assert [v.team.id for v in svc.list_for(alice.user)] == [team_id]
    with pytest.raises(InvalidInput):
        svc.create(alice.user, "   ")


def test_non_members_get_not_found_everywhere(svc: TeamService, person: Callable[..., NewUser]) -> None:
    alice, mallory = person(), person()
    team_id = svc.create(alice.user, "A").view.team.id
    calls: list[Callable[[], Any]] = [
        lambda: svc.get(mallory.user, team_id),
        lambda: svc.rename(mallory.user, team_id, "x"),
        lambda: svc.delete(mallory.user, team_id),
        lambda: svc.members(mallory.user, team_id),
        lambda: svc.update_member(mallory.user, team_id, alice.user.id, monthly_cap=1, set_cap=True),
        lambda: svc.remove_member(mallory.user, team_id, alice.user.id),
        lambda: svc.invite(mallory.user, team_id, "x@example.com", "member"),
        lambda: svc.invitations(mallory.user, team_id),
        lambda: svc.credits(mallory.user, team_id),
        lambda: svc.transactions(mallory.user, team_id, 10, None),
        lambda: svc.usage(mallory.user, team_id),
        lambda: svc.rotate_webhook_secret(mallory.user, team_id),
    ]
    for call in calls:
        with pytest.raises(NotFound):
            call()
    assert svc.list_for(mallory.user) == []
    with svc.db.read() as s:
        assert not teams.may_act_on(s, mallory.user.id, team_id)
        assert teams.may_act_on(s, alice.user.id, team_id)
        assert teams.may_act_on(s, mallory.user.id, mallory.user.id)
        # an ordinary user's id is not a "team" one acts on, even when named as one
        with pytest.raises(NotFound):
            teams.account_for(s, mallory.user, alice.user.id)


# roles -------------------------------------------------------------------------------------
def test_roles(svc: TeamService, person: Callable[..., NewUser]) -> None:
    owner, admin, member, other = person(), person(), person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, admin, "admin")
    join(svc, owner, team_id, member)
    join(svc, owner, team_id, other)

    # a member reads, and changes nothing
    assert {m.member.user_id for m in svc.members(member.user, team_id)} == {
        owner.user.id, admin.user.id, member.user.id, other.user.id}
    for call in (lambda: svc.rename(member.user, team_id, "x"),
                 lambda: svc.update_member(member.user, team_id, other.user.id, monthly_cap=5, set_cap=True),
                 lambda: svc.remove_member(member.user, team_id, other.user.id),
                 lambda: svc.invite(member.user, team_id, "new@example.com", "member"),
                 lambda: svc.rotate_webhook_secret(member.user, team_id),
                 lambda: svc.delete(member.user, team_id)):
        with pytest.raises(Forbidden):
            call()

    # an admin manages members and admins, never an owner, and makes no owner
    assert svc.update_member(admin.user, team_id, member.user.id, monthly_cap=50, set_cap=True).member.monthly_cap == 50
    assert svc.update_member(admin.user, team_id, other.user.id, role="admin", set_role=True).member.role == "admin"
    for call in (lambda: svc.update_member(admin.user, team_id, owner.user.id, monthly_cap=1, set_cap=True),
                 lambda: svc.update_member(admin.user, team_id, member.user.id, role="owner", set_role=True),
                 lambda: svc.remove_member(admin.user, team_id, owner.user.id),
                 lambda: svc.invite(admin.user, team_id, "boss@example.com", "owner"),
                 lambda: svc.delete(admin.user, team_id)):
        with pytest.raises(Forbidden):
            call()
    svc.remove_member(admin.user, team_id, other.user.id)  # an admin removes an admin
    assert svc.rename(admin.user, team_id, "Renamed").team.name == "Renamed"

    # the last owner can neither leave nor be demoted; with a second owner, both work
    with pytest.raises(Conflict) as left:
        svc.remove_member(owner.user, team_id, owner.user.id)
    assert code_of(left) == "last_owner"
    with pytest.raises(Conflict):
        svc.update_member(owner.user, team_id, owner.user.id, role="member", set_role=True)
    svc.update_member(owner.user, team_id, admin.user.id, role="owner", set_role=True)
    svc.update_member(admin.user, team_id, owner.user.id, role="member", set_role=True)  # owners change owners
    with pytest.raises(Conflict):
        svc.remove_member(admin.user, team_id, admin.user.id)  # now the last owner
    svc.remove_member(member.user, team_id, member.user.id)  # anyone may leave
    assert svc.get(owner.user, team_id).role == "member"
    with pytest.raises(NotFound):
        svc.get(member.user, team_id)
    with pytest.raises(NotFound):
        svc.update_member(admin.user, team_id, member.user.id, monthly_cap=1, set_cap=True)  # removed


def test_delete_team(svc: TeamService, jobs_on: Callable[..., JobService], db: Database,
                     person: Callable[..., NewUser]) -> None:
    owner, member = person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, member)
    pending = svc.invite(owner.user, team_id, "later@example.com", "member")
    fund(db, team_id, PRICE)
    jobs = jobs_on()
    job, _ = jobs.submit(member.user, video(team_id))
    with pytest.raises(Conflict) as busy:
        svc.delete(owner.user, team_id)
    assert code_of(busy) == "team_has_active_jobs"
    jobs.cancel(member.user, job.id)
    svc.delete(owner.user, team_id)
    with db.read() as s:
        assert s.get(User, team_id).disabled  # type: ignore[union-attr]
        assert s.get(TeamInvitation, pending.invitation.id).revoked_at is not None  # type: ignore[union-attr]
    for user in (owner, member):
        with pytest.raises(NotFound):
            svc.get(user.user, team_id)
        with pytest.raises(NotFound):
            jobs.get(user.user, job.id)
        with pytest.raises(NotFound):
            jobs.submit(user.user, video(team_id))
    assert svc.list_for(owner.user) == []


def _pg_lock_waiters(db: Database) -> int:
    """Backends of this database waiting on a lock (PostgreSQL)."""
    with db.engine.connect() as conn:
        return int(conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").scalar_one())


def test_deleting_a_team_waits_for_a_submission_in_flight(
        svc: TeamService, jobs_on: Callable[..., JobService], db: Database, person: Callable[..., NewUser],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A submission holds the team's balance row from its limits check to its commit; deletion
    takes that lock before counting active jobs, so it sees the job and refuses (PostgreSQL: on
    SQLite one writer at a time already serializes the two)."""
    if not is_postgres(db.engine):
        pytest.skip("the race needs concurrent writers (PostgreSQL)")
    owner, member = person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, member)
    fund(db, team_id, PRICE)
    jobs = jobs_on()
    reserving, go = threading.Event(), threading.Event()
    real_reserve = ledger.reserve

    def paused_reserve(session: Any, user_id: str, job_id: str, amount: int) -> ledger.LedgerEntry:
        reserving.set()  # the balance row is locked and the job inserted, not committed yet
        assert go.wait(30), "the test never let the submission go on"
        return real_reserve(session, user_id, job_id, amount)

    monkeypatch.setattr(ledger, "reserve", paused_reserve)
    outcomes: dict[str, Any] = {}

    def run(name: str, fn: Callable[[], Any]) -> threading.Thread:
        def body() -> None:
            try:
                outcomes[name] = fn()
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
                outcomes[name] = exc
        thread = threading.Thread(target=body)
        thread.start()
        return thread

    submitting = run("submit", lambda: jobs.submit(member.user, video(team_id))[0])
    assert reserving.wait(30), "the submission did not reach its reservation"
    deleting = run("delete", lambda: svc.delete(owner.user, team_id))
    # the deletion either waits on the submission's lock (fixed) or is already done (the race)
    wait_for(lambda: not deleting.is_alive() or _pg_lock_waiters(db) >= 1, "the deletion to block or finish")
    go.set()
    for thread in (submitting, deleting):
        thread.join(60)
        assert not thread.is_alive()
    job = outcomes["submit"]
    assert isinstance(job, Job), job
    refused = outcomes["delete"]
    assert isinstance(refused, Conflict) and refused.code == "team_has_active_jobs", refused
    with db.read() as s:
        assert s.get(Team, team_id).deleted_at is None  # type: ignore[union-attr]
    assert get_job(db, job.id).status == "queued"


def test_a_submission_after_the_deletion_took_the_lock_is_not_found(
        svc: TeamService, jobs_on: Callable[..., JobService], db: Database, person: Callable[..., NewUser],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The other order: the deletion counts under the balance lock and commits; a submission that
    passed its first membership look before that reads it again under the lock and is refused."""
    owner, member = person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, member)
    fund(db, team_id, PRICE)
    jobs = jobs_on()
    looked = jobs.account_for

    def look_then_delete(user: User, team: str | None) -> User:
        account = looked(user, team)
        svc.delete(owner.user, team_id)
        return account

    monkeypatch.setattr(jobs, "account_for", look_then_delete)
    with pytest.raises(NotFound):
        jobs.submit(member.user, video(team_id))
    assert balance(db, team_id) == ledger.BalanceView(PRICE, 0)
    with db.read() as s:
        assert s.execute(select(Job).where(Job.user_id == team_id)).first() is None


# invitations -------------------------------------------------------------------------------
def test_invitations(svc: TeamService, db: Database, person: Callable[..., NewUser]) -> None:
    owner = person()
    bob, eve = person(email="Bob@Example.com"), person()
    team_id = svc.create(owner.user, "T").view.team.id
    first = svc.invite(owner.user, team_id, " BOB@example.com ", "admin")
    assert first.token.startswith("cwinv_") and first.invitation.email == "bob@example.com"
    with db.read() as s:
        stored = s.get(TeamInvitation, first.invitation.id)
    assert stored is not None and first.token not in (stored.token_hash, stored.id)  # only its hash is kept

    # a second invitation to the same address replaces the first
    second = svc.invite(owner.user, team_id, "bob@example.com", "member")
    assert {i.id: teams.invitation_status(i) for i in svc.invitations(owner.user, team_id)} == {
        first.invitation.id: "revoked", second.invitation.id: "pending"}
    with pytest.raises(CineWeaveError) as revoked:
        svc.accept(bob.user, first.token)
    assert (revoked.value.status, code_of(revoked)) == (410, "invitation_revoked")

    # another address, or an unknown token: not found, and nothing changes
    for user, token in ((eve, second.token), (bob, "cwinv_nothing")):
        with pytest.raises(NotFound):
            svc.accept(user.user, token)
    assert teams.invitation_status(svc.invitations(owner.user, team_id)[0]) == "pending"

    view = svc.accept(bob.user, second.token)
    assert (view.team.id, view.role) == (team_id, "member")
    with pytest.raises(Conflict) as replay:
        svc.accept(bob.user, second.token)
    assert code_of(replay) == "invitation_used"
    with pytest.raises(Conflict) as member_already:
        svc.invite(owner.user, team_id, "bob@example.com", "member")
    assert code_of(member_already) == "already_member"
    with pytest.raises(Conflict):
        svc.revoke_invitation(owner.user, team_id, second.invitation.id)

    # expired
    late = svc.invite(owner.user, team_id, eve.user.email, "member")
    with db.session() as s:
        s.execute(update(TeamInvitation).where(TeamInvitation.id == late.invitation.id)
                  .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        s.commit()
    with pytest.raises(CineWeaveError) as expired:
        svc.accept(eve.user, late.token)
    assert (expired.value.status, code_of(expired)) == (410, "invitation_expired")
    assert teams.invitation_status(svc.invitations(owner.user, team_id)[0]) == "expired"

    # revoked by an admin; a removed member comes back by a new invitation, with its role and no cap
    again = svc.invite(owner.user, team_id, eve.user.email, "member")
    assert svc.revoke_invitation(owner.user, team_id, again.invitation.id).revoked_at is not None
    with pytest.raises(CineWeaveError):
        svc.accept(eve.user, again.token)
    svc.update_member(owner.user, team_id, bob.user.id, monthly_cap=7, set_cap=True)
    svc.remove_member(owner.user, team_id, bob.user.id)
    back = svc.invite(owner.user, team_id, bob.user.email, "admin")
    assert svc.accept(bob.user, back.token).role == "admin"
    rejoined = next(m for m in svc.members(owner.user, team_id) if m.member.user_id == bob.user.id)
    assert (rejoined.member.role, rejoined.member.monthly_cap) == ("admin", None)
    with pytest.raises(InvalidInput):
        svc.invite(owner.user, team_id, "not-an-email", "member")


def test_an_invitation_is_accepted_once_under_concurrency(svc: TeamService, db: Database,
                                                          person: Callable[..., NewUser]) -> None:
    owner, bob = person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    token = svc.invite(owner.user, team_id, bob.user.email, "member").token
    outcomes = run_together(10, lambda _i: svc.accept(bob.user, token))
    assert Counter(type(o).__name__ for o in outcomes) == {"TeamView": 1, "Conflict": 9}
    with db.read() as s:
        rows = s.execute(select(TeamMember).where(TeamMember.team_id == team_id,
                                                  TeamMember.user_id == bob.user.id)).scalars().all()
    assert len(rows) == 1


# submitting as the team --------------------------------------------------------------------
@pytest.fixture
def jobs_on(db: Database, settings: Settings, catalog: Any, storage: Any, bus: Any) -> Callable[..., JobService]:
    def make(**overrides: Any) -> JobService:
        s = settings.model_copy(update=overrides) if overrides else settings
        return JobService(db, s, catalog, storage, bus)
    return make


def test_a_member_submits_as_the_team(svc: TeamService, jobs_on: Callable[..., JobService], db: Database,
                                      person: Callable[..., NewUser]) -> None:
    owner, member, outsider = person(credits=100), person(credits=100), person(credits=100)
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, member)
    fund(db, team_id, 2 * PRICE)
    jobs = jobs_on()
    job, created = jobs.submit(member.user, video(team_id))
    assert created and (job.user_id, job.submitted_by) == (team_id, member.user.id)
    assert balance(db, team_id) == ledger.BalanceView(PRICE, PRICE)
    assert balance(db, member.user.id) == ledger.BalanceView(100, 0)  # the member's own credits: untouched
    own, _ = jobs.submit(member.user, video())
    assert (own.user_id, own.submitted_by) == (member.user.id, None)

    # every member sees and may cancel the team's jobs; the team's list is theirs with team=
    assert jobs.get(owner.user, job.id).id == job.id
    assert [j.id for j in jobs.list(owner.user, team=team_id)[0]] == [job.id]
    assert [j.id for j in jobs.list(member.user)[0]] == [own.id]  # without team=: their own account
    assert jobs.cancel(owner.user, job.id).status == "canceled"
    assert balance(db, team_id) == ledger.BalanceView(2 * PRICE, 0)

    # an outsider neither submits as, sees, nor cancels
    for call in (lambda: jobs.submit(outsider.user, video(team_id)), lambda: jobs.get(outsider.user, job.id),
                 lambda: jobs.cancel(outsider.user, job.id), lambda: jobs.list(outsider.user, team=team_id),
                 lambda: jobs.delete_outputs(outsider.user, job.id)):
        with pytest.raises(NotFound):
            call()
    # the team's balance is the limit, not the member's
    jobs.submit(member.user, video(team_id))
    jobs.submit(member.user, video(team_id))
    with pytest.raises(InsufficientCredits) as short:
        jobs.submit(member.user, video(team_id))
    assert code_of(short) == "insufficient_credits"  # type: ignore[arg-type]


def test_deleting_a_team_jobs_outputs_is_for_its_submitter_and_the_managers(
        svc: TeamService, jobs_on: Callable[..., JobService], db: Database, person: Callable[..., NewUser]) -> None:
    owner, admin, submitter, member, outsider = (person() for _ in range(5))
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, admin, "admin")
    join(svc, owner, team_id, submitter)
    join(svc, owner, team_id, member)
    fund(db, team_id, 10 * PRICE)
    jobs = jobs_on()

    def finished(by: NewUser) -> Job:
        job, _ = jobs.submit(by.user, video(team_id))
        return jobs.cancel(by.user, job.id)

    theirs, for_admin, for_owner, own = finished(submitter), finished(submitter), finished(submitter), finished(member)
    # another plain member sees the job but may not delete its outputs; an outsider does not see it
    assert jobs.get(member.user, theirs.id).id == theirs.id
    with pytest.raises(Forbidden) as refused:
        jobs.delete_outputs(member.user, theirs.id)
    assert (refused.value.status, code_of(refused)) == (403, "forbidden")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        jobs.delete_outputs(outsider.user, theirs.id)
    assert get_job(db, theirs.id).outputs_deleted_at is None
    # the submitter, the team's admins and owners may; a member deletes their own team job's
    assert jobs.delete_outputs(submitter.user, theirs.id).outputs_deleted_at is not None
    assert jobs.delete_outputs(admin.user, for_admin.id).outputs_deleted_at is not None
    assert jobs.delete_outputs(owner.user, for_owner.id).outputs_deleted_at is not None
    assert jobs.delete_outputs(member.user, own.id).outputs_deleted_at is not None
    # demoted to member, the admin may no longer delete others' job outputs
    svc.update_member(owner.user, team_id, admin.user.id, role="member", set_role=True)
    with pytest.raises(Forbidden):
        jobs.delete_outputs(admin.user, for_owner.id)


def test_the_teams_plan_and_limits_apply(svc: TeamService, jobs_on: Callable[..., JobService], db: Database,
                                        person: Callable[..., NewUser]) -> None:
    owner = person()
    team_id = svc.create(owner.user, "T").view.team.id
    fund(db, team_id, 10 * PRICE)
    jobs = jobs_on(max_active_jobs=2)
    for _ in range(2):
        jobs.submit(owner.user, video(team_id))
    with pytest.raises(CineWeaveError) as limited:
        jobs.submit(owner.user, video(team_id))
    assert code_of(limited) == "concurrency_limit"
    with db.session() as s:
        s.execute(update(User).where(User.id == team_id).values(plan="studio"))  # studio: 6 active
        s.commit()
    job, _ = jobs.submit(owner.user, video(team_id))
    assert job.priority == jobs.settings.plan_priority["studio"]


def test_member_cap(svc: TeamService, jobs_on: Callable[..., JobService], db: Database,
                    person: Callable[..., NewUser]) -> None:
    owner, member = person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, member)
    fund(db, team_id, 10 * PRICE)
    svc.update_member(owner.user, team_id, member.user.id, monthly_cap=2 * PRICE + PRICE // 2, set_cap=True)
    jobs = jobs_on()
    first, _ = jobs.submit(member.user, video(team_id))
    jobs.submit(member.user, video(team_id))
    with pytest.raises(InsufficientCredits) as capped:
        jobs.submit(member.user, video(team_id))
    assert (capped.value.status, code_of(capped)) == (402, "member_cap_exceeded")  # type: ignore[arg-type]
    assert capped.value.details["monthly_cap"] == 2 * PRICE + PRICE // 2
    assert capped.value.details["spent"] == 2 * PRICE
    # a refund gives the cap back; last month's spending does not count
    jobs.cancel(member.user, first.id)
    third, _ = jobs.submit(member.user, video(team_id))
    with db.session() as s:
        s.execute(update(Job).where(Job.id == third.id).values(
            created_at=teams.month_start() - timedelta(seconds=1)))
        s.commit()
    jobs.submit(member.user, video(team_id))
    assert next(m for m in svc.members(owner.user, team_id)
                if m.member.user_id == member.user.id).spent_this_month == 2 * PRICE
    # the cap is the member's: the owner has none; lifting it lets the member go on
    jobs.submit(owner.user, video(team_id))
    svc.update_member(owner.user, team_id, member.user.id, monthly_cap=None, set_cap=True)
    jobs.submit(member.user, video(team_id))


def run_together(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads released at once; each result or raised error, in order."""
    barrier = threading.Barrier(n, timeout=30)
    results: list[Any] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test counts
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a submission did not finish within 60 s"
    return results


def test_member_cap_under_concurrency(svc: TeamService, jobs_on: Callable[..., JobService], db: Database,
                                      person: Callable[..., NewUser]) -> None:
    owner, member = person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, member)
    fund(db, team_id, 100 * PRICE)
    svc.update_member(owner.user, team_id, member.user.id, monthly_cap=5 * PRICE, set_cap=True)
    jobs = jobs_on()
    outcomes = run_together(30, lambda _i: jobs.submit(member.user, video(team_id))[0])
    kinds = Counter(o.code if isinstance(o, CineWeaveError) else type(o).__name__ for o in outcomes)
    assert kinds == {"Job": 5, "member_cap_exceeded": 25}, kinds
    assert balance(db, team_id) == ledger.BalanceView(95 * PRICE, 5 * PRICE)
    with db.read() as s:
        assert teams.member_spent(s, team_id, member.user.id, teams.month_start()) == 5 * PRICE


def test_a_removed_member_cannot_submit_and_their_job_stays_the_teams(
        svc: TeamService, jobs_on: Callable[..., JobService], db: Database, person: Callable[..., NewUser]) -> None:
    owner, member = person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, member)
    fund(db, team_id, 3 * PRICE)
    jobs = jobs_on()
    job, _ = jobs.submit(member.user, video(team_id))
    svc.remove_member(owner.user, team_id, member.user.id)
    with pytest.raises(NotFound):
        jobs.submit(member.user, video(team_id))
    with pytest.raises(NotFound):
        jobs.get(member.user, job.id)
    assert get_job(db, job.id).status == "queued"  # it runs on, on the team's credits
    assert jobs.get(owner.user, job.id).submitted_by == member.user.id
    assert balance(db, team_id) == ledger.BalanceView(2 * PRICE, PRICE)


def test_removal_racing_a_submission_is_checked_under_the_lock(
        svc: TeamService, jobs_on: Callable[..., JobService], db: Database, person: Callable[..., NewUser],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The membership is read again inside the submitting transaction: a removal committed after
    the first look (outside it) still refuses the job, and nothing is reserved."""
    owner, member = person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, member)
    fund(db, team_id, PRICE)
    jobs = jobs_on()
    looked = jobs.account_for

    def look_then_remove(user: User, team: str | None) -> User:
        account = looked(user, team)
        svc.remove_member(owner.user, team_id, member.user.id)
        return account

    monkeypatch.setattr(jobs, "account_for", look_then_remove)
    with pytest.raises(NotFound):
        jobs.submit(member.user, video(team_id))
    assert balance(db, team_id) == ledger.BalanceView(PRICE, 0)


def test_team_jobs_use_the_members_own_uploads(svc: TeamService, jobs_on: Callable[..., JobService],
                                               db: Database, person: Callable[..., NewUser]) -> None:
    from api.db.tables import Upload
    from api.services.inputs import _owners

    owner, member = person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, member)
    fund(db, team_id, 100)
    with db.session() as s:
        mine = Upload(user_id=member.user.id, key="uploads/x.png", content_type="image/png", size=1)
        theirs = Upload(user_id=owner.user.id, key="uploads/y.png", content_type="image/png", size=1)
        s.add_all([mine, theirs])
        s.commit()
    jobs = jobs_on()
    job, _ = jobs.submit(member.user, Submission("tiny-sd", {"prompt": "p", "image": mine.id}, team=team_id))
    assert _owners(get_job(db, job.id)) == (team_id, member.user.id)
    with pytest.raises(InvalidInput):  # another member's upload is not theirs to use
        jobs.submit(member.user, Submission("tiny-sd", {"prompt": "p", "image": theirs.id}, team=team_id))


def test_usage_per_member(svc: TeamService, jobs_on: Callable[..., JobService], db: Database,
                          person: Callable[..., NewUser]) -> None:
    owner, member = person(), person()
    team_id = svc.create(owner.user, "T").view.team.id
    join(svc, owner, team_id, member)
    fund(db, team_id, 10 * PRICE)
    jobs = jobs_on()
    a, _ = jobs.submit(member.user, video(team_id))
    b, _ = jobs.submit(member.user, video(team_id))
    c, _ = jobs.submit(owner.user, video(team_id))
    jobs.cancel(member.user, b.id)
    with db.session() as s:  # a succeeded job, settled as the runner does
        row = s.get(Job, c.id)
        assert row is not None
        row.status = "running"
        finish_job(s, jobs.storage, row, JobStatus.SUCCEEDED, None)
        s.commit()
    usage = svc.usage(member.user, team_id)
    assert usage.period == datetime.now(UTC).strftime("%Y-%m")
    by = {m.user_id: m.usage for m in usage.members}
    assert (by[member.user.id].jobs, by[member.user.id].by_status) == (2, {"queued": 1, "canceled": 1})
    assert (by[member.user.id].reserved, by[member.user.id].charged, by[member.user.id].refunded) == (PRICE, 0, PRICE)
    assert (by[owner.user.id].jobs, by[owner.user.id].charged, by[owner.user.id].spent) == (1, PRICE, PRICE)
    assert (usage.total.jobs, usage.total.spent) == (3, 2 * PRICE)
    assert svc.usage(owner.user, team_id, "2001-01").total.jobs == 0
    assert a.id  # the queued one is what "reserved" holds
    with pytest.raises(InvalidInput):
        svc.usage(owner.user, team_id, "2001-13")
    assert {e.kind for e in svc.transactions(member.user, team_id, 50, None)} == {
        "grant", "reserve", "refund", "capture"}
    account, bal = svc.credits(member.user, team_id)
    assert (account.plan, bal.available, bal.reserved) == ("free", 10 * PRICE - 2 * PRICE, PRICE)


def test_team_row_is_the_account(db: Database, svc: TeamService, person: Callable[..., NewUser]) -> None:
    owner = person()
    team_id = svc.create(owner.user, "T").view.team.id
    with db.read() as s:
        team = s.get(Team, team_id)
    assert team is not None and team.created_by == owner.user.id
    assert teams.one_team(None, "  ") is None and teams.one_team(team_id, team_id) == team_id
    with pytest.raises(InvalidInput):
        teams.one_team(team_id, "team_other")
