"""Helpers the benchmarks share: timing summaries and the machine's load when they ran."""

from __future__ import annotations

import os
import statistics


def stats_ms(values_s: list[float]) -> dict[str, float]:
    """Median, mean, min and max of durations given in seconds, in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return {"median_ms": round(statistics.median(ms), 2), "mean_ms": round(statistics.fmean(ms), 2),
            "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2), "n": len(ms)}


def load_average() -> list[float] | None:
    """1/5/15-minute load: figures taken on a busy machine are inflated, so every result records it."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None
