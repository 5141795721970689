"""A whole API process for multi-process tests: ``python -m tests.fakes.api_process --fd N``.

Settings come from the environment (``CINEWEAVE_*``, as in production); the compute is the
scripted :class:`FakeExecutor`, with one test hook: a job whose prompt starts with ``hold`` stops
after its first progress step until the file ``<CINEWEAVE_TEST_GATE_DIR>/<prompt>`` exists (bounded
wait). The socket is bound by the parent on 127.0.0.1 and handed over as an inherited descriptor,
so the port is known before the child starts and nothing races for it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from api.core.events import ErrorEvent, ExecutorEvent, ProgressEvent
from api.core.executor import ExecutionRequest
from api.http.app import create_app
from api.settings import Settings
from api.storage.local import LocalStorage
from tests.fixtures.fake_executor import FakeExecutor

GATE_WAIT_S = 60.0


@dataclass
class GatedExecutor(FakeExecutor):
    gate_dir: Path | None = None

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        prompt = str(request.input.get("prompt", ""))
        held = False
        async for event in super().run(request):
            yield event
            if not held and isinstance(event, ProgressEvent) and prompt.startswith("hold") and self.gate_dir:
                held = True
                loop = asyncio.get_running_loop()
                deadline = loop.time() + GATE_WAIT_S
                while not (self.gate_dir / prompt).exists():
                    if loop.time() > deadline:
                        yield ErrorEvent("gate_timeout", "the test never opened the gate", retryable=False)
                        return
                    await asyncio.sleep(0.01)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True, help="an inherited, bound TCP socket")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    settings = Settings()
    gate = os.environ.get("CINEWEAVE_TEST_GATE_DIR")
    storage = LocalStorage(settings.data_dir / "storage", signing_secret=settings.resolved_signing_secret(),
                           base_url=settings.public_url or "http://127.0.0.1:8000")
    executor = GatedExecutor(storage=storage, steps=4, gate_dir=Path(gate) if gate else None)
    app = create_app(settings, executor, storage=storage, run_maintenance=False)
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
