"""A rich progress bar fed by a job's server-sent events."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ops.client import Client


def follow(client: Client, job_id: str, label: str = "", console: Console | None = None,
           timeout_s: float = 3600.0) -> dict[str, Any]:
    """Show stage and step progress until the job ends; return the final job."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.fields[stage]}"), TimeElapsedColumn(),
                  console=console or Console(stderr=True), transient=False) as progress:
        task = progress.add_task(label or job_id, total=1.0, stage="queued")

        def on_event(event: dict[str, Any]) -> None:
            stage = event.get("stage") or event.get("status") or event["event"]
            if "progress" in event and isinstance(event["progress"], int | float):
                progress.update(task, completed=float(event["progress"]), stage=stage)
            else:
                progress.update(task, stage=stage)
            if event.get("loss") is not None:
                progress.update(task, stage=f"{stage} loss {event['loss']:.4f}")

        job = client.wait(job_id, on_event, timeout_s)
        progress.update(task, completed=1.0 if job["status"] == "succeeded" else progress.tasks[0].completed,
                        stage=job["status"])
    return job
