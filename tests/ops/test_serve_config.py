"""The Serve config rendered from the catalog, checked with Ray's own ServeDeploySchema."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from api.settings import Settings
from models.catalog import Catalog
from ops import serve_config
from ops.opscmd import ops_app
from ops.serve_config import (
    ENV_IMPORT_PATH,
    IMPORT_PATH,
    ServeConfigError,
    render,
    runtime_args,
    scaled_autoscaling,
    select_models,
    validate,
)
from ops.stack import EmbeddedStack
from serve.app import deployment_options


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.load()


def _apps(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {app["name"]: app for app in config["applications"]}


def test_gpu_config_has_one_application_per_enabled_local_model(settings: Settings, catalog: Catalog) -> None:
    config = render(settings, catalog)
    ServeDeploySchema.model_validate(config)  # Ray's own schema, independently of render()
    expected = {s.id for s in catalog.enabled() if not s.remote_only and not (s.source and s.source.tiny)}
    apps = _apps(config)
    assert set(apps) == expected | {"trainer", "postprocess"}  # sdxl is trainable
    del apps["trainer"], apps["postprocess"]
    assert {"veo-3.1", "veo-3.1-replicate", "tiny-sd"}.isdisjoint(apps)
    for model, app in apps.items():
        spec = catalog.get(model)
        assert spec is not None
        assert app["import_path"] == IMPORT_PATH and app["route_prefix"] is None
        assert app["args"]["model"] == model and app["args"]["embedded"] is False
        assert app["deployments"] == [deployment_options(spec, embedded=False)]
        assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == spec.resources.num_gpus


def test_autoscaling_and_actor_options_come_from_the_spec(settings: Settings, catalog: Catalog) -> None:
    sdxl = _apps(render(settings, catalog, models=["sdxl"]))["sdxl"]["deployments"][0]
    spec = catalog.get("sdxl")
    assert spec is not None
    assert sdxl["name"] == "gen-sdxl"
    assert sdxl["autoscaling_config"]["min_replicas"] == spec.serving.min_replicas
    assert sdxl["autoscaling_config"]["max_replicas"] == spec.serving.max_replicas
    assert sdxl["autoscaling_config"]["target_ongoing_requests"] == spec.serving.target_ongoing_requests
    assert sdxl["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0, "memory": 32 * 1024**3}
    assert sdxl["user_config"] == {"source": {"hf_repo": "stabilityai/stable-diffusion-xl-base-1.0"}}


def test_embedded_config_serves_the_tiny_models_without_gpus(settings: Settings, catalog: Catalog) -> None:
    apps = _apps(render(settings, catalog, embedded=True, trainer=False, postprocess=False))
    assert set(apps) == {"tiny-sd", "tiny-wan", "tiny-wan-i2v"}
    for app in apps.values():
        assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 0
        assert app["args"]["embedded"] is True and app["args"]["runtime"]["threads"] == 1


def test_trainer_application_when_a_served_model_is_trainable(settings: Settings, catalog: Catalog) -> None:
    from serve.trainer import trainer_deployment_options

    apps = _apps(render(settings, catalog, models=["sdxl", "ltx-video"]))
    trainer = apps["trainer"]
    assert trainer["import_path"] == "serve.trainer:build"
    assert trainer["args"]["num_gpus"] == 1.0 and trainer["args"]["num_cpus"] == 2.0
    assert trainer["args"]["runtime"] == apps["sdxl"]["args"]["runtime"]
    assert trainer["deployments"] == [trainer_deployment_options(1.0, 2.0, False)]
    assert "trainer" not in _apps(render(settings, catalog, models=["ltx-video"]))  # not trainable
    assert "trainer" not in _apps(render(settings, catalog, models=["sdxl"], trainer=False))
    embedded = _apps(render(settings, catalog, embedded=True))["trainer"]
    assert embedded["deployments"][0]["ray_actor_options"]["num_gpus"] == 0
    no_secrets = _apps(render(settings, catalog, models=["sdxl"], include_secrets=False))["trainer"]
    assert no_secrets["import_path"] == "ops.serve_config:build_trainer"
    assert "storage_url" not in no_secrets["args"]["runtime"]


def test_runtime_is_the_one_the_embedded_stack_builds(settings: Settings, catalog: Catalog) -> None:
    stack = EmbeddedStack(settings, catalog, embedded=True)
    # test_hooks_dir (tests only) is left out unless set; the replica's default is the same None
    expected = {k: v for k, v in stack.runtime().__dict__.items() if not (k == "test_hooks_dir" and v is None)}
    assert runtime_args(settings, embedded=True) == expected
    apps = _apps(render(settings, catalog, models=["tiny-sd"], embedded=True))
    assert apps["tiny-sd"]["args"]["runtime"] == expected
    hooked = settings.model_copy(update={"test_hooks_dir": "/tmp/hooks"})
    assert runtime_args(hooked, embedded=True) == EmbeddedStack(hooked, catalog, embedded=True).runtime().__dict__


def test_no_secrets_config_leaves_out_credentials_and_names_the_env_wrapper(tmp_path: Path, catalog: Catalog) -> None:
    secret_url = "s3://key:very-secret@minio:9000/bucket?secure=false"
    settings = Settings(data_dir=tmp_path, storage_url=secret_url, signing_secret="sign-me", _env_file=None)
    config = render(settings, catalog, models=["sdxl"], include_secrets=False)
    text = yaml.safe_dump(config)
    assert "very-secret" not in text and "sign-me" not in text
    app = config["applications"][0]
    assert app["import_path"] == ENV_IMPORT_PATH
    assert "storage_url" not in app["args"]["runtime"]
    with_secrets = render(settings, catalog, models=["sdxl"])
    assert with_secrets["applications"][0]["args"]["runtime"]["storage_url"] == secret_url


def test_env_wrapper_fills_the_secrets_from_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import api.settings
    import serve.app

    settings = Settings(data_dir=tmp_path, storage_url="s3://a:b@minio:9000/bkt", signing_secret="s3cret",
                        _env_file=None)
    import serve.trainer

    monkeypatch.setattr(api.settings, "get_settings", lambda fresh=False: settings)
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(serve.app, "build", lambda args: seen.append(args) or "app")
    monkeypatch.setattr(serve.trainer, "build", lambda args: seen.append(args) or "trainer-app")
    assert serve_config.build_trainer({"runtime": {}, "num_gpus": 1}) == "trainer-app"
    assert seen.pop()["runtime"] == {"storage_url": "s3://a:b@minio:9000/bkt", "signing_secret": "s3cret"}
    args = {"model": "tiny-sd", "runtime": {"tiny_dir": "/x", "threads": 1}, "embedded": True}
    assert serve_config.build(args) == "app"
    assert seen[0]["runtime"] == {"tiny_dir": "/x", "threads": 1, "storage_url": "s3://a:b@minio:9000/bkt",
                                  "signing_secret": "s3cret"}
    assert args["runtime"] == {"tiny_dir": "/x", "threads": 1}  # the caller's args untouched
    # a value the config does carry wins over the settings
    serve_config.build({**args, "runtime": {"storage_url": "file:///elsewhere"}})
    assert seen[1]["runtime"]["storage_url"] == "file:///elsewhere"


def test_model_selection_errors(catalog: Catalog) -> None:
    with pytest.raises(ServeConfigError, match="unknown model"):
        select_models(catalog, ["nope"])
    with pytest.raises(ServeConfigError, match="remote only"):
        select_models(catalog, ["veo-3.1"])
    disabled = catalog.get("sdxl").model_copy(update={"enabled": False})  # type: ignore[union-attr]
    catalog.replace(disabled)
    with pytest.raises(ServeConfigError, match="disabled"):
        select_models(catalog, ["sdxl"])
    assert [s.id for s in select_models(catalog, ["tiny-sd", "tiny-sd", "ltx-video"])] == ["tiny-sd", "ltx-video"]


@pytest.mark.parametrize("break_it, message", [
    (lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_requests="many"), "not a valid Serve"),
    (lambda c: c["applications"][0]["deployments"][0].update(max_replica=4), "unknown option"),
    (lambda c: c["applications"][0].update(deployment=[]), "unknown option"),
    (lambda c: c["applications"].append(copy.deepcopy(c["applications"][0])), "not a valid Serve"),
    (lambda c: c["applications"][0]["deployments"][0].update(name="gen-other"), "expected"),
    (lambda c: c["applications"][0]["args"].update(runtime="file:///x"), "args.runtime"),
    (lambda c: c["applications"][-1]["deployments"][0].update(name="gen-trainer"), "expected"),
])
def test_validation_rejects_what_ray_or_build_would_refuse(settings: Settings, catalog: Catalog, break_it: Any,
                                                          message: str) -> None:
    config = render(settings, catalog, models=["sdxl", "ltx-video"])
    assert config["applications"][-1]["name"] == "trainer"
    validate(config)
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(ServeConfigError, match=message):
        validate(broken)


def test_scaled_autoscaling_keeps_the_rest_and_clamps_initial_replicas() -> None:
    current = {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 2.0,
               "upscale_delay_s": 10.0, "downscale_delay_s": 120.0, "policy": {"policy_function": "x"}}
    scaled = scaled_autoscaling(current, None, 2, 6)
    assert scaled == {"min_replicas": 2, "max_replicas": 6, "initial_replicas": 2, "target_ongoing_requests": 2.0,
                      "upscale_delay_s": 10.0, "downscale_delay_s": 120.0}
    assert scaled_autoscaling(None, 3, 0, 2)["initial_replicas"] == 2  # from num_replicas, clamped
    assert scaled_autoscaling(None, None, 0, 2, upscale_delay_s=1.0)["upscale_delay_s"] == 1.0
    for low, high in [(3, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ServeConfigError):
            scaled_autoscaling(current, None, low, high)


def test_cli_writes_the_rendered_config(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ops.opscmd

    monkeypatch.setattr(ops.opscmd, "get_settings", lambda: settings)
    out = tmp_path / "serve.yaml"
    result = CliRunner().invoke(ops_app, ["serve-config", "--out", str(out), "--embedded", "--model", "tiny-sd",
                                          "--show-secrets"])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text())
    assert written == render(settings, models=["tiny-sd"], embedded=True)
    assert oct(out.stat().st_mode & 0o777) == "0o600"  # it holds the storage URL and signing secret
    result = CliRunner().invoke(ops_app, ["serve-config", "--model", "veo-3.1"])
    assert result.exit_code == 1 and "remote only" in result.output
    result = CliRunner().invoke(ops_app, ["serve-config", "--json", "--model", "sdxl", "--no-secrets"])
    assert result.exit_code == 0 and '"import_path": "ops.serve_config:build"' in result.output


SECRET_STORAGE = "s3://AKIAEXAMPLEKEY:wJalrXUtnFEMI-very-secret@minio.internal:9000/outputs?secure=false"


def _secret_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, storage_url=SECRET_STORAGE, signing_secret="sign-me-0123456789",
                    database_url="postgresql://cineweave:db-pass-42@postgres:5432/cineweave",
                    replicate_api_token="r8_token_abcdef", _env_file=None)


def test_cli_redacts_secrets_by_default_and_shows_them_on_request(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import ops.opscmd

    settings = _secret_settings(tmp_path)
    monkeypatch.setattr(ops.opscmd, "get_settings", lambda: settings)
    for args in (["--model", "sdxl"], ["--model", "sdxl", "--json"], ["--model", "sdxl", "--no-secrets"]):
        result = CliRunner().invoke(ops_app, ["serve-config", *args])
        assert result.exit_code == 0, result.output
        for secret in ("wJalrXUtnFEMI", "AKIAEXAMPLEKEY", "sign-me-0123456789", "db-pass-42", "r8_token"):
            assert secret not in result.output, (args, secret)
        assert ENV_IMPORT_PATH in result.output  # still deployable: the nodes read CINEWEAVE_*
    out = tmp_path / "serve.yaml"
    result = CliRunner().invoke(ops_app, ["serve-config", "--model", "sdxl", "--out", str(out)])
    assert result.exit_code == 0 and "wJalrXUtnFEMI" not in out.read_text()
    shown = CliRunner().invoke(ops_app, ["serve-config", "--model", "sdxl", "--show-secrets"])
    assert shown.exit_code == 0, shown.output
    assert SECRET_STORAGE in shown.output and "sign-me-0123456789" in shown.output
    assert yaml.safe_load(shown.output) == render(settings, models=["sdxl"])
    both = CliRunner().invoke(ops_app, ["serve-config", "--show-secrets", "--no-secrets"])
    assert both.exit_code == 1


def test_redact_covers_url_credentials_secret_keys_and_query_parameters() -> None:
    config = {"runtime": {"storage_url": SECRET_STORAGE, "signing_secret": "abc", "threads": 1,
                          "public_base_url": "https://api.example.com"},
              "env": [{"name": "DB", "value": "postgresql://u:pw-123@db:5432/x"},
                      {"name": "S3", "value": "s3://minio:9000/b?access_key=AK1&secret_key=SK2&secure=false"}],
              "replicate_api_token": "r8_xyz", "tiny_dir": "/data/tiny"}
    red = serve_config.redact(config)
    text = json.dumps(red)
    for secret in ("AKIAEXAMPLEKEY", "very-secret", "pw-123", "AK1", "SK2", "r8_xyz", '"abc"'):
        assert secret not in text, secret
    assert red["runtime"]["threads"] == 1 and red["tiny_dir"] == "/data/tiny"
    assert red["runtime"]["public_base_url"] == "https://api.example.com"
    assert red["runtime"]["storage_url"].startswith("s3://<redacted>@minio.internal:9000/outputs")
    assert "secure=false" in red["env"][1]["value"]
    assert config["runtime"]["signing_secret"] == "abc"  # a copy: the input is untouched


def test_the_postprocess_application_is_cpu_only_and_named_by_its_builder(settings: Settings, catalog: Catalog) -> None:
    from serve.app import postprocess_deployment_options

    app = _apps(render(settings, catalog, models=["sdxl"]))["postprocess"]
    assert app["import_path"] == "serve.app:build_postprocess" and app["route_prefix"] is None
    assert app["args"] == {"runtime": runtime_args(settings, embedded=False), "embedded": False}
    assert app["deployments"] == [postprocess_deployment_options(embedded=False)]
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 0
    embedded = _apps(render(settings, catalog, embedded=True))["postprocess"]
    assert embedded["deployments"][0]["ray_actor_options"]["num_cpus"] < 1 and embedded["args"]["embedded"] is True
    no_secrets = _apps(render(settings, catalog, models=["sdxl"], include_secrets=False))["postprocess"]
    assert no_secrets["import_path"] == "ops.serve_config:build_postprocess"
    assert "storage_url" not in no_secrets["args"]["runtime"]
    assert "postprocess" not in _apps(render(settings, catalog, models=["sdxl"], postprocess=False))
