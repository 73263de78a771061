"""The architecture comparison of the WriteSAE claim, as one command: Flat, Matrix and Bilinear SAEs on the same samples.

    python -m demos.compare_architectures      # 12 minutes at 2 CPU threads; writes demos/results/compare_architectures/

On GDN layer L of `gdn-austen`, for the state and the write (sites "state" and "write"), on two head groups
chosen from the shipped memory census, train every architecture below with 3 seeds, matched two ways, and
report held-out FVU and CE loss recovered with the SAE spliced in the loop (mean ± standard deviation over
seeds, and every seed's numbers) as a table (``readme_block``) and a plot.

- Architectures: `FlatSAE`, `MatrixSAE` (rank 1), `BilinearMatrixSAE` tied and untied, rank 1 and rank 2.
- Matching "equal L0": the same TopK k and the same number of features for all. "Equal parameters": the
  same k, and per architecture the number of features whose weights (``n_weight_parameters``, no biases)
  come closest to those of a FlatSAE with ``--budget-features`` features (within 5%, or an error).
- Heads: "long-memory" heads have a median half-life ≥ ``--long-half-life`` tokens, "memoryless" heads one
  below ``--memoryless-half-life``. The layer is the one where the smaller group is largest (then the most
  heads in both), among the layers whose reads are not silent (some head's median ‖o‖_rms / √ε ≥ 1);
  ``--layer`` overrides it.
- Samples: extracted once per site into memory (`writesae.in_memory`): ``--train-samples`` from random
  training windows of the novels and every held-out window of Persuasion 21–24 (or its first
  ``--heldout-samples``), at ``--positions`` evenly spaced positions in the second half of each
  ``--context``-token window (so every state has at least half a window of history).
- References beside the SAEs, per site and head group, fitted on the same training samples: PCA with
  k components (`writesae.baselines.PCABaseline`, k = the SAEs' L0) and the training mean alone (every
  sample reconstructed as the training mean; its held-out FVU is above 1 by how far the held-out mean
  lies from the training mean).
- Training: `writesae.train.train` on the in-memory samples; the held-out FVU is evaluated every fifth of
  training. A run has converged when each head's held-out FVU changed by less than 2% over the last fifth
  (`writesae.train.convergence`).
- CE loss recovered and KL(p_clean ‖ p_spliced): `writesae.evals.downstream_metrics` in the loop, on the
  first ``--ce-windows`` held-out windows of ``--ce-context`` tokens; an SAE splices only its own heads,
  and the zero ablation it is measured against acts on the same heads. Zero-ablating two heads of one
  layer moves CE little, so CE recovered (a ratio over that small difference) is noisy; the KL is not.

It finishes in 12 minutes at the defaults (2 CPU threads). Every finished run is appended to
``--out``/runs.jsonl.partial, so an interrupted comparison rerun with the same flags trains only the runs
it lacks (the samples are extracted again); the file is removed once results.json is written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from demos.common import provenance, pyplot, run_now, save_figure, write_json
from hooked_gdn.census import VERY_LONG_MEMORY, MemoryCensus
from hooked_gdn.pretrained import CENSUS_FILE, PRETRAINED_MODELS, austen_corpus, heldout_windows
from writesae import BilinearMatrixSAE, FlatSAE, MatrixSAE
from writesae.evals import downstream_metrics, downstream_references
from writesae.baselines import PCABaseline
from writesae.differences import differences
from writesae.evals import reconstruction_metrics
from writesae.in_memory import InMemoryActivations
from writesae.splice import HookedSAEGatedDeltaNet
from writesae.store import ActivationStore, StoreConfig
from writesae.train import CONVERGED_BELOW, TrainConfig, convergence, train

MODEL = "gdn-austen"
#: label: (class, config keywords)
ARCHITECTURES = {
    "Flat": (FlatSAE, {}),
    "Matrix": (MatrixSAE, {}),
    "Bilinear tied r1": (BilinearMatrixSAE, {"tied": True, "rank": 1}),
    "Bilinear untied r1": (BilinearMatrixSAE, {"tied": False, "rank": 1}),
    "Bilinear tied r2": (BilinearMatrixSAE, {"tied": True, "rank": 2}),
    "Bilinear untied r2": (BilinearMatrixSAE, {"tied": False, "rank": 2}),
}
WRITESAE = "Bilinear untied r1"
SITES = ("state", "write")
GROUPS = ("long-memory", "memoryless")
MATCHINGS = ("equal L0", "equal parameters")
PARAMETER_TOLERANCE = 0.05  # relative distance of a matched weight count from the budget


# ---------------------------------------------------------------------- choices


def choose_heads(census: MemoryCensus, long_half_life: float, memoryless_half_life: float, layer: int | None = None) -> dict:
    """The layer and its long-memory and memoryless heads, by the rule in the module docstring."""
    def groups(at: int) -> dict[str, list[int]]:
        heads = [h for h in census.heads if h.layer == at]
        return {"long-memory": [h.head for h in heads if h.half_life[1] >= long_half_life],
                "memoryless": [h.head for h in heads if h.half_life[1] < memoryless_half_life]}

    if layer is None:
        audible = [at for at in census.layers() if any(h.read_rms_over_sqrt_eps >= 1 for h in census.heads if h.layer == at)]
        layer = max(audible, key=lambda at: (min(map(len, groups(at).values())), sum(map(len, groups(at).values()))))
    elif layer not in census.layers():
        raise ValueError(f"layer {layer} is not in the census; its GDN layers are {census.layers()}")
    chosen = groups(layer)
    empty = [name for name, heads in chosen.items() if not heads]
    if empty:
        raise ValueError(f"layer {layer} has no {' and no '.join(empty)} heads by the rule (median half-life >= "
                         f"{long_half_life:g} / < {memoryless_half_life:g} tokens)")
    return {"layer": layer, "heads": chosen,
            "median_half_life": {str(h.head): h.half_life[1] for h in census.heads if h.layer == layer},
            "rule": f"long-memory: median half-life >= {long_half_life:g} tokens; memoryless: median half-life < "
                    f"{memoryless_half_life:g} tokens; layer: among those whose reads are not silent (some head's "
                    f"median |o|_rms / sqrt(eps) >= 1), the one whose smaller group is largest, then the most heads"}


def make_sae(architecture: str, n_features: int, k: int, d_k: int, d_v: int, heads: list[int] | int = 0,
             site: str | None = None, seed: int = 0):
    cls, options = ARCHITECTURES[architecture]
    return cls(d_k=d_k, d_v=d_v, n_features=n_features, k=k, heads=heads, site=site, seed=seed, **options)


def weights_per_head(architecture: str, n_features: int, k: int, d_k: int, d_v: int) -> int:
    return make_sae(architecture, n_features, min(k, n_features), d_k, d_v).n_weight_parameters()


def features_at_equal_parameters(budget_features: int, k: int, d_k: int, d_v: int) -> dict[str, int]:
    """Per architecture, the number of features (at least k) whose weights per head come closest to a
    FlatSAE's with ``budget_features`` features; an error when that is not within `PARAMETER_TOLERANCE`."""
    budget = weights_per_head("Flat", budget_features, k, d_k, d_v)
    chosen = {}
    for architecture in ARCHITECTURES:
        per_feature = weights_per_head(architecture, k, k, d_k, d_v) / k  # weights grow linearly with features
        n = max(k, round(budget / per_feature))
        got = weights_per_head(architecture, n, k, d_k, d_v)
        if abs(got - budget) > PARAMETER_TOLERANCE * budget:
            raise ValueError(f"{architecture}: {n} features have {got} weights per head, not within "
                             f"{PARAMETER_TOLERANCE:.0%} of the budget {budget} (a FlatSAE with {budget_features} features)")
        chosen[architecture] = n
    return chosen


def window_positions(context: int, n: int) -> list[int]:
    """``n`` evenly spaced positions in the second half of a window, ending at its last."""
    half = context // 2
    if not 1 <= n <= half:
        raise ValueError(f"positions must lie in [1, context // 2 = {half}], got {n}")
    return sorted(context - 1 - i * half // n for i in range(n))


# ---------------------------------------------------------------------- the comparison


def train_run(samples: InMemoryActivations, architecture: str, n_features: int, seed: int, sizes: dict) -> dict:
    """Train one SAE on ``samples`` (all its heads); its held-out metrics, FVU curves and convergence."""
    sae = make_sae(architecture, n_features, sizes["k"], samples.d_k, samples.d_v, samples.heads, samples.cfg.site, seed)
    steps = sizes["steps"]
    with tempfile.TemporaryDirectory() as out:
        result = train(sae, samples.select_heads(samples.heads, seed=seed), TrainConfig(
            out_dir=out, steps=steps, batch_size=sizes["batch_size"], lr=sizes["lr"], warmup_steps=steps // 10,
            auxk_k=sizes["auxk_k"], dead_after_samples=sizes["dead_after_samples"], eval_every=steps // 5,
            eval_samples=samples.n_samples("heldout"), checkpoint_every=0, input_scale_samples=samples.n_samples("train"),
            log_every=max(1, steps // 20), progress=False, seed=seed))
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    heldout = [r for r in records if r["split"] == "heldout"]
    settled = convergence(records)
    final = result.heldout_metrics
    return {
        "sae": result.sae.eval(),
        "heldout": {"fvu": final["fvu"], "fvu_per_head": final["fvu_per_head"], "l0": final["l0"],
                    "dead_fraction": final["dead_fraction"], "samples": final["samples"]},
        "curve": {"heldout_steps": [r["step"] for r in heldout], "heldout_fvu": [r["fvu"] for r in heldout],
                  "train_steps": [r["step"] for r in records if r["split"] == "train"],
                  "train_batch_fvu": [r["fvu"] for r in records if r["split"] == "train"]},
        "last_fifth_change_per_head": settled["relative_change"],
        "converged": settled["converged"],
    }


def reference_fvus(samples: InMemoryActivations, k: int) -> dict:
    """Held-out FVU of PCA-k and of the training mean, both fitted on the training samples (mean over heads and per head)."""
    pca = PCABaseline.fit(samples.train, k, seed=0)
    mean_only = PCABaseline(pca.b_dec, pca.components[..., :0], samples.d_k, samples.d_v)
    fvus = {}
    for name, method in ((f"PCA-{k}", pca), ("training mean", mean_only)):
        per_head = reconstruction_metrics(method, samples.heldout_batches(1024))["fvu"]
        fvus[name] = {"fvu": statistics.fmean(per_head), "fvu_per_head": per_head}
    return fvus


def extract(model, documents: list, heldout_documents: list, layer: int, kind: str, heads: list[int], sizes: dict) -> InMemoryActivations:
    store = ActivationStore(model, documents, StoreConfig(
        layer=layer, kind=kind, heads=heads, context=sizes["context"], positions=window_positions(sizes["context"], sizes["positions"]),
        heldout_documents=heldout_documents, seed=0))
    return InMemoryActivations.from_store(store, sizes["train_samples"], sizes["heldout_samples"], seed=0)


RUN_KEY = ("site", "group", "matching", "architecture", "seed")


def finished_runs(records: Path, header: dict) -> dict[tuple, dict]:
    """The runs an interrupted comparison with the same ``header`` recorded in ``records``, by `RUN_KEY`
    (a last line cut off by the interruption is dropped); a new file with the header when there is none."""
    if not records.exists():
        records.parent.mkdir(parents=True, exist_ok=True)
        tmp = records.with_suffix(".tmp")
        tmp.write_text(json.dumps(header) + "\n")
        tmp.replace(records)
        return {}
    lines = records.read_text().splitlines()
    differing = differences(json.loads(lines[0]) if lines else {}, json.loads(json.dumps(header)), "the records have", "this run")
    if differing:
        raise ValueError(f"{records} holds the runs of a comparison with other settings ({'; '.join(differing)}); "
                         f"delete it to start afresh, or rerun with the settings it was made with")
    runs = []
    for line in lines[1:]:
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the line being written when the run was stopped
    return {tuple(run[key] for key in RUN_KEY): run for run in runs}


def run_comparison(model, documents: list, heldout_documents: list, choice: dict, sizes: dict, seeds: list[int],
                   ce_tokens: torch.Tensor, sites=SITES, log=print, records: Path | None = None) -> dict:
    """Every (site, head group, matching, architecture, seed) run, and their summary (see the module docstring).

    ``documents``: token sequences, one per document; ``heldout_documents``: the indices of the held-out ones.
    ``records``: a JSON-lines file to which every finished run is appended; a rerun with the same settings
    takes the runs it holds instead of training them again (the samples and references are recomputed).
    """
    cfg, layer = model.cfg, choice["layer"]
    n_features = {"equal L0": {a: sizes["n_features"] for a in ARCHITECTURES},
                  "equal parameters": features_at_equal_parameters(sizes["budget_features"], sizes["k"], cfg.d_key, cfg.d_value)}
    all_heads = [h for group in GROUPS for h in choice["heads"][group]]
    header = {"layer": layer, "heads": choice["heads"], "sizes": sizes, "seeds": seeds, "sites": list(sites)}
    finished = finished_runs(records, header) if records is not None else {}
    if finished:
        log(f"resuming: {len(finished)} runs recorded in {records}")
    runs, references_fvu, clock = [], [], {"extraction_s": 0.0, "training_s": 0.0, "ce_s": 0.0}
    for site in sites:
        start = time.perf_counter()
        samples = extract(model, documents, heldout_documents, layer, site, all_heads, sizes)
        clock["extraction_s"] += time.perf_counter() - start
        for group in GROUPS:
            heads = choice["heads"][group]
            group_samples, references = samples.select_heads(heads), None
            references_fvu.append({"site": site, "group": group, "heads": heads, **reference_fvus(group_samples, sizes["k"])})
            for matching in MATCHINGS:
                for architecture, n in n_features[matching].items():
                    for seed in seeds:
                        run = finished.get((site, group, matching, architecture, seed))
                        if run is None:
                            run = train_and_score(model, group_samples, architecture, n, seed, sizes, ce_tokens, references)
                            references = run.pop("references")
                            run = {"site": site, "group": group, "heads": heads, "matching": matching,
                                   "architecture": architecture, "n_features": n, "seed": seed, **run}
                            if records is not None:
                                with records.open("a") as file:
                                    file.write(json.dumps(run) + "\n")
                                    file.flush()
                                    os.fsync(file.fileno())
                        clock["training_s"] += run["seconds"]["training"]
                        clock["ce_s"] += run["seconds"]["ce"]
                        runs.append(run)
                        log(f"{site:5} {group:11} {matching:16} {architecture:18} n={n:<4} seed {seed}: held-out FVU "
                            f"{run['heldout']['fvu']:.3f}, CE recovered {run['ce']['ce_loss_recovered']:.3f}, KL {run['ce']['kl_spliced']:.3f}"
                            f"{'' if run['converged'] else ' (not converged)'}")
    return {"layer": layer, "heads": choice, "sizes": sizes, "seeds": seeds, "n_features": n_features,
            "parameter_budget_per_head": weights_per_head("Flat", sizes["budget_features"], sizes["k"], cfg.d_key, cfg.d_value),
            "spread": "sample standard deviation over seeds", "converged_below": CONVERGED_BELOW,
            "heldout_samples": samples.n_samples("heldout"), "references": references_fvu,
            "runs": runs, "summary": summarize(runs), "elapsed": clock, "threads": torch.get_num_threads()}


def train_and_score(model, samples: InMemoryActivations, architecture: str, n_features: int, seed: int, sizes: dict,
                    ce_tokens: torch.Tensor, references: dict | None) -> dict:
    """`train_run`, then CE and KL with the SAE spliced in the loop (its ``references`` computed when None
    and returned), and the seconds each took."""
    start = time.perf_counter()
    run = train_run(samples, architecture, n_features, seed, sizes)
    trained = time.perf_counter()
    sae = run.pop("sae")
    if references is None:
        references = downstream_references(model, sae, ce_tokens, mode="loop")
    run["ce"] = downstream_metrics(model, sae, ce_tokens, mode="loop", references=references)
    return {"weights_per_head": sae.n_weight_parameters() // len(samples.heads), **run, "references": references,
            "seconds": {"training": trained - start, "ce": time.perf_counter() - trained}}


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and spread over seeds of held-out FVU, CE loss recovered and KL, per (site, group, matching, architecture)."""
    rows: dict[tuple, list[dict]] = {}
    for run in runs:
        rows.setdefault((run["site"], run["group"], run["matching"], run["architecture"]), []).append(run)
    summary = []
    for (site, group, matching, architecture), same in rows.items():
        fvu = [r["heldout"]["fvu"] for r in same]
        ce = [r["ce"]["ce_loss_recovered"] for r in same]
        kl = [r["ce"]["kl_spliced"] for r in same]
        summary.append({"site": site, "group": group, "heads": same[0]["heads"], "matching": matching,
                        "architecture": architecture, "n_features": same[0]["n_features"],
                        "weights_per_head": same[0]["weights_per_head"], "seeds": len(same),
                        "fvu_mean": statistics.fmean(fvu), "fvu_spread": statistics.stdev(fvu),
                        "ce_recovered_mean": statistics.fmean(ce), "ce_recovered_spread": statistics.stdev(ce),
                        "kl_mean": statistics.fmean(kl), "kl_spread": statistics.stdev(kl),
                        "converged": sum(r["converged"] for r in same)})
    return summary


# ---------------------------------------------------------------------- outputs


METRICS = (("fvu", "held-out FVU"), ("ce_loss_recovered", "CE loss recovered (loop)"), ("kl_spliced", "KL to clean (loop), nats"))


def _value(run: dict, metric: str) -> float:
    return run["heldout"]["fvu"] if metric == "fvu" else run["ce"][metric]


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    names = list(ARCHITECTURES)
    panels = [(site, matching) for site in SITES for matching in MATCHINGS]
    fig, axes = plt.subplots(len(METRICS), len(panels), figsize=(4.2 * len(panels), 11), sharey="row", squeeze=False)
    for column, (site, matching) in enumerate(panels):
        for row, (metric, label) in enumerate(METRICS):
            ax = axes[row, column]
            for offset, (group, color) in zip((-0.15, 0.15), zip(GROUPS, ("tab:blue", "tab:orange"))):
                for i, name in enumerate(names):
                    same = [r for r in results["runs"] if (r["site"], r["matching"], r["architecture"], r["group"]) == (site, matching, name, group)]
                    values = [_value(r, metric) for r in same]
                    ax.scatter([i + offset] * len(values), values, s=14, color=color, alpha=0.6,
                               label=f"{group} heads {same[0]['heads']}" if i == 0 and same else None)
                    if values:
                        ax.hlines(statistics.fmean(values), i + offset - 0.12, i + offset + 0.12, color=color)
                if metric == "fvu":
                    for reference in results["references"]:
                        if (reference["site"], reference["group"]) == (site, group):
                            pca = next(key for key in reference if key.startswith("PCA-"))
                            ax.axhline(reference[pca]["fvu"], color=color, ls="--", lw=0.8, label=f"{pca}, {group}")
                if metric == "kl_spliced" and same:
                    ax.axhline(same[0]["ce"]["kl_zero_ablated"], color=color, ls=":", lw=0.8, label=f"zero-ablated, {group}")
            ax.set_xticks(range(len(names)), [n.replace("Bilinear ", "Bil. ") for n in names] if row == len(METRICS) - 1 else [],
                          rotation=40, ha="right", fontsize=8)
            if row == 0:
                ax.set_title(f"{site}, {matching}", fontsize=10)
            if column == 0:
                ax.set_ylabel(label)
            if metric == "ce_loss_recovered":
                ax.axhline(0, color="grey", lw=0.5)
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].legend(fontsize=7)
    fig.suptitle(f"gdn-austen layer {results['layer']}: dots are seeds, bars their mean; dashed: PCA-k, dotted: the heads "
                 "zero-ablated", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


def readme_block(results: dict) -> str:
    """The README's paragraph and table, every number from ``results``."""
    s, choice, half = results["sizes"], results["heads"], results["heads"]["median_half_life"]
    heads = lambda group: ", ".join(f"{h} ({half[str(h)]:.3g})" for h in choice["heads"][group])
    eq = results["n_features"]["equal parameters"]
    runs = results["runs"]
    minutes = sum(results["elapsed"].values()) / 60
    lines = [
        f"`{run_now(results['provenance']['command'])}` ({minutes:.0f} min at {results['threads']} CPU threads; seeds "
        f"{', '.join(map(str, results['seeds']))}; `{results['provenance']['inputs']['out']}/results.json` has every "
        f"run's numbers and FVU curve). GDN layer {results['layer']} of `{results['provenance']['model']}`; "
        f"long-memory heads {heads('long-memory')} and memoryless heads {heads('memoryless')} (median half-lives in "
        f"tokens; {choice['rule']}). Per site, {s['train_samples']} training and {results['heldout_samples']} held-out "
        f"samples per head, at {s['positions']} positions in the second half of {s['context']}-token windows. "
        f"TopK k = {s['k']} everywhere; at equal L0 every SAE has {s['n_features']} features; at equal parameters "
        f"{results['parameter_budget_per_head']:,} weights per head (a FlatSAE with {s['budget_features']} features): "
        + ", ".join(f"{name} {n}" for name, n in eq.items()) + " features. "
        f"{s['steps']} steps of {s['batch_size']} samples, lr {s['lr']:g} (warmup, cosine decay). CE loss recovered and "
        f"KL(p_clean ‖ p_spliced): the SAE spliced in the loop on its own heads, {s['ce_windows']} held-out windows of "
        f"{s['ce_context']} tokens, against zero-ablating the same heads. Mean ± {results['spread']}. "
        f"{sum(r['converged'] for r in runs)} of {len(runs)} runs converged (held-out FVU of every head changed "
        f"< {100 * results['converged_below']:g}% over the last fifth of training).",
        "",
    ]
    best = []
    for site in SITES:
        for group in GROUPS:
            for matching in MATCHINGS:
                rows = [r for r in results["summary"] if (r["site"], r["group"], r["matching"]) == (site, group, matching)]
                if rows:
                    fvu = min(rows, key=lambda r: r["fvu_mean"])
                    kl = min(rows, key=lambda r: r["kl_mean"])
                    best.append(f"{site}, {group}, {matching}: {fvu['architecture']} ({fvu['fvu_mean']:.3f}) / "
                                f"{kl['architecture']} ({kl['kl_mean']:.3f})")
    lines += ["Lowest held-out FVU / lowest KL, by site, heads and matching: " + "; ".join(best) + ".", ""]
    mean_fvu = {(r["site"], r["group"], r["matching"], r["architecture"]): r["fvu_mean"] for r in results["summary"]}
    versus = [f"{site}, {group}, {matching}: {mean_fvu[site, group, matching, WRITESAE]:.3f} / "
              f"{mean_fvu[site, group, matching, 'Flat']:.3f}"
              for site in SITES for group in GROUPS for matching in MATCHINGS if (site, group, matching, WRITESAE) in mean_fvu]
    lines += [f"The paper's claim in one line, {WRITESAE} (the shipped WriteSAE's form) / Flat held-out FVU: "
              + "; ".join(versus) + ".", ""]
    references = []
    for r in results["references"]:
        references.append(f"{r['site']}, {r['group']} {r['heads']}: " + ", ".join(
            f"{name} {value['fvu']:.3f}" for name, value in r.items() if isinstance(value, dict)))
    kl_zero = {(r["site"], r["group"]): r["ce"]["kl_zero_ablated"] for r in runs}
    lines += ["References fitted on the same training samples (held-out FVU): " + "; ".join(references)
              + ". KL of zero-ablating the heads instead: " + "; ".join(
                  f"{site}, {group} {kl:.3f}" for (site, group), kl in kl_zero.items()) + ".", ""]
    lines += ["| site | heads | matching | architecture | features | weights / head | held-out FVU | CE recovered | KL | converged |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        lines.append(f"| {r['site']} | {r['group']} {r['heads']} | {r['matching']} | {r['architecture']} | {r['n_features']} | "
                     f"{r['weights_per_head']:,} | {r['fvu_mean']:.3f} ± {r['fvu_spread']:.3f} | "
                     f"{r['ce_recovered_mean']:.3f} ± {r['ce_recovered_spread']:.3f} | {r['kl_mean']:.3f} ± {r['kl_spread']:.3f} | "
                     f"{r['converged']}/{r['seeds']} |")
    lines += ["", f"![held-out FVU, CE recovered and KL per architecture, seeds as dots]({results['provenance']['inputs']['out']}/comparison.png)"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=None, help="a GDN layer (default: by the rule above)")
    p.add_argument("--long-half-life", type=float, default=VERY_LONG_MEMORY,
                   help="tokens (default: the census's VERY_LONG_MEMORY)")
    p.add_argument("--memoryless-half-life", type=float, default=3.0)
    p.add_argument("--k", type=int, default=4, help="TopK k (the L0) of every SAE")
    p.add_argument("--n-features", type=int, default=64, help="features of every SAE at equal L0")
    p.add_argument("--budget-features", type=int, default=8, help="the FlatSAE whose weights set the equal-parameter budget")
    p.add_argument("--steps", type=int, default=150, help="a multiple of 5")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-samples", type=int, default=2048)
    p.add_argument("--heldout-samples", type=int, default=None, help="the first ones (default: every held-out sample)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--positions", type=int, default=16, help="per window, evenly spaced in its second half")
    p.add_argument("--ce-windows", type=int, default=4)
    p.add_argument("--ce-context", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0, 1, ... (at least 2, for a spread)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    p.add_argument("--out", type=Path, default=Path("demos/results/compare_architectures"))
    args = p.parse_args(argv)
    if args.steps % 5 or args.steps < 5:
        p.error(f"--steps must be a positive multiple of 5 (held-out evaluations every fifth of training), got {args.steps}")
    if args.seeds < 2:
        p.error(f"--seeds must be at least 2 for a spread over seeds, got {args.seeds}")
    return args


def sizes_from(args: argparse.Namespace) -> dict:
    sizes = {name: getattr(args, name) for name in ("k", "n_features", "budget_features", "steps", "batch_size", "lr",
                                                   "train_samples", "heldout_samples", "context", "positions",
                                                   "ce_windows", "ce_context")}
    # AuxK on features silent for 32 batches, with up to 2k of them
    return sizes | {"auxk_k": 2 * args.k, "dead_after_samples": 32 * args.batch_size}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sizes_from(args)
    model = HookedSAEGatedDeltaNet.from_pretrained(MODEL).eval()
    choice = choose_heads(MemoryCensus.load_json(PRETRAINED_MODELS[MODEL] / CENSUS_FILE), args.long_half_life,
                          args.memoryless_half_life, args.layer)
    print(f"layer {choice['layer']}: {choice['heads']} ({choice['rule']})")
    documents, heldout_names = austen_corpus()
    ids = model.tokenizer([d.text for d in documents], add_special_tokens=False)["input_ids"]  # once, for both sites
    heldout = [i for i, d in enumerate(documents) if d.name in set(heldout_names)]
    ce_tokens = heldout_windows(model.tokenizer, args.ce_context)[: args.ce_windows]
    records = args.out / "runs.jsonl.partial"
    results = run_comparison(model, [torch.tensor(t) for t in ids], heldout, choice, sizes, list(range(args.seeds)), ce_tokens,
                             records=records)
    results = {"provenance": provenance(0, model=MODEL, **sizes, seeds=args.seeds, layer=choice["layer"], out=str(args.out)),
               **results}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    records.unlink()  # every run is in results.json; a rerun starts afresh
    plot(results, args.out / "comparison.png")
    print(readme_block(results))


if __name__ == "__main__":
    main()
