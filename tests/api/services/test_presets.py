"""Presets: definition checks at save, expansion (substitution, enum merges, param errors),
versions, toggling, and seeding the shipped presets (both profiles)."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from api.core.errors import Conflict, InvalidInput, NotFound
from api.db.engine import Database
from api.db.tables import Preset
from api.services import presets
from api.services.presets import PresetService, expand, load_shipped, validate_definition
from api.settings import Settings
from models.catalog import Catalog

DEFINITION: dict[str, Any] = {
    "params": {
        "prompt": {"type": "string", "required": True, "max_length": 50},
        "duration": {"type": "number", "default": 2, "min": 1, "max": 4},
        "count": {"type": "integer", "min": 1, "max": 3},
        "aspect_ratio": {"type": "enum", "default": "1:1", "values": {
            "1:1": {"merge": {"still": {"width": 64, "height": 64}}},
            "16:9": {"merge": {"still": {"width": 96, "height": 64}, "motion": {"width": 96}}}}},
        "style": {"type": "enum", "values": ["plain", "noir"]},
    },
    "steps": [
        {"name": "still", "model": "tiny-sd", "input": {"prompt": "${prompt}, in $style"}},
        {"name": "motion", "model": "tiny-wan-i2v",
         "input": {"prompt": "${prompt}", "image": "step:still", "duration": {"$param": "duration"},
                   "seed": {"$param": "count"}}},
    ],
}


def _definition() -> dict[str, Any]:
    return copy.deepcopy(DEFINITION)


@pytest.fixture
def service(db: Database, settings: Settings) -> PresetService:
    return PresetService(db, settings)


@pytest.fixture
def made(service: PresetService) -> Preset:
    return service.create(name="demo", definition=_definition(), title="Demo", created_by="admin")


def _expand(db: Database, name: str, params: dict[str, Any] | None) -> presets.ExpandedPreset:
    with db.read() as session:
        return expand(session, name, params)


def _field(exc: pytest.ExceptionInfo[Any]) -> str:
    return exc.value.details.get("field")


# --- expansion -------------------------------------------------------------------------------


def test_expand_substitutes_whole_values_strings_and_enum_merges(db: Database, made: Preset) -> None:
    out = _expand(db, "demo", {"prompt": "a fox", "aspect_ratio": "16:9", "style": "noir", "count": 2})
    assert (out.name, out.version) == ("demo", 1)
    still, motion = out.steps
    assert still == {"name": "still", "model": "tiny-sd",
                     "input": {"prompt": "a fox, in noir", "width": 96, "height": 64}}
    assert motion["input"] == {"prompt": "a fox", "image": "step:still", "duration": 2, "seed": 2, "width": 96}
    assert out.params == {"prompt": "a fox", "duration": 2, "count": 2, "aspect_ratio": "16:9", "style": "noir"}


def test_expand_defaults_and_optional_params_without_value(db: Database, made: Preset) -> None:
    out = _expand(db, "demo", {"prompt": "a fox"})
    still, motion = out.steps
    assert still["input"] == {"prompt": "a fox, in ", "width": 64, "height": 64}  # style unset: ""
    assert "seed" not in motion["input"]  # {"$param": "count"} with no value drops the key
    assert motion["input"]["duration"] == 2


def test_a_param_value_is_never_itself_a_template(db: Database, made: Preset) -> None:
    out = _expand(db, "demo", {"prompt": "${style} $$ {0.__class__} %(x)s"})
    assert out.steps[1]["input"]["prompt"] == "${style} $$ {0.__class__} %(x)s"


@pytest.mark.parametrize(("params", "field"), [
    ({}, "params.prompt"),  # required
    ({"prompt": "x", "nope": 1}, "params.nope"),  # unknown
    ({"prompt": "x" * 51}, "params.prompt"),  # too long
    ({"prompt": 5}, "params.prompt"),
    ({"prompt": "x", "duration": 4.5}, "params.duration"),  # over max
    ({"prompt": "x", "duration": 0}, "params.duration"),  # under min
    ({"prompt": "x", "duration": True}, "params.duration"),  # a bool is no number
    ({"prompt": "x", "duration": "2"}, "params.duration"),
    ({"prompt": "x", "count": 1.5}, "params.count"),
    ({"prompt": "x", "count": 9}, "params.count"),
    ({"prompt": "x", "aspect_ratio": "4:3"}, "params.aspect_ratio"),
    ({"prompt": "x", "style": "__class__"}, "params.style"),
])
def test_bad_params_are_422_naming_the_param(db: Database, made: Preset, params: dict[str, Any],
                                             field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        _expand(db, "demo", params)
    assert exc.value.status == 422 and _field(exc) == field


def test_params_must_be_an_object(db: Database, made: Preset) -> None:
    with pytest.raises(InvalidInput) as exc:
        _expand(db, "demo", ["prompt"])  # type: ignore[arg-type]
    assert _field(exc) == "params"


def test_unknown_preset_is_not_found(db: Database, made: Preset) -> None:
    with pytest.raises(NotFound) as exc:
        _expand(db, "nope", {"prompt": "x"})
    assert exc.value.code == "not_found" and exc.value.status == 404


def test_integer_given_as_whole_float_is_accepted(db: Database, made: Preset) -> None:
    assert _expand(db, "demo", {"prompt": "x", "count": 3.0}).steps[1]["input"]["seed"] == 3


# --- definitions checked at save --------------------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(depth):
        out = {"x": out}
    return out


def _broken(change: Any) -> dict[str, Any]:
    d = _definition()
    change(d)
    return d


@pytest.mark.parametrize(("definition", "field"), [
    (_broken(lambda d: d["steps"][0]["input"].update(prompt="${missing}")), "definition.steps.0.input.prompt"),
    (_broken(lambda d: d["steps"][1]["input"].update(seed={"$param": "ghost"})), "definition.steps.1.input.seed"),
    (_broken(lambda d: d["steps"][0]["input"].update(prompt="costs $5")), "definition.steps.0.input.prompt"),
    (_broken(lambda d: d["steps"][0]["input"].update(prompt="{prompt.__class__}" + "${prompt.x}")),
     "definition.steps.0.input.prompt"),
    (_broken(lambda d: d["steps"][1]["input"].update(seed={"$param": "count", "x": 1})),
     "definition.steps.1.input.seed"),
    (_broken(lambda d: d["params"]["aspect_ratio"]["values"]["1:1"]["merge"].update(ghost={"width": 1})),
     "definition.params.aspect_ratio.values.1:1.merge.ghost"),
    (_broken(lambda d: d["params"]["aspect_ratio"]["values"]["1:1"]["merge"]["still"].update(p="${who}")),
     "definition.params.aspect_ratio.values.1:1.merge.still.p"),
    (_broken(lambda d: d["params"]["duration"].update(type="float")), "definition.params.duration.type"),
    (_broken(lambda d: d["params"]["duration"].update(default=9)), "definition.params.duration.default"),
    (_broken(lambda d: d["params"]["duration"].update(min=5)), "definition.params.duration.min"),
    (_broken(lambda d: d["params"]["prompt"].update(format="{}")), "definition.params.prompt"),
    (_broken(lambda d: d["params"]["style"].update(values=[])), "definition.params.style.values"),
    (_broken(lambda d: d["params"].update(Bad={"type": "string"})), "definition.params.Bad"),
    (_broken(lambda d: d["steps"][1].update(name="still")), "definition.steps.1.name"),
    (_broken(lambda d: d["steps"][1].update(op="loop")), "definition.steps.1"),
    (_broken(lambda d: d["steps"][0].update(name="Still!")), "definition.steps.0.name"),
    (_broken(lambda d: d["steps"][0].update(input=[1])), "definition.steps.0.input"),
    (_broken(lambda d: d.update(steps=[])), "definition.steps"),
    (_broken(lambda d: d.update(extra=1)), "definition"),
    (_broken(lambda d: d["steps"][0]["input"].update(guidance=float("nan"))), "definition"),
    (_broken(lambda d: d["steps"][0]["input"].update(deep=_nested(20))), "definition.steps.0.input.deep" + ".x" * 10),
    (_broken(lambda d: d["steps"][0]["input"].update(big="x" * 300_000)), "definition"),
])
def test_invalid_definitions_are_refused_when_saved(service: PresetService, definition: dict[str, Any],
                                                    field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        service.create(name="broken", definition=definition)
    assert _field(exc) == field
    with pytest.raises(NotFound):
        service.get("broken")


def test_dollar_dollar_is_a_literal_dollar(db: Database, service: PresetService) -> None:
    d = _definition()
    d["steps"][0]["input"]["prompt"] = "${prompt} for $$5"
    service.create(name="dollar", definition=d)
    assert _expand(db, "dollar", {"prompt": "a fox"}).steps[0]["input"]["prompt"] == "a fox for $5"


# --- versions ----------------------------------------------------------------------------------


def test_create_twice_is_conflict(service: PresetService, made: Preset) -> None:
    with pytest.raises(Conflict):
        service.create(name="demo", definition=_definition())


def test_bad_name_is_422(service: PresetService) -> None:
    with pytest.raises(InvalidInput) as exc:
        service.create(name="Bad Name", definition=_definition())
    assert _field(exc) == "name"


def test_patch_adds_a_version_and_expand_uses_the_newest(db: Database, service: PresetService,
                                                          made: Preset) -> None:
    d = _definition()
    d["steps"][0]["model"] = "sdxl"
    v2 = service.patch("demo", changes={"definition": d, "title": None}, created_by="admin2")
    assert (v2.version, v2.title, v2.created_by) == (2, "Demo", "admin2")
    v3 = service.patch("demo", changes={"description": "new words"})
    assert v3.version == 3 and v3.definition["steps"][0]["model"] == "sdxl"
    out = _expand(db, "demo", {"prompt": "x"})
    assert out.version == 3 and out.steps[0]["model"] == "sdxl"
    assert [p.version for p in service.list()] == [3]


def test_patch_with_an_invalid_definition_adds_nothing(service: PresetService, made: Preset) -> None:
    with pytest.raises(InvalidInput):
        service.patch("demo", changes={"definition": {"params": {}, "steps": [{"name": "a"}]}})
    assert service.get("demo").version == 1


def test_patch_unknown_is_not_found(service: PresetService) -> None:
    with pytest.raises(NotFound):
        service.patch("ghost", changes={"title": "x"})
    with pytest.raises(NotFound):
        service.patch("ghost", changes={"enabled": False})


def test_disabling_a_version_falls_back_to_the_previous_enabled_one(db: Database, service: PresetService,
                                                                     made: Preset) -> None:
    service.patch("demo", changes={"title": "v2"})
    service.patch("demo", changes={"enabled": False, "version": 2})
    assert _expand(db, "demo", {"prompt": "x"}).version == 1
    assert service.get("demo").version == 1
    assert service.get("demo", include_disabled=True).version == 2
    with pytest.raises(NotFound):
        service.get("demo", version=2)


def test_disabling_the_preset_hides_it_and_enabling_brings_it_back(db: Database, service: PresetService,
                                                                   made: Preset) -> None:
    service.patch("demo", changes={"title": "v2"})
    service.patch("demo", changes={"enabled": False})
    with pytest.raises(NotFound):
        _expand(db, "demo", {"prompt": "x"})
    assert service.list() == []
    assert [p.name for p in service.list(include_disabled=True)] == ["demo"]
    service.patch("demo", changes={"enabled": True})
    assert _expand(db, "demo", {"prompt": "x"}).version == 2


def test_toggle_of_an_unknown_version_is_not_found(service: PresetService, made: Preset) -> None:
    with pytest.raises(NotFound) as exc:
        service.patch("demo", changes={"enabled": False, "version": 7})
    assert _field(exc) == "version"


def test_concurrent_patches_each_get_their_own_version(backend_db: Database, backend_settings: Settings) -> None:
    service = PresetService(backend_db, backend_settings)
    service.create(name="demo", definition=_definition())
    errors: list[BaseException] = []
    barrier = threading.Barrier(4, timeout=20)

    def patch(i: int) -> None:
        try:
            barrier.wait()
            service.patch("demo", changes={"title": f"t{i}"})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=patch, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    with backend_db.read() as session:
        versions = sorted(session.exec(select(Preset.version).where(Preset.name == "demo")).all())
    assert versions == [1, 2, 3, 4, 5]


# --- shipped presets -----------------------------------------------------------------------------

SHIPPED = {"still-to-motion", "cinematic-short", "loop-gif"}


@pytest.mark.parametrize("profile", ["tiny", "production"])
def test_shipped_presets_parse_and_name_catalog_models_within_limits(profile: str) -> None:
    catalog = Catalog.load()
    shipped = {p["name"]: p for p in load_shipped(profile=profile)}
    assert set(shipped) == SHIPPED
    for item in shipped.values():
        definition = validate_definition(item["definition"])
        assert definition["params"]["prompt"]["required"] is True
        assert {"style", "aspect_ratio"} <= set(definition["params"])
        for ratio in definition["params"]["aspect_ratio"]["values"]:
            values = presets.resolve_params(definition, {"prompt": "p", "aspect_ratio": ratio})
            steps = presets._substitute(definition, values)
            for step in steps:
                if "model" not in step:
                    continue
                spec = catalog.get(step["model"])
                lim = spec.limits
                width = step["input"].get("width", spec.defaults.width)
                height = step["input"].get("height", spec.defaults.height)
                assert lim.min_width <= width <= lim.max_width and width % lim.size_multiple == 0, step
                assert lim.min_height <= height <= lim.max_height and height % lim.size_multiple == 0, step
                if "fps" in step["input"]:
                    assert lim.min_fps <= step["input"]["fps"] <= lim.max_fps
        models = {s.get("model") for s in item["definition"]["steps"]} - {None}
        if profile == "tiny":
            assert models == {"tiny-sd", "tiny-wan-i2v"}
        else:
            assert models == {"sdxl", "wan2.1-i2v-14b-480p"}


def test_shipped_step_shapes() -> None:
    ops = {p["name"]: [s.get("op") or s["model"] for s in p["definition"]["steps"]] for p in load_shipped()}
    assert ops == {"still-to-motion": ["tiny-sd", "tiny-wan-i2v", "interpolate", "export"],
                   "cinematic-short": ["tiny-sd", "tiny-wan-i2v", "upscale", "watermark", "export"],
                   "loop-gif": ["tiny-sd", "tiny-wan-i2v", "loop", "export"]}
    final = {p["name"]: p["definition"]["steps"][-1]["input"]["format"] for p in load_shipped()}
    assert final == {"still-to-motion": "mp4", "cinematic-short": "mp4", "loop-gif": "gif"}


def test_seed_inserts_version_one_once_and_admin_versions_win(db: Database, settings: Settings) -> None:
    service = PresetService(db, settings)
    assert service.seed() == 3
    assert service.seed() == 0  # idempotent
    assert {p.name: (p.version, p.created_by) for p in service.list()} == {
        n: (1, None) for n in SHIPPED}
    service.patch("loop-gif", changes={"title": "Mine"}, created_by="admin")
    service.patch("still-to-motion", changes={"enabled": False})
    assert service.seed() == 0
    assert service.get("loop-gif").title == "Mine"
    with pytest.raises(NotFound):
        service.get("still-to-motion")
    out = _expand(db, "cinematic-short", {"prompt": "a fox"})
    assert out.steps[0]["model"] == "tiny-sd" and out.steps[3]["input"]["text"] == "CineWeave"


def test_seed_picks_the_production_profile(db: Database, settings: Settings) -> None:
    prod = settings.model_copy(update={"preset_profile": "production"})
    PresetService(db, prod).seed()
    out = _expand(db, "still-to-motion", {"prompt": "a fox"})
    assert [s.get("model") for s in out.steps[:2]] == ["sdxl", "wan2.1-i2v-14b-480p"]


def test_concurrent_seeds_insert_each_preset_once(backend_db: Database, backend_settings: Settings) -> None:
    barrier = threading.Barrier(3, timeout=20)
    counts: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            counts.append(presets.seed(backend_db, backend_settings))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and sum(counts) == 3
    with backend_db.read() as session:
        rows = session.exec(select(Preset.name, Preset.version)).all()
    assert sorted(rows) == sorted((n, 1) for n in SHIPPED)


def test_a_shipped_file_with_a_bad_definition_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "name: bad\nprofiles:\n  tiny:\n    steps: [{name: a, model: tiny-sd, input: {prompt: '${nope}'}}]\n")
    with pytest.raises(ValueError, match="undeclared"):
        load_shipped(tmp_path)
    with pytest.raises(ValueError, match="no profile"):
        load_shipped(tmp_path, "production")
