"""A diffusion upscale step is planned as a generation on a catalog upscaler (images only, ×4)."""

from __future__ import annotations

from typing import Any

import pytest

from api.core.errors import CineWeaveError
from api.core.pipelines import (
    KIND_MISMATCH,
    UPSCALER_UNAVAILABLE,
    GenerationCheck,
    Step,
    parse_steps,
    plan_pipeline,
)
from models.postprocess import MediaInfo


class Checker:
    """Generations: "img" a 64×48 image (1 credit), "vid" a clip; upscalers: ``upscalers``, each
    output ×4 of the given input size at 7 credits."""

    def __init__(self, upscalers: tuple[str, ...] = ("up-a", "up-b")) -> None:
        self.upscalers = upscalers
        self.generations: list[Step] = []
        self.uploads = {"upl_img": MediaInfo(kind="image", width=20, height=12, format="png"),
                        "upl_vid": MediaInfo(kind="video", width=64, height=64, num_frames=8, fps=8.0,
                                             duration_s=1.0)}

    def generation(self, step: Step) -> GenerationCheck:
        self.generations.append(step)
        if step.model in self.upscalers:
            data = step.input
            return GenerationCheck(step.model, "image", "upscale",
                                   {**data, "width": data["width"] * 4, "height": data["height"] * 4}, 7)
        if step.model == "vid":
            return GenerationCheck("vid", "video", "t2v", {**step.input, "width": 64, "height": 64,
                                                           "num_frames": 17, "fps": 8}, 20)
        return GenerationCheck("img", "image", "t2i", {**step.input, "width": 64, "height": 48}, 1)

    def media(self, step: Step, field_: str, ref: str, kinds: str) -> MediaInfo:
        return self.uploads[ref]

    def audio_seconds(self, step: Step, field_: str, ref: str) -> float | None:
        return None

    def operation_price(self, op: str, output: MediaInfo) -> int:
        return 100

    def check_text(self, step: Step, texts: list[str]) -> None:
        pass

    def upscaler(self, step: Step, model: str | None) -> str | None:
        if model is not None:
            return model if model in self.upscalers else None
        return self.upscalers[0] if self.upscalers else None


def plan(raw: list[dict[str, Any]], checker: Checker | None = None) -> Any:
    return plan_pipeline(parse_steps(raw, 8), checker or Checker())


STILL = {"name": "still", "model": "img", "input": {"prompt": "p"}}


def up(image: str = "step:still", **params: Any) -> dict[str, Any]:
    return {"name": "up", "op": "upscale", "input": {"image": image, "scale": 4, "method": "diffusion", **params}}


def test_a_diffusion_upscale_is_a_generation_on_the_first_upscaler_priced_by_it() -> None:
    checker = Checker()
    result = plan([STILL, up(prompt="crisp")], checker)
    step = result.step("up")
    assert (step.model, step.kind, step.task, step.price) == ("up-a", "image", "upscale", 7)
    assert step.input["image"] == "step:still" and step.waits
    assert (step.output.kind, step.output.width, step.output.height) == ("image", 256, 192)
    assert result.total == 1 + 7
    asked = checker.generations[-1]
    assert asked.model == "up-a" and asked.input == {"image": "step:still", "prompt": "crisp", "width": 64,
                                                     "height": 48}
    assert step.as_dict()["op"] == "upscale"


def test_the_given_model_and_an_upload_as_input() -> None:
    step = plan([up("upl_img", model="up-b")]).step("up")
    assert step.model == "up-b" and (step.output.width, step.output.height) == (80, 48) and not step.waits


def test_lanczos_stays_an_operation() -> None:
    step = plan([STILL, {"name": "up", "op": "upscale", "input": {"image": "step:still", "scale": 4}}]).step("up")
    assert step.model == "postprocess" and step.price == 100


def error(raw: list[dict[str, Any]], checker: Checker | None = None) -> CineWeaveError:
    with pytest.raises(CineWeaveError) as info:
        plan(raw, checker)
    assert info.value.status == 422
    return info.value


@pytest.mark.parametrize(("raw", "code", "field"), [
    ([{"name": "m", "model": "vid", "input": {"prompt": "p"}},
      {"name": "up", "op": "upscale", "input": {"video": "step:m", "scale": 4, "method": "diffusion"}}],
     KIND_MISMATCH, "video"),
    ([{"name": "m", "model": "vid", "input": {"prompt": "p"}}, up("step:m")], KIND_MISMATCH, "image"),
    ([up("upl_vid")], KIND_MISMATCH, "image"),
    ([STILL, {**up(), "input": {**up()["input"], "scale": 2}}], "invalid_input", "scale"),
    ([STILL, up(model="not-an-upscaler")], UPSCALER_UNAVAILABLE, "model"),
    ([STILL, up(strength=0.5)], "invalid_input", None),
])
def test_refused(raw: list[dict[str, Any]], code: str, field: str | None) -> None:
    exc = error(raw)
    assert exc.code == code and exc.details["step"] == "up"
    if field is not None:
        assert exc.details["field"] == field


def test_no_upscaler_enabled() -> None:
    exc = error([STILL, up()], Checker(upscalers=()))
    assert exc.code == UPSCALER_UNAVAILABLE and exc.details["field"] == "method"
