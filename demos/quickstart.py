"""The main job as a user runs it: ``writesae quickstart``, timed, with its summary kept as the README's figures.

    python -m demos.quickstart       # writes demos/results/quickstart/results.json
    python -m demos.quickstart --steps 600 --out demos/results/quickstart/steps-600   # a variant: flags pass through

Runs the README's command in a fresh temporary folder (``writesae quickstart --out TMP``, with no
other flag than those given here), measures its wall time from the outside, and keeps its ``summary.json`` with the provenance
of the run (the command, the seed, the CPU threads, the shipped model's SHA-256), so the README's
quickstart figures and its stated time come from one file. Time it on an idle machine: the figure
is what a new user waits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from demos.common import provenance, run_now, wall_time, write_json

COMMAND = ["writesae", "quickstart"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demos/results/quickstart"))
    args, quickstart_flags = parser.parse_known_args()  # the rest are writesae quickstart's own flags
    command = [*COMMAND, *quickstart_flags]
    executable = shutil.which(COMMAND[0]) or sys.exit(f"{COMMAND[0]} is not on PATH: pip install -e . first")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([executable, *command[1:], "--out", tmp], check=True)
        seconds = round(time.perf_counter() - start)
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    record = provenance(summary["config"]["seed"], command=" ".join(command), cpu_cores=os.cpu_count())
    write_json(args.out / "results.json", {"provenance": record, "seconds": seconds, "summary": summary})


def readme_block(results: dict) -> str:
    """The README's quickstart paragraph: what it printed, and how long it took; every number from ``results``."""
    summary = results["summary"]
    r, d, cfg = summary["reconstruction"], summary["downstream_in_the_loop"], summary["config"]
    fvu = " / ".join(f"{value:.2f}" for value in r["fvu"])
    dead = " / ".join(f"{value:.2f}" for value in r["dead_fraction"])
    return (
        f"Run here on an idle machine with {results['provenance']['inputs']['cpu_cores']} CPU cores, "
        f"`{results['provenance']['inputs']['command']}` took **{wall_time(results)}** (seed {cfg['seed']}; "
        f"`{run_now(results['provenance']['command'])}` timed it and keeps its summary). "
        f"Held-out FVU per head {', '.join(map(str, summary['heads']))}: {fvu} (dead fractions {dead}) at L0 "
        f"{sum(r['l0']) / len(r['l0']):.0f}, after {cfg['steps']} steps of {cfg['batch_size']} states. With the SAE in the "
        f"loop at every position of {cfg['eval_contexts']} held-out contexts of {cfg['context']} tokens: CE "
        f"{d['ce_spliced']:.3f} nats against {d['ce_clean']:.3f} clean and {d['ce_zero_ablated']:.3f} with the state "
        f"zero-ablated, **CE loss recovered {d['ce_loss_recovered']:.2f}**, KL {d['kl_spliced']:.3f}.\n"
    )


if __name__ == "__main__":
    main()
