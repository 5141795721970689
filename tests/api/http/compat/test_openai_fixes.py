"""OpenAI shape, review fixes: no second charge after an error once the job exists; where to poll."""

from __future__ import annotations

import io
import threading
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from api.db.tables import Upload
from api.services import media_convert
from tests.api.http.compat.test_openai import Stack, make_stack, png_bytes, wait_for  # noqa: F401 - fixture
from tests.fixtures.harness import add_user, balance, get_job, job_count

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_an_error_after_the_job_exists_is_final_and_names_the_job(
        make_stack: Callable[..., Stack], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("storage read failed")

    monkeypatch.setattr(media_convert, "ensure_format", broken)
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=100)
    with pytest.raises(openai.InternalServerError) as info:
        stack.client(user.api_key, max_retries=2).images.generate(model="tiny-sd", prompt="a cat",
                                                                  output_format="jpeg")
    err = info.value
    assert err.code == "result_unavailable"
    job_id = err.body["job_id"]
    assert job_id in err.message and f"{stack.server.url}/v1/jobs/{job_id}" in err.message
    assert err.response.headers.get("x-should-retry") == "false"
    assert job_count(stack.db) == 1  # the client did not retry into a second charged job
    assert get_job(stack.db, job_id).status == "succeeded"


def test_pending_names_the_absolute_native_job_url(make_stack: Callable[..., Stack]) -> None:  # noqa: F811
    stack = make_stack(openai_wait_s=0.3)
    stack.executor.gates["held"] = threading.Event()
    user = add_user(stack.db, stack.settings, credits=100)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            stack.client(user.api_key).images.generate(model="tiny-sd", prompt="held")
        job_id = info.value.body["job_id"]
        assert f"{stack.server.url}/v1/jobs/{job_id}" in info.value.message
        assert "/openai/v1/jobs" not in info.value.message
    finally:
        stack.executor.gates["held"].set()
    wait_for(lambda: get_job(stack.db, job_id).status == "succeeded", "the held job to finish")


# uploads in images.edit / videos input_reference -------------------------------------------------
def upload_count(stack: Stack) -> int:
    with stack.db.read() as session:
        return session.query(Upload).count()


def stored_uploads(stack: Stack, user_id: str) -> list[str]:
    root = stack.settings.data_dir / "storage" / "uploads" / user_id
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_refused_edit_leaves_no_upload_behind(make_stack: Callable[..., Stack]) -> None:  # noqa: F811
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=0)
    with pytest.raises(openai.RateLimitError) as info:  # OpenAI's 429 insufficient_quota
        stack.client(user.api_key).images.edit(model="tiny-sd", image=("in.png", png_bytes(), "image/png"),
                                               prompt="blue")
    assert info.value.code == "insufficient_quota"
    assert upload_count(stack) == 0 and stored_uploads(stack, user.user.id) == []
    assert job_count(stack.db) == 0


def test_a_refused_video_leaves_no_upload_behind(make_stack: Callable[..., Stack]) -> None:  # noqa: F811
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=0)
    with pytest.raises(openai.RateLimitError):
        stack.client(user.api_key).videos.create(model="tiny-wan-i2v", prompt="waves", size="64x64",
                                                 input_reference=("in.png", png_bytes(), "image/png"))
    assert upload_count(stack) == 0 and stored_uploads(stack, user.user.id) == []


def test_an_edit_replayed_with_its_idempotency_key_is_the_same_job(make_stack: Callable[..., Stack]) -> None:  # noqa: F811
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=100)
    client = stack.client(user.api_key)
    headers = {"Idempotency-Key": "edit-1"}
    image = png_bytes()
    first = client.images.edit(model="tiny-sd", image=("in.png", image, "image/png"), prompt="blue",
                               response_format="b64_json", extra_headers=headers)
    again = client.images.edit(model="tiny-sd", image=("in.png", image, "image/png"), prompt="blue",
                               response_format="b64_json", extra_headers=headers)
    assert [d.b64_json for d in again.data] == [d.b64_json for d in first.data]
    assert job_count(stack.db) == 1 and upload_count(stack) == 1
    assert balance(stack.db, user.user.id).available == 99
    with pytest.raises(openai.ConflictError):  # the same key with other bytes
        client.images.edit(model="tiny-sd", image=("in.png", png_bytes(64, 128), "image/png"), prompt="blue",
                           extra_headers=headers)


def test_a_zip_is_not_an_image(make_stack: Callable[..., Stack]) -> None:  # noqa: F811
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=100)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("a.png", png_bytes())
    with pytest.raises(openai.BadRequestError) as info:
        stack.client(user.api_key).images.edit(model="tiny-sd", image=("in.zip", buf.getvalue(), "application/zip"),
                                               prompt="blue")
    assert info.value.param == "image" and upload_count(stack) == 0 and job_count(stack.db) == 0


def test_an_edit_takes_an_upload_slot(make_stack: Callable[..., Stack]) -> None:  # noqa: F811
    stack = make_stack(max_concurrent_uploads=1)
    user = add_user(stack.db, stack.settings, credits=100)
    with stack.app.state.cineweave.uploads.admit():  # the only slot, held by "another upload"
        with pytest.raises(openai.RateLimitError) as info:
            stack.client(user.api_key).images.edit(model="tiny-sd", image=("in.png", png_bytes(), "image/png"),
                                                   prompt="blue")
    assert info.value.code == "uploads_busy" and upload_count(stack) == 0 and job_count(stack.db) == 0


def test_a_chunked_form_is_cut_at_the_request_limit(make_stack: Callable[..., Stack]) -> None:  # noqa: F811
    stack = make_stack(max_upload_request_bytes=50_000, max_upload_bytes=40_000)
    user = add_user(stack.db, stack.settings, credits=100)
    boundary = "cwboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nblue\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"in.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def body() -> Iterator[bytes]:  # no Content-Length: only the streaming cap can stop it
        yield head
        for _ in range(20):
            yield b"\x89PNG" + b"\0" * 9996

    response = httpx.post(f"{stack.server.url}/openai/v1/images/edits", content=body(), timeout=30,
                          headers={"Authorization": f"Bearer {user.api_key}",
                                   "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413, response.text
    assert response.headers.get("x-should-retry") == "false"
    assert upload_count(stack) == 0 and job_count(stack.db) == 0
