"""Live step previews: the latent-to-RGB projections, sizes and JPEG bounds, every family's latents
through a real tiny pipeline, the tiny autoencoder (present and absent), and the spec's defaults."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.catalog import Catalog
from models.generator import Generator
from models.previews import (
    LATENT_RGB,
    Captured,
    Previewer,
    encode_data_url,
    fallback_projection,
    load_taesd,
    preview_size,
    project,
    projection_for,
    to_host,
)
from models.spec import ModelSpec
from tests.models.helpers import make_spec, tiny_spec


def decode(data_url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert data_url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):])))
    assert image.format == "JPEG"
    return image


@pytest.mark.parametrize(("family", "channels", "pipeline_class", "space"), [
    ("stable_diffusion", 4, "StableDiffusionPipeline", "sd15"),
    ("stable_diffusion", 4, "StableDiffusionXLPipeline", "sdxl"),
    ("flux", 16, "FluxPipeline", "flux"),
    ("wan", 16, "WanPipeline", "wan21"),
])
def test_published_projection_per_family(family: str, channels: int, pipeline_class: str, space: str) -> None:
    projection = projection_for(family, channels, pipeline_class)
    assert projection.name == space and not projection.stretch
    assert projection.factors.shape == (channels, 3) and projection.factors.dtype == np.float32
    assert projection.bias.shape == (3,)
    assert np.allclose(projection.factors, np.asarray(LATENT_RGB[space][0]))
    latent = np.random.default_rng(0).standard_normal((channels, 12, 20)).astype(np.float32)
    rgb = project(latent, projection)
    assert rgb.shape == (12, 20, 3) and rgb.dtype == np.uint8
    # a zero latent is the bias, mapped from [-1, 1] to [0, 255]
    flat = project(np.zeros((channels, 2, 2), np.float32), projection)
    expected = np.round((np.asarray(LATENT_RGB[space][1]) + 1) / 2 * 255)
    assert np.abs(flat[0, 0].astype(int) - expected).max() <= 1


def test_projection_is_the_linear_map() -> None:
    projection = projection_for("stable_diffusion", 4, "StableDiffusionPipeline")
    latent = np.zeros((4, 1, 1), np.float32)
    latent[0, 0, 0] = 1.0  # channel 0 only: its factors row, shifted to [0, 1]
    r, g, b = LATENT_RGB["sd15"][0][0]
    got = project(latent, projection)[0, 0]
    assert got.tolist() == [round((v + 1) / 2 * 255) for v in (r, g, b)]


def test_fallback_is_deterministic_and_stretched() -> None:
    first, again, other = fallback_projection(8), fallback_projection(8), fallback_projection(128)
    assert np.array_equal(first.factors, again.factors) and first.stretch
    assert first.factors.shape == (8, 3) and other.factors.shape == (128, 3)
    assert np.allclose(np.abs(first.factors).sum(axis=0), 1.0)
    assert projection_for("ltx", 128).stretch  # no published factors: the fallback
    assert projection_for("stable_diffusion", 8).stretch  # a tiny checkpoint's other channel count
    rgb = project(np.random.default_rng(1).standard_normal((8, 6, 6)).astype(np.float32), first)
    assert rgb.min() == 0 and rgb.max() == 255  # the whole range used
    assert project(np.zeros((8, 3, 3), np.float32), first).max() == 0  # flat: no division by zero


def test_projection_refuses_wrong_channels() -> None:
    with pytest.raises(ValueError, match="C=4"):
        project(np.zeros((16, 2, 2), np.float32), projection_for("stable_diffusion", 4))


@pytest.mark.parametrize(("size", "expected"), [
    ((64, 64), (64, 64)),  # never upscaled above the job
    ((1024, 1024), (128, 128)),
    ((1280, 720), (128, 72)),
    ((480, 832), (74, 128)),
])
def test_preview_size(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert preview_size(*size) == expected
    assert max(preview_size(*size)) <= 128


def test_jpeg_data_url_size_bounds() -> None:
    noise = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)  # worst case: noise
    url = encode_data_url(noise, (128, 128))
    image = decode(url)
    assert image.size == (128, 128) and image.mode == "RGB"
    assert len(url) < 12_000  # a small event even for noise
    smooth = np.repeat(np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None], 128, axis=0).repeat(3, axis=2)
    assert len(encode_data_url(smooth)) < 4_000


FAMILIES = [
    ("tiny-sd", None, "sd15", (64, 64)),
    ("tiny-wan", None, "wan21", (64, 64)),
    ("tiny-flux", ("flux", "image", ["t2i"]), "fallback4", (64, 64)),  # tiny: 4 latent channels
    ("tiny-ltx", ("ltx", "video", ["t2v"]), "fallback8", (64, 64)),  # packed 128→8 channels
]


@pytest.mark.parametrize(("model_id", "extra", "space", "size"), FAMILIES)
def test_previews_from_each_family_pipeline(tiny_dir: Path, catalog: Catalog, model_id: str,
                                            extra: tuple[str, str, list[str]] | None, space: str,
                                            size: tuple[int, int]) -> None:
    """Real latents, as the pipeline's step callback hands them over, become previews of two entries."""
    if extra is None:
        spec = tiny_spec(catalog, model_id)
    else:
        spec = make_spec(model_id, *extra)
    generator = Generator.load(spec, tiny_dir=tiny_dir)
    previewer = Previewer.for_spec(spec, generator.pipe)
    seen: list[tuple[int, int, Any]] = []

    def on_latents(done: int, total: int, indices: Any, latents: torch.Tensor, call: Any) -> None:
        for row in range(len(indices)):
            seen.append((done, total, previewer.capture(latents, row, dict(call))))

    request = {"prompt": "a red square", "steps": 2, "seed": 1}
    if spec.kind == "video":
        request["num_frames"] = 9
    generator.generate([request, {**request, "prompt": "blue", "seed": 2}], on_latents=on_latents)
    assert [(d, t) for d, t, _ in seen] == [(1, 2), (1, 2), (2, 2), (2, 2)]
    for _, _, captured in seen:
        assert captured.latent.device.type == "cpu" and captured.latent.dtype == torch.float32
        assert captured.latent.ndim == 3
        image = previewer.render(captured)
        assert (image.width, image.height) == size
        assert decode(image.data_url).size == size
    assert previewer.projection(int(seen[0][2].latent.shape[0])).name == space
    assert previewer.decoder == "projection"


def test_capture_takes_the_middle_frame_of_a_video() -> None:
    previewer = Previewer("wan", pipeline_class="WanPipeline")
    latents = torch.zeros(2, 16, 5, 4, 6)
    latents[1, :, 2] = 1.0  # entry 1, middle frame
    captured = previewer.capture(latents, 1, {"width": 48, "height": 32, "num_frames": 17})
    assert tuple(captured.latent.shape) == (16, 4, 6) and bool((captured.latent == 1).all())
    assert (captured.width, captured.height) == (48, 32)


def test_capture_on_the_cpu_is_a_plain_copy_ready_at_once() -> None:
    previewer = Previewer("stable_diffusion", pipeline_class="StableDiffusionPipeline")
    latents = torch.ones(1, 4, 4, 4, dtype=torch.float16)
    captured = previewer.capture(latents, 0, {"width": 32, "height": 32})
    assert captured.ready is None and captured.latent.dtype == torch.float32
    latents.zero_()  # the pipeline goes on with its tensor: the capture is a copy
    assert bool((captured.latent == 1).all())
    host, ready = to_host(torch.ones(4, 2, 2))
    assert ready is None and host.device.type == "cpu"


def test_render_waits_for_the_capture_to_be_ready_before_reading() -> None:
    """A capture still in flight (on CUDA: the event after the non-blocking copy) is waited for in
    the worker, before the latents are read; here a stand-in event fills them when waited on."""
    previewer = Previewer("stable_diffusion", pipeline_class="StableDiffusionPipeline")
    latent = torch.full((4, 4, 4), float("nan"))  # unreadable until the copy "lands"
    waited: list[bool] = []

    class Landing:
        def synchronize(self) -> None:
            latent.fill_(0.5)
            waited.append(True)

    image = previewer.render(Captured(latent, 32, 32, Landing()))
    assert waited == [True]
    assert image.data_url.startswith("data:image/jpeg;base64,") and (image.width, image.height) == (32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_on_cuda_copies_asynchronously_into_pinned_memory() -> None:
    previewer = Previewer("stable_diffusion", pipeline_class="StableDiffusionXLPipeline")
    latents = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.float16)  # SDXL 1024² latents
    expected = latents[1].float().cpu()
    captured = previewer.capture(latents, 1, {"width": 1024, "height": 1024})
    assert isinstance(captured.ready, torch.cuda.Event)
    assert captured.latent.device.type == "cpu" and captured.latent.is_pinned()
    assert captured.latent.dtype == torch.float32 and tuple(captured.latent.shape) == (4, 128, 128)
    image = previewer.render(captured)  # synchronizes on the event first
    assert captured.ready.query()
    assert torch.equal(captured.latent, expected)
    assert (image.width, image.height) == (128, 128)


def _tiny_taesd(path: Path) -> Path:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                    latent_channels=4).save_pretrained(path)
    return path


def test_taesd_decoder_when_present(tmp_path: Path) -> None:
    source = _tiny_taesd(tmp_path / "taesd")
    spec = make_spec("tiny-sd", "stable_diffusion", "image", ["t2i"],
                     previews={"every_k_steps": 1, "decoder": "taesd", "taesd_source": str(source)})
    previewer = Previewer.for_spec(spec, None)
    assert previewer.decoder == "taesd"
    captured = previewer.capture(torch.randn(1, 4, 8, 8), 0, {"width": 64, "height": 64})
    image = previewer.render(captured)
    assert (image.width, image.height) == (64, 64)  # the decoder's 64 px, at the job's size
    assert decode(image.data_url).size == (64, 64)


def test_taesd_absent_falls_back_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = make_spec("tiny-sd", "stable_diffusion", "image", ["t2i"],
                     previews={"decoder": "taesd", "taesd_source": str(tmp_path / "missing")})
    with caplog.at_level(logging.WARNING, logger="models.previews"):
        previewer = Previewer.for_spec(spec, None)
    assert previewer.decoder == "projection"
    assert "not available" in caplog.text and "projection" in caplog.text
    assert load_taesd(None) is None


def test_spec_preview_defaults(catalog: Catalog) -> None:
    image = make_spec("x-img", "stable_diffusion", "image", ["t2i"])
    video = make_spec("x-vid", "wan", "video", ["t2v"])
    assert image.preview_every == 2 and video.preview_every == 0  # on for images, off for video
    assert make_spec("x", "stable_diffusion", "image", ["t2i"], previews={"every_k_steps": 0}).preview_every == 0
    with pytest.raises(ValueError, match="taesd_source"):
        make_spec("x", "stable_diffusion", "image", ["t2i"], previews={"decoder": "taesd"})
    assert tiny_spec(catalog, "tiny-sd").preview_every == 2
    assert tiny_spec(catalog, "tiny-wan").preview_every == 2  # tiny video opts in for the tests
    for model_id in ("wan2.1-t2v-1.3b", "ltx-video"):
        spec = catalog.get(model_id)
        assert isinstance(spec, ModelSpec) and spec.preview_every == 0
