"""Sign in to the console: a user's key, the admin key, a wrong key (a readable error), the key kept
in session storage only, and a layout that fits a phone's width."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.fixtures.browser import ConsoleStack, screenshot

pytestmark = [pytest.mark.ray, pytest.mark.browser]

KEY_STORAGE = "cineweave.key"
# The console learns the role by asking /v1/admin/stats (403 for a plain user): Chromium logs that
# expected 403 as a failed resource load; it is the only error a user's page may report.
ROLE_PROBE = "/v1/admin/stats"


def sign_in(page: Any, key: str) -> None:
    """Open the console and sign in with ``key`` (bounded waits; the caller checks the outcome)."""
    from playwright.sync_api import expect

    page.goto("/")
    expect(page.get_by_test_id("api-key")).to_be_visible(timeout=30_000)
    page.get_by_label("API key").fill(key)
    page.get_by_test_id("sign-in").click()


def test_user_signs_in_and_out(page: Any, console_stack: ConsoleStack) -> None:
    from playwright.sync_api import expect

    user = console_stack.user(credits=321)
    page.goto("/")
    expect(page.get_by_test_id("api-key")).to_be_visible(timeout=30_000)
    screenshot(page, "signin")
    sign_in(page, user.api_key)
    expect(page.get_by_test_id("page-generate")).to_be_visible(timeout=30_000)
    expect(page.get_by_test_id("role")).to_have_text("User")
    expect(page.get_by_test_id("header-balance")).to_have_text("321 credits")
    for nav in ("nav-generate", "nav-library", "nav-credits"):
        expect(page.get_by_test_id(nav)).to_be_visible()
    expect(page.get_by_test_id("nav-admin")).to_have_count(0)
    # the key lives in this tab's session storage, never in the address or local storage
    assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") == user.api_key
    assert page.evaluate("Object.keys(localStorage).length") == 0
    assert user.api_key not in page.url
    # a reload keeps the session (same tab)
    page.reload()
    expect(page.get_by_test_id("role")).to_have_text("User", timeout=30_000)
    page.get_by_test_id("sign-out").click()
    expect(page.get_by_test_id("api-key")).to_be_visible()
    assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") is None
    page.errors.assert_none(allow=(ROLE_PROBE,))


def test_a_wrong_key_shows_a_readable_error(page: Any, console_stack: ConsoleStack) -> None:
    from playwright.sync_api import expect

    sign_in(page, "cw_this-is-not-a-key")
    error = page.get_by_test_id("signin-error")
    expect(error).to_be_visible(timeout=30_000)
    expect(error).to_contain_text("API key was not accepted")
    text = error.inner_text()
    assert "Error" not in text and " at " not in text and "{" not in text  # no stack trace, no JSON
    expect(page.get_by_label("API key")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_test_id("nav-generate")).to_have_count(0)
    assert page.evaluate(f"sessionStorage.getItem('{KEY_STORAGE}')") is None
    screenshot(page, "signin-wrong-key")
    # Chromium logs the 401 answer as a failed resource load; nothing else may go wrong
    page.errors.assert_none(allow=("401",))


def test_the_admin_key_gets_the_admin_role(page: Any, console_stack: ConsoleStack) -> None:
    from playwright.sync_api import expect

    sign_in(page, console_stack.admin_key)
    expect(page.get_by_test_id("role")).to_have_text("Admin key", timeout=30_000)
    assert "#/admin" in page.url
    # user pages answer 403 to the admin key: the console does not offer them
    expect(page.get_by_test_id("nav-generate")).to_have_count(0)
    expect(page.get_by_test_id("header-balance")).to_have_count(0)
    page.errors.assert_none(allow=("403",))


def test_phone_width_layout(make_page: Callable[..., Any], console_stack: ConsoleStack) -> None:
    """At 375 px nothing scrolls sideways and the nav stays reachable by keyboard."""
    from playwright.sync_api import expect

    page = make_page(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    user = console_stack.user(credits=50)
    sign_in(page, user.api_key)
    expect(page.get_by_test_id("page-generate")).to_be_visible(timeout=30_000)
    expect(page.get_by_test_id("submit")).to_be_visible(timeout=30_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    # the page has finished rendering once it moves focus to its heading (after that nothing
    # takes focus away from the skip link)
    expect(page.locator("#view h1")).to_be_focused(timeout=30_000)
    # keyboard: the skip link (shown when focused) is followed by the brand and the nav
    page.locator(".skip-link").focus()
    expect(page.locator(".skip-link")).to_be_focused()
    box = page.locator(".skip-link").bounding_box()
    assert box is not None and box["x"] >= 0
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.testid") == "nav-generate"
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("page-library")).to_be_visible(timeout=30_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.get_by_test_id("nav-credits").click()
    expect(page.get_by_test_id("balance")).to_be_visible(timeout=30_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # the table scrolls in its box
    screenshot(page, "credits-phone")
    page.get_by_test_id("nav-generate").click()
    expect(page.get_by_test_id("submit")).to_be_visible(timeout=30_000)
    screenshot(page, "generate-phone")
    page.errors.assert_none(allow=(ROLE_PROBE,))


def test_the_dark_theme_follows_the_system(make_page: Callable[..., Any], console_stack: ConsoleStack) -> None:
    from playwright.sync_api import expect

    def background(color_scheme: str) -> tuple[int, ...]:
        page = make_page(color_scheme=color_scheme)
        page.goto("/")
        expect(page.get_by_test_id("api-key")).to_be_visible(timeout=30_000)
        rgb = page.evaluate("getComputedStyle(document.body).backgroundColor")
        if color_scheme == "dark":
            screenshot(page, "signin-dark")
        return tuple(int(x) for x in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3])

    assert sum(background("light")) > 600
    assert sum(background("dark")) < 150
