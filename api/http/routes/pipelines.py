"""Pipelines: submit (steps or a preset), quote, list, read, cancel, follow (SSE).

Thin: each route parses, calls one :class:`api.services.pipelines.PipelineService` method and
shapes the answer with :mod:`api.http.pipeline_schemas`. The parent job stays a job too:
``GET /v1/jobs/{id}`` shows it in the job shape (kind ``pipeline``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from api.core.jobs import JobStatus
from api.http.deps import CurrentUser, State
from api.http.pipeline_schemas import (
    PipelineCreate,
    PipelineList,
    PipelinePublic,
    PipelineQuote,
    event_step_view,
    load_steps,
    quote_view,
)
from api.http.routes.jobs import _stream as stream_events
from api.http.schemas import error_responses
from api.http.state import AppState
from api.services.pipelines import PipelineSubmission
from api.services.teams import TEAM_HEADER, one_team

router = APIRouter(prefix="/v1/pipelines", tags=["pipelines"])

READ_ERRORS = error_responses(401, 403, 404, 422)
TeamHeader = Header(default=None, alias=TEAM_HEADER, max_length=64,
                    description="submit as this team (like the body's team)")


def _submission(body: PipelineCreate, x_team: str | None) -> PipelineSubmission:
    return PipelineSubmission(steps=body.step_dicts(), preset=body.preset, params=body.params,
                              webhook=body.webhook, webhook_events_filter=body.webhook_events_filter,
                              team=one_team(body.team, x_team), project=body.project)


@router.post("", status_code=202, response_model=PipelinePublic, response_model_exclude_unset=True,
             responses=error_responses(401, 402, 403, 404, 409, 422, 429))
def create_pipeline(body: PipelineCreate, response: Response, user: CurrentUser, state: State,
                    idempotency_key: str | None = Header(default=None, alias="Idempotency-Key"),
                    x_team: str | None = TeamHeader) -> dict[str, Any]:
    """Validate every step and price the whole pipeline, then in one transaction reserve the total
    and create the pipeline with its steps (nothing runs, nothing is charged on a 4xx)."""
    parent, created = state.pipelines.submit(user, _submission(body, x_team), idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return state.pipeline_view(parent)


@router.post("/quote", response_model=PipelineQuote, response_model_exclude_unset=True,
             responses=error_responses(401, 403, 404, 422))
def quote_pipeline(body: PipelineCreate, user: CurrentUser, state: State,
                   x_team: str | None = TeamHeader) -> dict[str, Any]:
    """What ``POST /v1/pipelines`` with the same body would reserve, per step and in total, after
    the same checks (the same errors); creates nothing and moves no credit."""
    return quote_view(state.pipelines.quote(user, _submission(body, x_team)))


def _statuses(status: str | None) -> str | None:
    """``queued`` as shown also finds pipelines still ``waiting`` for their first step."""
    if not status:
        return status
    wanted = [s.strip() for s in status.split(",") if s.strip()]
    if JobStatus.QUEUED.value in wanted and JobStatus.WAITING.value not in wanted:
        wanted.append(JobStatus.WAITING.value)
    return ",".join(wanted)


@router.get("", response_model=PipelineList, response_model_exclude_unset=True, responses=READ_ERRORS)
def list_pipelines(user: CurrentUser, state: State,
                   status: str | None = Query(default=None, max_length=200, description="comma-separated statuses"),
                   project: str | None = Query(default=None, max_length=64, description="only this project's"),
                   cursor: str | None = Query(default=None, max_length=200),
                   limit: int = Query(default=20, ge=1, le=100),
                   team: str | None = Query(default=None, max_length=64, description="a team's pipelines"),
                   x_team: str | None = Header(default=None, alias=TEAM_HEADER, max_length=64)) -> dict[str, Any]:
    parents, next_cursor = state.pipelines.list(user, status=_statuses(status), project=project, cursor=cursor,
                                                limit=limit, team=one_team(team, x_team))
    steps = state.pipelines.steps_of([p.id for p in parents])  # one query for the page
    return {"data": [state.pipeline_view(p, steps[p.id]) for p in parents], "next_cursor": next_cursor}


@router.get("/{pipeline_id}", response_model=PipelinePublic, response_model_exclude_unset=True,
            responses=READ_ERRORS)
def get_pipeline(pipeline_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    parent, steps = state.pipelines.get(user, pipeline_id)
    return state.pipeline_view(parent, steps)


@router.post("/{pipeline_id}/cancel", response_model=PipelinePublic, response_model_exclude_unset=True,
             responses=READ_ERRORS)
def cancel_pipeline(pipeline_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    """Every unfinished step is canceled and refunded; finished steps stay charged, their outputs kept."""
    return state.pipeline_view(state.pipelines.cancel(user, pipeline_id))


@router.get("/{pipeline_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "the pipeline's events: status (waiting shown as queued), "
                                            "step.completed (step, job_id, outputs with presigned URLs, "
                                            "credits), step.failed, step.canceled (step, job_id, error), "
                                            "completed (with the pipeline)"},
                       **READ_ERRORS})
async def pipeline_events(pipeline_id: str, request: Request, user: CurrentUser, state: State,
                          last_event_id: str | None = Header(default=None, alias="Last-Event-ID")
                          ) -> EventSourceResponse:
    """Server-sent events: every stored event after ``Last-Event-ID``, then live ones, until done.
    Output URLs are signed when each event is sent (a replay gets fresh ones)."""
    await run_in_threadpool(state.pipelines.get, user, pipeline_id)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return EventSourceResponse(stream_events(state, request, pipeline_id, after, _shaper(state, pipeline_id)),
                               ping=15)


def _shaper(state: AppState, pipeline_id: str) -> Any:
    def shape(type_: str, data: dict[str, Any]) -> dict[str, Any]:
        if type_.startswith("step."):
            step = event_step_view(data, state.storage, state.settings.url_ttl_s)
            return {**data, "outputs": step["outputs"]}
        if type_ == "status" and data.get("status") == JobStatus.WAITING.value:
            return {**data, "status": JobStatus.QUEUED.value}
        if type_ == "completed":
            parent = state.jobs.get(None, pipeline_id)
            return {**data, "pipeline": state.pipeline_view(parent, load_steps(state.db, pipeline_id))}
        return data
    return shape
