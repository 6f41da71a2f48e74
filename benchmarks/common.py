"""Helpers the benchmark scripts share (they run as `python benchmarks/NAME.py`, so this
folder is on the import path)."""

from __future__ import annotations

import statistics
import time

import jax


def timed(fn, args, repeats: int) -> float:
    """Median seconds of `fn(*args)` over `repeats` calls, after one untimed call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
