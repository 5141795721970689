"""The ``cineweave`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from api.settings import get_settings
from ops.opscmd import ops_app

app = typer.Typer(help="CineWeave: self-hosted image/video generation and LoRA training.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
users_app = typer.Typer(help="Users and API keys.", no_args_is_help=True)
credits_app = typer.Typer(help="Credits.", no_args_is_help=True)
maintenance_app = typer.Typer(help="Scheduled tasks.", no_args_is_help=True)
models_app = typer.Typer(help="The model catalog and tiny checkpoints.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(credits_app, name="credits")
app.add_typer(maintenance_app, name="maintenance")
app.add_typer(models_app, name="models")
app.add_typer(ops_app, name="ops")

console = Console(stderr=True)


def _db():  # type: ignore[no-untyped-def]
    from api.db.engine import Database

    db = Database(get_settings())
    db.migrate()
    return db


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@users_app.command("create")
def users_create(email: str = typer.Option(..., "--email"), plan: str | None = typer.Option(None, "--plan"),
                 credits: int | None = typer.Option(None, "--credits", min=0),
                 admin: bool = typer.Option(False, "--admin", help="may call /v1/admin routes"),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """Create a user; prints the user id and a new API key (shown once)."""
    from api.core.errors import CineWeaveError
    from api.services.users import create_user

    db = _db()
    try:
        with db.session() as session:
            created = create_user(session, get_settings(), email, plan, credits, admin)
            session.commit()
    except CineWeaveError as exc:
        _fail(exc.message)
    if as_json:
        print(json.dumps({"user_id": created.user.id, "api_key": created.api_key,
                          "webhook_secret": created.webhook_secret}))
    else:
        print(f"user_id:        {created.user.id}")
        print(f"api_key:        {created.api_key}")
        print(f"webhook_secret: {created.webhook_secret}")


@credits_app.command("grant")
def credits_grant(email: str = typer.Option(..., "--email"), amount: int = typer.Option(..., "--amount", min=1),
                  note: str = typer.Option("", "--note"),
                  key: str | None = typer.Option(None, "--idempotency-key",
                                                 help="repeat-safe: the same key grants once")) -> None:
    """Grant credits to a user."""
    from api.core.errors import CineWeaveError
    from api.services.admin import AdminService
    from api.services.users import find_user_by_email

    db = _db()
    try:
        with db.read() as session:
            user = find_user_by_email(session, email)
        entry = AdminService(db, get_settings()).grant(user.id, amount, "grant", note or "cli grant", key)
    except CineWeaveError as exc:
        _fail(exc.message)
    print(f"granted {entry.amount} credits to {email}; balance {entry.available_after}")


@maintenance_app.command("run")
def maintenance_run(period: str | None = typer.Option(None, help="plan-grant period YYYY-MM (default: now)")) -> None:
    """Run the scheduled tasks once: plan grants, output expiry, lease reclaim, stuck jobs."""
    from api.services.maintenance import Maintenance
    from api.storage.base import make_storage

    settings = get_settings()
    storage = make_storage(settings.resolved_storage_url(), signing_secret=settings.resolved_signing_secret())
    report = Maintenance(_db(), settings, storage).run_once(period)
    print(json.dumps(report.as_dict()))


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """The catalog, with each model's availability."""
    from models.catalog import Catalog

    settings = get_settings()
    catalog = Catalog.load(settings.models_dir)
    rows = []
    for spec in catalog.all():
        available, reason = _availability(spec)
        rows.append({"id": spec.id, "kind": spec.kind, "tasks": spec.tasks, "family": spec.family,
                     "enabled": spec.enabled, "available": available, "reason": reason})
    if as_json:
        print(json.dumps(rows))
        return
    table = Table("id", "kind", "tasks", "family", "available", "note")
    for row in rows:
        table.add_row(row["id"], row["kind"], ",".join(row["tasks"]), row["family"] or "remote",
                      "yes" if row["available"] else "no", row["reason"] or "")
    Console().print(table)


def _availability(spec):  # type: ignore[no-untyped-def]
    settings = get_settings()
    if spec.remote_only:
        return True, f"remote ({spec.overflow.provider})"
    try:
        from models.loading import availability
    except ImportError:  # pragma: no cover - models package incomplete
        return spec.enabled, None
    return availability(spec, tiny_dir(settings), None)


def tiny_dir(settings) -> Path:  # type: ignore[no-untyped-def]
    return Path(settings.tiny_models_dir or settings.data_dir / "tiny-models")


@models_app.command("make-tiny")
def models_make_tiny(out_dir: Path | None = typer.Argument(None, help="default: $CINEWEAVE_DATA_DIR/tiny-models"),
                     force: bool = typer.Option(False, "--force")) -> None:
    """Build the tiny random-weight checkpoints (offline, a few seconds)."""
    from models.tiny import make_tiny

    target = out_dir or tiny_dir(get_settings())
    built = make_tiny(target, force=force)
    for name, path in built.items():
        print(f"{name}: {path}")


@app.command("up")
def up(host: str | None = typer.Option(None, help="default 127.0.0.1"),
       port: int | None = typer.Option(None, help="default 8000"),
       model: list[str] | None = typer.Option(None, "--model", help="deploy only these models")) -> None:
    """Start the embedded stack: local Ray, tiny checkpoints, every available model, the API."""
    from ops.server import run_foreground

    settings = get_settings()
    settings = settings.model_copy(update={"host": host or settings.host, "port": port or settings.port})
    run_foreground(settings, models=model or None)


@app.command("generate")
def generate(model: str = typer.Option(..., "--model", "-m"), prompt: str = typer.Option(..., "--prompt", "-p"),
             out: Path = typer.Option(Path("."), "--out", help="directory for the outputs"),
             width: int | None = typer.Option(None), height: int | None = typer.Option(None),
             steps: int | None = typer.Option(None), seed: int | None = typer.Option(None),
             num_frames: int | None = typer.Option(None, "--num-frames"), fps: int | None = typer.Option(None),
             duration: float | None = typer.Option(None, help="seconds (video)"),
             image: str | None = typer.Option(None, help="upload id, job:<id>, URL, or a local file"),
             negative_prompt: str | None = typer.Option(None, "--negative-prompt")) -> None:
    """Submit a job through the HTTP API and follow it with a progress bar (SSE)."""
    from ops.client import ApiError, Client
    from ops.progress import follow

    settings = get_settings()
    if not settings.api_key:
        _fail("set CINEWEAVE_API_KEY (create one with `cineweave users create`)")
    client = Client(settings.api_url, settings.api_key)
    inputs = {k: v for k, v in {"prompt": prompt, "width": width, "height": height, "steps": steps, "seed": seed,
                                "num_frames": num_frames, "fps": fps, "duration": duration,
                                "negative_prompt": negative_prompt}.items() if v is not None}
    try:
        if image:
            local = Path(image)
            inputs["image"] = client.upload(local)["id"] if local.is_file() else image
        job = client.submit(model, inputs)
        console.print(f"job {job['id']} queued ({job['credits']['reserved']} credits reserved)")
        job = follow(client, job["id"], label=f"{model}")
    except ApiError as exc:
        _fail(str(exc))
    if job["status"] != "succeeded":
        _fail(f"job {job['id']} {job['status']}: {(job.get('error') or {}).get('message', '')}")
    for i, output in enumerate(job["outputs"]):
        ext = {"image/png": "png", "video/mp4": "mp4"}.get(output["content_type"], "bin")
        path = client.download(output["url"], out / f"{job['id']}-{i}.{ext}")
        print(path.resolve())


@app.command("train")
def train(images: Path = typer.Option(..., "--images", help="a directory of images (+ .txt captions) or a ZIP"),
          name: str = typer.Option(..., "--name"), base: str = typer.Option(..., "--base", help="base model id"),
          steps: int = typer.Option(1200, "--steps", help="600, 1200, 2000 or any value the model allows"),
          trigger_word: str = typer.Option("TOK", "--trigger-word"), rank: int = typer.Option(16, "--rank"),
          resolution: int | None = typer.Option(None, "--resolution")) -> None:
    """Upload photos, train a personal LoRA with a progress bar (loss), and print its id."""
    import io
    import zipfile

    from ops.client import ApiError, Client
    from ops.progress import follow

    settings = get_settings()
    if not settings.api_key:
        _fail("set CINEWEAVE_API_KEY")
    client = Client(settings.api_url, settings.api_key, timeout_s=120)
    if images.is_dir():
        files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".txt"))
        if not any(p.suffix.lower() != ".txt" for p in files):
            _fail(f"no JPEG, PNG or WebP images in {images}")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for path in files:
                archive.write(path, arcname=path.name)
        payload = ("dataset.zip", buffer.getvalue())
    elif images.is_file():
        payload = (images.name, images.read_bytes())
    else:
        _fail(f"{images} does not exist")
    try:
        upload = client._json(client.http.post("/v1/uploads", files={"file": payload}))
        console.print(f"uploaded {len((upload.get('meta') or {}).get('images', [])) or 1} image(s) as {upload['id']}")
        body = {"name": name, "base_model": base, "dataset" if upload["kind"] == "dataset" else "images":
                upload["id"] if upload["kind"] == "dataset" else [upload["id"]], "steps": steps,
                "trigger_word": trigger_word, "rank": rank, **({"resolution": resolution} if resolution else {})}
        lora = client._json(client.http.post("/v1/loras", json=body))
        console.print(f"LoRA {lora['id']} training as job {lora['job_id']} ({lora['credits']['reserved']} credits)")
        job = follow(client, lora["job_id"], label=f"train {name}")
    except ApiError as exc:
        _fail(str(exc))
    if job["status"] != "succeeded":
        _fail(f"training {job['status']}: {(job.get('error') or {}).get('message', '')}")
    print(lora["id"])


@models_app.command("swap")
def models_swap(model: str = typer.Argument(...), source: str = typer.Option(..., "--source",
                help="a directory, s3://bucket/prefix, tiny:NAME, or HF repo[@revision]")) -> None:
    """Point a running model at another checkpoint, without downtime (admin key)."""
    import httpx

    settings = get_settings()
    key = settings.admin_key
    if not key:
        _fail("set CINEWEAVE_ADMIN_KEY")
    response = httpx.post(f"{settings.api_url}/v1/admin/models/{model}/swap", json={"source": parse_source(source)},
                          headers={"Authorization": f"Bearer {key}"}, timeout=600)
    if response.status_code >= 400:
        _fail(response.text)
    print(json.dumps(response.json()))


def parse_source(text: str) -> dict[str, str]:
    """``s3://…`` → s3, ``tiny:NAME`` → tiny, an existing directory → path, else an HF repo[@rev]."""
    if text.startswith("s3://"):
        return {"s3": text}
    if text.startswith("tiny:"):
        return {"tiny": text[5:]}
    if Path(text).exists() or text.startswith(("/", "./", "../")):
        return {"path": str(Path(text).resolve())}
    repo, _, revision = text.partition("@")
    return {"hf_repo": repo, **({"revision": revision} if revision else {})}


@app.command("api")
def run_api(host: str | None = typer.Option(None), port: int | None = typer.Option(None)) -> None:
    """Run the API alone (no compute: jobs wait for a runner with an executor)."""
    import uvicorn

    from api.http.app import create_app

    settings = get_settings()
    settings = settings.model_copy(update={"host": host or settings.host, "port": port or settings.port})
    uvicorn.run(create_app(settings, None), host=settings.host, port=settings.port, log_level="info")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
