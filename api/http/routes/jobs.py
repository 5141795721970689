"""Jobs: submit, list, read, cancel, delete outputs, follow (SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from api.db.tables import User
from api.http.deps import current_user, get_state
from api.http.schemas import JobCreate
from api.http.state import AppState
from api.services.events import events_after
from api.services.jobs import Submission

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SSE_MAX_STREAM_S = 3600.0


@router.post("", status_code=202)
def create_job(body: JobCreate, response: Response, user: User = Depends(current_user),
               state: AppState = Depends(get_state),
               idempotency_key: str | None = Header(default=None, alias="Idempotency-Key")) -> dict[str, Any]:
    job, created = state.jobs.submit(user, Submission(body.model, body.input, body.webhook,
                                                      body.webhook_events_filter), idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return state.job_view(job)


@router.get("")
def list_jobs(user: User = Depends(current_user), state: AppState = Depends(get_state),
              status: str | None = Query(default=None, description="comma-separated statuses"),
              kind: str | None = Query(default=None, pattern="^(image|video|training)$"),
              model: str | None = Query(default=None, max_length=64),
              cursor: str | None = Query(default=None, max_length=200),
              limit: int = Query(default=20, ge=1, le=100)) -> dict[str, Any]:
    jobs, next_cursor = state.jobs.list(user, status=status, kind=kind, model=model, cursor=cursor, limit=limit)
    return {"data": [state.job_view(j) for j in jobs], "next_cursor": next_cursor}


@router.get("/{job_id}")
def get_job(job_id: str, user: User = Depends(current_user), state: AppState = Depends(get_state)) -> dict[str, Any]:
    return state.job_view(state.jobs.get(user, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, user: User = Depends(current_user),
               state: AppState = Depends(get_state)) -> dict[str, Any]:
    return state.job_view(state.jobs.cancel(user, job_id))


@router.delete("/{job_id}")
def delete_job(job_id: str, user: User = Depends(current_user),
               state: AppState = Depends(get_state)) -> dict[str, Any]:
    return state.job_view(state.jobs.delete_outputs(user, job_id))


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, request: Request, user: User = Depends(current_user),
                     state: AppState = Depends(get_state),
                     last_event_id: str | None = Header(default=None, alias="Last-Event-ID")) -> EventSourceResponse:
    """Server-sent events: every stored event after ``Last-Event-ID``, then live ones, until done."""
    await run_in_threadpool(state.jobs.get, user, job_id)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return EventSourceResponse(_stream(state, request, job_id, after), ping=15)


async def _stream(state: AppState, request: Request, job_id: str, after: int) -> AsyncIterator[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SSE_MAX_STREAM_S

    def fetch(last: int) -> list[Any]:
        with state.db.read() as session:
            return events_after(session, job_id, last)

    while loop.time() < deadline:
        waiter = state.bus.waiter(job_id)
        try:
            for event in await run_in_threadpool(fetch, after):
                after = event.id
                data = dict(event.data)
                if event.type == "completed":
                    job = await run_in_threadpool(state.jobs.get, None, job_id)
                    data["job"] = state.job_view(job)
                yield {"id": str(event.id), "event": event.type, "data": json.dumps(data)}
                if event.type == "completed":
                    return
            if await request.is_disconnected():
                return
            with contextlib.suppress(TimeoutError):
                # woken by this process's bus or by another process's NOTIFY; the poll is a safety net
                await asyncio.wait_for(waiter.wait(), timeout=state.settings.sse_poll_s)
        finally:
            state.bus.release(job_id, waiter)
