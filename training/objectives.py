"""What one training step computes, per kind of denoiser: how text and images are encoded and
which noise objective the loss uses.

- :class:`DDPMObjective`: Stable Diffusion 1.x/2.x and SDXL UNets. Noise at a random DDPM timestep; the target is
  the noise (``epsilon``), the velocity (``v_prediction``) or the clean latents (``sample``), as
  the checkpoint's scheduler config says.
- :class:`WanObjective`, :class:`FluxObjective`: flow-matching transformers. A point
  ``(1 - σ)·x0 + σ·noise`` on the straight path; the target is ``noise - x0``. σ is drawn uniformly
  over the scheduler's (shifted) training sigmas, as diffusers' flow-matching scripts do with the
  ``none`` weighting.

Text goes through the pipeline's own ``encode_prompt`` so training sees exactly the embeddings
inference will (an empty caption becomes the unconditional embedding of classifier-free guidance).
Every random draw takes an explicit ``torch.Generator`` so a resumed run can continue the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

logger = logging.getLogger(__name__)

TextEmbeds = dict[str, torch.Tensor]


def _randn(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU generator (whose state a checkpoint saves), then moved: the same stream on
    # any device.
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(like.device, like.dtype)


class Objective:
    """Base: latent statistics of an image, text embeddings, and the loss of one batch."""

    def __init__(self, pipe: DiffusionPipeline, denoiser: torch.nn.Module, device: str,
                 pipeline_kwargs: Mapping[str, Any] | None = None) -> None:
        self.pipe = pipe
        self.denoiser = denoiser
        self.device = torch.device(device)
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.vae = pipe.vae

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # images ------------------------------------------------------------------------------------
    @torch.no_grad()
    def latent_stats(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE's latent distribution for ``pixels`` (``(1, 3, H, W)`` in [-1, 1]).

        Cached by the trainer per (image, flip): a step then only draws ``mean + std·ε``, which is
        what sampling the distribution each step would give, without running the encoder again.
        """
        vae = self.vae
        upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if upcast:  # the SDXL VAE overflows to NaN in fp16; latents are cached, so this runs rarely
            vae.to(torch.float32)
        try:
            dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        finally:
            if upcast:
                vae.to(torch.float16)
        return dist.mean.float(), dist.std.float()

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents to the space the denoiser works in."""
        raise NotImplementedError

    def sample_latents(self, stats: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        mean, std = stats
        return self.normalize(mean + std * _randn(mean.shape, generator, mean))

    # text --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, caption: str) -> TextEmbeds:
        raise NotImplementedError

    def collate(self, items: Sequence[TextEmbeds]) -> TextEmbeds:
        return {key: torch.cat([item[key] for item in items]) for key in items[0]}

    # loss --------------------------------------------------------------------------------------
    def loss(self, latents: torch.Tensor, text: TextEmbeds, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class DDPMObjective(Objective):
    """Stable Diffusion UNets (epsilon or v-prediction). SDXL adds the pooled text embedding and
    the size/crop "time ids" as extra conditioning: here the target size, no crop offset, which is
    what inference passes by default."""

    def __init__(self, pipe: DiffusionPipeline, denoiser: torch.nn.Module, device: str,
                 pipeline_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__(pipe, denoiser, device, pipeline_kwargs)
        self.xl = getattr(pipe, "text_encoder_2", None) is not None
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction type {self.prediction_type!r}")
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.scaling_factor

    @torch.no_grad()
    def encode_text(self, caption: str) -> TextEmbeds:
        if self.xl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=caption, device=self.device,
                                                           num_images_per_prompt=1, do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "text_embeds": pooled}
        embeds, _ = self.pipe.encode_prompt(caption, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def _added_cond(self, latents: torch.Tensor, text: TextEmbeds) -> dict[str, torch.Tensor] | None:
        if not self.xl:
            return None
        scale = int(self.pipe.vae_scale_factor)
        h, w = latents.shape[-2] * scale, latents.shape[-1] * scale
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
        return {"text_embeds": text["text_embeds"].to(self.dtype), "time_ids": time_ids.repeat(latents.shape[0], 1)}

    def loss(self, latents: torch.Tensor, text: TextEmbeds, generator: torch.Generator) -> torch.Tensor:
        latents = latents.to(self.dtype)
        noise = _randn(latents.shape, generator, latents)
        n = int(self.scheduler.config.num_train_timesteps)
        timesteps = torch.randint(0, n, (latents.shape[0],), generator=generator).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        pred = self.denoiser(noisy, timesteps, text["encoder_hidden_states"].to(self.dtype),
                             added_cond_kwargs=self._added_cond(latents, text), return_dict=False)[0]
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        return F.mse_loss(pred.float(), target.float(), reduction="mean")


class FlowMatchObjective(Objective):
    """Rectified-flow transformers: subclasses say how to call their denoiser."""

    def __init__(self, pipe: DiffusionPipeline, denoiser: torch.nn.Module, device: str,
                 pipeline_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__(pipe, denoiser, device, pipeline_kwargs)
        # A fresh scheduler holds the training sigmas (shift applied unless it shifts dynamically).
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def sigmas_and_timesteps(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.scheduler.timesteps)
        u = torch.rand((batch,), generator=generator)
        index = (u * n).long().clamp(max=n - 1)
        return self.scheduler.sigmas[index].float(), self.scheduler.timesteps[index].float()

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextEmbeds) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, latents: torch.Tensor, text: TextEmbeds, generator: torch.Generator) -> torch.Tensor:
        latents = latents.to(self.dtype)
        noise = _randn(latents.shape, generator, latents)
        sigmas, timesteps = self.sigmas_and_timesteps(latents.shape[0], generator)
        sigma = sigmas.to(self.device, latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigma) * latents + sigma * noise
        pred = self.predict(noisy, timesteps.to(self.device), text)
        return F.mse_loss(pred.float(), (noise - latents).float(), reduction="mean")


class WanObjective(FlowMatchObjective):
    """Wan 2.1 text-to-video transformers, trained on still images as one-frame videos."""

    def __init__(self, pipe: DiffusionPipeline, denoiser: torch.nn.Module, device: str,
                 pipeline_kwargs: Mapping[str, Any] | None = None) -> None:
        from diffusers import WanImageToVideoPipeline

        if isinstance(pipe, WanImageToVideoPipeline):
            raise NotImplementedError("LoRA training for Wan image-to-video checkpoints is not implemented")
        if getattr(pipe, "transformer_2", None) is not None:
            raise NotImplementedError("LoRA training for two-expert Wan 2.2 checkpoints is not implemented")
        super().__init__(pipe, denoiser, device, pipeline_kwargs)
        z = int(self.vae.config.z_dim)
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
        self.latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)

    @torch.no_grad()
    def latent_stats(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().latent_stats(pixels.unsqueeze(2))  # (B, 3, H, W) -> one frame (B, 3, 1, H, W)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self.latents_mean.to(latents.device), self.latents_std.to(latents.device)
        return (latents - mean) / std

    @torch.no_grad()
    def encode_text(self, caption: str) -> TextEmbeds:
        max_len = int(self.pipeline_kwargs.get("max_sequence_length", 512))
        embeds, _ = self.pipe.encode_prompt(caption, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                            max_sequence_length=max_len, device=self.device)
        return {"encoder_hidden_states": embeds}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextEmbeds) -> torch.Tensor:
        return self.denoiser(hidden_states=noisy, timestep=timesteps,
                             encoder_hidden_states=text["encoder_hidden_states"].to(self.dtype),
                             return_dict=False)[0]


class FluxObjective(FlowMatchObjective):
    """FLUX.1 transformers: latents packed in 2×2 patches, positional ids, distilled guidance."""

    guidance_scale = 3.5
    """The guidance embedding value during training (diffusers' Flux LoRA script default)."""

    def __init__(self, pipe: DiffusionPipeline, denoiser: torch.nn.Module, device: str,
                 pipeline_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__(pipe, denoiser, device, pipeline_kwargs)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode_text(self, caption: str) -> TextEmbeds:
        max_len = int(self.pipeline_kwargs.get("max_sequence_length", 512))
        embeds, pooled, text_ids = self.pipe.encode_prompt(caption, None, device=self.device,
                                                           num_images_per_prompt=1, max_sequence_length=max_len)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def collate(self, items: Sequence[TextEmbeds]) -> TextEmbeds:
        # txt_ids carry no batch dimension: every caption has the same (sequence, 3) ids.
        return {"encoder_hidden_states": torch.cat([i["encoder_hidden_states"] for i in items]),
                "pooled_projections": torch.cat([i["pooled_projections"] for i in items]),
                "txt_ids": items[0]["txt_ids"]}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextEmbeds) -> torch.Tensor:
        # The loss is an MSE over all elements, so comparing in the packed layout equals comparing
        # unpacked: pack the input, unpack the prediction.
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        guidance = None
        if getattr(self.denoiser.config, "guidance_embeds", False):
            guidance = torch.full((b,), self.guidance_scale, device=noisy.device, dtype=torch.float32)
        pred = self.denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                             pooled_projections=text["pooled_projections"].to(self.dtype),
                             encoder_hidden_states=text["encoder_hidden_states"].to(self.dtype),
                             txt_ids=text["txt_ids"], img_ids=img_ids, return_dict=False)[0]
        vae_scale = int(self.pipe.vae_scale_factor)
        return FluxPipeline._unpack_latents(pred, h * vae_scale, w * vae_scale, vae_scale)


def make_objective(pipe: DiffusionPipeline, denoiser_attr: str, device: str,
                   pipeline_kwargs: Mapping[str, Any] | None = None) -> Objective:
    """The objective for ``pipe``'s denoiser; NotImplementedError for families not trainable yet."""
    from diffusers import FluxPipeline, WanPipeline

    denoiser = getattr(pipe, denoiser_attr)
    if denoiser_attr == "unet":
        return DDPMObjective(pipe, denoiser, device, pipeline_kwargs)
    if isinstance(pipe, FluxPipeline):
        return FluxObjective(pipe, denoiser, device, pipeline_kwargs)
    if isinstance(pipe, WanPipeline) or type(pipe).__name__.startswith("Wan"):
        return WanObjective(pipe, denoiser, device, pipeline_kwargs)
    raise NotImplementedError(f"LoRA training is not implemented for {type(pipe).__name__}")
