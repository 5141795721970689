"""Fixtures for the overflow adapter tests: fake providers on loopback, settings pointing at them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from api.core.events import ExecutorEvent
from api.core.executor import ExecutionRequest
from api.core.requests import normalize_input
from api.settings import Settings
from models.catalog import Catalog
from serve.fallback.http import RetryPolicy
from tests.fakes.replicate_server import FakeReplicate
from tests.fakes.veo_server import FakeVeo

RUN_TIMEOUT_S = 20.0


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.load()


@pytest.fixture
def fast_retry() -> RetryPolicy:
    return RetryPolicy(attempts=4, initial_s=0.01, max_s=0.05, max_retry_after_s=3.0, request_timeout_s=5.0)


@pytest.fixture
def replicate_fake() -> Iterator[FakeReplicate]:
    with FakeReplicate() as fake:
        yield fake


@pytest.fixture
def veo_fake() -> Iterator[FakeVeo]:
    with FakeVeo() as fake:
        yield fake


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": tmp_path / "var", "signing_secret": "test-secret",
                              "provider_poll_s": 0.02, "provider_timeout_s": 10.0, "_env_file": None,
                              "egress_allow_networks": ["127.0.0.1/32"]}  # the fake file hosts
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def replicate_settings(tmp_path: Path, replicate_fake: FakeReplicate) -> Settings:
    return make_settings(tmp_path, replicate_base_url=replicate_fake.base_url,
                         replicate_api_token=replicate_fake.token)


@pytest.fixture
def veo_settings(tmp_path: Path, veo_fake: FakeVeo) -> Settings:
    return make_settings(tmp_path, gemini_base_url=veo_fake.url, gemini_api_key=veo_fake.api_key)


def video_job(catalog: Catalog, model: str, job_id: str | None = None, **raw: Any) -> ExecutionRequest:
    """An ExecutionRequest whose input went through the real validation/normalization."""
    spec = catalog.get(model)
    assert spec is not None, model
    task, data = normalize_input(spec, {"prompt": "a red fox running through snow", "seed": 42, **raw}, 500)
    job_id = job_id or "job_" + uuid.uuid4().hex[:10]
    return ExecutionRequest(job_id=job_id, user_id="u1", model=model, kind=spec.kind, task=task, input=data,
                            output_prefix=f"outputs/u1/{job_id}/")


async def collect(events: AsyncIterator[ExecutorEvent], timeout_s: float = RUN_TIMEOUT_S) -> list[ExecutorEvent]:
    out: list[ExecutorEvent] = []

    async def drain() -> None:
        async for event in events:
            out.append(event)

    await asyncio.wait_for(drain(), timeout_s)
    return out


def of_type(events: list[ExecutorEvent], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def have_posters() -> bool:
    """True once models.media (another workstream) provides extract_poster."""
    try:
        from models.media import extract_poster  # noqa: F401
    except ImportError:
        return False
    return True
