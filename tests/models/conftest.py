"""Fixtures for the models tests: tiny checkpoints built once per session, generators loaded once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.catalog import Catalog
from models.generator import Generator, limit_threads
from models.tiny import make_tiny
from tests.models.helpers import ALL_TINY, tiny_spec


@pytest.fixture(scope="package", autouse=True)
def _offline_and_one_thread() -> Iterator[None]:
    """While these tests run, nothing may reach a hub and torch runs one thread (undone after).

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


@pytest.fixture(scope="session")
def sd_gen(tiny_dir: Path, catalog: Catalog) -> Generator:
    return Generator.load(tiny_spec(catalog, "tiny-sd"), tiny_dir=tiny_dir)


@pytest.fixture(scope="session")
def wan_gen(tiny_dir: Path, catalog: Catalog) -> Generator:
    return Generator.load(tiny_spec(catalog, "tiny-wan"), tiny_dir=tiny_dir)


@pytest.fixture(scope="session")
def wan_i2v_gen(tiny_dir: Path, catalog: Catalog) -> Generator:
    return Generator.load(tiny_spec(catalog, "tiny-wan-i2v"), tiny_dir=tiny_dir)
