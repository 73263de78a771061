"""The main job, ``writesae quickstart``: a WriteSAE on the shipped model's states, trained and inspected.

Loads ``gdn-austen``, streams the states of all heads of one GDN layer from the training novels,
trains a `BilinearMatrixSAE`, and reports on held-out text (Persuasion, chapters 21–24, which the
model never saw either): a per-head table of FVU, L0 and dead fraction, the CE loss recovered with
the SAE spliced in the loop, and the top-activating contexts of a few features. Writes the SAE,
plots (atom heatmaps, activation histograms, the training curve) and ``summary.json`` to ``--out``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hooked_gdn.pretrained import austen_corpus, default_layer
from hooked_gdn.sites import site_name

from .evals import downstream_metrics, reconstruction_metrics
from .outputs import claim_outputs
from .sae import BilinearMatrixSAE
from .splice import HookedSAEGatedDeltaNet
from .store import ActivationStore, StoreConfig
from .train import TrainConfig, train


OUTPUTS = ("sae", "training", "atoms.png", "activations.png", "training_curve.png", "summary.json")


def top_activating_contexts(sae, store, model, features: list[tuple[int, int]], batch_size: int, max_samples: int,
                            n_top: int = 3, window: int = 12) -> dict[str, list[str]]:
    """For each (model head, feature): the held-out positions where it fires most, as text with the token in [[ ]]."""
    best: dict[tuple[int, int], list[tuple[float, int, int]]] = {f: [] for f in features}
    with torch.no_grad():
        for x, origin in store.heldout_batches(batch_size, max_samples, with_origin=True):
            codes = sae.encode(x)
            for head, feature in features:
                values = codes[:, sae.cfg.dictionary(head), feature]
                for i in values.topk(min(n_top, len(values))).indices.tolist():
                    if values[i] > 0:
                        best[(head, feature)].append((values[i].item(), *origin[i].tolist()))
    shown = {}
    for (head, feature), hits in best.items():
        lines = []
        for value, context, position in sorted(hits, reverse=True)[:n_top]:
            tokens = model.to_str_tokens(store.context_tokens(context, "heldout"))
            left = "".join(tokens[max(0, position - window) : position])
            lines.append(f"{value:7.3f}  …{left}[[{tokens[position]}]]".replace("\n", "⏎"))
        shown[f"head {head}, feature {feature}"] = lines
    return shown


def save_plots(sae, codes_sample: torch.Tensor, metrics_file: Path, out: Path) -> list[str]:
    """Atom heatmaps, activation histograms and the training curve, as PNG files in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    head = sae.cfg.head_indices[0]
    atoms = sae.atoms().detach()[0, :8]  # the first dictionary's first 8 atoms [8, d_k, d_v]
    fig, axes = plt.subplots(2, 4, figsize=(12, 6))
    for ax, i in zip(axes.flat, range(len(atoms))):
        limit = atoms[i].abs().max().item()
        ax.imshow(atoms[i].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"head {head}, atom {i}: v wᵀ")
        ax.axis("off")
    fig.tight_layout()
    written.append(_save(fig, out / "atoms.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    active = codes_sample[codes_sample > 0]
    ax.hist(active.log10().numpy(), bins=50)
    ax.set_xlabel("log10 activation (active codes, held-out)")
    ax.set_ylabel("count")
    written.append(_save(fig, out / "activations.png"))

    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, key in (("train", "fvu"), ("heldout", "fvu")):
        points = [(r["step"], r[key]) for r in records if r.get("split", "train") == split and key in r]
        if points:
            ax.plot(*zip(*points), label=f"{split} FVU", marker="o" if split == "heldout" else None)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    written.append(_save(fig, out / "training_curve.png"))
    plt.close("all")
    return written


def _save(fig, path: Path) -> str:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path.name


def run_quickstart(out: Path, layer: int | None = None, heads="all", n_features: int = 256, k: int = 8,
                   steps: int = 400, batch_size: int = 128, lr: float = 2e-3, context: int = 128,
                   positions: int = 16, eval_contexts: int = 8, seed: int = 0, progress: bool = True) -> dict:
    claim_outputs(out, OUTPUTS)  # before any work: a file of the same name that is not ours stops the run
    model = HookedSAEGatedDeltaNet.from_pretrained("gdn-austen").eval()
    gdn_layers = model.cfg.gdn_layers
    layer = default_layer("gdn-austen") if layer is None else layer  # the most long-memory heads, by the card's census
    if layer not in gdn_layers:
        raise ValueError(f"layer {layer} is not a GDN layer; the GDN layers are {gdn_layers}")
    documents, heldout = austen_corpus()
    store = ActivationStore(model, documents, StoreConfig(layer=layer, heads=heads, context=context, positions=positions, seed=seed,
                                                      heldout_documents=heldout))
    site = site_name(layer, "state")
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=n_features, k=k, sparsity="topk",
                            site=site, heads=heads, n_heads=model.cfg.n_value_heads, model_name="gdn-austen", seed=seed)
    sae = train(sae, store, TrainConfig(steps=steps, batch_size=batch_size, lr=lr, out_dir=str(out / "training"), warmup_steps=steps // 20,
                                        eval_every=max(1, steps // 4), checkpoint_every=max(1, steps // 4), progress=progress,
                                        seed=seed)).sae.eval()

    recon = reconstruction_metrics(sae, (x for x in store.heldout_batches(batch_size, 4096)))
    tokens = torch.stack([store.context_tokens(i, "heldout") for i in range(eval_contexts)])
    downstream = downstream_metrics(model, sae, tokens, mode="loop")
    codes = torch.cat([sae.encode(x) for x in store.heldout_batches(batch_size, 2048)]).detach()
    frequency = (codes > 0).float().mean(0)  # [n_dicts, n]
    features = [(sae.cfg.head_indices[d], int(f)) for d in range(min(2, sae.n_dicts)) for f in frequency[d].topk(2).indices]
    contexts = top_activating_contexts(sae, store, model, features, batch_size, 4096)
    sae.save(out / "sae")
    plots = save_plots(sae, codes, out / "training" / "metrics.jsonl", out)
    summary = {"model": "gdn-austen", "site": site, "heads": sae.cfg.head_indices, "n_features": n_features, "k": k,
               "steps": steps, "reconstruction": recon, "downstream_in_the_loop": downstream,
               "top_contexts": contexts, "plots": plots, "sae": "sae/"}
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary


def format_report(summary: dict) -> str:
    r, d = summary["reconstruction"], summary["downstream_in_the_loop"]
    lines = [f"{summary['model']} · {summary['site']} · BilinearMatrixSAE n={summary['n_features']} k={summary['k']}",
             "", "head   FVU    L0     dead", "----   -----  -----  -----"]
    for h, head in enumerate(summary["heads"]):
        lines.append(f"{head:>4}   {r['fvu'][h]:.3f}  {r['l0'][h]:5.1f}  {r['dead_fraction'][h]:.3f}")
    lines += ["", f"spliced in the loop on held-out text: CE {d['ce_spliced']:.3f} (clean {d['ce_clean']:.3f}, "
              f"zero-ablated {d['ce_zero_ablated']:.3f}), CE loss recovered {d['ce_loss_recovered']:.3f}, "
              f"KL {d['kl_spliced']:.4f}", "", "top-activating held-out contexts:"]
    for feature, shown in summary["top_contexts"].items():
        lines.append(f"  {feature}")
        lines += [f"    {line}" for line in shown]
    return "\n".join(lines)
