"""Browser tests of the web console against the embedded stack on tiny models.

Fixtures:
- ``browser`` (session): headless Debian Chromium through Playwright's sync API; skips with a
  printed reason when Playwright or Chromium is missing, fails instead under ``CI`` or
  ``CINEWEAVE_REQUIRE_BROWSER=1`` (see ``tests/fixtures/browser.py``);
- ``console_stack`` (session): the real API over Ray Serve (``ray_api``: tiny-sd, tiny-wan,
  tiny-wan-i2v and the LoRA trainer) on 127.0.0.1, with users and the admin key;
- ``make_page(**context_options)``: a page in a fresh browser context (its own session storage)
  whose base URL is the stack's, with a :class:`PageErrors` collector at ``page.errors``;
  ``page``: one such page per test; ``console_errors``: that page's collector.

Every test in this directory is marked ``ray`` and ``browser`` here; run them under
``flock /tmp/cw-ray.lock``. A failing test leaves ``var/screenshots/FAILED-<test>.png`` (those of
earlier runs are deleted when the session's browser starts).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.browser import (
    CHROMIUM_ARGS,
    ConsoleStack,
    PageErrors,
    browser_required,
    chromium_path,
    clear_failed_screenshots,
    missing_browser,
    screenshot,
)
from tests.fixtures.ray import RayApi

HERE = Path(__file__).resolve().parent
DEFAULT_TIMEOUT_MS = 30_000  # every Playwright wait is bounded; a test may pass a longer one
_skip_reasons: list[str] = []


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_REPORT] = report


_REPORT = pytest.StashKey[pytest.TestReport]()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason in dict.fromkeys(_skip_reasons):
        terminalreporter.write_line(f"browser tests skipped: {reason}", yellow=True)


# Package scope, not session: Playwright's sync API keeps an asyncio loop running on the main thread
# while it is started, which breaks every later test that runs a loop (pytest-asyncio, Ray's sync
# handles). It stops after this folder's last test.
@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    reason = missing_browser()
    if reason is not None:
        if browser_required():
            pytest.fail(f"browser tests are required here (CI or CINEWEAVE_REQUIRE_BROWSER=1) but {reason}",
                        pytrace=False)
        _skip_reasons.append(reason)
        pytest.skip(f"browser tests: {reason}")
    clear_failed_screenshots()  # once a session: the FAILED-*.png left are this run's
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                                  args=CHROMIUM_ARGS, timeout=60_000)
        except Exception as exc:  # a broken Chromium is a missing one, except where required
            if browser_required():
                raise
            _skip_reasons.append(f"{chromium_path()} does not start: {exc}")
            pytest.skip(f"browser tests: {chromium_path()} does not start: {exc}")
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="package")
def console_stack(browser: Any, ray_api: RayApi) -> ConsoleStack:
    """Asks for ``browser`` first, so a machine without one skips before Ray starts."""
    from serve.executor import TRAINER_KEY

    assert TRAINER_KEY in ray_api.stack.handles, "the LoRA trainer is not deployed in the embedded stack"
    return ConsoleStack(api=ray_api)


@pytest.fixture
def make_page(browser: Any, console_stack: ConsoleStack, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    contexts: list[Any] = []
    pages: list[Any] = []

    def make(**context_options: Any) -> Any:
        options = {"viewport": {"width": 1280, "height": 900}, "base_url": console_stack.url, **context_options}
        context = browser.new_context(**options)
        context.set_default_timeout(DEFAULT_TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.errors = PageErrors()
        page.errors.attach(page)
        pages.append(page)
        return page

    yield make
    report = request.node.stash.get(_REPORT, None)
    if report is not None and report.failed:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:100].strip("-")
        for i, page in enumerate(pages):
            try:
                screenshot(page, f"FAILED-{name}" + (f"-{i}" if i else ""))
            except Exception:  # noqa: BLE001 - a closed page: nothing to show
                pass
    for context in contexts:
        context.close()


@pytest.fixture
def page(make_page: Callable[..., Any]) -> Any:
    return make_page()


@pytest.fixture
def console_errors(page: Any) -> PageErrors:
    return page.errors
