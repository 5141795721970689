"""The capacity table: its arithmetic, its fit rules, and that docs/operations.md shows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.catalog import Catalog
from models.spec import ModelSpec
from ops.capacity import NODE_TYPES, GpuNodeType, fit, jobs_per_hour, markdown_table, replicas_per_gpu, rows

ROOT = Path(__file__).resolve().parents[2]
A10G = GpuNodeType("A10G", 24, "g5.4xlarge", 16, 64)


def spec(**changes: object) -> ModelSpec:
    base = Catalog.load().get("sdxl")
    assert base is not None
    return base.model_copy(update=changes)


def test_jobs_per_hour_is_an_hour_over_the_measured_run_time() -> None:
    assert jobs_per_hour(spec(measured_run_s=6.0)) == 600
    assert jobs_per_hour(spec(measured_run_s=240.0)) == 15
    assert jobs_per_hour(spec(measured_run_s=None)) is None


def test_fit_checks_gpu_memory_host_memory_cpus_and_gpu_count() -> None:
    res = spec().resources
    assert fit(spec(), A10G).fits
    assert not fit(spec(resources=res.model_copy(update={"gpu_memory_gb": 40})), A10G).fits
    assert "host memory" in fit(spec(resources=res.model_copy(update={"memory_gb": 48})), A10G).reason
    assert "CPUs" in fit(spec(resources=res.model_copy(update={"num_cpus": 32})), A10G).reason
    assert "GPUs" in fit(spec(resources=res.model_copy(update={"num_gpus": 2})), A10G).reason
    half = spec(resources=res.model_copy(update={"num_gpus": 0.5}))
    assert replicas_per_gpu(half) == 2 and replicas_per_gpu(spec()) == 1


def test_rows_for_the_shipped_catalog() -> None:
    table = {r.model: r for r in rows(Catalog.load())}
    assert set(table) == {"sdxl", "flux-schnell", "ltx-video", "wan2.1-t2v-1.3b", "wan2.1-i2v-14b-480p"}
    assert table["sdxl"].per_gpu["A10G"] == pytest.approx(600)
    assert str(table["flux-schnell"].per_gpu["A10G"]).startswith("does not fit")
    assert table["flux-schnell"].per_gpu["L40S"] == pytest.approx(1800)
    assert all(str(v).startswith("does not fit") for k, v in table["wan2.1-i2v-14b-480p"].per_gpu.items()
               if k != "A100-80GB")
    assert table["wan2.1-i2v-14b-480p"].per_gpu["A100-80GB"] == pytest.approx(6)


def test_operations_doc_shows_the_computed_table() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert markdown_table(Catalog.load(), NODE_TYPES) in doc, \
        "docs/operations.md is out of date: paste `cineweave ops capacity` into its capacity section"
