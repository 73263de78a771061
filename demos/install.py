"""Installs in generation: write an SAE atom into one head's memory and see whether target tokens follow.

For each head of the quickstart SAE's layer and each direction (v, w), at the last 3 positions of a
held-out prompt the native write k̂_t δ_tᵀ is replaced by m ‖k̂_t δ_tᵀ‖_F · v wᵀ (unit v, w), the edit
carries through the recurrence, and the model continues greedily (``install_study`` in
``writesae.experiments.install``). Per prompt, ``--targets`` target tokens are drawn (seeded) among
the tokens ranked 100–1000 by the unmodified model's next-token distribution (``pick_targets``).

Choices:

- directions: per head, the rank-1 atoms (V_i, W_i) of the ``--atoms`` features active at the most
  (prompt, position) pairs of the held-out prompts, and ``--random`` seeded random unit rank-1
  directions as a control. The targets are not chosen to match the atom: this asks how far a
  generic installed atom moves mid-ranked tokens, not whether a designed install hits its target.
- multipliers m (``--multipliers``, default 1.5 3 6) scale the installed write to m × the native
  write's Frobenius norm at each position.
- inclusion rate: the fraction of (prompt, target) pairs whose target appears among the
  ``--new-tokens`` greedy tokens; the unmodified continuation's rate is the baseline (m = 0 in the plot).
- lift: log p_edited(target | prompt) − log p_clean(target | prompt) at the first generated step, in nats.
- "changed": the fraction of installs whose greedy continuation differs from the unmodified one;
  "any"/"best" (chosen post hoc, an upper bound on picking the atom per target): whether any
  direction's install put the target in the continuation, and the largest lift over directions.

Outputs in ``--out`` (default demo-out/install): results.json and dose_response.png (inclusion rate
and mean lift vs m, atoms and random directions).

    python demos/install.py                          # ~2 minutes on 2 CPU cores (8 prompts × 12 directions × 3 m)
    python demos/install.py --passages 8 --heads 0 1 2 3 --atoms 3 --new-tokens 20
"""

from __future__ import annotations

import time

import torch

from common import demo_parser, heldout_passages, load_model_and_sae, pyplot, sae_layer, save_figure, write_json
from writesae.experiments import atom_and_random_directions, frequent_features, install_study


def main() -> None:
    parser = demo_parser(__doc__, "demo-out/install")
    parser.add_argument("--heads", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--atoms", type=int, default=2, help="most frequent features per head installed")
    parser.add_argument("--random", type=int, default=1, help="random unit rank-1 directions per head (control)")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1.5, 3.0, 6.0])
    parser.add_argument("--targets", type=int, default=10, help="targets per prompt, ranked 100–1000 by the clean model")
    parser.add_argument("--new-tokens", type=int, default=20, help="greedy tokens generated")
    args = parser.parse_args()
    start = time.time()

    model, sae = load_model_and_sae(args.sae)
    layer = sae_layer(sae)
    prompts = heldout_passages(model, args.passages, args.context)
    T = prompts.shape[1]
    positions = [T - 3, T - 2, T - 1]
    features = frequent_features(model, sae, prompts, args.atoms, heads=args.heads)
    gen = torch.Generator().manual_seed(args.seed)
    directions = atom_and_random_directions(sae, {h: [i for i, _ in features[h]] for h in args.heads}, args.random, gen)
    study = install_study(model, prompts, layer, directions, args.multipliers, positions=positions,
                          max_new_tokens=args.new_tokens, n_targets=args.targets, seed=args.seed)
    rows, baseline, by_m, changed, best = (study[key] for key in (
        "runs", "clean_inclusion_rate", "by_multiplier", "continuation_changed_fraction", "best_direction_per_target"))

    example = next(r for r in rows if r["m"] == max(args.multipliers) and r["kind"] == "atom")
    results = {
        "layer": layer, "heads": args.heads, "prompts": len(prompts), "context": T, "positions": positions,
        "rank_range": [100, 1000], "targets_per_prompt": args.targets, "new_tokens": args.new_tokens,
        "feature_frequency": {h: {i: f for i, f in features[h]} for h in args.heads},
        "clean_inclusion_rate": baseline,
        "by_multiplier": by_m,
        "continuation_changed_fraction": changed,
        "best_direction_per_target": best,
        "example": {"head": example["head"], "direction": example["direction"], "m": example["m"],
                    "prompt_tail": model.to_string(prompts[example["prompt"], -20:]),
                    "clean": model.to_string(example["clean_continuation"]),
                    "installed": model.to_string(example["continuation"]),
                    "targets": [model.to_string([t]) for t in example["targets"]]},
        "runs": [{k: r[k] for k in ("m", "head", "kind", "direction", "prompt", "targets", "included", "lift")}
                 for r in rows],
        "seconds": time.time() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)

    plt = pyplot()
    ms = [0.0] + list(args.multipliers)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("all", "-o"), ("atom", ":s"), ("random", "-.^")):
        if kind not in by_m:
            continue
        ax1.plot(ms, [baseline] + [by_m[kind][m]["inclusion_rate"] for m in args.multipliers], style, label=kind)
        ax2.plot(ms, [0.0] + [by_m[kind][m]["mean_lift"] for m in args.multipliers], style, label=kind)
    ax1.set_xlabel("multiplier m (0 = unmodified)")
    ax1.set_ylabel("target inclusion rate")
    ax1.set_title(f"targets in {args.new_tokens} greedy tokens")
    ax2.set_xlabel("multiplier m (0 = unmodified)")
    ax2.set_ylabel("mean first-step log-prob lift (nats)")
    ax2.axhline(0, color="k", lw=0.5)
    for ax in (ax1, ax2):
        ax.legend()
    fig.suptitle(f"installs at layer {layer}, last 3 prompt positions, targets ranked 100–1000")
    save_figure(fig, args.out / "dose_response.png")

    print(f"\nlayer {layer}, heads {args.heads}, {len(prompts)} prompts × {args.targets} targets, "
          f"{len(directions)} directions; unmodified inclusion rate {baseline:.3f}")
    print(f"{'m':>5} {'incl(all)':>10} {'lift(all)':>10} {'incl(atom)':>11} {'lift(atom)':>11} "
          f"{'incl(rand)':>11} {'lift(rand)':>11} {'changed':>8} {'incl(any)':>10} {'lift(best)':>11}")
    for m in args.multipliers:
        a, t = by_m["all"][m], by_m.get("atom", by_m["all"])[m]
        rnd = by_m.get("random", {}).get(m, {"inclusion_rate": float("nan"), "mean_lift": float("nan")})
        print(f"{m:>5g} {a['inclusion_rate']:>10.3f} {a['mean_lift']:>10.3f} {t['inclusion_rate']:>11.3f} "
              f"{t['mean_lift']:>11.3f} {rnd['inclusion_rate']:>11.3f} {rnd['mean_lift']:>11.3f} {changed[m]:>8.2f} "
              f"{best[m]['inclusion_rate_any_direction']:>10.3f} {best[m]['mean_best_lift']:>11.3f}")
    print(f"wrote {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
