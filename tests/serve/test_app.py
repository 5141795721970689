"""Serve options built from a spec: a replica being stopped drains the runs it owns for as long
as the spec says (a video model's runs take minutes), and Serve waits a little longer."""

from __future__ import annotations

from typing import Any

from models.catalog import Catalog
from serve.app import SHUTDOWN_MARGIN_S, GeneratorDeployment, deployment_options


def test_graceful_shutdown_follows_the_specs_drain(catalog: Catalog) -> None:
    for model, drain in (("tiny-sd", 25.0), ("wan2.1-t2v-1.3b", 600.0)):
        spec = catalog.get(model)
        assert spec is not None and spec.serving.shutdown_drain_s == drain
        options = deployment_options(spec)
        assert options["graceful_shutdown_timeout_s"] == int(drain + SHUTDOWN_MARGIN_S)


async def test_a_stopping_replica_drains_for_the_specs_time(catalog: Catalog) -> None:
    spec = catalog.get("wan2.1-t2v-1.3b")
    assert spec is not None
    asked: list[float] = []

    async def drain(timeout_s: float) -> bool:
        asked.append(timeout_s)
        return True

    replica: Any = object.__new__(GeneratorDeployment)  # no pipeline: only the shutdown hook runs
    replica.spec = spec
    replica.drain = drain
    await replica.__del__()
    assert asked == [600.0]
