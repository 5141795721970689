"""Teams: a shared account (balance, plan, ledger) that members spend "as the team".

A team's account is a ``User`` row of kind ``team`` whose id is the team's id: its balance,
plan, plan grants, purchases and ledger entries are keyed by that id like any user's, and a job
submitted as the team has ``user_id`` = the team and ``submitted_by`` = the member.

The rules, all here:

- :func:`may_act_on` is the one rule for which accounts a user acts on (submit as, read, cancel):
  their own, and every live team they are an active member of. Jobs use it too.
- Anyone who is not an active member (never was, removed, or the team was deleted) gets
  ``not_found`` for every team resource, exactly as for an id that names nothing.
- Every member reads everything about the team (members, invitations, credits, ledger, usage).
  Deleting a team job's outputs is for the member who submitted it and the team's owners and
  admins (:func:`check_may_delete_outputs`).
  Owners and admins change it (name, members' roles and monthly caps, invitations, removals, the
  webhook secret). Only owners delete the team, make someone an owner or touch an owner; a team
  always keeps at least one owner (the last one can neither leave nor be demoted).
- A member's ``monthly_cap`` bounds what they spend from the team per calendar month (UTC): the
  credits reserved by their jobs on the team this month minus what was refunded, plus the new
  job's price. It is checked inside the submitting transaction, after the team's balance row is
  locked (``JobService.admit``), so concurrent submissions cannot overshoot it.
- Invitations carry a token shown once (only its SHA-256 is stored), for one email address;
  a signed-in user whose email matches accepts it once, before it expires.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select, update
from sqlmodel import Session

from api.core import ledger
from api.core.errors import CineWeaveError, Conflict, Forbidden, InsufficientCredits, InvalidInput, NotFound
from api.core.jobs import ACTIVE
from api.db.engine import Database, is_postgres
from api.db.tables import Balance, Job, LedgerEntry, Team, TeamInvitation, TeamMember, User, new_id, utcnow
from api.services.users import hash_key, new_webhook_secret
from api.settings import Settings

logger = logging.getLogger(__name__)

# the header that submits (or lists) "as the team" on every API shape; native bodies may say "team"
TEAM_HEADER = "X-CineWeave-Team"
TEAM_EMAIL_DOMAIN = "teams.invalid"  # a team account's synthetic, never-deliverable email
INVITATION_PREFIX = "cwinv_"


class Role(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"


MANAGERS = frozenset({Role.OWNER.value, Role.ADMIN.value})


class InvitationGone(CineWeaveError):
    """An invitation that expired or was revoked (``invitation_expired`` / ``invitation_revoked``)."""

    code, status = "invitation_expired", 410


@dataclass(frozen=True)
class TeamView:
    team: Team
    account: User
    role: str  # the caller's role


@dataclass(frozen=True)
class NewTeam:
    view: TeamView
    webhook_secret: str


@dataclass(frozen=True)
class MemberView:
    member: TeamMember
    email: str
    spent_this_month: int


@dataclass(frozen=True)
class NewInvitation:
    invitation: TeamInvitation
    token: str


@dataclass
class UsageRow:
    """One member's (or the team's total) jobs and credits in a period."""

    jobs: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    reserved: int = 0  # held now by the period's active jobs
    charged: int = 0
    refunded: int = 0

    @property
    def spent(self) -> int:
        """What counts against a monthly cap: reserved or charged, less refunds."""
        return self.reserved + self.charged


@dataclass(frozen=True)
class MemberUsage:
    user_id: str
    email: str | None
    role: str | None
    active: bool
    monthly_cap: int | None
    usage: UsageRow


@dataclass(frozen=True)
class TeamUsage:
    team_id: str
    period: str
    start: datetime
    end: datetime
    total: UsageRow
    members: list[MemberUsage]


def invitation_status(inv: TeamInvitation, now: datetime | None = None) -> str:
    if inv.accepted_at is not None:
        return "accepted"
    if inv.revoked_at is not None:
        return "revoked"
    if inv.expires_at <= (now or utcnow()):
        return "expired"
    return "pending"


# the one rule ---------------------------------------------------------------------------------
def membership(session: Session, user_id: str, team_id: str) -> TeamMember | None:
    """``user_id``'s active membership of the live team ``team_id``, or None."""
    return session.execute(
        select(TeamMember).join(Team, Team.id == TeamMember.team_id)
        .where(TeamMember.team_id == team_id, TeamMember.user_id == user_id,
               TeamMember.removed_at.is_(None), Team.deleted_at.is_(None))).scalars().first()


def may_act_on(session: Session, user_id: str, account_id: str) -> bool:
    """Which accounts a user acts on (submits as, reads and cancels the jobs of): their own, and
    each live team they are an active member of. The one place this rule lives."""
    return account_id == user_id or membership(session, user_id, account_id) is not None


def check_may_delete_outputs(session: Session, user_id: str, job: Job) -> None:
    """Deleting a job's outputs destroys another member's work, so on a team it is narrower than
    :func:`may_act_on`: the member who submitted the job and the team's owners and admins.
    Another member (who sees the job) is ``forbidden``; call after :func:`may_act_on` held."""
    if job.user_id == user_id or job.submitted_by == user_id:
        return
    member = membership(session, user_id, job.user_id)
    if member is None or member.role not in MANAGERS:
        raise Forbidden("only the member who submitted a team job and the team's owners and admins "
                        "may delete its outputs", {"role": member.role if member else None,
                                                   "required": sorted(MANAGERS)})


def account_for(session: Session, user: User, team_id: str | None) -> User:
    """The account ``user`` acts on: themselves (``team_id`` None) or the team, if they may."""
    if team_id is None or team_id == user.id:
        return user
    account = session.get(User, team_id)
    if account is None or account.kind != "team" or not may_act_on(session, user.id, team_id):
        raise NotFound(f"team {team_id} not found", {"team": team_id})
    return account


def one_team(*named: str | None) -> str | None:
    """The team a request names (body field, query, ``X-CineWeave-Team``); saying two is refused."""
    given = {t.strip() for t in named if t is not None and t.strip()}
    if len(given) > 1:
        raise InvalidInput(f"the request names two teams ({', '.join(sorted(given))}): name one",
                           {"field": "team"})
    return given.pop() if given else None


# caps -----------------------------------------------------------------------------------------
def month_start(now: datetime | None = None) -> datetime:
    now = now or utcnow()
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def next_month(start: datetime) -> datetime:
    return datetime(start.year + (start.month == 12), start.month % 12 + 1, 1, tzinfo=UTC)


def member_spent(session: Session, team_id: str, user_id: str, since: datetime) -> int:
    """Credits reserved or charged, less refunds, by ``user_id``'s jobs on the team since ``since``."""
    total = session.execute(select(func.coalesce(func.sum(Job.credits_reserved - Job.credits_refunded), 0))
                            .where(Job.user_id == team_id, Job.submitted_by == user_id,
                                   Job.created_at >= since,
                                   Job.parent_id.is_(None))).scalar_one()  # a pipeline once: its sums
    return int(total or 0)


def check_member_cap(session: Session, team_id: str, user_id: str, price: int) -> None:
    """In the submitting transaction, with the team's balance row locked: the member is still an
    active member (removal races the submission) and ``price`` fits their monthly cap."""
    member = membership(session, user_id, team_id)
    if member is None:
        raise NotFound(f"team {team_id} not found", {"team": team_id})
    if member.monthly_cap is None:
        return
    start = month_start()
    spent = member_spent(session, team_id, user_id, start)
    if spent + price > member.monthly_cap:
        raise InsufficientCredits(
            f"this job costs {price} credits; your monthly cap on this team is {member.monthly_cap} "
            f"and {spent} are spent", {"required": price, "monthly_cap": member.monthly_cap, "spent": spent,
                                       "period": start.strftime("%Y-%m"), "team": team_id},
            code="member_cap_exceeded")


# the service ----------------------------------------------------------------------------------
def _lock_team(session: Session, team_id: str) -> None:
    """Serialize membership changes of one team (PostgreSQL; SQLite holds the write lock)."""
    if is_postgres(session.get_bind()):
        session.execute(select(Team.id).where(Team.id == team_id).with_for_update())


def _normalize_email(email: str) -> str:
    email = email.strip().lower()
    if "@" not in email or len(email) > 254 or email.startswith("@") or email.endswith("@"):
        raise InvalidInput("email is not valid", {"field": "email"})
    return email


class TeamService:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings

    # lookups ----------------------------------------------------------------------------------
    @staticmethod
    def _member(session: Session, user: User, team_id: str, *, manage: bool = False,
                lock: bool = False) -> tuple[Team, User, TeamMember]:
        """The team, its account and the caller's membership; ``not_found`` for a non-member,
        ``forbidden`` for a member who is no owner or admin when ``manage``."""
        if lock:
            _lock_team(session, team_id)
        member = membership(session, user.id, team_id)
        team = session.get(Team, team_id) if member is not None else None
        account = session.get(User, team_id) if team is not None else None
        if member is None or team is None or account is None:
            raise NotFound(f"team {team_id} not found")
        if manage and member.role not in MANAGERS:
            raise Forbidden("only the team's owners and admins may do this",
                            {"role": member.role, "required": sorted(MANAGERS)})
        return team, account, member

    # teams ------------------------------------------------------------------------------------
    def create(self, user: User, name: str) -> NewTeam:
        """A team with ``user`` as its owner and a fresh account on the default plan.

        No sign-up credits: they are a person's welcome gift, and a team granting them would
        let anyone mint credits by creating teams. A team's credits come from purchases, grants
        and its plan's monthly grant.
        """
        name = name.strip()
        if not name:
            raise InvalidInput("name must not be blank", {"field": "name"})
        if user.kind != "person":
            raise Forbidden("only a person can create a team")
        team_id = new_id("team")
        secret = new_webhook_secret()
        account = User(id=team_id, email=f"{team_id}@{TEAM_EMAIL_DOMAIN}", plan=self.settings.default_plan,
                       webhook_secret=secret, kind="team")
        with self.db.session() as session:
            session.add(account)
            session.flush()
            ledger.ensure_balance(session, team_id)
            team = Team(id=team_id, name=name, created_by=user.id)
            session.add(team)
            session.flush()
            session.add(TeamMember(team_id=team_id, user_id=user.id, role=Role.OWNER.value))
            session.commit()
        logger.info("team %s created by %s", team_id, user.id)
        return NewTeam(TeamView(team, account, Role.OWNER.value), secret)

    def list_for(self, user: User) -> list[TeamView]:
        with self.db.read() as session:
            rows = session.execute(
                select(Team, User, TeamMember.role).join(TeamMember, TeamMember.team_id == Team.id)
                .join(User, User.id == Team.id)
                .where(TeamMember.user_id == user.id, TeamMember.removed_at.is_(None), Team.deleted_at.is_(None))
                .order_by(Team.created_at, Team.id)).all()
        return [TeamView(team, account, role) for team, account, role in rows]

    def get(self, user: User, team_id: str) -> TeamView:
        with self.db.read() as session:
            team, account, member = self._member(session, user, team_id)
        return TeamView(team, account, member.role)

    def rename(self, user: User, team_id: str, name: str | None) -> TeamView:
        with self.db.session() as session:
            team, account, member = self._member(session, user, team_id, manage=True, lock=True)
            if name is not None:
                if not name.strip():
                    raise InvalidInput("name must not be blank", {"field": "name"})
                team.name = name.strip()
                session.add(team)
            session.commit()
        return TeamView(team, account, member.role)

    def delete(self, user: User, team_id: str) -> None:
        """Owners only; refused while the team has active jobs. The team's account is disabled
        (no grants, no submissions); its ledger and jobs stay for the record."""
        with self.db.session() as session:
            team, account, member = self._member(session, user, team_id, lock=True)
            if member.role != Role.OWNER:
                raise Forbidden("only the team's owners may delete it", {"role": member.role})
            # the balance row lock every submission takes first (JobService.admit): a submission
            # either committed its job before this count, or waits and then finds the team deleted
            ledger.lock_balance(session, team_id)
            active = session.execute(select(func.count()).select_from(Job).where(
                Job.user_id == team_id, Job.status.in_([s.value for s in ACTIVE]))).scalar_one()
            if active:
                raise Conflict(f"the team has {active} active jobs: cancel them or let them finish first",
                               {"active": int(active)}, code="team_has_active_jobs")
            now = utcnow()
            team.deleted_at = now
            account.disabled = True
            session.add_all([team, account])
            session.execute(update(TeamInvitation).where(
                TeamInvitation.team_id == team_id, TeamInvitation.accepted_at.is_(None),
                TeamInvitation.revoked_at.is_(None)).values(revoked_at=now))
            session.commit()
        logger.info("team %s deleted by %s", team_id, user.id)

    def rotate_webhook_secret(self, user: User, team_id: str) -> str:
        """The secret the team's job webhooks are signed with (they are the team account's)."""
        with self.db.session() as session:
            _team, account, _member = self._member(session, user, team_id, manage=True)
            account.webhook_secret = new_webhook_secret()
            session.add(account)
            session.commit()
            return account.webhook_secret

    # members ----------------------------------------------------------------------------------
    def members(self, user: User, team_id: str) -> list[MemberView]:
        with self.db.read() as session:
            self._member(session, user, team_id)
            rows = session.execute(
                select(TeamMember, User.email).join(User, User.id == TeamMember.user_id)
                .where(TeamMember.team_id == team_id, TeamMember.removed_at.is_(None))
                .order_by(TeamMember.joined_at, TeamMember.id)).all()
            spent = dict(session.execute(
                select(Job.submitted_by, func.sum(Job.credits_reserved - Job.credits_refunded))
                .where(Job.user_id == team_id, Job.created_at >= month_start(), Job.parent_id.is_(None))
                .group_by(Job.submitted_by)).all())
        return [MemberView(m, email, int(spent.get(m.user_id) or 0)) for m, email in rows]

    def update_member(self, user: User, team_id: str, member_id: str, *, role: str | None = None,
                      set_role: bool = False, monthly_cap: int | None = None,
                      set_cap: bool = False) -> MemberView:
        """Change a member's role and/or monthly cap (``set_*`` say which were given; a cap of
        None lifts it)."""
        if set_role and role not in {r.value for r in Role}:
            raise InvalidInput(f"unknown role {role!r}", {"field": "role", "roles": [r.value for r in Role]})
        if set_cap and monthly_cap is not None and monthly_cap < 0:
            raise InvalidInput("monthly_cap must not be negative", {"field": "monthly_cap"})
        with self.db.session() as session:
            _team, _account, caller = self._member(session, user, team_id, manage=True, lock=True)
            target = membership(session, member_id, team_id)
            if target is None:
                raise NotFound(f"member {member_id} not found")
            touches_owner = target.role == Role.OWNER or (set_role and role == Role.OWNER)
            if touches_owner and caller.role != Role.OWNER:
                raise Forbidden("only an owner may change an owner or make one", {"role": caller.role})
            if set_role and target.role == Role.OWNER and role != Role.OWNER:
                self._keep_an_owner(session, team_id)
            if set_role:
                assert role is not None
                target.role = role
            if set_cap:
                target.monthly_cap = monthly_cap
            session.add(target)
            session.commit()
            email = session.get(User, member_id).email  # type: ignore[union-attr]
            spent = member_spent(session, team_id, member_id, month_start())
        logger.info("team %s: %s set member %s to role=%s cap=%s", team_id, user.id, member_id,
                    target.role, target.monthly_cap)
        return MemberView(target, email, spent)

    @staticmethod
    def _keep_an_owner(session: Session, team_id: str) -> None:
        owners = session.execute(select(func.count()).select_from(TeamMember).where(
            TeamMember.team_id == team_id, TeamMember.role == Role.OWNER.value,
            TeamMember.removed_at.is_(None))).scalar_one()
        if owners <= 1:
            raise Conflict("a team keeps at least one owner: make another member an owner first",
                           code="last_owner")

    def remove_member(self, user: User, team_id: str, member_id: str) -> None:
        """Remove a member (or leave, when ``member_id`` is the caller). Their jobs in flight run
        on and are settled on the team; they can no longer submit as it or see it."""
        with self.db.session() as session:
            _team, _account, caller = self._member(session, user, team_id, lock=True)
            target = caller if member_id == user.id else membership(session, member_id, team_id)
            if target is None:
                raise NotFound(f"member {member_id} not found")
            if target is not caller:
                if caller.role not in MANAGERS:
                    raise Forbidden("only the team's owners and admins may remove members",
                                    {"role": caller.role})
                if target.role == Role.OWNER and caller.role != Role.OWNER:
                    raise Forbidden("only an owner may remove an owner", {"role": caller.role})
            if target.role == Role.OWNER:
                self._keep_an_owner(session, team_id)
            target.removed_at = utcnow()
            session.add(target)
            session.commit()
        logger.info("team %s: member %s removed by %s", team_id, member_id, user.id)

    # invitations ------------------------------------------------------------------------------
    def invite(self, user: User, team_id: str, email: str, role: str) -> NewInvitation:
        """An invitation for ``email``; the token is returned once (the app mails it). A pending
        invitation to the same address is replaced."""
        email = _normalize_email(email)
        if role not in {r.value for r in Role}:
            raise InvalidInput(f"unknown role {role!r}", {"field": "role", "roles": [r.value for r in Role]})
        with self.db.session() as session:
            _team, _account, caller = self._member(session, user, team_id, manage=True, lock=True)
            if role == Role.OWNER and caller.role != Role.OWNER:
                raise Forbidden("only an owner may invite an owner", {"role": caller.role})
            already = session.execute(
                select(TeamMember.id).join(User, User.id == TeamMember.user_id)
                .where(TeamMember.team_id == team_id, TeamMember.removed_at.is_(None),
                       User.email == email)).first()
            if already is not None:
                raise Conflict(f"{email} is already a member of the team", {"field": "email"},
                               code="already_member")
            now = utcnow()
            session.execute(update(TeamInvitation).where(
                TeamInvitation.team_id == team_id, TeamInvitation.email == email,
                TeamInvitation.accepted_at.is_(None), TeamInvitation.revoked_at.is_(None)).values(revoked_at=now))
            token = INVITATION_PREFIX + secrets.token_urlsafe(32)
            invitation = TeamInvitation(team_id=team_id, email=email, role=role, token_hash=hash_key(token),
                                        invited_by=user.id, created_at=now,
                                        expires_at=now + timedelta(seconds=self.settings.team_invitation_ttl_s))
            session.add(invitation)
            session.commit()
        logger.info("team %s: %s invited %s as %s", team_id, user.id, invitation.id, role)
        return NewInvitation(invitation, token)

    def invitations(self, user: User, team_id: str, limit: int = 100) -> list[TeamInvitation]:
        with self.db.read() as session:
            self._member(session, user, team_id)
            return list(session.execute(select(TeamInvitation).where(TeamInvitation.team_id == team_id)
                                        .order_by(TeamInvitation.created_at.desc()).limit(limit)).scalars())

    def revoke_invitation(self, user: User, team_id: str, invitation_id: str) -> TeamInvitation:
        with self.db.session() as session:
            self._member(session, user, team_id, manage=True, lock=True)
            invitation = session.get(TeamInvitation, invitation_id)
            if invitation is None or invitation.team_id != team_id:
                raise NotFound(f"invitation {invitation_id} not found")
            if invitation.accepted_at is not None:
                raise Conflict("the invitation was already accepted: remove the member instead",
                               code="invitation_used")
            if invitation.revoked_at is None:
                invitation.revoked_at = utcnow()
                session.add(invitation)
            session.commit()
            return invitation

    def accept(self, user: User, token: str) -> TeamView:
        """Join the team as the invitation says, once. An unknown token and another address's
        invitation are both ``not_found`` (a token says nothing to whoever holds the wrong one)."""
        now = utcnow()
        with self.db.session() as session:
            invitation = session.execute(select(TeamInvitation).where(
                TeamInvitation.token_hash == hash_key(token))).scalars().first()
            team = session.get(Team, invitation.team_id) if invitation is not None else None
            if invitation is None or team is None or team.deleted_at is not None or user.kind != "person" \
                    or invitation.email != user.email.strip().lower():
                raise NotFound("invitation not found")
            _lock_team(session, team.id)
            if invitation.accepted_at is not None:
                raise Conflict("this invitation was already used", code="invitation_used")
            if invitation.revoked_at is not None:
                raise InvitationGone("this invitation was revoked", code="invitation_revoked")
            if invitation.expires_at <= now:
                raise InvitationGone("this invitation expired: ask for a new one",
                                     {"expired_at": invitation.expires_at.isoformat()})
            if membership(session, user.id, team.id) is not None:
                raise Conflict("you are already a member of this team", code="already_member")
            taken = session.execute(
                update(TeamInvitation)
                .where(TeamInvitation.id == invitation.id, TeamInvitation.accepted_at.is_(None),
                       TeamInvitation.revoked_at.is_(None))
                .values(accepted_at=now, accepted_by=user.id).execution_options(synchronize_session=False))
            if taken.rowcount != 1:  # a concurrent accept (or revoke) won
                raise Conflict("this invitation was already used", code="invitation_used")
            member = session.execute(select(TeamMember).where(
                TeamMember.team_id == team.id, TeamMember.user_id == user.id)).scalars().first()
            if member is None:
                member = TeamMember(team_id=team.id, user_id=user.id)
            # a former member comes back fresh: the invitation's role, no cap
            member.role, member.monthly_cap, member.removed_at, member.joined_at = invitation.role, None, None, now
            session.add(member)
            session.commit()
            account = session.get(User, team.id)
            assert account is not None
        logger.info("team %s: %s joined as %s (invitation %s)", team.id, user.id, member.role, invitation.id)
        return TeamView(team, account, member.role)

    # credits and usage ------------------------------------------------------------------------
    def credits(self, user: User, team_id: str) -> tuple[User, Balance]:
        with self.db.read() as session:
            _team, account, _member = self._member(session, user, team_id)
            balance = session.get(Balance, team_id) or Balance(user_id=team_id)
        return account, balance

    def transactions(self, user: User, team_id: str, limit: int, before_id: int | None) -> list[LedgerEntry]:
        with self.db.read() as session:
            self._member(session, user, team_id)
            return ledger.entries(session, team_id, limit=limit, before_id=before_id)

    def usage(self, user: User, team_id: str, period: str | None = None) -> TeamUsage:
        """Jobs and credits per member for a calendar month (``YYYY-MM``, UTC; default: this one)."""
        if period is None:
            start = month_start()
        else:
            try:
                start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
            except ValueError:
                raise InvalidInput("period must be YYYY-MM", {"field": "period"}) from None
        end = next_month(start)
        active = {s.value for s in ACTIVE}
        with self.db.read() as session:
            self._member(session, user, team_id)
            rows = session.execute(
                select(Job.submitted_by, Job.status, func.count(), func.sum(Job.credits_reserved),
                       func.sum(Job.credits_charged), func.sum(Job.credits_refunded))
                .where(Job.user_id == team_id, Job.created_at >= start, Job.created_at < end,
                       Job.parent_id.is_(None))  # a pipeline is one row (its credits: its steps' sums)
                .group_by(Job.submitted_by, Job.status)).all()
            people = {m.user_id: (m, email) for m, email in session.execute(
                select(TeamMember, User.email).join(User, User.id == TeamMember.user_id)
                .where(TeamMember.team_id == team_id)).all()}
        total = UsageRow()
        by_member: dict[str | None, UsageRow] = {uid: UsageRow() for uid, (m, _e) in people.items()
                                                 if m.removed_at is None}
        for submitted_by, status, count, reserved, charged, refunded in rows:
            for row in (by_member.setdefault(submitted_by, UsageRow()), total):
                row.jobs += int(count)
                row.by_status[status] = row.by_status.get(status, 0) + int(count)
                row.charged += int(charged or 0)
                row.refunded += int(refunded or 0)
                if status in active:
                    row.reserved += int(reserved or 0)
        members = []
        for uid, row in by_member.items():
            m, email = people.get(uid, (None, None)) if uid is not None else (None, None)
            members.append(MemberUsage(user_id=uid or "", email=email, role=m.role if m else None,
                                       active=m is not None and m.removed_at is None,
                                       monthly_cap=m.monthly_cap if m else None, usage=row))
        members.sort(key=lambda u: (-u.usage.spent, u.user_id))
        return TeamUsage(team_id, start.strftime("%Y-%m"), start, end, total, members)


def team_job_fields(job: Job) -> dict[str, Any]:
    """What a job view adds for a job submitted as a team (nothing for a personal job)."""
    return {"team": job.user_id, "submitted_by": job.submitted_by} if job.submitted_by else {}
