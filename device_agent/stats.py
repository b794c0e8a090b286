"""Latency summary statistics (shared with the host, which imports this module; numpy only)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def latency_summary(times_ms: Sequence[float]) -> dict:
    """min, mean, p50, p90, p99, max and std (population) of per-invocation times, in ms."""
    arr = np.asarray(times_ms, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "min": float(arr.min()),
        "mean": float(arr.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(arr.max()),
        "std": float(arr.std()),
    }
