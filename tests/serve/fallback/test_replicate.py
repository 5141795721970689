"""The Replicate adapter against a fake Replicate API on loopback (no internet)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from pathlib import Path

import pytest

from api.core.events import DoneEvent, ErrorEvent, OutputEvent, ProgressEvent, ProviderEvent, StageEvent
from api.settings import Settings
from api.storage.local import LocalStorage
from models.catalog import Catalog
from models.spec import ModelSpec
from serve.fallback.http import RetryPolicy
from serve.fallback.replicate import ReplicateExecutor, map_input, parse_progress
from tests.fakes.replicate_server import FakeReplicate
from tests.fakes.webhook_sink import WebhookSink
from tests.serve.fallback.conftest import collect, have_posters, make_settings, of_type, video_job

MODEL = "veo-3.1-replicate"


@pytest.fixture
def adapter(replicate_settings: Settings, storage: LocalStorage, catalog: Catalog,
            fast_retry: RetryPolicy) -> ReplicateExecutor:
    return ReplicateExecutor(replicate_settings, storage, catalog, retry=fast_retry)


def _signed(fake: FakeReplicate, body: bytes, webhook_id: str | None = None, ts: int | None = None,
            secret: str | None = None) -> dict[str, str]:
    webhook_id = webhook_id or "msg_" + secrets.token_hex(8)
    stamp = str(ts if ts is not None else int(time.time()))
    return {"webhook-id": webhook_id, "webhook-timestamp": stamp,
            "webhook-signature": fake.sign(webhook_id, stamp, body, secret)}


async def _wait_for(predicate, timeout_s: float = 10.0) -> None:  # noqa: ANN001 - a test helper
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# success -----------------------------------------------------------------------------------------
async def test_job_succeeds_and_the_output_is_ours(adapter: ReplicateExecutor, replicate_fake: FakeReplicate,
                                                   storage: LocalStorage, catalog: Catalog) -> None:
    job = video_job(catalog, MODEL, duration=8, resolution="720p", aspect_ratio="16:9")
    events = await collect(adapter.run(job))

    assert isinstance(events[-1], DoneEvent)
    provider = of_type(events, ProviderEvent)
    assert len(provider) == 1
    prediction_id = next(iter(replicate_fake.predictions))
    assert provider[0].provider == "replicate" and provider[0].provider_job_id == prediction_id
    assert provider[0].cost_usd == pytest.approx(8 * replicate_settings_cost(adapter))
    # The provider event comes before the output, as soon as the id is known.
    assert events.index(provider[0]) < events.index(of_type(events, OutputEvent)[0])

    [output] = of_type(events, OutputEvent)
    assert output.key == f"{job.output_prefix}0.mp4" and output.key.startswith(job.output_prefix)
    assert replicate_fake.url not in output.key
    assert output.content_type == "video/mp4"
    assert (output.width, output.height, output.num_frames, output.fps, output.duration_s) == (64, 64, 8, 8.0, 1.0)
    assert storage.get_bytes(output.key) == replicate_fake.mp4
    assert storage.stat(output.key).content_type == "video/mp4"
    if have_posters():
        assert output.thumbnail_key == f"{job.output_prefix}0.poster.png"
        assert storage.get_bytes(output.thumbnail_key).startswith(b"\x89PNG\r\n\x1a\n")
        assert storage.stat(output.thumbnail_key).content_type == "image/png"
    assert events[-1].result["provider_job_id"] == prediction_id

    # The contract: model endpoint, Prefer: wait, our input in Replicate's field names.
    [create] = replicate_fake.api_calls("POST", "/v1/models/google/veo-3.1/predictions")
    assert create["prefer"].startswith("wait=")
    assert replicate_fake.created[0]["input"] == {"prompt": "a red fox running through snow", "seed": 42,
                                                  "duration": 8, "resolution": "720p", "aspect_ratio": "16:9"}
    assert all(r["authorized"] for r in replicate_fake.requests)
    # The output file host never sees our token.
    assert replicate_fake.file_requests and all(r["authorization"] is None for r in replicate_fake.file_requests)


def replicate_settings_cost(adapter: ReplicateExecutor) -> float:
    return adapter.settings.replicate_cost_per_second_usd


async def test_status_changes_become_stage_and_progress_events(
        adapter: ReplicateExecutor, replicate_fake: FakeReplicate, catalog: Catalog) -> None:
    replicate_fake.behavior.max_prefer_wait_s = 0.01  # answer the create call at once: follow by polling
    replicate_fake.behavior.run_s = 0.4
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    stages = [e.stage for e in of_type(events, StageEvent)]
    assert stages[0] == "submitting" and "generating" in stages and stages[-1] == "downloading"
    assert stages.index("generating") < stages.index("downloading")
    progress = of_type(events, ProgressEvent)
    assert progress and (progress[0].step, progress[0].total) in {(2, 4), (4, 4)}
    assert replicate_fake.api_calls("GET", "/v1/predictions/")  # it polled urls.get


async def test_image_to_video_passes_the_image(adapter: ReplicateExecutor, replicate_fake: FakeReplicate,
                                               catalog: Catalog) -> None:
    image = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    events = await collect(adapter.run(video_job(catalog, MODEL, image=image, negative_prompt="blurry",
                                                 duration=6)))
    assert isinstance(events[-1], DoneEvent)
    sent = replicate_fake.created[0]["input"]
    assert sent["image"] == image and sent["negative_prompt"] == "blurry" and sent["duration"] == 6


async def test_a_version_reference_uses_the_predictions_endpoint(
        replicate_settings: Settings, replicate_fake: FakeReplicate, storage: LocalStorage, catalog: Catalog,
        fast_retry: RetryPolicy) -> None:
    version = "a" * 64
    spec = ModelSpec.model_validate({**catalog.get(MODEL).model_dump(), "id": "veo-pinned",
                                     "overflow": {"provider": "replicate", "model": f"google/veo-3.1:{version}",
                                                  "remote_only": True, "when": ["remote_only"]}})
    pinned = Catalog([*catalog.all(), spec])
    adapter = ReplicateExecutor(replicate_settings, storage, pinned, retry=fast_retry)
    events = await collect(adapter.run(video_job(pinned, "veo-pinned")))
    assert isinstance(events[-1], DoneEvent)
    assert replicate_fake.api_calls("POST", "/v1/predictions") and replicate_fake.created[0]["version"] == \
        f"google/veo-3.1:{version}"


# throttling and outages --------------------------------------------------------------------------
async def test_429_storm_then_success_honours_retry_after(adapter: ReplicateExecutor,
                                                          replicate_fake: FakeReplicate, catalog: Catalog) -> None:
    replicate_fake.behavior.throttle = 2
    replicate_fake.behavior.retry_after = "1"
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    assert isinstance(events[-1], DoneEvent)
    creates = replicate_fake.api_calls("POST", "/v1/models/")
    assert [c["status"] for c in creates] == [429, 429, 200]
    gaps = [b["time"] - a["time"] for a, b in zip(creates, creates[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps  # Retry-After: 1, not the 10 ms backoff
    assert len(replicate_fake.predictions) == 1  # throttled creates started nothing


async def test_server_errors_on_create_are_retried(adapter: ReplicateExecutor, replicate_fake: FakeReplicate,
                                                   catalog: Catalog) -> None:
    replicate_fake.behavior.server_errors = 2  # 503: the provider did not act, so a resend is safe
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    assert isinstance(events[-1], DoneEvent)
    assert len(replicate_fake.predictions) == 1


async def test_outage_beyond_the_retries_is_retryable_unavailable(
        adapter: ReplicateExecutor, replicate_fake: FakeReplicate, catalog: Catalog, storage: LocalStorage) -> None:
    replicate_fake.behavior.outage = True
    job = video_job(catalog, MODEL)
    events = await collect(adapter.run(job))
    [error] = events[-1:]
    assert isinstance(error, ErrorEvent)
    assert (error.code, error.retryable) == ("provider_unavailable", True)
    assert len(replicate_fake.api_calls("POST", "/v1/models/")) == adapter.retry.attempts
    assert not of_type(events, ProviderEvent) and not of_type(events, OutputEvent)
    assert storage.list(job.output_prefix) == []


# failures ----------------------------------------------------------------------------------------
async def test_safety_block_is_content_policy_and_not_retryable(
        adapter: ReplicateExecutor, replicate_fake: FakeReplicate, catalog: Catalog, storage: LocalStorage) -> None:
    replicate_fake.behavior.safety_block = True
    job = video_job(catalog, MODEL)
    events = await collect(adapter.run(job))
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert (error.code, error.retryable) == ("content_policy", False)
    assert "E005" in error.message
    assert storage.list(job.output_prefix) == []


async def test_provider_failure_is_provider_failed(adapter: ReplicateExecutor, replicate_fake: FakeReplicate,
                                                   catalog: Catalog) -> None:
    replicate_fake.behavior.fail_with = "CUDA error: device-side assert triggered"
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert (error.code, error.retryable) == ("provider_failed", False)
    assert "device-side assert" in error.message


async def test_expired_output_fails_the_job(adapter: ReplicateExecutor, replicate_fake: FakeReplicate,
                                            catalog: Catalog) -> None:
    replicate_fake.behavior.output_ttl_s = 0.0
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    error = events[-1]
    assert isinstance(error, ErrorEvent) and error.code == "provider_failed" and not error.retryable
    assert "output" in error.message


async def test_timeout_ends_the_job_and_cancels_the_prediction(
        tmp_path: Path, replicate_fake: FakeReplicate, storage: LocalStorage, catalog: Catalog,
        fast_retry: RetryPolicy) -> None:
    settings = make_settings(tmp_path, replicate_base_url=replicate_fake.base_url,
                             replicate_api_token=replicate_fake.token, provider_timeout_s=0.8)
    replicate_fake.behavior.hang = True
    adapter = ReplicateExecutor(settings, storage, catalog, retry=fast_retry)
    started = time.monotonic()
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    assert time.monotonic() - started < 5
    error = events[-1]
    assert isinstance(error, ErrorEvent)
    assert (error.code, error.retryable) == ("provider_timeout", False)
    [prediction_id] = replicate_fake.predictions
    assert replicate_fake.cancels == [prediction_id]  # we stop paying for it


async def test_wrong_token_fails_without_echoing_it(tmp_path: Path, replicate_fake: FakeReplicate,
                                                    storage: LocalStorage, catalog: Catalog,
                                                    fast_retry: RetryPolicy) -> None:
    settings = make_settings(tmp_path, replicate_base_url=replicate_fake.base_url,
                             replicate_api_token="r8_wrong-token-value")
    events = await collect(ReplicateExecutor(settings, storage, catalog, retry=fast_retry).run(
        video_job(catalog, MODEL)))
    error = events[-1]
    assert isinstance(error, ErrorEvent) and error.code == "provider_failed" and not error.retryable
    assert "401" in error.message and "r8_wrong-token-value" not in error.message


async def test_missing_token_is_not_configured(tmp_path: Path, storage: LocalStorage, catalog: Catalog) -> None:
    settings = make_settings(tmp_path, replicate_base_url="http://127.0.0.1:9/v1")
    events = await collect(ReplicateExecutor(settings, storage, catalog).run(video_job(catalog, MODEL)))
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "provider_not_configured"


# cancel ------------------------------------------------------------------------------------------
async def test_cancel_reaches_the_provider(adapter: ReplicateExecutor, replicate_fake: FakeReplicate,
                                           catalog: Catalog) -> None:
    replicate_fake.behavior.hang = True
    replicate_fake.behavior.max_prefer_wait_s = 0.01
    job = video_job(catalog, MODEL)
    events: list = []

    async def consume() -> None:
        async for event in adapter.run(job):
            events.append(event)

    task = asyncio.create_task(consume())
    await _wait_for(lambda: any(isinstance(e, ProviderEvent) for e in events))
    await adapter.cancel(job.job_id)
    await asyncio.wait_for(task, 10)
    [prediction_id] = replicate_fake.predictions
    assert replicate_fake.cancels == [prediction_id]
    assert replicate_fake.predictions[prediction_id].status == "canceled"
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "canceled"


async def test_cancel_while_the_create_call_is_held(replicate_settings: Settings, replicate_fake: FakeReplicate,
                                                    storage: LocalStorage, catalog: Catalog,
                                                    fast_retry: RetryPolicy) -> None:
    replicate_fake.behavior.hang = True
    adapter = ReplicateExecutor(replicate_settings, storage, catalog, retry=fast_retry, prefer_wait_s=1)
    job = video_job(catalog, MODEL)
    task = asyncio.create_task(collect(adapter.run(job)))
    await _wait_for(lambda: bool(replicate_fake.predictions))  # created, the answer is still held
    await adapter.cancel(job.job_id)  # no prediction id known yet on our side
    events = await asyncio.wait_for(task, 10)
    assert replicate_fake.cancels == list(replicate_fake.predictions)
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "canceled"


async def test_abandoned_run_cancels_the_prediction(adapter: ReplicateExecutor, replicate_fake: FakeReplicate,
                                                    catalog: Catalog) -> None:
    replicate_fake.behavior.hang = True
    replicate_fake.behavior.max_prefer_wait_s = 0.01
    events = adapter.run(video_job(catalog, MODEL))
    async for event in events:
        if isinstance(event, ProviderEvent):
            break
    await events.aclose()  # the runner went away (shutdown, lost lease)
    await _wait_for(lambda: bool(replicate_fake.cancels))
    assert replicate_fake.cancels == list(replicate_fake.predictions)


# webhooks ----------------------------------------------------------------------------------------
@pytest.fixture
async def webhook_adapter(tmp_path: Path, replicate_fake: FakeReplicate, storage: LocalStorage,
                          catalog: Catalog, fast_retry: RetryPolicy):  # noqa: ANN201 - yields a pair
    """An adapter with a public URL (webhooks on) and a slow fallback poll, and the sink in front."""
    adapter = ReplicateExecutor(make_settings(tmp_path, replicate_base_url=replicate_fake.base_url,
                                              replicate_api_token=replicate_fake.token,
                                              replicate_webhook_secret=replicate_fake.webhook_secret,
                                              provider_poll_s=4.0),
                                storage, catalog, retry=fast_retry, slow_poll_factor=3.0)
    with WebhookSink(adapter, asyncio.get_running_loop()) as sink:
        adapter.settings.public_url = sink.url
        replicate_fake.behavior.max_prefer_wait_s = 0.01  # the create call answers at once
        yield adapter, sink


async def test_webhooks_deliver_the_updates(webhook_adapter, replicate_fake: FakeReplicate,  # noqa: ANN001
                                            storage: LocalStorage, catalog: Catalog) -> None:
    adapter, sink = webhook_adapter
    job = video_job(catalog, MODEL)
    started = time.monotonic()
    events = await collect(adapter.run(job))
    assert isinstance(events[-1], DoneEvent)
    assert time.monotonic() - started < 8.0  # the fallback poll (every 12 s) never had to run
    assert replicate_fake.api_calls("GET", "/v1/predictions/") == []
    assert replicate_fake.created[0]["webhook"] == f"{sink.url}/v1/webhooks/replicate"
    assert replicate_fake.created[0]["webhook_events_filter"] == ["start", "output", "logs", "completed"]
    assert sink.deliveries and all(d["accepted"] for d in sink.deliveries)
    [output] = of_type(events, OutputEvent)
    assert storage.get_bytes(output.key) == replicate_fake.mp4


async def test_webhooks_from_another_thread_reach_the_run(tmp_path: Path, replicate_fake: FakeReplicate,
                                                          storage: LocalStorage, catalog: Catalog,
                                                          fast_retry: RetryPolicy) -> None:
    adapter = ReplicateExecutor(make_settings(tmp_path, replicate_base_url=replicate_fake.base_url,
                                              replicate_api_token=replicate_fake.token,
                                              replicate_webhook_secret=replicate_fake.webhook_secret,
                                              provider_poll_s=4.0),
                                storage, catalog, retry=fast_retry, slow_poll_factor=3.0)
    with WebhookSink(adapter, None) as sink:  # handle_webhook runs on the sink's loop, not the run's
        adapter.settings.public_url = sink.url
        replicate_fake.behavior.max_prefer_wait_s = 0.01
        started = time.monotonic()
        events = await collect(adapter.run(video_job(catalog, MODEL)))
    assert isinstance(events[-1], DoneEvent)
    assert time.monotonic() - started < 8.0 and replicate_fake.api_calls("GET", "/v1/predictions/") == []
    assert adapter.webhook_stats["applied"] >= 1


async def test_duplicated_webhooks_are_applied_once(webhook_adapter, replicate_fake: FakeReplicate,  # noqa: ANN001
                                                    catalog: Catalog) -> None:
    adapter, sink = webhook_adapter
    replicate_fake.behavior.webhook_copies = 2
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    assert isinstance(events[-1], DoneEvent)
    await _wait_for(lambda: len(sink.deliveries) == len(replicate_fake.webhooks))
    ids = [w["webhook_id"] for w in replicate_fake.webhooks]
    distinct = len(set(ids))
    assert len(ids) == 2 * distinct
    assert all(d["accepted"] for d in sink.deliveries)  # a duplicate is acknowledged (no retry storm)
    assert adapter.webhook_stats["duplicate"] == distinct
    assert adapter.webhook_stats["applied"] + adapter.webhook_stats["unknown"] == distinct
    assert [e.stage for e in of_type(events, StageEvent)].count("generating") == 1
    assert len(of_type(events, OutputEvent)) == 1


async def test_badly_signed_webhooks_are_refused_and_change_nothing(
        webhook_adapter, replicate_fake: FakeReplicate, catalog: Catalog, storage: LocalStorage) -> None:  # noqa: ANN001
    adapter, sink = webhook_adapter
    adapter.settings.provider_poll_s = 0.1  # the job can only finish by polling now
    replicate_fake.behavior.webhook_secret_override = "whsec_" + base64.b64encode(b"not-the-secret").decode()
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    assert isinstance(events[-1], DoneEvent)
    await _wait_for(lambda: len(sink.deliveries) == len(replicate_fake.webhooks))
    assert sink.deliveries and not any(d["accepted"] for d in sink.deliveries)
    assert all(w["answer"] == 401 for w in replicate_fake.webhooks)
    assert adapter.webhook_stats["applied"] == 0 and adapter.webhook_stats["rejected"] == len(sink.deliveries)
    assert replicate_fake.api_calls("GET", "/v1/predictions/")  # polling carried the job


async def test_stale_webhooks_are_refused(webhook_adapter, replicate_fake: FakeReplicate,  # noqa: ANN001
                                          catalog: Catalog) -> None:
    adapter, sink = webhook_adapter
    adapter.settings.provider_poll_s = 0.1
    replicate_fake.behavior.webhook_timestamp_offset_s = -600  # signed correctly, 10 minutes old
    events = await collect(adapter.run(video_job(catalog, MODEL)))
    assert isinstance(events[-1], DoneEvent)
    await _wait_for(lambda: len(sink.deliveries) == len(replicate_fake.webhooks))
    assert sink.deliveries and not any(d["accepted"] for d in sink.deliveries)
    assert adapter.webhook_stats["applied"] == 0


async def test_a_forged_update_does_not_touch_a_running_job(
        webhook_adapter, replicate_fake: FakeReplicate, catalog: Catalog, storage: LocalStorage) -> None:  # noqa: ANN001
    adapter, _sink = webhook_adapter
    replicate_fake.behavior.run_s = 0.6
    job = video_job(catalog, MODEL)
    task = asyncio.create_task(collect(adapter.run(job)))
    await _wait_for(lambda: bool(replicate_fake.predictions))
    [prediction_id] = replicate_fake.predictions
    await _wait_for(lambda: prediction_id in adapter._by_prediction)
    forged = json.dumps({"id": prediction_id, "status": "succeeded",
                         "output": "http://127.0.0.1:9/evil.mp4"}).encode()
    bad_secret = "whsec_" + base64.b64encode(b"attacker").decode()
    headers = _signed(replicate_fake, forged, webhook_id="msg_forged", secret=bad_secret)
    assert await adapter.handle_webhook("replicate", headers, forged) is False
    stale = _signed(replicate_fake, forged, webhook_id="msg_stale", ts=int(time.time()) - 301)
    assert await adapter.handle_webhook("replicate", stale, forged) is False
    assert adapter._by_prediction[prediction_id].latest["status"] != "succeeded"
    events = await asyncio.wait_for(task, 10)
    [output] = of_type(events, OutputEvent)
    assert storage.get_bytes(output.key) == replicate_fake.mp4  # the genuine output, not the forged URL


async def test_handle_webhook_rules(replicate_settings: Settings, replicate_fake: FakeReplicate,
                                    storage: LocalStorage, catalog: Catalog) -> None:
    settings = replicate_settings.model_copy(update={"replicate_webhook_secret": replicate_fake.webhook_secret})
    adapter = ReplicateExecutor(settings, storage, catalog)
    body = json.dumps({"id": "p1", "status": "processing"}).encode()

    bad = _signed(replicate_fake, body, webhook_id="msg_1", secret="whsec_" + base64.b64encode(b"x" * 24).decode())
    assert await adapter.handle_webhook("replicate", bad, body) is False
    good = _signed(replicate_fake, body, webhook_id="msg_1")
    # A refused delivery is not remembered: the genuine one with the same id is still applied.
    assert await adapter.handle_webhook("replicate", good, body) is True
    assert adapter.webhook_stats["duplicate"] == 0
    assert await adapter.handle_webhook("replicate", good, body) is True
    assert adapter.webhook_stats["duplicate"] == 1
    # Header names are case-insensitive; several signatures may be listed (key rotation).
    mixed = {k.title(): v for k, v in _signed(replicate_fake, body, webhook_id="msg_2").items()}
    mixed["Webhook-Signature"] = "v1,AAAA " + mixed["Webhook-Signature"]
    assert await adapter.handle_webhook("replicate", mixed, body) is True
    tampered = _signed(replicate_fake, body, webhook_id="msg_3")
    assert await adapter.handle_webhook("replicate", tampered, body + b" ") is False
    for missing in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        headers = _signed(replicate_fake, body, webhook_id="msg_4")
        del headers[missing]
        assert await adapter.handle_webhook("replicate", headers, body) is False
    future = _signed(replicate_fake, body, webhook_id="msg_5", ts=int(time.time()) + 400)
    assert await adapter.handle_webhook("replicate", future, body) is False
    assert await adapter.handle_webhook("veo", good, body) is False
    no_secret = ReplicateExecutor(replicate_settings, storage, catalog)
    assert await no_secret.handle_webhook("replicate", _signed(replicate_fake, body), body) is False


async def test_the_webhook_secret_is_fetched_when_not_configured(
        tmp_path: Path, replicate_fake: FakeReplicate, storage: LocalStorage, catalog: Catalog,
        fast_retry: RetryPolicy) -> None:
    adapter = ReplicateExecutor(make_settings(tmp_path, replicate_base_url=replicate_fake.base_url,
                                              replicate_api_token=replicate_fake.token, provider_poll_s=4.0),
                                storage, catalog, retry=fast_retry, slow_poll_factor=3.0)
    with WebhookSink(adapter, asyncio.get_running_loop()) as sink:
        adapter.settings.public_url = sink.url
        replicate_fake.behavior.max_prefer_wait_s = 0.01
        events = await collect(adapter.run(video_job(catalog, MODEL)))
    assert isinstance(events[-1], DoneEvent)
    assert len(replicate_fake.api_calls("GET", "/v1/webhooks/default/secret")) == 1
    assert sink.deliveries and all(d["accepted"] for d in sink.deliveries)


# secrets -----------------------------------------------------------------------------------------
async def test_secrets_never_reach_logs_or_events(webhook_adapter, replicate_fake: FakeReplicate,  # noqa: ANN001
                                                  catalog: Catalog, caplog: pytest.LogCaptureFixture) -> None:
    adapter, _sink = webhook_adapter
    caplog.set_level(logging.DEBUG)
    ok = await collect(adapter.run(video_job(catalog, MODEL)))
    replicate_fake.behavior.fail_with = f"echo of {replicate_fake.token}"  # a provider echoing our token
    failed = await collect(adapter.run(video_job(catalog, MODEL)))
    replicate_fake.behavior.outage = True
    unavailable = await collect(adapter.run(video_job(catalog, MODEL)))
    assert isinstance(ok[-1], DoneEvent) and isinstance(failed[-1], ErrorEvent)
    assert isinstance(unavailable[-1], ErrorEvent)
    assert "[redacted]" in failed[-1].message
    text = caplog.text + repr(ok) + repr(failed) + repr(unavailable)
    for secret in (replicate_fake.token, replicate_fake.webhook_secret,
                   replicate_fake.webhook_secret.removeprefix("whsec_")):
        assert secret not in text
    assert "replicate" in caplog.text  # it did log


# pure helpers ------------------------------------------------------------------------------------
def test_map_input_for_veo_and_other_models() -> None:
    data = {"prompt": "p", "negative_prompt": "", "seed": 7, "duration": 8.0, "resolution": "1080p",
            "aspect_ratio": "9:16", "fps": 24, "loras": []}
    assert map_input("google/veo-3.1", data) == {"prompt": "p", "seed": 7, "duration": 8, "resolution": "1080p",
                                                 "aspect_ratio": "9:16"}
    other = map_input("acme/wan", {"prompt": "p", "num_frames": 17, "fps": 8, "width": 64, "height": 64,
                                   "duration": 2.125})
    assert other == {"prompt": "p", "num_frames": 17, "fps": 8, "width": 64, "height": 64, "duration": 2.125}


@pytest.mark.parametrize(("logs", "expected"), [
    (None, None), ("loading", None), (" 50%|█████     | 2/4 [00:01<00:01]", (2, 4)),
    ("10%\n40%", (40, 100)), ("1/4 [\n3/4 [", (3, 4)),
])
def test_parse_progress(logs: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_progress(logs) == expected
