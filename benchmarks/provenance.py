"""What a benchmark's results file records about the run that wrote it, for every script here: the
command as run, when, the versions of the libraries it measured, the CPU (`cpu`) and its threads, and the machine's
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


#: the CPU flags (/proc/cpuinfo) a matrix product's rate depends on, recorded where present
VECTOR_EXTENSIONS = ("avx2", "avx512f", "amx_tile")


def cpu() -> dict:
    """The CPU as Linux describes it (empty elsewhere): its model name, the sizes of its data caches by level
    (one core's, as /sys lists them) and which of `VECTOR_EXTENSIONS` it has. ``platform.processor()`` says only
    "x86_64", and two machines it named alike ran P5's reference matmul at rates a factor of two apart."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)  # the last CPU's, like the first's
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        kind, level, size = ((index / name).read_text().strip() for name in ("type", "level", "size"))
        if kind != "Instruction":
            caches[f"L{level}"] = size
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", platform.machine()), "caches": caches,
            "vector_extensions": [flag for flag in VECTOR_EXTENSIONS if flag in flags]}


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
            "processor": platform.processor() or platform.machine(), "cpu": cpu(), "cpu_count": os.cpu_count(),
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
    return f"`{p['command']}` on {p['date']} (torch {p['torch']}, {threads}{load}{cpu_words(p.get('cpu'))}"


def cpu_words(described: dict | None) -> str:
    """", CPU Intel(R) Xeon(R) Processor (avx2, avx512f; L2 2048K, L3 491520K)" from `cpu`'s record ("" for a file
    older than it)."""
    if not described:
        return ""
    details = [", ".join(described["vector_extensions"]),
               ", ".join(f"{level} {size}" for level, size in described["caches"].items() if level != "L1")]
    details = "; ".join(part for part in details if part)
    return f", CPU {described['model']}" + (f" ({details})" if details else "")
