"""Tiny random-weight checkpoints of real diffusers architectures, built offline.

Every test and the demo run on these: the architectures (and so the code paths: loading,
batching, callbacks, LoRA, encoding) are the real ones, only the sizes are tiny and the weights
random, so the output is noise. Each checkpoint is written with ``save_pretrained`` and loads with
the plain ``DiffusionPipeline.from_pretrained(dir)``, exactly like a downloaded one.

Weights are deterministic: every model is built under its own fixed seed, so every machine makes
byte-identical tensors and a test's expected pixels do not depend on who built the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import string
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers import models as tok_models
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from models.sources import TINY_MARKER

try:  # transformers 5 without torchvision: name the PIL backend directly (same config, no warning)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor

logger = logging.getLogger(__name__)

TINY_VERSION = 1
"""Bumped whenever a builder changes; a checkpoint built by another version is rebuilt."""

MARKER = TINY_MARKER
"""Written last into each checkpoint directory: its presence means the build completed."""

DEFAULT_TINY = ("tiny-sd", "tiny-wan", "tiny-wan-i2v", "tiny-sd-x4-upscaler")
"""What ``make_tiny(dir)`` builds when no names are given: the checkpoints the catalog ships."""

_SEEDS = {"tiny-sd": 0, "tiny-wan": 1, "tiny-wan-i2v": 2, "tiny-flux": 3, "tiny-ltx": 4, "tiny-sd-x4-upscaler": 5}


# --- tokenizers, written locally (no download) -------------------------------------------------

_CHARS = string.ascii_lowercase + string.digits + string.punctuation


def _clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single characters (no merges): real class, tiny vocabulary."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    # Without model_max_length the tokenizer pads to a huge default ("int too big to convert").
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length,
                         pad_token="<|endoftext|>")


def _t5_like_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with T5's special tokens (``<pad>``=0, ``</s>``=1)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _clip_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=5, vocab_size=1000, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=32, max_position_embeddings=77)
    return CLIPTextModel(config)


def _t5_config(cls: type[T5Config] | type[UMT5Config]) -> T5Config | UMT5Config:
    return cls(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0)


def _sd_vae(**extra: object) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, **extra)


def _wan_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def _wan_transformer(in_channels: int, image_dim: int | None) -> WanTransformer3DModel:
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=16, text_dim=32, freq_dim=256,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                                 image_dim=image_dim)


# --- builders ----------------------------------------------------------------------------------

def _build_sd() -> DiffusionPipeline:
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=_sd_vae(), text_encoder=_clip_text_encoder(), tokenizer=_clip_tokenizer(), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _build_sd_upscaler() -> DiffusionPipeline:
    """The SD x4 upscaler: the UNet takes 4 latent + 3 low-res image channels and the noise level
    as a class label; the VAE has three blocks (two 2× stages), so it decodes to 4× the latents."""
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        num_class_embeds=400)  # > the pipeline's max_noise_level (350)
    vae = AutoencoderKL(block_out_channels=[16, 16, 32], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, scaling_factor=0.08333)
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction")
    return StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=_clip_text_encoder(), tokenizer=_clip_tokenizer(), unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear"), scheduler=scheduler,
        max_noise_level=350)


def _build_wan() -> DiffusionPipeline:
    return WanPipeline(
        tokenizer=_t5_like_tokenizer(), text_encoder=UMT5EncoderModel(_t5_config(UMT5Config)),
        vae=_wan_vae(), transformer=_wan_transformer(in_channels=16, image_dim=None),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def _build_wan_i2v() -> DiffusionPipeline:
    """Wan 2.1 image-to-video: the transformer takes 16 noise + 4 mask + 16 condition channels
    and cross-attends to CLIP vision features (``image_dim`` = the vision hidden size)."""
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, projection_dim=16,
                                              num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                              patch_size=8))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   do_resize=True, do_center_crop=True, do_normalize=True,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711], resample=3)
    return WanImageToVideoPipeline(
        tokenizer=_t5_like_tokenizer(), text_encoder=UMT5EncoderModel(_t5_config(UMT5Config)),
        vae=_wan_vae(), transformer=_wan_transformer(in_channels=36, image_dim=16),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), image_encoder=vision,
        image_processor=processor)


def _build_flux() -> DiffusionPipeline:
    # Flux packs 2x2 latent patches: in_channels = 4 * latent_channels; rope axes sum to head dim.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32,
                                         axes_dims_rope=(4, 4, 8))
    vae = _sd_vae(shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_clip_text_encoder(),
        tokenizer=_clip_tokenizer(), text_encoder_2=T5EncoderModel(_t5_config(T5Config)),
        tokenizer_2=_t5_like_tokenizer(), transformer=transformer)


def _build_ltx() -> DiffusionPipeline:
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8,
                                             cross_attention_dim=32, num_layers=1, caption_channels=32)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                       text_encoder=T5EncoderModel(_t5_config(T5Config)),
                       tokenizer=_t5_like_tokenizer(model_max_length=128), transformer=transformer)


BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "tiny-sd": _build_sd,
    "tiny-wan": _build_wan,
    "tiny-wan-i2v": _build_wan_i2v,
    "tiny-flux": _build_flux,
    "tiny-ltx": _build_ltx,
    "tiny-sd-x4-upscaler": _build_sd_upscaler,
}
"""Every tiny checkpoint this module can build; ``tiny-flux`` and ``tiny-ltx`` exist for tests, and
``tiny-sd-x4-upscaler`` for the (disabled by default) catalog upscaler ``tiny-sd-x4-upscaler``."""


def is_built(path: Path) -> bool:
    """True when ``path`` holds a complete tiny checkpoint of the current builder version."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text()).get("version") == TINY_VERSION
    except (OSError, ValueError):
        return False


def build_one(name: str) -> DiffusionPipeline:
    """Build the named tiny pipeline in memory (deterministic, float32, CPU)."""
    if name not in BUILDERS:
        raise KeyError(f"unknown tiny checkpoint {name!r}; known: {', '.join(sorted(BUILDERS))}")
    # fork_rng: the fixed seed must not leak into (or depend on) the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS[name])
        pipe = BUILDERS[name]()
    return pipe


def make_tiny(out_dir: Path, names: Iterable[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Build tiny checkpoints under ``out_dir/<name>`` and return ``{name: dir}``.

    A checkpoint already built (marker present, same version) is kept unless ``force``. Each one is
    written to a temporary directory beside its target and renamed into place, then the marker is
    written, so a crash or a concurrent builder never leaves a half-written checkpoint that looks
    complete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = list(names) if names is not None else list(DEFAULT_TINY)
    unknown = [n for n in wanted if n not in BUILDERS]
    if unknown:
        raise KeyError(f"unknown tiny checkpoint(s) {unknown}; known: {', '.join(sorted(BUILDERS))}")
    result: dict[str, Path] = {}
    for name in wanted:
        target = out_dir / name
        result[name] = target
        if is_built(target) and not force:
            logger.debug("tiny checkpoint %s already built at %s", name, target)
            continue
        pipe = build_one(name)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
        try:
            pipe.save_pretrained(staging, safe_serialization=True)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (target / MARKER).write_text(json.dumps({"name": name, "version": TINY_VERSION,
                                                 "pipeline": type(pipe).__name__}))
        logger.info("built tiny checkpoint %s (%s) at %s", name, type(pipe).__name__, target)
    return result
