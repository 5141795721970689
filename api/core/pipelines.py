"""Pipelines, the pure part: a list of steps checked and priced before anything runs.

A pipeline is an ordered list of steps. Each is a generation (``{"name", "model", "input"}``, any
catalog model, its input as ``POST /v1/jobs`` takes it) or a post-processing operation
(``{"name", "op", "input"}``, :mod:`models.postprocess`). An input field may name another step's
output (``"image": "step:still"``, ``"videos": ["step:a", "step:b"]``).

This module parses the list (shape, names, references), orders it (a reference runs first; a
cycle or an unknown step is refused), and plans it: the :class:`~models.postprocess.MediaInfo`
each step outputs (generation: from its normalized input; operation: ``infer_output``) is checked
against the kinds the steps that take it accept, and each step gets its price. What needs the
database or the catalog (a generation's own checks, an upload's size, the operation catalog's
prices) comes through the :class:`StepChecker` the service passes in; nothing here imports
fastapi, ray, torch or the database.

Every error is an :class:`~api.core.errors.InvalidInput` (422) whose details carry ``step`` (its
name) and ``field``; codes: ``pipeline_unknown_step``, ``pipeline_cycle``,
``pipeline_kind_mismatch``, ``pipeline_too_many_steps``, else the step's own (``invalid_input``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from api.core.errors import CineWeaveError, InvalidInput
from api.core.requests import UPSCALE_FACTOR

if TYPE_CHECKING:
    from models.postprocess import MediaInfo

STEP_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
STEP_REF = "step:"
POSTPROCESS_MODEL = "postprocess"  # the ``model`` of a post-processing step's job
# the input fields of a generation that may name an earlier step, and the kinds they take
GENERATION_REF_FIELDS: dict[str, str] = {"image": "image"}
# an operation's side inputs (not the clip it works on): passed to infer_output as ``overlay``
OPTIONAL_REF_FIELDS = frozenset({"overlay"})
_STEP_KEYS = frozenset({"name", "model", "op", "input"})

UNKNOWN_STEP = "pipeline_unknown_step"
CYCLE = "pipeline_cycle"
KIND_MISMATCH = "pipeline_kind_mismatch"
TOO_MANY_STEPS = "pipeline_too_many_steps"
UPSCALER_UNAVAILABLE = "upscaler_unavailable"


def _postprocess() -> Any:
    """:mod:`models.postprocess`, imported when first needed (it is pure: pydantic, no ffmpeg run)."""
    import models.postprocess as postprocess

    return postprocess


def step_error(message: str, step: str | None, field_: str | None, code: str = "invalid_input",
               **details: Any) -> InvalidInput:
    return InvalidInput(message, {"step": step, "field": field_, **details}, code=code)


def is_step_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(STEP_REF)


def accepts(kinds: str, kind: str) -> bool:
    """Whether a field of ``kinds`` (``"video"``, ``"image|video"``, ``"video[]"``) takes ``kind``."""
    return kind in kinds.removesuffix("[]").split("|")


@dataclass(frozen=True)
class Step:
    """One submitted step, parsed (not yet checked against its model or operation)."""

    name: str
    index: int  # its position in the submitted list
    model: str | None  # a generation: the catalog id
    op: str | None  # a post-processing operation
    input: dict[str, Any]
    refs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # field -> steps named there

    @property
    def depends_on(self) -> tuple[str, ...]:
        """The steps whose outputs this one takes, once each, in the order they appear."""
        seen: dict[str, None] = {}
        for names in self.refs.values():
            for name in names:
                seen.setdefault(name, None)
        return tuple(seen)

    @property
    def is_generation(self) -> bool:
        return self.model is not None


def ref_fields(step: Step) -> dict[str, str]:
    """The step's input fields that are references, and the kinds each takes."""
    if step.is_generation:
        return dict(GENERATION_REF_FIELDS)
    return dict(_postprocess().input_fields(step.op))


def parse_steps(raw: Any, max_steps: int) -> list[Step]:
    """The steps of a submission, in submitted order: shape, names, references, order checked."""
    if not isinstance(raw, list) or not raw:
        raise step_error("steps must be a non-empty list", None, "steps")
    if len(raw) > max_steps:
        raise step_error(f"a pipeline has at most {max_steps} steps ({len(raw)} given)", None, "steps",
                         TOO_MANY_STEPS, max=max_steps)
    steps: list[Step] = []
    names: set[str] = set()
    for index, item in enumerate(raw):
        step = _parse_step(item, index)
        if step.name in names:
            raise step_error(f"step name {step.name!r} is used twice", step.name, "name")
        names.add(step.name)
        steps.append(step)
    for step in steps:
        for field_, refs in step.refs.items():
            for name in refs:
                if name not in names:
                    raise step_error(f"step {step.name!r}: input.{field_} names an unknown step {name!r}",
                                     step.name, field_, UNKNOWN_STEP, ref=name)
    topological_order(steps)  # raises on a cycle
    return steps


def _parse_step(item: Any, index: int) -> Step:
    if not isinstance(item, dict):
        raise step_error(f"steps[{index}] must be an object", None, f"steps[{index}]")
    name = item.get("name")
    if not isinstance(name, str) or not STEP_NAME.match(name):
        raise step_error(f"steps[{index}].name must match {STEP_NAME.pattern}", None, "name", index=index)
    unknown = sorted(set(item) - _STEP_KEYS)
    if unknown:
        raise step_error(f"step {name!r}: unknown keys {unknown}", name, unknown[0])
    model, op = item.get("model"), item.get("op")
    if (model is None) == (op is None):
        raise step_error(f"step {name!r} needs exactly one of model (a generation) or op (an operation)",
                         name, "model")
    if model is not None and (not isinstance(model, str) or not model):
        raise step_error(f"step {name!r}: model must be a model id", name, "model")
    if op is not None:
        operations = tuple(_postprocess().OPERATIONS)
        if op not in operations:
            raise step_error(f"step {name!r}: unknown operation {op!r}", name, "op", allowed=list(operations))
    data = item.get("input", {})
    if not isinstance(data, dict):
        raise step_error(f"step {name!r}: input must be an object", name, "input")
    refs: dict[str, tuple[str, ...]] = {}
    for key, value in data.items():
        values = value if isinstance(value, list) else [value]
        named = [v[len(STEP_REF):] for v in values if is_step_ref(v)]
        if named:
            if named.count(name):
                raise step_error(f"step {name!r}: input.{key} refers to the step itself", name, key, CYCLE)
            refs[key] = tuple(named)
    return Step(name, index, model, op, dict(data), refs)


def topological_order(steps: list[Step]) -> list[Step]:
    """The steps ordered so that each comes after the steps it takes (ties: submitted order)."""
    by_name = {s.name: s for s in steps}
    done: list[Step] = []
    placed: set[str] = set()
    remaining = list(steps)
    while remaining:  # bounded: each pass places at least one step or raises
        ready = [s for s in remaining if all(d in placed or d not in by_name for d in s.depends_on)]
        if not ready:
            names = [s.name for s in remaining]
            raise step_error(f"the steps {names} refer to each other in a cycle", names[0],
                             next(iter(remaining[0].refs), None), CYCLE, cycle=names)
        for step in ready:
            done.append(step)
            placed.add(step.name)
        remaining = [s for s in remaining if s.name not in placed]
    return done


@dataclass(frozen=True)
class GenerationCheck:
    """A generation step checked and priced by the job layer (``JobService._check``)."""

    model: str
    kind: str  # "image" | "video"
    task: str
    input: dict[str, Any]  # normalized
    price: int


class StepChecker(Protocol):
    """What planning needs from outside the core (the service implements it)."""

    def generation(self, step: Step) -> GenerationCheck:
        """Check a generation step exactly as a job's input is checked, and price it."""

    def media(self, step: Step, field_: str, ref: str, kinds: str) -> MediaInfo:
        """The media a reference that is not a step names (an upload, ``job:<id>``); raises on one
        that is not the caller's or not of ``kinds``."""

    def audio_seconds(self, step: Step, field_: str, ref: str) -> float | None:
        """An audio upload's length (seconds), checked as the caller's."""

    def operation_price(self, op: str, output: MediaInfo) -> int:
        """The price of an operation that outputs ``output``."""

    def check_text(self, step: Step, texts: list[str]) -> None:
        """The content policy on an operation's text parameters (a watermark's)."""

    def upscaler(self, step: Step, model: str | None) -> str | None:
        """The catalog upscaler a diffusion upscale runs on: ``model`` if it is an enabled model with
        task ``upscale``, else (no ``model``) the first such model; None when there is none.
        Optional: a checker without it has no upscaler."""


@dataclass(frozen=True)
class PlannedStep:
    """A step checked and priced: what its job row will hold."""

    step: Step
    model: str  # catalog id, or "postprocess"
    kind: str  # what it outputs: "image" | "video"
    task: str  # the generation's task, or the operation
    input: dict[str, Any]  # normalized; ``step:`` references kept until the step is released
    price: int
    output: MediaInfo

    @property
    def name(self) -> str:
        return self.step.name

    @property
    def waits(self) -> bool:
        """Whether it starts ``waiting`` (it takes another step's output)."""
        return bool(self.step.depends_on)

    def as_dict(self) -> dict[str, Any]:
        """The normalized step as the pipeline's row keeps it (``input.steps``)."""
        out: dict[str, Any] = {"name": self.name, "input": self.input}
        if self.step.is_generation:
            out["model"] = self.model
        else:
            out["op"] = self.task
        return out


@dataclass(frozen=True)
class PipelinePlan:
    steps: list[PlannedStep]  # submitted order
    order: list[str]  # names, in an order they can run in

    @property
    def total(self) -> int:
        return sum(s.price for s in self.steps)

    def step(self, name: str) -> PlannedStep:
        return next(s for s in self.steps if s.name == name)


def generation_output(kind: str, normalized: dict[str, Any]) -> MediaInfo:
    """What a generation outputs, from its normalized input (a video: frames at fps)."""
    media_info = _postprocess().MediaInfo
    width, height = int(normalized.get("width") or 0), int(normalized.get("height") or 0)
    if kind == "image":
        return media_info(kind="image", width=width, height=height, format="png")
    fps = normalized.get("fps")
    frames = normalized.get("num_frames")
    duration = normalized.get("duration")
    if frames is None and duration is not None and fps:
        frames = round(float(duration) * float(fps))
    if duration is None and frames is not None and fps:
        duration = round(int(frames) / float(fps), 3)
    if not (width and height) and normalized.get("resolution"):  # remote models: by resolution
        short = int(str(normalized["resolution"]).rstrip("p") or 0)
        width, height = _size_of(short, normalized.get("aspect_ratio"))
    return media_info(kind="video", width=width, height=height,
                      num_frames=int(frames) if frames is not None else None,
                      fps=float(fps) if fps else None,
                      duration_s=float(duration) if duration is not None else None, format="mp4")


def _size_of(short: int, aspect: str | None) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in (aspect or "16:9").split(":"))
    except ValueError:
        a, b = 16, 9
    if a >= b:
        return round(short * a / b), short
    return short, round(short * b / a)


def plan_pipeline(steps: list[Step], checker: StepChecker) -> PipelinePlan:
    """Check every step in run order (each against what the steps it takes output) and price it."""
    order = topological_order(steps)
    planned: dict[str, PlannedStep] = {}
    for step in order:
        try:
            if step.is_generation:
                planned[step.name] = _plan_generation(step, planned, checker)
            else:
                planned[step.name] = _plan_operation(step, planned, checker)
        except CineWeaveError as exc:
            exc.details.setdefault("step", step.name)
            exc.details.setdefault("field", None)
            raise
    return PipelinePlan([planned[s.name] for s in steps], [s.name for s in order])


def _mismatch(step: Step, field_: str, source: str, kind: str, kinds: str) -> InvalidInput:
    what = step.model if step.is_generation else step.op
    return step_error(f"step {step.name!r}: input.{field_} takes {kinds.removesuffix('[]').replace('|', ' or ')}"
                      f" ({what}), but step {source!r} outputs {'an' if kind == 'image' else 'a'} {kind}",
                      step.name, field_, KIND_MISMATCH, expected=kinds, got=kind, ref=source)


def _plan_generation(step: Step, planned: dict[str, PlannedStep], checker: StepChecker) -> PlannedStep:
    for field_, names in step.refs.items():
        kinds = GENERATION_REF_FIELDS.get(field_)
        if kinds is None or isinstance(step.input.get(field_), list):
            raise step_error(f"step {step.name!r}: input.{field_} cannot take a step's output "
                             f"(only {sorted(GENERATION_REF_FIELDS)})", step.name, field_, KIND_MISMATCH)
        for name in names:
            kind = planned[name].kind
            if not accepts(kinds, kind):
                raise _mismatch(step, field_, name, kind, kinds)
    checked = checker.generation(step)
    return PlannedStep(step, checked.model, checked.kind, checked.task, checked.input, checked.price,
                       generation_output(checked.kind, checked.input))


def _plan_operation(step: Step, planned: dict[str, PlannedStep], checker: StepChecker) -> PlannedStep:
    pp = _postprocess()
    op = step.op
    assert op is not None
    if op == "upscale" and step.input.get("method") == "diffusion":
        return _plan_diffusion_upscale(step, planned, checker)
    fields = ref_fields(step)
    for field_ in step.refs:
        if field_ not in fields:
            takes = ", ".join(f"{f} ({k})" for f, k in fields.items())
            raise step_error(f"step {step.name!r}: {op} takes {takes}, not input.{field_}", step.name, field_,
                             KIND_MISMATCH, fields=fields)
    present = [f for f in fields if step.input.get(f) not in (None, "", [])]
    if not any(f not in OPTIONAL_REF_FIELDS for f in present) and "prompt" in step.input:
        raise step_error(f"step {step.name!r}: {op} works on {', '.join(fields.values())} output, not a prompt",
                         step.name, "prompt", KIND_MISMATCH, fields=fields)
    inputs: list[MediaInfo] = []
    overlay: MediaInfo | None = None
    audio_s: float | None = None
    refs: dict[str, Any] = {}
    for field_, kinds in fields.items():
        value = step.input.get(field_)
        if value in (None, "", []):
            continue  # which inputs an operation needs (one clip, 2+ for concat) infer_output checks
        many = kinds.endswith("[]")
        if many != isinstance(value, list):
            raise step_error(f"step {step.name!r}: input.{field_} must be "
                             f"{'a list of references' if many else 'one reference'}", step.name, field_)
        values = value if many else [value]
        if not all(isinstance(v, str) and 0 < len(v) <= 2048 for v in values) or len(values) > 64:
            raise step_error(f"step {step.name!r}: input.{field_} must hold reference strings", step.name, field_)
        refs[field_] = value
        for ref in values:
            if kinds == "audio":
                if is_step_ref(ref):
                    raise step_error(f"step {step.name!r}: input.{field_} takes an audio upload, not a step's "
                                     "output", step.name, field_, KIND_MISMATCH, expected="audio")
                audio_s = checker.audio_seconds(step, field_, ref)
                continue
            if is_step_ref(ref):
                source = planned[ref[len(STEP_REF):]]
                if not accepts(kinds, source.kind):
                    raise _mismatch(step, field_, source.name, source.kind, kinds)
                info = source.output
            else:
                info = checker.media(step, field_, ref, kinds)
                if not accepts(kinds, info.kind):
                    raise step_error(f"step {step.name!r}: input.{field_} takes {kinds}, not {info.kind}",
                                     step.name, field_, KIND_MISMATCH, expected=kinds, got=info.kind)
            if field_ in OPTIONAL_REF_FIELDS:
                overlay = info
            else:
                inputs.append(info)
    missing = [f for f, kinds in fields.items() if kinds == "audio" and f not in refs]
    if missing:  # infer_output cannot tell a missing track from one of unknown length
        raise step_error(f"step {step.name!r}: {op} needs input.{missing[0]} (an audio upload)",
                         step.name, missing[0])
    params_in = {k: v for k, v in step.input.items() if k not in fields}
    try:
        params = pp.parse_params(op, params_in)
        checker.check_text(step, _strings(params.model_dump()))
        output = pp.infer_output(op, params, inputs, audio_s=audio_s, overlay=overlay)
    except pp.OperationError as exc:
        raise step_error(f"step {step.name!r}: {exc}", step.name, getattr(exc, "field", None),
                         getattr(exc, "code", None) or "invalid_input") from exc
    price = checker.operation_price(op, output)
    normalized = {**params.model_dump(mode="json"), **refs}
    return PlannedStep(step, POSTPROCESS_MODEL, output.kind, op, normalized, price, output)


def _plan_diffusion_upscale(step: Step, planned: dict[str, PlannedStep], checker: StepChecker) -> PlannedStep:
    """``{"op": "upscale", "method": "diffusion"}``: a generation step (task ``upscale``) on a catalog
    upscaler, given the input image's size (so it is priced and bounded before anything runs).
    Images only; ``scale`` must be the model's factor (4). The step row gets the model's id, so the
    runner sends it to that model's deployment like any generation."""
    pp = _postprocess()
    params_in = {k: v for k, v in step.input.items() if k not in ("image", "video")}
    try:
        params = pp.parse_params("upscale", params_in)
    except pp.OperationError as exc:
        raise step_error(f"step {step.name!r}: {exc}", step.name, getattr(exc, "field", None),
                         getattr(exc, "code", None) or "invalid_input") from exc
    if step.input.get("video") not in (None, "", []):
        raise step_error(f"step {step.name!r}: a diffusion upscale takes an image, not a video "
                         "(use method lanczos)", step.name, "video", KIND_MISMATCH, expected="image", got="video")
    ref = step.input.get("image")
    if not isinstance(ref, str) or not 0 < len(ref) <= 2048:
        raise step_error(f"step {step.name!r}: upscale needs input.image (one reference)", step.name, "image")
    if is_step_ref(ref):
        source = planned[ref[len(STEP_REF):]]
        if source.kind != "image":
            raise _mismatch(step, "image", source.name, source.kind, "image")
        info = source.output
    else:
        info = checker.media(step, "image", ref, "image")
        if info.kind != "image":
            raise step_error(f"step {step.name!r}: input.image takes an image, not {info.kind}",
                             step.name, "image", KIND_MISMATCH, expected="image", got=info.kind)
    if params.scale != UPSCALE_FACTOR:
        raise step_error(f"step {step.name!r}: a diffusion upscale is ×{UPSCALE_FACTOR} (scale: {UPSCALE_FACTOR})",
                         step.name, "scale", allowed=[UPSCALE_FACTOR])
    find = getattr(checker, "upscaler", None)
    model = find(step, params.model) if find is not None else None
    if model is None:
        raise step_error(f"step {step.name!r}: no diffusion upscaler is enabled"
                         + (f" ({params.model!r} is not one)" if params.model else ""),
                         step.name, "model" if params.model else "method", UPSCALER_UNAVAILABLE)
    gen_input: dict[str, Any] = {"image": ref, "prompt": params.prompt or ""}
    if info.width and info.height:
        gen_input.update(width=info.width, height=info.height)
    gen_step = Step(step.name, step.index, model, None, gen_input,
                    {"image": (ref[len(STEP_REF):],)} if is_step_ref(ref) else {})
    checked = checker.generation(gen_step)
    return PlannedStep(step, checked.model, checked.kind, checked.task, checked.input, checked.price,
                       generation_output(checked.kind, checked.input))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def release_input(data: dict[str, Any], job_ids: dict[str, str]) -> dict[str, Any]:
    """A waiting step's input with its ``step:<name>`` references rewritten to ``job:<id>``."""
    def rewrite(value: Any) -> Any:
        if is_step_ref(value) and value[len(STEP_REF):] in job_ids:
            return f"job:{job_ids[value[len(STEP_REF):]]}"
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    return {k: rewrite(v) for k, v in data.items()}


def step_refs_of(data: dict[str, Any]) -> set[str]:
    """The step names a stored step input still refers to."""
    names: set[str] = set()
    for value in data.values():
        for v in value if isinstance(value, list) else [value]:
            if is_step_ref(v):
                names.add(v[len(STEP_REF):])
    return names
