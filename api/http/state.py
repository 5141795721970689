"""Everything a request needs, built once per app by ``create_app`` and kept on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from api.core.executor import Executor
from api.db.engine import Database
from api.http.webhooks import WebhookDeliverer
from api.metrics import Metrics
from api.runner.runner import Runner
from api.services.admin import AdminService
from api.services.events import EventBus
from api.services.identity import IdentityService
from api.services.jobs import JobService
from api.services.loras import LoraService
from api.services.models import ModelService
from api.services.notify import Notifier
from api.services.presets import PresetService
from api.services.projects import ProjectService
from api.services.queue import QueueEstimate, QueueService
from api.services.teams import TeamService
from api.services.uploads import UploadService
from api.settings import Settings
from api.storage.base import Storage
from models.catalog import Catalog


@dataclass
class AppState:
    settings: Settings
    db: Database
    storage: Storage
    catalog: Catalog
    bus: EventBus
    jobs: JobService
    metrics: Metrics
    uploads: UploadService
    admin: AdminService
    models: ModelService
    loras: LoraService
    executor: Executor | None = None
    runner: Runner | None = None
    webhooks: WebhookDeliverer | None = None
    notifier: Notifier | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    pipelines: Any = None  # api.services.pipelines.PipelineService, built by create_app
    queue: QueueService = field(init=False)
    identity: IdentityService = field(init=False)  # bearer credential (API key or JWT) -> caller
    teams: TeamService = field(init=False)
    presets: PresetService = field(init=False)
    projects: ProjectService = field(init=False)

    def __post_init__(self) -> None:
        self.queue = QueueService(self.db, self.settings, self.catalog)
        self.identity = IdentityService(self.db, self.settings)
        self.teams = TeamService(self.db, self.settings)
        self.presets = PresetService(self.db, self.settings, prefix="")  # errors name the body's fields
        self.projects = ProjectService(self.db, self.settings)

    def job_view(self, job: Any, queue: QueueEstimate | None = None) -> dict[str, Any]:
        """``queue``: the job's position and ETA (routes compute it; webhooks and others leave it out)."""
        from api.http.schemas import job_view

        return job_view(job, self.storage, self.settings.url_ttl_s, queue)

    def pipeline_view(self, parent: Any, steps: list[Any] | None = None) -> dict[str, Any]:
        """A pipeline (its parent job) in the pipeline shape; its steps are read when not given."""
        from api.http.pipeline_schemas import load_steps, pipeline_view

        children = load_steps(self.db, parent.id) if steps is None else steps
        return pipeline_view(parent, children, self.storage, self.settings.url_ttl_s)
