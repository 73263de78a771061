"""What limits the shipped state WriteSAE on long-memory heads: held-out FVU against dictionary size,
sparsity k and training steps, with PCA-k beside each.

    python -m scripts.sae_limits     # writes results/shipped-saes/L5-state-limits.{json,png}

Same samples and training settings as ``scripts/train_shipped_saes.py --kind state`` (layer 5,
windows of 512 tokens, 32 positions each, seed 0), restricted to the long-memory heads (median
half-life ≥ 64 tokens in the model card's census). Each variant is a `BilinearMatrixSAE` (untied,
rank 1, TopK k) trained ``--steps`` steps; its held-out FVU curve is recorded. A sparse sum of k
rank-1 atoms has rank ≤ k, so the per-sample best rank-k approximation (truncated SVD of X − μ,
μ the training mean) is reported too: no rank-1 dictionary with L0 = k does better than that.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from hooked_gdn.census import VERY_LONG_MEMORY, MemoryCensus
from hooked_gdn.pretrained import CENSUS_FILE, PRETRAINED_MODELS
from scripts.train_shipped_saes import MODEL, add_sample_and_training_arguments, extract, train_sae
from writesae.baselines import PCABaseline
from writesae.evals import reconstruction_metrics
from hooked_gdn.files import atomic_file
from writesae.sae import BilinearMatrixSAE
from writesae.splice import HookedSAEGatedDeltaNet


@torch.no_grad()
def best_rank_k_fvu(train: torch.Tensor, heldout: torch.Tensor, k: int) -> list[float]:
    """Per head: Σ over held-out samples of the squared singular values of X − μ beyond the k-th,
    over Σ‖X − X̄‖² (X̄ the held-out mean, as FVU's denominator)."""
    mean = train.double().mean(0)
    sigma = torch.linalg.svdvals(heldout.double() - mean)  # [n, heads, min(d_k, d_v)]
    variance = (heldout.double() - heldout.double().mean(0)).pow(2).sum((0, 2, 3))
    return (sigma[..., k:].pow(2).sum((0, 2)) / variance).tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_and_training_arguments(p)
    p.add_argument("--dictionary-sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--other-k", type=int, nargs="+", default=[4, 64], help="k values tried at --n-features")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--work", type=Path, default=Path("runs/shipped-saes/L5-state-limits"))
    p.add_argument("--out", type=Path, default=Path("results/shipped-saes"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    census = MemoryCensus.load_json(PRETRAINED_MODELS[MODEL] / CENSUS_FILE)
    heads = [r.head for r in census.heads if r.layer == args.layer and r.half_life[1] >= VERY_LONG_MEMORY]
    model = HookedSAEGatedDeltaNet.from_pretrained(MODEL).eval()
    samples = extract(model, "state", args.layer, args.train_samples, args.context, args.positions, args.seed)
    samples = samples.select_heads(heads)
    print(f"heads {heads}: {samples.n_samples('train')} training samples ({time.time() - start:.0f}s)", flush=True)

    variants = [(n, args.k) for n in args.dictionary_sizes] + [(args.n_features, k) for k in args.other_k]
    runs = []
    for n_features, k in variants:
        sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=n_features, k=k, sparsity="topk",
                                site=samples.cfg.site, heads=heads, n_heads=model.cfg.n_value_heads, model_name=MODEL,
                                seed=args.seed)
        sae, curve = train_sae(sae, samples, args.work / f"n{n_features}-k{k}", args)
        runs.append({"n_features": n_features, "k": k, "parameters": sae.n_weight_parameters(),
                     "heldout_fvu": reconstruction_metrics(sae, samples.heldout_batches(1024))["fvu"],
                     "curve": [{"step": r["step"], "fvu_per_head": r["fvu_per_head"]} for r in curve]})
        print(f"n={n_features} k={k}: held-out FVU {runs[-1]['heldout_fvu']} ({time.time() - start:.0f}s)", flush=True)
    ks = sorted({k for _, k in variants})
    pca = {k: reconstruction_metrics(PCABaseline.fit(samples.train, k, args.seed), samples.heldout_batches(1024))["fvu"]
           for k in ks}
    best = {k: best_rank_k_fvu(samples.train, samples.heldout, k) for k in ks}
    results = {
        "provenance": {"command": shlex.join(["python", "-m", "scripts.sae_limits", *sys.argv[1:]]), "seed": args.seed,
                       "model": MODEL, "inputs": {"layer": args.layer, "heads": heads, "window": args.context,
                                                  "positions_per_window": args.positions,
                                                  "train_samples": samples.n_samples("train"),
                                                  "heldout_samples": samples.n_samples("heldout"),
                                                  "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}},
        "heads": heads, "half_lives": [next(r.half_life[1] for r in census.heads if (r.layer, r.head) == (args.layer, h))
                                       for h in heads],
        "runs": runs, "pca_fvu": {str(k): v for k, v in pca.items()},
        "best_rank_k_fvu": {str(k): v for k, v in best.items()}, "seconds": round(time.time() - start),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out / "L5-state-limits.json", "w") as f:
        f.write(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "L5-state-limits.png")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_size, by_step) = plt.subplots(1, 2, figsize=(11, 4))
    for i, head in enumerate(results["heads"]):
        for k in sorted({r["k"] for r in results["runs"]}):
            runs = sorted((r for r in results["runs"] if r["k"] == k), key=lambda r: r["n_features"])
            if len(runs) > 1:
                by_size.plot([r["n_features"] for r in runs], [r["heldout_fvu"][i] for r in runs], marker="o",
                             label=f"WriteSAE head {head}, k={k}")
                by_size.axhline(results["pca_fvu"][str(k)][i], linestyle=":", color=by_size.lines[-1].get_color(),
                                label=f"PCA-{k} head {head}")
        for r in results["runs"]:
            by_step.plot([c["step"] for c in r["curve"]], [c["fvu_per_head"][i] for c in r["curve"]],
                         label=f"head {head}, n={r['n_features']}, k={r['k']}")
    by_size.set(xscale="log", xlabel="features per head", ylabel="held-out FVU", title="FVU against dictionary size")
    by_step.set(xlabel="step", ylabel="held-out FVU", yscale="log", title="FVU against training steps")
    by_size.legend(fontsize=7)
    by_step.legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
