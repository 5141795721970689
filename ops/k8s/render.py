"""Render ``ops/k8s/rayservice.yaml`` from its template and the catalog.

    python -m ops.k8s.render            # rewrite rayservice.yaml
    python -m ops.k8s.render --check    # exit 1 when rayservice.yaml is out of date

The RayService's ``serveConfigV2`` is the Serve config of :func:`ops.serve_config.render` for the
cluster's pods: data under ``/data`` (the image's data dir), the API on 8080, and no secrets in
the custom resource (``--no-secrets``: the build wrapper reads ``CINEWEAVE_STORAGE_URL`` and
``CINEWEAVE_SIGNING_SECRET`` from the Secret every Ray pod mounts). A test keeps the committed
manifest equal to a fresh render, so a catalog change that forgets to re-render fails CI.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from api.settings import Settings
from models.catalog import Catalog
from ops.serve_config import render

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATE = HERE / "rayservice.template.yaml"
OUTPUT = HERE / "rayservice.yaml"
PLACEHOLDER = "__SERVE_CONFIG_V2__"
# The models whose replicas fit the worker groups (A10G 24 GB, L40S 48 GB): see ops/capacity.py.
MODELS = ("sdxl", "flux-schnell", "ltx-video", "wan2.1-t2v-1.3b")


def pod_settings() -> Settings:
    """The settings the Ray pods run with, as far as the Serve config needs them."""
    # Every field the render reads is given, so this machine's CINEWEAVE_* variables cannot leak in.
    return Settings(data_dir=Path("/data"), host="0.0.0.0", port=8080, public_url=None, models_dir=None,
                    tiny_models_dir=None, storage_url=None, signing_secret=None, _env_file=None)


def serve_config(catalog: Catalog | None = None) -> dict[str, Any]:
    settings = pod_settings()
    return render(settings, catalog or Catalog.load(), models=MODELS, embedded=False, include_secrets=False)


def manifest(catalog: Catalog | None = None) -> str:
    import yaml

    text = yaml.safe_dump(serve_config(catalog), sort_keys=False, width=120)
    template = TEMPLATE.read_text()
    line = next(x for x in template.splitlines() if PLACEHOLDER in x)
    indent = line[: len(line) - len(line.lstrip())]
    block = "\n".join(indent + x if x else x for x in text.rstrip("\n").splitlines())
    return template.replace(line, block)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when rayservice.yaml is out of date")
    args = parser.parse_args(argv)
    fresh = manifest()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != fresh:
            print(f"{OUTPUT} is out of date: run python -m ops.k8s.render", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(fresh)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
