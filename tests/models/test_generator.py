"""End to end on tiny checkpoints: t2i, i2i, t2v, i2v, batching, seeds, progress, cancel, LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.adapters import LoraAdapter
from models.catalog import Catalog
from models.generator import GeneratedMedia, GenerationCanceled, Generator, compatible_key
from tests.models.helpers import make_spec


def pixels(media: GeneratedMedia) -> np.ndarray:
    if media.image is not None:
        return np.asarray(media.image)
    assert media.frames is not None
    return np.stack([np.asarray(f) for f in media.frames])


def gradient(width: int = 64, height: int = 64) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    arr = np.stack([np.tile(x, (height, 1)), np.tile(x[::-1], (height, 1)), np.full((height, width), 90, np.uint8)], -1)
    return Image.fromarray(arr)


class Progress:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.steps: list[tuple[int, int]] = []
        self.cancel_after = cancel_after

    def __call__(self, done: int, total: int) -> None:
        self.steps.append((done, total))

    def should_cancel(self) -> bool:
        return self.cancel_after is not None and len(self.steps) >= self.cancel_after


# --- images ------------------------------------------------------------------------------------

def test_text_to_image(sd_gen: Generator) -> None:
    progress = Progress()
    [media] = sd_gen.generate([{"prompt": "a lighthouse", "seed": 5, "width": 64, "height": 48}], on_step=progress)
    assert media.kind == "image" and media.image is not None
    assert media.image.size == (64, 48) and (media.width, media.height) == (64, 48)
    assert media.seed == 5 and media.metadata["model"] == "tiny-sd" and media.metadata["prompt"] == "a lighthouse"
    assert [s for s, _ in progress.steps] == [1, 2, 3, 4]
    assert {t for _, t in progress.steps} == {4}
    assert pixels(media).std() > 0  # noise, not a blank image


def test_image_to_image_keeps_requested_size_and_counts_strength_steps(sd_gen: Generator) -> None:
    progress = Progress()
    [media] = sd_gen.generate([{"prompt": "x", "seed": 1, "image": gradient(80, 40), "strength": 0.5,
                                "width": 64, "height": 32, "steps": 6}], on_step=progress)
    assert media.image is not None and media.image.size == (64, 32)
    assert media.metadata["task"] == "i2i"
    assert progress.steps == [(1, 3), (2, 3), (3, 3)]  # steps × strength denoising steps


def test_same_seed_same_pixels_other_seed_other_pixels(sd_gen: Generator) -> None:
    req = {"prompt": "a cat", "seed": 1234}
    first, second = sd_gen.generate([req])[0], sd_gen.generate([req])[0]
    assert np.array_equal(pixels(first), pixels(second))
    other = sd_gen.generate([{**req, "seed": 4321}])[0]
    assert not np.array_equal(pixels(first), pixels(other))


def test_batch_runs_in_one_call_and_matches_solo_runs(sd_gen: Generator) -> None:
    batch = [{"prompt": f"prompt {i}", "seed": 100 + i, "negative_prompt": "blurry" if i % 2 else ""}
             for i in range(4)]
    progress = Progress()
    outputs = sd_gen.generate(batch, on_step=progress)
    assert sd_gen.last_batch_sizes == [4]
    assert len(outputs) == 4 and [o.seed for o in outputs] == [100, 101, 102, 103]
    assert progress.steps[-1] == (4, 4)  # the batch shares its denoising steps
    solo = [sd_gen.generate([r])[0] for r in batch[:2]]
    for alone, together in zip(solo, outputs, strict=False):
        # Each request draws its own seeded noise; batched kernels may differ in the last bits.
        diff = np.abs(pixels(alone).astype(int) - pixels(together).astype(int))
        assert diff.max() <= 2, diff.max()
    assert not np.array_equal(pixels(outputs[0]), pixels(outputs[1]))


def test_incompatible_requests_are_split_into_calls_in_order(sd_gen: Generator) -> None:
    batch = [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2, "steps": 2},
             {"prompt": "c", "seed": 3}, {"prompt": "d", "seed": 4, "image": gradient(), "strength": 0.5}]
    progress = Progress()
    outputs = sd_gen.generate(batch, on_step=progress)
    assert sd_gen.last_batch_sizes == [2, 1, 1]
    assert [o.prompt for o in outputs] == ["a", "b", "c", "d"]
    assert progress.steps[-1] == (4 + 2 + 2, 8)
    assert [d for d, _ in progress.steps] == list(range(1, 9))


def test_compatible_key(sd_gen: Generator, wan_i2v_gen: Generator) -> None:
    a = {"prompt": "a", "seed": 1, "width": 64, "height": 64}
    assert sd_gen.compatible_key(a) == sd_gen.compatible_key({**a, "prompt": "b", "seed": 9, "negative_prompt": "n"})
    assert sd_gen.compatible_key(a) != sd_gen.compatible_key({**a, "width": 128})
    assert sd_gen.compatible_key(a) != sd_gen.compatible_key({**a, "steps": 9})
    assert sd_gen.compatible_key(a) != sd_gen.compatible_key({**a, "loras": [{"id": "l1", "scale": 1.0}]})
    assert sd_gen.compatible_key({**a, "loras": [{"id": "l1", "scale": 0.5}, {"id": "l2", "scale": 1.0}]}) == \
        sd_gen.compatible_key({**a, "loras": [{"id": "l2", "scale": 1.0}, {"id": "l1", "scale": 0.5}]})
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    assert sd_gen.compatible_key({**a, "image": red}) == sd_gen.compatible_key({**a, "image": blue})
    assert sd_gen.compatible_key({**a, "image": red}) != sd_gen.compatible_key(a)
    assert wan_i2v_gen.compatible_key({**a, "image": red}) != wan_i2v_gen.compatible_key({**a, "image": blue})
    # Without a family: a conservative key (the input image always counts).
    assert compatible_key({**a, "image": red}) != compatible_key({**a, "image": blue})
    assert compatible_key(a) == compatible_key({**a, "prompt": "z", "seed": 7})
    assert compatible_key(a) != compatible_key({**a, "num_frames": 17})


def test_cancel_stops_within_one_step(sd_gen: Generator) -> None:
    progress = Progress(cancel_after=1)
    with pytest.raises(GenerationCanceled, match="after step 1 of 20"):
        sd_gen.generate([{"prompt": "x", "seed": 1, "steps": 20}], on_step=progress,
                        should_cancel=progress.should_cancel)
    assert progress.steps == [(1, 20)]
    with pytest.raises(GenerationCanceled, match="before step 0"):
        sd_gen.generate([{"prompt": "x", "seed": 1}], should_cancel=lambda: True)
    # The generator is still usable afterwards.
    assert sd_gen.generate([{"prompt": "x", "seed": 1, "steps": 1}])[0].image is not None


def test_unknown_task_is_rejected(wan_gen: Generator) -> None:
    with pytest.raises(ValueError, match="tiny-wan does not do i2v"):
        wan_gen.generate([{"prompt": "x", "image": gradient()}])


# --- video -------------------------------------------------------------------------------------

def test_text_to_video(wan_gen: Generator) -> None:
    progress = Progress()
    outputs = wan_gen.generate([{"prompt": "waves", "seed": 3, "num_frames": 9, "fps": 12},
                                {"prompt": "clouds", "seed": 4, "num_frames": 9, "fps": 6}], on_step=progress)
    assert wan_gen.last_batch_sizes == [2]
    for media, fps in zip(outputs, (12, 6), strict=True):
        assert media.kind == "video" and media.frames is not None
        assert media.num_frames == 9 and media.fps == fps and (media.width, media.height) == (64, 64)
        assert media.duration_s == pytest.approx(9 / fps)
        assert media.poster is media.frames[0]
    assert progress.steps[-1] == (4, 4)
    solo = [wan_gen.generate([{"prompt": "waves", "seed": 3, "num_frames": 9, "fps": 12}])[0] for _ in range(2)]
    assert np.array_equal(pixels(solo[0]), pixels(solo[1]))
    assert np.abs(pixels(solo[0]).astype(int) - pixels(outputs[0]).astype(int)).max() <= 2


def test_image_to_video_from_an_image(wan_i2v_gen: Generator, sd_gen: Generator) -> None:
    [still] = sd_gen.generate([{"prompt": "a still", "seed": 8}])
    assert still.image is not None
    progress = Progress()
    outputs = wan_i2v_gen.generate([{"prompt": "it moves", "seed": 1, "image": still.image, "num_frames": 9},
                                    {"prompt": "it moves more", "seed": 2, "image": still.image, "num_frames": 9}],
                                   on_step=progress)
    assert wan_i2v_gen.last_batch_sizes == [2]  # same input image: one call
    assert all(m.num_frames == 9 and m.metadata["task"] == "i2v" for m in outputs)
    assert progress.steps[-1] == (4, 4)
    solo = [wan_i2v_gen.generate([{"prompt": "it moves", "seed": 1, "image": still.image, "num_frames": 9}])[0]
            for _ in range(2)]
    assert np.array_equal(pixels(solo[0]), pixels(solo[1]))
    assert np.abs(pixels(solo[0]).astype(int) - pixels(outputs[0]).astype(int)).max() <= 2
    other = wan_i2v_gen.generate([{"prompt": "x", "seed": 1, "image": gradient(), "num_frames": 5},
                                  {"prompt": "y", "seed": 1, "image": still.image, "num_frames": 5}])
    assert wan_i2v_gen.last_batch_sizes == [1, 1]  # different images: separate calls
    assert [m.num_frames for m in other] == [5, 5]


def test_video_cancel_within_one_step(wan_gen: Generator) -> None:
    progress = Progress(cancel_after=2)
    with pytest.raises(GenerationCanceled):
        wan_gen.generate([{"prompt": "x", "seed": 1, "steps": 10}], on_step=progress,
                         should_cancel=progress.should_cancel)
    assert progress.steps == [(1, 10), (2, 10)]


# --- the other families on tiny checkpoints --------------------------------------------------------

def test_flux_text_and_image_to_image(tiny_dir: Path) -> None:
    spec = make_spec("tiny-flux", "flux", "image", ["t2i", "i2i"], pipeline_kwargs={"max_sequence_length": 32})
    gen = Generator.load(spec, tiny_dir=tiny_dir)
    [a, b] = gen.generate([{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}])
    assert gen.last_batch_sizes == [2] and a.image is not None and a.image.size == (64, 64)
    progress = Progress()
    [c] = gen.generate([{"prompt": "c", "seed": 3, "image": a.image, "strength": 0.5, "steps": 4}], on_step=progress)
    assert c.image is not None and c.image.size == (64, 64)
    assert progress.steps == [(1, 2), (2, 2)]


def test_ltx_text_and_image_to_video(tiny_dir: Path) -> None:
    spec = make_spec("tiny-ltx", "ltx", "video", ["t2v", "i2v"])
    gen = Generator.load(spec, tiny_dir=tiny_dir)
    [a, b] = gen.generate([{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}])
    assert gen.last_batch_sizes == [2] and a.num_frames == 9 and a.fps == 8
    [c] = gen.generate([{"prompt": "c", "seed": 3, "image": a.poster, "num_frames": 17}])
    assert c.num_frames == 17 and (c.width, c.height) == (64, 64) and c.metadata["task"] == "i2v"


# --- LoRA hooks -----------------------------------------------------------------------------------

def _make_lora(tiny_dir: Path, out: Path, seed: int) -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(str(tiny_dir / "tiny-sd"), subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # init_lora_weights=False: random A and B, so the adapter visibly changes the output.
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))
    return out


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_lora_adapters_switch_per_call(tiny_dir: Path, catalog: Catalog, tmp_path: Path) -> None:
    spec = catalog.get("tiny-sd")
    assert spec is not None
    gen = Generator.load(spec, tiny_dir=tiny_dir)
    style = LoraAdapter("user1/style", _make_lora(tiny_dir, tmp_path / "style", 1))
    other = LoraAdapter("other", _make_lora(tiny_dir, tmp_path / "other", 2) / "pytorch_lora_weights.safetensors",
                        scale=0.7)
    req: dict[str, Any] = {"prompt": "p", "seed": 11, "steps": 2}
    plain = pixels(gen.generate([req])[0])
    styled = pixels(gen.generate([req], adapters=[style])[0])
    assert not np.array_equal(plain, styled)
    assert np.array_equal(styled, pixels(gen.generate([req], adapters=[style])[0]))
    both = pixels(gen.generate([req], adapters=[style, other])[0])
    assert not np.array_equal(both, styled)
    assert sorted(gen.adapters.loaded()) == ["other", "user1/style"]
    assert np.array_equal(plain, pixels(gen.generate([req])[0]))  # no adapters: LoRA disabled
    gen.adapters.max_loaded = 1
    gen.generate([req], adapters=[other])
    assert gen.adapters.loaded() == ["other"]  # least recently used evicted
    assert np.array_equal(styled, pixels(gen.generate([req], adapters=[style])[0]))  # reloaded


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_lora_hotswap_reuses_one_slot_with_the_same_pixels(tiny_dir: Path, catalog: Catalog,
                                                            tmp_path: Path) -> None:
    """Hot-swap mode (what a compiled denoiser uses) swaps weights in place: the pipeline keeps one
    adapter slot, and each LoRA gives exactly the pixels it gives when loaded the ordinary way."""
    from models.adapters import AdapterManager

    spec = catalog.get("tiny-sd")
    assert spec is not None
    plain_gen = Generator.load(spec, tiny_dir=tiny_dir)
    first = LoraAdapter("a", _make_lora(tiny_dir, tmp_path / "a", 1))
    second = LoraAdapter("b", _make_lora(tiny_dir, tmp_path / "b", 2))
    req: dict[str, Any] = {"prompt": "p", "seed": 5, "steps": 2}
    expected = [pixels(plain_gen.generate([req], adapters=[lora])[0]) for lora in (first, second)]

    hot_gen = Generator.load(spec, tiny_dir=tiny_dir)
    hot_gen.adapters = AdapterManager(hot_gen.pipe, max_loaded=1, hotswap_rank=8)
    got_first = pixels(hot_gen.generate([req], adapters=[first])[0])
    got_second = pixels(hot_gen.generate([req], adapters=[second])[0])
    assert np.array_equal(got_first, expected[0]) and np.array_equal(got_second, expected[1])
    assert hot_gen.adapters.hotswaps == 1
    assert list(hot_gen.pipe.unet.peft_config) == ["slot_0"]  # swapped in place, no new modules
    assert np.array_equal(pixels(hot_gen.generate([req], adapters=[first])[0]), expected[0])
