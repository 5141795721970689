"""OpenAI shape, review fixes: no second charge after an error once the job exists; where to poll."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import openai
import pytest

from api.services import media_convert
from tests.api.http.compat.test_openai import Stack, make_stack, wait_for  # noqa: F401 - fixture
from tests.fixtures.harness import add_user, get_job, job_count

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
