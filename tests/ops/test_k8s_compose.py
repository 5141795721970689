"""The Kubernetes manifests and the one-box compose file, checked by parsing: images, ports,
resources, secrets, and the Serve config the RayService carries."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.catalog import Catalog
from ops.k8s import render as k8s_render
from ops.serve_config import ENV_IMPORT_PATH, ENV_TRAINER_IMPORT_PATH, validate

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "ops" / "k8s"
IMAGE = "registry.example.com/cineweave/cineweave-gpu:0.1.0"


def k8s_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        return [cluster["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    return []


def test_every_manifest_file_is_in_the_kustomization_and_in_the_namespace() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "rayservice.template.yaml"}
    assert listed == on_disk
    for doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "cineweave", doc["metadata"]["name"]


def test_rayservice_carries_a_fresh_render_of_the_serve_config() -> None:
    rayservice = one(k8s_docs(), "RayService", "cineweave")
    carried = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert carried == k8s_render.serve_config(Catalog.load())
    validate(carried)
    assert (K8S / "rayservice.yaml").read_text() == k8s_render.manifest()  # `python -m ops.k8s.render` ran
    assert {a["name"] for a in carried["applications"]} == set(k8s_render.MODELS) | {"trainer", "postprocess"}
    for app in carried["applications"]:
        if app["name"] == "postprocess":  # CPU only (pipelines' ffmpeg steps)
            assert app["import_path"] == "ops.serve_config:build_postprocess"
            assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 0
            continue
        assert app["import_path"] == (ENV_IMPORT_PATH if app["name"] != "trainer" else ENV_TRAINER_IMPORT_PATH)
        assert "storage_url" not in app["args"]["runtime"] and "signing_secret" not in app["args"]["runtime"]
        assert app["args"]["runtime"]["cache_dir"] == "/data/cache"
        assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 1


def test_render_check_fails_on_a_stale_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "rayservice.yaml"
    stale.write_text((K8S / "rayservice.yaml").read_text().replace("max_replicas: 4", "max_replicas: 5", 1))
    monkeypatch.setattr(k8s_render, "OUTPUT", stale)
    assert k8s_render.main(["--check"]) == 1
    assert k8s_render.main([]) == 0 and k8s_render.main(["--check"]) == 0


def test_rayservice_autoscales_gpu_worker_groups() -> None:
    cluster = one(k8s_docs(), "RayService", "cineweave")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == __import__("ray").__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu-a10g", "gpu-l40s"}
    for name, group in groups.items():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == 1 == requests["nvidia.com/gpu"], name
        accel = name.split("-")[1].upper()
        assert yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"])) == {f"accelerator_type:{accel}": 1}
        assert group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == f"NVIDIA-{accel}"


def test_images_resources_and_secrets_of_every_pod() -> None:
    docs = k8s_docs()
    secret = one(docs, "Secret", "cineweave-secrets")
    keys = set(secret["stringData"])
    for doc in docs:
        for spec in pod_specs(doc):
            for container in spec["containers"]:
                image = container["image"]
                assert ":" in image and not image.endswith(":latest"), image
                if doc["kind"] == "RayService" or doc["metadata"]["name"] == "cineweave-api":
                    assert image == IMAGE
                    assert {"secretRef": {"name": "cineweave-secrets"}} in container["envFrom"]
                res = container["resources"]
                assert res["requests"] and res["limits"], (doc["metadata"]["name"], container["name"])
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == "cineweave-secrets" and ref["key"] in keys
    assert {"CINEWEAVE_DATABASE_URL", "CINEWEAVE_STORAGE_URL", "CINEWEAVE_ADMIN_KEY",
            "CINEWEAVE_SIGNING_SECRET"} <= keys
    # the URLs point at the in-cluster services with the credentials the services get
    data = secret["stringData"]
    assert f"cineweave:{data['POSTGRES_PASSWORD']}@cineweave-postgres.cineweave.svc:5432/{data['POSTGRES_DB']}" in \
        data["CINEWEAVE_DATABASE_URL"]
    assert f"s3://{data['MINIO_ROOT_USER']}:{data['MINIO_ROOT_PASSWORD']}@cineweave-minio.cineweave.svc:9000/" in \
        data["CINEWEAVE_STORAGE_URL"]


def test_services_reach_their_pods_on_declared_ports() -> None:
    docs = k8s_docs()
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        (target,) = [w for w in workloads
                     if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert target["spec"]["selector"]["matchLabels"].items() <= \
            target["spec"]["template"]["metadata"]["labels"].items()
        named = {p["name"]: p["containerPort"] for c in pod_specs(target)[0]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, (service["metadata"]["name"], port)
    ports = {d["metadata"]["name"]: {p["name"]: p["port"] for p in d["spec"]["ports"]}
             for d in docs if d["kind"] == "Service"}
    assert ports == {"cineweave-postgres": {"postgres": 5432}, "cineweave-minio": {"s3": 9000, "console": 9001},
                     "cineweave-api": {"http": 80}}
    for name in ("cineweave-postgres", "cineweave-minio"):
        sts = one(docs, "StatefulSet", name)
        assert sts["spec"]["serviceName"] == name and sts["spec"]["volumeClaimTemplates"]


def test_api_pods_join_the_ray_cluster_and_serve_on_8080() -> None:
    docs = k8s_docs()
    api = one(docs, "Deployment", "cineweave-api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    script = container["args"][0]
    assert "ray start --address=\"${RAY_HEAD_ADDRESS}\" --num-cpus=0 --num-gpus=0" in script
    assert "exec cineweave ops api --address auto" in script
    env = {e["name"]: e.get("value") for e in container["env"]}
    # KubeRay names the RayService's head service <name>-head-svc
    assert env["RAY_HEAD_ADDRESS"] == "cineweave-head-svc.cineweave.svc:6379"
    assert env["CINEWEAVE_PORT"] == "8080"
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8080" and annotations["prometheus.io/path"] == "/metrics"
    assert api["spec"]["replicas"] >= 2


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_manifests() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout) if d)
    assert kinds == sorted(d["kind"] for d in k8s_docs())


# --- docker-compose -----------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "ops" / "docker-compose.yml").read_text())


def test_compose_runs_postgres_minio_and_cineweave_on_a_gpu() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "minio", "cineweave"}
    for name in ("postgres", "minio"):
        assert ":" in services[name]["image"] and "latest" not in services[name]["image"]
        assert services[name]["healthcheck"]["test"]
    app = services["cineweave"]
    assert app["build"] == {"context": "..", "dockerfile": "Dockerfile.gpu"}
    assert (ROOT / "ops" / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile.gpu"
    assert app["init"] is True
    (device,) = app["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert app["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                 "minio": {"condition": "service_healthy"}}
    assert "8080:8080" in app["ports"] and "9000:9000" in services["minio"]["ports"]
    env = app["environment"]
    assert env["CINEWEAVE_DATABASE_URL"].startswith("postgresql://cineweave:") and "@postgres:5432/" in \
        env["CINEWEAVE_DATABASE_URL"]
    assert "@minio:9000/cineweave?secure=false" in env["CINEWEAVE_STORAGE_URL"]
    assert env["CINEWEAVE_PORT"] == "8080"
    assert "cineweave-data:/data" in app["volumes"]


def test_compose_command_deploys_the_rendered_config_then_runs_the_api() -> None:
    app = compose()["services"]["cineweave"]
    assert app["entrypoint"] == ["/bin/bash", "-c"]
    script = app["command"][0].replace("$$", "$")
    steps = [s.strip() for s in script.split(";") if s.strip()]
    order = [next(i for i, s in enumerate(steps) if s.startswith(p)) for p in
             ("ray start --head", "cineweave ops serve-config --out /data/serve.yaml",
              "serve deploy /data/serve.yaml", "exec cineweave ops api --address auto")]
    assert order == sorted(order)
    assert app["environment"]["CINEWEAVE_SERVE_OPTIONS"] == "${CINEWEAVE_SERVE_OPTIONS:---no-trainer}"
    assert '"${models[@]}" ${CINEWEAVE_SERVE_OPTIONS}' in script  # one GPU: no trainer by default
    default = app["environment"]["CINEWEAVE_SERVE_MODELS"].split(":-", 1)[1].rstrip("}")
    catalog = Catalog.load()
    for model in shlex.split(default):
        spec = catalog.get(model)
        assert spec is not None and not spec.remote_only and spec.resources.num_gpus == 1
