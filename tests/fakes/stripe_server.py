"""A fake of the Stripe API on 127.0.0.1 (the parts CineWeave calls), and Stripe's webhook signing.

It answers ``POST /v1/customers``, ``POST /v1/checkout/sessions`` and
``POST /v1/billing_portal/sessions`` as Stripe does (form-encoded bodies, ``Idempotency-Key``
honoured: a repeated key gets the first answer), and records every request (path, decoded form,
headers) for assertions. :func:`sign` builds a ``Stripe-Signature`` header exactly as Stripe
does: ``t={timestamp},v1={hex HMAC-SHA256 of "{timestamp}.{payload}" with the endpoint secret}``.

    with FakeStripe() as fake:
        settings = Settings(stripe_secret_key=fake.api_key, stripe_api_base=fake.base_url, ...)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.server import ServerThread

WEBHOOK_SECRET = "whsec_test_cineweave"


@dataclass
class Recorded:
    method: str
    path: str
    form: dict[str, str]
    headers: dict[str, str]


@dataclass
class FakeStripe:
    api_key: str = field(default_factory=lambda: "sk_test_" + secrets.token_hex(8))
    requests: list[Recorded] = field(default_factory=list)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    _idempotent: dict[str, dict[str, Any]] = field(default_factory=dict)
    _server: ServerThread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start the fake first"
        return self._server.url

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    # the app -------------------------------------------------------------------------------
    def _app(self) -> Starlette:
        async def handle(request: Request) -> JSONResponse:
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return JSONResponse({"error": {"type": "invalid_request_error", "message": "Invalid API Key"}},
                                    status_code=401)
            form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
            self.requests.append(Recorded(request.method, request.url.path, form, dict(request.headers)))
            key = request.headers.get("idempotency-key")
            if key and key in self._idempotent:
                return JSONResponse(self._idempotent[key])
            answer = self._answer(request.url.path, form)
            if answer is None:
                return JSONResponse({"error": {"type": "invalid_request_error",
                                               "message": f"Unrecognized request URL ({request.url.path})"}},
                                    status_code=404)
            if key:
                self._idempotent[key] = answer
            return JSONResponse(answer)

        return Starlette(routes=[Route("/v1/{path:path}", handle, methods=["POST", "GET"])])

    def _answer(self, path: str, form: dict[str, str]) -> dict[str, Any] | None:
        now = int(time.time())
        if path == "/v1/customers":
            cid = "cus_" + secrets.token_hex(7)
            obj = {"id": cid, "object": "customer", "created": now, "email": form.get("email"),
                   "metadata": _sub(form, "metadata")}
            self.customers[cid] = obj
            return obj
        if path == "/v1/checkout/sessions":
            sid = "cs_test_" + secrets.token_hex(12)
            obj = {"id": sid, "object": "checkout.session", "created": now, "mode": form.get("mode"),
                   "customer": form.get("customer"), "url": f"https://checkout.stripe.com/c/pay/{sid}",
                   "metadata": _sub(form, "metadata"), "status": "open", "payment_status": "unpaid"}
            self.sessions[sid] = obj
            return obj
        if path == "/v1/billing_portal/sessions":
            pid = "bps_" + secrets.token_hex(10)
            return {"id": pid, "object": "billing_portal.session", "created": now, "customer": form.get("customer"),
                    "return_url": form.get("return_url"), "url": f"https://billing.stripe.com/p/session/{pid}"}
        return None

    # lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> FakeStripe:
        self._server = ServerThread(self._app(), name="fake-stripe").start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.stop()


def _sub(form: dict[str, str], prefix: str) -> dict[str, str]:
    """``metadata[account_id]=x`` -> ``{"account_id": "x"}``."""
    out = {}
    for key, value in form.items():
        if key.startswith(prefix + "[") and key.endswith("]") and "][" not in key:
            out[key[len(prefix) + 1:-1]] = value
    return out


# webhooks -------------------------------------------------------------------------------------
def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header Stripe sends for ``payload``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event(kind: str, obj: dict[str, Any], *, created: int | None = None, event_id: str | None = None) -> bytes:
    """A Stripe event's JSON payload (``api_version`` as the library pins it)."""
    import stripe

    return json.dumps({"id": event_id or "evt_" + secrets.token_hex(12), "object": "event",
                       "api_version": stripe.api_version, "created": created or int(time.time()),
                       "type": kind, "livemode": False, "pending_webhooks": 1,
                       "data": {"object": obj}}).encode()
