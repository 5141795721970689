"""Fixtures for the models tests: tiny checkpoints built once per session, generators loaded once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.catalog import Catalog
from models.generator import Generator, limit_threads
from models.spec import ModelSpec
from models.tiny import make_tiny

ALL_TINY = ["tiny-sd", "tiny-wan", "tiny-wan-i2v", "tiny-flux", "tiny-ltx"]


@pytest.fixture(scope="session", autouse=True)
def _offline_and_two_threads() -> Iterator[None]:
    """Nothing here may reach a hub, and torch runs one thread.

    One thread, not the machine's two: when other processes share the two cores (parallel test
    runs, a local Ray), OpenMP's spinning threads make a 2-thread tiny pipeline 5-10x slower, while
    one thread stays within a few percent of the unloaded 2-thread speed.
    """
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    previous = limit_threads(1)
    yield
    limit_threads(previous)
    mp.undo()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-models")
    make_tiny(out, ALL_TINY)
    return out


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.load()


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


@pytest.fixture(scope="session")
def sd_gen(tiny_dir: Path, catalog: Catalog) -> Generator:
    return Generator.load(tiny_spec(catalog, "tiny-sd"), tiny_dir=tiny_dir)


@pytest.fixture(scope="session")
def wan_gen(tiny_dir: Path, catalog: Catalog) -> Generator:
    return Generator.load(tiny_spec(catalog, "tiny-wan"), tiny_dir=tiny_dir)


@pytest.fixture(scope="session")
def wan_i2v_gen(tiny_dir: Path, catalog: Catalog) -> Generator:
    return Generator.load(tiny_spec(catalog, "tiny-wan-i2v"), tiny_dir=tiny_dir)
