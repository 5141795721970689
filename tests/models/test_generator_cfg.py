"""Classifier-free guidance and batching on the tiny models: how many denoiser forwards a batch of N
makes per step, and with which batch size (counted by a forward pre-hook on the denoiser).

What diffusers 0.42 does, per family (our batches take it as it is):
- Stable Diffusion / SDXL and LTX concatenate the unconditional and the conditional pass: ONE
  forward of batch 2N per step.
- Wan runs the conditional and the unconditional pass as two forwards of batch N, each in its own
  ``cache_context`` ("cond" / "uncond"), which the step caches (First Block Cache, MagCache) need
  to keep separate states; merging them would break those caches, so it is left so.
- FLUX.1 is guidance-distilled: no unconditional pass at all, one forward of batch N per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from models.generator import Generator
from tests.models.helpers import make_spec


@contextmanager
def forwards(gen: Generator) -> Iterator[list[int]]:
    """The batch size of every denoiser forward made inside the block."""
    sizes: list[int] = []
    denoiser = gen.family.denoiser(gen.pipe)

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        sizes.append(int(x.shape[0]))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


def batch(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"prompt": f"prompt {i}", "seed": i, "negative_prompt": "blurry" if i % 2 else "", **extra}
            for i in range(n)]


def test_sd_guidance_runs_one_denoiser_forward_of_2n_per_step(sd_gen: Generator) -> None:
    with forwards(sd_gen) as sizes:
        sd_gen.generate(batch(3, steps=4, guidance=5.0))
    assert sd_gen.last_batch_sizes == [3]
    assert sizes == [6] * 4  # uncond + cond concatenated: one call of 2N per step
    with forwards(sd_gen) as sizes:
        sd_gen.generate(batch(3, steps=4, guidance=1.0))  # no guidance: no unconditional half
    assert sizes == [3] * 4


def test_ltx_guidance_runs_one_denoiser_forward_of_2n_per_step(tiny_dir: Path) -> None:
    gen = Generator.load(make_spec("tiny-ltx", "ltx", "video", ["t2v", "i2v"]), tiny_dir=tiny_dir)
    with forwards(gen) as sizes:
        gen.generate(batch(2, steps=2, guidance=3.0))
    assert sizes == [4] * 2


def test_wan_guidance_runs_cond_and_uncond_as_two_forwards_of_n(wan_gen: Generator) -> None:
    """Kept as diffusers has it: the two passes live in separate step-cache contexts."""
    with forwards(wan_gen) as sizes:
        wan_gen.generate(batch(2, steps=2, guidance=5.0))
    assert wan_gen.last_batch_sizes == [2]
    assert sizes == [2, 2] * 2


def test_flux_is_distilled_one_forward_of_n_per_step(tiny_dir: Path) -> None:
    spec = make_spec("tiny-flux", "flux", "image", ["t2i", "i2i"], pipeline_kwargs={"max_sequence_length": 32})
    gen = Generator.load(spec, tiny_dir=tiny_dir)
    with forwards(gen) as sizes:
        gen.generate(batch(3, steps=2, guidance=3.5))
    assert sizes == [3] * 2
