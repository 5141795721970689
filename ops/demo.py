"""``make demo``: the whole product on this machine, end to end, with visible progress.

Starts the embedded stack (SQLite, local storage, local Ray, tiny checkpoints), creates a demo
user, submits an image job, a video job and an image-to-video job chained from the image
(``job:<id>``) over HTTP, follows each over SSE, checks the files (the PNG decodes at the
requested size; the MP4s have the requested frame count and fps), downloads them and prints
their paths. Then it runs the ``still-to-motion`` preset as a pipeline (``POST /v1/pipelines``:
text-to-image, image-to-video, frame interpolation, an MP4 export), showing each step's progress,
checks the final clip against the pipeline's quote and prints where it is. Exits non-zero when any
step fails.

It ends by printing the web console's URL, the admin key and the demo user's API key. With
``DEMO_KEEP=1`` the stack stays up (on ``CINEWEAVE_PORT``, 8000 by default, when that port is
free) until Ctrl-C, so the console can be opened and signed in to with that key.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import threading
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


PIPELINE_PRESET = "still-to-motion"
PIPELINE_PARAMS: dict[str, Any] = {"prompt": "a lighthouse at dusk, waves below", "duration": 1}
PIPELINE_TIMEOUT_S = 600.0


def follow_pipeline(client: Client, pipeline: dict[str, Any], timeout_s: float = PIPELINE_TIMEOUT_S) -> dict[str, Any]:
    """A progress bar per step (``GET /v1/pipelines/{id}`` polled) until the pipeline ends."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    url = f"/v1/pipelines/{pipeline['id']}"
    deadline = time.monotonic() + timeout_s
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.fields[stage]}"), TimeElapsedColumn(), console=console) as progress:
        bars = {s["name"]: progress.add_task(f"  step {s['index'] + 1}: {s['name']} ({s.get('model') or s.get('op')})",
                                             total=1.0, stage=s["status"]) for s in pipeline["steps"]}
        while True:
            pipeline = client._json(client.http.get(url))
            for step in pipeline["steps"]:
                done = step["status"] == "succeeded"
                progress.update(bars[step["name"]], completed=1.0 if done else float(step["progress"] or 0.0),
                                stage=step["status"] if done or not step.get("stage") else step["stage"])
            if pipeline["status"] in ("succeeded", "failed", "canceled"):
                return pipeline
            if time.monotonic() > deadline:
                raise DemoFailed(f"pipeline {pipeline['id']} still {pipeline['status']} after {timeout_s:.0f} s")
            time.sleep(0.2)


def run_pipeline(client: Client, out_dir: Path) -> Path:
    """The ``still-to-motion`` preset end to end; the final clip's path."""
    body = {"preset": PIPELINE_PRESET, "params": PIPELINE_PARAMS}
    console.print(f"\n[bold]Pipeline[/bold] preset [cyan]{PIPELINE_PRESET}[/cyan]: {PIPELINE_PARAMS}")
    quote = client._json(client.http.post("/v1/pipelines/quote", json=body))
    check(quote["affordable"], f"quoted {quote['credits']} credits for {len(quote['steps'])} steps: "
          + " → ".join(s["name"] for s in quote["steps"]))
    pipeline = client._json(client.http.post("/v1/pipelines", json=body,
                                             headers={"Idempotency-Key": f"demo-{uuid.uuid4().hex}"}))
    console.print(f"  pipeline {pipeline['id']} queued, {pipeline['credits']['reserved']} credits reserved")
    pipeline = follow_pipeline(client, pipeline)
    check(pipeline["status"] == "succeeded", f"{pipeline['id']} succeeded (error: {pipeline.get('error')})")
    check(pipeline["credits"]["charged"] == quote["credits"], f"charged the quote: {quote['credits']} credits")
    path = client.download(pipeline["outputs"][0]["url"], out_dir / f"{PIPELINE_PRESET}.mp4")
    from models.media import probe_mp4

    info, want = probe_mp4(path), quote["output"]
    check(info["num_frames"] == want["num_frames"] and abs(info["fps"] - want["fps"]) < 0.01,
          f"final MP4 has {want['num_frames']} frames at {want['fps']:g} fps ({info['width']}×{info['height']})")
    console.print(f"  final clip: [bold]{path}[/bold]", soft_wrap=True)
    return path


def keep_requested() -> bool:
    return os.environ.get("DEMO_KEEP", "").strip().lower() not in ("", "0", "false", "no")


def port_for(host: str, preferred: int, keep: bool) -> int:
    """A kept stack gets the configured port (a URL worth bookmarking) when it is free."""
    if keep:
        with socket.socket() as sock:
            try:
                sock.bind((host, preferred))
                return preferred
            except OSError:
                pass
    return free_port(host)


def print_console(url: str, admin_key: str, user_key: str, keep: bool) -> None:
    # soft_wrap: a key stays on one line (to copy) however narrow the terminal
    console.print(f"\n[bold]Web console:[/bold] {url}/", soft_wrap=True)
    console.print(f"  sign in with the demo user's API key: [cyan]{user_key}[/cyan]", soft_wrap=True)
    console.print(f"  or with the admin key (Admin page):   [cyan]{admin_key}[/cyan]", soft_wrap=True)
    if not keep:
        console.print("  (the stack stops now; run [bold]DEMO_KEEP=1 make demo[/bold] to keep it open)")


def wait_until_stopped() -> None:
    """Block until Ctrl-C (or SIGTERM); leaving the ``running_stack`` block then stops the stack."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"\n[bold]The stack keeps running.[/bold] Press Ctrl-C to stop it (or kill {os.getpid()}).")
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print("stopping …")


def print_passed(started: float, out_dir: Path) -> None:
    console.print(f"\n[bold green]demo passed[/bold green] in {time.perf_counter() - started:.0f} s; outputs:")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path}")


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    base = get_settings()
    keep = keep_requested()
    settings = base.model_copy(update={"port": port_for(base.host, base.port, keep),
                                       "admin_key": base.admin_key or secrets.token_urlsafe(24)})
    out_dir = (settings.data_dir / "demo-outputs" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    console.print(f"[bold]CineWeave demo[/bold] — data in {settings.data_dir.resolve()}")
    started = time.perf_counter()
    try:
        console.print("starting local Ray, building tiny checkpoints, deploying models …")
        with running_stack(settings) as (url, stack):
            console.print(f"stack up in {time.perf_counter() - started:.0f} s: API {url}, "
                          f"models {', '.join(sorted(stack.handles))}")
            admin = httpx.post(f"{url}/v1/admin/users", headers={"Authorization": f"Bearer {settings.admin_key}"},
                               json={"email": f"demo-{uuid.uuid4().hex[:8]}@example.com", "credits": 500})
            check(admin.status_code == 201, "demo user created with 500 credits")
            user_key = admin.json()["api_key"]
            client = Client(url, user_key)

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
                run_pipeline(client, out_dir)

            credits = client._json(client.http.get("/v1/credits"))
            console.print(f"\ncredits left: {credits['balance']} (reserved {credits['reserved']})")
            client.close()
            index = httpx.get(f"{url}/", timeout=10)
            check(index.status_code == 200 and "text/html" in index.headers.get("content-type", ""),
                  f"the web console answers at {url}/")
            print_passed(started, out_dir)
            print_console(url, settings.admin_key, user_key, keep)
            if keep:
                wait_until_stopped()
    except DemoFailed as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure is a failed demo, with its reason
        console.print(f"[red]demo failed:[/red] {type(exc).__name__}: {exc}")
        logging.getLogger(__name__).exception("demo failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
