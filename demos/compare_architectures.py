"""The architecture comparison of the WriteSAE claim, matched for real: Flat, Matrix and Bilinear SAEs on the same samples.

    python -m demos.compare_architectures      # about 50 minutes at 2 CPU threads; writes demos/results/compare_architectures/

On GDN layer L of `gdn-austen`, for the state and the write (sites "state" and "write"), on two head groups
chosen from the shipped memory census, every architecture below is trained and scored on a test split that
nothing was chosen on, with intervals from a bootstrap over the test windows.

- Architectures: `FlatSAE`, `MatrixSAE` (rank 1), `BilinearMatrixSAE` tied and untied (rank 1; untied is the
  shipped WriteSAE's form). Every SAE is trained with BatchTopK (`writesae.sparsity.BatchTopK`).
- **Exact L0.** Every FVU is measured at exactly the SAE's L0 k: the k·N largest codes per head over the N
  samples of the split, in one batch (BatchTopK's training rule, run without gradients so that nothing is
  calibrated). That is k per sample on average, for every architecture alike, unless a head has fewer than
  k·N positive codes (then every positive one is kept and the realised L0 is reported below k). Beside it,
  per run: the L0 the SAE's calibrated threshold gives on the test split (what a splice uses), the FVU at that
  threshold, and the fraction of features never active on the test split at exact L0.
- **Splits.** Training and validation samples come from disjoint windows of the training chapters (the
  first ``--train-samples`` and the next ``--validation-samples`` of one permutation of them, whole windows
  each); the test split is every held-out window of Persuasion 21–24, which no choice looks at.
- **Learning rate per architecture.** At the headline point (L0 ``--k``, ``--n-features`` features) each
  architecture is trained at every ``--lrs`` value on each site and head group; while the lowest validation
  FVU lies at an edge of the grid, the grid is extended one step beyond that edge (at most
  ``--lr-extensions`` times). The best is used for that (site, group, architecture) everywhere else; one
  still at an edge is reported.
- **FVU against L0**: k = ``--l0-curve`` with ``--n-features`` features for every architecture.
- **FVU against parameters**: at L0 ``--parameter-k``, for each FlatSAE size in ``--budgets`` (features),
  each architecture gets the number of features whose weights per head (``n_weight_parameters``, no biases)
  lie within 5% of that FlatSAE's. A matched SAE above ``--max-features`` features is not trained (its encoder,
  like every encoder here, costs n·d_k·d_v multiply-adds per sample, which does not fit a CPU run); the
  results list each such cell.
- **Seeds**: the headline point is trained with ``--seeds`` seeds (initialisation and sample order); every
  other point with seed 0. The spread over seeds is reported beside the bootstrap intervals.
- **Intervals.** Per run, a 95% percentile interval over ``--bootstrap`` resamples of the test windows (with
  replacement); per comparison with the FlatSAE at the same point, the paired interval of the difference on
  the same resamples. FVU's denominator in a resample is the samples' squared distance from the whole test
  split's mean.
- **In-loop KL**: KL(p_clean ‖ p_spliced) with the SAE spliced in the loop on its own heads (sequential
  recurrence), over the first ``--kl-windows`` held-out windows of ``--kl-context`` tokens, against
  zero-ablating the same heads; per window, so that it is bootstrapped over windows too. It is measured on
  the headline point and the L0 curve (the learning rates not chosen and the parameter curve are scored by FVU
  only: a splice's cost in the loop grows with its features). A splice whose state
  blows up in the loop (a non-finite KL) is counted as diverged, not averaged.
- Heads: "long-memory" heads have a median half-life ≥ ``--long-half-life`` tokens, "memoryless" heads one
  below ``--memoryless-half-life``; each head's decay kind (``HeadCensus.decay_kind``: fixed or learned) is
  reported with it. The layer is the one where the smaller group is largest (then the most heads in both),
  among the layers whose reads are not silent (some head's median ‖o‖_rms / √ε ≥ 1); ``--layer`` overrides it.
- References, fitted on the training samples: PCA with k components for every k of the L0 curve, and the
  training mean alone (above 1 by how far the test mean lies from the training mean).
- A run has converged when each head's validation FVU changed by less than 2% over the last fifth of
  training (`writesae.train.convergence`).

Every finished run is appended to ``--out``/runs.jsonl.partial, so an interrupted comparison rerun with the
same flags trains only the runs it lacks (the samples are extracted again); the file is removed once
results.json is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from demos.common import provenance, pyplot, run_conditions, run_now, save_figure, took, write_json
from hooked_gdn.census import VERY_LONG_MEMORY, MemoryCensus
from hooked_gdn.files import atomic_file
from hooked_gdn.pretrained import CENSUS_FILE, PRETRAINED_MODELS, austen_corpus, heldout_windows
from writesae import BilinearMatrixSAE, FlatSAE, MatrixSAE
from writesae.baselines import PCABaseline
from writesae.differences import differences
from writesae.evals import downstream_metrics, downstream_references, reconstruction_metrics
from writesae.in_memory import InMemoryActivations
from writesae.splice import HookedSAEGatedDeltaNet
from writesae.store import ActivationStore, StoreConfig
from writesae.train import CONVERGED_BELOW, TrainConfig, convergence, train

MODEL = "gdn-austen"
#: label: (class, config keywords)
ARCHITECTURES = {
    "Flat": (FlatSAE, {}),
    "Matrix": (MatrixSAE, {}),
    "Bilinear tied": (BilinearMatrixSAE, {"tied": True}),
    "Bilinear untied": (BilinearMatrixSAE, {"tied": False}),
}
WRITESAE = "Bilinear untied"
BASELINE = "Flat"  # what every architecture is compared with, pairwise
SPARSITY = "batchtopk"
SITES = ("state", "write")
GROUPS = ("long-memory", "memoryless")
PHASES = ("learning rate", "L0", "parameters", "seeds")
KL_PHASES = ("L0", "seeds")  # besides the chosen learning rate's run: in-loop KL is measured on the L0 curve
PARAMETER_TOLERANCE = 0.05  # relative distance of a matched weight count from the budget
INTERVAL = (2.5, 97.5)  # percentiles of the bootstrap


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
    in_layer = [h for h in census.heads if h.layer == layer]
    return {"layer": layer, "heads": chosen,
            "median_half_life": {str(h.head): h.half_life[1] for h in in_layer},
            "decay": {str(h.head): h.decay_kind for h in in_layer},
            "rule": f"long-memory: median half-life >= {long_half_life:g} tokens; memoryless: median half-life < "
                    f"{memoryless_half_life:g} tokens; layer: among those whose reads are not silent (some head's "
                    f"median |o|_rms / sqrt(eps) >= 1), the one whose smaller group is largest, then the most heads"}


def make_sae(architecture: str, n_features: int, k: int, d_k: int, d_v: int, heads: list[int] | int = 0,
             site: str | None = None, seed: int = 0):
    cls, options = ARCHITECTURES[architecture]
    return cls(d_k=d_k, d_v=d_v, n_features=n_features, k=k, heads=heads, site=site, seed=seed, sparsity=SPARSITY, **options)


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


# ---------------------------------------------------------------------- samples


class SiteSamples:
    """One site's samples on some heads: ``fitting`` (training samples, with the validation split as the
    trainer's held-out split) and the test split ``test`` [N, H, d_k, d_v] with each sample's test window
    ``window`` [N] (an index into ``windows``, the distinct windows in order)."""

    def __init__(self, fitting: InMemoryActivations, test: torch.Tensor, window: torch.Tensor):
        self.fitting, self.test = fitting, test
        self.windows, self.window = torch.unique(window, return_inverse=True)

    def select_heads(self, heads: list[int]) -> SiteSamples:
        rows = [self.fitting.heads.index(h) for h in heads]
        return SiteSamples(self.fitting.select_heads(heads), self.test[:, rows], self.windows[self.window])

    def per_window(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Sums of a per-sample quantity [N, ...] over each test window: [n_windows, ...]."""
        out = per_sample.new_zeros(len(self.windows), *per_sample.shape[1:])
        return out.index_add_(0, self.window, per_sample)

    def variance_per_window(self) -> torch.Tensor:
        """Σ over each window's samples of ‖X − X̄_test‖² per head [n_windows, H] (X̄_test: the test split's mean)."""
        x = self.test.double()
        return self.per_window((x - x.mean(0)).pow(2).sum((-2, -1)))


def extract(model, documents: list, heldout_documents: list, layer: int, kind: str, heads: list[int], sizes: dict) -> SiteSamples:
    """The samples of one site (see `SiteSamples` and the module docstring's splits)."""
    positions = window_positions(sizes["context"], sizes["positions"])
    for name in ("train_samples", "validation_samples"):
        if sizes[name] % len(positions):
            raise ValueError(f"{name} = {sizes[name]} must be a multiple of the positions per window ({len(positions)}), "
                             f"so that training and validation windows do not share a window")
    store = ActivationStore(model, documents, StoreConfig(
        layer=layer, kind=kind, heads=heads, context=sizes["context"], positions=positions,
        heldout_documents=heldout_documents, seed=0))
    store.keep_heldout()
    both = InMemoryActivations.from_store(store, sizes["train_samples"] + sizes["validation_samples"], seed=0)
    n = sizes["train_samples"]
    fitting = InMemoryActivations(both.train[:n], both.train[n:], both.cfg, both.heads, both.n_value_heads, 0,
                                  model_name=both.model_name, model_fingerprint=both.model_fingerprint)
    test, origins = zip(*store.heldout_batches(1024, with_origin=True))
    return SiteSamples(fitting, torch.cat(test), torch.cat(origins)[:, 0])


# ---------------------------------------------------------------------- scoring


@torch.no_grad()
def exact_l0_errors(sae, x: torch.Tensor, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample squared error [N, H] of ``sae`` at exact L0 over ``x`` (the k·N largest codes per head over
    all N samples, in one batch; see the module docstring), and how often each feature fired [H, n]."""
    if len(x) > batch_size:
        raise ValueError(f"exact L0 needs the split in one batch; {len(x)} samples exceed {batch_size}")
    was_training = sae.training
    sae.train()  # BatchTopK's batch rule; without gradients it calibrates nothing
    try:
        codes = sae.encode(x)
        error = (x - sae.decode(codes)).double().pow(2).sum((-2, -1))
    finally:
        sae.train(was_training)
    return error, (codes != 0).sum(0)


def score(sae, samples: SiteSamples) -> dict:
    """Validation and test FVU at exact L0, the test's per-window errors, realised L0s and dead fraction, and the
    FVU and L0 at the SAE's calibrated threshold."""
    out = {}
    for split, x in (("validation", samples.fitting.heldout), ("test", samples.test)):
        error, fired = exact_l0_errors(sae, x)
        variance = (x.double() - x.double().mean(0)).pow(2).sum((0, -2, -1))
        fvu = (error.sum(0) / variance).tolist()
        out[split] = {"fvu": statistics.fmean(fvu), "fvu_per_head": fvu, "samples": len(x),
                      "l0_per_head": (fired.sum(-1) / len(x)).tolist(),
                      "dead_fraction_per_head": (fired == 0).double().mean(-1).tolist()}
        if split == "test":
            out[split]["error_per_window"] = samples.per_window(error).tolist()
    threshold = reconstruction_metrics(sae.eval(), samples.test.split(1024))
    out["test"]["threshold"] = {"fvu_per_head": threshold["fvu"], "l0_per_head": threshold["l0"]}
    return out


@torch.no_grad()
def kl_per_window(model, sae, windows: torch.Tensor, references: list[dict]) -> dict:
    """In-loop KL(p_clean ‖ p_spliced) and CE per window, and the zero ablation's, each window its own run; None
    where the spliced run diverged (a non-finite value)."""
    rows = [downstream_metrics(model, sae, window[None], mode="loop", references=reference)
            for window, reference in zip(windows, references)]
    # a splice whose state blows up in the loop gives inf or NaN: recorded as None, and counted as diverged
    return {key: [r[key] if math.isfinite(r[key]) else None for r in rows]
            for key in ("kl_spliced", "kl_zero_ablated", "ce_clean", "ce_spliced", "ce_zero_ablated")}


def bootstrap_indices(n_windows: int, resamples: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(n_windows, (resamples, n_windows), generator=torch.Generator().manual_seed(seed))


def interval(values: torch.Tensor) -> list[float]:
    return torch.quantile(values.double(), torch.tensor(INTERVAL, dtype=torch.double) / 100).tolist()


def fvu_resamples(error_per_window: list, variance_per_window: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """FVU (mean over heads) on each resample of the test windows [resamples]."""
    error = torch.tensor(error_per_window, dtype=torch.double)
    return (error[indices].sum(1) / variance_per_window[indices].sum(1)).mean(-1)


# ---------------------------------------------------------------------- runs


def train_run(samples: SiteSamples, architecture: str, n_features: int, k: int, lr: float, seed: int, sizes: dict) -> dict:
    """Train one SAE on ``samples`` (all its heads) and score it (`score`); its validation FVU curve and convergence."""
    fitting = samples.fitting
    sae = make_sae(architecture, n_features, k, fitting.d_k, fitting.d_v, fitting.heads, fitting.cfg.site, seed)
    steps = sizes["steps"]
    with tempfile.TemporaryDirectory() as out:
        train(sae, fitting.select_heads(fitting.heads, seed=seed), TrainConfig(
            out_dir=out, steps=steps, batch_size=sizes["batch_size"], lr=lr, warmup_steps=steps // 10,
            auxk_k=2 * k, dead_after_samples=sizes["dead_after_samples"], eval_every=steps // 5,
            eval_samples=fitting.n_samples("heldout"), checkpoint_every=0, input_scale_samples=fitting.n_samples("train"),
            log_every=max(1, steps // 20), progress=False, seed=seed))
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if r["split"] == "heldout"]
    settled = convergence(records)
    return {"sae": sae.eval(), **score(sae, samples),
            "validation_curve": {"steps": [r["step"] for r in validation], "fvu": [r["fvu"] for r in validation]},
            "last_fifth_change_per_head": settled["relative_change"], "converged": settled["converged"]}


def train_and_score(model, samples: SiteSamples, architecture: str, n_features: int, k: int, lr: float, seed: int,
                    sizes: dict) -> tuple[dict, object]:
    """`train_run`, with the seconds it took; and the trained SAE."""
    start = time.perf_counter()
    run = train_run(samples, architecture, n_features, k, lr, seed, sizes)
    sae = run.pop("sae")
    return {"weights_per_head": sae.n_weight_parameters() // len(samples.fitting.heads), **run, "kl": None,
            "seconds": {"training": time.perf_counter() - start, "kl": 0.0}}, sae


RUN_KEY = ("site", "group", "phase", "architecture", "point", "seed")


def finished_runs(records: Path, header: dict) -> dict[tuple, dict]:
    """The runs an interrupted comparison with the same ``header`` recorded in ``records``, by `RUN_KEY`
    (a last line cut off by the interruption is dropped); a new file with the header when there is none."""
    if not records.exists():
        with atomic_file(records) as f:
            f.write(json.dumps(header) + "\n")
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


def best_learning_rate(swept: list[dict]) -> float:
    """The learning rate of the swept run with the lowest validation FVU (the test split chooses nothing)."""
    return min(swept, key=lambda r: r["validation"]["fvu"])["lr"]


def next_learning_rate(grid: list[float], best: float) -> float | None:
    """One more learning rate when ``best`` lies at an edge of ``grid``: the grid's outer step taken again beyond
    that edge (3 significant digits); None when ``best`` is inside."""
    grid = sorted(grid)
    if best == grid[-1]:
        return float(f"{grid[-1] * grid[-1] / grid[-2]:.3g}")
    if best == grid[0]:
        return float(f"{grid[0] * grid[0] / grid[1]:.3g}")
    return None


def planned_points(sizes: dict, d_k: int, d_v: int) -> dict:
    """What each phase trains: per architecture its (point, n_features, k) list; the learning-rate phase's
    points are learning rates, the L0 phase's k, the parameter phase's FlatSAE budgets, the seed phase's seeds;
    and the parameter cells above ``max_features``, not trained."""
    k, n = sizes["k"], sizes["n_features"]
    plan = {phase: {a: [] for a in ARCHITECTURES} for phase in PHASES}
    skipped = []
    for a in ARCHITECTURES:
        plan["learning rate"][a] = [(lr, n, k) for lr in sizes["lrs"]]
        plan["L0"][a] = [(k_, n, k_) for k_ in sizes["l0_curve"] if k_ != k]  # k itself: the learning-rate phase's best run
        plan["seeds"][a] = [(seed, n, k) for seed in range(1, sizes["seeds"])]
    for budget in sizes["budgets"]:
        for a, features in features_at_equal_parameters(budget, sizes["parameter_k"], d_k, d_v).items():
            if features > sizes["max_features"]:
                skipped.append({"budget": budget, "architecture": a, "n_features": features})
            else:
                plan["parameters"][a].append((budget, features, sizes["parameter_k"]))
    return {"points": plan, "not_trained": skipped}


def run_comparison(model, documents: list, heldout_documents: list, choice: dict, sizes: dict, kl_tokens: torch.Tensor,
                   sites=SITES, log=print, records: Path | None = None) -> dict:
    """Every run of every phase on every site and head group, and their summary (see the module docstring).

    ``documents``: token sequences, one per document; ``heldout_documents``: the indices of the held-out ones.
    ``records``: a JSON-lines file to which every finished run is appended; a rerun with the same settings
    takes the runs it holds instead of training them again (the samples and references are recomputed).
    """
    cfg, layer = model.cfg, choice["layer"]
    plan = planned_points(sizes, cfg.d_key, cfg.d_value)
    all_heads = [h for group in GROUPS for h in choice["heads"][group]]
    header = {"layer": layer, "heads": choice["heads"], "sizes": sizes, "sites": list(sites)}
    finished = finished_runs(records, header) if records is not None else {}
    if finished:
        log(f"resuming: {len(finished)} runs recorded in {records}")
    done, cells, clock = {}, [], {"extraction_s": 0.0}
    for site in sites:
        start = time.perf_counter()
        samples = extract(model, documents, heldout_documents, layer, site, all_heads, sizes)
        clock["extraction_s"] += time.perf_counter() - start
        for group in GROUPS:
            heads = choice["heads"][group]
            group_samples, references = samples.select_heads(heads), None
            best_lr, lr_grid = {}, {}

            def record(run):
                done[tuple(run[key] for key in RUN_KEY)] = run
                if records is not None:
                    with records.open("a") as file:
                        file.write(json.dumps(run) + "\n")
                        file.flush()
                        os.fsync(file.fileno())

            def one(phase, architecture, point, n_features, k, lr, seed, with_kl=True):
                """The run, trained unless recorded, with its in-loop KL when ``with_kl`` (KL is measured for the
                runs the summary reports: not for the learning rates not chosen)."""
                nonlocal references
                key = (site, group, phase, architecture, point, seed)
                run, sae = done.get(key) or finished.get(key), trained.get(key)
                if run is not None and (run["lr"], run["n_features"], run["k"]) != (lr, n_features, k):
                    run = None  # recorded at another learning rate than the one chosen now
                if run is None or (with_kl and run["kl"] is None and sae is None):
                    run, sae = train_and_score(model, group_samples, architecture, n_features, k, lr, seed, sizes)
                    run = {"site": site, "group": group, "heads": heads, "phase": phase, "architecture": architecture,
                           "point": point, "seed": seed, "n_features": n_features, "k": k, "lr": lr, **run}
                    trained[key] = sae
                    record(run)
                if with_kl and run["kl"] is None:
                    start = time.perf_counter()
                    if references is None:
                        references = [downstream_references(model, sae, window[None], mode="loop") for window in kl_tokens]
                    run = run | {"kl": kl_per_window(model, sae, kl_tokens, references)}
                    run["seconds"] = run["seconds"] | {"kl": time.perf_counter() - start}
                    record(run)
                done[key] = run
                log(f"{site:5} {group:11} {phase:13} {architecture:15} {point!s:>6} n={n_features:<5} k={k:<2} lr={lr:g}: "
                    f"validation FVU {run['validation']['fvu']:.3f}, test FVU {run['test']['fvu']:.3f}"
                    + (f", KL {_kl(run['kl']['kl_spliced'])}" if run["kl"] else "") + ('' if run['converged'] else ' (not converged)'))
                return run

            trained = {}  # this cell's SAEs trained in this process, by run key
            for architecture in ARCHITECTURES:
                swept = [one("learning rate", architecture, *point, point[0], 0, with_kl=False)
                         for point in plan["points"]["learning rate"][architecture]]
                for _ in range(sizes["lr_extensions"]):
                    lr = next_learning_rate([r["lr"] for r in swept], best_learning_rate(swept))
                    if lr is None:
                        break
                    swept.append(one("learning rate", architecture, lr, sizes["n_features"], sizes["k"], lr, 0, with_kl=False))
                lr_grid[architecture] = sorted(r["lr"] for r in swept)
                best_lr[architecture] = best_learning_rate(swept)
                one("learning rate", architecture, best_lr[architecture], sizes["n_features"], sizes["k"], best_lr[architecture], 0)
                trained.clear()
            for phase in ("L0", "parameters", "seeds"):
                for architecture in ARCHITECTURES:
                    for point, n_features, k in plan["points"][phase][architecture]:
                        one(phase, architecture, point, n_features, k, best_lr[architecture], point if phase == "seeds" else 0,
                            with_kl=phase in KL_PHASES)
                        trained.clear()
            cells.append({"site": site, "group": group, "heads": heads, "best_lr": best_lr, "lr_grid": lr_grid,
                          "variance_per_window": group_samples.variance_per_window().tolist(),
                          "test_windows": len(group_samples.windows), "test_samples": len(group_samples.test),
                          "validation_samples": group_samples.fitting.n_samples("heldout"),
                          "references": reference_fvus(group_samples, sizes["l0_curve"])})
    runs = list(done.values())
    clock |= {"training_s": sum(r["seconds"]["training"] for r in runs), "kl_s": sum(r["seconds"]["kl"] for r in runs)}
    results = {"layer": layer, "heads": choice, "sizes": sizes, "not_trained": plan["not_trained"],
               "parameter_budget_per_head": {str(b): weights_per_head("Flat", b, sizes["parameter_k"], cfg.d_key, cfg.d_value)
                                             for b in sizes["budgets"]},
               "converged_below": CONVERGED_BELOW, "cells": cells, "runs": runs, "elapsed": clock}
    return results | {"summary": summarize(results)}


def _diverged(diverged: int, windows: int) -> str:
    return f"diverged in {diverged} of {windows} windows"


def _kl(per_window: list) -> str:
    diverged = sum(v is None for v in per_window)
    return _diverged(diverged, len(per_window)) if diverged else f"{statistics.fmean(per_window):.3f}"


def reference_fvus(samples: SiteSamples, ks: list[int]) -> dict:
    """Test FVU of PCA-k for each k and of the training mean, fitted on the training samples (mean over heads and per head)."""
    fvus = {}
    for k in sorted(ks):
        pca = PCABaseline.fit(samples.fitting.train, k, seed=0)
        per_head = reconstruction_metrics(pca, samples.test.split(1024))["fvu"]
        fvus[f"PCA-{k}"] = {"fvu": statistics.fmean(per_head), "fvu_per_head": per_head}
    mean_only = PCABaseline(pca.b_dec, pca.components[..., :0], samples.fitting.d_k, samples.fitting.d_v)
    per_head = reconstruction_metrics(mean_only, samples.test.split(1024))["fvu"]
    fvus["training mean"] = {"fvu": statistics.fmean(per_head), "fvu_per_head": per_head}
    return fvus


# ---------------------------------------------------------------------- summary


def point_runs(results: dict, site: str, group: str, curve: str) -> dict[str, list[dict]]:
    """Per architecture, the seed-0 runs of a curve in order of its x: "L0" (the L0 phase and the learning-rate
    phase's best run), "parameters", or "headline" (the best learning rate's run at the headline point, one
    per seed)."""
    cell = next(c for c in results["cells"] if (c["site"], c["group"]) == (site, group))
    out = {}
    for a in ARCHITECTURES:
        mine = [r for r in results["runs"] if (r["site"], r["group"], r["architecture"]) == (site, group, a)]
        best = [r for r in mine if r["phase"] == "learning rate" and r["lr"] == cell["best_lr"][a]]
        if curve == "headline":
            out[a] = best + [r for r in mine if r["phase"] == "seeds"]
        elif curve == "L0":
            out[a] = sorted(best + [r for r in mine if r["phase"] == "L0"], key=lambda r: r["k"])
        else:
            out[a] = sorted([r for r in mine if r["phase"] == "parameters"], key=lambda r: r["weights_per_head"])
    return out


def summarize(results: dict) -> list[dict]:
    """One row per (site, group, curve point, architecture): test FVU with its bootstrap interval, its paired
    difference from the FlatSAE at the same point, realised L0s, dead fraction and KL with intervals."""
    resamples = results["sizes"]["bootstrap"]
    rows = []
    for cell in results["cells"]:
        variance = torch.tensor(cell["variance_per_window"], dtype=torch.double)
        windows = bootstrap_indices(len(variance), resamples, seed=0)
        kl_windows = None
        for curve in ("headline", "L0", "parameters"):
            by_architecture = point_runs(results, cell["site"], cell["group"], curve)
            baseline = {r["point"] if curve == "parameters" else r["k"]: r for r in by_architecture[BASELINE] if r["seed"] == 0}
            for architecture, same in by_architecture.items():
                for run in (same[:1] if curve == "headline" else same):
                    x = run["point"] if curve == "parameters" else run["k"]
                    if kl_windows is None:
                        kl_windows = bootstrap_indices(results["sizes"]["kl_windows"], resamples, seed=1)
                    fvu = fvu_resamples(run["test"]["error_per_window"], variance, windows)
                    kl = run["kl"]["kl_spliced"] if curve != "parameters" else None
                    diverged = None if kl is None else sum(v is None for v in kl)
                    row = {"site": cell["site"], "group": cell["group"], "heads": cell["heads"], "curve": curve, "x": x,
                           "architecture": architecture, "n_features": run["n_features"], "k": run["k"], "lr": run["lr"],
                           "weights_per_head": run["weights_per_head"],
                           "fvu": run["test"]["fvu"], "fvu_interval": interval(fvu),
                           "l0_exact": statistics.fmean(run["test"]["l0_per_head"]),
                           "l0_threshold": statistics.fmean(run["test"]["threshold"]["l0_per_head"]),
                           "fvu_threshold": statistics.fmean(run["test"]["threshold"]["fvu_per_head"]),
                           "dead_fraction": statistics.fmean(run["test"]["dead_fraction_per_head"]),
                           "kl_diverged": diverged, "kl_windows": None if kl is None else len(kl),
                           "kl": None if kl is None or diverged else statistics.fmean(kl),
                           "kl_interval": None if kl is None or diverged else interval(torch.tensor(kl, dtype=torch.double)[kl_windows].mean(1)),
                           "kl_zero_ablated": None if kl is None else statistics.fmean(run["kl"]["kl_zero_ablated"]),
                           "converged": run["converged"]}
                    if curve == "headline":
                        seeds = [r["test"]["fvu"] for r in same]
                        row |= {"seeds": len(seeds), "fvu_seed_spread": statistics.stdev(seeds) if len(seeds) > 1 else None}
                    flat = baseline.get(x)
                    if architecture != BASELINE and flat is not None:
                        difference = fvu - fvu_resamples(flat["test"]["error_per_window"], variance, windows)
                        row["fvu_minus_flat"] = run["test"]["fvu"] - flat["test"]["fvu"]
                        row["fvu_minus_flat_interval"] = interval(difference)
                    rows.append(row)
    return rows


def verdict(row: dict) -> str:
    """"lower", "higher" or "level" than the FlatSAE at the same point, by the paired interval."""
    low, high = row["fvu_minus_flat_interval"]
    return "lower" if high < 0 else "higher" if low > 0 else "level"


def lr_at_edge(results: dict) -> list[str]:
    """The (site, group, architecture) whose chosen learning rate is still at an edge of its grid once the grid
    was extended (``--lr-extensions`` times at most)."""
    return [f"{c['site']}, {c['group']}, {a} ({lr:g})" for c in results["cells"] for a, lr in c["best_lr"].items()
            if lr in (min(c["lr_grid"][a]), max(c["lr_grid"][a]))]


# ---------------------------------------------------------------------- outputs


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    cells = [(c["site"], c["group"]) for c in results["cells"]]
    fig, axes = plt.subplots(3, len(cells), figsize=(4.4 * len(cells), 11), squeeze=False)
    colors = dict(zip(ARCHITECTURES, ("tab:grey", "tab:green", "tab:orange", "tab:blue")))
    for column, (site, group) in enumerate(cells):
        rows = [r for r in results["summary"] if (r["site"], r["group"]) == (site, group)]
        cell = next(c for c in results["cells"] if (c["site"], c["group"]) == (site, group))
        for row, (curve, metric, ylabel) in enumerate((("L0", "fvu", "test FVU at exact L0"), ("L0", "kl", "in-loop KL, nats"),
                                                      ("parameters", "fvu", "test FVU at exact L0"))):
            ax = axes[row, column]
            for a in ARCHITECTURES:
                points = [r for r in rows if (r["curve"], r["architecture"]) == (curve, a) and r[metric] is not None]
                xs = [r["k"] if curve == "L0" else r["weights_per_head"] for r in points]
                values = [r[metric] for r in points]
                low, high = zip(*[r[f"{metric}_interval"] for r in points]) if points else ((), ())
                ax.plot(xs, values, "o-", color=colors[a], label=a, ms=4)
                ax.fill_between(xs, low, high, color=colors[a], alpha=0.2)
            if curve == "L0" and metric == "fvu":
                ks = sorted(int(name[4:]) for name in cell["references"] if name.startswith("PCA-"))
                ax.plot(ks, [cell["references"][f"PCA-{k}"]["fvu"] for k in ks], "k--", lw=0.8, label="PCA-k")
            if metric == "kl" and rows:
                ax.axhline(rows[0]["kl_zero_ablated"], color="k", ls=":", lw=0.8, label="heads zero-ablated")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("L0 (k)" if curve == "L0" else f"weights per head (L0 {results['sizes']['parameter_k']})")
            if column == 0:
                ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(f"{site}, {group_label(results, group)}", fontsize=9)
            if column == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"gdn-austen layer {results['layer']}: bands are 95% bootstrap intervals over test windows", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


def _ci(values: list[float]) -> str:
    return f"[{values[0]:.3f}, {values[1]:.3f}]"


def _kl_cell(row: dict) -> str:
    if row["kl"] is None:
        return _diverged(row["kl_diverged"], row["kl_windows"])
    return f"{row['kl']:.3f} {_ci(row['kl_interval'])}"


def _loop_finding(head: list[dict]) -> str:
    """What the headline SAEs do spliced in the loop: which diverged, and which move the prediction less than
    zero-ablating their heads."""
    diverged = [r["architecture"] for r in head if r["kl"] is None]
    below = [r["architecture"] for r in head if r["kl"] is not None and r["kl_interval"][1] < r["kl_zero_ablated"]]
    above = [r["architecture"] for r in head if r["kl"] is not None and r["kl_interval"][0] > r["kl_zero_ablated"]]
    said = lambda names: ", ".join(names) if names else "none"
    return (f"Spliced in the loop ({head[0]['kl_windows']} windows): diverged: {said(diverged)}; KL below zero-ablating "
            f"the heads ({head[0]['kl_zero_ablated']:.3f}): {said(below)}; above it: {said(above)}.")


def group_label(results: dict, group: str) -> str:
    heads = results["heads"]["heads"][group]
    decay = "/".join(sorted({results["heads"]["decay"][str(h)] for h in heads}))
    return f"{group} {heads} ({decay} decay)"


def readme_block(results: dict) -> str:
    """The README's paragraphs and tables, every number and every finding from ``results``."""
    s, choice = results["sizes"], results["heads"]
    half = choice["median_half_life"]
    heads = lambda group: ", ".join(f"{h} ({half[str(h)]:.3g}, {choice['decay'][str(h)]})" for h in choice["heads"][group])
    summary, runs = results["summary"], results["runs"]
    cell0 = results["cells"][0]
    lines = [
        f"`{run_now(results['provenance']['command'])}` ({took(sum(results['elapsed'].values()))}"
        f"{run_conditions(results['provenance'])}; "
        f"`{results['provenance']['inputs']['out']}/results.json` has every run). GDN layer {results['layer']} of "
        f"`{results['provenance']['model']}`; long-memory heads {heads('long-memory')} and memoryless heads "
        f"{heads('memoryless')} (median half-life in tokens, decay kind; {choice['rule']}). Per site and head, "
        f"{s['train_samples']} training, {cell0['validation_samples']} validation and {cell0['test_samples']} test samples "
        f"({cell0['test_windows']} test windows), at {s['positions']} positions in the second half of {s['context']}-token "
        f"windows. BatchTopK for every SAE; every FVU at exact L0 on the test split. {s['steps']} steps of "
        f"{s['batch_size']} samples (warmup, cosine decay) at the learning rate, of {', '.join(f'{lr:g}' for lr in s['lrs'])} "
        f"(extended beyond an edge that was best, up to {s['lr_extensions']} steps), with the lowest validation FVU at L0 {s['k']} with {s['n_features']} features, per site, head group and "
        f"architecture. Intervals: 95%, {s['bootstrap']} bootstrap resamples of the test windows (KL: of the "
        f"{s['kl_windows']} in-loop windows of {s['kl_context']} tokens); differences from the FlatSAE are paired. "
        f"{sum(r['converged'] for r in runs)} of {len(runs)} runs converged (validation FVU of every head changed "
        f"< {100 * results['converged_below']:g}% over the last fifth of training).",
        "",
    ]
    edge = lr_at_edge(results)
    chosen = "; ".join(f"{c['site']}, {c['group']}: " + ", ".join(
        f"{a} {lr:g} (of {min(c['lr_grid'][a]):g}–{max(c['lr_grid'][a]):g})" for a, lr in c["best_lr"].items())
                       for c in results["cells"])
    lines += [f"Learning rates chosen: {chosen}. "
              + (f"At the edge of the grid: {'; '.join(edge)}." if edge else "None is at the edge of the grid."), ""]

    findings = []
    for cell in results["cells"]:
        label = f"{cell['site']}, {group_label(results, cell['group'])}"
        head = [r for r in summary if (r["site"], r["group"], r["curve"]) == (cell["site"], cell["group"], "headline")]
        best = min(head, key=lambda r: r["fvu"])
        writesae = next(r for r in head if r["architecture"] == WRITESAE)
        l0 = [r for r in summary if (r["site"], r["group"], r["curve"], r["architecture"]) == (cell["site"], cell["group"], "L0", WRITESAE)]
        params = [r for r in summary if (r["site"], r["group"], r["curve"], r["architecture"]) == (cell["site"], cell["group"], "parameters", WRITESAE)
                  and "fvu_minus_flat" in r]
        count = lambda rows, word: sum(verdict(r) == word for r in rows)
        pca = cell["references"][f"PCA-{s['k']}"]["fvu"]
        findings.append(
            f"- **{label}**: at L0 {s['k']} with {s['n_features']} features the lowest test FVU is {best['architecture']}'s "
            f"({best['fvu']:.3f}; PCA-{s['k']} {pca:.3f}); {WRITESAE} − Flat = {writesae['fvu_minus_flat']:+.3f} "
            f"{_ci(writesae['fvu_minus_flat_interval'])} ({verdict(writesae)}). Along the L0 curve {WRITESAE} is lower than "
            f"Flat at {count(l0, 'lower')}, level at {count(l0, 'level')} and higher at {count(l0, 'higher')} of {len(l0)} "
            f"values of k; at equal parameters lower at {count(params, 'lower')}, level at {count(params, 'level')} and "
            f"higher at {count(params, 'higher')} of {len(params)} budgets. " + _loop_finding(head))
    lines += ["Findings (generated from the results):", "", *findings, ""]
    if results["not_trained"]:
        lines += ["Not trained (above the feature cap of " + f"{s['max_features']}): " + "; ".join(
            f"{c['architecture']} at the {c['budget']}-feature FlatSAE's budget ({c['n_features']} features)"
            for c in results["not_trained"]) + ". Every encoder here costs n·d_k·d_v multiply-adds per sample, so a "
            "bilinear SAE with as many weights as a FlatSAE costs (d_k·d_v)/(d_k + d_v) (untied) or twice that (tied) "
            "times the Flat encoder's compute.", ""]

    lines += [f"At L0 {s['k']}, {s['n_features']} features each (seed spread over {max(r.get('seeds') or 1 for r in summary)} seeds):", "",
              "| site | heads | architecture | lr | weights / head | test FVU [95%] | − Flat [95%] | seed spread | L0 exact / at threshold | FVU at threshold | dead | KL [95%] | KL zero-ablated |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in summary if r["curve"] == "headline"):
        diff = f"{r['fvu_minus_flat']:+.3f} {_ci(r['fvu_minus_flat_interval'])}" if "fvu_minus_flat" in r else "—"
        spread = f"{r['fvu_seed_spread']:.3f}" if r["fvu_seed_spread"] is not None else "—"
        lines.append(f"| {r['site']} | {group_label(results, r['group'])} | {r['architecture']} | {r['lr']:g} | {r['weights_per_head']:,} | "
                     f"{r['fvu']:.3f} {_ci(r['fvu_interval'])} | {diff} | {spread} | {r['l0_exact']:.2f} / {r['l0_threshold']:.2f} | "
                     f"{r['fvu_threshold']:.3f} | {r['dead_fraction']:.2f} | {_kl_cell(r)} | {r['kl_zero_ablated']:.3f} |")
    ks = sorted(s["l0_curve"])
    lines += ["", f"Test FVU against L0 ({s['n_features']} features; in brackets the paired interval of the difference from Flat):", "",
              "| site | heads | architecture | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|---|---|" + "---|" * len(ks)]
    for cell in results["cells"]:
        for a in ARCHITECTURES:
            by_k = {r["k"]: r for r in summary if (r["site"], r["group"], r["curve"], r["architecture"]) == (cell["site"], cell["group"], "L0", a)}
            lines.append(f"| {cell['site']} | {cell['group']} | {a} | " + " | ".join(
                f"{by_k[k]['fvu']:.3f}" + (f" {_ci(by_k[k]['fvu_minus_flat_interval'])}" if "fvu_minus_flat" in by_k[k] else "")
                if k in by_k else "—" for k in ks) + " |")
        lines.append(f"| {cell['site']} | {cell['group']} | PCA-k | " + " | ".join(
            f"{cell['references'][f'PCA-{k}']['fvu']:.3f}" for k in ks) + " |")
    budgets = sorted(s["budgets"])
    lines += ["", f"Test FVU against parameters (L0 {s['parameter_k']}; per budget, a FlatSAE with that many features and the "
              "other architectures with as many weights per head; features in parentheses):", "",
              "| site | heads | architecture | " + " | ".join(f"{results['parameter_budget_per_head'][str(b)]:,} weights" for b in budgets) + " |",
              "|---|---|---|" + "---|" * len(budgets)]
    for cell in results["cells"]:
        for a in ARCHITECTURES:
            by_b = {r["x"]: r for r in summary if (r["site"], r["group"], r["curve"], r["architecture"]) == (cell["site"], cell["group"], "parameters", a)}
            lines.append(f"| {cell['site']} | {cell['group']} | {a} | " + " | ".join(
                f"{by_b[b]['fvu']:.3f} ({by_b[b]['n_features']})" if b in by_b else "not trained" for b in budgets) + " |")
    references = "; ".join(f"{c['site']}, {c['group']}: training mean {c['references']['training mean']['fvu']:.3f}"
                           for c in results["cells"])
    lines += ["", f"The training mean alone (test FVU): {references}.", "",
              f"![test FVU and in-loop KL against L0, FVU against parameters]({results['provenance']['inputs']['out']}/comparison.png)"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    numbers = lambda kind: lambda text: [kind(v) for v in text.split(",")]
    p.add_argument("--layer", type=int, default=None, help="a GDN layer (default: by the rule above)")
    p.add_argument("--long-half-life", type=float, default=VERY_LONG_MEMORY,
                   help="tokens (default: the census's VERY_LONG_MEMORY)")
    p.add_argument("--memoryless-half-life", type=float, default=3.0)
    p.add_argument("--k", type=int, default=8, help="the headline L0, where learning rates are chosen and seeds repeated")
    p.add_argument("--n-features", type=int, default=128, help="features of every SAE on the L0 curve and at the headline")
    p.add_argument("--lrs", type=numbers(float), default=[3e-4, 1e-3, 3e-3, 1e-2], help="learning rates (comma-separated), at least 3")
    p.add_argument("--lr-extensions", type=int, default=2, help="steps the grid may grow by beyond an edge that is best")
    p.add_argument("--l0-curve", type=numbers(int), default=[2, 4, 8, 16, 32], help="values of k (comma-separated)")
    p.add_argument("--parameter-k", type=int, default=4, help="the L0 of the parameter curve")
    p.add_argument("--budgets", type=numbers(int), default=[8, 16, 32, 128, 512], help="FlatSAE sizes (features) of the parameter curve")
    p.add_argument("--max-features", type=int, default=1024, help="parameter cells above this many features are not trained")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0, 1, ... at the headline point")
    p.add_argument("--steps", type=int, default=300, help="a multiple of 5")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-samples", type=int, default=8192)
    p.add_argument("--validation-samples", type=int, default=1024)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--positions", type=int, default=16, help="per window, evenly spaced in its second half")
    p.add_argument("--kl-windows", type=int, default=8)
    p.add_argument("--kl-context", type=int, default=512)
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    p.add_argument("--out", type=Path, default=Path("demos/results/compare_architectures"))
    args = p.parse_args(argv)
    if args.steps % 5 or args.steps < 5:
        p.error(f"--steps must be a positive multiple of 5 (validation every fifth of training), got {args.steps}")
    if len(set(args.lrs)) < 3:
        p.error(f"--lrs needs at least 3 distinct learning rates, got {args.lrs}")
    if args.k not in args.l0_curve:
        p.error(f"--k {args.k} must be one of --l0-curve {args.l0_curve} (the headline is a point of the curve)")
    if args.seeds < 1 or args.kl_context < 2 or args.bootstrap < 100:
        p.error("--seeds must be >= 1, --kl-context >= 2 and --bootstrap >= 100")
    return args


def sizes_from(args: argparse.Namespace) -> dict:
    sizes = {name: getattr(args, name) for name in ("k", "n_features", "lrs", "lr_extensions", "l0_curve", "parameter_k", "budgets",
                                                   "max_features", "seeds", "steps", "batch_size", "train_samples",
                                                   "validation_samples", "context", "positions", "kl_windows",
                                                   "kl_context", "bootstrap")}
    # AuxK (2k of the features silent for 32 batches) is set per run from its k
    return sizes | {"dead_after_samples": 32 * args.batch_size}


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
    kl_tokens = heldout_windows(model.tokenizer, args.kl_context)[: args.kl_windows]
    records = args.out / "runs.jsonl.partial"
    results = run_comparison(model, [torch.tensor(t) for t in ids], heldout, choice, sizes, kl_tokens, records=records)
    results = {"provenance": provenance(0, model=MODEL, **sizes, layer=choice["layer"], out=str(args.out)), **results}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    records.unlink()  # every run is in results.json; a rerun starts afresh
    plot(results, args.out / "comparison.png")
    print(readme_block(results))


if __name__ == "__main__":
    main()
