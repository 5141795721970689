"""The console's Admin page in a real browser (issue 12): stats, users, grants, models.

The admin key signs in and lands on Admin; it sees the stats (success rate, failure reasons,
overflow), the users with their balances and the models with their availability; it grants
credits to a user (the user's balance changes, checked over the API with the user's own key),
changes another user's plan and disables them, creates a user whose shown-once key works, and a
bad swap source is answered with a readable error. Screenshots at desktop and phone width.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest

from api.db.tables import Job
from tests.fixtures.browser import ConsoleStack, screenshot
from tests.fixtures.harness import ADMIN_KEY, add_user, bearer

pytestmark = [pytest.mark.ray, pytest.mark.browser]


def expect(target: Any, *args: Any, **kwargs: Any) -> Any:
    """Playwright's ``expect``, imported when a test runs, not at collection: without Playwright the
    browser fixture decides (a printed skip on a bare machine, a failure under CI)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target, *args, **kwargs)


# the shell tells the admin key from a user by its 403 on /v1/credits (Chromium logs it)
ADMIN_PROBE = "/v1/credits:0)"
# and an admin user from a user by /v1/admin/stats (403 for a user)
USER_PROBE = "/v1/admin/stats:0)"


def sign_in(page: Any, key: str) -> None:
    page.goto("/")
    page.get_by_test_id("api-key").fill(key)
    page.get_by_test_id("sign-in").click()
    expect(page.get_by_test_id("role")).to_be_visible()


def api_get(stack: ConsoleStack, key: str, path: str) -> httpx.Response:
    with httpx.Client(base_url=stack.url, timeout=30, headers=bearer(key)) as client:
        return client.get(path)


def user_row(page: Any, user_id: str) -> Any:
    return page.locator(f'[data-testid="user-row"][data-user-id="{user_id}"]')


def test_admin_grants_credits_and_manages_users(page: Any, console_stack: ConsoleStack) -> None:
    customer = console_stack.user(credits=40)
    other = console_stack.user(credits=0)
    with console_stack.api.db.session() as session:  # a failed job for the failure reasons (never run)
        session.add(Job(user_id=customer.user.id, model="tiny-sd", kind="image", task="t2i", status="failed",
                        error_code="console_test_failure"))
        session.commit()
    sign_in(page, ADMIN_KEY)
    expect(page.get_by_test_id("page-admin")).to_be_visible()  # the admin key's home
    expect(page.get_by_test_id("role")).to_have_text("Admin key")

    # stats from /v1/admin/stats, including the fields this page asked for
    stats = api_get(console_stack, ADMIN_KEY, "/v1/admin/stats").json()
    expect(page.get_by_test_id("stat-users")).to_contain_text(str(stats["users"]))
    rate = stats["outcomes"]["success_rate"]
    expect(page.get_by_test_id("stat-success-rate")).to_contain_text(
        "—" if rate is None else f"{rate * 100:.1f} %")
    expect(page.get_by_test_id("stat-overflow")).to_contain_text(str(stats["overflow"]["jobs"]))
    expect(page.get_by_test_id("failures-table").locator("tr", has_text="console_test_failure")).to_contain_text("tiny-sd")
    assert stats["outcomes"]["by_status"]["failed"] >= 1

    # models with availability, as /v1/models says
    models = api_get(console_stack, ADMIN_KEY, "/v1/models").json()["data"]
    rows = page.get_by_test_id("model-row")
    expect(rows).to_have_count(len(models))
    for model in models:
        cell = page.locator(f'[data-testid="model-row"][data-model-id="{model["id"]}"] [data-testid="model-available"]')
        expect(cell).to_contain_text("Available" if model["available"] else "Unavailable")

    # the grant: the user found by email, picked from their row, typed, submitted with the keyboard
    page.get_by_label("Find by email").fill(customer.user.email.upper())
    expect(page.get_by_test_id("user-row")).to_have_count(1)
    row = user_row(page, customer.user.id)
    expect(row.get_by_test_id("user-balance")).to_have_text("40 credits")
    row.get_by_test_id("user-grant").click()
    amount = page.get_by_test_id("grant-amount")
    expect(amount).to_be_focused()
    expect(page.get_by_test_id("grant-user")).to_have_value(customer.user.id)
    amount.fill("75")
    page.get_by_test_id("grant-note").fill("welcome bonus")
    page.get_by_test_id("grant-note").press("Enter")
    expect(page.get_by_test_id("grant-result")).to_contain_text("balance now 115 credits")
    expect(user_row(page, customer.user.id).get_by_test_id("user-balance")).to_have_text("115 credits")
    credits = api_get(console_stack, customer.api_key, "/v1/credits").json()
    assert credits["balance"] == 115, credits
    ledger = api_get(console_stack, customer.api_key, "/v1/credits/transactions").json()["data"]
    assert [(e["kind"], e["amount"], e["note"]) for e in ledger][0] == ("grant", 75, "welcome bonus"), ledger

    # an empty amount is refused next to its field, nothing granted
    page.get_by_test_id("grant-submit").click()
    expect(page.get_by_test_id("error-amount")).to_be_visible()
    assert api_get(console_stack, customer.api_key, "/v1/credits").json()["balance"] == 115

    # plan change and disable, checked over the API
    page.get_by_label("Find by email").fill(other.user.email)
    other_row = user_row(page, other.user.id)
    other_row.get_by_test_id("user-plan").select_option("creator")
    expect(page.get_by_test_id("toast-success").filter(has_text="creator")).to_be_visible()
    assert api_get(console_stack, ADMIN_KEY, f"/v1/admin/users/{other.user.id}").json()["plan"] == "creator"
    other_row.get_by_test_id("user-toggle").click()
    expect(user_row(page, other.user.id).get_by_test_id("user-toggle")).to_have_text("Enable")
    assert api_get(console_stack, ADMIN_KEY, f"/v1/admin/users/{other.user.id}").json()["disabled"] is True
    assert api_get(console_stack, other.api_key, "/v1/credits").status_code in (401, 403)

    # a new user: the key shown once works
    email = f"new-{customer.user.id[-8:]}@example.com"
    page.get_by_test_id("new-user-email").fill(email)
    page.get_by_test_id("new-user-credits").fill("7")
    page.get_by_test_id("new-user-submit").click()
    key = page.get_by_test_id("new-user-key")
    expect(key).to_be_visible()
    new_credits = api_get(console_stack, key.input_value(), "/v1/credits").json()
    assert new_credits["balance"] == 7, new_credits

    # a swap source the catalog refuses: a readable error, nothing swapped
    page.get_by_test_id("swap-kind").select_option("s3")
    page.get_by_test_id("swap-source").fill("not-an-s3-url")
    page.get_by_test_id("swap-submit").click()
    expect(page.get_by_test_id("swap-error")).to_contain_text("s3://")

    page.get_by_test_id("stats-refresh").click()
    expect(page.get_by_test_id("stat-users")).to_contain_text(str(stats["users"] + 1))
    screenshot(page, "admin")
    page.errors.assert_none(allow=(ADMIN_PROBE, "status of 422 (Unprocessable"))


def test_admin_page_at_phone_width_in_the_dark(make_page: Any, console_stack: ConsoleStack) -> None:
    console_stack.user(credits=5)
    page = make_page(viewport={"width": 375, "height": 800}, color_scheme="dark")
    sign_in(page, ADMIN_KEY)
    expect(page.get_by_test_id("page-admin")).to_be_visible()
    expect(page.get_by_test_id("user-row").first).to_be_visible()
    expect(page.get_by_test_id("model-row").first).to_be_visible()
    # wide tables scroll inside their own box; the page itself does not scroll sideways
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the page is {width} px wide at a 375 px viewport"
    # the system's dark theme: the shell's variables, which the page's own CSS uses too
    background = page.evaluate("getComputedStyle(document.querySelector('.stat')).backgroundColor")
    red, green, blue = (int(v) for v in re.findall(r"\d+", background)[:3])
    assert red + green + blue < 3 * 80, f"a stat card is {background} in the dark theme"
    screenshot(page, "admin-mobile")
    page.errors.assert_none(allow=(ADMIN_PROBE,))


def test_a_user_does_not_see_admin(page: Any, console_stack: ConsoleStack) -> None:
    user = console_stack.user(credits=10)
    sign_in(page, user.api_key)
    expect(page.get_by_test_id("nav-loras")).to_be_visible()
    expect(page.get_by_test_id("nav-admin")).to_have_count(0)
    admin_calls: list[str] = []
    page.on("request", lambda r: admin_calls.append(r.url) if "/v1/admin/" in r.url else None)
    page.goto("/#/admin")  # typed by hand: sent home, no admin call made on its behalf
    expect(page.get_by_test_id("page-generate")).to_be_visible()
    expect(page.get_by_test_id("page-admin")).to_have_count(0)
    assert admin_calls == []
    page.errors.assert_none(allow=(USER_PROBE,))


def test_an_admin_user_sees_both_sides(page: Any, console_stack: ConsoleStack) -> None:
    admin = add_user(console_stack.api.db, console_stack.api.settings, credits=3, admin=True,
                     email=f"ops-{uuid.uuid4().hex[:10]}@example.com")
    sign_in(page, admin.api_key)
    expect(page.get_by_test_id("role")).to_have_text("Admin")
    expect(page.get_by_test_id("nav-loras")).to_be_visible()  # a user's pages too
    page.get_by_test_id("nav-admin").click()
    expect(page.get_by_test_id("page-admin")).to_contain_text("Signed in as an admin user.")
    expect(page.get_by_test_id("stat-users")).to_be_visible()
    page.errors.assert_none()
