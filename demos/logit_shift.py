"""Does a rank-1 state edit move the logits the way the recurrence says it should?

We add ε v wᵀ to one head's state S_t0 of the quickstart SAE's layer, at t0 = the middle of a
held-out passage, let the edit carry forward, and compare the measured logit change at every
later position t ≥ t0 with two predictions (``writesae.experiments.logit_shift``):

- exact: the read change ε ⟨M_{t0→t}ᵀ q̂_t, v⟩ w, M the product of A_s = α_s (I − β_s k̂_s k̂_sᵀ),
  pushed to the logits by one Jacobian-vector product around the clean run;
- paper: the decay-only read change ε G_{t0→t} ⟨q̂_t, v⟩ w, G = Π α_s, through the same JVP.

Choices:

- directions (v, w): for each head, the rank-1 atoms' factors (V_i, W_i), at unit norm, of the
  ``--atoms`` features that are active (code > 0) at the most (passage, position) pairs of the
  held-out passages used here, plus ``--random`` seeded random unit directions as a control
  (`writesae.experiments.features`). So ‖v wᵀ‖_F = 1.
- ε scale: ε = c · ‖S_t0‖_F for c in ``--eps`` (default 0.01 0.03 0.1 0.3 1), with ‖S_t0‖_F the
  clean state norm of that head at t0 in that passage, so c is the edit's size relative to the state.
- R² = 1 − Σ(measured − predicted)² / Σ(measured − mean(measured))², pooled over every entry
  (passage, head, direction, position t ≥ t0, vocabulary token). "By distance" pools the same way
  at a single d = t − t0. Both predictions are linear in ε (one JVP per direction at ε = 1, then
  scaled); the measurement is not, so R² falling with ε shows where the first-order step stops holding.
- scatter: a seeded random sample of (position, token) entries per (passage, head, direction) at
  the smallest ε.

Outputs in ``--out`` (default demo-out/logit_shift): results.json, scatter.png (predicted vs
measured at the smallest ε, exact and paper), r2_vs_eps.png and r2_vs_distance.png.

    python demos/logit_shift.py                       # ~1 minute on 2 CPU cores (8 passages × 4 heads × 4 directions)
    python demos/logit_shift.py --passages 8 --heads 0 1 2 3 --atoms 5
"""

from __future__ import annotations

import time

import torch

from common import demo_parser, heldout_passages, load_model_and_sae, pyplot, sae_layer, save_figure, write_json
from writesae.experiments import atom_and_random_directions, frequent_features, logit_shift_study

METHODS = ("exact", "paper")


def main() -> None:
    parser = demo_parser(__doc__, "demo-out/logit_shift")
    parser.add_argument("--heads", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--atoms", type=int, default=3, help="most frequent features per head used as directions")
    parser.add_argument("--random", type=int, default=1, help="random unit directions per head (control)")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0],
                        help="ε as multiples of ‖S_t0‖_F")
    parser.add_argument("--t0", type=int, default=None, help="edit position (default: the middle of the passage)")
    parser.add_argument("--scatter-points", type=int, default=400, help="sampled entries per (passage, head, direction)")
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(args.seed)

    model, sae = load_model_and_sae(args.sae)
    layer = sae_layer(sae)
    tokens = heldout_passages(model, args.passages, args.context)
    T = tokens.shape[1]
    t0 = T // 2 if args.t0 is None else args.t0 % T
    epsilons = sorted(args.eps)
    gen = torch.Generator().manual_seed(args.seed)

    features = frequent_features(model, sae, tokens, args.atoms, heads=args.heads)
    directions = atom_and_random_directions(sae, {h: [i for i, _ in features[h]] for h in args.heads}, args.random, gen)
    study = logit_shift_study(model, tokens, layer, t0, directions, epsilons, relative_to_state=True,
                              samples=args.scatter_points, generator=gen)
    distances = study["distances"]

    results = {
        "layer": layer, "heads": args.heads, "t0": t0, "context": T, "passages": len(tokens),
        "epsilon_multiples_of_state_norm": epsilons,
        "mean_state_norm_at_t0": study["mean_state_norm"],
        "directions": {h: [d.label for d in directions if d.head == h] for h in args.heads},
        "feature_frequency": {h: {i: f for i, f in features[h]} for h in args.heads},
        "r2_by_eps": study["r2_by_eps"],
        "distances": distances,
        "r2_by_distance": study["r2_by_distance"],
        "seconds": time.time() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)

    plt = pyplot()
    measured = study["samples"]["measured"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    for ax, m in zip(axes, METHODS):
        predicted = study["samples"][m]
        ax.scatter(predicted, measured, s=3, alpha=0.3)
        lim = float(max(measured.abs().max(), predicted.abs().max()))
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
        ax.set_title(f"{m}: R² = {results['r2_by_eps']['all'][epsilons[0]][m]:.3f} (ε = {epsilons[0]}·‖S‖)")
        ax.set_xlabel("predicted logit change")
    axes[0].set_ylabel("measured logit change")
    save_figure(fig, args.out / "scatter.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for g, style in (("all", "-"), ("atom", ":"), ("random", "-.")):
        if g not in results["r2_by_eps"]:
            continue
        for m, color in zip(METHODS, ("C0", "C1")):
            ax.plot(epsilons, [results["r2_by_eps"][g][e][m] for e in epsilons], style, color=color, marker="o",
                    label=f"{m} ({g})", lw=2 if g == "all" else 1)
    ax.set_xscale("log")
    ax.set_xlabel("ε / ‖S_t0‖_F")
    ax.set_ylabel("R² (pooled)")
    ax.set_ylim(max(-1.0, ax.get_ylim()[0]), 1.02)
    ax.legend(fontsize=8)
    ax.set_title(f"logit shift, layer {layer}, t0 = {t0}")
    save_figure(fig, args.out / "r2_vs_eps.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for e, color in zip(epsilons, plt.cm.viridis(torch.linspace(0, 0.9, len(epsilons)).numpy())):
        for m, style in zip(METHODS, ("-", "--")):
            ax.plot(distances, results["r2_by_distance"][e][m], style, color=color, label=f"{m}, ε = {e}·‖S‖")
    ax.set_xlabel("t − t0")
    ax.set_ylabel("R² (pooled at each distance)")
    lowest = min(min(results["r2_by_distance"][e][m]) for e in epsilons for m in METHODS)
    ax.set_ylim(max(-1.0, lowest - 0.05), 1.01)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, args.out / "r2_vs_distance.png")

    print(f"\nlayer {layer}, heads {args.heads}, {len(tokens)} passages, t0 = {t0}, "
          f"{len(results['directions'][args.heads[0]])} directions/head; R² pooled over t ≥ t0 and vocabulary")
    print(f"{'ε/‖S‖':>8} {'exact':>8} {'paper':>8} {'exact(atom)':>12} {'paper(atom)':>12} {'exact(rand)':>12} {'paper(rand)':>12}")
    for e in epsilons:
        r = results["r2_by_eps"]
        print(f"{e:>8g} {r['all'][e]['exact']:>8.3f} {r['all'][e]['paper']:>8.3f} "
              f"{r.get('atom', r['all'])[e]['exact']:>12.3f} {r.get('atom', r['all'])[e]['paper']:>12.3f} "
              f"{r.get('random', r['all'])[e]['exact']:>12.3f} {r.get('random', r['all'])[e]['paper']:>12.3f}")
    e = epsilons[0]
    picks = [d for d in (0, 1, 4, 16, distances[-1]) if d in distances]
    print(f"by t − t0 at ε = {e}·‖S‖: " + ", ".join(
        f"d={d}: {results['r2_by_distance'][e]['exact'][d]:.3f}/{results['r2_by_distance'][e]['paper'][d]:.3f}"
        for d in picks) + " (exact/paper)")
    print(f"wrote {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
