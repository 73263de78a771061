"""The main job, ``writesae quickstart``: a WriteSAE on the shipped model's states, trained and inspected.

Loads ``gdn-austen`` (or another shipped model, ``mamba2-austen`` or ``rwkv7-austen``), streams the states of
all heads of one GDN layer (the matrix-memory layer of any family) from the training novels, trains a `BilinearMatrixSAE`, and reports on held-out text
(Persuasion, chapters 21–24, which the model never saw either): a per-head table of FVU, L0 and dead fraction, the CE loss recovered with
the SAE spliced in the loop, and the top-activating contexts of a few features. Writes the SAE,
plots (atom heatmaps, activation histograms, the training curve) and ``summary.json`` to ``--out``.

Sized to finish in a few minutes on two CPU cores (the README has the measured time). Almost all of
it is the model's forward passes, so: the held-out samples are extracted once and kept for every
evaluation (`ActivationStore.keep_heldout`); each 128-token context gives 32 training states (so
the model runs once per 32 samples); and the shuffle buffer is small, so that it is refilled a few
contexts at a time and the progress bar moves steadily instead of stalling for every 4096 samples.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from hooked_gdn.files import atomic_file, file_sha256
from hooked_gdn.pretrained import CENSUS_FILE, PRETRAINED_MODELS, austen_corpus, default_layer, pretrained_path
from hooked_gdn.sites import site_name

from .evals import downstream_metrics, metrics_table, reconstruction_metrics
from .outputs import claim_outputs
from .sae import BilinearMatrixSAE
from .splice import load_model
from .store import ActivationStore, StoreConfig
from .train import TrainConfig, train


@dataclass
class QuickstartConfig:
    """The main job's settings; ``writesae quickstart``'s flags and their defaults are these fields.

    ``model``: a shipped model (`hooked_gdn.pretrained.PRETRAINED_MODELS`: gdn-austen, mamba2-austen, rwkv7-austen), whose
    census picks the default layer and whose held-out chapters are held out here too.
    ``layer`` None: that census's long-memory layer (`hooked_gdn.pretrained.default_layer`).
    ``positions``: training states per context (random, distinct). ``buffer_size``: the store's
    shuffle buffer, in samples. ``input_scale_samples``: training states the SAE's input scale is
    estimated from. ``heldout_samples``: held-out states, extracted once, for every
    evaluation. ``eval_contexts``: held-out contexts for the CE with the SAE in the loop.
    """

    model: str = "gdn-austen"
    layer: int | None = None
    heads: int | list[int] | str = "all"
    n_features: int = 256
    k: int = 8
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    context: int = 128
    positions: int = 32
    buffer_size: int = 1024
    input_scale_samples: int = 1024
    heldout_samples: int = 2048
    eval_contexts: int = 8
    seed: int = 0


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
    """Atom heatmaps, activation histograms and the training curve, as PNG files in ``out``. Drawn on
    `matplotlib.figure.Figure`s, so the caller's matplotlib backend is left alone."""
    written = []
    head = sae.cfg.head_indices[0]
    atoms = sae.atoms().detach()[0, :8]  # the first dictionary's first 8 atoms [8, d_k, d_v]
    fig = Figure(figsize=(12, 6))
    axes = fig.subplots(2, 4)
    for ax, i in zip(axes.flat, range(len(atoms))):
        limit = atoms[i].abs().max().item()
        ax.imshow(atoms[i].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"head {head}, atom {i}: v wᵀ")
        ax.axis("off")
    fig.tight_layout()
    written.append(_save(fig, out / "atoms.png"))

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    active = codes_sample[codes_sample > 0]
    ax.hist(active.log10().numpy(), bins=50)
    ax.set_xlabel("log10 activation (active codes, held-out)")
    ax.set_ylabel("count")
    written.append(_save(fig, out / "activations.png"))

    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for split, key in (("train", "fvu"), ("heldout", "fvu")):
        points = [(r["step"], r[key]) for r in records if r.get("split", "train") == split and key in r]
        if points:
            ax.plot(*zip(*points), label=f"{split} FVU", marker="o" if split == "heldout" else None)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    written.append(_save(fig, out / "training_curve.png"))
    return written


def _save(fig, path: Path) -> str:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path.name


def run_quickstart(out: Path, cfg: QuickstartConfig | None = None, progress: bool = True, **settings) -> dict:
    """Run the main job into ``out`` (see the module docstring), with ``cfg`` or its fields as keywords;
    with ``progress``, say on stderr what it is doing from the first second, and how long training takes."""
    if cfg is None:
        cfg = QuickstartConfig(**settings)
    elif settings:
        raise TypeError(f"pass either a QuickstartConfig or its keywords, not both (got {sorted(settings)})")
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    claim_outputs(out, OUTPUTS)  # before any work: a file of the same name that is not ours stops the run
    started = time.perf_counter()
    if cfg.model not in PRETRAINED_MODELS:
        raise ValueError(f"the quickstart runs on a shipped model ({', '.join(PRETRAINED_MODELS)}), not {cfg.model!r}: "
                         f"train on another with writesae train --model")
    if cfg.layer is None and not (PRETRAINED_MODELS[cfg.model] / CENSUS_FILE).exists():
        raise ValueError(f"{cfg.model} ships no {CENSUS_FILE} yet, whose census picks the default layer: give --layer")
    say(f"quickstart: loading {cfg.model} and tokenising the six novels")
    model = load_model(cfg.model)
    layer = default_layer(cfg.model) if cfg.layer is None else cfg.layer  # the most long-memory heads, by the card's census
    documents, heldout = austen_corpus()
    store = ActivationStore(model, documents, StoreConfig(
        layer=layer, heads=cfg.heads, context=cfg.context, positions=cfg.positions, buffer_size=cfg.buffer_size,
        seed=cfg.seed, heldout_documents=heldout))

    clock = time.perf_counter()
    kept = store.keep_heldout(cfg.heldout_samples)
    seconds_per_context = (time.perf_counter() - clock) / math.ceil(kept / cfg.positions)
    training_contexts = math.ceil(cfg.steps * cfg.batch_size / cfg.positions)
    say(f"quickstart: {kept} held-out states of layer {layer} extracted once, for every evaluation "
        f"({time.perf_counter() - clock:.0f} s)\n"
        f"quickstart: training a BilinearMatrixSAE ({cfg.n_features} features per head, k = {cfg.k}) for {cfg.steps} steps "
        f"of {cfg.batch_size} states, streamed from {training_contexts} contexts of {cfg.context} tokens; at the pace just "
        f"measured the model's share takes about {_minutes(training_contexts * seconds_per_context)}, and the bar shows the whole")
    site = site_name(layer, "state")
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=cfg.n_features, k=cfg.k, sparsity="topk",
                            site=site, heads=cfg.heads, n_heads=model.cfg.n_value_heads, model_name=cfg.model, seed=cfg.seed)
    sae = train(sae, store, TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, out_dir=str(out / "training"), warmup_steps=cfg.steps // 20,
        eval_every=max(1, cfg.steps // 4), eval_samples=cfg.heldout_samples, input_scale_samples=cfg.input_scale_samples,
        checkpoint_every=max(1, cfg.steps // 4), progress=progress, seed=cfg.seed)).sae.eval()

    say(f"quickstart: held-out metrics, and the CE with the SAE in the loop on {cfg.eval_contexts} held-out contexts")
    recon = reconstruction_metrics(sae, store.heldout_batches(cfg.batch_size, cfg.heldout_samples))
    tokens = torch.stack([store.context_tokens(i, "heldout") for i in range(cfg.eval_contexts)])
    downstream = downstream_metrics(model, sae, tokens, mode="loop")
    codes = torch.cat([sae.encode(x) for x in store.heldout_batches(cfg.batch_size, cfg.heldout_samples)]).detach()
    frequency = (codes > 0).float().mean(0)  # [n_dicts, n]
    features = [(sae.cfg.head_indices[d], int(f)) for d in range(min(2, sae.n_dicts)) for f in frequency[d].topk(2).indices]
    contexts = top_activating_contexts(sae, store, model, features, cfg.batch_size, cfg.heldout_samples)
    sae.save(out / "sae")
    plots = save_plots(sae, codes, out / "training" / "metrics.jsonl", out)
    summary = {"model": cfg.model, "site": site, "heads": sae.cfg.head_indices, "config": asdict(cfg) | {"layer": layer},
               "n_features": cfg.n_features, "k": cfg.k, "steps": cfg.steps, "reconstruction": recon,
               "downstream_in_the_loop": downstream, "top_contexts": contexts, "plots": plots, "sae": "sae/",
               "provenance": {"model_sha256": file_sha256(pretrained_path(cfg.model) / "model.safetensors"),
                              "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                              "seconds": round(time.perf_counter() - started, 1)}}
    with atomic_file(out / "summary.json") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def format_report(summary: dict) -> str:
    """What the quickstart prints: the per-head and downstream tables of `writesae.evals.metrics_table`, then
    the top-activating held-out contexts of a few features."""
    lines = [f"{summary['model']} · {summary['site']} · BilinearMatrixSAE n={summary['n_features']} k={summary['k']}", "",
             metrics_table(summary["reconstruction"], summary["downstream_in_the_loop"], summary["heads"], "loop"),
             "", "top-activating held-out contexts:"]
    for feature, shown in summary["top_contexts"].items():
        lines.append(f"  {feature}")
        lines += [f"    {line}" for line in shown]
    return "\n".join(lines)
