"""The browser-test harness itself (no browser, no Ray): the console test modules import without
Playwright (so the ``browser`` fixture, not a module-level skip, decides: CI fails), earlier
runs' failure screenshots are cleared, and ``.ci/run`` stops clearly on a ``CINEWEAVE_CHROMIUM``
it cannot supply."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.browser import clear_failed_screenshots

REPO = Path(__file__).resolve().parents[3]
CONSOLE_TESTS = sorted((REPO / "tests" / "api" / "http" / "console").glob("test_*.py"))


@pytest.mark.parametrize("path", CONSOLE_TESTS, ids=[p.name for p in CONSOLE_TESTS])
def test_console_test_modules_import_without_playwright(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules: ``import playwright...`` raises ImportError, as on a machine without it
    for name in ("playwright", "playwright.sync_api"):
        monkeypatch.setitem(sys.modules, name, None)
    spec = importlib.util.spec_from_file_location(f"_console_probe_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - a module-level importorskip raises Skipped (not an Exception)
        pytest.fail(f"{path.name} does not import without Playwright ({type(exc).__name__}: {exc}); import it "
                    "inside the tests so the browser fixture's fail-under-CI rule applies")


def test_failed_screenshots_of_earlier_runs_are_cleared(tmp_path: Path) -> None:
    for name in ("FAILED-test_a.png", "FAILED-test_b-1.png", "generate.png", "FAILED-notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert clear_failed_screenshots(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FAILED-notes.txt", "generate.png"]
    assert clear_failed_screenshots(tmp_path / "absent") == 0


def test_ci_run_stops_on_a_missing_custom_chromium(tmp_path: Path) -> None:
    """Nothing is installed: stand-ins for apt-get, sudo and make fail loudly if it gets that far."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "sudo", "make"):
        stub = bin_dir / tool
        stub.write_text(f"#!/bin/sh\necho 'ran {tool}' >&2\nexit 97\n")
        stub.chmod(0o755)
    missing = tmp_path / "no-such" / "chromium"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "CINEWEAVE_CHROMIUM": str(missing)}
    done = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert f"CINEWEAVE_CHROMIUM={missing} is not an executable file" in done.stderr
    assert "ran " not in done.stderr and "installing chromium" not in done.stdout
