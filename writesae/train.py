"""Training an SAE on a sample source (docs/design.md §14): `TrainConfig`, `train`, `convergence`.

Loss on a batch of raw samples X [B, H, d_k, d_v] (H heads, one dictionary each), in the scaled
units where mean ‖sX‖²_F = 1 (s = ``sae.cfg.input_scale``), summed term by term:

    reconstruction  (1/BH) Σ_{b,h} ‖s(X − X̂)‖²_F   (summed over d_k×d_v, mean over samples and heads;
                                                     predicting 0 costs about 1)
    sparsity        ReLU:     sae.cfg.l1_coefficient · (1/BH) Σ_{b,h} Σ_i a_i ‖atom_i‖_F
                    JumpReLU: l0_coefficient · (1/BH) Σ_{b,h} Σ_i H(z_i − θ_i)
    auxk            TopK, BatchTopK: auxk_weight · AuxK (Gao et al., 2024)

Each sparsity rule owns its terms and its reconstruction's path (`writesae.sparsity`: ``training_terms``,
``summed_atoms``), so the trainer treats every rule alike. The residual s(X − X̂) is taken as (X·s − b_dec)
− Σ_i a_i atom_i, in the units the weights act in, from the centred input the encoder read, so that X̂ itself is
formed only where a hook on ``hook_sae_recons`` could see or edit it (`_loss_terms`).

A feature is dead when it has not fired for more than ``dead_after_samples`` samples (a counter per
head and feature). After each Adam step the factors are put back at unit norm
(``sae.normalize_factors_()``). The learning rate warms up linearly, then decays.

Input scale: unless resuming, s is estimated from the store at the start and kept in
``sae.cfg.input_scale``, so the SAE always takes raw X. The final SAE is saved to ``out_dir/sae``
with s folded into its weights by ``fold_input_scale_`` (input_scale 1, same outputs) when
``fold_input_scale`` is set and the architecture allows it (a tied BilinearMatrixSAE keeps s).

Output folder. ``out_dir`` gets ``checkpoint/``, ``metrics.jsonl`` and ``sae/`` (and ``wandb/``
with wandb); they are claimed through `writesae.outputs` before the first step, so a file of the
same name that the tool did not create is refused at once and never replaced; so is an ``sae``
that is not an SAE folder. Each ``metrics.jsonl`` record is appended in one write, fsynced: a kill
leaves at most a torn last line, which a resume drops with a warning naming the file (a bad line
elsewhere is refused by file and line number).

Checkpoints (``out_dir/checkpoint``, replaced atomically) hold the SAE (writesae folder), Adam's
state, the step, the dead counters, the RNG state and the store's stream state, in safetensors and
JSON (no pickle). The schedule is a function of the step, so the step is its whole state. With
``resume`` a call continues from the checkpoint and ends with exactly the weights an uninterrupted
run would have. A process killed while swapping checkpoints leaves complete copies beside
``checkpoint/``; the next call resumes from the newest, says so with a warning, and removes the
rest. A non-finite loss term or parameter stops training with a `FloatingPointError` before
anything is saved, leaving the last good checkpoint in place; so does a checkpoint that cannot be
written (a full disk: an `OSError` naming the checkpoint). A held-out evaluation that looks
diverged (FVU above ``DIVERGED_FVU``, or every code zero) gives a `RuntimeWarning`, and the
last one's reason is ``TrainResult.diverged``; a last one with a head's FVU above 1, worse than
predicting the mean (`writesae.evals.worse_than_the_mean`), gives a `RuntimeWarning` saying why.
`convergence` reads from a run's metrics whether its held-out FVU had settled by the end.
Training runs inside `writesae.host_memory.freed_memory_kept`: on the CPU the steps reuse the memory
the previous step freed instead of faulting fresh pages in (same results, faster steps: P5 in benchmarks/RESULTS.md).

Samples come from a `writesae.samples.SampleSource`: an `ActivationStore` (streamed from the model),
a `CachedActivations` (read from an on-disk cache) or an `InMemoryActivations`. Under torchrun
(`writesae.distributed`), training from a cache is data-parallel: every rank draws the same global
batch of ``batch_size`` samples and takes its share, gradients are averaged over ranks, and the
whole batch's statistics (dead features, AuxK's residual energy, BatchTopK's threshold) are reduced
across ranks, so W ranks end with the weights one rank would have. Rank 0 alone writes the output
folder and evaluates on held-out samples; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from hooked_gdn.files import atomic_file

from . import distributed
from .differences import differences
from .evals import MEAN_PREDICTION_FVU, reconstruction_metrics, worse_than_the_mean
from .host_memory import freed_memory_kept
from .io import CFG_FILE, WEIGHTS_FILE, _is_sae_folder, atomic_folder, leftovers, load_sae, recover_folder, save_sae
from .outputs import LOCK, claim_outputs, output_lock
from .sae import BilinearMatrixSAE, SAEBase, hook_point_is_hooked
from .samples import SampleSource
from .site_fit import check_sae_fits
from .store import ActivationStore

DECAYS = ("cosine", "linear", "constant")
OUTPUTS = ("checkpoint", "metrics.jsonl", "sae", LOCK)  # what train writes in out_dir
# a held-out FVU this far above 1 (predicting the mean) means the SAE diverged, NaN or not
DIVERGED_FVU = 10.0
# a run has converged when every head's held-out FVU moved by less than this fraction over its last fifth of
# training: one still moving more is still learning, and its numbers describe its step count more than the SAE
CONVERGED_BELOW = 0.02
# settings that change the trajectory: a resumed run must share them with the run it continues
_TRAJECTORY = ("batch_size", "lr", "betas", "warmup_steps", "decay", "grad_clip", "auxk_k", "auxk_weight",
               "dead_after_samples", "l0_coefficient", "normalize_factors")


@dataclass
class TrainConfig:
    """Training settings. Steps and intervals count optimiser steps; 0 disables an interval.

    ``betas``: Adam's. ``decay``: "cosine", "linear" (to 0 after the last step) or "constant",
    after ``warmup_steps`` of linear warmup. ``grad_clip``: max gradient norm, or None.
    ``l0_coefficient`` weighs JumpReLU's L0 penalty (a ReLU SAE's L1 weight is
    ``sae.cfg.l1_coefficient``). ``normalize_factors``: call ``sae.normalize_factors_()`` after
    each step (unit-norm rank-1 factors; a FlatSAE's unit-norm W_dec rows). ``input_scale_samples``:
    samples to estimate s from (None keeps the SAE's own). ``eval_samples``: held-out samples per
    evaluation. A run that does not resume starts a new ``metrics.jsonl``.
    """

    out_dir: str = "runs/sae"
    steps: int = 10_000
    batch_size: int = 4096
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    decay: str = "cosine"
    grad_clip: float | None = None
    auxk_k: int = 512
    auxk_weight: float = 1 / 32
    dead_after_samples: int = 10_000_000
    l0_coefficient: float = 1.0
    normalize_factors: bool = True
    input_scale_samples: int | None = 4096
    fold_input_scale: bool = True
    log_every: int = 10
    eval_every: int = 500
    eval_samples: int = 4096
    checkpoint_every: int = 1000
    resume: bool = True
    progress: bool = True
    wandb_project: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        for name in ("steps", "batch_size", "auxk_k", "dead_after_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    sae: SAEBase
    step: int  # optimiser steps done
    start_step: int  # 0, or the checkpoint's step when resumed
    train_metrics: dict | None  # the last logged training record
    heldout_metrics: dict | None  # the last held-out evaluation
    out_dir: Path
    diverged: str | None = None  # why the last held-out evaluation looks diverged, or None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimiser step ``step`` (1-based)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps - 1) / max(1, cfg.steps - cfg.warmup_steps)  # in [0, 1)
    factor = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
    return cfg.lr * factor[cfg.decay]


class _SquaredResidual(torch.autograd.Function):
    """‖A − C‖²_F per sample and head, and the residual A − C itself (without a gradient): A and C
    [..., n_dicts, d_k, d_v]. ``offset`` o [n_dicts, d_k, d_v] (or None) is what A already had subtracted where A
    comes without its gradient: it gets that part of the gradient, −Σ_samples ∂(A − C). The trainer's
    reconstruction term, with A = X·s − b_dec, the centred input the encoder read (`SAEBase._pre_and_centred`, with
    o = b_dec where it carries no gradient), and C = Σ_i a_i atom_i, or s·X̂ − b_dec where a hook made X̂: s(X − X̂)
    in the weights' units, with one pass over the batch for the residual where forming X̂ = (Σ_i a_i atom_i + b_dec)/s
    and scaling X − X̂ back takes four.

    The term is elementwise work on every sample's d_k·d_v numbers, and autograd's chain for it (subtract, scale,
    square, sum; then each one's backward) passes over that batch about a dozen times, which is most of a step's
    time where the batch is large against the dictionary (P5 in benchmarks/RESULTS.md). Here the forward makes the
    residual in one pass and the norm in one, and the backward is one pass, ∂/∂C = −2·residual·g, and one sum over
    the samples for o (∂/∂A = −∂/∂C, only where A asks). The same values to float rounding (tests/test_train.py)."""

    @staticmethod
    def forward(ctx, minuend: Tensor, subtrahend: Tensor, offset: Tensor | None) -> tuple[Tensor, Tensor]:
        residual = torch.sub(minuend, subtrahend)
        squared = torch.linalg.vector_norm(residual.flatten(-2), dim=-1).square_()
        ctx.save_for_backward(residual)
        ctx.mark_non_differentiable(residual)
        ctx.set_materialize_grads(False)  # else autograd fills a batch of zeros as the residual's unused gradient
        return squared, residual

    @staticmethod
    def backward(ctx, grad_squared: Tensor, _grad_residual: None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        (residual,) = ctx.saved_tensors
        need_minuend, need_subtrahend, need_offset = ctx.needs_input_grad
        grad_subtrahend = residual * (grad_squared * -2)[..., None, None]
        grad_offset = grad_subtrahend.sum(tuple(range(residual.dim() - 3))) if need_offset else None
        return -grad_subtrahend if need_minuend else None, grad_subtrahend if need_subtrahend else None, grad_offset


def _loss_terms(sae: SAEBase, x: Tensor, dead: Tensor, cfg: TrainConfig) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The weighted loss terms (they sum to the loss), the codes a and the residual s(X − X̂) (no gradient). Every
    hook point fires as in ``sae(x)`` except hook_sae_recons, which fires (X̂ formed) only when something is hooked
    there (`writesae.sae.hook_point_is_hooked`), so that a hook sees X̂ and its edit reaches the loss; else the
    residual skips X̂ (`_SquaredResidual`)."""
    pre, centred = sae._pre_and_centred(x)
    if hook_point_is_hooked(sae.hook_sae_acts_post):  # the sum is of the codes a hook returns
        codes = sae.hook_sae_acts_post(sae.activation(pre))
        subtrahend = sae.activation.summed_atoms(sae, codes)
    else:
        codes, subtrahend = sae.activation.codes_and_summed_atoms(sae, pre)
        codes = sae.hook_sae_acts_post(codes)
    if hook_point_is_hooked(sae.hook_sae_recons):
        subtrahend = sae.recons_from_atoms(subtrahend) * sae.cfg.input_scale - sae.b_dec  # s·X̂ − b_dec
    squared, residual = _SquaredResidual.apply(centred, subtrahend, None if centred.requires_grad else sae.b_dec)
    terms = {"reconstruction": squared.mean()}
    terms |= sae.activation.training_terms(sae, pre, codes, residual, dead, cfg)
    return terms, codes, residual


def make_optimizer(sae: SAEBase, cfg: TrainConfig) -> torch.optim.Adam:
    """The trainer's Adam, fused (one pass over each parameter, its gradient and its two moments, where
    ``foreach`` makes one pass per elementwise operation, about eight): the parameters' traffic is most of
    a step's time wherever the batch is small against the dictionary, and fused is 3-6x faster there
    (`benchmarks/bench_sae.py`, P5). The same update to float rounding (tests/test_train.py). A device
    without the fused kernel gets ``foreach``. A resumed checkpoint keeps the implementation it was
    saved with (Adam's state_dict carries it)."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas, fused=True)
    except RuntimeError:  # torch refuses fused=True for parameters on a device without the kernel
        return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas, foreach=True)


def training_step(sae: SAEBase, optimizer: torch.optim.Optimizer, x: Tensor, since_fired: Tensor, cfg: TrainConfig,
                  guard) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """One optimiser step on this rank's batch ``x`` (`train`'s loop body; the benchmarks time this):
    loss, backward, gradients averaged over ranks, clipping, Adam, unit-norm factors, and the dead
    counters ``since_fired`` updated in place. ``guard(tensors, witnessed)`` is given the loss terms (and the
    input, which they witness: `_nonfinite`) before the backward pass and the parameters after the update, and
    raises on a non-finite one. Returns the loss, its terms, the codes and the residual s(X − X̂)."""
    terms, codes, residual = _loss_terms(sae, x, since_fired > cfg.dead_after_samples, cfg)
    guard({f"{name} loss term": t for name, t in terms.items()}, {"input batch X": x})
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(sae.parameters())
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    optimizer.step()
    if cfg.normalize_factors:
        sae.normalize_factors_()
    guard({f"parameter {name} after the update": p for name, p in sae.named_parameters()})
    # fired anywhere in the global batch: Σ_samples |a| is 0 only where every a is (a NaN or an infinity shows as
    # fired, as with a != 0), where a boolean any over the samples took 1.6 to 3 times as long in one-thread timings
    # at n = 16,384, batch 1,024; a mask fill, where indexing by the mask would sync a GPU every step
    fired = codes.abs().sum(0) != 0
    since_fired.add_(cfg.batch_size).masked_fill_(distributed.sum_over_ranks(fired.int()) > 0, 0)
    return loss, terms, codes, residual


def _batch_fvu(x: Tensor, residual: Tensor, scale: float) -> float:
    """Mean over heads of Σ‖X − X̂‖²_F / Σ‖X − X̄‖²_F on one batch, from the residual s(X − X̂)."""
    error = residual.double().pow(2).sum((0, 2, 3)) / scale**2
    variance = (x - x.mean(0)).double().pow(2).sum((0, 2, 3))
    return (error / variance).mean().item()


def _nonfinite(tensors: dict[str, Tensor], witnessed: dict[str, Tensor] | None = None) -> list[str]:
    """The names of the tensors holding a NaN or an infinity. A NaN or an infinity anywhere makes a sum
    non-finite, so each tensor is summed once (the cheapest pass over it; ``aminmax`` took twice as long at
    the shipped model's shapes) and the sum of those sums is judged with one sync a step, where
    ``isfinite(t).all()`` takes several operators and a sync for each tensor. Finite numbers can also sum
    past the largest float, so only when that sum is not finite is each tensor checked number by number.

    ``witnessed``: tensors a NaN or an infinity in which makes one of ``tensors`` non-finite (the input batch X:
    the reconstruction term sums its every number's square, through X·s − b_dec; tests/test_train.py checks it for
    every architecture and sparsity rule). They are not summed, which saves a pass over the batch each step, and
    are checked number by number, and named, with the others where those are not finite."""
    with torch.no_grad():
        if math.isfinite(torch.stack([t.sum() for t in tensors.values()]).sum().item()):
            return []
        everything = {**(witnessed or {}), **tensors}
        return [name for name, t in everything.items() if not torch.isfinite(t).all()]


def _guard(step: int, checkpoint: Path, last_checkpoint: int | None, tensors: dict[str, Tensor],
           witnessed: dict[str, Tensor] | None = None) -> None:
    bad = _nonfinite(tensors, witnessed)
    if distributed.any_rank(bool(bad)):  # every rank stops, not only the one that saw it
        kept = (f"the last good checkpoint (step {last_checkpoint}) is intact at {checkpoint}"
                if last_checkpoint is not None else "no checkpoint had been written")
        raise FloatingPointError(f"step {step}: non-finite {', '.join(bad) or 'values on another rank'}; training stopped, and {kept}")


def claim_out_dir(cfg: TrainConfig) -> Path:
    """Claim what `train` writes in ``cfg.out_dir`` (see `writesae.outputs`); a caller may do it before
    the slow setup, and `train` does it again before the first step. An ``sae`` that the final save
    would refuse to replace (anything but an SAE folder) is refused here, before any work."""
    out = claim_outputs(cfg.out_dir, [*OUTPUTS, *(["wandb"] if cfg.wandb_project else [])])
    if os.path.lexists(out / "sae") and not _is_sae_folder(out / "sae"):
        raise FileExistsError(f"{out / 'sae'} exists and is not an SAE folder (only {CFG_FILE} and {WEIGHTS_FILE}); "
                              f"nothing was changed: move it away or choose another output folder")
    return out


def train(sae: SAEBase, store: SampleSource, cfg: TrainConfig | None = None, **config) -> TrainResult:
    """Train ``sae`` in place on ``store``'s training stream (see the module docstring)."""
    if cfg is None:
        cfg = TrainConfig(**config)
    elif config:
        raise TypeError(f"pass either a TrainConfig or its keywords, not both (got {sorted(config)})")
    if sae.cfg.site is None:  # an SAE made without a site reads the samples' site
        sae.cfg.site = store.cfg.site
    check_sae_fits(sae, source=store)
    lead, world = distributed.is_lead(), distributed.rank_and_world()[1]
    if world > 1:
        _check_distributed(sae, store, cfg, world)
    out = claim_out_dir(cfg) if lead else Path(cfg.out_dir)
    # one run at a time writes a folder: a second run on it stops here, naming the first
    with output_lock(out, "writesae train") if lead else contextlib.nullcontext(), freed_memory_kept():
        return _train_into(out, sae, store, cfg, lead, world)


def _train_into(out: Path, sae: SAEBase, store: SampleSource, cfg: TrainConfig, lead: bool, world: int) -> TrainResult:
    """`train` once ``out`` is claimed and locked."""
    checkpoint, metrics_file = out / "checkpoint", out / "metrics.jsonl"
    recovered = recover_folder(checkpoint, _checkpoint_step) if lead else None
    for left in leftovers(out / "sae") if lead else []:  # a kill while the final SAE was saved: it is saved again at the end
        shutil.rmtree(left)
    distributed.barrier()  # the other ranks read the checkpoint rank 0 has recovered
    if recovered is not None:
        warnings.warn(f"{checkpoint} was being replaced when a run was killed; restored the newest complete "
                      f"checkpoint (step {_checkpoint_step(checkpoint)}) from {recovered.name}", stacklevel=2)
    device, dtype = sae.b_dec.device, sae.b_dec.dtype
    optimizer = make_optimizer(sae, cfg)
    since_fired = torch.zeros(sae.n_dicts, sae.cfg.n_features, dtype=torch.long, device=device)
    if cfg.resume and _checkpoint_step(checkpoint) is not None:
        start = _load_checkpoint(checkpoint, sae, optimizer, store, since_fired, cfg)
    else:
        start = 0
        torch.manual_seed(cfg.seed)
        if cfg.input_scale_samples:
            sae.cfg.input_scale = store.estimate_input_scale(cfg.input_scale_samples)
    if lead:
        _drop_records_after(metrics_file, start)  # those of a run that went on past its last checkpoint
    last_checkpoint = start if start else None
    run = _wandb_run(cfg) if lead else None
    train_record = heldout_record = diverged = None
    sae.train()
    bar = tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, disable=not cfg.progress or not lead)
    clock, samples = time.perf_counter(), 0
    try:
        for step in bar:
            x = distributed.rank_rows(store.next_batch(cfg.batch_size)).to(device, dtype)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss, terms, codes, residual = training_step(
                sae, optimizer, x, since_fired, cfg, functools.partial(_guard, step, checkpoint, last_checkpoint))
            samples += cfg.batch_size

            last = step == cfg.steps
            if cfg.log_every and (step % cfg.log_every == 0 or last):
                with torch.no_grad():
                    # means over the ranks' shares: exact for the loss terms and L0, FVU is the shares' mean
                    means = {"loss": loss, **{f"loss_{name}": t for name, t in terms.items()},
                             "l0": (codes != 0).sum(-1).double().mean(),
                             "fvu": torch.tensor(_batch_fvu(x, residual, sae.cfg.input_scale))}
                    means = dict(zip(means, (distributed.sum_over_ranks(torch.stack([v.double() for v in means.values()])) / world).tolist()))
                    train_record = {"step": step, "split": "train", **means, "lr": lr_at(step, cfg),
                                    "dead_fraction": (since_fired > cfg.dead_after_samples).double().mean().item(),
                                    "samples_per_s": samples / (time.perf_counter() - clock)}
                if lead:
                    _log(metrics_file, train_record, run)
                bar.set_postfix(loss=f"{train_record['loss']:.4g}", fvu=f"{train_record['fvu']:.3f}")
                clock, samples = time.perf_counter(), 0
            if lead and cfg.eval_every and (step % cfg.eval_every == 0 or last):
                heldout_record = {"step": step, "split": "heldout", **evaluate(sae, store, cfg)}
                _log(metrics_file, heldout_record, run)
                diverged = divergence(heldout_record)
                if diverged:
                    warnings.warn(f"step {step}: the SAE looks diverged: {diverged}", RuntimeWarning, stacklevel=2)
                elif last and (worse := worse_than_the_mean(heldout_record["fvu_per_head"], sae.cfg.head_indices)):
                    warnings.warn(f"step {step}: {worse}", RuntimeWarning, stacklevel=2)  # the saved SAE's, once
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or last):
                if lead:
                    _save_checkpoint(checkpoint, step, sae, optimizer, store, since_fired, cfg)
                distributed.barrier()  # no rank runs ahead of the checkpoint it would resume from
                last_checkpoint = step
    finally:
        bar.close()
        if run is not None:
            run.finish()
    if lead:
        final = copy.deepcopy(sae)
        if cfg.fold_input_scale and not (isinstance(sae, BilinearMatrixSAE) and sae.cfg.tied):
            final.fold_input_scale_()
        save_sae(final, out / "sae")
    distributed.barrier()
    return TrainResult(sae, max(start, cfg.steps), start, train_record, heldout_record, out, diverged)


def evaluate(sae: SAEBase, store: SampleSource, cfg: TrainConfig) -> dict:
    """Held-out FVU, L0 and dead fraction (means over heads, and FVU per head), in eval mode."""
    was_training = sae.training
    sae.eval()
    try:
        m = reconstruction_metrics(sae, store.heldout_batches(cfg.batch_size, cfg.eval_samples))
    finally:
        sae.train(was_training)
    mean = lambda values: sum(values) / len(values)
    return {"fvu": mean(m["fvu"]), "l0": mean(m["l0"]), "dead_fraction": mean(m["dead_fraction"]),
            "fvu_per_head": m["fvu"], "samples": m["samples"]}


def divergence(heldout: dict) -> str | None:
    """Why a held-out evaluation (of `evaluate`) shows a diverged SAE, or None when it does not."""
    if not heldout["fvu"] <= DIVERGED_FVU:
        return (f"held-out FVU {heldout['fvu']:.3g} (above {DIVERGED_FVU:g}; predicting the mean gives "
                f"{MEAN_PREDICTION_FVU:g}): lower the learning rate")
    if heldout["l0"] == 0:
        return "every held-out code is zero (L0 = 0): no feature fires"
    return None


def convergence(records: Iterable[dict]) -> dict:
    """Whether a run converged, from its metrics records (``metrics.jsonl``; the held-out ones are read):
    each head's held-out FVU at 4/5 of the last evaluated step and at that step, their relative change
    |FVU_end − FVU_4/5| / FVU_end, and whether every head's is below `CONVERGED_BELOW`."""
    by_step = {r["step"]: r["fvu_per_head"] for r in records if r["split"] == "heldout"}
    if not by_step:
        raise ValueError("convergence reads held-out evaluations, and the records have none")
    end = max(by_step)
    four_fifths = end * 4 // 5
    if four_fifths not in by_step:
        raise ValueError(f"convergence compares held-out FVU at 4/5 of training (step {four_fifths}) with the end (step "
                         f"{end}), but the run was evaluated at steps {sorted(by_step)}: evaluate every fifth of the steps")
    before, after = by_step[four_fifths], by_step[end]
    change = [abs(a - b) / a for a, b in zip(after, before)]
    return {"fvu_at_four_fifths": before, "fvu_at_end": after, "relative_change": change,
            "converged": max(change) < CONVERGED_BELOW}


def _check_distributed(sae: SAEBase, store: SampleSource, cfg: TrainConfig, world: int) -> None:
    """Data-parallel training reads a cache, splits the batch evenly, and every rank agrees on the run."""
    if isinstance(store, ActivationStore):
        raise ValueError(f"training on {world} ranks reads its samples from a cache (every rank would run the model "
                         f"for the whole batch otherwise): write one with `writesae cache` and train with --cache")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split evenly over {world} ranks")
    distributed.check_same_on_every_rank({"train_config": asdict(cfg), "sae": asdict(sae.cfg), "samples": store.fingerprint()},
                                         "training run")


def _log(file: Path, record: dict, run) -> None:
    """Append one record as one write, flushed and fsynced: a crash leaves at most a torn last line,
    which `_drop_records_after` drops on resume."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(errno.ENOSPC, f"{file}: only {written} of a record's {len(line)} bytes were written")
        os.fsync(fd)
    finally:
        os.close(fd)
    if run is not None:
        run.log({f"{record['split']}/{k}": v for k, v in record.items() if isinstance(v, float)}, step=record["step"])


def _drop_records_after(file: Path, step: int) -> None:
    """Keep the records up to ``step`` (rewritten atomically). A torn last line, a crash in the
    middle of an append, is dropped with a warning; a bad line anywhere else is refused by number."""
    if not file.exists():
        return
    text = file.read_text(errors="replace")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last record
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            record_step = record["step"]
        except (ValueError, KeyError, TypeError) as error:
            if number == len(lines) and not text.endswith("\n"):
                warnings.warn(f"{file}: dropped its last line, a record cut short when a run was killed "
                              f"({len(line)} characters: {line[:40]!r})", stacklevel=3)
                continue
            raise ValueError(f"{file}, line {number}: not a metrics record ({type(error).__name__}: {error}); "
                             f"move the file away to start a new one") from None
        if record_step <= step:
            keep.append(line)
    with atomic_file(file) as f:
        f.write("".join(line + "\n" for line in keep))


def _wandb_run(cfg: TrainConfig):
    if not cfg.wandb_project:
        return None
    import wandb  # optional: only when asked for

    return wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=cfg.out_dir)


# ---------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, step: int, sae: SAEBase, optimizer: torch.optim.Optimizer, store: SampleSource,
                     since_fired: Tensor, cfg: TrainConfig) -> None:
    """Write the checkpoint beside ``path``, then swap it in: a reader never sees half of one. A failed
    write (a full disk) is raised as one OSError naming the checkpoint; the previous one stays intact."""
    previous = _checkpoint_step(path)
    try:
        with atomic_folder(path) as tmp:
            save_sae(sae, tmp / "sae")
            opt = optimizer.state_dict()
            store_state = store.state_dict()
            tensors = {f"optimizer.{i}.{name}": t for i, state in opt["state"].items() for name, t in state.items()}
            tensors |= {f"store.{k}": v for k, v in store_state.items() if isinstance(v, Tensor)}
            tensors |= {"since_fired": since_fired, "torch_rng": torch.get_rng_state()}
            save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, tmp / "state.safetensors")
            index = {"step": step, "optimizer_param_groups": opt["param_groups"], "train_config": asdict(cfg),
                     "store": {k: v for k, v in store_state.items() if not isinstance(v, Tensor)}}
            (tmp / "state.json").write_text(json.dumps(index, indent=2) + "\n")
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as a SafetensorError
        why = " ".join(str(error).split()) or type(error).__name__
        kept = (f"the previous checkpoint (step {previous}) is intact at {path}" if previous is not None
                else "no checkpoint had been written")
        raise OSError(f"could not write the step-{step} checkpoint beside {path} ({why}); {kept}") from error


def _checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder (``state.json`` is written last), or None."""
    try:
        step = json.loads((folder / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = ("state.safetensors", "sae/cfg.json", "sae/sae_weights.safetensors")
    return step if isinstance(step, int) and all((folder / f).is_file() for f in files) else None


def _load_checkpoint(path: Path, sae: SAEBase, optimizer: torch.optim.Optimizer, store: SampleSource,
                     since_fired: Tensor, cfg: TrainConfig) -> int:
    """Restore everything `_save_checkpoint` wrote into the live objects; return the step."""
    index = json.loads((path / "state.json").read_text())
    saved = load_sae(path / "sae", device=sae.b_dec.device)
    now_cfg = json.loads(json.dumps(asdict(cfg)))  # as the checkpoint reads back
    # the settings the run continues with, the SAE's own config apart from its input scale (estimated by the first run)
    # (a checkpoint saved before SAEs recorded their model, without a fingerprint, is taken to be of this one)
    unrecorded = {} if saved.cfg.model_fingerprint is not None else {
        "model_fingerprint": sae.cfg.model_fingerprint, "model_name": saved.cfg.model_name or sae.cfg.model_name}
    before = {**{k: index["train_config"][k] for k in _TRAJECTORY},
              "sae": asdict(replace(saved.cfg, input_scale=1.0, **unrecorded))}
    now = {**{k: now_cfg[k] for k in _TRAJECTORY}, "sae": asdict(replace(sae.cfg, input_scale=1.0))}
    changed = differences(before, now, "the checkpoint has", "this run")
    if changed:
        raise ValueError(f"cannot resume from {path}: {'; '.join(changed)} (use another out_dir (--out), or resume=False)")
    sae.cfg.input_scale = saved.cfg.input_scale
    sae.load_state_dict(saved.state_dict())
    tensors = {k: t.clone() for k, t in load_file(path / "state.safetensors").items()}  # fresh, aligned storage
    state: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            i, name = key.removeprefix("optimizer.").split(".", 1)
            state.setdefault(int(i), {})[name] = t
    groups = [{**g, "betas": tuple(g["betas"])} for g in index["optimizer_param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    store.load_state_dict({**index["store"], **{k.removeprefix("store."): t for k, t in tensors.items() if k.startswith("store.")}})
    since_fired.copy_(tensors["since_fired"])
    torch.set_rng_state(tensors["torch_rng"])
    return index["step"]
