"""The atom substitution test on the shipped model, with the write SAE as the dictionary and the state SAE beside it.

    python -m demos.substitution     # writes demos/results/substitution/{results.json, records.jsonl, effect_sizes.png}

What is done (``writesae.experiments.substitution`` defines every term): at firings of a dictionary's
features (feature i the top code of head h at position t; for the write SAE, of the write k̂_t δ_tᵀ) on
``--passages`` held-out passages of ``--context`` tokens, head h's native write k̂_t δ_tᵀ is replaced,
carried, by each condition's matrix: itself (the identity edit: the noise floor), zero (deletion), the
atom × its code and at the native norm, another atom of the same dictionary with the same code and at
the native norm, the native write's best rank-1 approximation and a random rank-1 matrix, each at
the atom's norm and at the native norm. KL(p_clean ‖ p_condition) at the next token and summed over
a horizon H_h = min(⌈median half-life of head h⌉, ``--max-horizon``) positions: layer 5's heads
1 and 3 (73 and 701 tokens) are scored over 73 and 512 positions, heads 0 and 2 over 3 and 7.

Firings: per passage and head, ``--firings-per-head`` drawn (seeded) among the firings at positions
``--first-position`` … context − max-horizon (16 … 64 by default), so every firing is scored over its
head's whole horizon inside its passage, all heads are compared at the same positions, and each run is
only t + H_h tokens long. Each dictionary is run on the same passages and positions (its own firings).

Reported apart: the heads whose decay is fixed (input-independent: the census's 10th and 90th
percentiles of α are equal; heads 1 and 3, the long memories) and the heads whose decay is learned
(input-dependent; heads 0 and 2), and each head alone. Over the firings where deletion matters
(KL_delete > 10 × the largest KL of the identity edit on that head), per condition the effect size
1 − KL_c / KL_delete (median over firings and pooled) with 95% bootstrap intervals over passages, and
win rates (Wilson, passage- and feature-clustered intervals).

Run at 1 CPU thread (``OMP_NUM_THREADS=1``); the results file records its wall time and CPU time (the two differ
on a shared machine). An interrupted run is rerun from the start; one record per firing and dictionary is saved
in records.jsonl.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict

import torch

from demos.common import (decay_kinds, demo_parser, heldout_passages, load_model_and_sae, provenance, pyplot, sae_layer,
                          save_figure, wall_time, write_json)
from hooked_gdn.census import DECAY_KINDS
from hooked_gdn.files import atomic_file, file_sha256
from writesae import load_sae
from writesae.experiments import find_firings
from writesae.experiments.substitution import METRICS, NOISE_FACTOR, REPLACEMENTS, substitution_test, summarize
from writesae.io import WEIGHTS_FILE, resolve_sae

WRITE_SAE, STATE_SAE = "gdn-austen/L5-write", "gdn-austen/L5-state"
METRIC_NAMES = {"kl_next": "next token", "kl_sum": "summed over the horizon"}
CONDITION_NAMES = {
    "atom": "atom × code", "atom_native_norm": "atom @ native norm",
    "other_atom": "other atom × code", "other_atom_native_norm": "other atom @ native norm",
    "rank1_atom_norm": "native rank-1 @ atom norm", "rank1_native_norm": "native rank-1 @ native norm",
    "random_atom_norm": "random @ atom norm", "random_native_norm": "random @ native norm",
}
#: the conditions in the README table, against deletion
TABLE_CONDITIONS = ("atom", "atom_native_norm", "other_atom", "rank1_atom_norm", "random_atom_norm")


def horizons(half_life: dict, max_horizon: int) -> dict[int, int]:
    """Per head, its median half-life rounded up, at least 1 and at most ``max_horizon`` positions."""
    return {h: max(1, min(max_horizon, math.ceil(t))) for h, t in half_life.items()}


def sample_firings(firings, per_head: int, first: int, last: int, seed: int):
    """Up to ``per_head`` firings per (passage, head), drawn at positions ``first`` … ``last``."""
    groups = defaultdict(list)
    for f in firings:
        if first <= f.position <= last:
            groups[f.sequence, f.head].append(f)
    rng = random.Random(seed)
    return [f for key in sorted(groups) for f in rng.sample(groups[key], min(per_head, len(groups[key])))]


def write_records(path, records) -> None:
    """One JSON line per record, its floats to 5 significant digits."""
    short = lambda x: float(f"{x:.5g}")
    lines = [json.dumps({k: {c: short(y) for c, y in v.items()} if isinstance(v, dict) else short(v) if isinstance(v, float) else v
                         for k, v in r.items()}) for r in records]
    with atomic_file(path) as f:
        f.write("\n".join(lines) + "\n")


def run_dictionary(model, sae, tokens, heads: dict, horizon: dict, args) -> tuple[list[dict], dict]:
    """The records of one dictionary and their summaries: by decay kind and by head, per metric."""
    last = tokens.shape[1] - args.max_horizon
    with torch.no_grad():  # the model is causal: the codes at positions ≤ last need only the tokens up to there
        firings = sample_firings(find_firings(model, sae, tokens[:, : last + 1]), args.firings_per_head,
                                 args.first_position, last, args.seed)
    records = substitution_test(model, sae, tokens, firings, horizon=horizon, seed=args.seed)
    groups = {kind: heads[kind] for kind in DECAY_KINDS if heads[kind]}
    groups |= {f"head {h}": [h] for h in sorted(horizon)}
    summaries = {group: {metric: summarize([r for r in records if r["head"] in members], metric=metric, seed=args.seed)
                         for metric in METRICS}
                 for group, members in groups.items()}
    return records, summaries


def main() -> None:
    parser = demo_parser(__doc__, "demos/results/substitution")
    parser.set_defaults(sae=WRITE_SAE, passages=32, context=576)
    parser.add_argument("--second-sae", default=STATE_SAE, help="the second dictionary, reported as its own row ('' for none)")
    parser.add_argument("--max-horizon", type=int, default=512, help="the longest horizon, in positions")
    parser.add_argument("--first-position", type=int, default=16, help="the earliest firing position")
    parser.add_argument("--firings-per-head", type=int, default=1, help="firings drawn per passage and head")
    args = parser.parse_args()
    if args.context - args.max_horizon < args.first_position:
        parser.error(f"--context {args.context} leaves no firing position: it must be ≥ --first-position + --max-horizon")
    start = time.time()
    model, sae = load_model_and_sae(args.sae)
    layer = sae_layer(sae)
    heads = decay_kinds(layer, sae.cfg.head_indices)
    horizon = horizons(heads["half_life"], args.max_horizon)
    tokens = heldout_passages(model, args.passages, args.context)
    dictionaries, all_records = {}, []
    for name in [args.sae] + ([args.second_sae] if args.second_sae else []):
        dictionary = sae if name == args.sae else load_sae(name).eval()
        if sae_layer(dictionary) != layer:
            raise ValueError(f"{name} reads layer {sae_layer(dictionary)}, the first dictionary layer {layer}")
        began = time.time()
        records, summaries = run_dictionary(model, dictionary, tokens, heads, horizon, args)
        all_records += [{"sae": name, **r} for r in records]
        dictionaries[name] = {"site": dictionary.cfg.site, "sae_sha256": file_sha256(resolve_sae(name) / WEIGHTS_FILE),
                              "firings": len(records), "seconds": round(time.time() - began), "summaries": summaries}
        print(f"{name}: {len(records)} firings in {time.time() - began:.0f}s")
    results = {
        "provenance": provenance(args.seed, sae=args.sae, passages=args.passages, context=args.context,
                                 max_horizon=args.max_horizon, first_position=args.first_position,
                                 firings_per_head=args.firings_per_head, second_sae=args.second_sae),
        "layer": layer, "heads": heads, "horizon": horizon, "native": "k_delta", "noise_factor": NOISE_FACTOR,
        "passages": tokens.shape[0], "context": tokens.shape[1],
        "firing_positions": [args.first_position, tokens.shape[1] - args.max_horizon],
        "firings_per_head": args.firings_per_head, "dictionaries": dictionaries, "seconds": round(time.time() - start),
        "cpu_seconds": round(time.process_time()),  # below the wall time when the machine is shared
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    write_records(args.out / "records.jsonl", all_records)
    plot(results, args.out / "effect_sizes.png")
    print(readme_block(json.loads((args.out / "results.json").read_text())))  # as the README reads it
    print(f"wrote {args.out}/results.json, records.jsonl, effect_sizes.png in {time.time() - start:.0f}s")


def plot(results: dict, path) -> None:
    """Median effect size per condition (passage bootstrap 95%), per dictionary and decay kind, per metric."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 4.5), sharey=True)
    rows = [(name, kind) for name in results["dictionaries"] for kind in DECAY_KINDS
            if kind in results["dictionaries"][name]["summaries"]]
    for ax, metric in zip(axes, METRICS):
        for k, (name, kind) in enumerate(rows):
            effect = results["dictionaries"][name]["summaries"][kind][metric]["effect"]
            for x, condition in enumerate(REPLACEMENTS):
                value, low, high = effect[condition]["median"]
                ax.errorbar(x + 0.8 * k / len(rows), value, [[value - low], [high - value]], fmt="o", color=f"C{k}",
                            label=f"{name}, {kind} heads" if x == 0 else None)
        ax.axhline(0, color="k", lw=0.5)
        ax.axhline(1, color="k", lw=0.5, ls=":")
        ax.set_xticks([x + 0.3 for x in range(len(REPLACEMENTS))], [CONDITION_NAMES[c] for c in REPLACEMENTS],
                      rotation=35, ha="right", fontsize=8)
        ax.set_title(f"KL {METRIC_NAMES[metric]}")
    axes[0].set_ylabel("median of 1 − KL_c / KL_delete\n(passage bootstrap 95%)")
    axes[0].set_ylim(-3, 1.1)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def _interval(value_low_high, percent: bool = False) -> str:
    value, low, high = value_low_high
    return f"{100 * value:.0f}% ({100 * low:.0f}–{100 * high:.0f})" if percent else f"{value:.2f} ({low:.2f} to {high:.2f})"


def readme_block(results: dict) -> str:
    """The README's substitution paragraph and table; every number from ``results``."""
    heads, horizon = results["heads"], results["horizon"]
    half = {int(h): v for h, v in heads["half_life"].items()}
    describe = lambda kind: ", ".join(f"{h} (half-life {half[h]:.0f}, H = {horizon[str(h)]})" for h in heads[kind])
    names = list(results["dictionaries"])
    first, last = results["firing_positions"]
    lines = [
        f"`python -m demos.substitution` ({wall_time(results)}, {results['cpu_seconds']} s of CPU time; layer {results['layer']}; {results['passages']} held-out "
        f"passages of {results['context']} tokens; {results['firings_per_head']} firing(s) per passage and head at "
        f"positions {first}–{last}, per dictionary: {', '.join(names)}). Native write k̂δᵀ. Heads with a fixed decay: "
        f"{describe('fixed')}; with a learned decay: {describe('learned')}; H is the horizon summed. Counted: the "
        f"firings where deletion matters, KL_delete > {results['noise_factor']:g} × the largest KL of the identity edit "
        f"(the native write put back) on that head. Effect size 1 − KL_c / KL_delete, median over firings, 95% "
        f"bootstrap over passages (1: c restores the clean prediction; 0: no better than deleting; < 0: worse); "
        f"pooled effect sizes, all controls at both norms and feature-clustered intervals are in the results file.",
        "",
        "| dictionary | heads | KL | firings counted | atom × code < delete | "
        + " | ".join(f"effect: {CONDITION_NAMES[c]}" for c in TABLE_CONDITIONS) + " |",
        "|---|---|---|---|---|" + "---|" * len(TABLE_CONDITIONS),
    ]
    for name in names:
        label = f"{name} ({'primary' if name == names[0] else 'second'})"
        for kind in DECAY_KINDS:
            for metric, s in results["dictionaries"][name]["summaries"].get(kind, {}).items():
                lines.append(f"| {label} | {kind} | {METRIC_NAMES[metric]} | {s['n_kept']} of {s['n']} | "
                             f"{_interval((s['rates']['atom<delete']['rate'], *s['rates']['atom<delete']['bootstrap_by_passage']), True)} | "
                             + " | ".join(_interval(s["effect"][c]["median"]) for c in TABLE_CONDITIONS) + " |")
    for name in names:
        for kind, by_metric in results["dictionaries"][name]["summaries"].items():
            if kind not in DECAY_KINDS:
                continue
            summed = by_metric["kl_sum"]
            effect = lambda c: _interval(summed["effect"][c]["median"])
            lines += ["", f"{name}, {kind}-decay heads, KL summed over the horizon: the atom × code undoes a median "
                          f"{effect('atom')} of deletion's KL (pooled {_interval(summed['effect']['atom']['pooled'])}); the native write's "
                          f"own direction at the atom's norm {effect('rank1_atom_norm')}, another atom with the same code "
                          f"{effect('other_atom')}, a random rank-1 write at the atom's norm {effect('random_atom_norm')}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
