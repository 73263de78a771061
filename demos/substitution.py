"""The atom substitution test on the shipped model with the quickstart's SAE.

    python demos/substitution.py             # writes demo-out/substitution/{results.json, *.png}

At firings of the SAE's features on held-out passages (a firing: feature i is the top code of a
head at a position), remove the native write and continue, carried, under four conditions: the
atom scaled by its code a_i, the atom scaled to the native write's norm, deletion, and a random
rank-1 matrix of the native write's norm. Scored by KL(p_clean ‖ p_condition) at the next token and
averaged over 8 positions. Reported: win rates (atom < delete, and atom < delete < random) with
Wilson intervals and bootstrap intervals clustered by feature and by passage. The SAE's error term
is not added back (the question is what the atom alone carries). Firings are a seeded sample of
at most ``--max-firings``; one record per firing is saved.
"""

from __future__ import annotations

import random

import torch

from common import demo_parser, heldout_passages, load_model_and_sae, pyplot, sae_layer, save_figure, write_json
from writesae.experiments import find_firings, substitution_test, summarize


def main() -> None:
    parser = demo_parser(__doc__, "demo-out/substitution")
    parser.add_argument("--max-firings", type=int, default=300)
    args = parser.parse_args()
    model, sae = load_model_and_sae(args.sae)
    layer = sae_layer(sae)
    tokens = heldout_passages(model, args.passages, args.context)
    with torch.no_grad():
        firings = find_firings(model, sae, tokens)
        firings = [f for f in firings if f.position < tokens.shape[1] - 1]  # a next token to score
        firings = random.Random(args.seed).sample(firings, min(args.max_firings, len(firings)))
        records = substitution_test(model, sae, tokens, firings, horizon=8, seed=args.seed)
    summaries = {f"{metric}/{atom}": summarize(records, metric=metric, atom=atom, seed=args.seed)
                 for metric in ("kl_next", "kl_mean") for atom in ("atom", "atom_norm_matched")}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {"layer": layer, "passages": tokens.shape[0], "context": tokens.shape[1],
                                           "summaries": summaries, "records": records})

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for condition in ("atom", "atom_norm_matched", "delete", "random"):
        values = torch.tensor([r["kl_next"][condition] for r in records]).clamp_min(1e-9).log10()
        ax.hist(values.numpy(), bins=40, alpha=0.5, label=condition)
    ax.set(xlabel="log10 KL(p_clean ‖ p_condition) at the next token", ylabel="firings",
           title=f"atom substitution, layer {layer}, {len(records)} firings")
    ax.legend()
    save_figure(fig, args.out / "kl_histogram.png")

    print(f"layer {layer}: {len(records)} firings on {tokens.shape[0]} held-out passages")
    print("metric / atom condition          atom<delete  [Wilson]          atom<delete<random  [Wilson]")
    for name, s in summaries.items():
        a, c = s["atom_beats_delete"], s["strict_chain"]
        print(f"{name:<32} {a['rate']:.3f} [{a['wilson'][0]:.3f}, {a['wilson'][1]:.3f}]   "
              f"{c['rate']:.3f} [{c['wilson'][0]:.3f}, {c['wilson'][1]:.3f}]")
    s = summaries["kl_next/atom"]["atom_beats_delete"]
    print(f"bootstrap (atom<delete, next token): by feature {s['bootstrap_by_feature']}, by passage {s['bootstrap_by_passage']}")
    print(f"wrote {args.out}/results.json, kl_histogram.png")


if __name__ == "__main__":
    main()
