"""A provider's video lands in our S3 bucket and is served by our presigned URL, not the provider's."""

from __future__ import annotations

import secrets

import httpx
import pytest

from api.core.events import DoneEvent, OutputEvent
from api.settings import Settings
from api.storage.s3 import S3Storage
from models.catalog import Catalog
from serve.fallback.http import RetryPolicy
from serve.fallback.replicate import ReplicateExecutor
from serve.fallback.veo import VeoExecutor
from tests.fakes.replicate_server import FakeReplicate
from tests.fakes.veo_server import FakeVeo
from tests.fixtures.s3 import S3Server
from tests.serve.fallback.conftest import collect, have_posters, of_type, video_job

pytestmark = pytest.mark.s3


@pytest.fixture
def bucket_storage(s3_server: S3Server) -> S3Storage:
    return S3Storage.from_url(s3_server.url_for(s3_server.bucket, prefix="t-" + secrets.token_hex(6)))


@pytest.mark.parametrize("provider", ["veo", "replicate"])
async def test_the_output_is_served_from_our_bucket(provider: str, bucket_storage: S3Storage, catalog: Catalog,
                                                    fast_retry: RetryPolicy, veo_settings: Settings,
                                                    veo_fake: FakeVeo, replicate_settings: Settings,
                                                    replicate_fake: FakeReplicate) -> None:
    if provider == "veo":
        adapter, model, mp4 = VeoExecutor(veo_settings, bucket_storage, catalog, retry=fast_retry), "veo-3.1", \
            veo_fake.mp4
    else:
        adapter, model, mp4 = (ReplicateExecutor(replicate_settings, bucket_storage, catalog, retry=fast_retry),
                               "veo-3.1-replicate", replicate_fake.mp4)
    job = video_job(catalog, model)
    events = await collect(adapter.run(job))
    await adapter.aclose()
    assert isinstance(events[-1], DoneEvent)
    [output] = of_type(events, OutputEvent)
    assert output.key.startswith(job.output_prefix)
    assert bucket_storage.stat(output.key).content_type == "video/mp4"
    url = bucket_storage.url(output.key, ttl_s=60)
    assert url.startswith(f"http://{bucket_storage.endpoint}/")
    async with httpx.AsyncClient(timeout=10) as client:
        served = await client.get(url)
        assert served.status_code == 200 and served.content == mp4
        assert served.headers["content-type"] == "video/mp4"
        if have_posters():
            poster = await client.get(bucket_storage.url(output.thumbnail_key, ttl_s=60))
            assert poster.content.startswith(b"\x89PNG") and poster.headers["content-type"] == "image/png"
