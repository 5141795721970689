"""The OpenAI shape on the real Ray path: n images are one job of n images on a tiny-sd replica."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from models.media import read_png_metadata
from tests.fixtures.harness import ledger_rows
from tests.fixtures.ray import RayApi

pytestmark = pytest.mark.ray


def test_images_generate_n2_runs_one_job_of_two_images_on_the_replica(ray_api: RayApi) -> None:
    user = ray_api.user(credits=100)
    client = openai.OpenAI(api_key=user.api_key, base_url=ray_api.url + "/openai/v1", max_retries=0, timeout=120)
    result = client.images.generate(model="tiny-sd", prompt="two cats", n=2, size="64x64", quality="low",
                                    response_format="b64_json")
    blobs = [base64.b64decode(item.b64_json) for item in result.data]
    assert [Image.open(io.BytesIO(b)).size for b in blobs] == [(64, 64), (64, 64)]
    seeds = [int(read_png_metadata(b)["seed"]) for b in blobs]
    assert seeds[1] == (seeds[0] + 1) % 2**32  # one batch entry per image, consecutive seeds
    assert blobs[0] != blobs[1]
    entries = ledger_rows(ray_api.db, user_id=user.user.id)
    charged = [(e.kind, e.amount) for e in entries if e.kind in ("reserve", "capture")]
    assert charged == [("reserve", 2), ("capture", 2)] and result.usage.total_tokens == 2
