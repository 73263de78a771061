"""CPU training keeps the memory it frees for its next step (`freed_memory_kept`).

A training step on the CPU allocates the same large tensors every time: dense gradients of the
dictionary, a gathered decode's per-atom products, a bilinear encoder's rows (tens of MB to GBs).
glibc serves each allocation above its mmap threshold (at most 32 MB) with fresh pages from the
kernel and returns them on free, so every step faults its buffers in again, page by page, which was
most of a step's time at the larger shapes of ``benchmarks/bench_sae.py`` (P5 in
``benchmarks/RESULTS.md`` is measured inside this block, as the trainer runs). Inside
`freed_memory_kept`, glibc serves large blocks from its heap and keeps what is freed there, so after
a few steps every request reuses pages already faulted in (the heap settles at a few copies of the
largest buffers). On exit the defaults come back and the kept memory is returned to the system.

Results do not change: torch aligns every CPU tensor the same way whichever way it is allocated.
Where the C library is not glibc, or the environment already tunes glibc's allocator
(``GLIBC_TUNABLES`` or a ``MALLOC_*_`` variable: the user's choice wins), it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator

# mallopt's parameters (malloc.h) and glibc's documented defaults for them
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
#: M_TRIM_THRESHOLD's value that never returns freed memory at the heap's top to the system (mallopt(3))
NEVER_TRIM = -1


def _glibc():
    """The process's C library where it is glibc and the environment leaves its allocator alone, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return None
    return ctypes.CDLL(None)


_depth = 0  # how many `freed_memory_kept` blocks are open: the outermost sets and restores


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Inside: large allocations come from glibc's heap and freed memory stays there for reuse (see the
    module docstring). The options are process-wide; nested blocks leave them to the outermost."""
    global _depth
    libc = _glibc() if _depth == 0 else None
    if libc is not None:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if libc is not None:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
