"""Write ablation on the shipped model: what deleting (or scaling) one head's write does downstream.

    python -m demos.ablation                 # writes demos/results/ablation/{results.json, kl.png}

For every head of the SAE's layer (the SAE itself is not used: only its layer), on held-out
passages: delete (scale 0) or scale (0.5, 2) the write k̂_t δ_tᵀ at the middle position t, carried
through the recurrence, and measure KL(p_clean ‖ p_ablated) of the next-token distributions and the
change in next-token loss, by distance from t. Reported: the mean at t (the very next prediction)
and over the 8 positions from t, with each head's median half-life from the shipped census.

It finishes in a minute or two, so an interrupted run is rerun from the start.
"""

from __future__ import annotations

import json
import time

import torch

from demos.common import (demo_parser, heldout_passages, load_model_and_sae, memory_groups, provenance, pyplot, sae_layer,
                    save_figure, wall_time, write_json)
from writesae.experiments import write_ablation

SCALES = (0.0, 0.5, 2.0)
HORIZON = 8


def main() -> None:
    parser = demo_parser(__doc__, "demos/results/ablation")
    parser.set_defaults(passages=32)
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(args.seed)
    model, sae = load_model_and_sae(args.sae)
    layer = sae_layer(sae)
    tokens = heldout_passages(model, args.passages, args.context)
    t = tokens.shape[1] // 2
    results = {"provenance": provenance(args.seed, sae=args.sae, passages=args.passages, context=args.context),
               "layer": layer, "position": t, "passages": tokens.shape[0], "context": tokens.shape[1], "horizon": HORIZON,
               "half_life": memory_groups(layer, range(model.cfg.n_value_heads))["half_life"],
               "kl": "KL(p_clean || p_ablated), nats, next-token distributions", "heads": {}}
    with torch.no_grad():
        for head in range(model.cfg.n_value_heads):
            per_scale = {}
            for scale in SCALES:
                out = write_ablation(model, tokens, layer, [head], [t], scale=scale)
                kl, loss = out["mean_kl"][t:], out["mean_loss_change"][t:]
                per_scale[str(scale)] = {"kl_by_distance": kl.tolist(), "loss_change_by_distance": loss.tolist(),
                                         "kl_next": kl[0].item(), "kl_mean_horizon": kl[:HORIZON].mean().item(),
                                         "loss_change_next": loss[0].item(),
                                         "kl_next_per_passage": out["kl"][:, t].tolist()}
            results["heads"][str(head)] = per_scale
    results["seconds"] = round(time.time() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for head, per_scale in results["heads"].items():
        axes[0].plot(per_scale["0.0"]["kl_by_distance"], label=f"head {head}")
    axes[0].set(xlabel="distance from the deleted write", ylabel="mean KL (nats)", yscale="log", title=f"layer {layer}: write deleted")
    axes[0].legend()
    axes[1].hist([per_scale["0.0"]["kl_next_per_passage"] for per_scale in results["heads"].values()], bins=20,
                 label=[f"head {h}" for h in results["heads"]])
    axes[1].set(xlabel="KL at the next token (nats)", ylabel="passages", title="deletion, per passage")
    axes[1].legend()
    save_figure(fig, args.out / "kl.png")

    print(readme_block(json.loads((args.out / "results.json").read_text())))  # as the README reads it
    print(f"wrote {args.out}/results.json, kl.png")


def readme_block(results: dict) -> str:
    """The README's write-ablation paragraph and table; every number from ``results``."""
    lines = [
        f"`python -m demos.ablation` ({wall_time(results)}; layer {results['layer']}, the write at t = {results['position']} of "
        f"{results['passages']} held-out passages of {results['context']} tokens). Mean over passages; KL in nats:",
        "",
        f"| head (half-life) | KL next, deleted | KL mean over {results['horizon']}, deleted | Δloss next, deleted "
        "| KL next, ×0.5 | KL next, ×2 |",
        "|---|---|---|---|---|---|",
    ]
    for head, by_scale in results["heads"].items():
        deleted, half, double = by_scale["0.0"], by_scale["0.5"], by_scale["2.0"]
        lines.append(f"| {head} ({results['half_life'][head]:.0f}) | {deleted['kl_next']:.2g} "
                     f"| {deleted['kl_mean_horizon']:.2g} | {deleted['loss_change_next']:+.3f} "
                     f"| {half['kl_next']:.2g} | {double['kl_next']:.2g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
