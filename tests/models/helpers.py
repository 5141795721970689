"""Helpers shared by the models tests (fixtures live in conftest.py)."""

from __future__ import annotations

from models.catalog import Catalog
from models.spec import ModelSpec

ALL_TINY = ["tiny-sd", "tiny-wan", "tiny-wan-i2v", "tiny-flux", "tiny-ltx"]


def tiny_spec(catalog: Catalog, model_id: str) -> ModelSpec:
    spec = catalog.get(model_id)
    assert spec is not None, model_id
    return spec


def make_spec(model_id: str, family: str, kind: str, tasks: list[str], **extra: object) -> ModelSpec:
    """A spec for a tiny checkpoint the catalog does not ship (tiny-flux, tiny-ltx)."""
    video = kind == "video"
    data: dict[str, object] = {
        "id": model_id, "kind": kind, "tasks": tasks, "family": family, "source": {"tiny": model_id},
        "dtype": "float32",
        "defaults": {"width": 64, "height": 64, "steps": 3, "guidance": 3.0,
                     **({"num_frames": 9, "fps": 8} if video else {})},
        "resources": {"num_gpus": 0, "num_cpus": 0.25}, "optimizations": {"xformers": False},
    }
    data.update(extra)
    return ModelSpec.model_validate(data)
