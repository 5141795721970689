"""``cineweave ops status`` and ``scale`` against the embedded stack, Serve autoscaling on the CPU,
and the rendered Serve config deployed for real.

One module-scoped stack (``ops.server.running_stack``) on the run's shared Ray session
(``tests/fixtures/ray.py``). Its model is ``ops-tiny-sd``, a copy of tiny-sd under another id (an
extra catalog dir), so these tests never touch the applications other modules share; at the end
they delete their own application and leave Serve to the session. Every wait is bounded.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

import ops.opscmd
from api.db.engine import Database
from api.db.tables import Job, utcnow
from api.services.users import NewUser
from api.settings import Settings
from models.catalog import BUILTIN_DIR
from ops.opscmd import collect_status, ops_app
from ops.serve_config import render, serve_details, update_deployment
from ops.server import free_port, running_stack
from ops.stack import EmbeddedStack
from tests.fixtures.harness import ADMIN_KEY, add_user, bearer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "ops-tiny-sd"
DEPLOYMENT = f"gen-{MODEL}"


@dataclass
class Ops:
    url: str
    stack: EmbeddedStack
    settings: Settings
    db: Database

    def cli(self, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
        monkeypatch.setattr(ops.opscmd, "get_settings", lambda: self.settings)
        return CliRunner().invoke(ops_app, list(args), env={"COLUMNS": "160"})

    def run_job(self, key: str, prompt: str, timeout_s: float = 120.0) -> dict[str, Any]:
        with httpx.Client(base_url=self.url, headers=bearer(key), timeout=30) as client:
            response = client.post("/v1/jobs", json={"model": MODEL, "input": {"prompt": prompt, "steps": 2}})
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            return wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json(),
                            lambda job: job["status"] in ("succeeded", "failed", "canceled"),
                            timeout_s, f"job {job_id} to finish")


def wait_for(get: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float, what: str,
             interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = get()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {value}")
        time.sleep(interval_s)


def deployment() -> dict[str, Any]:
    return serve_details()["applications"][MODEL]["deployments"][DEPLOYMENT]


def replica_ids(state: str = "RUNNING") -> list[str]:
    return sorted(r["replica_id"] for r in deployment()["replicas"] if r["state"] == state)


@pytest.fixture(scope="module")
def ops_catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ops-catalog")
    spec = yaml.safe_load((BUILTIN_DIR / "tiny-sd.yaml").read_text())
    # autoscaling from the start (1..2), so a declarative scale changes options only (see
    # ops/serve_config.py on fixed-size deployments); the slow default delays keep it at 1 here
    # not trainable: no trainer application of ours replaces the one the shared stack deploys
    spec.update(id=MODEL, name="Tiny SD (ops tests)", trainable=False)
    spec["serving"].update(min_replicas=1, max_replicas=2)
    (directory / f"{MODEL}.yaml").write_text(yaml.safe_dump(spec))
    return directory


@pytest.fixture(scope="module")
def ops_stack(ray_session: Any, ray_tiny_dir: Path, ops_catalog_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    from ray import serve

    data = tmp_path_factory.mktemp("ops-data")
    settings = Settings(data_dir=data / "var", tiny_models_dir=ray_tiny_dir, models_dir=ops_catalog_dir,
                        admin_key=ADMIN_KEY, signing_secret="ops-test-secret", host="127.0.0.1", port=free_port(),
                        runner_poll_s=0.05, retry_backoff_s=0.2, lease_s=15.0, max_active_jobs=64,
                        rate_limit_per_minute=100_000, overflow_enabled=False, _env_file=None)
    # no post-processing app: it would replace the shared ray_stack's (same app name, other storage)
    with running_stack(settings, models=[MODEL], startup_timeout_s=300, postprocess=False) as (url, stack):
        assert not stack._started_ray  # joined the session's Ray
        assert set(stack.handles) == {MODEL}

        def delete_own_app() -> None:  # not serve.shutdown(): other modules' apps live on this Serve
            serve.delete(MODEL)

        stack.stop = delete_own_app  # type: ignore[method-assign]
        db = Database(settings)
        try:
            yield Ops(url, stack, settings, db)
        finally:
            db.dispose()


@pytest.fixture(scope="module")
def user(ops_stack: Ops) -> NewUser:
    return add_user(ops_stack.db, ops_stack.settings, credits=500)


def test_status_reports_nodes_replicas_queue_and_jobs(ops_stack: Ops, user: NewUser,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for prompt in ("a lighthouse", "a harbour"):
        assert ops_stack.run_job(user.api_key, prompt)["status"] == "succeeded"
    with ops_stack.db.session() as session:
        session.add(Job(user_id=user.user.id, model="tiny-wan", kind="video", task="t2v", status="queued",
                        created_at=utcnow() - timedelta(seconds=90), next_attempt_at=utcnow() + timedelta(hours=1)))
        session.commit()

    result = ops_stack.cli(monkeypatch, "status", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    nodes = report["ray"]["nodes"]
    assert nodes and all(n["alive"] for n in nodes) and sum(n["cpus"] for n in nodes) >= 1
    assert report["ray"]["total"]["CPU"] >= 1
    app = report["serve"][MODEL]
    assert app["status"] == "RUNNING" and app["source"] == "imperative"
    dep = app["deployments"][DEPLOYMENT]
    assert (dep["running"], dep["target"], dep["min"], dep["max"]) == (1, 1, 1, 2)
    jobs = report["jobs"]
    assert jobs["by_status"] == {"succeeded": 2, "queued": 1}
    assert jobs["models"][MODEL] == {"queued": 0, "running": 0, "oldest_wait_s": None}
    assert jobs["models"]["tiny-wan"]["queued"] == 1 and jobs["models"]["tiny-wan"]["oldest_wait_s"] >= 90

    text = ops_stack.cli(monkeypatch, "status")
    assert text.exit_code == 0, text.output
    assert "Ray nodes" in text.output and MODEL in text.output and "succeeded 2" in text.output


def test_scale_changes_bounds_without_restarting_replicas(ops_stack: Ops, user: NewUser,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    before = replica_ids()
    assert len(before) == 1
    result = ops_stack.cli(monkeypatch, "scale", MODEL, "--min", "1", "--max", "3")
    assert result.exit_code == 0, result.output
    applied = json.loads(result.output)
    assert applied["source"] == "imperative"
    assert applied["autoscaling_config"]["min_replicas"] == 1 and applied["autoscaling_config"]["max_replicas"] == 3
    live = deployment()["deployment_config"]
    assert live["autoscaling_config"]["max_replicas"] == 3 and live["user_config"] == {"source": {"tiny": "tiny-sd"}}
    assert replica_ids() == before  # the same replica: options changed in place
    assert ops_stack.run_job(user.api_key, "after scaling")["status"] == "succeeded"

    bad = ops_stack.cli(monkeypatch, "scale", MODEL, "--min", "3", "--max", "2")
    assert bad.exit_code == 1 and "min <= max" in bad.output
    missing = ops_stack.cli(monkeypatch, "scale", "no-such-model", "--min", "1", "--max", "2")
    assert missing.exit_code == 1 and "no Serve application" in missing.output


def test_user_config_change_reconfigures_the_live_replica(ops_stack: Ops, ray_tiny_dir: Path) -> None:
    """The mechanism behind a checkpoint swap on a cluster: reconfigure, no new replica."""
    handle = ops_stack.stack.handles[MODEL]
    before = replica_ids()
    source = {"path": str(ray_tiny_dir / "tiny-sd")}
    update_deployment(MODEL, DEPLOYMENT, user_config={"source": source}, wait_s=120)
    stats = wait_for(lambda: handle.stats.remote().result(timeout_s=60), lambda s: s["swaps"] == 1, 120,
                     "the replica to load the new source")
    assert stats["source"] == source
    assert replica_ids() == before


def test_autoscaling_scales_up_under_load_and_back_down(ops_stack: Ops) -> None:
    spec = ops_stack.stack.catalog.get(MODEL)
    assert spec is not None
    fast = spec.model_copy(update={"serving": spec.serving.model_copy(update={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1.0,
        "upscale_delay_s": 1.0, "downscale_delay_s": 2.0})})
    ops_stack.stack.deploy([fast])
    handle = ops_stack.stack.handles[MODEL]
    assert len(replica_ids()) == 1

    stop = threading.Event()
    errors: list[BaseException] = []
    finished = [0]

    def load() -> None:
        deadline = time.monotonic() + 240
        while not stop.is_set() and time.monotonic() < deadline:
            job = uuid.uuid4().hex
            try:
                stream = handle.options(stream=True).generate.remote({
                    "job_id": job, "input": {"prompt": "load", "width": 64, "height": 64, "steps": 8, "seed": 1},
                    "output_prefix": f"outputs/load/{job}/"})
                for _event in stream:
                    pass
                finished[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    workers = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for worker in workers:
        worker.start()
    try:
        wait_for(replica_ids, lambda ids: len(ids) == 2, 150, "a second replica under load", interval_s=1)
        report = collect_status(ops_stack.settings)
        assert report["serve"][MODEL]["deployments"][DEPLOYMENT]["running"] == 2
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert not errors, errors
    assert finished[0] > 0
    wait_for(deployment, lambda d: d["target_num_replicas"] == 1 and
             sum(r["state"] == "RUNNING" for r in d["replicas"]) == 1, 150, "scale down to one replica", interval_s=1)


def deploy_rendered_config(settings: Settings) -> dict[str, Any]:
    """The no-secrets Serve config of MODEL, applied as `serve deploy` applies one (idempotent)."""
    from ray.serve.schema import ServeDeploySchema

    from ops.serve_config import serve_client

    config = render(settings, models=[MODEL], embedded=True, include_secrets=False, postprocess=False)
    (app,) = config["applications"]
    assert "storage_url" not in app["args"]["runtime"]
    # What a Kubernetes Secret gives every Ray pod; here, the application's runtime env.
    app["runtime_env"] = {"env_vars": {"CINEWEAVE_STORAGE_URL": settings.resolved_storage_url(),
                                       "CINEWEAVE_SIGNING_SECRET": str(settings.signing_secret)}}
    if serve_details()["applications"].get(MODEL, {}).get("source") != "declarative":
        serve_client().deploy_apps(ServeDeploySchema.model_validate(config))
    wait_for(lambda: serve_details()["applications"][MODEL],
             lambda a: a["source"] == "declarative" and a["status"] == "RUNNING", 180, "the config to deploy",
             interval_s=1)
    return app


def test_rendered_config_deploys_and_scales_declaratively(ops_stack: Ops) -> None:
    """The no-secrets Serve config, deployed as `serve deploy` would, serves a request; then scale."""
    from ray import serve

    from ops.serve_config import serve_client

    settings = ops_stack.settings
    app = deploy_rendered_config(settings)

    job = uuid.uuid4().hex
    events = list(serve.get_app_handle(MODEL).options(stream=True).generate.remote({
        "job_id": job, "input": {"prompt": "from the config", "width": 64, "height": 64, "steps": 2, "seed": 3},
        "output_prefix": f"outputs/config/{job}/"}))
    outputs = [e for e in events if e["type"] == "output"]
    assert outputs and events[-1]["type"] == "done", events
    assert (settings.data_dir / "storage" / outputs[0]["key"]).is_file()  # the storage URL came from the env

    before = replica_ids()
    applied = update_deployment(MODEL, DEPLOYMENT, min_replicas=1, max_replicas=3)
    assert applied["source"] == "declarative"
    assert replica_ids() == before
    import ray

    (deployed,) = ray.get(serve_client()._controller.get_app_configs.remote())[MODEL].deployments
    assert deployed.autoscaling_config["max_replicas"] == 3 and deployed.user_config == app["deployments"][0]["user_config"]


def test_attached_api_serves_jobs_and_swaps_checkpoints(ops_stack: Ops, ray_tiny_dir: Path) -> None:
    """`cineweave ops api`: an API that deploys nothing, attached to the config-deployed application."""
    import threading as _threading

    from ops.opscmd import AttachedStack, watch_replica_gpu_memory
    from ops.server import build_server

    deploy_rendered_config(ops_stack.settings)
    # its own database (so only its runner takes the job), the same storage as the replicas
    settings = ops_stack.settings.model_copy(update={
        "data_dir": ops_stack.settings.data_dir.parent / "attached", "port": free_port(),
        "storage_url": ops_stack.settings.resolved_storage_url()})
    stack = AttachedStack(settings, refresh_s=1.0)
    stack.start()
    server = build_server(settings, stack)
    sampler = watch_replica_gpu_memory(server.config.app, stack)
    thread = _threading.Thread(target=server.run, name="attached-api", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        wait_for(lambda: server.started, bool, 60, "the attached API to start", interval_s=0.1)
        assert MODEL in stack.handles and stack.sources[MODEL]
        assert stack.availability(stack.catalog.get(MODEL)) == (True, None)  # type: ignore[arg-type]
        available, reason = stack.availability(stack.catalog.get("sdxl"))  # type: ignore[arg-type]
        assert not available and reason
        db = Database(settings)
        try:
            db.migrate()
            user = add_user(db, settings, credits=50)
        finally:
            db.dispose()
        attached = Ops(url, stack, settings, Database(settings))
        try:
            assert attached.run_job(user.api_key, "through the attached API")["status"] == "succeeded"
        finally:
            attached.db.dispose()

        before = replica_ids()
        source = {"path": str(ray_tiny_dir / "tiny-sd")}
        with httpx.Client(base_url=url, timeout=600) as client:
            response = client.post(f"/v1/admin/models/{MODEL}/swap", json={"source": source},
                                   headers=bearer(ADMIN_KEY))
        assert response.status_code == 200, response.text
        assert deployment()["deployment_config"]["user_config"] == {"source": source}
        assert serve_details()["applications"][MODEL]["source"] == "declarative"
        stats = wait_for(lambda: stack.handles[MODEL].stats.remote().result(timeout_s=60),
                         lambda s: s["source"] == source, 120, "the replica to take the new source")
        assert stats["swaps"] >= 1 and replica_ids() == before
        assert sampler() == {}  # no CUDA here: the replicas report no GPU memory
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        stack.stop()
    assert not thread.is_alive()
    assert MODEL in serve_details()["applications"]  # stopping the API leaves the cluster's apps alone
