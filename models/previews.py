"""Live step previews: a small picture of what a denoising step's latents would decode to.

Cheap by design (the batch must not slow down): per family a fixed linear projection of the latent
channels (plus a bias) to RGB, the common practice of UIs like ComfyUI and InvokeAI, applied to one
batch entry's latents (for video: the middle latent frame), downscaled to at most ``max_side``
pixels (never above the job's own size) and encoded as a small JPEG ``data:`` URL. Optionally the
tiny autoencoder of the TAESD family (``diffusers.AutoencoderTiny``) when the spec names one that
is on disk; without it, a log line and the projection.

Two halves, so the denoising thread does almost nothing: :meth:`Previewer.capture` (on that thread)
takes one entry's latent slice and copies it to the CPU (``C × h × w`` fp32: a few KB for the tiny
models, ~256 KB for SDXL at 1024², ~1 MB for FLUX; on CUDA a non-blocking copy into pinned memory
that the worker waits for, see :func:`to_host`); :meth:`Previewer.render` (in a worker thread)
projects, resizes and encodes it.

The projection factors are the published per-latent-space constants (SD 1.x/2.x, SDXL, FLUX.1,
Wan 2.1; the values ComfyUI's ``latent_formats.py`` ships). A latent space this module has no
factors for (LTX-Video's 128 channels, or a tiny random checkpoint with another channel count)
gets a deterministic fallback projection and a per-image contrast stretch: the picture then shows
structure forming, not true colours.

torch is imported inside the functions that take tensors, so :func:`encode_data_url` (PIL and
numpy only) can be used without it.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

    from models.spec import ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIDE = 128
JPEG_QUALITY = 70

# (channel -> (R, G, B)) factors and the RGB bias, per latent space; see the module doc.
_SD15 = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
         (-0.2120, -0.2616, -0.7177))
_SDXL = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
         (-0.3165, -0.2492, -0.2188))
_FLUX = ((-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433),
         (-0.0174, 0.0160, 0.0617), (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115),
         (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259), (-0.0245, 0.0250, 0.1180),
         (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
         (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
         (-0.1262, -0.0982, -0.0778))
_WAN21 = ((-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747),
          (0.0372, 0.2344, 0.1420), (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665),
          (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975), (-0.0412, 0.0267, -0.1364),
          (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
          (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950),
          (0.1984, 0.0913, 0.1861))

LATENT_RGB: dict[str, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    "sd15": (_SD15, (0.0, 0.0, 0.0)),
    "sdxl": (_SDXL, (0.1084, -0.0175, -0.0011)),
    "flux": (_FLUX, (-0.0329, -0.0718, -0.0851)),
    "wan21": (_WAN21, (-0.1835, -0.0868, -0.3360)),
}
"""Latent space -> (factors ``C × 3``, bias ``3``): ``rgb = latent · factors + bias`` in [-1, 1]."""


@dataclass(frozen=True)
class Projection:
    """A latent-to-RGB map: ``rgb = latent · factors + bias``; ``stretch``: normalize each image's
    range (the fallback, whose output has no calibrated range)."""

    name: str
    factors: np.ndarray  # (C, 3) float32
    bias: np.ndarray  # (3,) float32
    stretch: bool = False

    @property
    def channels(self) -> int:
        return int(self.factors.shape[0])


def fallback_projection(channels: int) -> Projection:
    """A deterministic projection for a latent space without published factors: fixed pseudo-random
    weights seeded by the channel count (the same on every replica and run), each output colour
    a unit-L1 mix of the channels, shown with a per-image contrast stretch."""
    rng = np.random.default_rng(1000 + channels)
    factors = rng.standard_normal((channels, 3)).astype(np.float32)
    factors /= np.maximum(np.abs(factors).sum(axis=0, keepdims=True), 1e-6)
    return Projection(f"fallback{channels}", factors, np.zeros(3, np.float32), stretch=True)


def latent_space(family: str, channels: int, pipeline_class: str = "") -> str | None:
    """The published latent space a family's latents live in, if their channel count matches."""
    if family == "stable_diffusion" and channels == 4:
        return "sdxl" if "XL" in pipeline_class else "sd15"
    if family == "flux" and channels == 16:
        return "flux"
    if family == "wan" and channels == 16:
        return "wan21"
    return None


def projection_for(family: str, channels: int, pipeline_class: str = "") -> Projection:
    space = latent_space(family, channels, pipeline_class)
    if space is None:
        return fallback_projection(channels)
    factors, bias = LATENT_RGB[space]
    return Projection(space, np.asarray(factors, np.float32), np.asarray(bias, np.float32))


def project(latent: np.ndarray, projection: Projection) -> np.ndarray:
    """One entry's latents ``(C, h, w)`` -> an RGB ``uint8`` array ``(h, w, 3)``."""
    if latent.ndim != 3 or latent.shape[0] != projection.channels:
        raise ValueError(f"expected latents (C={projection.channels}, h, w), got {latent.shape}")
    rgb = np.einsum("chw,ck->hwk", latent.astype(np.float32, copy=False), projection.factors) + projection.bias
    if projection.stretch:
        low, high = float(rgb.min()), float(rgb.max())
        rgb = (rgb - low) / (high - low) if high - low > 1e-6 else np.zeros_like(rgb)
    else:
        rgb = (rgb + 1.0) / 2.0
    return (np.clip(np.nan_to_num(rgb, nan=0.5), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def preview_size(width: int, height: int, max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """The preview's size: the job's aspect, longest side ``max_side`` at most, never above the job's size."""
    width, height = max(1, int(width)), max(1, int(height))
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_data_url(image: Image.Image | np.ndarray, size: tuple[int, int] | None = None,
                    quality: int = JPEG_QUALITY) -> str:
    """``image`` (resized to ``size`` if given) as a ``data:image/jpeg;base64,...`` URL."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, "RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")
    if size is not None and image.size != size:
        shrinking = size[0] < image.width or size[1] < image.height
        image = image.resize(size, Image.Resampling.BILINEAR if shrinking else Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class PreviewImage:
    data_url: str
    width: int
    height: int


@dataclass(frozen=True)
class Captured:
    """One entry's latents taken on the denoising thread: ``(C, h, w)``, on the CPU for the
    projection, still on the device (a copy) for TAESD; and the size the preview is shown at.
    ``ready``: what the worker waits on before reading ``latent`` (a CUDA event after the
    asynchronous copy), or None when it is already there."""

    latent: Any
    width: int
    height: int
    ready: Any = None


class Previewer:
    """Previews for one loaded pipeline (see the module doc)."""

    def __init__(self, family: str, *, pipe: Any = None, max_side: int = DEFAULT_MAX_SIDE,
                 taesd: Any = None, pipeline_class: str | None = None) -> None:
        self.family = family
        self.pipe = pipe
        self.max_side = max_side
        self.taesd = taesd
        self.pipeline_class = pipeline_class if pipeline_class is not None else type(pipe).__name__
        self._projections: dict[int, Projection] = {}

    @property
    def decoder(self) -> str:
        return "taesd" if self.taesd is not None else "projection"

    @classmethod
    def for_spec(cls, spec: ModelSpec, pipe: Any, device: str = "cpu") -> Previewer:
        """The previewer a spec asks for: TAESD when named and loadable, else the projection."""
        opts = spec.previews
        taesd = None
        if opts.decoder == "taesd":
            taesd = load_taesd(opts.taesd_source, device, getattr(getattr(pipe, "vae", None), "dtype", None))
        return cls(str(spec.family), pipe=pipe, max_side=opts.max_side, taesd=taesd)

    def projection(self, channels: int) -> Projection:
        found = self._projections.get(channels)
        if found is None:
            found = self._projections[channels] = projection_for(self.family, channels, self.pipeline_class)
            if found.stretch:
                logger.info("previews for %s: no published factors for %d latent channels; using the "
                            "fallback projection", self.family, channels)
        return found

    # denoising thread ---------------------------------------------------------------------------
    def capture(self, latents: torch.Tensor, index: int, call: dict[str, Any]) -> Captured:
        """Entry ``index`` of a step's ``latents`` as ``(C, h, w)`` (video: the middle latent frame),
        copied off the pipeline's tensor; ``call`` is the pipeline call's kwargs (size, frames)."""
        import torch

        with torch.no_grad():
            entry = self.spatial(latents, call)[index]
            entry = entry.detach()
            ready = None
            if self.taesd is not None:
                entry = entry.clone()
            else:
                entry, ready = to_host(entry)
        width = int(call.get("width") or entry.shape[-1] * 8)
        height = int(call.get("height") or entry.shape[-2] * 8)
        return Captured(entry, width, height, ready)

    def spatial(self, latents: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        """The step's latents as ``(B, C, h, w)``: packed token sequences unpacked (FLUX, LTX), the
        middle frame of a video's ``(B, C, F, h, w)``."""
        if latents.ndim == 3:
            latents = self._unpack(latents, call)
        if latents.ndim == 5:
            latents = latents[:, :, latents.shape[2] // 2]
        if latents.ndim != 4:
            raise ValueError(f"latents of shape {tuple(latents.shape)} are not an image or video")
        return latents

    def _unpack(self, latents: torch.Tensor, call: dict[str, Any]) -> torch.Tensor:
        pipe = self.pipe
        height, width = int(call["height"]), int(call["width"])
        if self.family == "flux":
            return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        if self.family == "ltx":
            frames = (int(call["num_frames"]) - 1) // pipe.vae_temporal_compression_ratio + 1
            ratio = pipe.vae_spatial_compression_ratio
            return pipe._unpack_latents(latents, frames, height // ratio, width // ratio,
                                        pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)
        raise ValueError(f"packed latents of family {self.family} are not supported")

    # worker thread --------------------------------------------------------------------------------
    def render(self, captured: Captured) -> PreviewImage:
        """Project (or TAESD-decode), resize and encode one captured entry."""
        size = preview_size(captured.width, captured.height, self.max_side)
        if captured.ready is not None:
            captured.ready.synchronize()  # the asynchronous copy to the host has landed
        if self.taesd is not None:
            rgb = taesd_decode(self.taesd, captured.latent)
        else:
            rgb = project(np.asarray(captured.latent.numpy()), self.projection(int(captured.latent.shape[0])))
        return PreviewImage(encode_data_url(rgb, size), size[0], size[1])


def to_host(entry: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A float32 CPU copy of ``entry`` and what to wait on before reading it (None: ready now).

    On CUDA the denoising thread only queues the work: a non-blocking copy into pinned host memory
    and a CUDA event recorded after it on the current stream (so it follows the step that wrote
    the latents; the worker synchronizes on the event). Elsewhere a plain copy (CPU: no transfer)."""
    import torch

    if entry.device.type != "cuda":
        return entry.to("cpu", torch.float32, copy=True), None
    host = torch.empty(tuple(entry.shape), dtype=torch.float32, pin_memory=True)
    host.copy_(entry.to(torch.float32), non_blocking=True)  # fp16/bf16 widened on the device first
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(entry.device))
    return host, ready


def load_taesd(source: str | None, device: str = "cpu", dtype: Any = None) -> Any:
    """The tiny autoencoder at ``source`` (a local diffusers directory, or a Hugging Face repo already
    in the cache: nothing is downloaded), on ``device``; None with a log line when it is absent."""
    if not source:
        logger.warning("previews: decoder taesd without taesd_source; using the latent projection")
        return None
    try:
        from diffusers import AutoencoderTiny

        local = Path(source).expanduser()
        target = str(local) if local.is_dir() else source
        vae = AutoencoderTiny.from_pretrained(target, local_files_only=True)
        vae = vae.to(device=device, dtype=dtype) if dtype is not None else vae.to(device)
        vae.eval().requires_grad_(False)
    except Exception as exc:  # noqa: BLE001 - absent or unreadable: the projection still works
        logger.warning("previews: the tiny autoencoder %s is not available (%s: %s); using the latent "
                       "projection", source, type(exc).__name__, exc)
        return None
    logger.info("previews: decoding with the tiny autoencoder %s", source)
    return vae


def taesd_decode(vae: Any, latent: torch.Tensor) -> np.ndarray:
    """One entry ``(C, h, w)`` decoded by the tiny autoencoder to an RGB ``uint8`` array."""
    import torch

    scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
    with torch.no_grad():  # as the pipeline decodes, with the tiny autoencoder in the VAE's place
        sample = vae.decode((latent.unsqueeze(0) / scaling + shift).to(vae.device, vae.dtype)).sample[0]
    rgb = ((sample.float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)
    return rgb.permute(1, 2, 0).cpu().numpy()
