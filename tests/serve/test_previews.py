"""Step previews on a replica (no Ray): the real tiny-sd pipeline streams ``preview`` events every k
steps to the job's listeners (never into the replayed log), ``every_k_steps: 0`` sends none, and the
pump drops a job's preview while its previous one is still being rendered.

The job is held at a step by the replica's test hook (``serve.testhooks``) until the test saw its
preview, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from models.catalog import Catalog
from models.generator import limit_threads
from models.previews import Captured, PreviewImage
from serve.generator import GeneratorServer
from serve.previews import PreviewPump

TOKEN = "previewhold01"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from models.tiny import make_tiny

    previous = limit_threads(1)
    out = tmp_path_factory.mktemp("tiny")
    make_tiny(out, ["tiny-sd"])
    yield out
    limit_threads(previous)


def make_server(tmp_path: Path, tiny_dir: Path, **previews: Any) -> GeneratorServer:
    spec = Catalog.load().get("tiny-sd")
    assert spec is not None
    data = spec.model_dump(mode="json")
    if previews:
        data["previews"].update(previews)
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    return GeneratorServer(data, {"storage_url": f"file://{tmp_path / 'storage'}", "signing_secret": "s",
                                  "tiny_dir": str(tiny_dir), "threads": 1, "test_hooks_dir": str(hooks)})


def request(job_id: str, prompt: str, steps: int = 6) -> dict[str, Any]:
    return {"job_id": job_id, "attempt": 1, "input": {"prompt": prompt, "seed": 1, "steps": steps},
            "output_prefix": f"outputs/u/{job_id}/", "adapter_set": ""}


async def test_previews_stream_every_k_steps_and_are_not_replayed(tmp_path: Path, tiny_dir: Path) -> None:
    server = make_server(tmp_path, tiny_dir)
    assert server.previews.enabled and server.previews.every == 2
    hooks = tmp_path / "hooks"
    (hooks / f"{TOKEN}.hold").write_text("3")  # held after step 3: the step-2 preview is on its way
    events: list[dict[str, Any]] = []

    async def follow() -> None:
        async for event in server.generate(request("job_p", f"a cat {TOKEN}")):
            events.append(event)
            if event["type"] == "preview":
                (hooks / "job_p.release").write_text("")

    await asyncio.wait_for(follow(), timeout=120)
    types = [e["type"] for e in events]
    assert types[-1] == "done", events[-1]
    previews = [e for e in events if e["type"] == "preview"]
    assert previews and previews[0]["step"] == 2
    assert all(p["step"] % 2 == 0 and p["step"] < p["total"] == 6 for p in previews)
    first = previews[0]
    assert (first["width"], first["height"]) == (64, 64) and first["v"] == 1
    image = Image.open(io.BytesIO(base64.b64decode(first["image"].split(",", 1)[1])))
    assert image.format == "JPEG" and image.size == (64, 64)
    assert types.index("preview") < types.index("done")
    # the run's log (what a caller attaching later replays) has none
    assert all(e["type"] != "preview" for e in server.runs["job_p"].log)
    replay = [e async for e in server.generate(request("job_p", f"a cat {TOKEN}"))]
    assert "preview" not in [e["type"] for e in replay] and replay[-1]["type"] == "done"
    assert server.stats()["previews"]["sent"] >= 1


async def test_every_k_steps_zero_sends_none(tmp_path: Path, tiny_dir: Path) -> None:
    server = make_server(tmp_path, tiny_dir, every_k_steps=0)
    assert not server.previews.enabled
    assert server.previews.callback(["job_z"], [1], lambda i, e: None) is None
    events = await asyncio.wait_for(
        asyncio.ensure_future(_collect(server, request("job_z", "a dog", steps=4))), timeout=120)
    assert events[-1]["type"] == "done" and "preview" not in [e["type"] for e in events]
    assert server.stats()["previews"] == {"every_k_steps": 0, "decoder": None, "sent": 0, "dropped": 0,
                                          "failed": 0}


async def _collect(server: GeneratorServer, req: dict[str, Any]) -> list[dict[str, Any]]:
    return [event async for event in server.generate(req)]


class BlockingPreviewer:
    """Renders only when ``go`` is set, so a job's first preview stays in flight."""

    decoder = "projection"

    def __init__(self) -> None:
        self.go = threading.Event()
        self.captured = 0

    def capture(self, latents: torch.Tensor, index: int, call: dict[str, Any]) -> Captured:
        self.captured += 1
        return Captured(latents[index].clone(), 64, 64)

    def render(self, captured: Captured) -> PreviewImage:
        assert self.go.wait(10)
        return PreviewImage("data:image/jpeg;base64,AA==", 64, 64)


def test_pump_drops_while_the_jobs_preview_is_in_flight_and_previews_first_images_only() -> None:
    spec = Catalog.load().get("tiny-sd")
    assert spec is not None
    pump = PreviewPump(spec, None)
    previewer = BlockingPreviewer()
    pump.previewer = previewer
    published: list[tuple[int, dict[str, Any]]] = []
    done = threading.Event()

    def publish(index: int, event: dict[str, Any]) -> None:
        published.append((index, event))
        if len(published) == 2:
            done.set()

    # job a asked for 2 images (inputs 0, 1), job b for 1 (input 2)
    callback = pump.callback(["job_a", "job_b"], [2, 1], publish)
    latents = torch.zeros(3, 4, 8, 8)
    callback(1, 6, [0, 1, 2], latents, {"width": 64, "height": 64})  # odd step: nothing
    assert previewer.captured == 0
    callback(2, 6, [0, 1, 2], latents, {"width": 64, "height": 64})
    assert previewer.captured == 2  # one per job: the first image of each
    callback(4, 6, [0, 1, 2], latents, {"width": 64, "height": 64})  # both still rendering: dropped
    assert previewer.captured == 2 and pump.dropped == 2
    callback(6, 6, [0, 1, 2], latents, {"width": 64, "height": 64})  # the last step: the image follows
    assert pump.dropped == 2
    previewer.go.set()
    assert done.wait(10)  # job b's render ran after job a's (one worker; one in flight per job)
    pump.close()
    assert sorted(index for index, _ in published) == [0, 1]
    assert all(event["type"] == "preview" and event["step"] == 2 for _, event in published)
    assert pump.sent == 2 and pump.failed == 0
