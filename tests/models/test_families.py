"""Request mapping per family: pure functions, no weights."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from models.families.base import image_fingerprint
from models.registry import get_family

SD = get_family("stable_diffusion")
FLUX = get_family("flux")
WAN = get_family("wan")
LTX = get_family("ltx")


def request(**extra: Any) -> dict[str, Any]:
    base = {"prompt": "a red fox", "negative_prompt": "blurry", "width": 96, "height": 64, "steps": 7,
            "guidance": 4.5, "seed": 3, "num_frames": 17, "fps": 12, "loras": []}
    base.update(extra)
    return base


def img(color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (40, 40), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color if mode == "RGB" else 0)


def test_sd_text_to_image() -> None:
    assert SD.map_request(request(), "t2i") == {
        "prompt": "a red fox", "negative_prompt": "blurry", "width": 96, "height": 64,
        "num_inference_steps": 7, "guidance_scale": 4.5}
    assert SD.map_request(request(negative_prompt=""), "t2i")["negative_prompt"] is None


def test_sd_image_to_image_resizes_input_and_has_no_size_args() -> None:
    kwargs = SD.map_request(request(image=img(mode="L"), strength=0.35), "i2i")
    assert set(kwargs) == {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "image", "strength"}
    assert kwargs["image"].size == (96, 64) and kwargs["image"].mode == "RGB"
    assert kwargs["strength"] == 0.35
    assert SD.map_request(request(image=img()), "i2i")["strength"] == SD.default_strength
    with pytest.raises(ValueError, match="needs an input image"):
        SD.map_request(request(), "i2i")
    with pytest.raises(ValueError, match="does not do t2v"):
        SD.map_request(request(), "t2v")


def test_flux_drops_negative_prompt_and_keeps_size_for_img2img() -> None:
    assert FLUX.map_request(request(), "t2i") == {
        "prompt": "a red fox", "width": 96, "height": 64, "num_inference_steps": 7, "guidance_scale": 4.5}
    kwargs = FLUX.map_request(request(image=img(), strength=0.5), "i2i")
    assert kwargs["width"] == 96 and kwargs["strength"] == 0.5 and kwargs["image"].size == (40, 40)


def test_wan_text_and_image_to_video() -> None:
    assert WAN.map_request(request(), "t2v") == {
        "prompt": "a red fox", "negative_prompt": "blurry", "width": 96, "height": 64, "num_frames": 17,
        "num_inference_steps": 7, "guidance_scale": 4.5}
    kwargs = WAN.map_request(request(image=img()), "i2v")
    assert kwargs["image"].size == (40, 40)  # the pipeline resizes it itself
    with pytest.raises(ValueError, match="needs an input image"):
        WAN.map_request(request(), "i2v")


def test_ltx_passes_fps_as_frame_rate() -> None:
    assert LTX.map_request(request(), "t2v") == {
        "prompt": "a red fox", "negative_prompt": "blurry", "width": 96, "height": 64, "num_frames": 17,
        "frame_rate": 12, "num_inference_steps": 7, "guidance_scale": 4.5}
    assert "image" in LTX.map_request(request(image=img()), "i2v")


def test_batch_kwargs_lists_per_item_keys_and_checks_the_rest() -> None:
    a = SD.map_request(request(prompt="one", negative_prompt=""), "t2i")
    b = SD.map_request(request(prompt="two", negative_prompt="ugly"), "t2i")
    merged = SD.batch_kwargs([a, b])
    assert merged["prompt"] == ["one", "two"]
    assert merged["negative_prompt"] == ["", "ugly"]
    assert merged["width"] == 96
    no_negatives = SD.batch_kwargs([SD.map_request(request(negative_prompt=""), "t2i")] * 2)
    assert "negative_prompt" not in no_negatives
    c = SD.map_request(request(steps=8), "t2i")
    with pytest.raises(ValueError, match="differ in 'num_inference_steps'"):
        SD.batch_kwargs([a, c])


def test_image_is_per_item_for_sd_but_shared_for_wan_i2v() -> None:
    red, blue = img((255, 0, 0)), img((0, 0, 255))
    sd_a = SD.map_request(request(image=red), "i2i")
    sd_b = SD.map_request(request(image=blue), "i2i")
    assert SD.shared_key(sd_a) == SD.shared_key(sd_b)
    assert len(SD.batch_kwargs([sd_a, sd_b])["image"]) == 2
    wan_a = WAN.map_request(request(image=red), "i2v")
    wan_b = WAN.map_request(request(image=blue), "i2v")
    wan_a2 = WAN.map_request(request(image=img((255, 0, 0)), prompt="other"), "i2v")
    assert WAN.shared_key(wan_a) != WAN.shared_key(wan_b)
    assert WAN.shared_key(wan_a) == WAN.shared_key(wan_a2)
    assert WAN.batch_kwargs([wan_a, wan_a2])["image"] is red
    with pytest.raises(ValueError, match="differ in 'image'"):
        WAN.batch_kwargs([wan_a, wan_b])
    assert image_fingerprint(red) == image_fingerprint(img((255, 0, 0)))
    assert image_fingerprint(red) != image_fingerprint(blue)


def test_fps_separates_ltx_batches_but_not_wan() -> None:
    assert LTX.shared_key(LTX.map_request(request(fps=8), "t2v")) != LTX.shared_key(
        LTX.map_request(request(fps=24), "t2v"))
    assert WAN.shared_key(WAN.map_request(request(fps=8), "t2v")) == WAN.shared_key(
        WAN.map_request(request(fps=24), "t2v"))


def test_wan_i2v_survives_a_missing_ftfy(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from diffusers.pipelines.wan import pipeline_wan_i2v

    from models.families import wan

    monkeypatch.setitem(sys.modules, "ftfy", None)  # "import ftfy" now raises ImportError
    monkeypatch.delattr(pipeline_wan_i2v, "ftfy", raising=False)
    wan._ensure_ftfy()
    assert pipeline_wan_i2v.basic_clean("  caf\u00e9 &amp; co ") == "caf\u00e9 & co"


@pytest.mark.parametrize(("family", "steps", "strength", "expected"), [
    (SD, 10, None, 10), (SD, 10, 0.5, 5), (SD, 4, 0.8, 3), (SD, 4, 0.1, 1),
    (FLUX, 4, 0.8, 4), (FLUX, 10, 0.5, 5), (WAN, 7, None, 7),
])
def test_expected_steps(family: Any, steps: int, strength: float | None, expected: int) -> None:
    kwargs: dict[str, Any] = {"num_inference_steps": steps}
    if strength is not None:
        kwargs["strength"] = strength
    assert family.expected_steps(kwargs, "t2i") == expected
