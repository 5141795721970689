"""An API process against a running Ray Serve (for the restart tests): ``python -m tests.serve.api_process``.

It joins the Ray at ``RAY_ADDRESS``, reaches the deployed generator apps by name, and serves the
API (runner included) on ``CINEWEAVE_HOST:CINEWEAVE_PORT`` with the ``CINEWEAVE_*`` settings from
its environment, like ``cineweave serve`` beside a cluster. The tests kill it (SIGKILL) or stop it
(SIGTERM) while a replica generates, and start another on the same database.
"""

from __future__ import annotations

import logging
import os
from typing import Any


def main() -> None:
    import ray
    import uvicorn
    from ray import serve

    from api.http.app import create_app
    from api.settings import Settings
    from models.catalog import Catalog
    from models.spec import ModelSpec
    from serve.app import app_name
    from serve.executor import RayExecutor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings(_env_file=None)
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING, log_to_driver=False)
    models = set(os.environ.get("API_PROCESS_MODELS", "tiny-sd").split(","))
    handles: dict[str, Any] = {m: serve.get_app_handle(app_name(m)) for m in models}

    def availability(spec: ModelSpec) -> tuple[bool, str | None]:
        return (True, None) if spec.id in handles else (False, "not deployed here")

    app = create_app(settings, RayExecutor(handles), catalog=Catalog.load(settings.models_dir),
                     availability=availability, run_maintenance=False)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
