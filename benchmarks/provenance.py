"""What a benchmark's results file records about the run that wrote it, for every script here: the
command as run, when, the versions of the libraries it measured, the CPU threads, and the machine's
load average before and after (these machines are shared, and a ratio taken under load says so). The
demos record the load the same way (`demos.common.provenance`), and `ran_idle` judges both.

    results = {"provenance": provenance("bench_cache", repeats=3), ...}
    write_results(path, results)          # adds the load average after; atomic

`run_line` is how RESULTS.md names a run from its provenance.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from hooked_gdn.files import atomic_file

#: the distributions a benchmark may measure against; each installed one's version is recorded
MEASURED_LIBRARIES = ("transformers", "transformer-lens", "rwkv", "sae-lens", "eai-sparsify")


def load_average() -> list[float]:
    """The machine's 1-, 5- and 15-minute load averages (the demand for its CPUs, a running program's own included)."""
    return [round(x, 2) for x in os.getloadavg()]


def ran_idle(load_at_start: float, load_at_end: float, threads: int) -> bool:
    """Whether a run's one-minute load averages say it had the machine to itself: less than one CPU's worth of
    demand in the minute before it started, and at its end less than one beyond its own threads."""
    return load_at_start < 1 and load_at_end < threads + 1


def provenance(script: str, **extra) -> dict:
    """The provenance of a run of ``python -m benchmarks.SCRIPT`` started now; ``extra`` adds (or
    overrides, e.g. ``cpu_threads`` for a script that runs at several) entries."""
    versions = {}
    for name in MEASURED_LIBRARIES:
        try:
            versions[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"command": shlex.join(["python", "-m", f"benchmarks.{script}", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__, **versions,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_average_before": load_average(), "seed": 0, **extra}


def write_results(path: Path, results: dict) -> None:
    """Write ``results`` (with a ``provenance``) to ``path`` whole or not at all, first recording the load
    average now."""
    results["provenance"]["load_average_after"] = load_average()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(json.dumps(results, indent=1) + "\n")


def run_line(p: dict, threads: str | None = None) -> str:
    """"`COMMAND` on DATE (torch V, N CPU thread(s), load average A before and B after on C CPUs" — the
    caller closes the bracket (to add what the run measured); ``threads`` replaces the thread count's
    words. Older files without the load average omit it."""
    threads = threads or f"{p['cpu_threads']} CPU thread(s)"
    load = (f", load average {p['load_average_before'][0]:.1f} before and {p['load_average_after'][0]:.1f} after on "
            f"{p['cpu_count']} CPUs" if "load_average_after" in p else "")
    return f"`{p['command']}` on {p['date']} (torch {p['torch']}, {threads}{load}"
