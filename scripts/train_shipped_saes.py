"""Train, evaluate and ship the SAEs of `gdn-austen`: ``gdn-austen/L5-state`` and ``gdn-austen/L5-write``.

    python -m scripts.train_shipped_saes --kind state     # writes writesae/pretrained/gdn-austen/L5-state
    python -m scripts.train_shipped_saes --kind write     # writes writesae/pretrained/gdn-austen/L5-write

Training checkpoints go to ``runs/shipped-saes/L5-<kind>/``; after a kill, rerunning the same command
extracts the same samples again (a few minutes) and resumes each SAE from its last checkpoint.

1. Extract the site's samples once, into memory (`writesae.in_memory`): all heads of GDN layer 5
   (the card's default layer), in windows of 512 tokens (the model's training context) at 32
   random positions per window: a seeded draw of training windows from the novels, and every
   window of Persuasion 21–24 as the held-out split.
2. Train the WriteSAE (`BilinearMatrixSAE`, untied, rank 1, TopK k) on them.
3. Baselines at the same L0 = k: PCA with k components per head (fitted on training samples,
   ``torch.pca_lowrank``), and a `FlatSAE` with TopK k trained with the same settings.
4. Evaluate on the held-out samples: FVU, L0, dead and dense fractions per head (all three), and,
   for the two SAEs, CE loss recovered and KL with the SAE spliced into the model on held-out
   windows, in the loop and at single positions (`writesae.evals.downstream_metrics`).
5. Convergence (`writesae.train.convergence`): the held-out FVU of each head changes by less than
   2% over the last fifth of training. Then the SAE, ``eval.json`` and its card (``README.md``,
   ``training_curve.png``) are written into the package (``writesae/pretrained/gdn-austen/L5-<kind>/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from hooked_gdn.census import MemoryCensus
from hooked_gdn.pretrained import CENSUS_FILE, PRETRAINED_MODELS, austen_corpus, heldout_windows
from writesae.baselines import PCABaseline
from writesae.evals import downstream_metrics, reconstruction_metrics
from writesae.in_memory import InMemoryActivations
from writesae.io import PRETRAINED_SAES_DIR, load_sae, save_sae
from writesae.sae import BilinearMatrixSAE, FlatSAE
from writesae.splice import HookedSAEGatedDeltaNet
from writesae.store import ActivationStore, StoreConfig
from writesae.train import CONVERGED_BELOW, TrainConfig, convergence, train

MODEL = "gdn-austen"
ILL_CONDITIONED = 0.01  # nats: a zero ablation that moves CE less than this leaves CE recovered meaningless


def extract(model, kind: str, layer: int, n_train: int, context: int, positions: int, seed: int) -> InMemoryActivations:
    """``n_train`` training samples (random windows of the novels) and every held-out window's samples."""
    documents, heldout = austen_corpus()
    store = ActivationStore(model, documents, StoreConfig(layer=layer, kind=kind, heads="all", context=context,
                                                          positions=positions, heldout_documents=heldout, seed=seed))
    return InMemoryActivations.from_store(store, n_train, store.n_contexts("heldout") * positions, seed)


def train_sae(sae, samples: InMemoryActivations, out: Path, args) -> tuple:
    train(sae, samples, TrainConfig(
        out_dir=str(out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.steps // 20,
        eval_every=args.steps // 10, eval_samples=args.eval_samples, checkpoint_every=args.steps // 10,
        seed=args.seed, progress=False, log_every=50))
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the SAE as train saved it (input scale folded into its weights), so that what ships is what was evaluated
    return load_sae(out / "sae").eval(), [r for r in curve if r.get("split") == "heldout"]


def downstream(model, sae, windows: torch.Tensor, loop_windows: int, seed: int) -> dict:
    return {"loop": downstream_metrics(model, sae, windows[:loop_windows], mode="loop"),
            "single": downstream_metrics(model, sae, windows, mode="single", seed=seed)}


def write_card(folder: Path, results: dict) -> None:
    s, heads = results["settings"], results["heads"]
    ours, pca, flat = (results["reconstruction"][name] for name in ("writesae", "pca", "flat"))
    lines = [
        f"# {results['name']}",
        "",
        f"A WriteSAE (`BilinearMatrixSAE`: untied, rank-1 atoms v wᵀ, TopK k = {s['k']}, {s['n_features']} features per "
        f"head) on the {results['kind']} of all {len(heads)} heads of GDN layer {results['layer']} of `{MODEL}`. "
        f"Load it with `writesae.load_sae(\"{results['name']}\")`. Reproduce it with `{results['command']}` "
        f"(seed {s['seed']}; {s['steps']} steps × {s['batch_size']} samples; eval figures in `eval.json`).",
        "",
        f"Data: {results['data']}.",
        "",
        "## Held-out reconstruction, against baselines at the same L0",
        "",
        f"PCA-k: the top k = {s['k']} principal components of each head's training samples; FlatSAE: TopK k = "
        f"{s['k']}, {s['n_features']} features, trained with the same settings. FVU = Σ‖X − X̂‖² / Σ‖X − X̄‖² on "
        f"{ours['samples']} held-out samples.",
        "",
        "| head | median half-life (tokens) | WriteSAE FVU | PCA-k FVU | FlatSAE FVU | WriteSAE / PCA-k | L0 | dead | dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, head in enumerate(heads):
        lines.append(f"| {head} | {results['half_lives'][i]:.3g} | {ours['fvu'][i]:.3f} | {pca['fvu'][i]:.3f} | "
                     f"{flat['fvu'][i]:.3f} | {ours['fvu'][i] / pca['fvu'][i]:.2f} | {ours['l0'][i]:.1f} | "
                     f"{ours['dead_fraction'][i]:.3f} | {ours['dense_fraction'][i]:.3f} |")
    c = results["convergence"]
    lines += [
        "",
        f"FlatSAE dead fractions: {', '.join(f'{v:.3f}' for v in flat['dead_fraction'])}.",
        "",
        f"Convergence: held-out FVU changed by {', '.join(f'{100 * v:.1f}%' for v in c['relative_change'])} per head over "
        f"the last fifth of training ({'converged' if c['converged'] else 'NOT converged'} by the < "
        f"{100 * CONVERGED_BELOW:g}% rule); the curve is `training_curve.png`.",
        "",
        "## Spliced into the model (held-out windows)",
        "",
        f"Next-token CE (nats) and KL(p_clean ‖ p_spliced) with the SAE in place of the {results['kind']} on its heads. "
        f"In the loop: at every position of {s['loop_windows']} windows of {s['window']} tokens, each position reading "
        f"the state the earlier splices made. Single: at one random position per window ({s['single_windows']} "
        "windows), scored from there on. CE recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean) against "
        "zero-ablating the same site.",
        "",
        "| SAE | mode | CE clean | CE spliced | CE zero-ablated | CE recovered | KL spliced | KL zero-ablated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shown = lambda value, digits: f"{value:.{digits}f}" if math.isfinite(value) else "diverged"
    for name in ("writesae", "flat"):
        for mode, d in results["downstream"][name].items():
            lines.append(f"| {'WriteSAE' if name == 'writesae' else 'FlatSAE'} | {mode} | {d['ce_clean']:.4f} | "
                         f"{shown(d['ce_spliced'], 4)} | {d['ce_zero_ablated']:.4f} | {shown(d['ce_loss_recovered'], 3)} | "
                         f"{shown(d['kl_spliced'], 4)} | {d['kl_zero_ablated']:.4f} |")
    if not math.isfinite(results["downstream"]["writesae"]["loop"]["ce_spliced"]):
        lines += ["", "In the loop the spliced state diverges (overflow to inf, then NaN): each position's state is the "
                  "SAE's reconstruction of the delta rule's update of the last spliced state, and where α ≈ 1 (the "
                  "long-memory heads) any direction the SAE amplifies grows geometrically; "
                  "`scripts/loop_divergence.py` records the state norms."]
    flat_modes = [f"{mode} ({d['ce_zero_ablated'] - d['ce_clean']:+.4f} nats)" for mode, d in results["downstream"]["writesae"].items()
                  if abs(d["ce_zero_ablated"] - d["ce_clean"]) < ILL_CONDITIONED]
    if flat_modes:
        lines += ["", f"Zero-ablation barely moves CE in {', '.join(flat_modes)}: CE recovered divides by that "
                  "difference and is noise there; compare the KLs instead."]
    lines += ["", "![held-out FVU during training](training_curve.png)", ""]
    (folder / "README.md").write_text("\n".join(lines))


def plot_curves(curves: dict[str, list[dict]], heads: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        for i, head in enumerate(heads):
            ax.plot([r["step"] for r in curve], [r["fvu_per_head"][i] for r in curve], marker="o", markersize=3,
                    linestyle="-" if name == "WriteSAE" else ":", label=f"{name} head {head}")
    ax.set(xlabel="step", ylabel="held-out FVU", yscale="log")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def add_sample_and_training_arguments(p: argparse.ArgumentParser) -> None:
    """The flags, with the shipped SAEs' values as defaults, that fix their samples (`extract`) and their
    training (`train_sae`, all but ``--steps``): scripts/sae_limits.py takes the same ones."""
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--n-features", type=int, default=256)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--positions", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=4096)
    p.add_argument("--train-samples", type=int, default=24576)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("state", "write"), required=True)
    add_sample_and_training_arguments(p)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--loop-windows", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("runs/shipped-saes"))
    p.add_argument("--ship-to", type=Path, default=PRETRAINED_SAES_DIR, help="the folder of shipped SAEs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    name = f"{MODEL}/L{args.layer}-{args.kind}"
    work = args.work / f"L{args.layer}-{args.kind}"
    start = time.time()

    model = HookedSAEGatedDeltaNet.from_pretrained(MODEL).eval()
    samples = extract(model, args.kind, args.layer, args.train_samples, args.context, args.positions, args.seed)
    print(f"{samples.n_samples('train')} training, {samples.n_samples('heldout')} held-out samples "
          f"({time.time() - start:.0f}s)", flush=True)
    common = dict(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=args.n_features, k=args.k, sparsity="topk",
                  site=samples.cfg.site, heads="all", n_heads=model.cfg.n_value_heads, model_name=MODEL, seed=args.seed)
    writesae, writesae_curve = train_sae(BilinearMatrixSAE(**common), samples, work / "writesae", args)
    print(f"WriteSAE trained ({time.time() - start:.0f}s)", flush=True)
    flat, flat_curve = train_sae(FlatSAE(**common), samples, work / "flat", args)
    print(f"FlatSAE trained ({time.time() - start:.0f}s)", flush=True)

    pca = PCABaseline.fit(samples.train, args.k, args.seed)
    reconstruction = {name: reconstruction_metrics(method, samples.heldout_batches(1024))
                      for name, method in (("writesae", writesae), ("flat", flat), ("pca", pca))}
    windows = heldout_windows(model.tokenizer, args.context)
    down = {"writesae": downstream(model, writesae, windows, args.loop_windows, args.seed),
            "flat": downstream(model, flat, windows, args.loop_windows, args.seed)}
    print(f"evaluated ({time.time() - start:.0f}s)", flush=True)

    census = MemoryCensus.load_json(PRETRAINED_MODELS[MODEL] / CENSUS_FILE)
    half_life = {(r.layer, r.head): r.half_life[1] for r in census.heads}
    heads = writesae.cfg.head_indices
    results = {
        "name": name, "kind": args.kind, "layer": args.layer, "heads": heads,
        "command": shlex.join(["python", "-m", "scripts.train_shipped_saes", *sys.argv[1:]]),
        "settings": {"n_features": args.n_features, "k": args.k, "steps": args.steps, "batch_size": args.batch_size,
                     "lr": args.lr, "seed": args.seed, "window": args.context, "positions_per_window": args.positions,
                     "train_samples": args.train_samples, "loop_windows": args.loop_windows,
                     "single_windows": len(windows)},
        "data": (f"{samples.n_samples('train')} training samples (random windows of {args.context} tokens from the "
                 f"novels, {args.positions} random positions each), {samples.n_samples('heldout')} held-out samples "
                 f"(every window of Persuasion chapters 21–24, unseen by the model)"),
        "half_lives": [half_life[args.layer, h] for h in heads],
        "convergence": convergence(writesae_curve),
        "flat_convergence": convergence(flat_curve),
        "reconstruction": reconstruction,
        "downstream": down,
        "curves": {"writesae": writesae_curve, "flat": flat_curve},
        "seconds": round(time.time() - start),
    }
    folder = args.ship_to / name
    staged = folder.with_name(f".{folder.name}.staged")  # built whole, then moved into place
    shutil.rmtree(staged, ignore_errors=True)
    save_sae(writesae, staged)
    (staged / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_curves({"WriteSAE": writesae_curve, "FlatSAE": flat_curve}, heads, staged / "training_curve.png")
    write_card(staged, results)
    for file in staged.iterdir():
        os.chmod(file, 0o644)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staged, folder)
    assert load_sae(folder).cfg == writesae.cfg
    print((folder / "README.md").read_text())


if __name__ == "__main__":
    main()
