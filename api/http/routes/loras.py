"""Personal LoRAs: train from uploads, read, list, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from api.http.deps import CurrentUser, State
from api.http.schemas import (
    LoraCreate,
    LoraCreated,
    LoraList,
    LoraPublic,
    LoraQuote,
    error_responses,
    lora_view,
)
from api.services.loras import TrainingRequest

router = APIRouter(prefix="/v1/loras", tags=["loras"])


def training_request(body: LoraCreate) -> TrainingRequest:
    images = list(body.images or []) + ([body.dataset] if body.dataset else [])
    return TrainingRequest(name=body.name, base_model=body.base_model, images=images,
                           trigger_word=body.trigger_word, steps=body.steps, rank=body.rank,
                           learning_rate=body.learning_rate, resolution=body.resolution, seed=body.seed)


@router.post("/quote", response_model=LoraQuote, responses=error_responses(401, 403, 422))
def quote_lora(body: LoraCreate, user: CurrentUser, state: State) -> dict[str, Any]:
    """Validate and price a ``POST /v1/loras`` body without training: nothing is created or reserved.
    The images may be left out (the price depends on the base model and the steps)."""
    quote = state.loras.quote(user, training_request(body))
    return {"base_model": quote.base_model, "steps": quote.steps, "resolution": quote.resolution,
            "images": quote.images, "credits": quote.price, "affordable": quote.affordable,
            "balance": {"available": quote.balance.available, "reserved": quote.balance.reserved,
                        "debt": quote.debt}}


@router.post("", status_code=202, response_model=LoraCreated, response_model_exclude_unset=True,
             responses=error_responses(401, 402, 403, 404, 422, 429))
def create_lora(body: LoraCreate, user: CurrentUser, state: State) -> dict[str, Any]:
    lora, job = state.loras.create(user, training_request(body))
    return {**lora_view(lora, job, state.storage, state.settings.url_ttl_s), "job": state.job_view(job, state.queue.estimate(job))}


@router.get("", response_model=LoraList, response_model_exclude_unset=True, responses=error_responses(401, 403))
def list_loras(user: CurrentUser, state: State) -> dict[str, Any]:
    return {"data": [lora_view(lora, job, state.storage, state.settings.url_ttl_s)
                     for lora, job in state.loras.list(user)]}


@router.get("/{lora_id}", response_model=LoraPublic, response_model_exclude_unset=True,
            responses=error_responses(401, 403, 404))
def get_lora(lora_id: str, user: CurrentUser, state: State) -> dict[str, Any]:
    lora, job = state.loras.get(user, lora_id)
    return lora_view(lora, job, state.storage, state.settings.url_ttl_s)


@router.delete("/{lora_id}", status_code=204, response_class=Response, responses=error_responses(401, 403, 404))
def delete_lora(lora_id: str, user: CurrentUser, state: State) -> Response:
    state.loras.delete(user, lora_id)
    return Response(status_code=204)
