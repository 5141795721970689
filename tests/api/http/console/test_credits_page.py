"""The Credits page in a real browser: balance, reserved, plan and the ledger's transactions
(paginated); a slow job canceled from the live view comes back as a refund."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.api.http.console.test_generate_page import job_id_of
from tests.api.http.console.test_signin_page import ROLE_PROBE, sign_in
from tests.fixtures.browser import ConsoleStack, screenshot

pytestmark = [pytest.mark.ray, pytest.mark.browser]


def test_cancel_a_slow_job_and_see_the_refund(page: Any, console_stack: ConsoleStack) -> None:
    from playwright.sync_api import expect

    ray_api = console_stack.api
    user = console_stack.user(credits=100)
    sign_in(page, user.api_key)
    expect(page.get_by_test_id("submit")).to_be_visible(timeout=30_000)
    page.get_by_test_id("model-select").select_option("tiny-wan")
    token = ray_api.hold(step=1)  # the slow job: held by the harness's hook until canceled
    page.get_by_label("Prompt", exact=True).fill(f"a slow storm over the sea {token}")
    price = page.get_by_test_id("price")
    expect(price).to_have_text(re.compile(r"^\d+ credits?"), timeout=30_000)
    quoted = int(price.get_attribute("data-credits") or -1)
    assert 0 < quoted < 100
    page.get_by_test_id("submit").click()
    job_id = job_id_of(page)
    ray_api.wait_held(job_id)
    expect(page.get_by_test_id("job-status")).to_contain_text("Running", timeout=30_000)
    expect(page.get_by_test_id("header-balance")).to_have_text(f"{100 - quoted} credits", timeout=30_000)

    page.get_by_test_id("cancel").click()
    expect(page.get_by_test_id("job-status")).to_contain_text("Canceled", timeout=60_000)
    expect(page.get_by_test_id("cancel")).to_be_hidden()
    job = ray_api.job(user.api_key, job_id)
    assert job["credits"]["refunded"] == quoted and job["credits"]["charged"] == 0

    page.get_by_test_id("nav-credits").click()
    expect(page.get_by_test_id("balance")).to_have_text("100 credits", timeout=30_000)
    expect(page.get_by_test_id("reserved")).to_have_text("0 credits")
    expect(page.get_by_test_id("plan")).not_to_be_empty()
    expect(page.get_by_test_id("header-balance")).to_have_text("100 credits")
    refund = page.locator(f"[data-testid=transaction][data-kind=refund][data-job-id='{job_id}']")
    expect(refund).to_be_visible()
    expect(refund.locator("td").nth(2)).to_have_text(re.compile(rf"^\+?{quoted}$"))
    expect(page.locator(f"[data-testid=transaction][data-kind=reserve][data-job-id='{job_id}']")).to_be_visible()
    screenshot(page, "credits")
    page.errors.assert_none(allow=(ROLE_PROBE,))


def test_transactions_are_paginated(page: Any, console_stack: ConsoleStack) -> None:
    from playwright.sync_api import expect

    ray_api = console_stack.api
    user = console_stack.user(credits=50)  # one grant
    ray_api.run(user.api_key, "tiny-sd", {"prompt": "a lighthouse"})  # a reserve and a capture
    with ray_api.http(user.api_key) as client:
        ledger = client.get("/v1/credits/transactions").json()["data"]
        credits = client.get("/v1/credits").json()
    assert len(ledger) == 3
    sign_in(page, user.api_key)
    expect(page.get_by_test_id("submit")).to_be_visible(timeout=30_000)
    page.goto("/#/credits?limit=2")
    rows = page.get_by_test_id("transaction")
    expect(rows).to_have_count(2, timeout=30_000)
    expect(page.get_by_test_id("balance")).to_have_text(f"{credits['balance']} credits")
    page.get_by_test_id("transactions-more").click()
    expect(rows).to_have_count(3, timeout=30_000)
    expect(page.get_by_test_id("transactions-more")).to_be_hidden()
    # newest first, as the API lists them
    assert [r.get_attribute("data-kind") for r in rows.all()] == [e["kind"] for e in ledger]
    page.errors.assert_none(allow=(ROLE_PROBE,))
