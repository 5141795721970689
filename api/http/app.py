"""``create_app(settings, executor)``: the FastAPI app, its error shape, and its background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.core.errors import CineWeaveError
from api.core.executor import Executor
from api.db.engine import Database
from api.db.tables import Job, WebhookDelivery
from api.http import compat, console
from api.http.pipeline_schemas import pipeline_webhook_body
from api.http.routes import (
    account,
    admin,
    billing,
    files,
    jobs,
    loras,
    pipelines,
    presets,
    projects,
    system,
    teams,
)
from api.http.state import AppState
from api.http.webhooks import ShapedView, WebhookDeliverer
from api.metrics import Metrics
from api.runner.runner import InputFn, Runner
from api.services.admin import AdminService
from api.services.deadlines import DeadlineWatcher
from api.services.events import EventBus
from api.services.inputs import InputResolver
from api.services.jobs import JobService
from api.services.loras import LoraService
from api.services.maintenance import Maintenance
from api.services.models import Availability, ModelService, Swapper
from api.services.notify import Notifier
from api.services.pipelines import PipelineService
from api.services.uploads import UploadService
from api.settings import Settings
from api.storage.base import Storage, make_storage
from models.catalog import Catalog

logger = logging.getLogger(__name__)

HTTP_CODES = {400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
              422: "invalid_input", 429: "rate_limited"}


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "details": details or {}}},
                        status_code=status, headers=headers)


def _shaped_error(request: Request, status: int, code: str, message: str,
                  details: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """The native error shape, or the compat API's own where the path is under its prefix."""
    shaper = compat.error_shaper_for(request.url.path)
    if shaper is not None:
        return shaper(status, code, message, details or {}, headers)
    return error_response(status, code, message, details, headers)


def _db_snapshot(db: Database) -> Callable[[], dict[str, Any]]:
    def snapshot() -> dict[str, Any]:
        from api.db.tables import utcnow

        with db.read() as session:
            counts = session.execute(select(Job.status, Job.model, func.count())
                                     .group_by(Job.status, Job.model)).all()
            oldest = session.execute(select(Job.model, func.min(Job.created_at))
                                     .where(Job.status == "queued").group_by(Job.model)).all()
            # updated_at moves with every recorded event (not with lease renewals): a running job
            # whose updated_at stays old is stuck even while its runner keeps the lease
            idle = session.execute(select(Job.model, func.min(Job.updated_at))
                                   .where(Job.status == "running").group_by(Job.model)).all()
            # the webhook outbox: rows neither delivered nor given up, and the oldest of them
            outbox = session.execute(select(func.count(), func.min(WebhookDelivery.created_at)).where(
                WebhookDelivery.delivered_at.is_(None), WebhookDelivery.failed_at.is_(None))).one()
        now = utcnow()
        return {"jobs": {(s, m): c for s, m, c in counts},
                "queued": {m: c for s, m, c in counts if s == "queued"},
                "oldest_wait": {m: max(0.0, (now - t).total_seconds()) for m, t in oldest if t},
                "running_idle": {m: max(0.0, (now - t).total_seconds()) for m, t in idle if t},
                "webhooks_pending": outbox[0],
                "webhooks_oldest_pending_s": max(0.0, (now - outbox[1]).total_seconds()) if outbox[1] else 0.0}
    return snapshot


def _expand_preset(session: Any, name: str, params: dict[str, Any] | None) -> Any:
    """A preset's steps for a pipeline submission (``api.services.presets.expand``, imported late)."""
    from api.services.presets import expand

    return expand(session, name, params)


def create_app(settings: Settings, executor: Executor | None = None, *, catalog: Catalog | None = None,
               storage: Storage | None = None, resolve_input: InputFn | None = None,
               run_runner: bool | None = None, run_maintenance: bool = True,
               availability: Availability | None = None, swapper: Swapper | None = None,
               extras: dict[str, Any] | None = None) -> FastAPI:
    """Build the API. With an executor (and ``runner_enabled``), the app also runs a runner."""
    db = Database(settings)
    storage = storage or make_storage(settings.resolved_storage_url(),
                                      signing_secret=settings.resolved_signing_secret(),
                                      public_base_url=settings.public_url or f"http://{settings.host}:{settings.port}")
    catalog = catalog or Catalog.load(settings.models_dir)
    bus = EventBus()
    metrics = Metrics(snapshot=_db_snapshot(db))
    jobs_service = JobService(db, settings, catalog, storage, bus, metrics=metrics)
    state = AppState(settings=settings, db=db, storage=storage, catalog=catalog, bus=bus,
                     jobs=jobs_service, metrics=metrics,
                     loras=LoraService(db, settings, catalog, storage, bus, jobs_service),
                     uploads=UploadService(db, settings, storage), admin=AdminService(db, settings),
                     models=ModelService(catalog, availability, swapper),
                     executor=executor, extras=dict(extras or {}))
    state.pipelines = PipelineService(jobs_service, _expand_preset)
    want_runner = settings.runner_enabled if run_runner is None else run_runner

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(db.migrate)
        await asyncio.to_thread(state.presets.seed)  # the shipped presets, where none of the name exists
        bus.bind(asyncio.get_running_loop())
        # one cross-process signal (LISTEN/NOTIFY on PostgreSQL): wakes SSE streams and the runner's
        # cancel watch for changes made by other processes, and the webhook deliverer on enqueue
        state.notifier = Notifier(db)
        state.notifier.subscribe("events", bus.on_notification)
        webhook_view = ShapedView(state.job_view, {"replicate": compat.replicate.webhook_renderer(state)},
                                  pipeline=lambda job, row: pipeline_webhook_body(db, storage, settings.url_ttl_s,
                                                                                  job, row))
        state.webhooks = WebhookDeliverer(db, settings, webhook_view, notifier=state.notifier, metrics=metrics)
        await state.notifier.start()
        state.webhooks.start()
        # Cancel-After: aborts (or cancels) jobs whose start deadline passed
        deadlines = DeadlineWatcher(db, settings, storage, bus, jobs_service, metrics)
        state.extras["deadlines"] = deadlines
        state.notifier.subscribe("events", deadlines.on_notification)
        deadlines.start()
        if executor is not None and want_runner:
            state.runner = Runner(db, executor, settings, storage, bus, metrics=metrics,
                                  resolve_input=resolve_input or InputResolver(db, settings, storage, catalog),
                                  notifier=state.notifier)  # woken by it, not by a poll
            state.runner.start()
        # /metrics renders cached gauges; this thread refreshes them (database, cluster)
        metrics.start_refresher(settings.metrics_refresh_s)
        maintenance_task = None
        if run_maintenance:
            maintenance = Maintenance(db, settings, storage)
            maintenance_task = asyncio.create_task(maintenance.run_forever(), name="maintenance")
        try:
            yield
        finally:
            if maintenance_task is not None:
                maintenance_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await maintenance_task
            if state.runner is not None:
                await state.runner.stop()
            close_executor = getattr(executor, "aclose", None)
            if close_executor is not None:
                await close_executor()  # provider HTTP clients
            await deadlines.stop()
            await state.webhooks.stop()
            await state.notifier.stop()
            await asyncio.to_thread(metrics.stop_refresher)
            db.dispose()

    app = FastAPI(title="CineWeave", version="1.0", lifespan=lifespan,
                  description="Image and video generation and LoRA training, paid in credits.")
    app.state.cineweave = state
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["Idempotent-Replayed", "Retry-After"])

    @app.exception_handler(CineWeaveError)
    async def _domain_error(request: Request, exc: CineWeaveError) -> JSONResponse:
        metrics.rejected.labels(exc.code).inc()
        headers = {"Retry-After": str(exc.details.get("retry_after_s", 60))} if exc.status == 429 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return _shaped_error(request, exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"),
                   "message": e.get("msg", "")} for e in exc.errors()]
        first = errors[0] if errors else {"field": "", "message": "invalid request"}
        metrics.rejected.labels("invalid_input").inc()
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return _shaped_error(request, 422, "invalid_input", "the request body is not valid JSON",
                                 {"errors": errors})
        return _shaped_error(request, 422, "invalid_input", f"{first['field'] or 'body'}: {first['message']}",
                             {"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "error")
        return _shaped_error(request, exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return _shaped_error(request, 500, "internal_error", "internal error")

    # billing before files: /v1/webhooks/stripe must match ahead of /v1/webhooks/{provider}
    for module in (system, jobs, pipelines, loras, account, admin, billing, files, teams):
        app.include_router(module.router)
    for module in (presets, projects):
        app.include_router(module.router)
    compat.include(app)
    console.mount(app, storage)  # the web console at / (static files, no build step)
    return app
