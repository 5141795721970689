"""``make demo``'s ending: the console's URL and keys, and DEMO_KEEP=1 holding the stack until stopped."""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import pytest

from ops import demo


@pytest.mark.parametrize(("value", "keep"), [(None, False), ("", False), ("0", False), ("false", False),
                                             ("1", True), ("yes", True), ("TRUE", True)])
def test_keep_requested(monkeypatch: pytest.MonkeyPatch, value: str | None, keep: bool) -> None:
    if value is None:
        monkeypatch.delenv("DEMO_KEEP", raising=False)
    else:
        monkeypatch.setenv("DEMO_KEEP", value)
    assert demo.keep_requested() is keep


def test_a_kept_stack_gets_the_configured_port_when_free() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        taken = probe.getsockname()[1]
        probe.listen()
        # taken: another port; without keep: any free port
        assert demo.port_for("127.0.0.1", taken, keep=True) != taken
    assert demo.port_for("127.0.0.1", taken, keep=True) == taken  # free again
    assert demo.port_for("127.0.0.1", taken, keep=False) != 0


def test_the_console_url_and_keys_are_printed(capsys: pytest.CaptureFixture[str]) -> None:
    demo.print_console("http://127.0.0.1:8000", "admin-k", "cw_user_k", keep=False)
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8000/" in out and "admin-k" in out and "cw_user_k" in out
    assert "DEMO_KEEP=1" in out
    demo.print_console("http://127.0.0.1:8000", "admin-k", "cw_user_k", keep=True)
    assert "DEMO_KEEP=1" not in capsys.readouterr().out


def test_kept_stack_waits_until_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait ends on SIGTERM (sent once the handler is in place: when the wait announces itself)."""
    printed: list[str] = []

    def fake_print(text: str, *_: Any, **__: Any) -> None:
        printed.append(text)
        if "keeps running" in text:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(demo.console, "print", fake_print)
    demo.wait_until_stopped()
    assert any("Ctrl-C" in line for line in printed) and printed[-1].startswith("stopping")
    assert signal.getsignal(signal.SIGTERM) == before  # restored
