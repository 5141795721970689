"""The generation core that a Serve replica wraps: one loaded pipeline, batches of requests.

:class:`Generator` owns one spec's pipeline (plus the task pipelines built from it with
``from_pipe``). :meth:`Generator.generate` runs a batch of normalized requests: requests that are
compatible (same task, size, steps, frames, guidance, … and adapter set; see
:func:`compatible_key`) run in ONE pipeline call with a list of prompts and one seeded
``torch.Generator`` per request, so each request's noise is the one its solo run would draw.
Progress and cancellation go through ``callback_on_step_end``: ``on_step(done, total)`` after
every denoising step, and ``should_cancel()`` checked there, raising :class:`GenerationCanceled`
within one step.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from models.adapters import AdapterManager, AdapterSet, adapter_key
from models.families.base import Family, hashable
from models.loading import LoadedPipeline, load_pipeline
from models.spec import ModelSpec

logger = logging.getLogger(__name__)

OnStep = Callable[[int, int], None]
ShouldCancel = Callable[[], bool]
OnLatents = Callable[[int, int, Sequence[int], torch.Tensor, Mapping[str, Any]], None]
"""``on_latents(done, total, indices, latents, call)`` after a step: the call's latents (row i is
request ``indices[i]`` of the batch) and its keyword arguments; for previews. Must be quick."""


class GenerationCanceled(Exception):
    """Raised by :meth:`Generator.generate` when ``should_cancel()`` turned true; nothing is returned."""


@dataclass
class GeneratedMedia:
    """One request's output: an image, or video frames with their fps."""

    kind: Literal["image", "video"]
    width: int
    height: int
    seed: int
    prompt: str
    image: Image.Image | None = None
    frames: list[Image.Image] | None = None
    fps: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int | None:
        return len(self.frames) if self.frames is not None else None

    @property
    def duration_s(self) -> float | None:
        if self.frames is None or not self.fps:
            return None
        return len(self.frames) / self.fps

    @property
    def poster(self) -> Image.Image:
        """The image, or the first frame of a video."""
        if self.image is not None:
            return self.image
        assert self.frames, "a video without frames"
        return self.frames[0]


def limit_threads(n: int) -> int:
    """Cap torch's intra-op threads (several replicas share few cores); returns the previous value."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:  # allowed only before any inter-op work started; harmless to skip afterwards
        torch.set_num_interop_threads(max(1, int(n)))
    except RuntimeError:
        pass
    return previous


def task_of(request: Mapping[str, Any], kind: str) -> str:
    """The request's task: its ``task`` key if given, else decided by the presence of an image."""
    if request.get("task"):
        return str(request["task"])
    has_image = request.get("image") is not None
    if kind == "video":
        return "i2v" if has_image else "t2v"
    return "i2i" if has_image else "t2i"


def fill_defaults(spec: ModelSpec, request: Mapping[str, Any]) -> dict[str, Any]:
    """The request with the spec's defaults for missing keys (the API normally fills them already).
    The seed is left as is (see :meth:`Generator.generate`)."""
    d = spec.defaults
    out = dict(request)
    for key, default in (("width", d.width), ("height", d.height), ("steps", d.steps),
                         ("guidance", d.guidance), ("negative_prompt", d.negative_prompt)):
        if out.get(key) is None:
            out[key] = default
    if spec.kind == "video":
        if out.get("fps") is None:
            out["fps"] = d.fps or 16
        if out.get("num_frames") is None:
            out["num_frames"] = d.num_frames or 17
    if out.get("strength") is None and d.strength is not None:
        out["strength"] = d.strength
    if not out.get("task") and list(spec.tasks) == ["upscale"]:
        # An upscaler's only task: its request has an image, which would otherwise read as i2i.
        out["task"] = "upscale"
    return out


def _loras_of(request: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((str(x["id"]), float(x.get("scale", 1.0))) for x in request.get("loras") or ()))


def compatible_key(request: Mapping[str, Any], family: Family | None = None,
                   adapters: AdapterSet | None = None) -> tuple[Any, ...]:
    """Requests with equal keys can run in one pipeline call.

    With ``family`` the key is exact: the task plus every call argument that is not per-request
    (for Wan image-to-video that includes the input image, for Stable Diffusion it does not).
    Without it, a conservative key: task, size, steps, guidance, frames, fps, strength and the input
    image. The adapter set (``adapters``, else the request's ``loras``) is always part of it.
    """
    lora_part = adapter_key(adapters) if adapters is not None else _loras_of(request)
    if family is not None:
        task = task_of(request, family.kind)
        return (task, family.shared_key(family.map_request(request, task)), lora_part)
    task = task_of(request, "video" if request.get("num_frames") is not None else "image")
    fields = ("width", "height", "steps", "guidance", "num_frames", "fps", "strength", "image")
    return (task, tuple(hashable(request.get(k)) for k in fields), lora_part)


class Generator:
    """One loaded pipeline for one spec. Not reentrant: calls to :meth:`generate` are serialized."""

    def __init__(self, spec: ModelSpec, loaded: LoadedPipeline, max_loras: int | None = None) -> None:
        self.spec = spec
        self.loaded = loaded
        self.family: Family = loaded.family
        self.pipe: DiffusionPipeline = loaded.pipe
        self._task_pipes: dict[str, DiffusionPipeline] = {}
        self._offload_owner: DiffusionPipeline | None = self.pipe
        self._lock = threading.Lock()
        # A compiled denoiser swaps LoRA weights in place (no recompile per new LoRA).
        hotswap = spec.serving.lora_hotswap_rank if "torch_compile" in loaded.optimizations else None
        self.adapters = AdapterManager(self.pipe, max_loras or spec.serving.max_loras_per_replica, hotswap)
        self.last_batch_sizes: list[int] = []
        """Sizes of the pipeline calls made by the latest :meth:`generate` (for tests and metrics)."""

    @classmethod
    def load(cls, spec: ModelSpec, tiny_dir: Path | None = None, cache_dir: Path | None = None, *,
             threads: int | None = None, **load_kwargs: Any) -> Generator:
        """Load the spec's pipeline (see :func:`models.loading.load_pipeline` for ``load_kwargs``)."""
        if threads:
            limit_threads(threads)
        started = time.perf_counter()
        loaded = load_pipeline(spec, tiny_dir, cache_dir, **load_kwargs)
        logger.info("generator for %s ready in %.2fs", spec.id, time.perf_counter() - started)
        return cls(spec, loaded)

    @property
    def device(self) -> str:
        return self.loaded.device

    def compatible_key(self, request: Mapping[str, Any], adapters: AdapterSet | None = None) -> tuple[Any, ...]:
        """The exact batching key for this model (see :func:`compatible_key`)."""
        return compatible_key(fill_defaults(self.spec, request), self.family, adapters)

    def pipeline_for(self, task: str) -> DiffusionPipeline:
        """The pipeline running ``task`` (built once from the base pipeline's components)."""
        pipe = self._task_pipes.get(task)
        if pipe is None:
            pipe = self.family.pipeline_for_task(self.pipe, task)
            pipe.set_progress_bar_config(disable=True)
            self._task_pipes[task] = pipe
        if "cpu_offload" in self.loaded.optimizations and pipe is not self._offload_owner:
            # Offload hooks are per pipeline; the components are shared, so re-hook them for the
            # pipeline about to run.
            pipe.enable_model_cpu_offload(device=self.device)
            self._offload_owner = pipe
        return pipe

    def generate(self, batch: Sequence[Mapping[str, Any]], on_step: OnStep | None = None,
                 should_cancel: ShouldCancel | None = None,
                 adapters: AdapterSet | None = None, on_latents: OnLatents | None = None) -> list[GeneratedMedia]:
        """Run ``batch`` and return one :class:`GeneratedMedia` per request, in order.

        Compatible requests share one pipeline call (normally the whole batch; incompatible ones
        are split into groups run one after another). ``on_step(done, total)`` counts denoising
        steps over the whole batch. ``adapters`` is the LoRA set for every request of the batch.
        Raises :class:`GenerationCanceled` within one step of ``should_cancel()`` turning true.
        ``on_latents`` (see :data:`OnLatents`) sees each step's latents, after ``on_step``.
        """
        if not batch:
            return []
        with self._lock:
            if self.pipe is None:
                raise RuntimeError(f"the generator for {self.spec.id} is closed")
            return self._generate(batch, on_step, should_cancel, adapters, on_latents)

    def _generate(self, batch: Sequence[Mapping[str, Any]], on_step: OnStep | None,
                  should_cancel: ShouldCancel | None, adapters: AdapterSet | None,
                  on_latents: OnLatents | None = None) -> list[GeneratedMedia]:
        requests = [fill_defaults(self.spec, r) for r in batch]
        for r in requests:
            if r.get("seed") is None:
                r["seed"] = secrets.randbelow(2**32)
        tasks = [task_of(r, self.family.kind) for r in requests]
        for task in tasks:
            if task not in self.spec.tasks:
                raise ValueError(f"{self.spec.id} does not do {task} (tasks: {', '.join(self.spec.tasks)})")
        mapped = [self.family.map_request(r, t) for r, t in zip(requests, tasks, strict=True)]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, (t, m) in enumerate(zip(tasks, mapped, strict=True)):
            groups.setdefault((t, self.family.shared_key(m)), []).append(i)
        calls = [(key[0], idx, self.family.batch_kwargs([mapped[i] for i in idx])) for key, idx in groups.items()]
        total = sum(self.family.expected_steps(kw, task) for task, _, kw in calls)
        reported = 0

        def report(done: int) -> None:
            nonlocal reported
            done = min(done, total)
            if on_step is not None and done > reported:
                on_step(done, total)
            reported = max(reported, done)

        self.adapters.activate(adapters)
        self.last_batch_sizes = [len(idx) for _, idx, _ in calls]
        results: list[GeneratedMedia | None] = [None] * len(requests)
        offset = 0
        for task, idx, kwargs in calls:
            if should_cancel is not None and should_cancel():
                raise GenerationCanceled(f"canceled before step {offset} of {total}")
            pipe = self.pipeline_for(task)

            def callback(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any],
                         _offset: int = offset, _idx: list[int] = idx, _call: dict[str, Any] = kwargs) -> dict[str, Any]:
                report(_offset + step + 1)
                latents = tensors.get("latents")
                if on_latents is not None and latents is not None:
                    on_latents(min(_offset + step + 1, total), total, _idx, latents, _call)
                if should_cancel is not None and should_cancel():
                    raise GenerationCanceled(f"canceled after step {_offset + step + 1} of {total}")
                return {}

            generators = [torch.Generator(device="cpu").manual_seed(int(requests[i]["seed"])) for i in idx]
            call = {**self.spec.pipeline_kwargs, **kwargs, "generator": generators, "output_type": "pil",
                    "callback_on_step_end": callback}
            if on_latents is not None:
                call["callback_on_step_end_tensor_inputs"] = ["latents"]
            started = time.perf_counter()
            self.loaded.before_call(pipe, call)  # per-call optimizations (auto VAE tiling, step caches)
            try:
                result = pipe(**call)
            except BaseException:
                # Canceled or failed mid-call (e.g. out of memory): release offload hooks and
                # cached blocks so the replica can take the next batch.
                pipe.maybe_free_model_hooks()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise
            logger.debug("%s: %s × %d in %.2fs", self.spec.id, task, len(idx), time.perf_counter() - started)
            offset += self.family.expected_steps(kwargs, task)
            report(offset)  # in case the pipeline ran fewer steps than expected
            for i, output in zip(idx, self.family.outputs(result), strict=True):
                results[i] = self._media(requests[i], task, output)
        return [r for r in results if r is not None]

    def _media(self, request: Mapping[str, Any], task: str, output: Any) -> GeneratedMedia:
        meta = {"model": self.spec.id, "prompt": request["prompt"], "seed": int(request["seed"]),
                "task": task, "steps": request["steps"], "guidance": request["guidance"]}
        if request.get("negative_prompt"):
            meta["negative_prompt"] = request["negative_prompt"]
        if self.family.kind == "image":
            image: Image.Image = output
            return GeneratedMedia(kind="image", width=image.width, height=image.height, seed=int(request["seed"]),
                                  prompt=request["prompt"], image=image, metadata=meta)
        frames: list[Image.Image] = output
        fps = int(request.get("fps") or self.spec.defaults.fps or 16)
        return GeneratedMedia(kind="video", width=frames[0].width, height=frames[0].height,
                              seed=int(request["seed"]), prompt=request["prompt"], frames=frames, fps=fps,
                              metadata={**meta, "fps": fps, "num_frames": len(frames)})

    def close(self) -> None:
        """Drop the pipelines (a swap loads the new one beside this, then closes this).

        Waits for a batch still running on this generator to finish first.
        """
        with self._lock:
            self._task_pipes.clear()
            self.adapters.pipe = None
            self.pipe = None  # type: ignore[assignment]
            self.loaded.pipe = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
