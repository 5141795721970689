"""``num_outputs`` on the real path (no Ray): a replica running the tiny-sd generator expands one
request for n images into n entries of ONE pipeline call (seeds seed, seed+1, …) and gives the run
its n outputs back, stored under distinct keys and recorded in its result."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from models.catalog import Catalog
from models.generator import limit_threads
from models.media import read_png_metadata
from models.tiny import make_tiny
from serve.generator import GeneratorServer
from serve.messages import ResultRecord


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    previous = limit_threads(1)
    out = tmp_path_factory.mktemp("tiny-sd")
    make_tiny(out, ["tiny-sd"])
    yield out
    limit_threads(previous)
    mp.undo()


def server_for(tiny_dir: Path, tmp_path: Path) -> GeneratorServer:
    spec = Catalog.load().get("tiny-sd")
    assert spec is not None
    data = spec.model_dump(mode="json")
    data["serving"].update(max_batch_size=8, batch_wait_timeout_s=0.0)
    return GeneratorServer(data, {"storage_url": f"file://{tmp_path / 'storage'}", "signing_secret": "s",
                                  "tiny_dir": str(tiny_dir), "threads": 1})


def request(job: str, **inp: Any) -> dict[str, Any]:
    return {"job_id": job, "attempt": 1, "input": {"prompt": "a cat", "width": 32, "height": 32, "steps": 2,
                                                     "guidance": 5.0, **inp},
            "output_prefix": f"outputs/u/{job}/", "adapter_set": ""}


async def test_one_request_for_three_images_is_one_batch_of_three(tiny_sd_dir: Path, tmp_path: Path) -> None:
    server = server_for(tiny_sd_dir, tmp_path)
    events = [e async for e in server.generate(request("job_n", seed=7, num_outputs=3))]
    assert events[-1]["type"] == "done", events[-1]
    outputs = [e for e in events if e["type"] == "output"]
    keys = [o["key"] for o in outputs]
    assert keys == [f"outputs/u/job_n/{i}.png" for i in range(3)]
    assert server.generator.last_batch_sizes == [3]  # one pipeline call of three entries
    assert server.runs_by_job == {"job_n": 1}
    seeds = [read_png_metadata(server.storage.get_bytes(k))["seed"] for k in keys]
    assert seeds == ["7", "8", "9"]
    images = [Image.open(server.storage.local_path(k)).convert("RGB") for k in keys]  # type: ignore[attr-defined]
    assert all(img.size == (32, 32) for img in images)
    assert images[0].tobytes() != images[1].tobytes()  # different seeds, different noise
    assert all(o.get("thumbnail_key") for o in outputs)
    record = ResultRecord.model_validate_json(server.storage.get_bytes("outputs/u/job_n/result.json"))
    assert [o["key"] for o in record.outputs] == keys


async def test_a_request_of_n_shares_a_batch_with_others_and_each_gets_its_own(tiny_sd_dir: Path,
                                                                              tmp_path: Path) -> None:
    import asyncio

    server = server_for(tiny_sd_dir, tmp_path)
    server.batch_wait_timeout_s = 5.0  # the two arrive together; the batch waits for the second
    two, one = await asyncio.gather(
        _collect(server, request("job_a", seed=1, num_outputs=2)),
        _collect(server, request("job_b", seed=50)))
    assert [e["key"] for e in two if e["type"] == "output"] == ["outputs/u/job_a/0.png", "outputs/u/job_a/1.png"]
    assert [e["key"] for e in one if e["type"] == "output"] == ["outputs/u/job_b/0.png"]
    assert server.generator.last_batch_sizes == [3]


async def _collect(server: GeneratorServer, req: dict[str, Any]) -> list[dict[str, Any]]:
    return [e async for e in server.generate(req)]


async def test_a_batch_holds_at_most_max_batch_size_images(tmp_path: Path) -> None:
    """Runs are taken while their images fit (a run of n counts n); one run alone may exceed it."""
    import asyncio

    from tests.serve.test_batching import make_server, req
    from tests.serve.test_generator_server import collect

    server = make_server(tmp_path, max_batch_size=4, batch_wait_timeout_s=5.0)
    results = await asyncio.gather(collect(server, req(1, num_outputs=3)), collect(server, req(2, num_outputs=3)),
                                   collect(server, req(3, num_outputs=6)))
    assert [len([e for e in r if e["type"] == "output"]) for r in results] == [3, 3, 6]
    assert sorted(server.generator.calls) == [3, 3, 6]  # never 3 + 3 in one call of at most 4
