"""The SD x4 upscaler family on its tiny checkpoint: built, loaded with from_pretrained, ×4 on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import DiffusionPipeline, StableDiffusionUpscalePipeline
from PIL import Image

from models.catalog import Catalog
from models.families.sd_upscale import FAMILY, UpscalePipeline
from models.generator import GenerationCanceled, Generator, fill_defaults, task_of
from models.registry import get_family
from models.tiny import make_tiny
from tests.models.helpers import tiny_spec

NAME = "tiny-sd-x4-upscaler"


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-upscaler")
    make_tiny(out, [NAME])
    return out


@pytest.fixture(scope="module")
def up_gen(upscaler_dir: Path) -> Generator:
    return Generator.load(tiny_spec(Catalog.load(), NAME), tiny_dir=upscaler_dir)


def test_the_tiny_checkpoint_is_the_real_upscale_architecture(upscaler_dir: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(str(upscaler_dir / NAME))
    assert isinstance(pipe, StableDiffusionUpscalePipeline)
    assert pipe.unet.config.in_channels == 7 and pipe.vae.config.scaling_factor == 0.08333
    assert pipe.low_res_scheduler is not None
    loaded = get_family("sd_upscale").load(upscaler_dir / NAME, pipe.dtype)
    assert isinstance(loaded, UpscalePipeline)


def test_the_catalog_upscalers_are_disabled_by_default() -> None:
    catalog = Catalog.load()
    for model_id in (NAME, "sd-x4-upscaler"):
        spec = tiny_spec(catalog, model_id)
        assert spec.tasks == ["upscale"] and spec.family == "sd_upscale" and not spec.enabled
    assert tiny_spec(catalog, "sd-x4-upscaler").source.hf_repo == "stabilityai/stable-diffusion-x4-upscaler"


def test_a_request_with_an_image_is_an_upscale_on_an_upscaler(up_gen: Generator) -> None:
    filled = fill_defaults(up_gen.spec, {"prompt": "", "image": "x"})
    assert task_of(filled, "image") == "upscale"
    assert up_gen.compatible_key({"prompt": "", "image": Image.new("RGB", (8, 8))})[0] == "upscale"


def test_the_output_is_four_times_the_input_with_progress(up_gen: Generator) -> None:
    image = Image.new("RGB", (16, 24), (200, 30, 30))
    steps: list[tuple[int, int]] = []
    [media] = up_gen.generate([{"prompt": "", "image": image, "seed": 1, "steps": 2}],
                              on_step=lambda done, total: steps.append((done, total)))
    assert (media.width, media.height) == (64, 96) and media.image is not None
    assert media.image.size == (64, 96) and media.metadata["task"] == "upscale"
    assert steps == [(1, 2), (2, 2)]


def test_the_input_is_resized_to_the_priced_size_and_sizes_never_share_a_call(up_gen: Generator) -> None:
    image = Image.new("RGB", (16, 24))
    out = up_gen.generate([
        {"prompt": "a", "image": image, "seed": 1, "steps": 2, "input_width": 8, "input_height": 8},
        {"prompt": "b", "image": image, "seed": 2, "steps": 2}])
    assert [(m.width, m.height) for m in out] == [(32, 32), (64, 96)]
    assert up_gen.last_batch_sizes == [1, 1]
    same = up_gen.generate([{"prompt": "a", "image": image, "seed": 1, "steps": 2},
                            {"prompt": "b", "image": image, "seed": 2, "steps": 2}])
    assert [(m.width, m.height) for m in same] == [(64, 96)] * 2 and up_gen.last_batch_sizes == [2]


def test_cancel_within_a_step(up_gen: Generator) -> None:
    checks: list[int] = []
    steps: list[int] = []
    with pytest.raises(GenerationCanceled, match="after step 1 of 3"):
        # the first check is before the call, the second in the (translated) step callback
        up_gen.generate([{"prompt": "", "image": Image.new("RGB", (8, 8)), "seed": 1, "steps": 3}],
                        on_step=lambda done, total: steps.append(done),
                        should_cancel=lambda: checks.append(1) is None and len(checks) > 1)
    assert steps == [1]


def test_map_request_needs_an_image() -> None:
    with pytest.raises(ValueError, match="input image"):
        FAMILY.map_request({"prompt": "", "steps": 2, "guidance": 0.0}, "upscale")
    with pytest.raises(ValueError, match="does not do"):
        FAMILY.map_request({"prompt": "", "steps": 2, "guidance": 0.0, "image": "x"}, "i2i")
