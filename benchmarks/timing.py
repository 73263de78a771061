"""Wall-clock timing shared by the benchmarks, correct on a GPU too: queued device work is waited for
before a clock is read."""

from __future__ import annotations

import resource
import statistics
import time

import torch


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a wall-clock interval covers it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


#: a warm-up call that faults in fewer new pages than this (Python's own small allocations do a few) finds the
#: memory it needs already in place: `median_seconds` with ``settle`` times only calls after such a one
SETTLED_PAGE_FAULTS = 16
#: at most this many warm-up calls, settled or not
MAX_WARM_UP_CALLS = 10


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_seconds(fn, repeats: int, settle: bool = False) -> float:
    """Median wall time of ``fn()`` after one warm-up call, queued GPU work included. With ``settle``, warm-up
    calls go on until one faults in fewer than `SETTLED_PAGE_FAULTS` new pages (at most `MAX_WARM_UP_CALLS`):
    a step whose large buffers come from memory the process keeps (`writesae.host_memory.freed_memory_kept`)
    takes a few calls to reach the heap it settles at, and a call before that pays page faults that a long
    run does not."""
    for _ in range(MAX_WARM_UP_CALLS if settle else 1):
        before = _page_faults()
        fn()
        if _page_faults() - before < SETTLED_PAGE_FAULTS:
            break
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
