"""The Veo (Gemini API) adapter against a fake Gemini API on loopback (no internet)."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.core.events import DoneEvent, ErrorEvent, OutputEvent, ProviderEvent, StageEvent
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from serve.fallback.http import ProviderError, RetryPolicy
from serve.fallback.veo import VeoExecutor, build_body, parse_data_uri
from tests.fakes.server import ServerThread
from tests.fakes.veo_server import FakeVeo
from tests.serve.fallback.conftest import collect, have_posters, make_settings, of_type, video_job

MODEL = "veo-3.1"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture
def adapter(veo_settings: Settings, storage: LocalStorage, catalog: Catalog, fast_retry: RetryPolicy) -> VeoExecutor:
    return VeoExecutor(veo_settings, storage, catalog, retry=fast_retry)


async def _wait_for(predicate, timeout_s: float = 10.0) -> None:  # noqa: ANN001 - a test helper
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_job_succeeds_and_the_output_is_ours(adapter: VeoExecutor, veo_fake: FakeVeo, storage: LocalStorage,
                                                   catalog: Catalog) -> None:
    job = video_job(catalog, MODEL, duration=8, resolution="1080p", aspect_ratio="9:16", negative_prompt="blur")
    events = await collect(adapter.run(job))
    assert isinstance(events[-1], DoneEvent)

    [provider] = of_type(events, ProviderEvent)
    [name] = veo_fake.operations
    assert provider.provider == "veo" and provider.provider_job_id == name
    assert name.startswith("models/veo-3.1-generate-preview/operations/")
    assert provider.cost_usd == pytest.approx(8 * adapter.settings.veo_cost_per_second_usd)

    [output] = of_type(events, OutputEvent)
    assert output.key == f"{job.output_prefix}0.mp4" and veo_fake.url not in output.key
    assert (output.content_type, output.width, output.height) == ("video/mp4", 64, 64)
    assert storage.get_bytes(output.key) == veo_fake.mp4
    if have_posters():
        assert output.thumbnail_key == f"{job.output_prefix}0.poster.png"
        assert storage.get_bytes(output.thumbnail_key).startswith(b"\x89PNG")

    # Gemini's field names; no seed (the API refuses it) although the job has one.
    assert job.input["seed"] == 42
    assert veo_fake.created == [{
        "instances": [{"prompt": "a red fox running through snow"}],
        "parameters": {"sampleCount": 1, "aspectRatio": "9:16", "durationSeconds": 8, "resolution": "1080p",
                       "negativePrompt": "blur"}}]
    assert all(r["authorized"] and not r["query_has_key"] for r in veo_fake.requests)
    # The download followed the redirect to another origin, without the key.
    assert veo_fake.api_calls("GET", ":download")
    assert veo_fake.blob_requests and not any(b["api_key_sent"] for b in veo_fake.blob_requests)
    stages = [e.stage for e in of_type(events, StageEvent)]
    assert stages == ["submitting", "generating", "downloading"]


async def test_image_from_a_data_uri(adapter: VeoExecutor, veo_fake: FakeVeo, catalog: Catalog) -> None:
    image = "data:image/png;base64," + base64.b64encode(PNG).decode()
    events = await collect(adapter.run(video_job(catalog, MODEL, image=image)))
    assert isinstance(events[-1], DoneEvent)
    sent = veo_fake.created[0]["instances"][0]["image"]
    assert sent == {"bytesBase64Encoded": base64.b64encode(PNG).decode(), "mimeType": "image/png"}


async def test_image_from_a_url_is_fetched_without_the_key(adapter: VeoExecutor, veo_fake: FakeVeo,
                                                           catalog: Catalog) -> None:
    seen: list[dict[str, str]] = []

    async def serve_png(request: Request) -> Response:
        seen.append(dict(request.headers))
        return Response(PNG, media_type="image/png")

    with ServerThread(Starlette(routes=[Route("/u/img.png", serve_png)]), name="image-host") as host:
        events = await collect(adapter.run(video_job(catalog, MODEL, image=f"{host.url}/u/img.png")))
    assert isinstance(events[-1], DoneEvent)
    assert veo_fake.created[0]["instances"][0]["image"]["bytesBase64Encoded"] == base64.b64encode(PNG).decode()
    assert seen and "x-goog-api-key" not in seen[0]


async def test_429_storm_then_success_honours_the_retry_delay(adapter: VeoExecutor, veo_fake: FakeVeo,
                                                              catalog: Catalog) -> None:
    veo_fake.behavior.throttle = 3
    veo_fake.behavior.retry_delay = "0.3s"
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    assert isinstance(events[-1], DoneEvent)
    creates = veo_fake.api_calls("POST", ":predictLongRunning")
    assert [c["status"] for c in creates] == [429, 429, 429, 200]
    gaps = [b["time"] - a["time"] for a, b in zip(creates, creates[1:], strict=False)]
    assert all(gap >= 0.28 for gap in gaps), gaps
    assert len(veo_fake.operations) == 1


async def test_server_errors_while_polling_are_retried(adapter: VeoExecutor, veo_fake: FakeVeo,
                                                       catalog: Catalog) -> None:
    veo_fake.behavior.run_s = 0.3
    events_task = asyncio.create_task(collect(adapter.run(video_job(catalog, MODEL))))
    await _wait_for(lambda: bool(veo_fake.operations))
    veo_fake.behavior.server_errors = 2  # polls are idempotent: even a 500 is retried
    events = await asyncio.wait_for(events_task, 10)
    assert isinstance(events[-1], DoneEvent)
    assert [r["status"] for r in veo_fake.requests].count(500) == 2


async def test_outage_beyond_the_retries(adapter: VeoExecutor, veo_fake: FakeVeo, catalog: Catalog) -> None:
    veo_fake.behavior.outage = True
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert (error.code, error.retryable) == ("provider_unavailable", True)
    assert len(veo_fake.api_calls("POST", ":predictLongRunning")) == adapter.retry.attempts


async def test_safety_block_is_content_policy(adapter: VeoExecutor, veo_fake: FakeVeo, catalog: Catalog,
                                              storage: LocalStorage) -> None:
    veo_fake.behavior.safety_block = True
    job = video_job(catalog, MODEL)
    events = await collect(adapter.run(job))
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert (error.code, error.retryable) == ("content_policy", False)
    assert "safety" in error.message
    assert storage.list(job.output_prefix) == []


@pytest.mark.parametrize(("rpc", "code", "retryable"), [
    ((13, "Internal error while generating."), "provider_failed", False),
    ((8, "Resource exhausted."), "provider_unavailable", True),
])
async def test_operation_errors(adapter: VeoExecutor, veo_fake: FakeVeo, catalog: Catalog,
                                rpc: tuple[int, str], code: str, retryable: bool) -> None:
    veo_fake.behavior.fail_with = rpc
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    error = events[-1]
    assert isinstance(error, ErrorEvent) and (error.code, error.retryable) == (code, retryable)
    assert rpc[1] in error.message


async def test_expired_output_fails_the_job(adapter: VeoExecutor, veo_fake: FakeVeo, catalog: Catalog) -> None:
    veo_fake.behavior.output_ttl_s = 0.0
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    error = events[-1]
    assert isinstance(error, ErrorEvent) and error.code == "provider_failed" and not error.retryable


async def test_timeout(tmp_path: Path, veo_fake: FakeVeo, storage: LocalStorage, catalog: Catalog,
                       fast_retry: RetryPolicy) -> None:
    veo_fake.behavior.hang = True
    settings = make_settings(tmp_path, gemini_base_url=veo_fake.url, gemini_api_key=veo_fake.api_key,
                             provider_timeout_s=0.5)
    started = time.monotonic()
    events = await collect(VeoExecutor(settings, storage, catalog, retry=fast_retry).run(video_job(catalog, MODEL)))
    assert time.monotonic() - started < 5
    error = events[-1]
    assert isinstance(error, ErrorEvent) and (error.code, error.retryable) == ("provider_timeout", False)
    assert veo_fake.cancels == list(veo_fake.operations)


@pytest.mark.parametrize("supported", [True, False])
async def test_cancel_reaches_the_provider(adapter: VeoExecutor, veo_fake: FakeVeo, catalog: Catalog,
                                           supported: bool) -> None:
    veo_fake.behavior.hang = True
    veo_fake.behavior.cancel_supported = supported
    job = video_job(catalog, MODEL)
    events: list = []

    async def consume() -> None:
        async for event in adapter.run(job):
            events.append(event)

    task = asyncio.create_task(consume())
    await _wait_for(lambda: any(isinstance(e, ProviderEvent) for e in events))
    await adapter.cancel(job.job_id)
    await asyncio.wait_for(task, 10)
    assert veo_fake.cancels == list(veo_fake.operations)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "canceled"


async def test_missing_key_is_not_configured(tmp_path: Path, storage: LocalStorage, catalog: Catalog) -> None:
    settings = make_settings(tmp_path, gemini_base_url="http://127.0.0.1:9")
    events = await collect(VeoExecutor(settings, storage, catalog).run(video_job(catalog, MODEL)))
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "provider_not_configured"


async def test_the_key_never_reaches_logs_or_events(adapter: VeoExecutor, veo_fake: FakeVeo, catalog: Catalog,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ok = await collect(adapter.run(video_job(catalog, MODEL)))
    veo_fake.behavior.fail_with = (3, f"bad request for key {veo_fake.api_key}")
    failed = await collect(adapter.run(video_job(catalog, MODEL)))
    assert isinstance(ok[-1], DoneEvent) and isinstance(failed[-1], ErrorEvent)
    assert "[redacted]" in failed[-1].message
    assert veo_fake.api_key not in caplog.text + repr(ok) + repr(failed)
    assert "veo" in caplog.text


def test_build_body_and_data_uris() -> None:
    body = build_body({"prompt": "p", "duration": 6.0, "resolution": "720p", "aspect_ratio": "16:9", "seed": 3,
                       "negative_prompt": "", "fps": 24}, {"bytesBase64Encoded": "AA==", "mimeType": "image/png"})
    assert body == {"instances": [{"prompt": "p", "image": {"bytesBase64Encoded": "AA==", "mimeType": "image/png"}}],
                    "parameters": {"sampleCount": 1, "aspectRatio": "16:9", "durationSeconds": 6,
                                   "resolution": "720p"}}
    assert parse_data_uri("data:image/jpeg;base64,/9j/") == ("image/jpeg", b"\xff\xd8\xff")
    with pytest.raises(ProviderError, match="not base64") as raised:
        parse_data_uri("data:image/png,notbase64")
    assert raised.value.code == "invalid_input"
