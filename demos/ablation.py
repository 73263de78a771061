"""Write ablation on the shipped model: what deleting (or scaling) one head's write does downstream.

    python demos/ablation.py                 # writes demo-out/ablation/{results.json, *.png}

For every head of the quickstart SAE's layer, on held-out passages: delete (scale 0) or scale
(0.5, 2) the write k̂_t δ_tᵀ at the middle position t, carried through the recurrence, and measure
KL(p_clean ‖ p_ablated) of the next-token distributions and the change in next-token loss, by
distance from t. Reported: the mean at t (the very next prediction) and over the 8 positions from t.
"""

from __future__ import annotations

import torch

from common import demo_parser, heldout_passages, load_model_and_sae, pyplot, sae_layer, save_figure, write_json
from writesae.experiments import write_ablation

SCALES = (0.0, 0.5, 2.0)
HORIZON = 8


def main() -> None:
    args = demo_parser(__doc__, "demo-out/ablation").parse_args()
    torch.manual_seed(args.seed)
    model, sae = load_model_and_sae(args.sae)
    layer = sae_layer(sae)
    tokens = heldout_passages(model, args.passages, args.context)
    t = tokens.shape[1] // 2
    results = {"layer": layer, "position": t, "passages": tokens.shape[0], "horizon": HORIZON,
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

    print(f"layer {layer}, write at t = {t} of {tokens.shape[1]}, {tokens.shape[0]} held-out passages")
    print("head  scale  KL next   KL mean(8)  Δloss next")
    for head, per_scale in results["heads"].items():
        for scale, r in per_scale.items():
            print(f"{head:>4}  {scale:>5}  {r['kl_next']:.5f}  {r['kl_mean_horizon']:.5f}     {r['loss_change_next']:+.4f}")
    print(f"wrote {args.out}/results.json, kl.png")


if __name__ == "__main__":
    main()
