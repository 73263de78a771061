"""Does a rank-1 state edit move the read and the logits the way the recurrence says it should?

    python -m demos.logit_shift     # writes demos/results/logit_shift/{results.json, r2_vs_distance.png}

We add ε v wᵀ to one head's state S_t0 of the SAE's layer, at t0 = ``--t0`` of a held-out passage of
``--context`` tokens, let the edit carry forward, and compare the measured change at every later
position t > t0 (at t0 the two predictions coincide by construction, so it is left out) with two
predictions (``writesae.experiments.logit_shift``):

- exact: the read change Δo_t = ε ⟨M_{t0→t}ᵀ q̂_t, v⟩ w, M the product of A_s = α_s (I − β_s k̂_s k̂_sᵀ);
- paper: the decay-only read change ε G_{t0→t} ⟨q̂_t, v⟩ w, G = Π α_s.

Both are compared at the head's read Δo (where the exact form is exact at any ε, so its R² is a
check, and the paper's R² measures the approximation alone) and at the logits (both pushed through
the rest of the network by one Jacobian-vector product around the clean run, a first-order step).

Choices:

- heads: the long-memory heads of the shipped census (median half-life ≥ 16 tokens; heads 1 and 3
  of layer 5, ≈ 73 and ≈ 700 tokens), by default; ``--heads`` for others.
- directions (v, w): per head, the rank-1 atoms' unit factors of the ``--atoms`` features active at
  the most (passage, position) pairs of these passages, and ``--random`` seeded random unit
  directions as a control.
- ε = c · ‖S_t0‖_F for c in ``--eps``, ‖S_t0‖_F the clean state norm of that head at t0 in that passage.
- R² = 1 − Σ(measured − predicted)² / Σ(measured − mean(measured))², pooled over passages,
  directions, positions t > t0 and vocabulary entries (or the d_v entries of Δo); "by distance"
  pools within octaves of t − t0 ([1, 2), [2, 4), …), per head.
- where the approximation holds: the last octave, per head, before the paper's R² at the read first
  falls below ``--holds-above`` (default 0.9), at the smallest ε.

It finishes in minutes (about 1 at 2 CPU threads at the defaults), so an interrupted run is rerun
from the start.
"""

from __future__ import annotations

import json
import time

import torch

from demos.common import (demo_parser, heldout_passages, load_model_and_sae, memory_groups, provenance, pyplot, sae_layer,
                    save_figure, wall_time, write_json)
from writesae.experiments import atom_and_random_directions, frequent_features, logit_shift_study

METHODS = ("exact", "paper")
SCALES = ("read", "logits")


def holds_until(r2: list[float], bins: list[list[int]], threshold: float) -> int | None:
    """The largest t − t0 before the first octave whose R² is below ``threshold`` (None: below from the start)."""
    last = None
    for value, (lo, hi) in zip(r2, bins):
        if not value >= threshold:
            break
        last = hi - 1
    return last


def main() -> None:
    parser = demo_parser(__doc__, "demos/results/logit_shift")
    parser.set_defaults(passages=8, context=256)
    parser.add_argument("--heads", type=int, nargs="+", default=None, help="default: the census's long-memory heads")
    parser.add_argument("--atoms", type=int, default=2, help="most frequent features per head used as directions")
    parser.add_argument("--random", type=int, default=1, help="random unit directions per head (control)")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="ε as multiples of ‖S_t0‖_F")
    parser.add_argument("--t0", type=int, default=16, help="edit position")
    parser.add_argument("--holds-above", type=float, default=0.9, help="R² threshold of 'the approximation holds'")
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(args.seed)

    model, sae = load_model_and_sae(args.sae)
    layer = sae_layer(sae)
    census = memory_groups(layer, sae.cfg.head_indices)
    heads = census["long"] if args.heads is None else args.heads
    tokens = heldout_passages(model, args.passages, args.context)
    epsilons = sorted(args.eps)
    gen = torch.Generator().manual_seed(args.seed)
    features = frequent_features(model, sae, tokens, args.atoms, heads=heads)
    directions = atom_and_random_directions(sae, {h: [i for i, _ in features[h]] for h in heads}, args.random, gen)
    study = logit_shift_study(model, tokens, layer, args.t0, directions, epsilons, relative_to_state=True)
    bins, smallest = study["bins"], epsilons[0]
    results = {
        "provenance": provenance(args.seed, sae=args.sae, passages=args.passages, context=args.context, t0=study["t0"],
                                 heads=heads, atoms=args.atoms, random=args.random, eps=epsilons),
        "layer": layer, "heads": heads, "half_life": {h: census["half_life"][h] for h in heads},
        "t0": study["t0"], "context": tokens.shape[1], "passages": len(tokens),
        "epsilon_multiples_of_state_norm": epsilons, "mean_state_norm_at_t0": study["mean_state_norm"],
        "directions": {h: [d.label for d in directions if d.head == h] for h in heads},
        "feature_frequency": {h: {i: f for i, f in features[h]} for h in heads},
        "r2": study["r2"], "bins": bins, "r2_by_distance": study["r2_by_distance"],
        "holds_above": args.holds_above,
        "paper_holds_until": {h: {s: holds_until(study["r2_by_distance"][h][smallest][s]["paper"], bins, args.holds_above)
                                  for s in SCALES} for h in heads},
        "seconds": round(time.time() - start),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)

    plt = pyplot()
    fig, axes = plt.subplots(1, len(heads), figsize=(5.5 * len(heads), 4), squeeze=False)
    centres = [(lo * (hi - 1)) ** 0.5 for lo, hi in bins]
    for ax, h in zip(axes[0], heads):
        for s, style in zip(SCALES, ("-", "--")):
            for m, color in zip(METHODS, ("C0", "C1")):
                ax.plot(centres, study["r2_by_distance"][h][smallest][s][m], style, color=color, marker="o", label=f"{m}, {s}")
        ax.axhline(args.holds_above, color="k", lw=0.5)
        ax.set(xscale="log", xlabel="t − t0 (octave centres)", ylabel="R²", ylim=(max(-1.0, ax.get_ylim()[0]), 1.02),
               title=f"layer {layer} head {h} (half-life {census['half_life'][h]:.0f}), ε = {smallest}·‖S‖")
        ax.legend(fontsize=8)
    save_figure(fig, args.out / "r2_vs_distance.png")
    print(readme_block(json.loads((args.out / "results.json").read_text())))  # as the README reads it
    print(f"wrote {args.out} in {time.time() - start:.0f}s")


def readme_block(results: dict) -> str:
    """The README's logit-shift paragraph and tables; every number from ``results``."""
    eps = results["epsilon_multiples_of_state_norm"]
    r2, bins, heads = results["r2"], results["bins"], results["heads"]
    n_directions = len(next(iter(results["directions"].values())))
    lines = [
        f"`python -m demos.logit_shift` ({wall_time(results)}; layer {results['layer']}, heads "
        + ", ".join(f"{h} (half-life {results['half_life'][str(h)]:.0f} tokens)" for h in heads)
        + f"; {results['passages']} held-out passages of {results['context']} tokens, edit at t0 = {results['t0']}, "
        f"{n_directions} directions per head (frequent atoms and random); ε in multiples of ‖S_t0‖_F). R² pooled over "
        f"t > t0 (t0 itself, where both predictions are the edit, left out), exact / paper:",
        "",
        "| ε / ‖S_t0‖ | read Δo, all | logits, all | logits, atoms | logits, random |",
        "|---|---|---|---|---|",
    ]
    pair = lambda r: f"{r['exact']:.3f} / {r['paper']:.3f}"
    for e in eps:
        row = {g: r2[g][str(e)] for g in r2}
        lines.append(f"| {e:g} | {pair(row['all']['read'])} | {pair(row['all']['logits'])} "
                     f"| {pair(row['atom']['logits']) if 'atom' in row else '—'} "
                     f"| {pair(row['random']['logits']) if 'random' in row else '—'} |")
    smallest = eps[0]
    lines += ["", f"By distance t − t0 (octaves), at ε = {smallest:g}·‖S_t0‖, R² of the paper's approximation "
                  f"(the exact form's R² at the logits in brackets):", "",
              "| head | at | " + " | ".join(f"{lo}–{hi - 1}" if hi - 1 > lo else f"{lo}" for lo, hi in bins) + " |",
              "|---|---|" + "---|" * len(bins)]
    for h in heads:
        by = results["r2_by_distance"][str(h)][str(smallest)]
        lines.append(f"| {h} | read | " + " | ".join(f"{x:.3f}" for x in by["read"]["paper"]) + " |")
        lines.append(f"| {h} | logits | " + " | ".join(f"{p:.3f} ({x:.3f})" for p, x in zip(by["logits"]["paper"],
                                                                                             by["logits"]["exact"])) + " |")
    holds = []
    for h in heads:
        until = results["paper_holds_until"][str(h)]["read"]
        holds.append(f"head {h} up to t − t0 = {until}" if until is not None else f"head {h} not even at t − t0 = 1")
    lines += ["", f"The paper's approximation holds (read R² ≥ {results['holds_above']:g}) in " + "; ".join(holds) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
