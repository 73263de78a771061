"""Installs aimed at a target: can one rank-1 write into a head's memory make the model say a chosen token?

    python -m demos.install     # writes demos/results/install/{results.json, runs.jsonl, inclusion.png}

For each held-out prompt, ``--targets`` target tokens are drawn (seeded) among those ranked 100–1000
by the unmodified model's next-token distribution. At the last 3 prompt positions the state of a head gets
the additive edit ΔS_t = m ‖k̂_t δ_tᵀ‖_F · v wᵀ − k̂_t δ_tᵀ (unit v, w: the native write's contribution taken out,
m times its norm put back along v wᵀ; the edit the first-order prediction is derived for), the edit carries
through the recurrence, and the model continues greedily for ``--new-tokens`` tokens; a target is included
when it appears among them (``writesae.experiments.install``). Installs are made in one head at a time, in
every head of the layer at once, and in every head of every GDN layer at once (``--scopes``), since one head's
effect is capped by its gated RMSNorm. Directions, per (prompt, head or heads, target):

- aimed: the top singular pair of J = Σ_t0 n_t0 Σ_{t ≥ t0} M_{t0→t}ᵀ q̂_t (∂ log p(target)/∂o_t)ᵀ,
  the unit v wᵀ that raises the target's first-step log-prob most to first order (exact propagator
  through the layer, one VJP for the rest of the network); in several heads, each head's own;
- aimed atom: the SAE atom of that head with the largest V_iᵀ J W_i (the best the dictionary offers);
- controls, not aimed, scored on every target of the prompt: the head's most frequent feature on
  these prompts (``--frequent``) and ``--random`` seeded random unit directions.

Multipliers m (``--multipliers``) scale the write to m × the native norm. One-head installs are split by the
shipped census into long-memory (heads 1 and 3 of layer 5, fixed decays) and short-memory (heads 0 and 2,
learned decays). Reported per kind, group and m: inclusion rate with Wilson intervals (each (prompt, head, direction, target)
one trial), the mean first-step log-prob lift (nats), and its first-order prediction m vᵀJw − c.

It finishes in minutes (about 2.5 at 2 CPU threads at the defaults), so an interrupted run is rerun
from the start; every install is saved in runs.jsonl.
"""

from __future__ import annotations

import json
import time

import torch

from demos.common import (demo_parser, heldout_passages, load_model_and_sae, memory_groups, provenance, pyplot, sae_layer,
                    save_figure, wall_time, write_json)
from hooked_gdn.files import atomic_file
from writesae.experiments import atom_and_random_directions, frequent_features, install_study, summarize_installs
from writesae.experiments.install import SCOPES

KINDS = {"aimed": "aimed (J's top singular pair)", "aimed_atom": "aimed atom (best V_iᵀJW_i)",
         "atom": "frequent atom (control)", "random": "random (control)"}
SCOPE_GROUPS = {"layer": "every head of the layer", "layers": "every head of every GDN layer"}


def main() -> None:
    parser = demo_parser(__doc__, "demos/results/install")
    parser.set_defaults(passages=12)
    parser.add_argument("--frequent", type=int, default=1, help="most frequent features per head installed (control)")
    parser.add_argument("--random", type=int, default=1, help="random unit rank-1 directions per head (control)")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--targets", type=int, default=3, help="targets per prompt, ranked 100–1000 by the clean model")
    parser.add_argument("--new-tokens", type=int, default=12, help="greedy tokens generated")
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=list(SCOPES), help="where installs are made")
    args = parser.parse_args()
    start = time.time()

    model, sae = load_model_and_sae(args.sae)
    layer = sae_layer(sae)
    heads = sae.cfg.head_indices
    census = memory_groups(layer, heads)
    prompts = heldout_passages(model, args.passages, args.context)
    features = frequent_features(model, sae, prompts, args.frequent)
    gen = torch.Generator().manual_seed(args.seed)
    controls = atom_and_random_directions(sae, {h: [i for i, _ in features[h]] for h in heads}, args.random, gen)
    study = install_study(model, prompts, layer, heads, controls, sae=sae, multipliers=args.multipliers,
                          max_new_tokens=args.new_tokens, n_targets=args.targets, seed=args.seed, scopes=args.scopes)
    runs = study["runs"]
    clean_rate = sum(c["included"] for c in study["clean"]) / len(study["clean"])
    results = {
        "provenance": provenance(args.seed, sae=args.sae, passages=args.passages, context=args.context,
                                 targets=args.targets, multipliers=args.multipliers, new_tokens=args.new_tokens,
                                 frequent=args.frequent, random=args.random, scopes=args.scopes),
        "layer": layer, "heads": census, "prompts": len(prompts), "context": prompts.shape[1],
        "install_positions": "the last 3 prompt positions", "install_edit": "additive state edit m n_t v wᵀ − k̂_t δ_tᵀ",
        "scopes": {scope: SCOPES[scope] for scope in args.scopes},
        "rank_range": [100, 1000], "targets_per_prompt": args.targets,
        "new_tokens": args.new_tokens, "multipliers": args.multipliers,
        "frequent_features": {h: [i for i, _ in features[h]] for h in heads},
        "clean_inclusion_rate": clean_rate, "clean_n": len(study["clean"]),
        "summary": {**{group: summarize_installs([r for r in runs if r["scope"] == "head" and r["head"] in census[group]])
                       for group in ("long", "short") if census[group] and "head" in args.scopes},
                    **{SCOPE_GROUPS[scope]: summarize_installs([r for r in runs if r["scope"] == scope])
                       for scope in SCOPE_GROUPS if scope in args.scopes}},
        "seconds": round(time.time() - start),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    with atomic_file(args.out / "runs.jsonl") as f:
        f.writelines(json.dumps({k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in r.items()}) + "\n"
                     for r in runs)

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results["summary"]), figsize=(5.5 * len(results["summary"]), 4), squeeze=False)
    for ax, (group, summary) in zip(axes[0], results["summary"].items()):
        for kind, label in KINDS.items():
            if kind in summary:
                rates = [summary[kind][m]["inclusion_rate"] for m in args.multipliers]
                errors = [[r - summary[kind][m]["wilson"][0] for r, m in zip(rates, args.multipliers)],
                          [summary[kind][m]["wilson"][1] - r for r, m in zip(rates, args.multipliers)]]
                ax.errorbar(args.multipliers, rates, errors, marker="o", capsize=3, label=label)
        ax.axhline(clean_rate, color="k", lw=0.5, label="unmodified")
        ax.set(xscale="log", xlabel="m (× the native write's norm)", ylabel="target inclusion rate", ylim=(-0.02, 1.02),
               title=f"{group}-memory heads {census[group]}, layer {layer}" if group in census else group)
        ax.legend(fontsize=7)
    save_figure(fig, args.out / "inclusion.png")
    print(readme_block(json.loads((args.out / "results.json").read_text())))  # as the README reads it
    print(f"wrote {args.out} in {time.time() - start:.0f}s")


def readme_block(results: dict) -> str:
    """The README's install paragraph and table; every number from ``results``."""
    ms = results["multipliers"]
    heads = results["heads"]
    lines = [
        f"`python -m demos.install` ({wall_time(results)}; layer {results['layer']}, {results['prompts']} held-out "
        f"prompts of {results['context']} tokens, {results['targets_per_prompt']} targets each ranked "
        f"{results['rank_range'][0]}–{results['rank_range'][1]} by the unmodified model, each install an additive state edit "
        f"(the native write's contribution replaced by m × its norm along v wᵀ) at the last 3 positions, "
        f"{results['new_tokens']} greedy tokens; one head at a time in the long-memory heads {heads['long']} (fixed decays) "
        f"and the short-memory heads {heads['short']} (learned decays), then in "
        f"{' and in '.join(SCOPE_GROUPS[s] for s in results['scopes'] if s in SCOPE_GROUPS)} at once, each head its own "
        f"direction). "
        f"Unmodified, {100 * results['clean_inclusion_rate']:.1f}% of the {results['clean_n']} targets appear. "
        f"Target inclusion (Wilson 95%) and mean first-step log-prob lift in nats (its first-order prediction in brackets):",
        "",
        "| heads | direction | " + " | ".join(f"m = {m:g}" for m in ms) + " |",
        "|---|---|" + "---|" * len(ms),
    ]
    for group, summary in results["summary"].items():
        for kind, label in KINDS.items():
            if kind not in summary:
                continue
            cells = []
            for m in ms:
                s = summary[kind][str(m)]
                low, high = s["wilson"]
                cells.append(f"{100 * s['inclusion_rate']:.0f}% ({100 * low:.0f}–{100 * high:.0f}), "
                             f"{s['mean_lift']:+.2f} ({s['mean_predicted_lift']:+.2f})")
            lines.append(f"| {group} | {label} | " + " | ".join(cells) + " |")
    n = {group: summary["aimed"][str(ms[0])]["n"] for group, summary in results["summary"].items()}
    lines += ["", "Trials per cell: " + ", ".join(f"{n[g]} ({g}, aimed)" for g in n) + "; the controls are scored on "
              "every target of their prompt."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
