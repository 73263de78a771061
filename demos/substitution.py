"""The atom substitution test on the shipped model with the shipped SAE, no variant favoured.

    python -m demos.substitution     # writes demos/results/substitution/{results.json, records.jsonl, win_rates.png}

At firings of the SAE's features on ``--passages`` held-out passages (a firing: feature i is the top
code of a head at a position), the native write is removed and the model continues, carried, under
five conditions (``writesae.experiments.substitution``): the atom scaled by its code a_i, the atom
at the native write's norm, deletion, and one random rank-1 matrix at the atom's own norm and at the
native norm. Both definitions of the native write are run: k̂δᵀ (ours, the whole change the write
makes) and the paper's βk̂vᵀ (its erase kept). Scored by KL(p_clean ‖ p_condition) at the next token
and summed over ``--horizon`` positions.

Firings: per passage and head, ``--firings-per-head`` drawn (seeded) among the firings at
positions t ≤ context − horizon, so every firing is scored over the whole horizon and every passage
contributes to every head. Heads are split by the shipped census into long-memory (median
half-life ≥ 16 tokens: heads 1 and 3 of layer 5, ≈ 73 and ≈ 700 tokens) and short-memory (heads 0
and 2, ≈ 2 and ≈ 7 tokens: short, not strictly memoryless), reported separately. Intervals: Wilson
(firings as independent) and bootstraps clustered by passage and by feature; ≥ 32 passages give
≥ 30 passage clusters. The SAE's error term is not added back (the question is what the atom alone
carries).

It finishes in minutes (about 2.5 at 2 CPU threads at the defaults), so an interrupted run is rerun
from the start; one record per firing is saved in records.jsonl.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict

import torch

from demos.common import (demo_parser, heldout_passages, load_model_and_sae, memory_groups, provenance, pyplot, sae_layer,
                    save_figure, wall_time, write_json)
from writesae.experiments import NATIVE_WRITES, find_firings, substitution_test, summarize

METRICS = ("kl_next", "kl_sum")
SCALINGS = {"code": ("atom", "random_atom_norm"), "native norm": ("atom_native_norm", "random_native_norm")}
NATIVE_NAMES = {"k_delta": "k̂δᵀ (ours)", "beta_k_v": "βk̂vᵀ (paper)"}
METRIC_NAMES = {"kl_next": "next token", "kl_sum": "summed over the horizon"}


def sample_firings(firings, per_head: int, last_position: int, seed: int):
    """Up to ``per_head`` firings per (passage, head), drawn at positions ≤ ``last_position``."""
    groups = defaultdict(list)
    for f in firings:
        if f.position <= last_position:
            groups[f.sequence, f.head].append(f)
    rng = random.Random(seed)
    return [f for key in sorted(groups) for f in rng.sample(groups[key], min(per_head, len(groups[key])))]


def write_records(path, records) -> None:
    """One JSON line per record, its floats to 5 significant digits (kl_mean, kl_sum / horizon, left out)."""
    short = lambda x: float(f"{x:.5g}")
    lines = [json.dumps({k: {c: short(y) for c, y in v.items()} if isinstance(v, dict) else short(v) if isinstance(v, float) else v
                         for k, v in r.items() if k != "kl_mean"}) for r in records]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = demo_parser(__doc__, "demos/results/substitution")
    parser.set_defaults(passages=32)
    parser.add_argument("--horizon", type=int, default=16, help="positions t … t + horizon − 1 summed")
    parser.add_argument("--firings-per-head", type=int, default=3, help="firings drawn per passage and head")
    args = parser.parse_args()
    start = time.time()
    model, sae = load_model_and_sae(args.sae)
    layer = sae_layer(sae)
    groups = memory_groups(layer, sae.cfg.head_indices)
    tokens = heldout_passages(model, args.passages, args.context)
    with torch.no_grad():
        firings = sample_firings(find_firings(model, sae, tokens), args.firings_per_head,
                                 tokens.shape[1] - args.horizon, args.seed)
    records = [r for native in NATIVE_WRITES
               for r in substitution_test(model, sae, tokens, firings, horizon=args.horizon, seed=args.seed, native=native)]
    summaries = {group: {native: {metric: summarize([r for r in records if r["native"] == native and r["head"] in heads],
                                                    metric=metric, seed=args.seed)
                                  for metric in METRICS}
                         for native in NATIVE_WRITES}
                 for group, heads in (("long", groups["long"]), ("short", groups["short"])) if heads}
    results = {
        "provenance": provenance(args.seed, sae=args.sae, passages=args.passages, context=args.context,
                                 horizon=args.horizon, firings_per_head=args.firings_per_head),
        "layer": layer, "heads": groups, "passages": tokens.shape[0], "context": tokens.shape[1],
        "horizon": args.horizon, "firings_per_head": args.firings_per_head, "firings": len(firings),
        "summaries": summaries, "seconds": round(time.time() - start),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    write_records(args.out / "records.jsonl", records)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, metric in zip(axes, METRICS):
        labels, x = [], 0
        for group, by_native in summaries.items():
            for native, by_metric in by_native.items():
                rates = by_metric[metric]["rates"]
                for j, (scaling, (atom, random_)) in enumerate(SCALINGS.items()):
                    for k, other in enumerate(("delete", random_)):
                        r = rates[f"{atom}<{other}"]
                        low, high = r["bootstrap_by_passage"]
                        ax.errorbar(x + 0.2 * (2 * j + k), r["rate"], [[r["rate"] - low], [high - r["rate"]]], fmt="o",
                                    color=f"C{2 * j + k}", label=f"{scaling}: atom < {other.split('_')[0]}" if x == 0 else None)
                labels.append(f"{group}\n{native}")
                x += 1
        ax.axhline(0.5, color="k", lw=0.5)
        ax.set_xticks([i + 0.3 for i in range(x)], labels, fontsize=8)
        ax.set_title(f"KL {METRIC_NAMES[metric]}")
    axes[0].set_ylabel("win rate (passage bootstrap 95%)")
    axes[0].legend(fontsize=7)
    save_figure(fig, args.out / "win_rates.png")
    print(readme_block(json.loads((args.out / "results.json").read_text())))  # as the README reads it
    print(f"wrote {args.out}/results.json, records.jsonl, win_rates.png in {time.time() - start:.0f}s")


def _cell(rate: dict) -> str:
    low, high = rate["bootstrap_by_passage"]
    return f"{100 * rate['rate']:.1f}% ({100 * low:.0f}–{100 * high:.0f})"


def readme_block(results: dict) -> str:
    """The README's substitution paragraph and table; every number from ``results``."""
    heads, s = results["heads"], results["summaries"]
    half = {int(h): v for h, v in heads["half_life"].items()}
    describe = lambda group: ", ".join(f"{h} ({half[h]:.0f})" for h in heads[group])
    any_summary = next(iter(next(iter(s.values())).values()))["kl_next"]
    lines = [
        f"`python -m demos.substitution` ({wall_time(results)}; {results['passages']} held-out passages of "
        f"{results['context']} tokens, {results['firings_per_head']} firings per passage and head, {results['firings']} "
        f"firings, each under both native-write definitions; KL summed over {results['horizon']} positions; layer "
        f"{results['layer']}). Long-memory heads (median half-life in tokens): {describe('long')}; short-memory "
        f"control: {describe('short')}. Win rates, with 95% bootstrap intervals over passages "
        f"({any_summary['n_passages']} clusters; Wilson and feature-clustered intervals in the results file):",
        "",
        "| heads | native write | KL | atom×code < delete | atom×code < random (same norm) | atom@native < delete "
        "| atom@native < random (same norm) | median KL atom×code / atom@native / delete |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group, by_native in s.items():
        for native, by_metric in by_native.items():
            for metric, summary in by_metric.items():
                r, kl = summary["rates"], summary["median_kl"]
                lines.append(
                    f"| {group} | {NATIVE_NAMES[native]} | {METRIC_NAMES[metric]} | {_cell(r['atom<delete'])} "
                    f"| {_cell(r['atom<random_atom_norm'])} | {_cell(r['atom_native_norm<delete'])} "
                    f"| {_cell(r['atom_native_norm<random_native_norm'])} "
                    f"| {kl['atom'][0]:.2g} / {kl['atom_native_norm'][0]:.2g} / {kl['delete'][0]:.2g} |")
    for group, by_native in s.items():
        r = by_native["k_delta"]["kl_next"]["rates"]
        lines += ["", f"{group.capitalize()}-memory heads, k̂δᵀ, next token: the strict chain atom < delete < random "
                      f"holds on {_cell(r['atom<delete<random_atom_norm'])} of firings with the atom × code, "
                      f"{_cell(r['atom_native_norm<delete<random_native_norm'])} at the native norm."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
