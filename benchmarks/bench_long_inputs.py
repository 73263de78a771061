"""T1: peak memory of long inputs on gdn-austen (issue 25, item 5): is it linear in T?

    python -m benchmarks.bench_long_inputs                          # this tree, recorded as "after"
    git worktree add /tmp/before HEAD~1
    python -m benchmarks.bench_long_inputs --tree /tmp/before --label before

For each length T (2k, 8k, 32k random token ids, batch 1, fp32) two cases, each in a fresh process:
``model(tokens)`` (the forward) and ``model.run_with_cache(tokens)`` (the default cache). The number is the
peak resident memory above the loaded model, read from the kernel's counter (VmHWM, reset through
/proc/self/clear_refs, as `benchmarks.bench_engine`'s P3 reads it). Each child may grow its address space
by at most ``--limit-gib`` beyond the loaded model (RLIMIT_AS); a case that would need more is recorded as
refused (MemoryError) rather than allowed to take the machine.

``--tree`` runs the children with another checkout first on their path (the code before a change), and
``--label`` names the run; each run replaces its label's entry in the results file and keeps the others, so
one file holds "before" and "after", each with the commit it measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.provenance import provenance, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "bench_long_inputs.json"
MODEL = "gdn-austen"
CASES = ("forward", "run_with_cache")

# run by ``python -c``; argv: tree, case, T, limit in GiB, threads. Prints one JSON line.
CHILD = r"""
import json, resource, sys, time
tree, case, T, limit_gib, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, tree)
import torch
torch.set_num_threads(threads)
import hooked_gdn
assert hooked_gdn.__file__.startswith(tree), hooked_gdn.__file__
from hooked_gdn import HookedGatedDeltaNet

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

model = HookedGatedDeltaNet.from_pretrained("{model}")
torch.manual_seed(0)
tokens = torch.randint(0, model.cfg.d_vocab, (1, T))
with torch.no_grad():
    model(tokens[:, :64])  # load lazily initialised kernels before measuring
    model.run_with_cache(tokens[:, :64])
    limit = status_kib("VmSize") * 1024 + int(limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    base = status_kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    start = time.perf_counter()
    try:
        if case == "forward":
            model(tokens)
            held = 0
        else:
            _, cache = model.run_with_cache(tokens)
            held = sum(t.numel() * t.element_size() for t in cache.values())
        row = dict(status="ok", peak_mib=(status_kib("VmHWM") - base) / 1024, cache_mib=held / 2**20)
    except (MemoryError, RuntimeError) as e:  # torch's CPU allocator raises a RuntimeError
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        row = dict(status=f"refused: out of memory under the {limit_gib:g} GiB limit", peak_mib=None, cache_mib=None)
    row["seconds"] = time.perf_counter() - start
print(json.dumps(row))
"""


def git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=True).stdout.strip()


def measure(tree: Path, case: str, T: int, limit_gib: float, threads: int) -> dict:
    code = CHILD.replace("{model}", MODEL)
    out = subprocess.run([sys.executable, "-c", code, str(tree), case, str(T), str(limit_gib), str(threads)],
                         cwd=tree, capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        row = dict(status=f"failed (exit {out.returncode}): {last}", peak_mib=None, cache_mib=None, seconds=None)
    else:
        row = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(T=T, case=case, **row)


def linearity(rows: list[dict], case: str) -> str:
    """Peak per token at each length: constant when memory is linear in T."""
    got = [r for r in rows if r["case"] == case and r["status"] == "ok"]
    return ", ".join(f"{r['peak_mib'] * 1024 / r['T']:.0f} KiB/token at {r['T']}" for r in got) or "none measured"


def results_block(results: dict | None) -> str:
    """RESULTS.md's T1 table, from ``benchmarks/results/bench_long_inputs.json``."""
    if results is None:
        return "Not yet run: `python -m benchmarks.bench_long_inputs`.\n"
    lines = []
    for label, run in sorted(results["runs"].items(), key=lambda kv: kv[0] != "before"):
        p = run["provenance"]
        lines += [f"**{label}** ({p['commit']}): `{p['command']}` on {p['date']} (torch {p['torch']}, {p['cpu_threads']} CPU "
                  f"threads, {MODEL}, batch 1, fp32, each case in a fresh process, {p['limit_gib']:g} GiB address-space "
                  "limit beyond the loaded model), `benchmarks/results/bench_long_inputs.json`:", "",
                  "| T | case | peak above the loaded model | cache holds | seconds | per token |", "|---|---|---|---|---|---|"]
        for r in run["rows"]:
            if r["status"] == "ok":
                peak, held = f"{r['peak_mib']:.0f} MiB", "—" if r["case"] == "forward" else f"{r['cache_mib']:.0f} MiB"
                per_token = f"{r['peak_mib'] * 1024 / r['T']:.0f} KiB"
            else:
                peak, held, per_token = r["status"], "—", "—"
            seconds = "—" if r["seconds"] is None else f"{r['seconds']:.1f}"
            lines.append(f"| {r['T']} | {r['case']} | {peak} | {held} | {seconds} | {per_token} |")
        lines.append("")
    lines += ["Growth between consecutive lengths (generated from the file; linear in T: the same factor as the tokens):", ""]
    lines += [f"- **{label}**: {_growth(run['rows'])}" for label, run in
              sorted(results["runs"].items(), key=lambda kv: kv[0] != "before")]
    return "\n".join(lines) + "\n"


def _growth(rows: list[dict]) -> str:
    """How the forward's peak and the cache's contents grow from each measured length to the next."""
    ok = {(r["T"], r["case"]): r for r in rows if r["status"] == "ok"}
    lengths = sorted({T for T, case in ok if case == "forward" and (T, "run_with_cache") in ok})
    steps = [f"from T = {a} to {b} ({b / a:g}× the tokens) the forward's peak grows "
             f"{ok[b, 'forward']['peak_mib'] / ok[a, 'forward']['peak_mib']:.1f}× and what the cache holds "
             f"{ok[b, 'run_with_cache']['cache_mib'] / ok[a, 'run_with_cache']['cache_mib']:.1f}×"
             for a, b in zip(lengths, lengths[1:])]
    return "; ".join(steps) + f"; forward peak per token {linearity(rows, 'forward')}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose hooked_gdn the children run")
    parser.add_argument("--label", default="after", help="the run's name in the results file (before, after)")
    parser.add_argument("--limit-gib", type=float, default=8.0, help="address space each child may add (RLIMIT_AS)")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = parser.parse_args()
    tree = args.tree.resolve()
    threads = torch.get_num_threads()
    rows = []
    for T in map(int, args.lengths.split(",")):
        for case in CASES:
            rows.append(measure(tree, case, T, args.limit_gib, threads))
            print(rows[-1], flush=True)
    dirty = bool(git(tree, "status", "--porcelain", "--untracked-files=no"))
    commit = git(tree, "rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else "")
    run = {"provenance": provenance("bench_long_inputs", commit=f"commit {commit}", cpu_threads=threads, model=MODEL,
                                    limit_gib=args.limit_gib),
           "rows": rows}
    results = json.loads(args.json.read_text()) if args.json.exists() else {"runs": {}}
    results["runs"][args.label] = run
    for case in CASES:
        print(f"{args.label} {case}: {linearity(rows, case)}")
    write_results(args.json, results)
    print(results_block(results))


if __name__ == "__main__":
    main()
