"""The Generate page and the live job view in a real browser, against the embedded stack on tiny
models: an image with a moving progress bar and a step preview, then the image in the Library;
a video made from that image, played; an over-limit input shown as a readable error next to its field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.api.http.console.test_signin_page import ROLE_PROBE, sign_in
from tests.fixtures.browser import ConsoleStack, screenshot

pytestmark = [pytest.mark.ray, pytest.mark.browser]

JOB_URL = re.compile(r"#/job/([A-Za-z0-9_-]+)")
RUN_TIMEOUT_MS = 120_000  # a tiny video on a shared CPU

# the <video>'s duration once its metadata is in (a bounded wait_for_function, no sleep)
VIDEO_DURATION = """() => {
  const v = document.querySelector('[data-testid=job-result] [data-testid=output-video]');
  return v && v.readyState >= 1 && Number.isFinite(v.duration) && v.duration > 0 ? v.duration : null;
}"""


def job_id_of(page: Any) -> str:
    from playwright.sync_api import expect

    expect(page).to_have_url(JOB_URL, timeout=30_000)
    match = JOB_URL.search(page.url)
    assert match is not None, page.url
    return match.group(1)


def progress_value(page: Any) -> int:
    return int(page.get_by_test_id("progress").get_attribute("data-value") or 0)


def test_generate_an_image_with_previews_then_a_video_from_it(page: Any, console_stack: ConsoleStack) -> None:
    from playwright.sync_api import expect

    ray_api = console_stack.api
    user = console_stack.user(credits=500)
    sign_in(page, user.api_key)
    expect(page.get_by_test_id("submit")).to_be_visible(timeout=30_000)
    # the model picker shows every model's kind and price
    options = page.get_by_test_id("model-select").locator("option").all_inner_texts()
    assert any("Tiny SD" in o and "image" in o and "credit" in o for o in options), options
    assert any("video" in o for o in options), options
    page.get_by_test_id("model-select").select_option("tiny-sd")
    # the spec's limits are the inputs' bounds
    width = page.get_by_label("Width (px)")
    assert (width.get_attribute("min"), width.get_attribute("max"), width.get_attribute("step")) == ("32", "256", "8")
    assert page.get_by_label("Steps").get_attribute("max") == "50"

    # held after step 2 of 16, then after step 5 (the harness's hook): the stream is live before the
    # first preview (every 2 steps), and the step-4 preview is sent while the job is held at 5
    token = ray_api.hold(steps=(2, 5))
    page.get_by_label("Prompt", exact=True).fill(f"a lighthouse at dusk {token}")
    page.get_by_label("Steps").fill("16")
    price = page.get_by_test_id("price")
    expect(price).to_have_text(re.compile(r"^\d+ credits?"), timeout=30_000)
    quoted = int(price.get_attribute("data-credits") or -1)
    assert quoted > 0
    screenshot(page, "generate")
    page.get_by_test_id("submit").click()

    job_id = job_id_of(page)
    assert ray_api.wait_held(job_id, step=2) == 2
    expect(page.get_by_test_id("progress-text")).to_have_text("2/16", timeout=30_000)  # from the SSE stream
    held_at = progress_value(page)
    assert 0 < held_at < 100
    expect(page.get_by_test_id("job-status")).to_contain_text("Running")
    screenshot(page, "job-live")
    ray_api.release(job_id)
    # held again at 5: the previews of steps 2 and 4 were rendered before it, so at least one is on
    # the page while the job cannot finish (the figure counts them; it gives way to the result at the end)
    assert ray_api.wait_held(job_id, step=5) == 5
    expect(page.get_by_test_id("preview-figure")).to_have_attribute("data-count", re.compile(r"^[1-9]"),
                                                                     timeout=60_000)
    assert (page.get_by_test_id("preview").get_attribute("src") or "").startswith("data:image/jpeg;base64,")
    expect(page.get_by_test_id("job-status")).to_contain_text("Running")
    ray_api.release(job_id)
    expect(page.get_by_test_id("job-status")).to_contain_text("Succeeded", timeout=RUN_TIMEOUT_MS)
    assert progress_value(page) == 100
    image = page.get_by_test_id("job-result").get_by_test_id("output-image")
    expect(image).to_be_visible()
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=30_000)
    assert ray_api.job(user.api_key, job_id)["credits"]["charged"] == quoted
    screenshot(page, "job-done")

    # the image is in the Library, with its thumbnail
    page.get_by_test_id("nav-library").click()
    tile = page.locator(f"[data-testid=job-tile][data-job-id='{job_id}']")
    expect(tile).to_be_visible(timeout=30_000)
    thumb = tile.get_by_test_id("thumbnail")
    expect(thumb).to_be_visible()
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=thumb.element_handle(),
                           timeout=30_000)
    screenshot(page, "library")

    # "use as input": Generate with an image-to-video model and this image set
    tile.get_by_role("button").first.click()
    page.get_by_test_id("use-as-input").click()
    expect(page.get_by_test_id("image-status")).to_contain_text(f"output of {job_id[:12]}", timeout=30_000)
    assert page.get_by_test_id("model-select").input_value() == "tiny-wan-i2v"
    page.get_by_label("Prompt", exact=True).fill("the lighthouse, waves rolling")
    expect(page.get_by_test_id("price")).to_have_text(re.compile(r"^\d+ credits?"), timeout=30_000)
    page.get_by_test_id("submit").click()
    video_job = job_id_of(page)
    expect(page.get_by_test_id("job-status")).to_contain_text("Succeeded", timeout=RUN_TIMEOUT_MS)
    assert ray_api.job(user.api_key, video_job)["input"]["image"] == f"job:{job_id}"
    video = page.get_by_test_id("job-result").get_by_test_id("output-video")
    expect(video).to_be_visible()
    assert video.get_attribute("controls") is not None
    duration = page.wait_for_function(VIDEO_DURATION, timeout=30_000).json_value()
    assert duration > 0
    # it plays: muted (autoplay policy) and the clock moves
    video.evaluate("v => { v.muted = true; return v.play(); }")
    page.wait_for_function("(v) => v.currentTime > 0 || v.ended", arg=video.element_handle(), timeout=30_000)
    screenshot(page, "job-video")
    page.errors.assert_none(allow=(ROLE_PROBE,))


def test_an_over_limit_input_shows_a_readable_error_next_to_its_field(page: Any, console_stack: ConsoleStack) -> None:
    from playwright.sync_api import expect

    user = console_stack.user(credits=100)
    sign_in(page, user.api_key)
    expect(page.get_by_test_id("submit")).to_be_visible(timeout=30_000)
    page.get_by_test_id("model-select").select_option("tiny-sd")
    page.get_by_label("Prompt", exact=True).fill("a lighthouse")
    page.get_by_label("Width (px)").fill("4096")
    # the quote already refuses it, next to the field
    error = page.get_by_test_id("error-width")
    expect(error).to_be_visible(timeout=30_000)
    expect(error).to_have_text("width must be between 32 and 256")
    expect(page.get_by_label("Width (px)")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_test_id("price")).to_have_text("—")
    # submitting anyway: the same readable error, no job, no credit moved
    page.get_by_test_id("submit").click()
    expect(error).to_have_text("width must be between 32 and 256")
    expect(page).not_to_have_url(JOB_URL)
    screenshot(page, "generate-over-limit")
    with console_stack.api.http(user.api_key) as client:
        assert client.get("/v1/jobs").json()["data"] == []
        assert client.get("/v1/credits").json()["balance"] == 100
    # fixing it clears the error and prices the job
    page.get_by_label("Width (px)").fill("64")
    expect(error).to_be_hidden(timeout=30_000)
    expect(page.get_by_test_id("price")).to_have_text(re.compile(r"^\d+ credits?"), timeout=30_000)
    # Chromium logs the 422 answers as failed loads; nothing else may go wrong
    page.errors.assert_none(allow=(ROLE_PROBE, "422"))


def test_an_uploaded_image_is_the_input_of_an_image_to_image_job(page: Any, console_stack: ConsoleStack,
                                                                 tmp_path: Path) -> None:
    from PIL import Image
    from playwright.sync_api import expect

    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(photo)
    user = console_stack.user(credits=100)
    sign_in(page, user.api_key)
    expect(page.get_by_test_id("submit")).to_be_visible(timeout=30_000)
    page.get_by_test_id("model-select").select_option("tiny-sd")
    page.get_by_label("Prompt", exact=True).fill("a red square, repainted")
    page.get_by_label("Upload an image").set_input_files(str(photo))
    expect(page.get_by_test_id("image-status")).to_contain_text("Using upload", timeout=30_000)
    expect(page.get_by_test_id("image-preview")).to_be_visible()
    # choosing the model again rebuilds the form: the uploaded image stays chosen
    page.get_by_test_id("model-select").select_option("tiny-sd")
    expect(page.get_by_test_id("image-status")).to_contain_text("Using upload", timeout=30_000)
    expect(page.get_by_test_id("image-preview")).to_be_visible()
    expect(page.get_by_test_id("price")).to_have_text(re.compile(r"^\d+ credits?"), timeout=30_000)
    page.get_by_test_id("submit").click()
    job_id = job_id_of(page)
    expect(page.get_by_test_id("job-status")).to_contain_text("Succeeded", timeout=RUN_TIMEOUT_MS)
    job = console_stack.api.job(user.api_key, job_id)
    with console_stack.api.http(user.api_key) as client:
        uploads = client.get("/v1/uploads").json()["data"]
    assert job["task"] == "i2i"
    assert [u["id"] for u in uploads] == [job["input"]["image"]]
    page.errors.assert_none(allow=(ROLE_PROBE,))


def test_a_queued_job_shows_its_place_in_the_queue(page: Any, console_stack: ConsoleStack) -> None:
    """The live view shows GET /v1/jobs/{id}'s queue fields and the stream's ``queue`` events. A
    queued job cannot be held in place on the embedded stack (the runner claims at once), so the
    browser is given a queued job's answers by request interception."""
    from playwright.sync_api import expect

    user = console_stack.user(credits=100)
    done = console_stack.api.run(user.api_key, "tiny-sd", {"prompt": "a lighthouse"})
    queued = {**done, "status": "queued", "stage": None, "progress": 0.0, "outputs": [], "thumbnail_url": None,
              "queue_position": 2, "eta_s": 12.0}
    answers = [queued, {**queued, "queue_position": 0, "eta_s": 3.0}]  # then it moved up the queue
    events = 'event: queue\ndata: {"queue_position": 0, "eta_s": 3.0}\n\n'
    page.route(f"**/v1/jobs/{done['id']}", lambda route: route.fulfill(json=answers.pop(0) if len(answers) > 1
                                                                       else answers[0]))
    page.route(f"**/v1/jobs/{done['id']}/events",
               lambda route: route.fulfill(body=events, headers={"content-type": "text/event-stream"}))
    sign_in(page, user.api_key)
    expect(page.get_by_test_id("submit")).to_be_visible(timeout=30_000)
    page.goto(f"/#/job/{done['id']}")
    position = page.get_by_test_id("queue-position")
    # first the job's answer (3rd in line), then the stream's update (next in line)
    expect(position).to_have_text("Position in queue: 1 · about 3 s to go", timeout=30_000)
    expect(page.get_by_test_id("job-status")).to_contain_text("Queued")
    expect(page.get_by_test_id("cancel")).to_be_visible()
    screenshot(page, "job-queued")
