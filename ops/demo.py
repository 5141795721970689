"""``make demo``: the whole product on this machine, end to end, with visible progress.

Starts the embedded stack (SQLite, local storage, local Ray, tiny checkpoints), creates a demo
user, submits an image job, a video job and an image-to-video job chained from the image
(``job:<id>``) over HTTP, follows each over SSE, checks the files (the PNG decodes at the
requested size; the MP4s have the requested frame count and fps), downloads them and prints
their paths. Exits non-zero when any step fails.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from rich.console import Console

from api.settings import get_settings
from ops.client import Client
from ops.progress import follow
from ops.server import free_port, running_stack

console = Console()


class DemoFailed(RuntimeError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailed(message)
    console.print(f"  [green]✓[/green] {message}")


def run_job(client: Client, model: str, inputs: dict[str, Any], out_dir: Path, label: str) -> tuple[dict[str, Any], Path]:
    console.print(f"\n[bold]{label}[/bold] on [cyan]{model}[/cyan]: {inputs}")
    job = client.submit(model, inputs, idempotency_key=f"demo-{uuid.uuid4().hex}")
    console.print(f"  job {job['id']} queued, {job['credits']['reserved']} credits reserved")
    job = follow(client, job["id"], label=f"  {model}", console=console)
    check(job["status"] == "succeeded", f"{job['id']} succeeded (error: {job.get('error')})")
    output = job["outputs"][0]
    ext = "png" if output["content_type"] == "image/png" else "mp4"
    path = client.download(output["url"], out_dir / f"{label.lower().replace(' ', '-')}.{ext}")
    if job.get("thumbnail_url"):
        client.download(job["thumbnail_url"], out_dir / f"{label.lower().replace(' ', '-')}.thumb.png")
    return job, path


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    base = get_settings()
    settings = base.model_copy(update={"port": free_port(), "admin_key": base.admin_key or secrets.token_urlsafe(24)})
    out_dir = (settings.data_dir / "demo-outputs" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    console.print(f"[bold]CineWeave demo[/bold] — data in {settings.data_dir.resolve()}")
    started = time.perf_counter()
    try:
        console.print("starting local Ray, building tiny checkpoints, deploying models …")
        with running_stack(settings) as (url, stack):
            console.print(f"stack up in {time.perf_counter() - started:.0f} s: API {url}, "
                          f"models {', '.join(sorted(stack.handles))}")
            admin = httpx.post(f"{url}/v1/admin/users", headers={"Authorization": f"Bearer {settings.admin_key}"},
                               json={"email": f"demo-{uuid.uuid4().hex[:8]}@example.com", "credits": 200})
            check(admin.status_code == 201, "demo user created with 200 credits")
            client = Client(url, admin.json()["api_key"])

            image_job, png = run_job(client, "tiny-sd", {"prompt": "a lighthouse at dusk", "width": 64,
                                                         "height": 96, "steps": 4, "seed": 7}, out_dir, "Image")
            with Image.open(png) as img:
                img.load()
                check(img.size == (64, 96), f"PNG decodes at 64×96 ({png.name})")
                check(img.text.get("seed") == "7", "PNG metadata carries the seed")

            from models.media import probe_mp4

            _, mp4 = run_job(client, "tiny-wan", {"prompt": "waves on a beach", "width": 64, "height": 64,
                                                  "num_frames": 17, "fps": 8, "steps": 4, "seed": 3}, out_dir, "Video")
            info = probe_mp4(mp4)
            check(info["num_frames"] == 17 and abs(info["fps"] - 8) < 0.01,
                  f"MP4 has 17 frames at 8 fps ({info['duration_s']:.2f} s, {info['width']}×{info['height']})")

            if "tiny-wan-i2v" in stack.handles:
                _, i2v = run_job(client, "tiny-wan-i2v", {"prompt": "the lighthouse, camera pans", "image":
                                                          f"job:{image_job['id']}", "num_frames": 9, "fps": 8,
                                                          "steps": 3, "seed": 5}, out_dir, "Image to video")
                info = probe_mp4(i2v)
                check(info["num_frames"] == 9, f"image-to-video MP4 has 9 frames, chained from {image_job['id']}")

            credits = client._json(client.http.get("/v1/credits"))
            console.print(f"\ncredits left: {credits['balance']} (reserved {credits['reserved']})")
            client.close()
    except DemoFailed as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure is a failed demo, with its reason
        console.print(f"[red]demo failed:[/red] {type(exc).__name__}: {exc}")
        logging.getLogger(__name__).exception("demo failed")
        return 1
    console.print(f"\n[bold green]demo passed[/bold green] in {time.perf_counter() - started:.0f} s; outputs:")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
