"""Pipeline presets: named, versioned step templates a client fills with a few parameters.

A preset's ``definition``::

    {"params": {name: {"type": "string" | "number" | "integer" | "enum", "required": bool,
                       "default": ..., "min": ..., "max": ..., "max_length": ...,
                       "values": [v, ...] | {v: {"merge": {step_name: {field: value}}}},
                       "description": "..."}},
     "steps": [{"name": "still", "model": "tiny-sd", "input": {...}},
               {"name": "fx", "op": "interpolate", "input": {...}}]}

Substitution is deliberately tiny, so a preset can never run code nor read attributes:

- a whole value ``{"$param": "duration"}`` becomes the parameter's value (the key is dropped when
  the parameter is optional and has no value);
- ``"${prompt}"`` inside a string is filled by :class:`string.Template` from the declared params
  only (``$$`` is a literal dollar);
- an enum's value may merge input fields into named steps (``"merge": {"still": {...}}``); the
  merged fields are substituted like the rest.

A definition is checked when it is saved (:func:`validate_definition`: params declared, every
placeholder names a declared param, the steps have the pipeline's shape), so a client's submit
only ever meets errors about its own ``params``. :func:`expand` is pure substitution: the
pipeline validator then checks the steps like any others.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from api.core.errors import Conflict, InvalidInput, NotFound
from api.db.engine import Database
from api.db.tables import Preset, utcnow
from api.settings import Settings

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "models" / "presets"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
PARAM_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
STEP_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
PARAM_TYPES = ("string", "number", "integer", "enum")
PARAM_KEYS = {"type", "required", "default", "min", "max", "max_length", "values", "description"}
MAX_PARAMS = 16
MAX_STEPS = 16
MAX_STRING = 2000  # a string param's length when the preset sets no max_length
MAX_DEPTH = 12  # nesting of a step template's values
MAX_DEFINITION_BYTES = 256 * 1024
PATCH_RETRIES = 5  # concurrent PATCHes of one preset: each retry takes the next version number


@dataclass(frozen=True)
class ExpandedPreset:
    name: str
    version: int
    steps: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)  # the values used (defaults filled in)


# ---------------------------------------------------------------------------------------------
# definitions: validation, substitution


def _bad(message: str, field_name: str, **details: Any) -> InvalidInput:
    return InvalidInput(message, {"field": field_name, **details})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _enum_values(spec: dict[str, Any]) -> list[Any]:
    values = spec.get("values")
    return list(values.keys()) if isinstance(values, dict) else list(values or [])


def _check_param_value(name: str, spec: dict[str, Any], value: Any, where: str) -> Any:
    """The value, checked against its declaration (bool is never a number)."""
    kind = spec["type"]
    if kind == "string":
        if not isinstance(value, str):
            raise _bad(f"{name} must be a string", where)
        limit = spec.get("max_length", MAX_STRING)
        if len(value) > limit:
            raise _bad(f"{name} must be at most {limit} characters", where, max_length=limit)
        return value
    if kind == "enum":
        allowed = _enum_values(spec)
        if isinstance(value, bool) or value not in allowed:
            raise _bad(f"{name} must be one of {allowed}", where, allowed=allowed)
        return value
    if kind == "integer":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(f"{name} must be an integer", where)
    elif not _is_number(value):
        raise _bad(f"{name} must be a number", where)
    lo, hi = spec.get("min"), spec.get("max")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise _bad(f"{name} must be between {lo} and {hi}", where, min=lo, max=hi)
    return value


def _check_param_spec(name: str, spec: Any) -> dict[str, Any]:
    where = f"definition.params.{name}"
    if not PARAM_RE.match(name):
        raise _bad(f"parameter name {name!r} must match {PARAM_RE.pattern}", where)
    if not isinstance(spec, dict):
        raise _bad(f"parameter {name} must be an object", where)
    unknown = set(spec) - PARAM_KEYS
    if unknown:
        raise _bad(f"parameter {name}: unknown keys {sorted(unknown)}", where)
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise _bad(f"parameter {name}: type must be one of {PARAM_TYPES}", f"{where}.type")
    if not isinstance(spec.get("required", False), bool):
        raise _bad(f"parameter {name}: required must be true or false", f"{where}.required")
    if not isinstance(spec.get("description", ""), str):
        raise _bad(f"parameter {name}: description must be a string", f"{where}.description")
    for key in ("min", "max"):
        if key in spec and (kind not in ("number", "integer") or not _is_number(spec[key])):
            raise _bad(f"parameter {name}: {key} is a number, for number and integer params", f"{where}.{key}")
    if "min" in spec and "max" in spec and spec["min"] > spec["max"]:
        raise _bad(f"parameter {name}: min is above max", f"{where}.min")
    if "max_length" in spec:
        ml = spec["max_length"]
        if kind != "string" or not isinstance(ml, int) or isinstance(ml, bool) or not 1 <= ml <= MAX_STRING:
            raise _bad(f"parameter {name}: max_length is 1–{MAX_STRING}, for string params", f"{where}.max_length")
    if kind == "enum":
        values = spec.get("values")
        keys = list(values) if isinstance(values, dict) else values
        if not isinstance(keys, list) or not keys or not all(
                isinstance(v, str) or _is_number(v) for v in keys):
            raise _bad(f"parameter {name}: values must be a non-empty list (or object) of strings or numbers",
                       f"{where}.values")
        if isinstance(values, dict):
            for value, extra in values.items():
                if not isinstance(extra, dict) or set(extra) - {"merge"} or not isinstance(
                        extra.get("merge", {}), dict):
                    raise _bad(f"parameter {name}: value {value!r} maps to {{\"merge\": {{step: {{field: ...}}}}}}",
                               f"{where}.values.{value}")
    elif "values" in spec:
        raise _bad(f"parameter {name}: values are for enum params", f"{where}.values")
    if "default" in spec:
        _check_param_value(name, spec, spec["default"], f"{where}.default")
    return spec


def _placeholders(value: Any, where: str, found: list[tuple[str, str]], depth: int = 0) -> None:
    """Collect ``(param, where)`` for every placeholder in a template value; reject bad ``$``."""
    if depth > MAX_DEPTH:
        raise _bad(f"a template nests at most {MAX_DEPTH} levels", where)
    if isinstance(value, dict):
        if "$param" in value:
            if len(value) != 1 or not isinstance(value["$param"], str):
                raise _bad('a placeholder is exactly {"$param": "<name>"}', where)
            found.append((value["$param"], where))
            return
        for key, item in value.items():
            _placeholders(item, f"{where}.{key}", found, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _placeholders(item, f"{where}.{i}", found, depth + 1)
    elif isinstance(value, str):
        template = string.Template(value)
        if not template.is_valid():
            raise _bad("a string may hold ${param} placeholders only (write $$ for a dollar)", where)
        found.extend((name, where) for name in template.get_identifiers())


def _check_step(i: int, step: Any, names: set[str]) -> None:
    where = f"definition.steps.{i}"
    if not isinstance(step, dict):
        raise _bad("a step is an object", where)
    unknown = set(step) - {"name", "model", "op", "input"}
    if unknown:
        raise _bad(f"step: unknown keys {sorted(unknown)}", where)
    name = step.get("name")
    if not isinstance(name, str) or not STEP_NAME_RE.match(name):
        raise _bad(f"step name must match {STEP_NAME_RE.pattern}", f"{where}.name")
    if name in names:
        raise _bad(f"step name {name!r} is used twice", f"{where}.name")
    names.add(name)
    if ("model" in step) == ("op" in step):
        raise _bad("a step names exactly one of model or op", where)
    target = step.get("model", step.get("op"))
    if not isinstance(target, str) or not target:
        raise _bad("model / op is a non-empty string", where)
    if not isinstance(step.get("input", {}), dict):
        raise _bad("a step's input is an object", f"{where}.input")


def validate_definition(definition: Any, *, prefix: str = "definition") -> dict[str, Any]:
    """Check a definition as it is saved (422 ``invalid_input`` with ``details.field``, e.g.
    ``definition.steps.0.name``; ``prefix=""``: ``steps.0.name``, as a body with params and steps)."""
    try:
        return _validate_definition(definition)
    except InvalidInput as exc:
        where = str(exc.details.get("field", ""))
        if prefix != "definition" and (where == "definition" or where.startswith("definition.")):
            rest = where[len("definition"):].lstrip(".")
            exc.details["field"] = ".".join(p for p in (prefix, rest) if p) or "body"
        raise


def _validate_definition(definition: Any) -> dict[str, Any]:
    if not isinstance(definition, dict) or set(definition) - {"params", "steps"}:
        raise _bad("a definition is {\"params\": {...}, \"steps\": [...]}", "definition")
    try:  # what the JSON column will hold: finite numbers only, and bounded
        size = len(json.dumps(definition, allow_nan=False))
    except (ValueError, TypeError, RecursionError):
        raise _bad("a definition is plain JSON with finite numbers", "definition") from None
    if size > MAX_DEFINITION_BYTES:
        raise _bad(f"a definition is at most {MAX_DEFINITION_BYTES} bytes of JSON", "definition")
    params = definition.get("params", {})
    steps = definition.get("steps")
    if not isinstance(params, dict) or len(params) > MAX_PARAMS:
        raise _bad(f"params is an object of at most {MAX_PARAMS} parameters", "definition.params")
    for name, spec in params.items():
        _check_param_spec(name, spec)
    if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_STEPS:
        raise _bad(f"steps is a list of 1–{MAX_STEPS} steps", "definition.steps")
    names: set[str] = set()
    for i, step in enumerate(steps):
        _check_step(i, step, names)
    found: list[tuple[str, str]] = []
    _placeholders(steps, "definition.steps", found)
    for pname, spec in params.items():
        values = spec.get("values")
        if isinstance(values, dict):
            for value, extra in values.items():
                for step_name, fields in extra.get("merge", {}).items():
                    where = f"definition.params.{pname}.values.{value}.merge.{step_name}"
                    if step_name not in names:
                        raise _bad(f"merge names an unknown step {step_name!r}", where)
                    if not isinstance(fields, dict):
                        raise _bad("merge maps a step to an object of input fields", where)
                    _placeholders(fields, where, found)
    for pname, where in found:
        if pname not in params:
            raise _bad(f"placeholder refers to an undeclared parameter {pname!r}", where)
    # the defaults (and a sample for each required param) expand to steps of the same shape
    sample = {n: s.get("default", _sample(s)) for n, s in params.items()}
    expanded = _substitute(definition, sample)
    for i, step in enumerate(expanded):
        _check_step(i, step, set())
    return definition


def _sample(spec: dict[str, Any]) -> Any:
    if spec["type"] == "enum":
        return _enum_values(spec)[0]
    if spec["type"] == "string":
        return "x"
    return spec.get("min", spec.get("max", 1))


_MISSING = object()


def _fill(value: Any, values: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$param"}:
            return values.get(value["$param"], _MISSING)
        out = {}
        for key, item in value.items():
            filled = _fill(item, values)
            if filled is not _MISSING:
                out[key] = filled
        return out
    if isinstance(value, list):
        return [f for f in (_fill(item, values) for item in value) if f is not _MISSING]
    if isinstance(value, str):
        mapping = {k: ("" if v is None else str(v)) for k, v in values.items()}
        return string.Template(value).substitute(_Declared(mapping))
    return value


class _Declared(dict):  # type: ignore[type-arg]
    """Template mapping: a declared param without a value reads as the empty string."""

    def __missing__(self, key: str) -> str:
        return ""


def _substitute(definition: dict[str, Any], values: dict[str, Any]) -> list[dict[str, Any]]:
    """Steps with the enum merges applied and every placeholder filled (``values``: checked)."""
    steps = copy.deepcopy(definition["steps"])
    by_name = {step["name"]: step for step in steps}
    for pname, spec in definition.get("params", {}).items():
        mapping = spec.get("values")
        if spec["type"] != "enum" or not isinstance(mapping, dict) or pname not in values:
            continue
        for step_name, fields in (mapping.get(values[pname]) or {}).get("merge", {}).items():
            by_name[step_name].setdefault("input", {}).update(copy.deepcopy(fields))
    declared = {n: values.get(n) for n in definition.get("params", {})}
    present = {n: v for n, v in declared.items() if v is not None}
    out = []
    for step in steps:
        step = dict(step)
        filled = _fill(step.get("input", {}), present)
        step["input"] = {} if filled is _MISSING else filled
        out.append(step)
    return out


def resolve_params(definition: dict[str, Any], params: Any) -> dict[str, Any]:
    """The client's params checked (``details.field = "params.<name>"``), defaults filled in."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _bad("params must be an object", "params")
    declared = definition.get("params", {})
    for name in params:
        if name not in declared:
            raise _bad(f"unknown parameter {name!r} (parameters: {sorted(declared)})", f"params.{name}")
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        if name in params and params[name] is not None:
            values[name] = _check_param_value(name, spec, params[name], f"params.{name}")
        elif "default" in spec:
            values[name] = spec["default"]
        elif spec.get("required"):
            raise _bad(f"parameter {name} is required", f"params.{name}")
    return values


def public_params(definition: dict[str, Any]) -> dict[str, Any]:
    """The parameter schema a client sees (an enum's values without their merges)."""
    out: dict[str, Any] = {}
    for name, spec in definition.get("params", {}).items():
        view: dict[str, Any] = {"type": spec["type"], "required": bool(spec.get("required", False))}
        for key in ("default", "min", "max", "max_length", "description"):
            if key in spec:
                view[key] = spec[key]
        if spec["type"] == "enum":
            view["values"] = _enum_values(spec)
        out[name] = view
    return out


def public_steps(definition: dict[str, Any]) -> list[dict[str, Any]]:
    """What a non-admin sees of the steps: names and what runs them, not the templates."""
    return [{"name": s["name"], "model": s.get("model"), "op": s.get("op")} for s in definition.get("steps", [])]


# ---------------------------------------------------------------------------------------------
# rows


def _newest(session: Session, name: str, *, enabled_only: bool = True) -> Preset | None:
    query = select(Preset).where(Preset.name == name)
    if enabled_only:
        query = query.where(Preset.enabled.is_(True))
    return session.execute(query.order_by(Preset.version.desc()).limit(1)).scalars().first()


def expand(session: Session, name: str, params: dict[str, Any] | None) -> ExpandedPreset:
    """The newest enabled version of ``name`` filled with ``params``.

    Unknown (or wholly disabled) preset: 404 ``not_found`` (``details.field = "preset"``); a
    missing required, an unknown or an out-of-bounds param: 422 with ``details.field = "params.<name>"``.
    """
    row = _newest(session, name) if isinstance(name, str) else None
    if row is None:
        raise NotFound(f"preset {name} not found", {"field": "preset"})
    values = resolve_params(row.definition, params)
    return ExpandedPreset(name=row.name, version=row.version, steps=_substitute(row.definition, values),
                          params=values)


def load_shipped(directory: Path | None = None, profile: str = "tiny") -> list[dict[str, Any]]:
    """The shipped presets for a profile: ``{name, title, description, definition}`` each.

    A YAML file holds ``name``, ``title``, ``description``, shared ``params`` and ``profiles``
    (``tiny``, ``production``): each profile's ``params`` override the shared ones by name and its
    ``steps`` are the templates."""
    out = []
    for path in sorted((directory or SHIPPED_DIR).glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        profiles = raw.get("profiles") or {}
        if profile not in profiles:
            raise ValueError(f"{path}: no profile {profile!r} (has {sorted(profiles)})")
        chosen = profiles[profile] or {}
        definition = {"params": {**(raw.get("params") or {}), **(chosen.get("params") or {})},
                      "steps": chosen.get("steps") or []}
        try:
            validate_definition(definition)
        except InvalidInput as exc:
            raise ValueError(f"{path} ({profile}): {exc.message} at {exc.details.get('field')}") from None
        out.append({"name": raw["name"], "title": raw.get("title", ""), "description": raw.get("description", ""),
                    "definition": definition})
    return out


class PresetService:
    def __init__(self, db: Database, settings: Settings, directory: Path | None = None,
                 *, prefix: str = "definition") -> None:
        """``prefix``: how error fields name the definition (the HTTP layer, whose body has
        ``params`` and ``steps`` at the top, passes ``""``)."""
        self.db = db
        self.settings = settings
        self.directory = directory
        self.prefix = prefix

    def list(self, *, include_disabled: bool = False) -> list[Preset]:
        """The newest (enabled, unless ``include_disabled``) version of each preset, by name."""
        with self.db.read() as session:
            query = select(Preset.name, func.max(Preset.version))
            if not include_disabled:
                query = query.where(Preset.enabled.is_(True))
            newest = session.execute(query.group_by(Preset.name)).all()
            rows = [session.execute(select(Preset).where(Preset.name == n, Preset.version == v)).scalars().one()
                    for n, v in newest]
        return sorted(rows, key=lambda p: p.name)

    def get(self, name: str, *, version: int | None = None, include_disabled: bool = False) -> Preset:
        with self.db.read() as session:
            if version is not None:
                row = session.execute(select(Preset).where(Preset.name == name, Preset.version == version)
                                      ).scalars().first()
                if row is not None and not row.enabled and not include_disabled:
                    row = None
            else:
                row = _newest(session, name, enabled_only=not include_disabled)
        if row is None:
            raise NotFound(f"preset {name} not found", {"field": "name"})
        return row

    def create(self, *, name: str, definition: dict[str, Any], title: str = "", description: str = "",
               enabled: bool = True, created_by: str | None = None) -> Preset:
        if not NAME_RE.match(name):
            raise _bad(f"name must match {NAME_RE.pattern}", "name")
        validate_definition(definition, prefix=self.prefix)
        row = Preset(name=name, version=1, title=title, description=description, definition=definition,
                     enabled=enabled, created_by=created_by)
        with self.db.session() as session:
            if session.execute(select(Preset.id).where(Preset.name == name).limit(1)).first() is not None:
                raise Conflict(f"preset {name} exists (PATCH it to add a version)", {"field": "name"})
            session.add(row)
            try:
                session.commit()
            except IntegrityError:  # another admin created it at the same moment
                session.rollback()
                raise Conflict(f"preset {name} exists (PATCH it to add a version)", {"field": "name"}) from None
        logger.info("preset %s created", name)
        return row

    def patch(self, name: str, *, changes: dict[str, Any], created_by: str | None = None) -> Preset:
        """Changed title/description/params/steps (or a whole ``definition``): a new version (n+1)
        from the newest one, the fields not sent kept. The new definition is checked first.

        Only ``enabled`` (with an optional ``version``): that version, or every version of the
        preset when none is named, is switched on or off in place (no new version)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        version = changes.pop("version", None)
        if "definition" in changes:
            validate_definition(changes["definition"], prefix=self.prefix)
        content = {k: changes[k] for k in ("title", "description", "definition", "params", "steps") if k in changes}
        if not content:
            return self._toggle(name, changes.get("enabled"), version)
        if version is not None:
            raise _bad("version names the version to switch on or off; a change always adds a version",
                       "version")
        for _ in range(PATCH_RETRIES):
            with self.db.session() as session:
                base = _newest(session, name, enabled_only=False)
                if base is None:
                    raise NotFound(f"preset {name} not found", {"field": "name"})
                definition = content.get("definition", base.definition)
                if "params" in content or "steps" in content:
                    definition = {"params": content.get("params", definition.get("params", {})),
                                  "steps": content.get("steps", definition.get("steps", []))}
                    validate_definition(definition, prefix=self.prefix)
                row = Preset(name=name, version=base.version + 1,
                             title=content.get("title", base.title),
                             description=content.get("description", base.description),
                             definition=definition, enabled=changes.get("enabled", True), created_by=created_by)
                session.add(row)
                try:
                    session.commit()
                except IntegrityError:  # a concurrent PATCH took that version number
                    session.rollback()
                    continue
            logger.info("preset %s: version %d", name, row.version)
            return row
        raise Conflict(f"preset {name} is being changed concurrently; retry", {"field": "name"})

    def _toggle(self, name: str, enabled: bool | None, version: int | None) -> Preset:
        with self.db.session() as session:
            if _newest(session, name, enabled_only=False) is None:
                raise NotFound(f"preset {name} not found", {"field": "name"})
            if enabled is not None:
                query = update(Preset).where(Preset.name == name)
                if version is not None:
                    query = query.where(Preset.version == version)
                if session.execute(query.values(enabled=enabled)).rowcount == 0:
                    raise NotFound(f"preset {name} has no version {version}", {"field": "version"})
                session.commit()
            if version is not None:
                row = session.execute(select(Preset).where(Preset.name == name, Preset.version == version)
                                      ).scalars().first()
                if row is None:
                    raise NotFound(f"preset {name} has no version {version}", {"field": "version"})
                return row
            newest = _newest(session, name, enabled_only=False)
            assert newest is not None
            return newest

    def seed(self) -> int:
        return seed(self.db, self.settings, self.directory)


def seed(db: Database, settings: Settings, directory: Path | None = None) -> int:
    """Insert the shipped presets of ``settings.preset_profile`` as version 1 where no row of the
    name exists (an admin's versions win). Idempotent; two processes starting at once both try,
    and the unique (name, version) lets one win. Returns how many were inserted."""
    shipped = load_shipped(directory, getattr(settings, "preset_profile", "tiny"))
    inserted = 0
    for item in shipped:
        with db.session() as session:
            exists = session.execute(select(Preset.id).where(Preset.name == item["name"]).limit(1)).first()
            if exists is not None:
                continue
            session.add(Preset(name=item["name"], version=1, title=item["title"],
                               description=item["description"], definition=item["definition"],
                               enabled=True, created_by=None, created_at=utcnow()))
            try:
                session.commit()
                inserted += 1
            except IntegrityError:  # another process seeded it first
                session.rollback()
    if inserted:
        logger.info("seeded %d shipped presets (%s profile)", inserted, getattr(settings, "preset_profile", "tiny"))
    return inserted
