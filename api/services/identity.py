"""Who is calling: a bearer credential (a CineWeave API key, or an end user's JWT signed by one of
the app's identity providers) resolved to a :class:`~api.db.tables.User`.

JWTs are verified with PyJWT against the issuer's JWKS (public keys only: the algorithms are pinned
per issuer and HS*/"none" are refused by the settings, so a token "signed" with a public key as an
HMAC secret never verifies). An issuer's ``(iss, sub)`` maps to one user through ``identities``;
the user is created on first sight on the issuer's default plan, exactly once however many first
requests race (the unique ``(issuer, subject)`` constraint decides; the losers read the winner's).
Admin rights come from a token only through the issuer's configured ``admin_claim``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import httpx
import jwt
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from api.core import ledger
from api.core.errors import CineWeaveError, Conflict, Unauthorized
from api.db.engine import Database
from api.db.tables import Identity, User, utcnow
from api.services import users
from api.settings import JwtIssuer, Settings

logger = logging.getLogger(__name__)

# a failed JWKS fetch is not retried for this long (at most the cache's TTL) while stale keys serve
FETCH_FAILURE_BACKOFF_S = 10.0
# last_seen_at is written at most this often per identity (not on every request)
LAST_SEEN_RESOLUTION = timedelta(hours=1)
PROVISION_ATTEMPTS = 3
MAX_SUBJECT_CHARS = 255

# which JWK fits which algorithm: key type, and the curve for EC/OKP keys
_KEY_FOR_ALG: dict[str, tuple[str, str | None]] = {
    **{f"{p}{n}": ("RSA", None) for p in ("RS", "PS") for n in (256, 384, 512)},
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
}


class IdentityProviderUnavailable(CineWeaveError):
    """The issuer's JWKS could not be fetched and no keys are cached: not the caller's fault."""

    code, status = "identity_provider_unavailable", 503


@dataclass(frozen=True)
class Caller:
    """The authenticated caller. ``is_admin``: from the user row for an API key; for a JWT only
    from the issuer's configured admin claim."""

    user: User
    via: Literal["api_key", "jwt"]
    is_admin: bool
    issuer: str | None = None


def _short(value: object, limit: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class JwksCache:
    """One issuer's key set, fetched with httpx and kept ``ttl_s``.

    A ``kid`` that is not in the set refetches it at once (key rotation), but at most once per
    ``refetch_s`` (a stream of tokens with made-up kids cannot hammer the provider), and not when
    the set was fetched for this very lookup. One lock per issuer: concurrent first requests share
    one fetch.
    """

    def __init__(self, url: str, *, ttl_s: float, refetch_s: float, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.refetch_s = refetch_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.fetches = 0
        self._lock = threading.Lock()
        self._keys: dict[str, dict[str, Any]] | None = None
        self._expires_at = 0.0
        self._last_refetch: float | None = None

    def _fetch(self) -> dict[str, dict[str, Any]]:
        # The JWKS URL is operator configuration (Settings.jwt_issuers), never user input, so plain
        # httpx with a timeout (and no redirects) is enough here; api.services.egress is for URLs
        # that users hand us.
        self.fetches += 1
        try:
            response = httpx.get(self.url, timeout=self.timeout_s, follow_redirects=False,
                                 headers={"accept": "application/json"})
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise IdentityProviderUnavailable(
                "the identity provider's signing keys could not be fetched",
                {"jwks_url": self.url, "reason": type(exc).__name__}) from exc
        raw_keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(raw_keys, list):
            raise IdentityProviderUnavailable("the identity provider's JWKS has no \"keys\" list",
                                              {"jwks_url": self.url})
        keys: dict[str, dict[str, Any]] = {}
        for key in raw_keys:
            if (isinstance(key, dict) and isinstance(key.get("kid"), str) and key["kid"]
                    and key.get("use", "sig") == "sig" and key.get("kty") in ("RSA", "EC", "OKP")):
                keys[key["kid"]] = key
        logger.info("fetched JWKS %s: %d signing keys", self.url, len(keys))
        return keys

    def _load(self, now: float) -> bool:
        """Fetch the set; on failure keep stale keys (if any) and back off. True if it was fetched."""
        try:
            self._keys = self._fetch()
        except IdentityProviderUnavailable:
            if self._keys is None:
                raise
            logger.warning("JWKS %s could not be refreshed; using the cached keys", self.url, exc_info=True)
            self._expires_at = now + min(self.ttl_s, FETCH_FAILURE_BACKOFF_S)
            return False
        self._expires_at = now + self.ttl_s
        return True

    def get(self, kid: str) -> dict[str, Any] | None:
        """The JWK with this ``kid``, or None once a (rate-limited) refetch did not find it either."""
        with self._lock:
            now = self.clock()
            loaded = False
            if self._keys is None or now >= self._expires_at:
                self._load(now)
                loaded = True  # fetched (or just failed to) for this lookup: no second try
            assert self._keys is not None
            if kid in self._keys or loaded:
                return self._keys.get(kid)
            if self._last_refetch is not None and now - self._last_refetch < self.refetch_s:
                return None
            self._last_refetch = now
            try:
                self._load(now)
            except IdentityProviderUnavailable:  # pragma: no cover - _load keeps stale keys
                return None
            return self._keys.get(kid)


def _jwk_for(jwk: dict[str, Any], alg: str) -> jwt.PyJWK:
    """A PyJWK bound to ``alg``, refused unless the key's type (and curve, and any ``alg`` it names)
    fits: an RSA key never verifies an ES256 token, nor a P-384 key an ES256 one."""
    kty, crv = _KEY_FOR_ALG[alg]
    if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv) or jwk.get("alg", alg) != alg:
        raise Unauthorized(f"the token's algorithm {alg} does not fit its signing key")
    try:
        return jwt.PyJWK(jwk, algorithm=alg)
    except jwt.PyJWKError as exc:
        raise Unauthorized("the token's signing key is not usable") from exc


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """A claim by dotted path (``app_metadata.role``); None when any step is missing."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _matches(actual: Any, wanted: str | int | bool) -> bool:
    def same(a: Any) -> bool:
        return type(a) is type(wanted) and a == wanted

    return same(actual) or (isinstance(actual, list) and any(same(a) for a in actual))


def looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2 and not credential.startswith(users.KEY_PREFIX)


class IdentityService:
    """Resolves bearer credentials; holds one :class:`JwksCache` per configured issuer."""

    def __init__(self, db: Database, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.settings = settings
        self.issuers: dict[str, JwtIssuer] = {}
        self.caches: dict[str, JwksCache] = {}
        for issuer in settings.jwt_issuers:
            if issuer.issuer in self.issuers:
                raise ValueError(f"jwt_issuers names {issuer.issuer} twice")
            plan = issuer.default_plan or settings.default_plan
            try:
                settings.plan(plan)
            except KeyError:
                raise ValueError(f"jwt_issuers: {issuer.issuer}'s default plan {plan!r} is not a plan") from None
            self.issuers[issuer.issuer] = issuer
            self.caches[issuer.issuer] = JwksCache(
                issuer.jwks_url, ttl_s=settings.jwks_cache_s, refetch_s=settings.jwks_refetch_s,
                timeout_s=settings.jwks_timeout_s, clock=clock)

    # ---- the one entry point -------------------------------------------------------------------
    def authenticate(self, credential: str) -> Caller:
        """An API key (``cw_…``) or, when issuers are configured, a JWT. Raises ``Unauthorized``."""
        if self.issuers and looks_like_jwt(credential):
            issuer, claims = self.verify_token(credential)
            user = self.user_for(issuer, claims)
            self._check_can_sign_in(user)
            is_admin = issuer.admin_claim is not None and _matches(
                claim_at(claims, issuer.admin_claim.claim), issuer.admin_claim.value)
            return Caller(user, "jwt", is_admin, issuer.issuer)
        with self.db.read() as session:
            user = users.authenticate(session, credential)
        if user.kind != "person":
            raise Unauthorized("invalid API key")
        return Caller(user, "api_key", user.is_admin)

    @staticmethod
    def _check_can_sign_in(user: User) -> None:
        if user.kind != "person":
            raise Unauthorized("a team account cannot sign in")
        if user.disabled:
            raise Unauthorized("this account is disabled")

    # ---- JWT verification ----------------------------------------------------------------------
    def verify_token(self, token: str) -> tuple[JwtIssuer, dict[str, Any]]:
        """The issuer's config and the verified claims; ``Unauthorized`` naming the failed check."""
        try:
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthorized("invalid token: not a well-formed JWT") from None
        header, payload = unverified["header"], unverified["payload"]
        iss = payload.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise Unauthorized(f"invalid token: issuer {_short(iss)} is not accepted here")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise Unauthorized(f"invalid token: algorithm {_short(alg, 24)} is not allowed for this issuer "
                               f"(allowed: {', '.join(issuer.algorithms)})")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("invalid token: its header names no signing key (kid)")
        jwk = self.caches[issuer.issuer].get(kid)
        if jwk is None:
            raise Unauthorized("invalid token: its signing key is not in the issuer's key set")
        try:
            claims = jwt.decode(token, key=_jwk_for(jwk, alg), algorithms=[alg], audience=issuer.audience,
                                issuer=issuer.issuer, leeway=self.settings.jwt_leeway_s,
                                options={"require": ["exp", "iss", "sub", "aud"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("invalid token: it has expired (exp)") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("invalid token: it is not valid yet (nbf/iat)") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("invalid token: its audience (aud) is not accepted here") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("invalid token: issuer is not accepted here") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"invalid token: the {exc.claim!r} claim is missing") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("invalid token: the signature does not verify") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthorized("invalid token: algorithm not allowed for this issuer") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > MAX_SUBJECT_CHARS:
            raise Unauthorized("invalid token: the 'sub' claim is not a usable subject")
        if issuer.authorized_parties and claims.get("azp") not in issuer.authorized_parties:
            raise Unauthorized("invalid token: its authorized party (azp) is not accepted here")
        return issuer, claims

    # ---- subject -> user ------------------------------------------------------------------------
    def user_for(self, issuer: JwtIssuer, claims: dict[str, Any]) -> User:
        """The user of ``(iss, sub)``, created on first sight (exactly once under concurrency)."""
        sub: str = claims["sub"]
        with self.db.read() as session:
            found = self._lookup(session, issuer.issuer, sub)
        if found is not None:
            identity, user = found
            self._touch(identity)
            return user
        return self._provision(issuer, sub, claims)

    @staticmethod
    def _lookup(session: Session, issuer: str, subject: str) -> tuple[Identity, User] | None:
        row = session.execute(select(Identity, User).join(User, User.id == Identity.user_id).where(
            Identity.issuer == issuer, Identity.subject == subject)).first()
        return (row[0], row[1]) if row is not None else None

    def _touch(self, identity: Identity) -> None:
        now = utcnow()
        if identity.last_seen_at is not None and now - identity.last_seen_at < LAST_SEEN_RESOLUTION:
            return
        with self.db.session() as session:
            session.execute(update(Identity).where(
                Identity.id == identity.id,
                or_(Identity.last_seen_at.is_(None), Identity.last_seen_at < now - LAST_SEEN_RESOLUTION))
                .values(last_seen_at=now))
            session.commit()

    def _provision(self, issuer: JwtIssuer, sub: str, claims: dict[str, Any]) -> User:
        for _ in range(PROVISION_ATTEMPTS):
            try:
                with self.db.session() as session:
                    found = self._lookup(session, issuer.issuer, sub)
                    if found is not None:  # created meanwhile (SQLite serialises writers at BEGIN)
                        return found[1]
                    user = self._create(session, issuer, sub, claims)
                    session.commit()
                logger.info("created user %s for %s subject %s", user.id, issuer.issuer, sub)
                return user
            except IntegrityError:
                # a concurrent first request won (unique (issuer, subject)), or took the email: read theirs
                with self.db.read() as session:
                    found = self._lookup(session, issuer.issuer, sub)
                if found is not None:
                    return found[1]
        raise Conflict("could not create an account for this token; try again", code="identity_conflict")

    def _create(self, session: Session, issuer: JwtIssuer, sub: str, claims: dict[str, Any]) -> User:
        plan_id = issuer.default_plan or self.settings.default_plan
        plan = self.settings.plan(plan_id)
        user = User(email=self._email_for(session, issuer, sub, claims), plan=plan_id, is_admin=False,
                    webhook_secret=users.new_webhook_secret())
        session.add(user)
        session.flush()
        session.add(Identity(user_id=user.id, issuer=issuer.issuer, subject=sub, last_seen_at=utcnow()))
        session.flush()  # the unique (issuer, subject) decides a race here, before any credits move
        ledger.ensure_balance(session, user.id)
        if plan.one_time_credits:
            ledger.credit(session, user.id, plan.one_time_credits, f"signup:{user.id}",
                          note=f"sign-up credits ({plan_id})")
        if plan.monthly_credits:
            users.grant_plan_month(session, self.settings, user)
        return user

    @staticmethod
    def _email_for(session: Session, issuer: JwtIssuer, sub: str, claims: dict[str, Any]) -> str:
        """The token's email when it is usable, verified (or not said to be unverified) and not another
        user's; otherwise a stable placeholder. Never links to an existing user by email: an
        identity provider that lets anyone claim an address would hand over that user's account."""
        digest = hashlib.sha256(f"{issuer.issuer}\n{sub}".encode()).hexdigest()[:32]
        placeholder = f"{digest}@users.jwt.invalid"
        email = claim_at(claims, issuer.email_claim)
        if not isinstance(email, str) or claims.get("email_verified") is False:
            return placeholder
        email = email.strip().lower()
        if "@" not in email or len(email) > 254:
            return placeholder
        if session.execute(select(User.id).where(User.email == email)).first() is not None:
            logger.info("%s subject %s: email is another user's; using a placeholder", issuer.issuer, sub)
            return placeholder
        return email


__all__ = ["Caller", "IdentityProviderUnavailable", "IdentityService", "JwksCache", "claim_at", "looks_like_jwt"]
