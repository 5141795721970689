"""Run the API (uvicorn) beside the embedded stack, in the foreground or in a thread."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from api.http.app import create_app
from api.settings import Settings
from ops.stack import EmbeddedStack

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def build_server(settings: Settings, stack: EmbeddedStack, log_level: str = "warning") -> uvicorn.Server:
    from ops.opscmd import watch_replica_gpu_memory

    app = create_app(settings, stack.executor(), catalog=stack.catalog, availability=stack.availability,
                     swapper=stack.swap)
    watch_replica_gpu_memory(app, stack)  # cineweave_replica_gpu_memory_bytes on /metrics
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


class StopRequested(Exception):
    """SIGTERM arrived: leave the foreground run through its clean-up."""


def _stop_on_sigterm() -> None:
    def handler(signum: int, _frame: object) -> None:
        raise StopRequested(signum)

    signal.signal(signal.SIGTERM, handler)


def run_foreground(settings: Settings, models: list[str] | None = None) -> None:
    """``cineweave up``: runs until Ctrl-C or SIGTERM, then stops the API, Serve and Ray, and returns.

    ``ray.init`` installs a SIGTERM handler that exits with status 15 and uvicorn re-raises the
    signal once it has shut down, so without our own handler a SIGTERM ends ``up`` with a failure
    status (and one during start-up would skip the clean-up). Ours turns it into a normal stop.
    """
    stack = EmbeddedStack(settings, models=models)
    _stop_on_sigterm()
    try:
        stack.start_ray()
        _stop_on_sigterm()  # ray.init replaced it
        stack.build_tiny()
        stack.deploy()
        server = build_server(settings, stack, log_level="info")
        logger.info("CineWeave API on http://%s:%d (models: %s)", settings.host, settings.port,
                    ", ".join(sorted(stack.handles)) or "none")
        server.run()  # handles Ctrl-C and SIGTERM itself, then re-raises the signal to our handler
    except (StopRequested, KeyboardInterrupt):
        logger.info("stopping")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        try:
            stack.stop()
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        logger.info("stopped: Serve and Ray are down")


@contextmanager
def running_stack(settings: Settings, models: list[str] | None = None,
                  startup_timeout_s: float = 600.0, *,
                  postprocess: bool = True) -> Iterator[tuple[str, EmbeddedStack]]:
    """The whole stack with the API in a background thread; yields (base_url, stack).

    ``postprocess=False``: no post-processing app (one joining a Ray session whose Serve already
    runs another stack's: the app name is shared, so deploying it would replace theirs)."""
    stack = EmbeddedStack(settings, models=models, postprocess=postprocess)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    try:
        stack.start()
        server = build_server(settings, stack)
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        base_url = f"http://{settings.host}:{settings.port}"
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200 and server.started:
                    break
            except httpx.HTTPError:
                pass
            if not thread.is_alive():
                raise RuntimeError("the API server stopped during start-up")
            time.sleep(0.1)
        else:
            raise TimeoutError("the API did not start in time")
        yield base_url, stack
    finally:
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=30)
        stack.stop()
