"""``cineweave ops``: render the Serve config, see what the cluster is doing, scale a model, run
the API attached to a cluster.

- ``serve-config`` renders the Serve config from the catalog (:mod:`ops.serve_config`).
- ``status`` reports Ray nodes and GPUs, Serve replicas per model and, from the database, queue
  depth, active jobs per model and jobs by status.
- ``scale MODEL --min N --max M`` changes a running deployment's autoscaling bounds in place.
- ``api`` runs the API and its runner beside a cluster whose models were deployed from the
  Serve config (``serve deploy``, KubeRay): it attaches to the running applications instead of
  deploying them. The process must be a driver on a Ray node (a streaming handle cannot go
  through Ray Client), which is why the Kubernetes API pods join the cluster with zero CPUs.
- ``capacity`` prints the jobs-per-hour table (:mod:`ops.capacity`).

Ray is reached through ``--address``, else ``RAY_ADDRESS``, else ``CINEWEAVE_RAY_ADDRESS``, else
``auto`` (a Ray node on this machine); a process already connected to Ray uses its session.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from api.settings import Settings, get_settings
from models.catalog import Catalog
from ops.stack import EmbeddedStack

logger = logging.getLogger(__name__)

ops_app = typer.Typer(help="Operations: Serve config, cluster status, scaling, the attached API.",
                      no_args_is_help=True)
_err = Console(stderr=True)

ACTIVE_APP_STATES = {"RUNNING", "DEPLOYING", "UNHEALTHY"}


def _fail(message: str, code: int = 1) -> None:
    _err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


# --- Ray --------------------------------------------------------------------------------------------

def ray_address(settings: Settings, address: str | None = None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or settings.ray_address or "auto"


def connect_ray(settings: Settings, address: str | None = None) -> bool:
    """Join the cluster unless this process already has a Ray session; True when this call joined."""
    import ray

    if ray.is_initialized():
        return False
    target = ray_address(settings, address)
    logger.info("connecting to Ray at %s", target)
    ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
    return True


def ray_nodes() -> list[dict[str, Any]]:
    import ray

    nodes = []
    for node in ray.nodes():
        resources = dict(node.get("Resources") or {})
        accelerators = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
        nodes.append({
            "node_id": node.get("NodeID"), "ip": node.get("NodeManagerAddress"), "alive": bool(node.get("Alive")),
            "head": "node:__internal_head__" in resources,
            "cpus": resources.get("CPU", 0.0), "gpus": resources.get("GPU", 0.0),
            "accelerators": accelerators, "memory_gb": round(resources.get("memory", 0.0) / 1024**3, 1),
        })
    return nodes


def serve_models(details: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per Serve application: status, where it came from, and per deployment replicas and bounds."""
    out: dict[str, dict[str, Any]] = {}
    for name, app in (details.get("applications") or {}).items():
        deployments = {}
        for dep_name, dep in (app.get("deployments") or {}).items():
            states: dict[str, int] = {}
            for replica in dep.get("replicas") or []:
                states[str(replica.get("state"))] = states.get(str(replica.get("state")), 0) + 1
            config = dep.get("deployment_config") or {}
            bounds = config.get("autoscaling_config") or {}
            deployments[dep_name] = {
                "status": str(dep.get("status")), "replicas": states, "running": states.get("RUNNING", 0),
                "target": dep.get("target_num_replicas"),
                "min": bounds.get("min_replicas", config.get("num_replicas")),
                "max": bounds.get("max_replicas", config.get("num_replicas")),
                "gpus_per_replica": (config.get("ray_actor_options") or {}).get("num_gpus", 0),
            }
        out[name] = {"status": str(app.get("status")), "source": str(app.get("source")), "deployments": deployments}
    return out


# --- the database -----------------------------------------------------------------------------------

def job_counts(settings: Settings) -> dict[str, Any]:
    """Jobs by status, and per model: queued, running, oldest queued wait. Reads only."""
    from sqlalchemy import func, select

    from api.db.engine import Database
    from api.db.tables import Job, utcnow

    db = Database(settings)
    try:
        with db.read() as session:
            counts = session.execute(select(Job.status, Job.model, func.count())
                                     .group_by(Job.status, Job.model)).all()
            oldest = session.execute(select(Job.model, func.min(Job.created_at))
                                     .where(Job.status == "queued").group_by(Job.model)).all()
    finally:
        db.dispose()
    now = utcnow()
    by_status: dict[str, int] = {}
    models: dict[str, dict[str, Any]] = {}
    for status, model, count in counts:
        by_status[status] = by_status.get(status, 0) + int(count)
        row = models.setdefault(model, {"queued": 0, "running": 0, "oldest_wait_s": None})
        if status in ("queued", "running"):
            row[status] = int(count)
    for model, created in oldest:
        if created is not None:
            models.setdefault(model, {"queued": 0, "running": 0})["oldest_wait_s"] = round(
                max(0.0, (now - created).total_seconds()), 1)
    return {"by_status": by_status, "models": models}


def collect_status(settings: Settings, address: str | None = None) -> dict[str, Any]:
    """Everything ``cineweave ops status`` shows, as one JSON-able dict."""
    import ray

    from ops.serve_config import ServeConfigError, serve_details

    report: dict[str, Any] = {}
    try:
        connect_ray(settings, address)
        report["ray"] = {"nodes": ray_nodes(), "total": ray.cluster_resources(),
                         "available": ray.available_resources()}
        try:
            report["serve"] = serve_models(serve_details())
        except ServeConfigError as exc:
            report["serve"] = {}
            report["serve_error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - report what can be reported
        report["ray_error"] = f"{type(exc).__name__}: {exc}"
    try:
        report["jobs"] = job_counts(settings)
    except Exception as exc:  # noqa: BLE001
        report["jobs_error"] = f"{type(exc).__name__}: {exc}"
    return report


def _print_status(report: Mapping[str, Any]) -> None:
    console = Console()
    if "ray_error" in report:
        console.print(f"[red]Ray:[/red] {report['ray_error']}")
    else:
        ray_info = report["ray"]
        nodes = Table("node", "ip", "alive", "CPUs", "GPUs", "accelerator", "memory GB", title="Ray nodes")
        for node in ray_info["nodes"]:
            nodes.add_row(("head " if node["head"] else "") + str(node["node_id"])[:8], str(node["ip"]),
                          "yes" if node["alive"] else "no", f"{node['cpus']:g}", f"{node['gpus']:g}",
                          ",".join(node["accelerators"]) or "-", f"{node['memory_gb']:g}")
        console.print(nodes)
        total, free = ray_info["total"], ray_info["available"]
        console.print(f"GPUs: {free.get('GPU', 0):g} free of {total.get('GPU', 0):g}   "
                      f"CPUs: {free.get('CPU', 0):g} free of {total.get('CPU', 0):g}")
    jobs = report.get("jobs") or {}
    per_model = jobs.get("models", {})
    table = Table(title="Models")
    table.add_column("model", no_wrap=True)
    for column in ("app", "replicas (running/target)", "min..max", "queued", "running", "oldest wait s"):
        table.add_column(column)
    serve_apps = report.get("serve") or {}
    for model in sorted(set(serve_apps) | set(per_model)):
        app = serve_apps.get(model)
        row = per_model.get(model, {})
        if app:
            dep = next(iter(app["deployments"].values()), {})
            replicas = f"{dep.get('running', 0)}/{dep.get('target')}"
            bounds = f"{dep.get('min')}..{dep.get('max')}"
            app_status = app["status"]
        else:
            replicas, bounds, app_status = "-", "-", "not deployed"
        wait = row.get("oldest_wait_s")
        table.add_row(model, app_status, replicas, bounds, str(row.get("queued", 0)), str(row.get("running", 0)),
                      "-" if wait is None else f"{wait:g}")
    console.print(table)
    if "serve_error" in report:
        console.print(f"[yellow]Serve:[/yellow] {report['serve_error']}")
    if "jobs_error" in report:
        console.print(f"[red]database:[/red] {report['jobs_error']}")
    else:
        console.print("jobs by status: " + (", ".join(f"{k} {v}" for k, v in sorted(jobs["by_status"].items()))
                                            or "none"))


# --- GPU memory per replica -------------------------------------------------------------------------

class ReplicaGpuMemory:
    """``{model: {replica: bytes}}`` for ``Metrics.watch_gpu_memory``, from ``GeneratorServer.stats()``.

    A handle call reaches one replica, so each scrape sends a few ``stats`` calls per model and
    keeps what each replica last said (for ``keep_s``). Replicas without CUDA report nothing.
    """

    def __init__(self, handles: Callable[[], Mapping[str, Any]], *, calls_per_model: int = 4,
                 timeout_s: float = 2.0, ttl_s: float = 10.0, keep_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._handles = handles
        self._calls = calls_per_model
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._keep_s = keep_s
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[float, float]] = {}
        self._sampled_at: float | None = None
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, dict[str, float]]:
        with self._lock:
            now = self._clock()
            if self._sampled_at is None or now - self._sampled_at >= self._ttl_s:
                self._sample(now)
                self._sampled_at = now
            out: dict[str, dict[str, float]] = {}
            for (model, replica), (used, _at) in sorted(self._seen.items()):
                out.setdefault(model, {})[replica] = used
            return out

    def _sample(self, now: float) -> None:
        for model, handle in dict(self._handles()).items():
            responses = []
            for _ in range(self._calls):
                try:
                    responses.append(handle.stats.remote())
                except Exception:  # noqa: BLE001 - a model going away mid-scrape
                    logger.debug("stats call to %s failed", model, exc_info=True)
            for response in responses:
                try:
                    stats = response.result(timeout_s=self._timeout_s)
                except Exception:  # noqa: BLE001 - busy or restarting replica: keep the last value
                    continue
                used, replica = stats.get("gpu_memory_bytes"), stats.get("replica")
                if used is not None and replica:
                    self._seen[(model, str(replica))] = (float(used), now)
        self._seen = {k: v for k, v in self._seen.items() if now - v[1] <= self._keep_s}


def watch_replica_gpu_memory(app: Any, stack: EmbeddedStack) -> ReplicaGpuMemory:
    """Feed the app's ``cineweave_replica_gpu_memory_bytes`` from the stack's deployments."""
    sampler = ReplicaGpuMemory(lambda: dict(stack.handles))
    app.state.cineweave.metrics.watch_gpu_memory(sampler)
    return sampler


# --- the API attached to a cluster ------------------------------------------------------------------

class AttachedStack(EmbeddedStack):
    """The API's side of a cluster whose applications were deployed from the Serve config.

    It deploys nothing and never shuts Serve down: it finds the running applications (again every
    ``refresh_s``, as KubeRay may deploy them after the API starts), holds their handles, and swaps
    checkpoints by changing the deployment's ``user_config`` in the applied config.
    """

    def __init__(self, settings: Settings, catalog: Catalog | None = None, *, address: str | None = None,
                 refresh_s: float = 30.0) -> None:
        super().__init__(settings, catalog, embedded=False)
        self.address = address
        self.refresh_s = refresh_s
        self._joined = False
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def start(self, build_tiny: bool = False) -> None:
        self._joined = connect_ray(self.settings, self.address)
        try:
            self.refresh()
        except Exception:  # noqa: BLE001 - Serve may not be up yet (serve deploy runs beside us)
            logger.warning("no Serve applications yet; looking again every %.0fs", self.refresh_s, exc_info=True)
        self._refresher = threading.Thread(target=self._refresh_forever, name="serve-refresh", daemon=True)
        self._refresher.start()

    def refresh(self) -> list[str]:
        """Pick up the catalog's applications running on the cluster; returns the models attached."""
        from ray import serve

        from ops.serve_config import serve_details
        from serve.app import app_name
        from serve.executor import POSTPROCESS_KEY, TRAINER_KEY
        from serve.postprocess import APP_NAME as POSTPROCESS_APP
        from serve.trainer import APP_NAME as TRAINER_APP

        details = serve_details()
        apps = details.get("applications") or {}
        attached = []
        with self._lock:
            trainer = apps.get(TRAINER_APP)
            if trainer is not None and str(trainer.get("status")) in ACTIVE_APP_STATES:
                self.handles.setdefault(TRAINER_KEY, serve.get_app_handle(TRAINER_APP))
            else:
                self.handles.pop(TRAINER_KEY, None)
            postprocess = apps.get(POSTPROCESS_APP)  # pipelines' op steps (serve.postprocess)
            if postprocess is not None and str(postprocess.get("status")) in ACTIVE_APP_STATES:
                self.handles.setdefault(POSTPROCESS_KEY, serve.get_app_handle(POSTPROCESS_APP))
            else:
                self.handles.pop(POSTPROCESS_KEY, None)
            for spec in self.catalog.enabled():
                if spec.remote_only:
                    continue
                app = apps.get(app_name(spec.id))
                if app is None or str(app.get("status")) not in ACTIVE_APP_STATES:
                    self.handles.pop(spec.id, None)
                    continue
                if spec.id not in self.handles:
                    self.handles[spec.id] = serve.get_app_handle(app_name(spec.id))
                self.specs[spec.id] = spec
                deployment = next(iter((app.get("deployments") or {}).values()), {})
                user_config = (deployment.get("deployment_config") or {}).get("user_config") or {}
                self.sources[spec.id] = dict(user_config.get("source") or {})
                attached.append(spec.id)
        return attached

    def _refresh_forever(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the cluster may be restarting; try again later
                logger.warning("could not refresh the Serve applications", exc_info=True)

    def swap(self, model_id: str, source: dict[str, Any]) -> dict[str, Any]:
        from models.spec import Source
        from ops.serve_config import update_deployment
        from serve.app import app_name, deployment_name

        if model_id not in self.handles:
            raise KeyError(model_id)
        Source.model_validate(source)
        update_deployment(app_name(model_id), deployment_name(model_id), user_config={"source": source},
                          wait_s=600.0)
        with self._lock:
            self.sources[model_id] = source
        return {"model": model_id, "source": source}

    def stop(self) -> None:
        import ray

        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        if self._joined and ray.is_initialized():
            ray.shutdown()  # this driver only; the cluster and its applications keep running


def run_attached(settings: Settings, address: str | None = None, refresh_s: float = 30.0) -> None:
    from ops.server import build_server

    stack = AttachedStack(settings, address=address, refresh_s=refresh_s)
    try:
        stack.start()
        server = build_server(settings, stack, log_level="info")
        watch_replica_gpu_memory(server.config.app, stack)
        logger.info("CineWeave API on http://%s:%d attached to %s (models: %s)", settings.host, settings.port,
                    ray_address(settings, address), ", ".join(sorted(stack.handles)) or "none yet")
        server.run()
    finally:
        stack.stop()


# --- commands ---------------------------------------------------------------------------------------

@ops_app.command("serve-config")
def serve_config_cmd(
        out: Path | None = typer.Option(None, "--out", help="write here (default: stdout)"),
        embedded: bool = typer.Option(False, "--embedded", help="CPU-only: no GPUs, the tiny models"),
        model: list[str] | None = typer.Option(None, "--model", help="only these models (repeatable)"),
        show_secrets: bool = typer.Option(False, "--show-secrets",
                                          help="put the storage URL (with its credentials) and the signing "
                                               "secret in the config, unredacted; without it the applications "
                                               "read them from CINEWEAVE_* where they are built"),
        no_secrets: bool = typer.Option(False, "--no-secrets", hidden=True,
                                        help="the default (kept for older scripts)"),
        trainer: bool = typer.Option(True, "--trainer/--no-trainer",
                                     help="the LoRA trainer application (when a served model is trainable)"),
        as_json: bool = typer.Option(False, "--json")) -> None:
    """Render the Serve config (serve deploy / KubeRay serveConfigV2) from the catalog and settings.

    Secrets never appear unless ``--show-secrets``: by default the applications name the build
    wrappers that read the storage URL and signing secret from the environment of the Ray node,
    and anything else secret-looking (credentials in a URL, a token) is redacted.
    """
    from ops.serve_config import ServeConfigError, dump, redact, render

    if show_secrets and no_secrets:
        _fail("--show-secrets and --no-secrets contradict each other")
    try:
        config = render(get_settings(), models=model or None, embedded=embedded, include_secrets=show_secrets,
                        trainer=trainer)
    except ServeConfigError as exc:
        _fail(str(exc))
    if not show_secrets:
        config = redact(config)
    text = json.dumps(config, indent=2) + "\n" if as_json else dump(config)
    if out is None:
        print(text, end="")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if show_secrets:
        out.chmod(0o600)  # it carries the storage credentials
    _err.print(f"wrote {out} ({len(config['applications'])} applications)")


@ops_app.command("status")
def status_cmd(as_json: bool = typer.Option(False, "--json"),
               address: str | None = typer.Option(None, "--address", help="Ray address (default: RAY_ADDRESS, "
                                                  "CINEWEAVE_RAY_ADDRESS, auto)")) -> None:
    """Nodes and GPUs, replicas per model, queue depth and active jobs per model, jobs by status."""
    report = collect_status(get_settings(), address)
    if as_json:
        print(json.dumps(report, default=str))
    else:
        _print_status(report)
    if "ray_error" in report and "jobs_error" in report:
        raise typer.Exit(1)


@ops_app.command("scale")
def scale_cmd(model: str = typer.Argument(..., help="model id (its Serve application)"),
              min_replicas: int = typer.Option(..., "--min", min=0), max_replicas: int = typer.Option(..., "--max", min=1),
              address: str | None = typer.Option(None, "--address"),
              wait_s: float = typer.Option(60.0, "--wait-s", help="how long to wait for the change")) -> None:
    """Change a running model's autoscaling bounds; its replicas keep running."""
    from ops.serve_config import ServeConfigError, update_deployment
    from serve.app import app_name, deployment_name

    settings = get_settings()
    try:
        connect_ray(settings, address)
        result = update_deployment(app_name(model), deployment_name(model), min_replicas=min_replicas,
                                   max_replicas=max_replicas, wait_s=wait_s)
    except (ServeConfigError, TimeoutError) as exc:
        _fail(str(exc))
    print(json.dumps(result, default=str))


@ops_app.command("capacity")
def capacity_cmd() -> None:
    """Jobs per hour per GPU type, from the catalog's measured run times (method: ops/capacity.py)."""
    from ops.capacity import markdown_table

    settings = get_settings()
    print(markdown_table(Catalog.load(settings.models_dir)), end="")


@ops_app.command("api")
def api_cmd(host: str | None = typer.Option(None), port: int | None = typer.Option(None),
            address: str | None = typer.Option(None, "--address"),
            refresh_s: float = typer.Option(30.0, "--refresh-s", help="how often to look for applications")) -> None:
    """Run the API and its runner attached to the Serve applications on a Ray cluster."""
    settings = get_settings()
    settings = settings.model_copy(update={"host": host or settings.host, "port": port or settings.port})
    run_attached(settings, address, refresh_s)
