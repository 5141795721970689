"""Capacity per GPU type, computed from the catalog's measured run times.

Method (the table in docs/operations.md is this module's output, and a test keeps them equal):

1. A model's replica holds ``resources.num_gpus`` GPUs; a GPU node type can host it when the card
   has at least ``resources.gpu_memory_gb`` of memory and the instance has the replica's CPUs and
   host memory (Ray's ``memory`` resource, taken as 70 % of the instance's RAM: Ray keeps about 30 %
   for its object store by default).
2. One replica finishes ``3600 / measured_run_s`` jobs an hour (``measured_run_s``: one job at the
   spec's defaults, batch size 1, as measured on the hardware the catalog entry names).
3. Jobs per hour per GPU = replicas per GPU (``floor(1 / num_gpus)``) × jobs per hour per replica.
   Jobs per hour at ``serving.max_replicas`` is what one model can reach once fully scaled out.

The run time is not rescaled between GPU types: an L40S or an A100 is faster than an A10G or L4,
so their figures are lower bounds until measured there (``bench/``, then update
``measured_run_s``). Batching is not counted either (replicas batch compatible requests, which
raises throughput on images); both make the table conservative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.catalog import Catalog
from models.spec import ModelSpec

RAY_MEMORY_FRACTION = 0.7


@dataclass(frozen=True)
class GpuNodeType:
    """A GPU node type of the cluster configs (one GPU per node)."""

    gpu: str
    gpu_memory_gb: float
    instance: str
    cpus: int
    ram_gb: float

    @property
    def ray_memory_gb(self) -> float:
        return self.ram_gb * RAY_MEMORY_FRACTION


# The node types in ray-cluster.yaml (AWS), ops/gcp/ray-cluster-gcp.yaml and ops/k8s/rayservice.yaml.
NODE_TYPES: tuple[GpuNodeType, ...] = (
    GpuNodeType("A10G", 24, "g5.4xlarge", 16, 64),
    GpuNodeType("L40S", 48, "g6e.4xlarge", 16, 128),
    GpuNodeType("L4", 24, "g2-standard-16", 16, 64),
    GpuNodeType("A100-80GB", 80, "a2-ultragpu-1g", 12, 170),
)


@dataclass(frozen=True)
class Fit:
    fits: bool
    reason: str = ""


def fit(spec: ModelSpec, node: GpuNodeType) -> Fit:
    res = spec.resources
    if res.num_gpus > 1:
        return Fit(False, f"needs {res.num_gpus:g} GPUs")
    if res.gpu_memory_gb is not None and res.gpu_memory_gb > node.gpu_memory_gb:
        return Fit(False, f"needs {res.gpu_memory_gb:g} GB GPU memory")
    if res.memory_gb is not None and res.memory_gb > node.ray_memory_gb:
        return Fit(False, f"needs {res.memory_gb:g} GB host memory")
    if res.num_cpus > node.cpus:
        return Fit(False, f"needs {res.num_cpus:g} CPUs")
    return Fit(True)


def replicas_per_gpu(spec: ModelSpec) -> int:
    gpus = spec.resources.num_gpus
    return 1 if gpus >= 1 else math.floor(1 / gpus)


def jobs_per_hour(spec: ModelSpec) -> float | None:
    """Jobs one replica finishes an hour, or None when the catalog has no measurement."""
    if not spec.measured_run_s:
        return None
    return 3600.0 / spec.measured_run_s


@dataclass(frozen=True)
class Row:
    model: str
    measured_run_s: float | None
    gpu_memory_gb: float | None
    per_replica: float | None
    per_gpu: dict[str, float | str]
    max_replicas: int


def rows(catalog: Catalog, nodes: tuple[GpuNodeType, ...] = NODE_TYPES) -> list[Row]:
    """One row per enabled local GPU model (tiny CPU models and remote-only models left out)."""
    out = []
    for spec in catalog.enabled():
        if spec.remote_only or spec.resources.num_gpus <= 0:
            continue
        per_replica = jobs_per_hour(spec)
        per_gpu: dict[str, float | str] = {}
        for node in nodes:
            verdict = fit(spec, node)
            if not verdict.fits:
                per_gpu[node.gpu] = f"does not fit ({verdict.reason})"
            elif per_replica is None:
                per_gpu[node.gpu] = "not measured"
            else:
                per_gpu[node.gpu] = replicas_per_gpu(spec) * per_replica
        out.append(Row(spec.id, spec.measured_run_s, spec.resources.gpu_memory_gb, per_replica, per_gpu,
                       spec.serving.max_replicas))
    return out


def _fmt(value: float | str | None) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, str):
        return value
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def markdown_table(catalog: Catalog, nodes: tuple[GpuNodeType, ...] = NODE_TYPES) -> str:
    header = ["model", "run s", "GPU GB", *[f"{n.gpu} ({n.gpu_memory_gb:g} GB) jobs/h" for n in nodes],
              "jobs/h at max_replicas"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows(catalog, nodes):
        scaled = None if row.per_replica is None else row.per_replica * row.max_replicas
        cells = [row.model, _fmt(row.measured_run_s), _fmt(row.gpu_memory_gb) if row.gpu_memory_gb else "?",
                 *[_fmt(row.per_gpu[n.gpu]) for n in nodes],
                 f"{_fmt(scaled)} ({row.max_replicas} replicas)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
