"""Build Serve applications from the catalog: one generator deployment per local model.

``build_generator_app`` is used by ``cineweave up`` and the tests; ``build`` is the import path
a Serve config file names (``serve.app:build``) on a cluster, with the same arguments.
``build_postprocess_app`` / ``build_postprocess`` (``serve.app:build_postprocess``) do the same for
the CPU post-processing deployment (``serve.postprocess``), sized by
``models/catalog/postprocess/operations.yaml``'s ``serving`` and ``resources``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from ray import serve
from ray.serve import Application

from models.spec import ModelSpec
from serve.generator import GeneratorServer, RuntimeConfig
from serve.postprocess import DEPLOYMENT_NAME as POSTPROCESS_DEPLOYMENT_NAME
from serve.postprocess import PostprocessServer

logger = logging.getLogger(__name__)


SHUTDOWN_MARGIN_S = 5.0
"""Serve's graceful_shutdown_timeout_s is the spec's ``serving.shutdown_drain_s`` plus this."""


class GeneratorDeployment(GeneratorServer):
    """The deployed class: on shutdown (scale-down, redeploy) it first finishes the runs it owns.

    Serve waits for *ongoing requests* before stopping a replica, but a run whose caller went away
    (an API restart) is no request any more; Serve awaits ``__del__`` before the replica exits, so
    the drain goes there. (Not on :class:`GeneratorServer`: a plain instance would leave an
    unawaited coroutine at garbage collection.)
    """

    async def __del__(self) -> None:  # type: ignore[misc]
        if not await self.drain(self.spec.serving.shutdown_drain_s):
            logger.warning("%s: stopping with runs unfinished", self.spec.id)


def deployment_name(model_id: str) -> str:
    return f"gen-{model_id}"


def app_name(model_id: str) -> str:
    return model_id


def deployment_options(spec: ModelSpec, *, embedded: bool = False) -> dict[str, Any]:
    """Serve options from the spec's resources and serving sections.

    ``embedded`` (one machine, no GPU): zero GPUs and the spec's fractional CPUs, so several
    replicas fit on two cores.
    """
    res, srv = spec.resources, spec.serving
    actor: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": 0 if embedded else res.num_gpus}
    if res.accelerator_type and not embedded:
        actor["accelerator_type"] = res.accelerator_type
    if res.memory_gb and not embedded:
        actor["memory"] = int(res.memory_gb * 1024**3)
    options: dict[str, Any] = {
        "name": deployment_name(spec.id),
        "ray_actor_options": actor,
        "max_ongoing_requests": srv.max_ongoing_requests,
        "max_queued_requests": srv.max_queued_requests,
        "user_config": {"source": spec.source.model_dump(exclude_none=True) if spec.source else {}},
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": int(srv.shutdown_drain_s + SHUTDOWN_MARGIN_S),
    }
    if srv.max_replicas > srv.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": srv.min_replicas, "max_replicas": srv.max_replicas,
            "initial_replicas": srv.initial_replicas if srv.initial_replicas is not None else max(1, srv.min_replicas),
            "target_ongoing_requests": srv.target_ongoing_requests,
            "upscale_delay_s": srv.upscale_delay_s, "downscale_delay_s": srv.downscale_delay_s,
        }
    else:
        options["num_replicas"] = srv.min_replicas
    return options


def code_version(spec: ModelSpec, runtime: RuntimeConfig) -> str:
    """A deployment version that changes with the replica's constructor arguments, not its source.

    Serve versions each ``serve.run`` randomly unless told otherwise, so redeploying the same app
    with only ``user_config`` changed would restart every replica (a swap with downtime, loading
    the checkpoint twice). With a version fixed by the spec and runtime, Serve calls
    ``reconfigure`` on the live replicas instead.
    """
    payload = json.dumps({"spec": spec.model_dump(mode="json"), "runtime": runtime.__dict__,
                          "server": f"{GeneratorDeployment.__module__}.{GeneratorDeployment.__qualname__}"},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_generator_app(spec: ModelSpec, runtime: RuntimeConfig, *, embedded: bool = False,
                        user_config: dict[str, Any] | None = None) -> Application:
    """The generator app; ``user_config`` (e.g. ``{"source": ...}``) overrides the spec's for a swap."""
    options = deployment_options(spec, embedded=embedded)
    if user_config is not None:
        options["user_config"] = user_config
    deployment = serve.deployment(GeneratorDeployment).options(**options)
    try:  # private in Ray 2.x: the only way to keep the version across serve.run calls
        deployment = deployment.options(version=code_version(spec, runtime), _internal=True)
    except (TypeError, ValueError):  # pragma: no cover - a Ray without it: swaps restart replicas
        logger.warning("this Ray cannot pin deployment versions; a swap will restart replicas")
    return deployment.bind(spec.model_dump(mode="json"), runtime.__dict__)


def build(args: dict[str, Any]) -> Application:
    """Serve config entry point: ``args`` = {"model": id, "runtime": {...}, "models_dir": optional}."""
    from pathlib import Path

    from models.catalog import Catalog

    catalog = Catalog.load(Path(args["models_dir"]) if args.get("models_dir") else None)
    spec = catalog.get(args["model"])
    if spec is None:
        raise ValueError(f"unknown model {args['model']!r}")
    return build_generator_app(spec, RuntimeConfig(**args["runtime"]), embedded=bool(args.get("embedded")))


# post-processing ---------------------------------------------------------------------------------

EMBEDDED_POSTPROCESS_CPUS = 0.25
"""CPUs the embedded (one machine) post-processing replica reserves: a fraction, beside the tiny models."""
POSTPROCESS_ADMIT_FACTOR = 4
"""Serve admits this many times the replica's concurrent operations (queued runs and attaches)."""
POSTPROCESS_SHUTDOWN_S = 60.0
"""How long a stopping post-processing replica finishes the operations it owns."""


class PostprocessDeployment(PostprocessServer):
    """The deployed class: on shutdown it first finishes the runs it owns (see GeneratorDeployment)."""

    async def __del__(self) -> None:  # type: ignore[misc]
        if not await self.drain(POSTPROCESS_SHUTDOWN_S):
            logger.warning("postprocess: stopping with runs unfinished")


def postprocess_deployment_options(operations: Any | None = None, *, embedded: bool = False) -> dict[str, Any]:
    """Serve options from operations.yaml's ``serving`` and ``resources``: CPUs only, never a GPU.

    ``embedded``: a fraction of a CPU (at most :data:`EMBEDDED_POSTPROCESS_CPUS`), one replica.
    """
    from models.postprocess import load_operation_catalog

    catalog = operations if operations is not None else load_operation_catalog()
    res, srv = catalog.resources, catalog.serving
    actor: dict[str, Any] = {"num_cpus": min(res.num_cpus, EMBEDDED_POSTPROCESS_CPUS) if embedded else res.num_cpus,
                             "num_gpus": 0}
    if res.memory_gb and not embedded:
        actor["memory"] = int(res.memory_gb * 1024**3)
    options: dict[str, Any] = {
        "name": POSTPROCESS_DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        # the replica runs serving.max_ongoing_requests operations at once and queues the rest
        # itself; Serve lets more through so a reclaimed attempt can attach to its run meanwhile
        "max_ongoing_requests": srv.max_ongoing_requests * POSTPROCESS_ADMIT_FACTOR,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": int(POSTPROCESS_SHUTDOWN_S + SHUTDOWN_MARGIN_S),
    }
    if srv.max_replicas > srv.min_replicas and not embedded:
        options["autoscaling_config"] = {
            "min_replicas": srv.min_replicas, "max_replicas": srv.max_replicas,
            "initial_replicas": max(1, srv.min_replicas), "target_ongoing_requests": srv.max_ongoing_requests,
        }
    else:
        options["num_replicas"] = max(1, srv.min_replicas) if embedded else srv.min_replicas
    return options


def build_postprocess_app(runtime: RuntimeConfig, *, embedded: bool = False,
                          operations: Any | None = None) -> Application:
    """The post-processing app; each replica runs ``serving.max_ongoing_requests`` operations at once."""
    from models.postprocess import load_operation_catalog

    catalog = operations if operations is not None else load_operation_catalog()
    options = postprocess_deployment_options(catalog, embedded=embedded)
    deployment = serve.deployment(PostprocessDeployment).options(**options)
    return deployment.bind(dict(runtime.__dict__), catalog.serving.max_ongoing_requests)


def build_postprocess(args: dict[str, Any]) -> Application:
    """Serve config entry point (``serve.app:build_postprocess``): ``args`` = {"runtime": {...},
    "embedded": bool, "operations": optional path of an operations.yaml}."""
    from pathlib import Path

    from models.postprocess import load_operation_catalog

    catalog = load_operation_catalog(Path(args["operations"]) if args.get("operations") else None)
    return build_postprocess_app(RuntimeConfig(**args["runtime"]), embedded=bool(args.get("embedded")),
                                 operations=catalog)

