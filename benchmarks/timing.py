"""Wall-clock timing shared by the benchmarks, correct on a GPU too: queued device work is waited for
before a clock is read."""

from __future__ import annotations

import statistics
import time

import torch


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a wall-clock interval covers it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` after one warm-up call, queued GPU work included."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
