"""The Serve config rendered from the catalog, and option changes on a running Serve instance.

Rendering: one application per local model (``import_path: serve.app:build``, the args ``build``
takes, and one deployment whose options come from :func:`serve.app.deployment_options`), plus the
LoRA trainer application when a served model is trainable, plus the CPU post-processing
application (``serve.app:build_postprocess``, pipelines' op steps, sized by
``models/catalog/postprocess/operations.yaml``), checked against
``ray.serve.schema.ServeDeploySchema`` before it is returned. ``serve deploy`` takes the YAML;
KubeRay carries the same document as a ``RayService``'s ``serveConfigV2``.

Changing a running deployment (:func:`update_deployment`, used by ``cineweave ops scale`` and by
the attached API's checkpoint swap) keeps everything but the changed options identical, so Serve
updates the live replicas instead of replacing them:

- an application deployed from a config (``serve deploy``, KubeRay) is re-applied with the same
  import path and args (the same code version) and only the deployment's options changed. One
  exception: Ray 2.60 counts the deployments' autoscaling policies in the code version, so turning
  a fixed-size deployment (``num_replicas``) into an autoscaling one rebuilds the application
  once (its replicas are replaced); between autoscaling bounds, nothing restarts;
- an application deployed from Python (``serve.run``, the embedded stack) is redeployed with the
  deployment's current class, init args, actor options and *version* (``serve.run`` draws a
  random version unless one is pinned, and a new version restarts every replica: Ray 2.60).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from api.settings import Settings
from models.catalog import Catalog
from models.spec import ModelSpec
from ops.stack import tiny_models_dir

logger = logging.getLogger(__name__)

IMPORT_PATH = "serve.app:build"
TRAINER_IMPORT_PATH = "serve.trainer:build"
# A config rendered without secrets names these wrappers: they read them where the app is built.
ENV_IMPORT_PATH = "ops.serve_config:build"
ENV_TRAINER_IMPORT_PATH = "ops.serve_config:build_trainer"
POSTPROCESS_IMPORT_PATH = "serve.app:build_postprocess"
ENV_POSTPROCESS_IMPORT_PATH = "ops.serve_config:build_postprocess"
IMPORT_PATHS = (IMPORT_PATH, ENV_IMPORT_PATH)
TRAINER_IMPORT_PATHS = (TRAINER_IMPORT_PATH, ENV_TRAINER_IMPORT_PATH)
POSTPROCESS_IMPORT_PATHS = (POSTPROCESS_IMPORT_PATH, ENV_POSTPROCESS_IMPORT_PATH)
HEADER = ("# Ray Serve config rendered from the CineWeave catalog by `cineweave ops serve-config`.\n"
          "# Do not edit by hand: change the model's YAML spec (or the settings) and render again.\n")


class ServeConfigError(ValueError):
    """A Serve config that Ray would refuse, or a request for a model the config cannot serve."""


# --- rendering ----------------------------------------------------------------------------------

def runtime_args(settings: Settings, *, embedded: bool, include_secrets: bool = True) -> dict[str, Any]:
    """The ``RuntimeConfig`` fields a replica needs, as :meth:`ops.stack.EmbeddedStack.runtime` builds them.

    ``include_secrets=False`` leaves out the storage URL (it carries S3 credentials) and the
    signing secret, for configs stored where secrets do not belong (a Kubernetes custom
    resource); :func:`build` then reads them from the settings where the app is built.
    """
    runtime: dict[str, Any] = {
        "public_base_url": settings.public_url or f"http://{settings.host}:{settings.port}",
        "tiny_dir": str(tiny_models_dir(settings)),
        "cache_dir": str((settings.data_dir / "cache").resolve()),
        "threads": 1 if embedded else None,
        "lora_cache_entries": settings.lora_cache_entries,
    }
    if settings.test_hooks_dir:  # tests only (serve/testhooks.py): absent, i.e. off, in any real config
        runtime["test_hooks_dir"] = settings.test_hooks_dir
    if include_secrets:
        runtime = {"storage_url": settings.resolved_storage_url(),
                   "signing_secret": settings.resolved_signing_secret(), **runtime}
    return runtime


def is_tiny(spec: ModelSpec) -> bool:
    return bool(spec.source and spec.source.tiny)


def select_models(catalog: Catalog, models: Iterable[str] | None = None, *, embedded: bool = False) -> list[ModelSpec]:
    """The models a config serves: the named ones, else every enabled local model of the target.

    Without names, an embedded (CPU) config serves the tiny test checkpoints and a GPU config
    serves every other enabled local model; remote-only models never get a deployment.
    """
    names = list(models or [])
    if names:
        chosen: list[ModelSpec] = []
        for name in dict.fromkeys(names):
            spec = catalog.get(name)
            if spec is None:
                raise ServeConfigError(f"unknown model {name!r}; known: {', '.join(s.id for s in catalog.all())}")
            if spec.remote_only:
                raise ServeConfigError(f"{name} is remote only ({spec.overflow.provider}); it has no deployment")
            if not spec.enabled:
                raise ServeConfigError(f"{name} is disabled in the catalog")
            chosen.append(spec)
        return chosen
    return [s for s in catalog.enabled() if not s.remote_only and is_tiny(s) == embedded]


def render(settings: Settings, catalog: Catalog | None = None, *, models: Iterable[str] | None = None,
           embedded: bool = False, include_secrets: bool = True, trainer: bool = True, postprocess: bool = True,
           proxy_location: str = "EveryNode", http_port: int = 8000) -> dict[str, Any]:
    """The Serve config (a plain, JSON-able dict), validated against ``ServeDeploySchema``.

    With ``trainer`` and a trainable model among the served ones, the config also has the LoRA
    trainer application (``serve.trainer:build``), sized like :class:`ops.stack.EmbeddedStack`
    sizes it: the largest GPU and CPU needs of those models, one replica. With ``postprocess``, the
    post-processing application follows the models' (CPU only; embedded: a fraction of a CPU).
    """
    from serve.app import app_name, deployment_options

    catalog = catalog or Catalog.load(settings.models_dir)
    specs = select_models(catalog, models, embedded=embedded)
    if not specs:
        raise ServeConfigError("no local model to deploy (name one with --model)")
    runtime = runtime_args(settings, embedded=embedded, include_secrets=include_secrets)
    applications = []
    for spec in specs:
        args: dict[str, Any] = {"model": spec.id, "runtime": runtime, "embedded": embedded}
        if settings.models_dir:
            args["models_dir"] = str(settings.models_dir.resolve())  # where the nodes find it too
        applications.append({
            "name": app_name(spec.id),
            "route_prefix": None,  # reached through handles by the API, not over Serve's HTTP proxy
            "import_path": IMPORT_PATH if include_secrets else ENV_IMPORT_PATH,
            "args": args,
            "deployments": [deployment_options(spec, embedded=embedded)],
        })
    if postprocess:
        applications.append(_postprocess_application(runtime, embedded=embedded, include_secrets=include_secrets))
    trainable = [s for s in specs if s.trainable]
    if trainer and trainable:
        applications.append(_trainer_application(settings, trainable, runtime, embedded=embedded,
                                                 include_secrets=include_secrets))
    config = {"proxy_location": proxy_location, "http_options": {"host": "0.0.0.0", "port": http_port},
              "applications": applications}
    config = json.loads(json.dumps(config))  # plain types only (what YAML and KubeRay carry)
    validate(config)
    return config


def _trainer_application(settings: Settings, trainable: list[ModelSpec], runtime: dict[str, Any], *,
                         embedded: bool, include_secrets: bool) -> dict[str, Any]:
    from serve.trainer import APP_NAME, trainer_deployment_options

    num_gpus = max(s.resources.num_gpus for s in trainable)
    num_cpus = max(s.resources.num_cpus for s in trainable)
    args: dict[str, Any] = {"runtime": runtime, "num_gpus": num_gpus, "num_cpus": num_cpus, "embedded": embedded}
    if settings.models_dir:
        args["models_dir"] = str(settings.models_dir.resolve())  # where the nodes find it too
    return {"name": APP_NAME, "route_prefix": None,
            "import_path": TRAINER_IMPORT_PATH if include_secrets else ENV_TRAINER_IMPORT_PATH, "args": args,
            "deployments": [trainer_deployment_options(num_gpus, num_cpus, embedded)]}


def _postprocess_application(runtime: dict[str, Any], *, embedded: bool, include_secrets: bool) -> dict[str, Any]:
    from serve.app import postprocess_deployment_options
    from serve.postprocess import APP_NAME

    return {"name": APP_NAME, "route_prefix": None,
            "import_path": POSTPROCESS_IMPORT_PATH if include_secrets else ENV_POSTPROCESS_IMPORT_PATH,
            "args": {"runtime": runtime, "embedded": embedded},
            "deployments": [postprocess_deployment_options(embedded=embedded)]}


def validate(config: Mapping[str, Any]) -> Any:
    """Parse ``config`` with Ray's own ``ServeDeploySchema``; also check what Ray cannot know."""
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    from serve.app import deployment_name

    # Ray's schemas drop unknown keys silently, so a misspelt option would just vanish: refuse it.
    _known_keys("config", config, ServeDeploySchema)
    for app in config.get("applications") or []:
        _known_keys(f"application {app.get('name')}", app, ServeApplicationSchema)
        for dep in app.get("deployments") or []:
            _known_keys(f"deployment {dep.get('name')}", dep, DeploymentSchema)
    try:
        schema = ServeDeploySchema.model_validate(dict(config))
    except ValidationError as exc:
        raise ServeConfigError(f"not a valid Serve config: {exc}") from exc
    from serve.postprocess import DEPLOYMENT_NAME as POSTPROCESS_DEPLOYMENT
    from serve.trainer import DEPLOYMENT_NAME as TRAINER_DEPLOYMENT

    for app in schema.applications:
        if app.import_path in IMPORT_PATHS:
            expected = deployment_name(str((app.args or {}).get("model")))
        elif app.import_path in TRAINER_IMPORT_PATHS:
            expected = TRAINER_DEPLOYMENT
        elif app.import_path in POSTPROCESS_IMPORT_PATHS:
            expected = POSTPROCESS_DEPLOYMENT
        else:
            continue
        names = [d.name for d in app.deployments]
        if names != [expected]:
            raise ServeConfigError(f"application {app.name}: deployments {names}, expected [{expected!r}] "
                                   f"(the name {app.import_path} gives its deployment)")
        runtime = (app.args or {}).get("runtime")
        if not isinstance(runtime, dict):
            raise ServeConfigError(f"application {app.name}: args.runtime must be a mapping")
    return schema


def _known_keys(where: str, data: Any, schema: Any) -> None:
    if not isinstance(data, Mapping):
        return  # the schema reports the wrong type
    unknown = sorted(set(data) - set(schema.model_fields))
    if unknown:
        raise ServeConfigError(f"{where}: unknown option(s) {unknown} (Ray would ignore them)")


# --- redaction --------------------------------------------------------------------------------

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"(secret|token|password|passwd|api_?key|access_?key|credential|private_?key)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@", re.I)
_SECRET_QUERY = re.compile(r"(?P<name>[?&](?:[a-z_]*(?:secret|token|password|key|signature|sig)[a-z_]*))=(?P<value>[^&#\s]*)",
                           re.I)


def redact_text(text: str) -> str:
    """A string with URL credentials (``s3://KEY:SECRET@host``, ``postgresql://u:pw@db``) and secret
    query parameters (``?secret_key=…``, ``&token=…``) replaced by ``<redacted>``."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}={REDACTED}", text)


def redact(value: Any, key: str | None = None) -> Any:
    """A copy of ``value`` (a config) with every secret replaced: values under secret-looking keys
    (signing_secret, *_token, password, api_key, ...) and credentials inside any string."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if key is not None and _SECRET_KEY.search(key) and value:
            return REDACTED
        return redact_text(value)
    return value


def dump(config: Mapping[str, Any]) -> str:
    return HEADER + yaml.safe_dump(dict(config), sort_keys=False, width=120)


def _with_env_secrets(args: dict[str, Any]) -> dict[str, Any]:
    from api.settings import get_settings

    settings = get_settings()
    runtime = dict(args.get("runtime") or {})
    runtime.setdefault("storage_url", settings.resolved_storage_url())
    if settings.signing_secret:
        runtime.setdefault("signing_secret", settings.signing_secret)
    return {**args, "runtime": runtime}


def build(args: dict[str, Any]) -> Any:
    """``serve.app:build`` for a config rendered without secrets.

    The storage URL and the signing secret come from the ``CINEWEAVE_*`` settings of the process
    that builds the application (Serve's build task, on any node of the cluster: every Ray node
    gets them from the same Kubernetes Secret), so the config itself carries none.
    """
    from serve.app import build as build_app

    return build_app(_with_env_secrets(args))


def build_trainer(args: dict[str, Any]) -> Any:
    """``serve.trainer:build`` for a config rendered without secrets (see :func:`build`)."""
    from serve.trainer import build as build_trainer_app

    return build_trainer_app(_with_env_secrets(args))


def build_postprocess(args: dict[str, Any]) -> Any:
    """``serve.app:build_postprocess`` for a config rendered without secrets (see :func:`build`)."""
    from serve.app import build_postprocess as build_postprocess_app

    return build_postprocess_app(_with_env_secrets(args))


# --- changing a running deployment --------------------------------------------------------------

def serve_client() -> Any:
    """The Serve controller client of the Ray session this process is connected to."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise ServeConfigError("Serve is not running on this Ray cluster")
    return client


def serve_details(client: Any | None = None) -> dict[str, Any]:
    """``ServeInstanceDetails`` as plain JSON types: applications, deployments, configs, replicas.

    Ray's dict holds enums (``ApplicationStatus.RUNNING``); the JSON round trip turns them into
    their values (``"RUNNING"``), which is what callers compare with.
    """
    details = (client or serve_client()).get_serve_details()
    return dict(json.loads(json.dumps(details, default=str)))


def _deployment_detail(details: Mapping[str, Any], app: str, deployment: str | None) -> tuple[str, dict[str, Any]]:
    apps = details.get("applications") or {}
    if app not in apps:
        raise ServeConfigError(f"no Serve application {app!r} (running: {', '.join(sorted(apps)) or 'none'})")
    deployments = apps[app].get("deployments") or {}
    name = deployment or (next(iter(deployments)) if len(deployments) == 1 else None)
    if name is None or name not in deployments:
        raise ServeConfigError(f"application {app!r} has deployments {sorted(deployments)}; name one")
    return name, deployments[name]


def scaled_autoscaling(current: Mapping[str, Any] | None, num_replicas: int | None, min_replicas: int,
                       max_replicas: int, **overrides: Any) -> dict[str, Any]:
    """The autoscaling config with new bounds; the rest kept (``initial_replicas`` clamped)."""
    if min_replicas < 0 or max_replicas < 1 or min_replicas > max_replicas:
        raise ServeConfigError(f"need 0 <= min <= max and max >= 1 (got min={min_replicas}, max={max_replicas})")
    keep = ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s", "look_back_period_s",
            "metrics_interval_s", "upscaling_factor", "downscaling_factor", "initial_replicas")
    config = {k: v for k, v in dict(current or {}).items() if k in keep and v is not None}
    initial = config.get("initial_replicas", num_replicas if num_replicas is not None else max(1, min_replicas))
    config.update(min_replicas=min_replicas, max_replicas=max_replicas)
    config.update({k: v for k, v in overrides.items() if v is not None})
    config["initial_replicas"] = max(min_replicas, min(max_replicas, int(config.get("initial_replicas", initial))))
    return config


def update_deployment(app: str, deployment: str | None = None, *, min_replicas: int | None = None,
                      max_replicas: int | None = None, user_config: dict[str, Any] | None = None,
                      autoscaling_overrides: Mapping[str, Any] | None = None,
                      wait_s: float = 60.0) -> dict[str, Any]:
    """Change a running deployment's autoscaling bounds and/or ``user_config``; nothing else.

    Returns ``{"app", "deployment", "source", "autoscaling_config", "user_config"}`` as applied.
    Waits (up to ``wait_s``) until the controller reports the new options.
    """
    client = serve_client()
    details = serve_details(client)
    name, detail = _deployment_detail(details, app, deployment)
    live = dict(detail.get("deployment_config") or {})
    autoscaling: dict[str, Any] | None = None
    if min_replicas is not None or max_replicas is not None:
        current = live.get("autoscaling_config") or {}
        low = min_replicas if min_replicas is not None else int(current.get("min_replicas", 1))
        high = max_replicas if max_replicas is not None else int(current.get("max_replicas", max(1, low)))
        autoscaling = scaled_autoscaling(current, live.get("num_replicas"), low, high,
                                         **dict(autoscaling_overrides or {}))
    if autoscaling is None and user_config is None:
        raise ServeConfigError("nothing to change")
    source = str(details["applications"][app].get("source") or "")
    if source == "declarative":
        _apply_declarative(client, details, app, name, autoscaling, user_config)
    else:
        _redeploy_imperative(client, app, name, autoscaling, user_config)
    applied = _wait_applied(client, app, name, autoscaling, user_config, wait_s)
    logger.info("%s/%s updated (%s): autoscaling=%s user_config=%s", app, name, source,
                applied.get("autoscaling_config"), applied.get("user_config"))
    return {"app": app, "deployment": name, "source": source,
            "autoscaling_config": applied.get("autoscaling_config"), "user_config": applied.get("user_config")}


def _apply_declarative(client: Any, details: Mapping[str, Any], app: str, deployment: str,
                       autoscaling: dict[str, Any] | None, user_config: dict[str, Any] | None) -> None:
    """Re-apply every config-deployed app (an app left out would be deleted), one option changed."""
    import ray
    from ray.serve.schema import ServeDeploySchema

    configs = ray.get(client._controller.get_app_configs.remote())
    applications = []
    for name, schema in configs.items():
        entry = schema.model_dump(exclude_unset=True)
        if name == app:
            deployments = entry.setdefault("deployments", [])
            target = next((d for d in deployments if d.get("name") == deployment), None)
            if target is None:
                target = {"name": deployment}
                deployments.append(target)
            if autoscaling is not None:
                target.pop("num_replicas", None)
                target["autoscaling_config"] = autoscaling
            if user_config is not None:
                target["user_config"] = user_config
        applications.append(entry)
    body: dict[str, Any] = {"applications": applications}
    if details.get("target_capacity") is not None:
        body["target_capacity"] = details["target_capacity"]
    client.deploy_apps(ServeDeploySchema.model_validate(body))


def _redeploy_imperative(client: Any, app: str, deployment: str, autoscaling: dict[str, Any] | None,
                         user_config: dict[str, Any] | None) -> None:
    from ray import serve

    info, route_prefix = client.get_deployment_info(deployment, app)
    config = info.deployment_config
    fixed = {"name", "_init_args", "_init_kwargs", "ray_actor_options", "num_replicas", "autoscaling_config"}
    options: dict[str, Any] = {}
    for option in sorted(config.user_configured_option_names - fixed):
        value = getattr(config, option, None)
        options[option] = value.model_dump() if hasattr(value, "model_dump") else copy.deepcopy(value)
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    elif config.autoscaling_config is not None:
        options["autoscaling_config"] = config.autoscaling_config.model_dump()
    else:
        options["num_replicas"] = config.num_replicas
    if user_config is not None:
        options["user_config"] = user_config
    replica = info.replica_config
    bound = (serve.deployment(replica.deployment_def)
             .options(name=deployment, ray_actor_options=replica.ray_actor_options,
                      version=info.version, _internal=True, **options)
             .bind(*replica.init_args, **(replica.init_kwargs or {})))
    serve.run(bound, name=app, route_prefix=route_prefix)


def _wait_applied(client: Any, app: str, deployment: str, autoscaling: dict[str, Any] | None,
                  user_config: dict[str, Any] | None, wait_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            _, detail = _deployment_detail(serve_details(client), app, deployment)
        except ServeConfigError:  # an application being rebuilt lists no deployment for a moment
            detail = {}
        live = dict(detail.get("deployment_config") or {})
        bounds = live.get("autoscaling_config") or {}
        ok = bool(live) and (autoscaling is None or (bounds.get("min_replicas") == autoscaling["min_replicas"]
                                                     and bounds.get("max_replicas") == autoscaling["max_replicas"]))
        ok = ok and (user_config is None or live.get("user_config") == user_config)
        if ok:
            return live
        if time.monotonic() > deadline:
            raise TimeoutError(f"{app}/{deployment} did not take the new options within {wait_s:.0f}s")
        time.sleep(0.2)
