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

- heads: every head of the SAE's layer (heads 0–3 of layer 5), reported apart by the shipped census's decay
  kind (`hooked_gdn.census.HeadCensus.decay_kind`): the fixed-decay heads 1 and 3 (half-lives ≈ 73 and ≈ 700
  tokens) and the learned-decay heads 0 and 2 (≈ 2 and ≈ 7 tokens), different mechanisms whose R² is never
  pooled together; ``--heads`` for fewer.
- directions (v, w): per head, the rank-1 atoms' unit factors of the ``--atoms`` features active at
  the most (passage, position) pairs of these passages, and ``--random`` seeded random unit
  directions as a control.
- ε = c · ‖S_t0‖_F for c in ``--eps``, ‖S_t0‖_F the clean state norm of that head at t0 in that passage.
- R² = 1 − Σ(measured − predicted)² / Σ(measured − mean(measured))², pooled over passages,
  directions, positions t > t0 and vocabulary entries (or the d_v entries of Δo), within one decay kind; "by
  distance" pools within octaves of t − t0 ([1, 2), [2, 4), …), per head, the same octaves for every head. A
  learned-decay head's edit has all but vanished a few octaves on, so each octave's share of the measured read
  change's sum of squares is reported with it: an R² on a share near zero is one on next to nothing.
- where the approximation holds: the last octave, per head, before the paper's R² at the read first
  falls below ``--holds-above`` (default 0.9), at the smallest ε.

It finishes in minutes (about 4 at 1 CPU thread at the defaults), so an interrupted run is rerun
from the start.
"""

from __future__ import annotations

import json
import time

import torch

from demos.common import (demo_parser, heldout_passages, load_model_and_sae, memory_groups, provenance, pyplot, sae_layer,
                    save_figure, wall_time, write_json)
from hooked_gdn.census import DECAY_KINDS
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
    parser.add_argument("--heads", type=int, nargs="+", default=None, help="default: every head of the SAE")
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
    census = memory_groups(layer, sae.cfg.head_indices if args.heads is None else args.heads)
    decay = census["decay"]
    # grouped by decay kind, fixed first, so that the fixed heads draw the random directions they drew when the
    # study ran on them alone
    heads = sorted(decay, key=lambda h: DECAY_KINDS.index(decay[h]))
    tokens = heldout_passages(model, args.passages, args.context)
    epsilons = sorted(args.eps)
    gen = torch.Generator().manual_seed(args.seed)
    features = frequent_features(model, sae, tokens, args.atoms, heads=heads)
    directions = atom_and_random_directions(sae, {h: [i for i, _ in features[h]] for h in heads}, args.random, gen)
    study = logit_shift_study(model, tokens, layer, args.t0, directions, epsilons, relative_to_state=True,
                              head_groups=decay)
    bins, smallest = study["bins"], epsilons[0]
    results = {
        "provenance": provenance(args.seed, sae=args.sae, passages=args.passages, context=args.context, t0=study["t0"],
                                 heads=heads, atoms=args.atoms, random=args.random, eps=epsilons),
        "layer": layer, "heads": heads, "decay": {h: decay[h] for h in heads},
        "half_life": {h: census["half_life"][h] for h in heads},
        "t0": study["t0"], "context": tokens.shape[1], "passages": len(tokens),
        "epsilon_multiples_of_state_norm": epsilons, "mean_state_norm_at_t0": study["mean_state_norm"],
        "directions": {h: [d.label for d in directions if d.head == h] for h in heads},
        "feature_frequency": {h: {i: f for i, f in features[h]} for h in heads},
        "r2": study["r2"], "r2_by_head": study["r2_by_head"], "bins": bins, "r2_by_distance": study["r2_by_distance"],
        "share_by_distance": study["share_by_distance"], "holds_above": args.holds_above,
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
        ax.set(xscale="log", xlabel="t − t0 (octave centres)", ylabel=f"R² at ε = {smallest}·‖S_t0‖",
               ylim=(max(-1.0, ax.get_ylim()[0]), 1.02),
               title=f"layer {layer} head {h}: {decay[h]} decay, half-life {census['half_life'][h]:.3g}")
        ax.legend(fontsize=8)
    save_figure(fig, args.out / "r2_vs_distance.png")
    print(readme_block(json.loads((args.out / "results.json").read_text())))  # as the README reads it
    print(f"wrote {args.out} in {time.time() - start:.0f}s")


def readme_block(results: dict) -> str:
    """The README's logit-shift paragraph and tables, fixed- and learned-decay heads apart; every number from
    ``results``."""
    eps = results["epsilon_multiples_of_state_norm"]
    r2, bins, heads, decay = results["r2"], results["bins"], results["heads"], results["decay"]
    half_life = lambda h: f"{results['half_life'][str(h)]:.3g}"
    by_kind = {kind: [h for h in heads if decay[str(h)] == kind] for kind in r2}
    n_directions = len(next(iter(results["directions"].values())))
    lines = [
        f"`python -m demos.logit_shift` ({wall_time(results)}; layer {results['layer']}, "
        + "; ".join(f"{kind}-decay heads " + ", ".join(f"{h} (half-life {half_life(h)} tokens)" for h in group)
                    for kind, group in by_kind.items())
        + f"; {results['passages']} held-out passages of {results['context']} tokens, edit at t0 = {results['t0']}, "
        f"{n_directions} directions per head (frequent atoms and random); ε in multiples of ‖S_t0‖_F). R² pooled over "
        f"t > t0 (t0 itself, where both predictions are the edit, left out) within each decay kind, never across, "
        f"exact / paper:",
        "",
        "| decay (heads) | ε / ‖S_t0‖ | read Δo, all | logits, all | logits, atoms | logits, random |",
        "|---|---|---|---|---|---|",
    ]
    pair = lambda r: f"{r['exact']:.3f} / {r['paper']:.3f}"
    for kind, group in by_kind.items():
        for i, e in enumerate(eps):
            row = {k: r2[kind][k][str(e)] for k in r2[kind]}
            label = f"{kind} ({', '.join(map(str, group))})" if i == 0 else ""
            lines.append(f"| {label} | {e:g} | {pair(row['all']['read'])} | {pair(row['all']['logits'])} "
                         f"| {pair(row['atom']['logits']) if 'atom' in row else '—'} "
                         f"| {pair(row['random']['logits']) if 'random' in row else '—'} |")
    smallest = eps[0]
    lines += ["", f"By distance t − t0 (octaves, the same for every head), at ε = {smallest:g}·‖S_t0‖, R² of the paper's "
                  f"approximation (the exact form's in brackets; where the read change has decayed to float32 rounding "
                  f"(a share near 0), even the exact form's R² at the read falls to 0), and each octave's share of the measured read "
                  f"change's sum of squares over t > t0:", "",
              "| head (decay, half-life) | at | " + " | ".join(f"{lo}–{hi - 1}" if hi - 1 > lo else f"{lo}" for lo, hi in bins)
              + " |",
              "|---|---|" + "---|" * len(bins)]
    for h in heads:
        by, share = results["r2_by_distance"][str(h)][str(smallest)], results["share_by_distance"][str(h)][str(smallest)]
        name = f"{h} ({decay[str(h)]}, {half_life(h)})"
        for s in SCALES:
            lines.append(f"| {name} | {s} | " + " | ".join(f"{p:.3f} ({x:.3f})" for p, x in zip(by[s]["paper"], by[s]["exact"]))
                         + " |")
        lines.append(f"| {name} | share of read | " + " | ".join(f"{x:.2g}" for x in share["read"]) + " |")
    holds = []
    for kind, group in by_kind.items():
        described = []
        for h in group:
            until = results["paper_holds_until"][str(h)]["read"]
            described.append(f"head {h} up to t − t0 = {until}" if until is not None else f"head {h} not even at t − t0 = 1")
        holds.append(f"{kind}-decay " + ", ".join(described))
    lines += ["", f"The paper's approximation holds (read R² ≥ {results['holds_above']:g}) in " + "; ".join(holds) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
