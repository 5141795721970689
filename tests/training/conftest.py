"""Fixtures for the training tests: tiny checkpoints built once per session, a few test photos.

Torch gets ONE thread here: on this 2-core machine other test runs share the cores, and two
OpenMP threads fighting for them ran tiny training steps 10–20× slower than one thread did.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from models.catalog import Catalog
from models.generator import limit_threads
from models.loading import LoadedPipeline, load_pipeline
from models.spec import ModelSpec
from models.tiny import make_tiny
from training.dataset import TrainingImage

TRAINING_TINY = ("tiny-sd", "tiny-wan", "tiny-flux")


def build_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build (or reuse) the tiny checkpoints the training tests need, once per session: later calls
    find the completion markers and build nothing."""
    out = tmp_path_factory.getbasetemp() / "tiny-training"
    make_tiny(out, TRAINING_TINY)
    return out


def make_images(n: int = 4, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """``n`` distinct test photos: a coloured disc and a bar on a coloured background."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        bg, fg, bar = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        r = size // 4
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
        draw.rectangle((0, size - size // 8, size, size), fill=bar)
        images.append(img)
    return images


def training_images(n: int = 4, size: int = 64) -> list[TrainingImage]:
    captions: list[str | None] = [None, "a TOK toy on a table", None, "studio shot"]
    return [TrainingImage(img, captions[i % len(captions)]) for i, img in enumerate(make_images(n, size))]


def tiny_training_spec(model_id: str) -> ModelSpec:
    """Specs for the tiny checkpoints the catalog does not ship as trainable models."""
    family, kind, tasks = {"tiny-wan": ("wan", "video", ["t2v"]), "tiny-flux": ("flux", "image", ["t2i"])}[model_id]
    return ModelSpec.model_validate({
        "id": model_id, "kind": kind, "tasks": tasks, "family": family, "source": {"tiny": model_id},
        "dtype": "float32", "trainable": True, "optimizations": {"xformers": False},
        "defaults": {"width": 64, "height": 64, "steps": 3, "guidance": 3.0,
                     **({"num_frames": 5, "fps": 8} if kind == "video" else {})},
        "limits": {"training_steps": [2, 100], "training_resolutions": [64]},
    })


def build_tiny_sdxl(out: Path, tiny_sd: Path) -> Path:
    """A tiny SDXL checkpoint (``models.tiny`` builds none): two CLIP text encoders, a UNet with
    ``text_time`` conditioning, sized as in diffusers' own SDXL tests, and tiny-sd's tokenizer."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if (out / "model_index.json").is_file():
        return out
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64)
        vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                            latent_channels=4, scaling_factor=0.13025)
        config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32)
        tokenizer = CLIPTokenizer.from_pretrained(str(tiny_sd / "tokenizer"))
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
            scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1))
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="package", autouse=True)
def _one_thread() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    previous = limit_threads(1)
    yield
    limit_threads(previous)
    mp.undo()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def sd_spec() -> ModelSpec:
    spec = Catalog.load().get("tiny-sd")
    assert spec is not None and spec.trainable
    return spec


@pytest.fixture(scope="package")
def sd_loaded(tiny_dir: Path, sd_spec: ModelSpec) -> LoadedPipeline:
    return load_pipeline(sd_spec, tiny_dir)
