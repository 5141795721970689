"""Pipelines, the pure part: parsing, references, order, kinds, outputs and prices."""

from __future__ import annotations

from typing import Any

import pytest

from api.core.errors import CineWeaveError, InvalidInput
from api.core.pipelines import (
    CYCLE,
    KIND_MISMATCH,
    TOO_MANY_STEPS,
    UNKNOWN_STEP,
    GenerationCheck,
    Step,
    generation_output,
    parse_steps,
    plan_pipeline,
    release_input,
    step_refs_of,
    topological_order,
)
from models.postprocess import MediaInfo


def gen(name: str, model: str = "img", **input: Any) -> dict[str, Any]:
    return {"name": name, "model": model, "input": {"prompt": "p", **input}}


def op(name: str, operation: str, **input: Any) -> dict[str, Any]:
    return {"name": name, "op": operation, "input": input}


class FakeChecker:
    """Generations: model "img" outputs a 64×64 image (1 credit), "vid" a 17-frame 8 fps clip (20)."""

    def __init__(self, uploads: dict[str, MediaInfo] | None = None) -> None:
        self.uploads = uploads or {}
        self.texts: list[str] = []

    def generation(self, step: Step) -> GenerationCheck:
        if step.model == "bad":
            raise InvalidInput("unknown model 'bad'", {"field": "model"})
        if step.model == "vid":
            task = "i2v" if step.input.get("image") else "t2v"
            return GenerationCheck("vid", "video", task, {**step.input, "width": 64, "height": 64,
                                                           "num_frames": 17, "fps": 8}, 20)
        task = "i2i" if step.input.get("image") else "t2i"
        return GenerationCheck("img", "image", task, {**step.input, "width": 64, "height": 64}, 1)

    def media(self, step: Step, field_: str, ref: str, kinds: str) -> MediaInfo:
        if ref not in self.uploads:
            raise InvalidInput(f"upload {ref} not found", {"field": field_})
        return self.uploads[ref]

    def audio_seconds(self, step: Step, field_: str, ref: str) -> float | None:
        return 3.0

    def operation_price(self, op: str, output: MediaInfo) -> int:
        return 1 if output.kind == "image" else max(1, round(output.duration_s or 0))

    def check_text(self, step: Step, texts: list[str]) -> None:
        self.texts.extend(texts)


def error_of(raw: list[dict[str, Any]], checker: FakeChecker | None = None, max_steps: int = 8) -> CineWeaveError:
    with pytest.raises(CineWeaveError) as info:
        plan_pipeline(parse_steps(raw, max_steps), checker or FakeChecker())
    return info.value


# parsing and order ---------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "code", "step", "field"), [
    ([gen("a"), gen("b", image="step:nope")], UNKNOWN_STEP, "b", "image"),
    ([gen("a", image="step:b"), gen("b", image="step:a")], CYCLE, "a", "image"),
    ([gen("a", image="step:a")], CYCLE, "a", "image"),
    ([gen("a")] * 9, TOO_MANY_STEPS, None, "steps"),
    ([gen("a"), gen("a")], "invalid_input", "a", "name"),
    ([gen("Bad Name")], "invalid_input", None, "name"),
    ([{"name": "a", "model": "img", "op": "trim", "input": {}}], "invalid_input", "a", "model"),
    ([{"name": "a", "input": {}}], "invalid_input", "a", "model"),
    ([{"name": "a", "model": "img", "input": {}, "extra": 1}], "invalid_input", "a", "extra"),
    ([op("a", "explode")], "invalid_input", "a", "op"),
    ([], "invalid_input", None, "steps"),
    ("not a list", "invalid_input", None, "steps"),
])
def test_parse_refuses(raw: Any, code: str, step: str | None, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_steps(raw, 8)
    assert info.value.code == code and info.value.status == 422
    assert (info.value.details["step"], info.value.details["field"]) == (step, field)


def test_a_three_step_cycle_behind_a_good_step() -> None:
    raw = [gen("a"), gen("b", image="step:d"), gen("c", image="step:b"), op("d", "trim", video="step:c")]
    with pytest.raises(InvalidInput) as info:
        parse_steps(raw, 8)
    assert info.value.code == CYCLE and sorted(info.value.details["cycle"]) == ["b", "c", "d"]


def test_order_puts_sources_first_and_keeps_submitted_order_otherwise() -> None:
    steps = parse_steps([op("fx", "concat", videos=["step:m1", "step:m2"]), gen("m1", "vid"),
                         gen("m2", "vid", image="step:still"), gen("still")], 8)
    assert [s.name for s in topological_order(steps)] == ["m1", "still", "m2", "fx"]
    assert steps[0].depends_on == ("m1", "m2") and steps[0].refs == {"videos": ("m1", "m2")}


# kinds -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "step", "field"), [
    # an upscale of a prompt
    ([gen("a"), op("up", "upscale", prompt="make it big", scale=2)], "up", "prompt"),
    # image-to-video from a video
    ([gen("m", "vid"), gen("i2v", "vid", image="step:m")], "i2v", "image"),
    # a trim of an image (by the video field, and by an image field trim does not take)
    ([gen("a"), op("t", "trim", video="step:a", duration_s=1)], "t", "video"),
    ([gen("a"), op("t", "trim", image="step:a", duration_s=1)], "t", "image"),
    # concat takes videos
    ([gen("a"), gen("m", "vid"), op("c", "concat", videos=["step:m", "step:a"])], "c", "videos"),
    # audio comes from an upload, never from a step
    ([gen("m", "vid"), op("s", "audio", video="step:m", audio="step:m")], "s", "audio"),
    # a generation's field that takes no step
    ([gen("m", "vid"), gen("x", "vid", video="step:m")], "x", "video"),
])
def test_kind_mismatch(raw: list[dict[str, Any]], step: str, field: str) -> None:
    exc = error_of(raw)
    assert exc.code == KIND_MISMATCH and exc.status == 422
    assert (exc.details["step"], exc.details["field"]) == (step, field)


def test_an_upload_of_the_wrong_kind_is_a_kind_mismatch() -> None:
    checker = FakeChecker({"upl_img": MediaInfo(kind="image", width=64, height=64)})
    exc = error_of([op("t", "trim", video="upl_img", duration_s=1)], checker)
    assert exc.code == KIND_MISMATCH and exc.details["step"] == "t"


def test_a_step_error_names_the_step() -> None:
    exc = error_of([gen("a"), gen("b", "bad", image="step:a")])
    assert exc.code == "invalid_input" and exc.details == {"field": "model", "step": "b"}
    exc = error_of([gen("m", "vid"), op("t", "trim", video="step:m", start_s=36000)])
    assert exc.status == 422 and exc.details["step"] == "t"


# outputs and prices ---------------------------------------------------------------------------
def test_plan_infers_each_output_and_prices_each_step() -> None:
    checker = FakeChecker()
    plan = plan_pipeline(parse_steps([
        gen("still"), gen("motion", "vid", image="step:still"),
        op("fast", "interpolate", video="step:motion", fps=16),
        op("mark", "watermark", video="step:fast", text="hello"),
        op("out", "export", video="step:mark", format="gif"),
    ], 8), checker)
    motion, fast = plan.step("motion"), plan.step("fast")
    assert (motion.kind, motion.output.num_frames, motion.output.fps) == ("video", 17, 8.0)
    assert motion.output.duration_s == pytest.approx(17 / 8)
    assert (fast.output.fps, fast.output.num_frames) == (16.0, 34) and fast.model == "postprocess"
    assert fast.input == {"fps": 16, "video": "step:motion"} and fast.task == "interpolate"
    assert plan.step("out").output.format == "gif" and plan.step("out").kind == "video"
    assert [s.name for s in plan.steps] == ["still", "motion", "fast", "mark", "out"]
    assert plan.total == sum(s.price for s in plan.steps) == 1 + 20 + 2 + 2 + 2
    assert [s.waits for s in plan.steps] == [False, True, True, True, True]
    assert "hello" in checker.texts  # the content policy sees a watermark's text
    assert plan.steps[2].as_dict() == {"name": "fast", "op": "interpolate", "input": fast.input}


def test_generation_output() -> None:
    image = generation_output("image", {"width": 64, "height": 32})
    assert (image.kind, image.width, image.height) == ("image", 64, 32)
    clip = generation_output("video", {"width": 64, "height": 64, "num_frames": 17, "fps": 8, "duration": 2.125})
    assert (clip.num_frames, clip.fps, clip.duration_s) == (17, 8.0, 2.125)
    remote = generation_output("video", {"duration": 4.0, "fps": 24, "resolution": "720p", "aspect_ratio": "16:9"})
    assert (remote.width, remote.height, remote.num_frames) == (1280, 720, 96)


def test_release_rewrites_step_refs() -> None:
    data = {"video": "step:a", "videos": ["step:a", "step:b", "upl_x"], "fps": 16}
    assert step_refs_of(data) == {"a", "b"}
    out = release_input(data, {"a": "job_1", "b": "job_2"})
    assert out == {"video": "job:job_1", "videos": ["job:job_1", "job:job_2", "upl_x"], "fps": 16}
    assert step_refs_of(out) == set()


def test_an_audio_step_without_its_track_is_refused_before_any_charge() -> None:
    exc = error_of([gen("m", "vid"), op("s", "audio", video="step:m")])
    assert exc.status == 422 and (exc.details["step"], exc.details["field"]) == ("s", "audio")
