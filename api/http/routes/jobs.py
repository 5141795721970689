"""Jobs: submit, list, read, cancel, delete outputs, follow (SSE)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from api.core.aio import wait_event
from api.core.jobs import JobStatus
from api.http.deps import CurrentUser, State
from api.http.schemas import JobCreate, JobList, JobPublic, JobQuote, QueueUpdate, error_responses
from api.http.state import AppState
from api.services.events import events_after
from api.services.jobs import Submission
from api.services.queue import QueueEstimate
from api.services.teams import TEAM_HEADER, one_team

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SSE_MAX_STREAM_S = 3600.0
READ_ERRORS = error_responses(401, 403, 404, 422)


@router.post("", status_code=202, response_model=JobPublic, response_model_exclude_unset=True,
             responses=error_responses(401, 402, 403, 404, 409, 422, 429))
def create_job(body: JobCreate, response: Response, user: CurrentUser, state: State,
               idempotency_key: str | None = Header(default=None, alias="Idempotency-Key"),
               x_team: str | None = Header(default=None, alias=TEAM_HEADER, max_length=64,
                                           description="submit as this team (like the body's team)")) -> dict[str, Any]:
    job, created = state.jobs.submit(user, Submission(body.model, body.input, body.webhook,
                                                      body.webhook_events_filter,
                                                      team=one_team(body.team, x_team), project=body.project),
                                     idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return state.job_view(job, state.queue.estimate(job))


@router.post("/quote", response_model=JobQuote, responses=error_responses(401, 403, 404, 422))
def quote_job(body: JobCreate, user: CurrentUser, state: State,
              x_team: str | None = Header(default=None, alias=TEAM_HEADER, max_length=64)) -> dict[str, Any]:
    """Validate and price a ``POST /v1/jobs`` body without creating a job: no credit moves and no
    limit counts it. The same checks answer the same errors."""
    quote = state.jobs.quote(user, Submission(body.model, body.input, body.webhook, body.webhook_events_filter,
                                              team=one_team(body.team, x_team)))
    checked = quote.checked
    return {"model": checked.spec.id, "kind": checked.spec.kind, "task": checked.task, "credits": checked.price,
            "input": checked.input, "affordable": quote.affordable, "reason": quote.reason,
            "balance": {"available": quote.balance.available, "reserved": quote.balance.reserved,
                        "debt": quote.debt}}


@router.get("", response_model=JobList, response_model_exclude_unset=True, responses=READ_ERRORS)
def list_jobs(user: CurrentUser, state: State,
              status: str | None = Query(default=None, description="comma-separated statuses"),
              kind: str | None = Query(default=None, pattern="^(image|video|training|pipeline)$"),
              model: str | None = Query(default=None, max_length=64),
              cursor: str | None = Query(default=None, max_length=200),
              limit: int = Query(default=20, ge=1, le=100),
              team: str | None = Query(default=None, max_length=64, description="a team's jobs instead of yours"),
              project: str | None = Query(default=None, max_length=64, description="only this project's jobs"),
              x_team: str | None = Header(default=None, alias=TEAM_HEADER, max_length=64)) -> dict[str, Any]:
    jobs, next_cursor = state.jobs.list(user, status=status, kind=kind, model=model, cursor=cursor, limit=limit,
                                        team=one_team(team, x_team), project=project)
    queue = state.queue.estimates(jobs)  # one computation for the whole page
    return {"data": [state.job_view(j, queue.get(j.id)) for j in jobs], "next_cursor": next_cursor}


@router.get("/{job_id}", response_model=JobPublic, response_model_exclude_unset=True, responses=READ_ERRORS)
def get_job(job_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    job = state.jobs.get(user, job_id)
    return state.job_view(job, state.queue.estimate(job))


@router.post("/{job_id}/cancel", response_model=JobPublic, response_model_exclude_unset=True,
             responses=READ_ERRORS)
def cancel_job(job_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    return state.job_view(state.jobs.cancel(user, job_id))


@router.delete("/{job_id}", response_model=JobPublic, response_model_exclude_unset=True,
               responses=error_responses(401, 403, 404, 409, 422))
def delete_job(job_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    return state.job_view(state.jobs.delete_outputs(user, job_id))


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "events: status, start, progress, output, logs, queue "
                                            "(data: QueueUpdate, while queued), preview (no id, never "
                                            "replayed: step, total, image as a JPEG data URL, width, "
                                            "height), completed"},
                       **READ_ERRORS})
async def job_events(job_id: str, request: Request, user: CurrentUser, state: State,
                     last_event_id: str | None = Header(default=None, alias="Last-Event-ID")) -> EventSourceResponse:
    """Server-sent events: every stored event after ``Last-Event-ID``, then live ones, until done.
    While the job is queued, a ``queue`` event (no id) tells its position and ETA when they change."""
    await run_in_threadpool(state.jobs.get, user, job_id)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return EventSourceResponse(_stream(state, request, job_id, after), ping=15)


def queue_changed(last: QueueEstimate | None, now: QueueEstimate) -> bool:
    """A ``queue`` event is worth sending: the position moved, or the ETA appeared, vanished or
    moved by more than max(2 s, 10 %) (not on every second it counts down)."""
    if last is None or last.queue_position != now.queue_position:
        return True
    if (last.eta_s is None) != (now.eta_s is None):
        return True
    if last.eta_s is None or now.eta_s is None:
        return False
    return abs(now.eta_s - last.eta_s) >= max(2.0, 0.1 * last.eta_s)


EventShaper = Callable[[str, dict[str, Any]], dict[str, Any]]
"""Turns a stored event's data into what a stream sends (run in a worker thread: it may read)."""


async def _stream(state: AppState, request: Request, job_id: str, after: int,
                  shape: EventShaper | None = None) -> AsyncIterator[dict[str, Any]]:
    """The job's events after ``after``, then live ones, until its ``completed`` (bounded).
    ``shape`` (the pipelines' stream) replaces the default: ``completed`` carrying the job view.

    The table is read on the first pass, after a stored change was announced (this process's bus
    or another's NOTIFY) and on the safety poll; a wake by a step preview alone sends the preview
    without a read. One worker-thread hop per read, the final job view included."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SSE_MAX_STREAM_S

    def fetch(last: int) -> tuple[list[Any], dict[str, Any] | None]:
        with state.db.read() as session:
            events = events_after(session, job_id, last)
        view = None
        if shape is None and any(event.type == "completed" for event in events):
            view = state.job_view(state.jobs.get(None, job_id))
        return events, view

    def queue_estimate() -> QueueEstimate | None:
        job = state.jobs.get(None, job_id)
        return state.queue.estimate(job) if job.status == JobStatus.QUEUED.value else None

    sent: QueueEstimate | None = None
    quiet = False
    read = True  # the first pass reads what is stored
    preview_after = state.bus.preview_seq()  # previews are live only: none from before this stream
    waiter = state.bus.waiter(job_id)  # registered before the first read: nothing after it is missed
    try:
        while loop.time() < deadline:
            changed = waiter.take_change()  # before the read: a change landing during it wakes again
            if read or changed:
                events, view = await run_in_threadpool(fetch, after)
                for event in events:
                    after = event.id
                    data = dict(event.data)
                    if shape is not None:
                        data = await run_in_threadpool(shape, event.type, data)
                    if event.type == "completed":
                        # a preview still pending goes first: after the terminal event the stream ends
                        preview = state.bus.preview(job_id, preview_after)
                        if preview is not None:
                            preview_after = preview[0]
                            yield {"event": "preview", "data": json.dumps(preview[1])}
                        if view is not None:
                            data["job"] = view
                    yield {"id": str(event.id), "event": event.type, "data": json.dumps(data)}
                    if event.type == "completed":
                        return
            preview = state.bus.preview(job_id, preview_after)
            if preview is not None:  # the newest only (never stored: no id, not replayed)
                preview_after = preview[0]
                yield {"event": "preview", "data": json.dumps(preview[1])}
            if quiet:
                # a poll found nothing new for this job: if it is still waiting, where is it? (the
                # jobs ahead of it move without waking this stream; a job claimed at once never
                # gets a queue event)
                estimate = await run_in_threadpool(queue_estimate)
                if estimate is not None and queue_changed(sent, estimate):
                    sent = estimate
                    update = QueueUpdate(queue_position=estimate.queue_position, eta_s=estimate.eta_s)
                    yield {"event": "queue", "data": update.model_dump_json()}
            if await request.is_disconnected():
                return
            # woken by this process's bus or by another process's NOTIFY; the poll is a safety net
            quiet = not await wait_event(waiter, state.settings.sse_poll_s)
            read = quiet
    finally:
        state.bus.release(job_id, waiter)
