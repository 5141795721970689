"""The OpenAI shape, judged by the official ``openai`` client against a real server on 127.0.0.1.

Jobs run on :class:`MediaExecutor`, which writes real PNGs and MP4s (so sizes and frame counts
can be probed); a prompt with a gate holds its job until the test opens it. The storage signs
URLs for the live server, so a returned ``url`` is fetched as a client would fetch it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import imageio_ffmpeg
import openai
import pytest
from PIL import Image
from sqlalchemy import update

from api.core.events import DoneEvent, ErrorEvent, ExecutorEvent, OutputEvent, ProgressEvent, StageEvent
from api.core.executor import ExecutionRequest
from api.db.tables import Job, Upload
from api.http.app import create_app
from api.settings import Settings
from api.storage.local import LocalStorage
from models.media import encode_mp4, encode_png, extract_poster
from tests.fixtures.harness import LiveServer, add_user, balance, get_job, job_count, ledger_rows, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client marks Sora deprecated


@dataclass
class MediaExecutor:
    """Real media: ``num_outputs`` PNGs of the asked size, or an MP4 of ``num_frames`` + poster."""

    storage: LocalStorage
    gates: dict[str, threading.Event] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)  # prompts whose run ends in a final error
    runs: list[ExecutionRequest] = field(default_factory=list)
    _cancel: dict[str, asyncio.Event] = field(default_factory=dict)

    async def run(self, request: ExecutionRequest) -> AsyncIterator[ExecutorEvent]:
        self.runs.append(request)
        stop = self._cancel.setdefault(request.job_id, asyncio.Event())
        inp = request.input
        yield StageEvent("generating")
        yield ProgressEvent(1, 2)
        gate = self.gates.get(inp["prompt"])
        deadline = time.monotonic() + 30
        while gate is not None and not gate.is_set() and not stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if stop.is_set():
            yield ErrorEvent("canceled", "canceled", retryable=False)
            return
        if inp["prompt"] in self.fail:
            yield ErrorEvent("generation_error", "the pipeline raised", retryable=False)
            return
        yield ProgressEvent(2, 2)
        width, height = int(inp["width"]), int(inp["height"])
        if request.kind == "video":
            frames = [Image.new("RGB", (width, height), (i * 10 % 256, 80, 160)) for i in range(inp["num_frames"])]
            with tempfile.TemporaryDirectory() as tmp:
                path = encode_mp4(frames, inp["fps"], Path(tmp) / "v.mp4")
                key = f"{request.output_prefix}0.mp4"
                self.storage.put_file(key, path, "video/mp4")
                poster = extract_poster(path)
            thumb = f"{request.output_prefix}0.poster.png"
            self.storage.put_bytes(thumb, poster, "image/png")
            yield OutputEvent(key=key, content_type="video/mp4", width=width, height=height,
                              num_frames=inp["num_frames"], fps=inp["fps"], duration_s=inp["duration"],
                              thumbnail_key=thumb)
        else:
            for i in range(int(inp.get("num_outputs") or 1)):
                key = f"{request.output_prefix}{i}.png"
                self.storage.put_bytes(key, encode_png(Image.new("RGB", (width, height), (i * 60, 20, 200)),
                                                       {"seed": inp["seed"] + i}), "image/png")
                yield OutputEvent(key=key, content_type="image/png", width=width, height=height)
        yield DoneEvent({"seed": inp.get("seed")})

    async def cancel(self, job_id: str) -> None:
        self._cancel.setdefault(job_id, asyncio.Event()).set()


@dataclass
class Stack:
    server: LiveServer
    app: Any
    executor: MediaExecutor
    settings: Settings

    @property
    def db(self) -> Any:
        return self.app.state.cineweave.db

    def client(self, key: str, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(api_key=key, base_url=self.server.url + "/openai/v1", timeout=30, **kwargs)


@pytest.fixture
def make_stack(settings: Settings) -> Iterator[Callable[..., Stack]]:
    yield from _stacks(settings)


@pytest.fixture
def make_backend_stack(backend_settings: Settings) -> Iterator[Callable[..., Stack]]:
    """As ``make_stack``, on SQLite and again on a fresh PostgreSQL database."""
    yield from _stacks(backend_settings)


def _stacks(settings: Settings) -> Iterator[Callable[..., Stack]]:
    started: list[LiveServer] = []

    def start(**overrides: Any) -> Stack:
        s = settings.model_copy(update=overrides) if overrides else settings
        server = LiveServer(None)  # bound first: the storage signs URLs for its port
        storage = LocalStorage(s.data_dir / "storage", signing_secret="test-secret", base_url=server.url)
        executor = MediaExecutor(storage)
        server.app = create_app(s, executor, storage=storage, run_runner=True, run_maintenance=False)
        server.start()
        started.append(server)
        return Stack(server, server.app, executor, s)

    yield start
    for server in reversed(started):
        server.stop()


def png_bytes(width: int = 64, height: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()



def ledger_kinds(stack: Stack, job_id: str) -> list[tuple[str, int]]:
    return [(e.kind, e.amount) for e in ledger_rows(stack.db, job_id=job_id)]


# images ----------------------------------------------------------------------------------------
def test_generate_n2_b64_decodes_to_two_pngs_of_the_size_and_charges_two_images(
        make_backend_stack: Callable[..., Stack]) -> None:
    stack = make_backend_stack()
    user = add_user(stack.db, stack.settings, credits=100)
    result = stack.client(user.api_key).images.generate(model="tiny-sd", prompt="a cat", n=2, size="64x64",
                                                        response_format="b64_json")
    assert len(result.data) == 2
    for item in result.data:
        img = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert (img.format, img.size) == ("PNG", (64, 64))
        assert item.url is None and item.revised_prompt == "a cat"
    assert result.size == "64x64" and result.output_format == "png" and result.quality == "medium"
    # one job of two images, in one run, priced 2 × 1 credit; usage reports those credits
    assert len(stack.executor.runs) == 1 and stack.executor.runs[0].input["num_outputs"] == 2
    job_id = stack.executor.runs[0].job_id
    job = get_job(stack.db, job_id)
    assert job.api_shape == "openai" and job.credits_charged == 2
    assert result.usage.total_tokens == 2 and result.usage.output_tokens == 2 and result.usage.input_tokens == 0
    assert ledger_kinds(stack, job_id) == [("reserve", 2), ("capture", 2)]
    assert balance(stack.db, user.user.id).available == 98


def test_generate_url_jpeg_with_compression_and_quality_steps(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=100)
    client = stack.client(user.api_key)
    result = client.images.generate(model="tiny-sd", prompt="a dog", size="96x64", quality="high",
                                    output_format="jpeg", output_compression=40)
    assert len(result.data) == 1 and result.data[0].b64_json is None
    got = httpx.get(result.data[0].url, timeout=10)  # signed for the live server, no API key
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(got.content))
    assert (img.format, img.size) == ("JPEG", (96, 64))
    assert result.output_format == "jpeg" and result.quality == "high" and result.size == "96x64"
    # quality picks steps from the spec: tiny-sd's default is 4; high is twice it, low half
    assert stack.executor.runs[0].input["steps"] == 8
    client.images.generate(model="tiny-sd", prompt="a dog", quality="low", response_format="b64_json",
                           output_format="webp")
    assert stack.executor.runs[1].input["steps"] == 2
    assert "steps" not in {k for k, v in stack.executor.runs[1].input.items() if v is None}


def test_edit_uploads_the_image_and_runs_image_to_image(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=100)
    result = stack.client(user.api_key).images.edit(
        model="tiny-sd", image=("in.png", png_bytes(128, 96), "image/png"), prompt="make it blue", n=1,
        response_format="b64_json")
    img = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert img.size == (128, 96)  # size auto: the input's own size, which tiny-sd can make
    run = stack.executor.runs[0]
    assert run.task == "i2i"
    with stack.db.read() as session:
        upload = session.get(Upload, run.input["image"])
    assert upload is not None and upload.user_id == user.user.id and (upload.width, upload.height) == (128, 96)
    assert ledger_kinds(stack, run.job_id) == [("reserve", 3), ("capture", 3)]  # 128×96 = 3 × base pixels


def test_edit_with_a_mask_is_refused_naming_the_model_and_stores_nothing(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=100)
    with pytest.raises(openai.BadRequestError) as info:
        stack.client(user.api_key).images.edit(model="tiny-sd", image=("in.png", png_bytes(), "image/png"),
                                               mask=("m.png", png_bytes(), "image/png"), prompt="inpaint")
    assert info.value.code == "mask_not_supported" and info.value.param == "mask"
    assert "tiny-sd" in info.value.message
    with stack.db.read() as session:
        assert session.query(Upload).count() == 0
    assert job_count(stack.db) == 0 and balance(stack.db, user.user.id).available == 100


def test_synchronous_wait_times_out_with_the_job_id_and_is_not_retried(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(openai_wait_s=0.3)
    stack.executor.gates["held"] = threading.Event()
    user = add_user(stack.db, stack.settings, credits=100)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            stack.client(user.api_key, max_retries=3).images.generate(model="tiny-sd", prompt="held")
        err = info.value
        assert err.status_code == 408 and err.code == "generation_pending"
        job_id = err.body["job_id"]
        assert job_id in err.message and f"/v1/jobs/{job_id}" in err.message
        assert job_count(stack.db) == 1  # x-should-retry: false: the client did not submit again
    finally:
        stack.executor.gates["held"].set()
    wait_for(lambda: get_job(stack.db, job_id).status == "succeeded", "the held job to finish")


def test_a_failed_generation_is_a_final_error_and_refunded(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.executor.fail.add("doomed")
    user = add_user(stack.db, stack.settings, credits=100)
    with pytest.raises(openai.InternalServerError) as info:
        stack.client(user.api_key, max_retries=2).images.generate(model="tiny-sd", prompt="doomed", n=3)
    assert info.value.code == "generation_failed" and "refunded" in info.value.message
    job_id = info.value.body["job_id"]
    assert job_count(stack.db) == 1  # not retried: a retry would only submit (and reserve) again
    assert ledger_kinds(stack, job_id) == [("reserve", 3), ("refund", 3)]
    assert balance(stack.db, user.user.id).available == 100


def test_an_idempotency_key_replays_the_same_images_and_charges_once(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=100)
    client = stack.client(user.api_key)
    headers = {"Idempotency-Key": "img-1"}
    first = client.images.generate(model="tiny-sd", prompt="once", n=2, response_format="b64_json",
                                   extra_headers=headers)
    again = client.images.generate(model="tiny-sd", prompt="once", n=2, response_format="b64_json",
                                   extra_headers=headers)
    assert [d.b64_json for d in again.data] == [d.b64_json for d in first.data] and again.created == first.created
    assert job_count(stack.db) == 1 and balance(stack.db, user.user.id).available == 98
    with pytest.raises(openai.ConflictError):  # the same key with another request
        client.images.generate(model="tiny-sd", prompt="twice", extra_headers=headers)


# videos ----------------------------------------------------------------------------------------
def count_frames(data: bytes) -> tuple[int, tuple[int, int]]:
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        reader = imageio_ffmpeg.read_frames(f.name)
        meta = next(reader)
        frames = sum(1 for _ in reader)
    return frames, tuple(meta["size"])


def test_video_create_retrieve_download(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.executor.gates["a fox"] = threading.Event()
    user = add_user(stack.db, stack.settings, credits=100)
    client = stack.client(user.api_key)
    video = client.videos.create(model="tiny-wan", prompt="a fox", seconds="2", size="64x48")  # type: ignore[arg-type]
    assert video.object == "video" and video.status == "queued" and video.model == "tiny-wan"
    assert video.size == "64x48" and video.seconds == "2.125"  # 2 s at 8 fps: 17 frames (4k+1)
    wait_for(lambda: client.videos.retrieve(video.id).status == "in_progress", "in_progress")
    held = client.videos.retrieve(video.id)
    assert 0 <= held.progress < 100 and held.completed_at is None
    stack.executor.gates["a fox"].set()
    deadline = time.monotonic() + 20
    while (done := client.videos.retrieve(video.id)).status != "completed":
        assert done.status != "failed" and time.monotonic() < deadline
        time.sleep(0.05)
    assert done.progress == 100 and done.completed_at is not None and done.error is None
    assert done.expires_at is None  # outputs are kept (output_retention_days 0)
    content = client.videos.download_content(video.id)
    assert content.response.headers["content-type"] == "video/mp4"
    assert count_frames(content.content) == (17, (64, 48))
    poster = Image.open(io.BytesIO(client.videos.download_content(video.id, variant="thumbnail").content))
    assert (poster.format, poster.size) == ("PNG", (64, 48))
    job = get_job(stack.db, video.id)
    assert job.api_shape == "openai" and job.input["num_frames"] == 17
    assert ledger_kinds(stack, video.id) == [("reserve", job.credits_reserved), ("capture", job.credits_reserved)]
    assert balance(stack.db, user.user.id).available == 100 - job.credits_reserved
    # deleted: the object says so, the content is gone, the ledger stays
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    assert len(ledger_rows(stack.db, job_id=video.id)) == 2


def test_video_from_an_input_reference_is_image_to_video(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=100)
    client = stack.client(user.api_key)
    video = client.videos.create(model="tiny-wan-i2v", prompt="wave",
                                 input_reference=("ref.png", png_bytes(), "image/png"))
    done = client.videos.poll(video.id, poll_interval_ms=50)
    assert done.status == "completed"
    job = get_job(stack.db, video.id)
    assert job.task == "i2v" and job.input["image"].startswith("upl")
    with pytest.raises(openai.BadRequestError) as info:  # a text-only model takes no reference
        client.videos.create(model="tiny-wan", prompt="x", input_reference=("ref.png", png_bytes(), "image/png"))
    assert info.value.param == "input_reference"


def test_canceled_video_is_failed_with_an_error_and_refunded(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.executor.gates["stop me"] = threading.Event()
    user = add_user(stack.db, stack.settings, credits=100)
    client = stack.client(user.api_key)
    video = client.videos.create(model="tiny-wan", prompt="stop me")
    wait_for(lambda: client.videos.retrieve(video.id).status == "in_progress", "in_progress")
    httpx.post(f"{stack.server.url}/v1/jobs/{video.id}/cancel", headers={"Authorization": f"Bearer {user.api_key}"})
    done = client.videos.poll(video.id, poll_interval_ms=50)
    assert done.status == "failed" and done.error is not None and done.error.code == "canceled"
    assert balance(stack.db, user.user.id).available == 100
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.download_content(video.id)
    assert info.value.code == "video_not_ready"


def test_video_list_pages_with_after_limit_and_order(make_backend_stack: Callable[..., Stack]) -> None:
    stack = make_backend_stack()
    user = add_user(stack.db, stack.settings, credits=500)
    client = stack.client(user.api_key)
    client.images.generate(model="tiny-sd", prompt="not a video", response_format="b64_json")
    ids = [client.videos.create(model="tiny-wan", prompt=f"v{i}").id for i in range(3)]
    # distinct creation times, a second apart, in the order of creation (a fast clock may give equal ones)
    base = get_job(stack.db, ids[0]).created_at - timedelta(seconds=10)
    with stack.db.session() as session:
        for i, job_id in enumerate(ids):
            session.execute(update(Job).where(Job.id == job_id).values(created_at=base + timedelta(seconds=i)))
        session.commit()
    first = client.videos.list(limit=2)
    assert [v.id for v in first.data] == ids[::-1][:2] and first.has_more
    assert first.last_id == ids[1] and first.first_id == ids[2]
    rest = client.videos.list(limit=2, after=first.last_id)
    assert [v.id for v in rest.data] == [ids[0]] and not rest.has_more
    assert [v.id for v in client.videos.list(order="asc").data] == ids
    assert [v.id for v in client.videos.list(order="asc", after=ids[0]).data] == ids[1:]
    # the whole list through the client's own paginator
    assert [v.id for v in client.videos.list(limit=1)] == ids[::-1]
    other = add_user(stack.db, stack.settings, credits=10)
    with pytest.raises(openai.NotFoundError):
        stack.client(other.api_key).videos.retrieve(ids[0])
    assert stack.client(other.api_key).videos.list().data == []


def test_models_list(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=1)
    client = stack.client(user.api_key)
    ids = [m.id for m in client.models.list()]
    assert "tiny-sd" in ids and "tiny-wan" in ids
    assert client.models.retrieve("tiny-wan").id == "tiny-wan"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_video_expires_at_follows_the_retention_setting() -> None:
    from datetime import UTC, datetime

    from api.db.tables import Job
    from api.http.compat.openai import video_view

    done = datetime(2026, 1, 1, tzinfo=UTC)
    job = Job(user_id="u", model="tiny-wan", kind="video", task="t2v", status="succeeded", progress=1.0,
              input={"prompt": "p", "width": 64, "height": 48, "duration": 2.125}, created_at=done,
              completed_at=done)
    assert video_view(job, 7).expires_at == int(done.timestamp()) + 7 * 86400
    assert video_view(job, 0).expires_at is None
    view = video_view(job, 0)
    assert (view.size, view.seconds, view.status, view.progress) == ("64x48", "2.125", "completed", 100)


# errors through the client --------------------------------------------------------------------
def test_errors_raise_the_clients_own_exceptions_with_our_message(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(rate_limit_per_minute=2)
    poor = add_user(stack.db, stack.settings, credits=0)
    # OpenAI answers an account that cannot pay with 429 insufficient_quota; so do we (not 402),
    # with x-should-retry: false so the client does not retry it
    with pytest.raises(openai.RateLimitError) as info:
        stack.client(poor.api_key, max_retries=2).images.generate(model="tiny-sd", prompt="x")
    assert info.value.code == "insufficient_quota" and info.value.type == "insufficient_quota"
    assert "credit" in info.value.message
    assert job_count(stack.db) == 0

    user = add_user(stack.db, stack.settings, credits=100)
    client = stack.client(user.api_key)
    with pytest.raises(openai.NotFoundError) as nf:
        client.images.generate(model="dall-e-9", prompt="x")
    assert nf.value.code == "model_not_found" and "dall-e-9" in nf.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="tiny-sd", prompt="x", size="4096x4096")
    assert bad.value.param == "size" and "4096x4096" in bad.value.message and "32–256" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad_n:
        client.images.generate(model="tiny-sd", prompt="x", n=11)
    assert bad_n.value.param == "n"
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        client.videos.create(model="tiny-sd", prompt="x")
    assert "image model" in wrong_kind.value.message
    with pytest.raises(openai.AuthenticationError):
        stack.client("not-a-key").images.generate(model="tiny-sd", prompt="x")
    assert job_count(stack.db) == 0 and balance(stack.db, user.user.id).available == 100

    client.images.generate(model="tiny-sd", prompt="one", response_format="b64_json")
    client.images.generate(model="tiny-sd", prompt="two", response_format="b64_json")
    with pytest.raises(openai.RateLimitError) as limited:
        client.images.generate(model="tiny-sd", prompt="three")
    assert limited.value.code == "rate_limited" and limited.value.response.headers.get("retry-after")
    assert "x-should-retry" not in limited.value.response.headers  # a rate limit may be retried
    assert job_count(stack.db, user.user.id) == 2 and balance(stack.db, user.user.id).available == 98


# units -----------------------------------------------------------------------------------------
def test_steps_for_quality_is_a_fraction_of_the_spec_default_within_limits(catalog: Any) -> None:
    from api.http.compat.openai import quality_label, steps_for_quality

    spec = catalog.get("tiny-sd")  # default 4 steps, max 50
    assert [steps_for_quality(spec, q) for q in ("auto", "low", "medium", "standard", "high", "hd")] == \
        [None, 2, 4, 4, 8, 8]
    capped = spec.model_copy(update={"limits": spec.limits.model_copy(update={"max_steps": 6})})
    assert steps_for_quality(capped, "hd") == 6
    assert [quality_label(q) for q in ("auto", "standard", "hd", "low")] == ["medium", "medium", "high", "low"]


def test_num_outputs_is_native_and_priced_per_image(catalog: Any, settings: Settings) -> None:
    from api.core.errors import InvalidInput
    from api.core.pricing import price_generation
    from api.core.requests import normalize_input

    sd = catalog.get("tiny-sd")
    _task, one = normalize_input(sd, {"prompt": "x"}, 500)
    _task, five = normalize_input(sd, {"prompt": "x", "num_outputs": 5}, 500)
    assert "num_outputs" not in one and five["num_outputs"] == 5
    assert price_generation(sd, five, settings) == 5 * price_generation(sd, one, settings)
    for bad in (0, 11):
        with pytest.raises(InvalidInput):
            normalize_input(sd, {"prompt": "x", "num_outputs": bad}, 500)
    with pytest.raises(InvalidInput):
        normalize_input(catalog.get("tiny-wan"), {"prompt": "x", "num_outputs": 2}, 500)


def test_media_convert_stores_each_format_once(storage: LocalStorage) -> None:
    from api.services import media_convert

    storage.put_bytes("outputs/u/j/0.png", png_bytes(32, 16), "image/png")
    assert media_convert.ensure_format(storage, "outputs/u/j/0.png", "image/png", "png") == ("outputs/u/j/0.png", None)
    key, data = media_convert.ensure_format(storage, "outputs/u/j/0.png", "image/png", "webp", 70)
    assert key == "outputs/u/j/0.q70.webp" and data is not None
    assert Image.open(io.BytesIO(storage.get_bytes(key))).format == "WEBP"
    assert media_convert.ensure_format(storage, "outputs/u/j/0.png", "image/png", "webp", 70) == (key, None)
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").rotate(30).save(buf, format="PNG")
    small = media_convert.convert_image(buf.getvalue(), "jpeg", 5)
    big = media_convert.convert_image(buf.getvalue(), "jpeg", 100)
    assert Image.open(io.BytesIO(small)).format == "JPEG" and len(small) < len(big)


def test_video_create_takes_json_too_and_the_schema_types_every_route(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    user = add_user(stack.db, stack.settings, credits=100)
    got = httpx.post(f"{stack.server.url}/openai/v1/videos", json={"model": "tiny-wan", "prompt": "json", "seconds": 1},
                     headers={"Authorization": f"Bearer {user.api_key}"}, timeout=10)
    assert got.status_code == 200 and got.json()["object"] == "video", got.text
    assert get_job(stack.db, got.json()["id"]).input["num_frames"] == 9  # 1 s at 8 fps → 9 frames (4k+1)
    schema = httpx.get(f"{stack.server.url}/openapi.json", timeout=10).json()
    ours = {(path, method): op for path, ops in schema["paths"].items() if path.startswith("/openai/")
            for method, op in ops.items()}
    assert len(ours) == 9
    for (path, method), op in ours.items():
        content = op["responses"]["200"]["content"]
        if path.endswith("/content"):
            assert "video/mp4" in content
        else:
            assert "$ref" in content["application/json"]["schema"], (path, method)
