"""Personal LoRAs: train from uploads, read, list, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from api.db.tables import User
from api.http.deps import current_user, get_state
from api.http.schemas import LoraCreate, lora_view
from api.http.state import AppState
from api.services.loras import TrainingRequest

router = APIRouter(prefix="/v1/loras", tags=["loras"])


@router.post("", status_code=202)
def create_lora(body: LoraCreate, user: User = Depends(current_user), state: AppState = Depends(get_state)) -> dict[str, Any]:
    images = list(body.images or []) + ([body.dataset] if body.dataset else [])
    lora, job = state.loras.create(user, TrainingRequest(
        name=body.name, base_model=body.base_model, images=images, trigger_word=body.trigger_word,
        steps=body.steps, rank=body.rank, learning_rate=body.learning_rate, resolution=body.resolution,
        seed=body.seed))
    return {**lora_view(lora, job, state.storage, state.settings.url_ttl_s), "job": state.job_view(job)}


@router.get("")
def list_loras(user: User = Depends(current_user), state: AppState = Depends(get_state)) -> dict[str, Any]:
    return {"data": [lora_view(lora, job, state.storage, state.settings.url_ttl_s)
                     for lora, job in state.loras.list(user)]}


@router.get("/{lora_id}")
def get_lora(lora_id: str, user: User = Depends(current_user), state: AppState = Depends(get_state)) -> dict[str, Any]:
    lora, job = state.loras.get(user, lora_id)
    return lora_view(lora, job, state.storage, state.settings.url_ttl_s)


@router.delete("/{lora_id}", status_code=204, response_class=Response)
def delete_lora(lora_id: str, user: User = Depends(current_user), state: AppState = Depends(get_state)) -> Response:
    state.loras.delete(user, lora_id)
    return Response(status_code=204)
