"""Presets: named pipeline templates. Everyone reads them (the parameter schema and which models
and operations run); admins create them and change them (each change is a new version)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from api.http.deps import AdminCaller, CurrentCaller, State
from api.http.preset_schemas import PresetCreate, PresetList, PresetPublic, PresetUpdate, preset_view
from api.http.schemas import error_responses

router = APIRouter(prefix="/v1/presets", tags=["presets"])

READ = error_responses(401, 403, 404, 422)
CHANGE = error_responses(401, 403, 404, 409, 422)


@router.get("", response_model=PresetList, response_model_exclude_unset=True, responses=READ)
def list_presets(caller: CurrentCaller, state: State,
                 include_disabled: bool = Query(default=False, description="admins: disabled presets too")
                 ) -> dict[str, Any]:
    rows = state.presets.list(include_disabled=include_disabled and caller.is_admin)
    return {"data": [preset_view(r, admin=caller.is_admin) for r in rows]}


@router.get("/{name}", response_model=PresetPublic, response_model_exclude_unset=True, responses=READ)
def get_preset(name: str, caller: CurrentCaller, state: State,
               version: int | None = Query(default=None, ge=1),
               include_disabled: bool = Query(default=False, description="admins: a disabled version too")
               ) -> dict[str, Any]:
    row = state.presets.get(name, version=version, include_disabled=include_disabled and caller.is_admin)
    return preset_view(row, admin=caller.is_admin)


@router.post("", status_code=201, response_model=PresetPublic, response_model_exclude_unset=True, responses=CHANGE)
def create_preset(body: PresetCreate, admin: AdminCaller, state: State) -> dict[str, Any]:
    row = state.presets.create(name=body.name, title=body.title, description=body.description,
                               definition={"params": body.params, "steps": body.steps}, enabled=body.enabled,
                               created_by=admin.id if admin is not None else "admin")
    return preset_view(row, admin=True)


@router.patch("/{name}", response_model=PresetPublic, response_model_exclude_unset=True, responses=CHANGE)
def update_preset(name: str, body: PresetUpdate, admin: AdminCaller, state: State) -> dict[str, Any]:
    row = state.presets.patch(name, changes=body.model_dump(exclude_none=True),
                              created_by=admin.id if admin is not None else "admin")
    return preset_view(row, admin=True)
