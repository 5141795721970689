"""The diffusion upscaler on the real replica path (no Ray): a ``GeneratorServer`` on the tiny SD x4
upscaler reads the input image from storage (``image_key``), runs task upscale and stores a 4× PNG."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from models.catalog import Catalog
from models.generator import limit_threads
from models.tiny import make_tiny
from serve.generator import GeneratorServer

UPSCALER = "tiny-sd-x4-upscaler"


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    previous = limit_threads(1)
    out = tmp_path_factory.mktemp("tiny-upscaler")
    make_tiny(out, [UPSCALER])
    yield out
    limit_threads(previous)


async def test_a_replica_upscales_a_stored_image_four_times(upscaler_dir: Path, tmp_path: Path) -> None:
    spec = Catalog.load().get(UPSCALER)
    assert spec is not None
    data = spec.model_dump(mode="json")
    data["serving"].update(batch_wait_timeout_s=0.0)
    server = GeneratorServer(data, {"storage_url": f"file://{tmp_path / 'storage'}", "signing_secret": "s",
                                    "tiny_dir": str(upscaler_dir), "threads": 1})
    buf = io.BytesIO()
    Image.new("RGB", (12, 20), (10, 200, 10)).save(buf, format="PNG")
    server.storage.put_bytes("uploads/u/in.png", buf.getvalue(), "image/png")
    request = {"job_id": "job_up", "attempt": 1, "model": UPSCALER, "task": "upscale",
               "input": {"prompt": "", "image_key": "uploads/u/in.png", "steps": 2, "guidance": 0.0, "seed": 1,
                         "input_width": 8, "input_height": 8, "width": 32, "height": 32, "scale": 4},
               "output_prefix": "outputs/u/job_up/", "adapter_set": ""}
    events = [e async for e in server.generate(request)]
    assert events[-1]["type"] == "done", events[-1]
    [output] = [e for e in events if e["type"] == "output"]
    assert (output["width"], output["height"]) == (32, 32)
    stored = Image.open(io.BytesIO(server.storage.get_bytes(output["key"])))
    assert stored.size == (32, 32)
    assert [e["step"] for e in events if e["type"] == "progress" and e.get("step")][-1] == 2
