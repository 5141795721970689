"""The Library in a real browser: the user's jobs paginated by next_cursor, filters by kind and
status, thumbnails and video posters, a viewer that plays the MP4 and shows inputs and seed,
"run again" and delete."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.http.console.test_signin_page import ROLE_PROBE, sign_in
from tests.fixtures.browser import ConsoleStack, screenshot

pytestmark = [pytest.mark.ray, pytest.mark.browser]

VIEWER_VIDEO_DURATION = """() => {
  const v = document.querySelector('[data-testid=viewer] [data-testid=output-video]');
  return v && v.readyState >= 1 && Number.isFinite(v.duration) && v.duration > 0 ? v.duration : null;
}"""


def test_library_pages_filters_views_runs_again_and_deletes(page: Any, console_stack: ConsoleStack) -> None:
    from playwright.sync_api import expect

    ray_api = console_stack.api
    user = console_stack.user(credits=500)
    first = ray_api.run(user.api_key, "tiny-sd", {"prompt": "a red lighthouse", "seed": 1234})
    second = ray_api.run(user.api_key, "tiny-sd", {"prompt": "a blue lighthouse", "steps": 3})
    video = ray_api.run(user.api_key, "tiny-wan", {"prompt": "waves"}, timeout_s=120)
    sign_in(page, user.api_key)
    expect(page.get_by_test_id("submit")).to_be_visible(timeout=30_000)

    # two per page: newest first, then "load more" brings the last one and disappears
    page.goto("/#/library?limit=2")
    tiles = page.get_by_test_id("job-tile")
    expect(tiles).to_have_count(2, timeout=30_000)
    assert [t.get_attribute("data-job-id") for t in tiles.all()] == [video["id"], second["id"]]
    page.get_by_test_id("load-more").click()
    expect(tiles).to_have_count(3, timeout=30_000)
    expect(page.get_by_test_id("load-more")).to_be_hidden()

    # filter by kind: the video alone, with its poster
    page.get_by_label("Kind").select_option("video")
    expect(tiles).to_have_count(1, timeout=30_000)
    video_tile = page.locator(f"[data-testid=job-tile][data-job-id='{video['id']}']")
    poster = video_tile.get_by_test_id("poster")
    expect(poster).to_be_visible()
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=poster.element_handle(),
                           timeout=30_000)
    # the viewer plays the MP4 and shows the inputs and the seed
    video_tile.get_by_role("button").first.click()
    viewer = page.get_by_test_id("viewer")
    expect(viewer).to_be_visible()
    player = viewer.get_by_test_id("output-video")
    expect(player).to_be_visible()
    assert player.get_attribute("controls") is not None
    assert page.wait_for_function(VIEWER_VIDEO_DURATION, timeout=30_000).json_value() > 0
    expect(viewer.get_by_test_id("detail-Seed")).to_have_text(str(video["input"]["seed"]))
    expect(viewer.get_by_test_id("detail-prompt")).to_have_text("waves")
    expect(viewer.get_by_test_id("use-as-input")).to_have_count(0)  # only images are inputs
    screenshot(page, "library-viewer")

    page.get_by_label("Kind").select_option("image")
    expect(tiles).to_have_count(2, timeout=30_000)
    expect(tiles.get_by_test_id("thumbnail")).to_have_count(2)
    page.get_by_label("Status").select_option("failed")
    expect(tiles).to_have_count(0, timeout=30_000)
    expect(page.get_by_test_id("library-empty")).to_be_visible()
    page.get_by_label("Status").select_option("succeeded")
    expect(tiles).to_have_count(2, timeout=30_000)

    # run again: Generate with the same model and input (seed included)
    first_tile = page.locator(f"[data-testid=job-tile][data-job-id='{first['id']}']")
    first_tile.get_by_role("button").first.click()
    expect(viewer.get_by_test_id("detail-Seed")).to_have_text("1234")
    viewer.get_by_test_id("run-again").click()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a red lighthouse", timeout=30_000)
    assert page.get_by_test_id("model-select").input_value() == "tiny-sd"
    expect(page.get_by_label("Seed")).to_have_value("1234")

    # delete: two steps (no dialog), the outputs go, the job stays in the list
    page.goto("/#/library")
    first_tile = page.locator(f"[data-testid=job-tile][data-job-id='{first['id']}']")
    expect(first_tile).to_be_visible(timeout=30_000)
    first_tile.get_by_role("button").first.click()
    viewer.get_by_test_id("delete").click()
    viewer.get_by_test_id("delete-confirm").click()
    expect(page.get_by_test_id("toast-success").filter(has_text="Deleted the outputs")).to_be_visible(timeout=30_000)
    expect(first_tile.get_by_test_id("thumbnail")).to_have_count(0)
    expect(first_tile).to_contain_text("outputs deleted")
    assert ray_api.job(user.api_key, first["id"])["outputs"] == []
    screenshot(page, "library-after-delete")
    page.errors.assert_none(allow=(ROLE_PROBE,))
