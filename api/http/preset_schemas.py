"""Request bodies and answers of the preset routes (``api/http/routes/presets.py``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.db.tables import Preset
from api.http.schemas import Public, iso
from api.services.presets import MAX_PARAMS, MAX_STEPS, public_params, public_steps

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,63}$"


class PresetCreate(BaseModel):
    """A preset's first version. ``params`` and ``steps`` are checked as a whole when saved
    (placeholders name declared params, the steps have the pipeline's shape): 422 otherwise."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    title: str = Field(default="", max_length=200)
    description: str = Field(default="", max_length=2000)
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, max_length=MAX_PARAMS,
                                              description="name -> {type, required, default, min, max, "
                                                          "max_length, values, description}")
    steps: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_STEPS,
                                        description='step templates: {"name", "model" | "op", "input"}; '
                                                    '{"$param": name} and "${name}" placeholders')
    enabled: bool = True


class PresetUpdate(BaseModel):
    """A change of title, description, params or steps adds a version (the fields not sent are
    kept from the newest one). ``enabled`` alone switches ``version`` (or, without it, the whole
    preset) on or off in place."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    params: dict[str, dict[str, Any]] | None = Field(default=None, max_length=MAX_PARAMS)
    steps: list[dict[str, Any]] | None = Field(default=None, min_length=1, max_length=MAX_STEPS)
    enabled: bool | None = None
    version: int | None = Field(default=None, ge=1, description="with enabled only: the version to switch")


class PresetParam(Public):
    type: str
    required: bool
    default: Any = None
    min: float | None = None
    max: float | None = None
    max_length: int | None = None
    values: list[Any] | None = None
    description: str | None = None


class PresetStep(Public):
    name: str
    model: str | None = None
    op: str | None = None
    input: dict[str, Any] | None = Field(default=None, description="the template (admins only)")


class PresetPublic(Public):
    name: str
    version: int
    title: str
    description: str
    params: dict[str, PresetParam]
    steps: list[PresetStep] = Field(description="names and what runs them; admins also see the templates")
    enabled: bool
    created_by: str | None = Field(default=None, description="admins only; null for a shipped preset")
    created_at: str | None = None
    definition: dict[str, Any] | None = Field(default=None, description="admins only: the whole definition")


class PresetList(Public):
    data: list[PresetPublic]


def preset_view(row: Preset, *, admin: bool) -> dict[str, Any]:
    view: dict[str, Any] = {"name": row.name, "version": row.version, "title": row.title,
                            "description": row.description, "params": public_params(row.definition),
                            "enabled": row.enabled, "created_at": iso(row.created_at)}
    if admin:
        view["steps"] = [dict(s) for s in row.definition.get("steps", [])]
        view["definition"] = row.definition
        view["created_by"] = row.created_by
    else:
        view["steps"] = [{k: v for k, v in s.items() if v is not None} for s in public_steps(row.definition)]
    return view
