"""End users signed in with a JWT from the app's identity provider, over HTTP.

RSA and EC keys are generated locally and served by a JWKS server on 127.0.0.1; the API runs
in-process (ASGI) or, for the concurrency test, behind uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from api.db.engine import Database
from api.db.tables import Identity, LedgerEntry, User
from api.http.app import create_app
from api.settings import AdminClaim, JwtIssuer, Settings
from api.storage.local import LocalStorage
from tests.fakes.jwks import (
    JwksServer,
    SigningKey,
    claims_for,
    ec_key,
    hs256_with_public_key,
    rsa_key,
    unsigned_token,
)
from tests.fixtures.harness import ADMIN_KEY, ApiHarness, bearer

ISSUER, ISSUER_EC, AUD = "https://idp.test", "https://ec-idp.test", "cineweave-app"
MakeApi = Callable[..., Awaitable[ApiHarness]]


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


def jwt_issuers(idp: JwksServer, idp_ec: JwksServer | None = None, **overrides: Any) -> list[JwtIssuer]:
    out = [JwtIssuer(issuer=ISSUER, jwks_url=idp.jwks_url, audience=[AUD], **overrides)]
    if idp_ec is not None:
        out.append(JwtIssuer(issuer=ISSUER_EC, jwks_url=idp_ec.jwks_url, audience=[AUD], algorithms=["ES256"]))
    return out


def token(key: SigningKey, sub: str = "user_1", issuer: str = ISSUER, **extra: Any) -> str:
    return key.sign(claims_for(issuer, sub, AUD, **extra))


def rows(db: Database, model: Any, *where: Any) -> int:
    with db.read() as session:
        return int(session.execute(select(func.count()).select_from(model).where(*where)).scalar_one())


async def test_a_valid_token_gets_credits_and_is_provisioned_on_the_free_plan(
        make_api: MakeApi, idp: JwksServer, idp_ec: JwksServer, rsa: SigningKey, ec: SigningKey) -> None:
    api = await make_api(jwt_issuers=jwt_issuers(idp, idp_ec))
    r = await api.client.get("/v1/credits", headers=bearer(token(rsa)))
    assert r.status_code == 200, r.text
    assert r.json() == {"balance": 100, "reserved": 0, "plan": "free"}
    r = await api.client.get("/v1/credits", headers=bearer(token(ec, issuer=ISSUER_EC)))
    assert r.status_code == 200, r.text
    assert rows(api.db, User) == 2 and rows(api.db, Identity) == 2
    # the same person again: no new user, the credits are not granted twice
    r = await api.client.get("/v1/credits", headers=bearer(token(rsa)))
    assert r.json()["balance"] == 100 and rows(api.db, User) == 2


async def test_a_jwt_user_submits_a_job_and_sees_it(make_api: MakeApi, idp: JwksServer, rsa: SigningKey) -> None:
    api = await make_api(jwt_issuers=jwt_issuers(idp), run_runner=False)
    headers = bearer(token(rsa, sub="maker"))
    r = await api.client.post("/v1/jobs", json={"model": "tiny-sd", "input": {"prompt": "a cat"}}, headers=headers)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert (await api.client.get(f"/v1/jobs/{job_id}", headers=headers)).status_code == 200
    other = bearer(token(rsa, sub="someone-else"))
    assert (await api.client.get(f"/v1/jobs/{job_id}", headers=other)).status_code == 404


@pytest.mark.parametrize("case", ["issuer", "audience", "expired", "not_yet_valid", "alg_none", "hs256_public_key",
                                  "unknown_kid", "tampered"])
async def test_bad_tokens_are_401_with_a_reason(make_api: MakeApi, idp: JwksServer, rsa: SigningKey,
                                                case: str) -> None:
    api = await make_api(jwt_issuers=jwt_issuers(idp), jwt_leeway_s=30)
    now = int(time.time())
    good = claims_for(ISSUER, "u1", AUD)
    raw, reason = {
        "issuer": (rsa.sign(claims_for("https://evil.test", "u1", AUD)), "issuer"),
        "audience": (rsa.sign(claims_for(ISSUER, "u1", "other-app")), "audience"),
        "expired": (rsa.sign({**good, "exp": now - 120}), "expired"),
        "not_yet_valid": (rsa.sign({**good, "nbf": now + 120}), "not valid yet"),
        "alg_none": (unsigned_token(good, rsa.kid), "algorithm"),
        "hs256_public_key": (hs256_with_public_key(rsa, good), "algorithm"),
        "unknown_kid": (rsa_key("unpublished").sign(good), "key set"),
        "tampered": (token(rsa).rsplit(".", 1)[0] + "." + token(rsa, sub="x").rsplit(".", 1)[1], "signature"),
    }[case]
    r = await api.client.get("/v1/credits", headers=bearer(raw))
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert error["code"] == "unauthorized" and reason in error["message"]
    signature = raw.split(".")[2]
    assert raw not in r.text and (not signature or signature not in r.text)  # never echoed
    assert rows(api.db, User) == 0


async def test_rotation_is_accepted_and_bad_kids_in_the_cooldown_do_not_refetch(
        make_api: MakeApi, idp: JwksServer, rsa: SigningKey) -> None:
    api = await make_api(jwt_issuers=jwt_issuers(idp), jwks_refetch_s=30)
    assert (await api.client.get("/v1/credits", headers=bearer(token(rsa)))).status_code == 200
    assert idp.fetches == 1
    rotated = rsa_key("rsa-rotated")
    idp.keys = [rsa, rotated]
    assert (await api.client.get("/v1/credits", headers=bearer(token(rotated)))).status_code == 200
    assert idp.fetches == 2
    stranger = rsa_key("never-published")
    for _ in range(3):
        assert (await api.client.get("/v1/credits", headers=bearer(token(stranger)))).status_code == 401
    assert idp.fetches == 2  # the refetch right before (rotation) holds the cooldown: no fetch per bad kid


async def test_unknown_kid_refetches_once_then_401(make_api: MakeApi, idp: JwksServer, rsa: SigningKey) -> None:
    api = await make_api(jwt_issuers=jwt_issuers(idp), jwks_refetch_s=30)
    assert (await api.client.get("/v1/credits", headers=bearer(token(rsa)))).status_code == 200
    stranger = rsa_key("never-published")
    for _ in range(3):
        assert (await api.client.get("/v1/credits", headers=bearer(token(stranger)))).status_code == 401
    assert idp.fetches == 2


async def test_provider_down_is_503_not_401(make_api: MakeApi, idp: JwksServer, rsa: SigningKey) -> None:
    api = await make_api(jwt_issuers=jwt_issuers(idp))
    idp.status = 500
    r = await api.client.get("/v1/credits", headers=bearer(token(rsa)))
    assert r.status_code == 503 and r.json()["error"]["code"] == "identity_provider_unavailable"


async def test_admin_rights_only_from_the_configured_claim(make_api: MakeApi, idp: JwksServer,
                                                           rsa: SigningKey) -> None:
    plain = await make_api(jwt_issuers=jwt_issuers(idp))
    r = await plain.client.get("/v1/admin/users", headers=bearer(token(rsa, role="admin", admin=True)))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"

    api = await make_api(jwt_issuers=jwt_issuers(idp, admin_claim=AdminClaim(claim="role", value="admin")))
    assert (await api.client.get("/v1/admin/users", headers=bearer(token(rsa, sub="a")))).status_code == 403
    r = await api.client.get("/v1/admin/users", headers=bearer(token(rsa, sub="b", role="member")))
    assert r.status_code == 403
    r = await api.client.get("/v1/admin/users", headers=bearer(token(rsa, sub="c", role="admin")))
    assert r.status_code == 200, r.text
    # the admin claim does not stick to the user: the next token without it is not an admin
    assert (await api.client.get("/v1/admin/users", headers=bearer(token(rsa, sub="c")))).status_code == 403
    # an admin is still a user on the user routes, and the admin key keeps its behaviour
    assert (await api.client.get("/v1/credits", headers=bearer(token(rsa, sub="c", role="admin")))).status_code == 200
    assert (await api.client.get("/v1/admin/users", headers=bearer(ADMIN_KEY))).status_code == 200
    assert (await api.client.get("/v1/credits", headers=bearer(ADMIN_KEY))).status_code == 403


async def test_api_keys_unchanged_and_tokens_refused_without_issuers(make_api: MakeApi, rsa: SigningKey) -> None:
    api = await make_api()
    user = api.user()
    assert (await api.client.get("/v1/credits", headers=bearer(user.api_key))).status_code == 200
    r = await api.client.get("/v1/credits", headers=bearer(token(rsa)))
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    r = await api.client.get("/v1/credits")
    assert r.status_code == 401 and "missing credentials" in r.json()["error"]["message"]


async def test_disabled_jwt_user_is_refused(make_api: MakeApi, idp: JwksServer, rsa: SigningKey) -> None:
    api = await make_api(jwt_issuers=jwt_issuers(idp))
    assert (await api.client.get("/v1/credits", headers=bearer(token(rsa, sub="d")))).status_code == 200
    with api.db.session() as session:
        user = session.execute(select(User).join(Identity, Identity.user_id == User.id)
                               .where(Identity.subject == "d")).scalars().one()
        user.disabled = True
        session.commit()
    r = await api.client.get("/v1/credits", headers=bearer(token(rsa, sub="d")))
    assert r.status_code == 401 and "disabled" in r.json()["error"]["message"]


@pytest.mark.slow
def test_fifty_concurrent_first_requests_provision_once(backend_settings: Settings, storage: LocalStorage,
                                                        live_server: Any, idp: JwksServer, rsa: SigningKey) -> None:
    s = backend_settings.model_copy(update={"jwt_issuers": jwt_issuers(idp)})
    app = create_app(s, None, storage=storage, run_maintenance=False)
    srv = live_server(app)
    db: Database = app.state.cineweave.db
    raw = token(rsa, sub="first-sight", email="first@example.com")
    n = 50
    barrier = threading.Barrier(n, timeout=30)
    responses: list[httpx.Response] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            with httpx.Client(base_url=srv.url, timeout=60) as client:
                barrier.wait()
                r = client.get("/v1/credits", headers=bearer(raw))
            with lock:
                responses.append(r)
        except Exception as exc:  # noqa: BLE001 - reported below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses if r.status_code != 200][:3]
    assert {r.json()["balance"] for r in responses} == {100}
    assert rows(db, User) == 1
    assert rows(db, Identity, Identity.issuer == ISSUER, Identity.subject == "first-sight") == 1
    with db.read() as session:
        entries = session.execute(select(LedgerEntry.kind, LedgerEntry.amount)).all()
    assert [tuple(e) for e in entries] == [("grant", 100)]  # one sign-up grant
    assert idp.fetches == 1
