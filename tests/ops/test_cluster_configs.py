"""ray-cluster.yaml and its GCP twin, checked with Ray's own cluster-config validation, and the
GPU image's Dockerfile."""

from __future__ import annotations

import copy
import re
import shlex
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from models.catalog import Catalog
from ops.capacity import NODE_TYPES, GpuNodeType, fit

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_FILES = [ROOT / "ray-cluster.yaml", ROOT / "ops" / "gcp" / "ray-cluster-gcp.yaml"]


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a config before it talks to the cloud: fill in the provider's
    defaults, merge the commands, check the Docker section, then validate against Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items() if t.get("resources", {}).get("GPU")}


def accelerator(node_type: dict[str, Any]) -> str:
    (name,) = [k.split(":", 1)[1] for k in node_type["resources"] if k.startswith("accelerator_type:")]
    return name


def serve_config_models(config: dict[str, Any]) -> list[str]:
    (command,) = [c for c in config["head_setup_commands"] if "ops serve-config" in c]
    words = shlex.split(command)
    return [words[i + 1] for i, w in enumerate(words) if w == "--model"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_config_passes_rays_validation(path: Path) -> None:
    prepared = ray_validate(load(path))
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["head"].update(resourcez={}),
    lambda c: c.update(idle_timeout_minutes="soon"),
    lambda c: c.update(max_workers=1),  # below the sum of min_workers once one type keeps two warm
    lambda c: c.update(head_node_type="nope"),
])
def test_rays_validation_catches_a_broken_copy(mutate: Any) -> None:
    from jsonschema import ValidationError

    config = load(ROOT / "ray-cluster.yaml")
    config["available_node_types"]["gpu_a10g"]["min_workers"] = 2
    ray_validate(config)
    mutate(config)
    with pytest.raises((ValidationError, ValueError)):
        ray_validate(config)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_gpu_worker_types_autoscale_and_advertise_their_gpu(path: Path) -> None:
    config = load(path)
    types = gpu_types(config)
    assert len(types) >= 2
    known = {n.gpu.replace("A100-80GB", "A100-80G") for n in NODE_TYPES}
    for name, node_type in types.items():
        assert node_type["min_workers"] == 0 < node_type["max_workers"], name
        assert node_type["resources"]["GPU"] == 1
        assert accelerator(node_type) in known, name
    assert sum(t["max_workers"] for t in types.values()) <= config["max_workers"]
    assert 1 <= config["idle_timeout_minutes"] <= 60


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_model_the_cluster_deploys_fits_one_of_its_gpu_types(path: Path) -> None:
    config, catalog = load(path), Catalog.load()
    by_accelerator = {n.gpu.replace("A100-80GB", "A100-80G"): n for n in NODE_TYPES}
    nodes: list[GpuNodeType] = [by_accelerator[accelerator(t)] for t in gpu_types(config).values()]
    models = serve_config_models(config)
    assert models
    for model in models:
        spec = catalog.get(model)
        assert spec is not None and not spec.remote_only and spec.enabled, model
        assert any(fit(spec, node).fits for node in nodes), f"{model} fits no GPU type of {path.name}"
    # instance types match the capacity table's (which the fits above used)
    instances = {t["node_config"].get("InstanceType") or t["node_config"].get("machineType")
                 for t in gpu_types(config).values()}
    assert instances == {n.instance for n in nodes}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_nodes_run_the_image_and_the_head_deploys_serve_and_starts_the_api(path: Path) -> None:
    config = load(path)
    docker = config["docker"]
    assert docker["image"].endswith("/cineweave-gpu:0.1.0")
    assert '--entrypoint=""' in docker["run_options"]  # the image's entry point is `cineweave`
    head = " && ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "serve deploy /data/serve.yaml" in head
    assert re.search(r"RAY_ADDRESS=auto .*cineweave ops api", head)
    assert "CINEWEAVE_PORT=8080" in head  # Serve's proxy holds 8000 on the head
    workers = " ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers
    assert "--out /data/serve.yaml" in " ".join(config["head_setup_commands"])
    assert config["setup_commands"] == []  # the image holds everything: no pip on the nodes
    assert config["file_mounts"] == {"~/cineweave.env": "./cineweave.env"}


def dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile.gpu").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_gpu_image_the_issue_asks_for() -> None:
    instructions = dockerfile()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in instructions if word == "ARG" and "=" in rest}
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-\S*runtime\S*", args["CUDA_IMAGE"])
    assert [rest for word, rest in instructions if word == "FROM"] == ["${CUDA_IMAGE}"]
    assert args["PYTHON"] == "python3.11"
    assert args["TORCH_CUDA"].startswith("cu12")
    assert args["RAY_VERSION"] == __import__("ray").__version__  # the cluster and this venv agree
    assert args["TORCH_VERSION"] == version("torch").split("+")[0]  # the torch the tests run on
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in runs
    assert '".[gpu]"' in runs and "--constraint /opt/constraints.txt" in runs
    user = [rest for word, rest in instructions if word == "USER"]
    assert user == ["cineweave"]
    assert any(word == "HEALTHCHECK" and "/healthz" in rest for word, rest in instructions)
    assert ("ENTRYPOINT", '["cineweave"]') in instructions
    # everything the package needs is copied in (its packages, and the metadata pip reads)
    copied = {rest.split()[0] for word, rest in instructions if word == "COPY"}
    packages = {"api", "serve", "models", "training", "ops"}
    assert packages | {"pyproject.toml"} <= copied
    assert all((ROOT / p).is_dir() for p in packages)
