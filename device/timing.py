"""One way to time things, shared by every benchmark: median and p90 of repeated calls."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_ms(call: Callable[[], object], runs: int, warmup: int) -> dict[str, float]:
    """Median and 90th percentile wall time of `call()` in ms, after `warmup` untimed calls.

    Medians and p90 rather than means: on a shared or thermally throttled board a few slow
    outliers say more about the machine than about the model.
    """
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}
