"""An identity provider for tests: locally generated RSA and EC keys, a JWKS endpoint on 127.0.0.1
(the served key set can change mid-test, every fetch is counted), and token minting with PyJWT.

Forged tokens (``alg: none``, HS256 "signed" with the public key) are built by hand here because
PyJWT rightly refuses to make them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import ServerThread


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @property
    def public(self) -> Any:
        return self.private.public_key()

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        data = json.loads(algorithm.to_jwk(self.public))
        data.update({"kid": self.kid, "use": "sig", "alg": self.alg})
        return data

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})})


def rsa_key(kid: str | None = None, alg: str = "RS256") -> SigningKey:
    return SigningKey(kid or f"rsa-{uuid.uuid4().hex[:8]}", alg,
                      rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str | None = None) -> SigningKey:
    return SigningKey(kid or f"ec-{uuid.uuid4().hex[:8]}", "ES256", ec.generate_private_key(ec.SECP256R1()))


def claims_for(issuer: str, sub: str, audience: str, *, lifetime_s: int = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": issuer, "sub": sub, "aud": audience, "iat": now, "nbf": now, "exp": now + lifetime_s,
            **extra}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def unsigned_token(claims: dict[str, Any], kid: str) -> str:
    """``alg: none``: no signature at all."""
    return _segments({"alg": "none", "typ": "JWT", "kid": kid}, claims) + "."


def hs256_with_public_key(key: SigningKey, claims: dict[str, Any]) -> str:
    """The classic key-confusion forgery: HMAC-SHA256 keyed with the issuer's public key (PEM)."""
    signing_input = _segments({"alg": "HS256", "typ": "JWT", "kid": key.kid}, claims)
    mac = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


@dataclass
class JwksServer:
    """``with JwksServer([key]) as idp: idp.url`` serves ``{"keys": [...]}`` at ``idp.jwks_url``."""

    keys: list[SigningKey] = field(default_factory=list)
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)  # served as given (odd or bad keys)
    status: int = 200
    fetches: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ServerThread | None = None

    def _app(self) -> Starlette:
        async def jwks(_request: Request) -> Response:
            with self._lock:
                self.fetches += 1
                if self.status != 200:
                    return Response("down", status_code=self.status)
                return JSONResponse({"keys": [k.jwk() for k in self.keys] + self.extra_jwks})

        return Starlette(routes=[Route("/.well-known/jwks.json", jwks)])

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/.well-known/jwks.json"

    def start(self) -> JwksServer:
        self._server = ServerThread(self._app(), name="jwks").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def __enter__(self) -> JwksServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
