"""benchmarks/RESULTS.md's generated sections, rendered from the committed results.

    python -m benchmarks.results_md           # rewrite every generated section of benchmarks/RESULTS.md
    python -m benchmarks.results_md --check   # exit 1 and name the sections that differ

A generated section is delimited by ``<!-- results: NAME -->`` and ``<!-- /results: NAME -->`` (the markers
of the README's blocks, demos/readme.py). Its text is ``results_block(results)`` of `benchmarks.NAME`,
applied to ``benchmarks/results/NAME.json`` (the module's ``RESULTS_JSON``), or to None while that file
does not exist (the benchmark has not been run: the section says so). Every number in a section is
thereby traceable to one file, whose ``provenance`` names the command, machine and versions;
``tests/test_benchmark_results.py`` checks that RESULTS.md and the files agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.bench_sae import BIG_STEP_GFLOP, GOAL_MATMUL_FRACTION, GOAL_OVERHEAD_MS
from benchmarks.provenance import ran_idle
from demos.readme import BLOCK, blocks, renderer_module

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"


def _module(name: str):
    return renderer_module("benchmarks", name, "results_block", f"RESULTS.md section {name!r}")


def results_file(name: str, module=None) -> Path:
    module = module or _module(name)
    return Path(getattr(module, "RESULTS_JSON", HERE / "results" / f"{name}.json"))


def _load(name: str) -> dict:
    return json.loads((HERE / "results" / f"{name}.json").read_text())


def _engine_ratio(rows: list[dict], row_id: str, sizes: str = "") -> float:
    """The one-thread ratio of row ``row_id`` (a Mamba-2 row: the one measured at ``sizes``)."""
    found = [r for r in rows if r["id"] == row_id and r.get("threads", 1) == 1 and sizes in r["measure"]]
    if len(found) != 1:
        raise KeyError(f"bench_engine.json has {len(found)} one-thread rows {row_id!r} at {sizes!r}")
    return found[0]["ratio"]


def readme_summary() -> str:
    """The README's benchmark paragraph, every figure read from benchmarks/results/ (the README block
    ``generated: benchmark_summary``)."""
    engine, sae, peers, cost = (_load(name) for name in ("bench_engine", "sae", "peer_trainers", "run_cost"))
    rows, prov = engine["rows"], engine["provenance"]
    flat = {name: [r["ratio_peer_over_ours_flat"] for r in peer["rows"]]
            for name, peer in peers["peers"].items() if peer["status"] == "measured"}
    peer_text = "; ".join(f"{name}'s step takes {min(r):.2f}–{max(r):.2f}× our FlatSAE's" for name, r in flat.items())
    bilinear = {name: [r["ratio_peer_over_ours_bilinear"] for r in peer["rows"]]
                for name, peer in peers["peers"].items() if peer["status"] == "measured"}
    peer_text += "; per state, our BilinearMatrixSAE trains " + ", ".join(
        f"{min(r):.2f}–{max(r):.2f}× as fast as {name}" for name, r in bilinear.items())
    s = sae["summary"]
    fixed = [r["step_ms"] for r in sae["fixed_cost"]]
    plain = [r["plain_overhead_ms"] for r in sae["plain_step"]]
    gpu = cost["gpu"]
    return (
        f"On this project's 2-core CPU, one thread (`python -m benchmarks.bench_engine`, {prov['date']}; load average "
        f"{prov['load_average_before'][0]:.1f} before and {prov['load_average_after'][0]:.1f} after: "
        f"{'an idle' if ran_idle(prov['load_average_before'][0], prov['load_average_after'][0], max(prov['cpu_threads'])) else 'a busy'} "
        f"machine): a forward without hooks costs {_engine_ratio(rows, 'P1'):.2f}× transformers'; caching every GDN "
        f"state of a layer at Qwen3.5-0.8B's sizes (T = 512) costs {_engine_ratio(rows, 'P2b'):.2f}× the time of writing "
        f"those bytes and is {_engine_ratio(rows, 'P2c'):.2f}× faster than TransformerLens 4.3's eager scan; on Mamba-2 at "
        f"mamba2-370m's layer sizes the same costs {_engine_ratio(rows, 'P2b·M2', '370m'):.2f}× and is "
        f"{_engine_ratio(rows, 'P2c·M2', '370m'):.2f}× faster than the bridge's scan ({_engine_ratio(rows, 'P2c·M2', 'tiny'):.2f}× "
        f"on a tiny Mamba-2); caching 8 of 2048 states raises peak memory {_engine_ratio(rows, 'P3'):.2f}×; a carried "
        f"write edit costs {_engine_ratio(rows, 'P4'):.2f}× a clean forward. SAE training "
        f"(`python -m benchmarks.bench_sae`): {s['big_steps_meeting_goal']} of {s['big_steps']} steps of ≥ {BIG_STEP_GFLOP} GFLOP "
        f"reach {GOAL_MATMUL_FRACTION} of a plain matmul's rate (the goal is all of them) and, counting the Adam step's "
        f"pass over the weights as work too, they run at {s['big_steps_limit_fraction'][0]:.2f}–"
        f"{s['big_steps_limit_fraction'][1]:.2f} of that limit, and the per-step overhead at the smallest shapes is "
        f"{min(s['smallest_overhead_ms'].values()):.0f}–{max(s['smallest_overhead_ms'].values()):.0f} ms (goal ≤ "
        f"{GOAL_OVERHEAD_MS} ms), of which {min(fixed):.1f}–{max(fixed):.1f} ms is a step's fixed cost (Python, autograd "
        f"and the dispatch of its operators: its time at a trivial shape); at those shapes a plain step of the same maths "
        f"written directly in eager PyTorch, timed beside it, spends {min(plain):.1f}–{max(plain):.1f} ms beyond its FLOPs. "
        f"{len(s['big_steps_bound_by_adam'])} of the steps that miss the goal cannot meet it on this "
        f"CPU with Adam: the Adam step alone, a memory-bound pass over weights, gradients and moments, takes longer than "
        f"{1 / GOAL_MATMUL_FRACTION - 1:.2f}× their FLOPs' time at the matmul rate; {len(s['big_steps_bound_by_products'])} "
        f"cannot with their matrix products as they are formed, which, timed alone at their own shapes with Adam, take "
        f"longer than the goal allows; counting their sparse work too (top-k, gathers, scatters, each timed alone), "
        f"{len(s['big_steps_bound_by_work'])} cannot, and the steps of ≥ {BIG_STEP_GFLOP} GFLOP run at "
        f"{min(s['big_steps_within_work_bound']):.2f}–{max(s['big_steps_within_work_bound']):.2f} of that bound. "
        f"Against the peers' trainers on the same states (`python -m benchmarks.bench_peer_trainers`): {peer_text}. "
        f"What a real run costs, computed from measured rates (`python -m benchmarks.run_cost`): states of one GDN "
        f"layer of Qwen3.5-0.8B for 100 M tokens and a 16,384-feature WriteSAE per head, {gpu['total_hours']:.1f} h on "
        f"one H200-class GPU in fp32 (from rates measured on an {gpu['measured_inputs']['device']}).\n")


def render(name: str) -> str:
    """Section ``name``'s text, from its committed results (or from None where there are none yet)."""
    module = _module(name)
    path = results_file(name, module)
    results = json.loads(path.read_text()) if path.exists() else None
    return module.results_block(results).rstrip("\n") + "\n"


def sections(text: str) -> dict[str, str]:
    """The generated sections of a RESULTS.md text: name -> body (the README's block syntax)."""
    return blocks(text)


def rewrite(text: str) -> str:
    return BLOCK.sub(lambda m: m[1] + render(m["name"]) + m[4], text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a section differs")
    args = parser.parse_args()
    text = RESULTS_MD.read_text()
    stale = [name for name, body in sections(text).items() if render(name) != body]
    if args.check:
        for name in stale:
            print(f"RESULTS.md section {name!r} differs from {results_file(name).relative_to(HERE.parent)}")
        sys.exit(1 if stale else 0)
    RESULTS_MD.write_text(rewrite(text))
    print(f"rewrote {len(stale)} section(s): {', '.join(stale) or 'none changed'}")


if __name__ == "__main__":
    main()
