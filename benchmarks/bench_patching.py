"""A1: an activation-patching grid whose runs skip what the corrupted run computes, against every run whole.

    python -m benchmarks.bench_patching

`hooked_gdn.patching.generic_activation_patch` runs one patched forward per grid entry. A patch at layer L and
position t leaves the blocks before L, and (causality) the positions before t, computing what the corrupted run
computes, so each run skips one or the other, whichever leaves less (`hooked_gdn.patching.CorruptedRun`: the
residual stream entering L, formed once for the grid, or the corrupted run's cache after t positions). The
baseline is the same function with ``skip_unpatched_blocks=False``, every run whole. On each shipped model, the
grid over (layer, position) of the state, write and read patches at every memory layer: the two times side by
side (interleaved medians, one thread), their ratio, and the largest difference between the two grids (float
rounding of a continued recurrence). RWKV-7's later layers read layer 0's value, so its runs skip only positions.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import torch

from benchmarks.provenance import provenance, write_results
from benchmarks.timing import interleaved_medians
from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.patching import generic_activation_patch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "patching.json"
MODELS = ("gdn-austen", "mamba2-austen", "rwkv7-austen")
SITES = ("state", "write", "read")


def grids(model: HookedGatedDeltaNet, corrupted: torch.Tensor, clean_cache, metric, skip: bool) -> torch.Tensor:
    """Every site's (layer, position) grid, stacked [site, layer, pos]; ``skip``: each run skipping what the
    corrupted run computes (``skip_unpatched_blocks``), else whole (the baseline)."""
    return torch.stack([generic_activation_patch(model, corrupted, clean_cache, metric, site, ("layer", "pos"),
                                                 show_progress=False, skip_unpatched_blocks=skip) for site in SITES])


def measure(name: str, T: int, repeats: int) -> dict:
    model = HookedGatedDeltaNet.from_pretrained(name)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (1, T), generator=g)
    corrupted = clean.clone()
    corrupted[0, 0] = (clean[0, 0] + 1) % model.cfg.d_vocab
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda hook: "linear_attn" in hook)
    answer = int(model(clean)[0, -1].argmax())
    metric = lambda logits: logits[0, -1].log_softmax(-1)[answer]
    fns = {"skipping": lambda: grids(model, corrupted, cache, metric, skip=True),
           "whole": lambda: grids(model, corrupted, cache, metric, skip=False)}
    seconds = interleaved_medians(fns, repeats)
    difference = (fns["skipping"]() - fns["whole"]()).abs().max().item()
    layers = list(model.cfg.gdn_layers)
    return {"model": name, "n_layers": model.cfg.n_layers, "memory_layers": layers, "T": T,
            "runs": len(SITES) * len(layers) * T, "skipping_s": seconds["skipping"], "whole_s": seconds["whole"],
            "ratio": seconds["whole"] / seconds["skipping"], "max_abs_diff": difference,
            "starts_after_layer_0": model.can_start_at(max(layers))}


def results_block(results: dict | None) -> str:
    """RESULTS.md's A1 table, from ``benchmarks/results/patching.json``."""
    if results is None:
        return "Not yet run: `python -m benchmarks.bench_patching`.\n"
    p = results["provenance"]
    lines = [f"`{p['command']}` on {p['date']} (torch {p['torch']}, {p['cpu_threads']} CPU thread(s), load average "
             f"{p['load_average_before'][0]:.1f} before and {p['load_average_after'][0]:.1f} after on {p['cpu_count']} CPUs, "
             f"medians of {p['repeats']} interleaved repeats), `benchmarks/results/patching.json`. The state, write and "
             "read patches of every memory layer, one (layer, position) grid each, on a corruption of the first token; "
             "*ratio*: the grid of whole runs over the grid whose runs skip what the corrupted run computes (≥ 1: "
             "faster).", "",
             "| model | layers (memory layers) | T | runs | whole runs | skipping | ratio | grids' max abs difference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        skipped = "" if r["starts_after_layer_0"] else " (positions only: later layers read layer 0's value)"
        lines.append(f"| {r['model']} | {r['n_layers']} ({len(r['memory_layers'])}) | {r['T']} | {r['runs']} | "
                     f"{r['whole_s']:.2f} s | {r['skipping_s']:.2f} s{skipped} | {r['ratio']:.2f} | "
                     f"{r['max_abs_diff']:.0e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="24,96", help="positions of the clean and corrupted prompts, one grid each")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    record = provenance("bench_patching", repeats=args.repeats)
    rows = []
    for T in map(int, args.lengths.split(",")):
        for name in MODELS:
            rows.append(measure(name, T, args.repeats))
            print(rows[-1], flush=True)
    results = {"provenance": record, "rows": rows}
    write_results(args.json, results)
    print(results_block(results))


if __name__ == "__main__":
    main()
