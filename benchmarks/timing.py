"""Wall-clock timing shared by the benchmarks, correct on a GPU too: queued device work is waited for
before a clock is read."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a wall-clock interval covers it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


#: a warm-up call that faults in fewer new pages than this (Python's own small allocations do a few) finds the
#: memory it needs already in place: `interleaved_medians` with ``settle`` times only calls after such calls
SETTLED_PAGE_FAULTS = 16
#: at most this many warm-up rounds, settled or not
MAX_WARM_UP_ROUNDS = 10


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, settle: bool = False) -> dict[str, float]:
    """Median wall time of each of ``fns``, queued GPU work included, the functions run in turn each repeat, so
    that steps of the same kind compared with each other (ours and a peer's) see the machine in the same state.
    Not for a reference of another kind: a square matmul timed between training steps ran slower than in a run
    of its own (`benchmarks.bench_sae.step_and_matmul_seconds`). First warm-up rounds, every function once a
    round: one round, or with ``settle`` rounds until every call of one faults in fewer than
    `SETTLED_PAGE_FAULTS` new pages (at most `MAX_WARM_UP_ROUNDS`): a step whose large buffers come from memory
    the process keeps (`writesae.host_memory.freed_memory_kept`) takes a few calls to reach the heap it settles
    at, and a call before that pays page faults that a long run does not."""
    for _ in range(MAX_WARM_UP_ROUNDS if settle else 1):
        settled = True
        for fn in fns.values():
            before = _page_faults()
            fn()
            settled &= _page_faults() - before < SETTLED_PAGE_FAULTS
        if settled:
            break
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median_seconds(fn: Callable[[], object], repeats: int, settle: bool = False) -> float:
    """Median wall time of ``fn()`` after warm-up (`interleaved_medians` of it alone)."""
    return interleaved_medians({"fn": fn}, repeats, settle)["fn"]
