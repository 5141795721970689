"""IdentityService: API keys and JWTs from configured issuers resolved to users.

Keys are generated locally (RSA and EC) and served by a JWKS server on 127.0.0.1; a fake clock
drives the key set's TTL, so no test waits on time.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import jwt
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, update

from api.core.errors import CineWeaveError, Unauthorized
from api.db.engine import Database
from api.db.tables import Identity, LedgerEntry, User
from api.services.identity import IdentityProviderUnavailable, IdentityService, JwksCache
from api.settings import AdminClaim, JwtIssuer, Settings
from tests.fakes.jwks import (
    JwksServer,
    SigningKey,
    claims_for,
    ec_key,
    hs256_with_public_key,
    rsa_key,
    unsigned_token,
)
from tests.fixtures.harness import add_user

ISSUER, ISSUER_EC, AUD = "https://idp.test", "https://ec-idp.test", "cineweave-app"


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return rsa_key("rsa-1")


@pytest.fixture(scope="module")
def ec() -> SigningKey:
    return ec_key("ec-1")


@pytest.fixture
def idp(rsa: SigningKey) -> Iterator[JwksServer]:
    with JwksServer([rsa]) as server:
        yield server


@pytest.fixture
def idp_ec(ec: SigningKey) -> Iterator[JwksServer]:
    with JwksServer([ec]) as server:
        yield server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def issuers(idp: JwksServer, idp_ec: JwksServer | None = None, **overrides: Any) -> list[JwtIssuer]:
    out = [JwtIssuer(issuer=ISSUER, jwks_url=idp.jwks_url, audience=[AUD], **overrides)]
    if idp_ec is not None:
        out.append(JwtIssuer(issuer=ISSUER_EC, jwks_url=idp_ec.jwks_url, audience=AUD, algorithms=["ES256"]))
    return out


def service(db: Database, settings: Settings, jwt_issuers: list[JwtIssuer], clock: Clock | None = None,
            **overrides: Any) -> IdentityService:
    s = settings.model_copy(update={"jwt_issuers": jwt_issuers, **overrides})
    return IdentityService(db, s, clock=clock or Clock())


def token(key: SigningKey, issuer: str = ISSUER, sub: str | None = None, **extra: Any) -> str:
    return key.sign(claims_for(issuer, sub or f"user_{uuid.uuid4().hex[:8]}", AUD, **extra))


def count(db: Database, model: Any, *where: Any) -> int:
    with db.read() as session:
        return int(session.execute(select(func.count()).select_from(model).where(*where)).scalar_one())


def refused(svc: IdentityService, credential: str) -> str:
    with pytest.raises(Unauthorized) as info:
        svc.authenticate(credential)
    assert info.value.code == "unauthorized" and info.value.status == 401
    assert credential not in info.value.message
    return info.value.message


# ---- valid tokens ------------------------------------------------------------------------------
def test_rsa_token_provisions_a_user_on_the_default_plan_once(db: Database, settings: Settings,
                                                               idp: JwksServer, rsa: SigningKey) -> None:
    svc = service(db, settings, issuers(idp))
    raw = token(rsa, sub="user_abc", email="Alice@Example.com")
    caller = svc.authenticate(raw)
    assert caller.via == "jwt" and caller.issuer == ISSUER and caller.is_admin is False
    assert caller.user.plan == "free" and caller.user.email == "alice@example.com" and caller.user.kind == "person"
    again = svc.authenticate(token(rsa, sub="user_abc"))
    assert again.user.id == caller.user.id
    assert count(db, User) == 1
    assert count(db, Identity, Identity.issuer == ISSUER, Identity.subject == "user_abc") == 1
    with db.read() as session:
        entries = session.execute(select(LedgerEntry).where(LedgerEntry.user_id == caller.user.id)).scalars().all()
    assert [(e.kind, e.amount, e.idempotency_key) for e in entries] == [("grant", 100, f"signup:{caller.user.id}")]
    assert idp.fetches == 1  # the key set is cached


def test_ec_token_of_a_second_issuer_and_the_issuers_default_plan(db: Database, settings: Settings,
                                                                  idp: JwksServer, idp_ec: JwksServer,
                                                                  rsa: SigningKey, ec: SigningKey) -> None:
    jwt_issuers = issuers(idp, idp_ec)
    jwt_issuers[1] = jwt_issuers[1].model_copy(update={"default_plan": "starter"})
    svc = service(db, settings, jwt_issuers)
    caller = svc.authenticate(token(ec, issuer=ISSUER_EC, sub="same-sub"))
    assert caller.issuer == ISSUER_EC and caller.user.plan == "starter"
    # the same sub at another issuer is another person
    other = svc.authenticate(token(rsa, sub="same-sub"))
    assert other.user.id != caller.user.id
    with db.read() as session:
        kinds = session.execute(select(LedgerEntry.kind, LedgerEntry.amount)
                                .where(LedgerEntry.user_id == caller.user.id)).all()
    assert [tuple(k) for k in kinds] == [("grant", 80)]  # starter: its month's grant


def test_leeway_accepts_slightly_expired_and_early_tokens(db: Database, settings: Settings, idp: JwksServer,
                                                          rsa: SigningKey) -> None:
    svc = service(db, settings, issuers(idp), jwt_leeway_s=30)
    now = int(time.time())
    svc.authenticate(token(rsa, exp=now - 10))
    svc.authenticate(token(rsa, nbf=now + 10))


# ---- refused tokens ----------------------------------------------------------------------------
def test_wrong_issuer_audience_expired_not_yet_valid(db: Database, settings: Settings, idp: JwksServer,
                                                     rsa: SigningKey) -> None:
    svc = service(db, settings, issuers(idp), jwt_leeway_s=30)
    now = int(time.time())
    assert "issuer" in refused(svc, token(rsa, issuer="https://evil.test"))
    assert "audience" in refused(svc, rsa.sign(claims_for(ISSUER, "u1", "another-app")))
    assert "expired" in refused(svc, token(rsa, exp=now - 120))
    assert "not valid yet" in refused(svc, token(rsa, nbf=now + 120))
    assert count(db, User) == 0


def test_alg_none_and_hs256_signed_with_the_public_key_are_refused(db: Database, settings: Settings,
                                                                   idp: JwksServer, rsa: SigningKey) -> None:
    svc = service(db, settings, issuers(idp))
    assert "algorithm" in refused(svc, unsigned_token(claims_for(ISSUER, "u1", AUD), rsa.kid))
    assert "algorithm" in refused(svc, hs256_with_public_key(rsa, claims_for(ISSUER, "u1", AUD)))
    assert count(db, User) == 0


def test_hs_and_none_algorithms_cannot_be_configured() -> None:
    for algorithms in (["HS256"], ["RS256", "HS512"], ["none"]):
        with pytest.raises(ValidationError, match="not allowed"):
            JwtIssuer(issuer=ISSUER, jwks_url="https://idp.test/jwks", audience=[AUD], algorithms=algorithms)


def test_a_token_whose_key_does_not_fit_its_algorithm_is_refused(db: Database, settings: Settings,
                                                                  rsa: SigningKey, ec: SigningKey) -> None:
    # one issuer allowing both families, with both keys: an RS256 header naming the EC key's kid
    with JwksServer([rsa, ec]) as both:
        svc = service(db, settings, [JwtIssuer(issuer=ISSUER, jwks_url=both.jwks_url, audience=[AUD],
                                               algorithms=["RS256", "ES256"])])
        svc.authenticate(token(ec))
        svc.authenticate(token(rsa))
        confused = rsa.sign(claims_for(ISSUER, "u1", AUD), headers={"kid": ec.kid})
        assert "does not fit" in refused(svc, confused)


def test_tampered_payload_and_missing_claims(db: Database, settings: Settings, idp: JwksServer,
                                             rsa: SigningKey) -> None:
    svc = service(db, settings, issuers(idp))
    header, _payload, signature = token(rsa, sub="u1").split(".")
    other_payload = token(rsa, sub="someone-else").split(".")[1]
    assert "signature" in refused(svc, f"{header}.{other_payload}.{signature}")
    no_exp = claims_for(ISSUER, "u1", AUD)
    del no_exp["exp"]
    assert "'exp'" in refused(svc, rsa.sign(no_exp))
    no_sub = claims_for(ISSUER, "u1", AUD)
    del no_sub["sub"]
    assert "'sub'" in refused(svc, rsa.sign(no_sub))
    assert "well-formed" in refused(svc, "not.a.jwt")
    assert "kid" in refused(svc, jwt.encode(claims_for(ISSUER, "u1", AUD), rsa.private, algorithm="RS256"))


def test_authorized_party_is_checked_when_configured(db: Database, settings: Settings, idp: JwksServer,
                                                     rsa: SigningKey) -> None:
    svc = service(db, settings, issuers(idp, authorized_parties=["https://app.example.com"]))
    svc.authenticate(token(rsa, azp="https://app.example.com"))
    assert "azp" in refused(svc, token(rsa, azp="https://evil.example.com"))
    assert "azp" in refused(svc, token(rsa))


# ---- the key set: unknown kid, rotation, TTL, outages ------------------------------------------
def test_unknown_kid_refetches_once_then_is_refused(db: Database, settings: Settings, idp: JwksServer,
                                                    rsa: SigningKey) -> None:
    svc = service(db, settings, issuers(idp), jwks_refetch_s=30)
    svc.authenticate(token(rsa))
    assert idp.fetches == 1
    stranger = rsa_key("not-published")
    assert "key set" in refused(svc, token(stranger))
    assert idp.fetches == 2  # refetched once
    assert "key set" in refused(svc, token(stranger))
    assert "key set" in refused(svc, token(rsa_key("another-unknown")))
    assert idp.fetches == 2  # rate-limited: no fetch per made-up kid


def test_unknown_kid_on_the_first_fetch_is_not_fetched_twice(db: Database, settings: Settings,
                                                            idp: JwksServer) -> None:
    svc = service(db, settings, issuers(idp))
    refused(svc, token(rsa_key("not-published")))
    assert idp.fetches == 1


def test_rotation_a_new_kid_is_accepted_after_one_refetch(db: Database, settings: Settings, idp: JwksServer,
                                                          rsa: SigningKey) -> None:
    clock = Clock()
    svc = service(db, settings, issuers(idp), clock, jwks_refetch_s=30)
    svc.authenticate(token(rsa))
    rotated = rsa_key("rsa-2")
    idp.keys = [rsa, rotated]
    svc.authenticate(token(rotated))
    assert idp.fetches == 2
    svc.authenticate(token(rotated))
    assert idp.fetches == 2
    # the old key leaves the set: once the cached set expires, its tokens are refused
    idp.keys = [rotated]
    clock.now += settings.jwks_cache_s + 1
    assert "key set" in refused(svc, token(rsa))
    assert idp.fetches == 3


def test_refetch_rate_limit_is_per_cooldown(db: Database, settings: Settings, idp: JwksServer,
                                            rsa: SigningKey) -> None:
    clock = Clock()
    svc = service(db, settings, issuers(idp), clock, jwks_refetch_s=30)
    svc.authenticate(token(rsa))
    refused(svc, token(rsa_key("k-a")))
    late = rsa_key("k-late")
    idp.keys = [rsa, late]
    refused(svc, token(late))  # published, but inside the cooldown: not fetched yet
    assert idp.fetches == 2
    clock.now += 31
    svc.authenticate(token(late))
    assert idp.fetches == 3


def test_provider_down_without_cached_keys_is_503_and_stale_keys_serve_through_an_outage(
        db: Database, settings: Settings, idp: JwksServer, rsa: SigningKey) -> None:
    clock = Clock()
    svc = service(db, settings, issuers(idp), clock)
    idp.status = 500
    with pytest.raises(IdentityProviderUnavailable) as info:
        svc.authenticate(token(rsa))
    assert info.value.status == 503 and info.value.code == "identity_provider_unavailable"
    idp.status = 200
    svc.authenticate(token(rsa))
    idp.status = 503
    clock.now += settings.jwks_cache_s + 1
    svc.authenticate(token(rsa))  # refresh failed: the cached keys still verify
    fetches = idp.fetches
    svc.authenticate(token(rsa))  # and the failed refresh backs off instead of retrying per request
    assert idp.fetches == fetches


def test_jwks_cache_never_keeps_symmetric_or_encryption_keys(idp: JwksServer, rsa: SigningKey) -> None:
    idp.extra_jwks = [{"kty": "oct", "kid": "shared", "k": "c2VjcmV0"},
                      {**rsa_key().jwk(), "kid": "enc", "use": "enc"}, {"kty": "RSA"}, "junk"]
    cache = JwksCache(idp.jwks_url, ttl_s=60, refetch_s=0, timeout_s=5)
    assert cache.get(rsa.kid) is not None
    assert cache.get("shared") is None and cache.get("enc") is None
    assert cache.fetches == 3  # refetch_s=0: every unknown kid may refetch


def test_a_symmetric_key_in_the_jwks_never_verifies_an_hs256_token(db: Database, settings: Settings,
                                                                   idp: JwksServer) -> None:
    secret = b"s" * 32
    idp.extra_jwks = [{"kty": "oct", "kid": "shared", "k": base64.urlsafe_b64encode(secret).decode().rstrip("=")}]
    svc = service(db, settings, issuers(idp))
    forged = jwt.encode(claims_for(ISSUER, "u1", AUD), secret, algorithm="HS256", headers={"kid": "shared"})
    assert "algorithm" in refused(svc, forged)


# ---- who the caller is -------------------------------------------------------------------------
def test_admin_only_through_the_configured_claim(db: Database, settings: Settings, idp: JwksServer,
                                                 rsa: SigningKey) -> None:
    plain = service(db, settings, issuers(idp))
    assert plain.authenticate(token(rsa, sub="a", role="admin", is_admin=True)).is_admin is False
    svc = service(db, settings, issuers(idp, admin_claim=AdminClaim(claim="app_metadata.role", value="admin")))
    assert svc.authenticate(token(rsa, sub="a", app_metadata={"role": "admin"})).is_admin is True
    assert svc.authenticate(token(rsa, sub="a", app_metadata={"role": ["viewer", "admin"]})).is_admin is True
    assert svc.authenticate(token(rsa, sub="a", app_metadata={"role": "viewer"})).is_admin is False
    assert svc.authenticate(token(rsa, sub="a", role="admin")).is_admin is False
    assert svc.authenticate(token(rsa, sub="a")).is_admin is False
    flag = service(db, settings, issuers(idp, admin_claim=AdminClaim(claim="cw_admin", value=True)))
    assert flag.authenticate(token(rsa, sub="a", cw_admin="true")).is_admin is False  # types must match
    assert flag.authenticate(token(rsa, sub="a", cw_admin=True)).is_admin is True
    with db.read() as session:
        assert session.execute(select(User.is_admin)).scalars().all() == [False]  # never stored


def test_disabled_and_team_accounts_never_sign_in(db: Database, settings: Settings, idp: JwksServer,
                                                  rsa: SigningKey) -> None:
    svc = service(db, settings, issuers(idp))
    user = svc.authenticate(token(rsa, sub="dis")).user
    with db.session() as session:
        session.get(User, user.id).disabled = True  # type: ignore[union-attr]
        session.commit()
    assert "disabled" in refused(svc, token(rsa, sub="dis"))
    team_user = svc.authenticate(token(rsa, sub="team")).user
    with db.session() as session:
        session.get(User, team_user.id).kind = "team"  # type: ignore[union-attr]
        session.commit()
    assert "team" in refused(svc, token(rsa, sub="team"))


def test_api_keys_still_work_and_a_team_accounts_key_does_not(db: Database, settings: Settings,
                                                              idp: JwksServer) -> None:
    svc = service(db, settings, issuers(idp))
    person = add_user(db, settings, admin=True)
    caller = svc.authenticate(person.api_key)
    assert caller.via == "api_key" and caller.user.id == person.user.id and caller.is_admin is True
    team = add_user(db, settings)
    with db.session() as session:
        session.get(User, team.user.id).kind = "team"  # type: ignore[union-attr]
        session.commit()
    assert refused(svc, team.api_key) == "invalid API key"
    assert refused(svc, "cw_nope_x") == "invalid API key"
    no_issuers = service(db, settings, [])
    assert refused(no_issuers, "a.b.c") == "invalid API key"


def test_email_is_never_used_to_link_accounts(db: Database, settings: Settings, idp: JwksServer,
                                              rsa: SigningKey) -> None:
    svc = service(db, settings, issuers(idp))
    existing = add_user(db, settings, email="taken@example.com")
    caller = svc.authenticate(token(rsa, sub="s1", email="taken@example.com"))
    assert caller.user.id != existing.user.id and caller.user.email.endswith("@users.jwt.invalid")
    unverified = svc.authenticate(token(rsa, sub="s2", email="bob@example.com", email_verified=False)).user
    assert unverified.email.endswith("@users.jwt.invalid")
    nested = service(db, settings, issuers(idp, email_claim="user.primary_email"))
    assert nested.authenticate(token(rsa, sub="s3", user={"primary_email": "c@example.com"})).user.email \
        == "c@example.com"


def test_misconfigured_issuers_are_refused_at_start(db: Database, settings: Settings, idp: JwksServer) -> None:
    with pytest.raises(ValueError, match="twice"):
        service(db, settings, issuers(idp) + issuers(idp))
    with pytest.raises(ValueError, match="not a plan"):
        service(db, settings, issuers(idp, default_plan="platinum"))


# ---- exactly once under concurrency --------------------------------------------------------------
def test_fifty_concurrent_first_sightings_create_one_user(backend_db: Database, backend_settings: Settings,
                                                          idp: JwksServer, rsa: SigningKey) -> None:
    svc = service(backend_db, backend_settings, issuers(idp))
    raw = token(rsa, sub="racer", email="racer@example.com")
    n = 50
    barrier = threading.Barrier(n, timeout=30)
    results: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            barrier.wait()
            results.append(svc.authenticate(raw).user.id)
        except (CineWeaveError, Exception) as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(results) == n and len(set(results)) == 1
    assert count(backend_db, User) == 1
    assert count(backend_db, Identity) == 1
    assert count(backend_db, LedgerEntry, LedgerEntry.kind == "grant") == 1
    assert idp.fetches == 1  # one fetch shared by the racers


def test_last_seen_is_written_at_most_hourly(backend_db: Database, backend_settings: Settings, idp: JwksServer,
                                            rsa: SigningKey) -> None:
    db = backend_db
    svc = service(db, backend_settings, issuers(idp))
    svc.authenticate(token(rsa, sub="seen"))
    with db.session() as session:
        identity = session.execute(select(Identity)).scalars().one()
        first_seen = identity.last_seen_at
        assert first_seen is not None
        identity.last_seen_at = first_seen - timedelta(minutes=30)
        session.commit()
    svc.authenticate(token(rsa, sub="seen"))
    with db.read() as session:
        assert session.execute(select(Identity.last_seen_at)).scalar_one() == first_seen - timedelta(minutes=30)
    with db.session() as session:
        session.execute(update(Identity).values(last_seen_at=first_seen - timedelta(hours=2)))
        session.commit()
    svc.authenticate(token(rsa, sub="seen"))
    with db.read() as session:
        assert session.execute(select(Identity.last_seen_at)).scalar_one() > first_seen - timedelta(minutes=1)


def test_issuers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CINEWEAVE_JWT_ISSUERS", '[{"issuer": "https://a.test", "jwks_url": "https://a.test/jwks",'
                       ' "audience": "app", "algorithms": ["ES256"],'
                       ' "admin_claim": {"claim": "app_metadata.role", "value": "admin"}}]')
    (issuer,) = Settings(_env_file=None).jwt_issuers
    assert issuer.audience == ["app"] and issuer.algorithms == ["ES256"]
    assert issuer.admin_claim == AdminClaim(claim="app_metadata.role", value="admin")
