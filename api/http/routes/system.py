"""Health, readiness, metrics, the catalog and the plans."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Header, Response
from sqlalchemy import text

from api.core.errors import Unauthorized
from api.http.deps import State
from api.http.schemas import Health, ModelList, PlanList, Readiness, error_responses
from api.http.state import AppState

router = APIRouter()


@router.get("/healthz", tags=["system"], response_model=Health)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["system"], response_model=Readiness,
            responses={503: {"model": Readiness, "description": "a dependency is down"}})
def readyz(response: Response, state: State) -> dict[str, Any]:
    checks: dict[str, str] = {}
    try:
        with state.db.read() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report, do not raise
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        state.storage.exists("readyz/probe")
        checks["storage"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["storage"] = f"error: {type(exc).__name__}"
    checks["runner"] = "ok" if state.runner is not None else "off"
    ready = all(v in ("ok", "off") for v in checks.values())
    response.status_code = 200 if ready else 503
    return {"status": "ready" if ready else "not_ready", "checks": checks}


@router.get("/metrics", tags=["system"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
                       **error_responses(401)})
async def metrics(state: State,
                  authorization: str | None = Header(default=None)) -> Response:
    """Prometheus text. Renders cached gauges only (no query, no cluster call: see api.metrics);
    with ``metrics_token`` set, the scrape must carry it as a bearer token."""
    token = state.settings.metrics_token
    if token:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("a valid metrics token is required")
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def model_view(state: AppState, spec: Any) -> dict[str, Any]:
    available, reason = state.models.availability(spec)
    return {
        "id": spec.id, "name": spec.name or spec.id, "description": spec.description, "kind": spec.kind,
        "tasks": list(spec.tasks), "family": spec.family, "enabled": spec.enabled, "available": available,
        "unavailable_reason": None if available else reason, "remote_only": spec.remote_only,
        "provider": spec.overflow.provider, "defaults": spec.defaults.model_dump(exclude_none=True),
        "limits": spec.limits.model_dump(exclude_none=True),
        "pricing": spec.pricing.model_dump(exclude_none=True), "trainable": spec.trainable,
    }


@router.get("/v1/models", tags=["catalog"], response_model=ModelList)
def list_models(state: State) -> dict[str, Any]:
    return {"data": [model_view(state, spec) for spec in state.catalog.enabled()]}


@router.get("/v1/plans", tags=["catalog"], response_model=PlanList)
def list_plans(state: State) -> dict[str, Any]:
    s = state.settings
    data = []
    for plan in s.plans:
        active, rate, chars = s.limits_for(plan.id)
        data.append({"id": plan.id, "name": plan.name, "price_usd": plan.price_usd,
                     "monthly_credits": plan.monthly_credits, "one_time_credits": plan.one_time_credits,
                     "limits": {"max_active_jobs": active, "rate_limit_per_minute": rate,
                                "max_prompt_chars": chars}})
    return {"data": data, "pricing": {"video_credits_per_second": s.video_credits_per_second,
                                      "video_1080p_multiplier": s.video_1080p_multiplier}}
