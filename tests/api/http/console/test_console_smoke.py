"""The console loads from the API's own origin in a real browser, without a single error."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.browser import ConsoleStack, screenshot

pytestmark = [pytest.mark.ray, pytest.mark.browser]


def test_console_loads_without_errors(page: Any, console_stack: ConsoleStack) -> None:
    response = page.goto("/")
    assert response is not None and response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_load_state("networkidle")
    assert page.title()
    assert page.locator("body").inner_text().strip()
    screenshot(page, "console-smoke")
    page.errors.assert_none()
