"""The console's LoRAs page in a real browser (issue 12), against the embedded stack on tiny-sd.

Three photos go in (one dropped on the zone, two picked with the file input), the price of the
steps comes from ``POST /v1/loras/quote`` before submitting (and an out-of-range step count is a
readable error by its field), the training is held by the harness's hook at its first checkpoint so
the page shows its progress and loss from the SSE stream while it runs, then the validation image;
"Generate with it" opens Generate with the LoRA picked, and the job succeeds with the LoRA in its
input; the LoRA is deleted. A ZIP dataset trains too. Screenshots at desktop and phone width.
"""

from __future__ import annotations

import base64
import io
import re
import zipfile
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.api.http.console.test_generate_page import job_id_of
from tests.api.http.console.test_signin_page import ROLE_PROBE, sign_in
from tests.fixtures.browser import ConsoleStack, screenshot
from tests.fixtures.harness import bearer

pytestmark = [pytest.mark.ray, pytest.mark.browser]


def expect(target: Any, *args: Any, **kwargs: Any) -> Any:
    """Playwright's ``expect``, imported when a test runs, not at collection: without Playwright the
    browser fixture decides (a printed skip on a bare machine, a failure under CI)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target, *args, **kwargs)

STEPS = 8  # a checkpoint every 2 steps (LoraService: steps // 4): the hook holds at step 2
TRAIN_TIMEOUT_MS = 120_000
COLORS = [(220, 30, 30), (30, 200, 40), (30, 60, 220)]

# one File dropped on the zone: a DataTransfer built in the page from the PNG's bytes
DROP = """([name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type: "image/png" }));
  return dt;
}"""
IMAGE_LOADED = "img => img.complete && img.naturalWidth > 0"


def png_bytes(color: tuple[int, int, int], size: int = 64) -> bytes:
    img = Image.new("RGB", (size, size), color)
    for x in range(0, size, 8):  # a little structure so the photos are not flat
        for y in range(0, size, 8):
            if (x + y) % 16 == 0:
                img.putpixel((x, y), (255 - color[0], 255 - color[1], 255 - color[2]))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def png_file(name: str, color: tuple[int, int, int]) -> dict[str, Any]:
    return {"name": name, "mimeType": "image/png", "buffer": png_bytes(color)}


def api_client(stack: ConsoleStack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.url, timeout=30, headers=bearer(key))


def open_loras(page: Any, key: str) -> None:
    sign_in(page, key)
    expect(page.get_by_test_id("nav-loras")).to_be_visible(timeout=30_000)
    page.get_by_test_id("nav-loras").click()
    expect(page.get_by_test_id("lora-form")).to_be_visible()


def card_of(page: Any, lora_id: str) -> Any:
    return page.locator(f'[data-testid="lora-card"][data-lora-id="{lora_id}"]')


def test_train_from_three_photos_then_generate_with_it(page: Any, console_stack: ConsoleStack) -> None:
    ray_api = console_stack.api
    user = console_stack.user(credits=500)
    open_loras(page, user.api_key)
    expect(page.get_by_test_id("lora-empty")).to_be_visible()

    # one photo dropped, two picked with the (labelled, keyboard-reachable) file input
    transfer = page.evaluate_handle(DROP, ["red.png", base64.b64encode(png_bytes(COLORS[0])).decode()])
    page.get_by_test_id("lora-dropzone").dispatch_event("drop", {"dataTransfer": transfer})
    expect(page.get_by_test_id("lora-file")).to_have_count(1)
    page.get_by_label("…or choose files").set_input_files(
        [png_file("green.png", COLORS[1]), png_file("blue.png", COLORS[2])])
    expect(page.get_by_test_id("lora-file")).to_have_count(3)
    expect(page.get_by_test_id("lora-file-count")).to_have_text("3 photos selected.")
    # a file that is no photo is refused by name, the others stay
    page.get_by_label("…or choose files").set_input_files(
        [{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo"}])
    expect(page.get_by_test_id("error-files")).to_contain_text("notes.txt")
    expect(page.get_by_test_id("lora-file")).to_have_count(3)

    token = ray_api.hold(step=2)  # the trainer holds a job whose trigger word holds the token
    page.get_by_label("Name").fill("my cat")
    page.get_by_label("Trigger word").fill(token)
    steps = page.get_by_label("Steps")
    assert (steps.get_attribute("min"), steps.get_attribute("max")) == ("2", "4000")  # tiny-sd's limits
    # out of the spec's range: the server's message, by the field
    steps.fill("5000")
    expect(page.get_by_test_id("error-steps")).to_contain_text("between 2 and 4000")
    steps.fill(str(STEPS))
    price = page.get_by_test_id("lora-price")
    expect(price).to_have_attribute("data-credits", re.compile(r"^\d+$"))
    expect(page.get_by_test_id("error-steps")).to_be_hidden()
    quoted = int(price.get_attribute("data-credits") or -1)
    with api_client(console_stack, user.api_key) as client:
        server = client.post("/v1/loras/quote", json={"name": "x", "base_model": "tiny-sd", "steps": STEPS,
                                                       "trigger_word": token, "resolution": 64}).json()
    assert quoted == server["credits"] > 0, server
    expect(price).to_have_text(f"{quoted} credit" + ("" if quoted == 1 else "s"))
    screenshot(page, "loras-form")
    page.get_by_test_id("lora-submit").click()

    card = page.get_by_test_id("lora-card")
    expect(card).to_have_count(1)
    lora_id = card.get_attribute("data-lora-id") or ""
    expect(page.get_by_test_id("lora-file")).to_have_count(0)  # the form is ready for the next one
    with api_client(console_stack, user.api_key) as client:
        lora = client.get(f"/v1/loras/{lora_id}").json()
    assert lora["name"] == "my cat" and lora["trigger_word"] == token, lora
    assert lora["credits"]["reserved"] == quoted and lora["params"]["steps"] == STEPS
    job_id = lora["job_id"]

    # held at its first checkpoint: the progress and loss of the steps so far, from the SSE stream
    ray_api.wait_held(job_id)
    expect(card.get_by_test_id("lora-loss")).to_have_text(re.compile(rf"^Step 2 of {STEPS} · loss \d"),
                                                          timeout=60_000)
    expect(card.get_by_test_id("lora-stage")).to_have_text("Training")
    expect(card.get_by_test_id("progress")).to_have_attribute("data-value", "25")
    expect(card.get_by_test_id("lora-announce")).to_have_attribute("aria-live", "polite")
    expect(card.get_by_test_id("lora-generate")).to_be_hidden()
    screenshot(page, "loras-training")
    ray_api.release(token)

    # done: the validation image, the charge, and the way to use it
    expect(card).to_have_attribute("data-status", "succeeded", timeout=TRAIN_TIMEOUT_MS)
    expect(card.get_by_test_id("progress")).to_have_attribute("data-value", "100")
    expect(card.get_by_test_id("lora-loss")).to_contain_text(f"Step {STEPS} of {STEPS}")
    validation = card.get_by_test_id("lora-validation-image")
    expect(validation).to_be_visible(timeout=30_000)
    page.wait_for_function(IMAGE_LOADED, arg=validation.element_handle(), timeout=30_000)
    expect(card.get_by_test_id("lora-credits")).to_have_text(f"Charged {quoted} credit" + ("" if quoted == 1 else "s"))
    job = ray_api.job(user.api_key, job_id)
    assert job["status"] == "succeeded" and job["credits"]["charged"] == quoted, job
    screenshot(page, "loras")
    page.set_viewport_size({"width": 375, "height": 800})
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the page is {width} px wide at a 375 px viewport"
    screenshot(page, "loras-mobile")
    page.set_viewport_size({"width": 1280, "height": 900})

    # "Generate with it": Generate opens on the base model with this LoRA picked
    card.get_by_test_id("lora-generate").click()
    expect(page).to_have_url(re.compile(rf"#/generate\?.*lora={lora_id}"))
    expect(page.get_by_test_id(f"lora-{lora_id}")).to_be_checked(timeout=30_000)
    expect(page.get_by_test_id("model-select")).to_have_value("tiny-sd")
    page.get_by_label("Prompt", exact=True).fill("a photo of my cat")
    page.get_by_test_id("submit").click()
    generated = ray_api.wait(user.api_key, job_id_of(page), timeout_s=120)
    assert generated["status"] == "succeeded", generated
    assert generated["input"]["loras"] == [{"id": lora_id, "scale": 1.0}], generated["input"]

    # delete, in two steps
    page.get_by_test_id("nav-loras").click()
    card = card_of(page, lora_id)
    card.get_by_test_id("lora-delete").click()
    expect(card.get_by_test_id("lora-delete")).to_contain_text("Confirm")
    card.get_by_test_id("lora-delete").click()
    expect(card).to_have_count(0)
    expect(page.get_by_test_id("lora-empty")).to_be_visible()
    with api_client(console_stack, user.api_key) as client:
        assert client.get(f"/v1/loras/{lora_id}").status_code == 404
    page.errors.assert_none(allow=(ROLE_PROBE, "status of 422 (Unprocessable"))


def test_train_from_a_zip(page: Any, console_stack: ConsoleStack) -> None:
    user = console_stack.user(credits=100)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, color in enumerate(COLORS):
            archive.writestr(f"photos/{i}.png", png_bytes(color))
            archive.writestr(f"photos/{i}.txt", "a photo of zzk on a table")
    open_loras(page, user.api_key)
    page.get_by_label("…or choose files").set_input_files(
        [{"name": "dataset.zip", "mimeType": "application/zip", "buffer": buffer.getvalue()}])
    expect(page.get_by_test_id("lora-file-count")).to_have_text("1 ZIP file selected.")
    page.get_by_label("Name").fill("from a zip")
    page.get_by_label("Trigger word").fill("zzk")
    page.get_by_label("Steps").fill("2")
    expect(page.get_by_test_id("lora-price")).to_have_attribute("data-credits", re.compile(r"^\d+$"))
    page.get_by_label("Steps").press("Enter")  # the keyboard submits the form
    card = page.get_by_test_id("lora-card")
    expect(card).to_have_count(1)
    expect(card).to_have_attribute("data-status", "succeeded", timeout=TRAIN_TIMEOUT_MS)
    expect(card.get_by_test_id("lora-validation-image")).to_be_visible(timeout=30_000)
    lora_id = card.get_attribute("data-lora-id")
    with api_client(console_stack, user.api_key) as client:
        lora = client.get(f"/v1/loras/{lora_id}").json()
        uploads = client.get("/v1/uploads").json()["data"]
    assert lora["status"] == "succeeded" and lora["summary"]["steps"] == 2, lora
    assert [u["kind"] for u in uploads] == ["dataset"], uploads
    page.errors.assert_none(allow=(ROLE_PROBE,))
