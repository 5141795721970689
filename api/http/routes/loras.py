"""Personal LoRAs: train from uploads, read, list, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from api.http.deps import CurrentUser, State
from api.http.schemas import LoraCreate, LoraCreated, LoraList, LoraPublic, error_responses, lora_view
from api.services.loras import TrainingRequest

router = APIRouter(prefix="/v1/loras", tags=["loras"])


@router.post("", status_code=202, response_model=LoraCreated, response_model_exclude_unset=True,
             responses=error_responses(401, 402, 403, 404, 422, 429))
def create_lora(body: LoraCreate, user: CurrentUser, state: State) -> dict[str, Any]:
    images = list(body.images or []) + ([body.dataset] if body.dataset else [])
    lora, job = state.loras.create(user, TrainingRequest(
        name=body.name, base_model=body.base_model, images=images, trigger_word=body.trigger_word,
        steps=body.steps, rank=body.rank, learning_rate=body.learning_rate, resolution=body.resolution,
        seed=body.seed))
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
