"""Our side of provider webhooks for tests: ``POST /v1/webhooks/{provider}`` on 127.0.0.1.

It does what the API route does — hands the raw body and headers to a ProviderWebhookReceiver
and answers 200 or 401 — but runs in a thread. Given a ``loop`` it forwards each call to that loop
(the test's, where the runs live); with ``loop=None`` it calls the receiver on its own loop, in its
own thread, as an API served apart from the runner would.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.core.executor import ProviderWebhookReceiver
from tests.fakes.server import ServerThread

FORWARD_TIMEOUT_S = 10.0


class WebhookSink:
    def __init__(self, receiver: ProviderWebhookReceiver, loop: asyncio.AbstractEventLoop | None) -> None:
        self.receiver = receiver
        self.loop = loop
        self.deliveries: list[dict[str, Any]] = []
        self.server = ServerThread(Starlette(routes=[
            Route("/v1/webhooks/{provider}", self._receive, methods=["POST"])]), name="webhook-sink")

    @property
    def url(self) -> str:
        """What ``settings.public_url`` should be."""
        return self.server.url

    def __enter__(self) -> WebhookSink:
        self.server.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.stop()

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        call = self.receiver.handle_webhook(request.path_params["provider"], headers, body)
        if self.loop is None:
            accepted = await asyncio.wait_for(call, FORWARD_TIMEOUT_S)
        else:
            future = asyncio.run_coroutine_threadsafe(call, self.loop)
            accepted = await asyncio.wait_for(asyncio.wrap_future(future), FORWARD_TIMEOUT_S)
        self.deliveries.append({"provider": request.path_params["provider"],
                                "webhook_id": headers.get("webhook-id"), "accepted": accepted})
        if not accepted:
            return JSONResponse({"error": {"code": "invalid_signature",
                                           "message": "webhook signature or timestamp is invalid"}},
                                status_code=401)
        return JSONResponse({"ok": True})


class CountingReceiver:
    """A client's webhook endpoint (``POST /hook``) that counts deliveries by ``webhook-id``.

    Built around a :class:`ServerThread` whose socket is bound at construction and only listens
    once started: before :meth:`start`, a delivery is refused at connect ("the receiver is down").
    """

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.server = ServerThread(Starlette(routes=[Route("/hook", self._hook, methods=["POST"])]),
                                   name="webhook-receiver")
        self.started = False

    @property
    def url(self) -> str:
        return f"{self.server.url}/hook"

    def start(self) -> CountingReceiver:
        self.server.start()
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            self.server.stop()

    def counts(self) -> dict[str, int]:
        counted: dict[str, int] = {}
        for headers, _ in list(self.received):
            counted[headers.get("webhook-id", "")] = counted.get(headers.get("webhook-id", ""), 0) + 1
        return counted

    async def _hook(self, request: Request) -> Response:
        self.received.append((dict(request.headers), await request.body()))
        return JSONResponse({"ok": True})
