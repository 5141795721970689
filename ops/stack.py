"""The embedded stack: local Ray, tiny checkpoints, one Serve app per local model, the API beside it.

Why the API runs beside Ray (a plain uvicorn process holding deployment handles) rather than as a
Serve ingress deployment: the API and its runner own the database, the ledger and long-lived SSE
connections; they must keep answering (status, credits, queueing) while GPU replicas restart or
scale, and they scale on CPUs independently of GPU nodes. Tests of the credit/job layer then need
no Ray at all. The cost is one extra hop from the API process to the replicas through handles,
measured in ``bench/serving.py``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from api.core.executor import Executor
from api.settings import Settings
from models.catalog import Catalog
from models.spec import ModelSpec, Source

logger = logging.getLogger(__name__)


def tiny_models_dir(settings: Settings) -> Path:
    return Path(settings.tiny_models_dir or settings.data_dir / "tiny-models").resolve()


class EmbeddedStack:
    """Starts (or joins) Ray, deploys the catalog's local models, and builds the executor."""

    def __init__(self, settings: Settings, catalog: Catalog | None = None, *,
                 models: Iterable[str] | None = None, embedded: bool = True, postprocess: bool = True) -> None:
        self.settings = settings
        self.catalog = catalog or Catalog.load(settings.models_dir)
        self.only = set(models) if models is not None else None
        self.embedded = embedded
        self.postprocess = postprocess
        """Deploy the post-processing app (``serve.postprocess``) beside the generators."""
        self.handles: dict[str, Any] = {}
        self.specs: dict[str, ModelSpec] = {}
        self.sources: dict[str, dict[str, Any]] = {}
        self._started_ray = False
        self._lock = threading.Lock()

    # lifecycle ---------------------------------------------------------------------------
    def runtime(self) -> Any:
        from serve.generator import RuntimeConfig

        settings = self.settings
        return RuntimeConfig(
            storage_url=settings.resolved_storage_url(), signing_secret=settings.resolved_signing_secret(),
            public_base_url=settings.public_url or f"http://{settings.host}:{settings.port}",
            tiny_dir=str(tiny_models_dir(settings)), cache_dir=str((settings.data_dir / "cache").resolve()),
            threads=1 if self.embedded else None, test_hooks_dir=settings.test_hooks_dir,
            lora_cache_entries=settings.lora_cache_entries)

    def start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        address = os.environ.get("RAY_ADDRESS") or self.settings.ray_address
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
            self._started_ray = True

    def deployable(self) -> list[ModelSpec]:
        from models.loading import availability

        out = []
        for spec in self.catalog.enabled():
            if spec.remote_only or (self.only is not None and spec.id not in self.only):
                continue
            ok, reason = availability(spec, tiny_models_dir(self.settings), None)
            if ok:
                out.append(spec)
            else:
                logger.info("not deploying %s: %s", spec.id, reason)
        return out

    def build_tiny(self) -> None:
        from models.tiny import make_tiny

        make_tiny(tiny_models_dir(self.settings))

    def deploy(self, specs: Iterable[ModelSpec] | None = None) -> dict[str, Any]:
        """Deploy the models together (replicas start in parallel) and wait until all run."""
        from ray import serve
        from ray.serve import RunTarget

        from serve.app import app_name, build_generator_app
        from serve.executor import POSTPROCESS_KEY

        specs = list(specs if specs is not None else self.deployable())
        if not specs:
            return self.handles
        runtime = self.runtime()
        started = time.perf_counter()
        # The API reaches replicas through handles and the apps have no route prefix, so Serve's
        # HTTP proxy would serve nothing; left on, it takes 127.0.0.1:8000, the API's own default
        # port, and `cineweave up` fails to bind. (No effect when Serve already runs: then its
        # existing options stay.)
        serve.start(proxy_location="Disabled")
        targets = [RunTarget(build_generator_app(spec, runtime, embedded=self.embedded), name=app_name(spec.id),
                             route_prefix=None) for spec in specs]
        # The CPU post-processing app (pipelines' op steps) beside the generators, once.
        postprocess = self.postprocess and POSTPROCESS_KEY not in self.handles
        if postprocess:
            from serve.app import build_postprocess_app
            from serve.postprocess import APP_NAME as POSTPROCESS_APP

            targets.append(RunTarget(build_postprocess_app(runtime, embedded=self.embedded), name=POSTPROCESS_APP,
                                     route_prefix=None))
        trainable = [s for s in specs if s.trainable]
        if trainable:
            from serve.trainer import APP_NAME, build_trainer_app

            targets.append(RunTarget(build_trainer_app(
                runtime, max(s.resources.num_gpus for s in trainable), max(s.resources.num_cpus for s in trainable),
                self.embedded, specs=trainable), name=APP_NAME, route_prefix=None))
        handles = serve.run_many(targets)
        if postprocess:
            with self._lock:
                self.handles[POSTPROCESS_KEY] = handles[len(specs)]
            handles = handles[:len(specs)] + handles[len(specs) + 1:]
        if trainable:
            from serve.executor import TRAINER_KEY

            with self._lock:
                self.handles[TRAINER_KEY] = handles[-1]
            handles = handles[:-1]
        with self._lock:
            for spec, handle in zip(specs, handles, strict=True):
                self.handles[spec.id] = handle
                self.specs[spec.id] = spec
                self.sources[spec.id] = spec.source.model_dump(exclude_none=True) if spec.source else {}
        logger.info("deployed %s in %.1fs", ", ".join(s.id for s in specs), time.perf_counter() - started)
        return self.handles

    def start(self, build_tiny: bool = True) -> None:
        self.start_ray()
        if build_tiny:
            self.build_tiny()
        self.deploy()

    def stop(self, drain_s: float | None = None) -> None:
        """Stop what this stack started, without cancelling replica work.

        A joined Ray is left running. A Ray this stack started (``cineweave up``) goes down with
        it, but only after its replicas finished the generations they hold (bounded by
        ``drain_s``, default the ``replica_drain_s`` setting): the API stopped first and only let
        go of its streams, the replicas store each result beside its outputs, and the next ``up``
        collects them when it reclaims the jobs instead of running them again.
        """
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        if not self._started_ray:
            # Joined a Ray someone else runs (a cluster, a RayService, a test session): its Serve
            # and the apps on it may serve other API instances, so leave them running.
            logger.info("leaving Serve running on the Ray this stack joined")
            return
        self.drain(self.settings.replica_drain_s if drain_s is None else drain_s)
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - shutting down anyway
            logger.exception("serve shutdown failed")
        ray.shutdown()

    def active_runs(self) -> dict[str, int]:
        """Queued and running generations per model, as the replicas report them."""
        from serve.executor import TRAINER_KEY

        with self._lock:
            handles = {m: h for m, h in self.handles.items() if m != TRAINER_KEY}
        active: dict[str, int] = {}
        for model, handle in handles.items():
            try:
                jobs = handle.stats.remote().result(timeout_s=30).get("jobs", {})
            except Exception as exc:  # noqa: BLE001 - a replica that cannot answer holds nothing we can wait for
                logger.warning("%s: no stats (%s)", model, exc)
                continue
            count = sum(1 for j in jobs.values() if j.get("state") in ("queued", "running"))
            if count:
                active[model] = count
        return active

    def drain(self, timeout_s: float, poll_s: float = 0.5) -> bool:
        """Wait (bounded) until no replica has a queued or running generation; True if none left."""
        deadline = time.monotonic() + timeout_s
        while active := self.active_runs():
            if time.monotonic() >= deadline:
                logger.warning("stopping with generations still running: %s", active)
                return False
            logger.info("waiting for the replicas to finish: %s", active)
            time.sleep(poll_s)
        return True

    # the executor the API uses ------------------------------------------------------------
    def executor(self) -> Executor:
        from serve.executor import RayExecutor
        from serve.router import build_overflow_router

        local = RayExecutor(lambda model: self.handles.get(model))
        return build_overflow_router(local, self.catalog, self.settings)

    def availability(self, spec: ModelSpec) -> tuple[bool, str | None]:
        if spec.remote_only:
            return True, None
        if spec.id in self.handles:
            return True, None
        return False, "not deployed on this cluster (weights missing or model disabled)"

    # checkpoint swap -----------------------------------------------------------------------
    def swap(self, model_id: str, source: dict[str, Any]) -> dict[str, Any]:
        """Point a running model at another checkpoint, without downtime.

        Only ``user_config`` changes, so Serve calls ``reconfigure`` on the live replicas (which
        load the new pipeline beside the old one) instead of restarting them.
        """
        from ray import serve

        from api.core.errors import InvalidInput
        from models.sources import availability
        from serve.app import app_name, build_generator_app

        spec = self.specs.get(model_id)
        if spec is None:
            raise KeyError(model_id)
        parsed = Source.model_validate(source)  # a clear error before anything changes
        if parsed.path or parsed.tiny:  # local weights: check them here first (S3/HF: the replica fetches)
            ok, reason = availability(spec.model_copy(update={"source": parsed}), tiny_models_dir(self.settings), None)
            if not ok:
                raise InvalidInput(f"source: {reason}", {"field": "source"})
        previous = self.sources.get(model_id) or {}

        def apply(user_source: dict[str, Any]) -> Any:
            # The same spec and runtime as at deploy time (so the same deployment version): only
            # user_config differs, and Serve reconfigures the live replicas in place.
            app = build_generator_app(spec, self.runtime(), embedded=self.embedded,
                                      user_config={"source": user_source})
            return serve.run(app, name=app_name(model_id), route_prefix=None)

        handle = apply(source)
        stats = handle.stats.remote().result(timeout_s=60)
        if stats.get("source") != source:
            # The replica could not load it and kept the old pipeline: put the old source back
            # into user_config too, so that replicas started later load what is being served.
            apply(previous)
            error = (stats.get("swap_error") or {}).get("error", "unknown error")
            raise InvalidInput(f"source: the replicas could not load it ({error}); still serving {previous}",
                               {"field": "source"})
        with self._lock:
            self.handles[model_id] = handle
            self.sources[model_id] = source
        return {"model": model_id, "source": source}
