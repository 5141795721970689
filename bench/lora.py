"""LoRA benchmark, in one run on one model and size: generation time with no LoRA, with a cached
LoRA (already loaded in the pipeline) and with a cold LoRA (load, then generate), and training
steps per second.

    .venv/bin/python -m bench.lora [--model tiny-sd] [--size 64] [--steps 4] [--repeats 8]
                                   [--train-steps 20] [--rank 16] [--threads 1]

Generation uses ``models.generator.Generator`` and its ``models.adapters`` manager, as a serving
replica does; the three cases run interleaved (none, cached, cold, none, …) so that a change in the
machine's load during the run hits them alike. A cold LoRA is the same file under a new adapter
name each time, so every call loads it (and the LRU evicts an older one, as in serving).
Training uses ``training.trainer.LoraTrainer`` on its own copy of the pipeline; steps per second
exclude the first step (it encodes the images and captions into the caches).

Prints a table and writes JSON to ``bench/results/lora.json``. The figures depend on the machine
and on what else runs on it: the JSON records the thread count and the load average around the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import load_average, stats_ms

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "lora.json"




def _images(n: int, size: int) -> list[Any]:
    import numpy as np
    from PIL import Image, ImageDraw

    from training.dataset import TrainingImage

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        r = size // 4
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        out.append(TrainingImage(img, None))
    return out


def run(model: str, size: int, steps: int, repeats: int, train_steps: int, rank: int, threads: int,
        tiny_dir: Path, work: Path) -> dict[str, Any]:
    import diffusers
    import torch

    from models.adapters import LoraAdapter
    from models.catalog import Catalog
    from models.generator import Generator, limit_threads
    from models.loading import load_pipeline
    from models.tiny import BUILDERS, make_tiny
    from training.trainer import LoraTrainer, TrainingConfig

    limit_threads(threads)
    spec = Catalog.load().get(model)
    if spec is None:
        raise SystemExit(f"unknown model {model}")
    if spec.source and spec.source.tiny and spec.source.tiny in BUILDERS:
        make_tiny(tiny_dir, [spec.source.tiny])
    load_before = load_average()

    # --- training -----------------------------------------------------------------------------
    loaded = load_pipeline(spec, tiny_dir)
    config = TrainingConfig(steps=train_steps, rank=rank, resolution=size, seed=0, validation_steps=steps,
                            validation_guidance=spec.defaults.guidance, base_model=spec.id)
    stamps: list[float] = []
    started = time.perf_counter()
    result = LoraTrainer(loaded, config, pipeline_kwargs=spec.pipeline_kwargs).train(
        _images(4, size), work / "train", on_step=lambda *_: stamps.append(time.perf_counter()))
    total_s = time.perf_counter() - started
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    training = {"steps": train_steps, "rank": rank, "resolution": size, "steps_per_s": round(steady, 3),
                "first_step_s": round(stamps[0] - started, 3), "total_s": round(total_s, 3),
                "export_and_validation_s": round(started + total_s - stamps[-1], 3),
                "loss": result.loss.to_dict()}
    del loaded
    weights = result.weights_path

    # --- generation -----------------------------------------------------------------------------
    gen = Generator.load(spec, tiny_dir, threads=threads)
    request = {"prompt": "a photo of TOK", "width": size, "height": size, "steps": steps,
               "guidance": spec.defaults.guidance}
    cached = [LoraAdapter("cached", weights, 1.0)]
    for case in (None, cached):  # warm-up: first call of each path, and the cached LoRA's one load
        gen.generate([{**request, "seed": 0}], adapters=case)
    times: dict[str, list[float]] = {"none": [], "cached": [], "cold": [], "cold_load": []}
    for i in range(repeats):
        for case, adapters in (("none", None), ("cached", cached)):
            t0 = time.perf_counter()
            gen.generate([{**request, "seed": i}], adapters=adapters)
            times[case].append(time.perf_counter() - t0)
        cold = [LoraAdapter(f"cold-{i}", weights, 1.0)]
        t0 = time.perf_counter()
        gen.adapters.activate(cold)  # what generate() does first; timed apart to show the load alone
        t1 = time.perf_counter()
        gen.generate([{**request, "seed": i}], adapters=cold)
        t2 = time.perf_counter()
        times["cold"].append(t2 - t0)
        times["cold_load"].append(t1 - t0)
    generation = {"none": stats_ms(times["none"]), "cached_lora": stats_ms(times["cached"]),
                  "cold_lora": stats_ms(times["cold"]), "cold_lora_load_only": stats_ms(times["cold_load"])}
    gen.close()
    return {
        "model": spec.id, "size": f"{size}x{size}", "inference_steps": steps, "repeats": repeats,
        "generation": generation, "training": training,
        "lora_file_bytes": weights.stat().st_size,
        "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "load_average_before": load_before,
                    "load_average_after": load_average(), "cuda": torch.cuda.is_available(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "diffusers": diffusers.__version__},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(report: dict[str, Any]) -> str:
    g, t = report["generation"], report["training"]
    rows = [("no LoRA", g["none"]), ("cached LoRA", g["cached_lora"]), ("cold LoRA (load + generate)", g["cold_lora"]),
            ("  of which load", g["cold_lora_load_only"])]
    lines = [f"LoRA benchmark: {report['model']} {report['size']}, {report['inference_steps']} steps, "
             f"{report['machine']['torch_threads']} torch thread(s), load avg {report['machine']['load_average_before']}",
             f"{'generation':<30}{'median ms':>12}{'mean ms':>12}{'min ms':>10}{'n':>5}"]
    for name, s in rows:
        lines.append(f"{name:<30}{s['median_ms']:>12.1f}{s['mean_ms']:>12.1f}{s['min_ms']:>10.1f}{s['n']:>5}")
    lines.append(f"training: {t['steps_per_s']:.2f} steps/s (rank {t['rank']}, {t['resolution']}px, "
                 f"{t['steps']} steps; first step {t['first_step_s']:.2f}s; run with export + validation "
                 f"{t['total_s']:.2f}s; loss {t['loss']['first']:.4f} -> {t['loss']['last']:.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per generation")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: tiny models gain little from more, and on a shared "
                             "machine two OpenMP threads fighting other work ran 10x slower than one)")
    parser.add_argument("--tiny-dir", type=Path, default=Path("var/tiny-models"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        report = run(args.model, args.size, args.steps, args.repeats, args.train_steps, args.rank, args.threads,
                     args.tiny_dir, Path(tmp))
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
