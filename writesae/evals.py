"""Held-out evaluation of an SAE on a matrix site: reconstruction per head, and what splicing it costs the model.

- `reconstruction_metrics`: FVU = Σ‖X − X̂‖²_F / Σ‖X − X̄‖²_F (X̄ the held-out mean), L0, and the
  fractions of dead (never active on the held-out set) and dense (active on more than
  ``dense_above`` of samples) features, per head.
- `downstream_metrics`: next-token CE and KL(p_clean ‖ p_spliced) with the SAE spliced in, in the
  loop (every position, ``recurrence="sequential"``) or at single positions (one position per
  sequence, the rest carried), and the CE loss recovered against zero-ablating the site where
  the SAE is spliced (`writesae.splice.zero_ablation_hooks`):
  (CE_zero − CE_spliced) / (CE_zero − CE_clean), 1 when splicing costs nothing. The clean and
  zero-ablated runs depend only on the site, heads, tokens and mode: `downstream_references` computes
  them once for many SAEs (a comparison of architectures on the same heads).
- `worse_than_the_mean`: the warning for a head whose FVU is above 1, and why that can happen;
  `metrics_table`: both kinds of metrics as text.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from .sae import SAEBase
from .splice import zero_ablation_hooks

#: The FVU of predicting the held-out mean for every sample; an SAE above it reconstructs worse than that constant.
MEAN_PREDICTION_FVU = 1.0


def worse_than_the_mean(fvu: list[float], heads: list[int]) -> str | None:
    """Why held-out FVUs above `MEAN_PREDICTION_FVU` matter (per model head, as `reconstruction_metrics`
    gives them for ``heads``), or None when no head is above it."""
    above = [f"head {head} ({value:.3g})" for head, value in zip(heads, fvu) if not value <= MEAN_PREDICTION_FVU]
    if not above:
        return None
    return (f"held-out FVU above {MEAN_PREDICTION_FVU:g} for {', '.join(above)}: there the SAE reconstructs worse "
            f"than predicting the held-out mean would. This happens when the held-out text differs from the training "
            f"text (a distribution shift: the SAE learnt the training samples' mean and spread, and the held-out "
            f"mean lies elsewhere), or when the SAE is undertrained")


@torch.no_grad()
def reconstruction_metrics(sae: SAEBase, batches: Iterable[Float[Tensor, "batch n_dicts d_k d_v"]],
                           dense_above: float = 0.1) -> dict[str, list[float]]:
    """Per-head FVU, L0, dead and dense fractions over held-out batches X."""
    sums = None
    for x in batches:
        x = x.to(sae.b_dec)
        codes = sae.encode(x)
        flat = x.flatten(-2).double()
        batch = {
            "sq_error": (x - sae.decode(codes)).double().pow(2).sum((0, 2, 3)),
            "x": flat.sum(0),
            "x_sq": flat.pow(2).sum((0, 2)),
            "active": (codes != 0).double().sum(0),
            "n": x.shape[0],
        }
        sums = batch if sums is None else {key: sums[key] + value for key, value in batch.items()}
    if sums is None:
        raise ValueError("reconstruction_metrics got no batches")
    n = sums["n"]
    variance = sums["x_sq"] - sums["x"].pow(2).sum(-1) / n  # Σ‖X − X̄‖² = Σ‖X‖² − n‖X̄‖²
    frequency = sums["active"] / n
    return {
        "fvu": (sums["sq_error"] / variance).tolist(),
        "l0": frequency.sum(-1).tolist(),
        "dead_fraction": (frequency == 0).double().mean(-1).tolist(),
        "dense_fraction": (frequency > dense_above).double().mean(-1).tolist(),
        "samples": n,
    }


def _ce_and_kl(logits: Tensor, clean_log_probs: Tensor, tokens: Tensor, from_position: Tensor) -> tuple[Tensor, Tensor]:
    """Mean next-token CE and KL(p_clean ‖ p) over positions ≥ from_position (per sequence)."""
    log_probs = logits[:, :-1].float().log_softmax(-1)
    ce = F.nll_loss(log_probs.transpose(1, 2), tokens[:, 1:], reduction="none")
    kl = (clean_log_probs.exp() * (clean_log_probs - log_probs)).sum(-1)
    keep = (torch.arange(ce.shape[1]) >= from_position[:, None]).to(ce)
    return (ce * keep).sum() / keep.sum(), (kl * keep).sum() / keep.sum()


def _runs(model, tokens: Tensor, mode: str, seed: int) -> tuple[Tensor, list[tuple[slice, dict]]]:
    """The first scored position of each sequence, and the (rows, forward keywords) of each spliced run."""
    if mode not in ("loop", "single"):
        raise ValueError(f"mode must be 'loop' or 'single', got {mode!r}")
    b, T = tokens.shape
    if mode == "loop":
        return torch.zeros(b, dtype=torch.long), [(slice(None), dict(recurrence="sequential"))]
    starts = torch.randint(1, T - 1, (b,), generator=torch.Generator().manual_seed(seed))
    return starts, [(slice(i, i + 1), dict(state_positions=[int(t)])) for i, t in enumerate(starts)]


@torch.no_grad()
def downstream_references(model, sae: SAEBase, tokens: Int[Tensor, "batch pos"], mode: str = "loop",
                          seed: int = 0) -> dict:
    """What `downstream_metrics` compares a splice of ``sae`` against: the clean logits and those with
    the site zero-ablated on the SAE's heads where the splice acts. They hold for every SAE on the same
    site and heads, with the same tokens, mode and seed."""
    _, runs = _runs(model, tokens, mode, seed)
    zero = zero_ablation_hooks(model, sae)
    return {
        "site": sae.cfg.site, "heads": sae.cfg.head_indices, "mode": mode, "seed": seed, "tokens": tokens,
        "clean": model(tokens),
        "zero_ablated": torch.cat([model.run_with_hooks(tokens[rows], fwd_hooks=zero, **kw) for rows, kw in runs]),
    }


@torch.no_grad()
def downstream_metrics(model, sae: SAEBase, tokens: Int[Tensor, "batch pos"], mode: str = "loop",
                       seed: int = 0, references: dict | None = None) -> dict[str, float]:
    """CE and KL to the clean model with ``sae`` spliced into ``model`` (a `HookedSAEGatedDeltaNet`).

    ``mode="loop"``: the SAE at every position, in the loop (sequential recurrence); scores cover
    every position. ``mode="single"``: one random position t per sequence (seeded), the rest
    carried; scores cover positions t onwards. The zero ablation acts exactly where the splice acts.
    ``references``: `downstream_references` of an SAE on the same site and heads for the same
    tokens, mode and seed (computed here when None).
    """
    starts, runs = _runs(model, tokens, mode, seed)
    if references is None:
        references = downstream_references(model, sae, tokens, mode, seed)
    else:
        wanted = {"site": sae.cfg.site, "heads": sae.cfg.head_indices, "mode": mode, "seed": seed}
        differ = [f"{key} {references[key]!r}, not {value!r}" for key, value in wanted.items() if references[key] != value]
        if differ or not torch.equal(references["tokens"], tokens):
            raise ValueError(f"the references were computed for another splice: {'; '.join(differ) or 'other tokens'}")
    clean = references["clean"]
    clean_log_probs = clean[:, :-1].float().log_softmax(-1)
    spliced = torch.cat([model.run_with_saes(tokens[rows], saes=[sae], **kw) for rows, kw in runs])
    ce_clean, _ = _ce_and_kl(clean, clean_log_probs, tokens, starts)
    ce_spliced, kl_spliced = _ce_and_kl(spliced, clean_log_probs, tokens, starts)
    ce_zero, kl_zero = _ce_and_kl(references["zero_ablated"], clean_log_probs, tokens, starts)
    return {
        "ce_clean": ce_clean.item(),
        "ce_spliced": ce_spliced.item(),
        "ce_zero_ablated": ce_zero.item(),
        "kl_spliced": kl_spliced.item(),
        "kl_zero_ablated": kl_zero.item(),
        "ce_loss_recovered": ((ce_zero - ce_spliced) / (ce_zero - ce_clean)).item(),
    }


def metrics_table(reconstruction: dict, downstream: dict, heads: list[int], mode: str) -> str:
    """`reconstruction_metrics` (of model ``heads``) and `downstream_metrics` (in ``mode``) as text tables."""
    r, d = reconstruction, downstream
    lines = [f"held-out reconstruction, {r['samples']} samples", "head    FVU     L0   dead  dense",
             "----  -----  -----  -----  -----"]
    for h, head in enumerate(heads):
        lines.append(f"{head:>4}  {r['fvu'][h]:5.3g}  {r['l0'][h]:5.1f}  {r['dead_fraction'][h]:5.3f}  {r['dense_fraction'][h]:5.3f}")
    where = "in the loop, at every position" if mode == "loop" else "at one position per context"
    lines += ["", f"next-token loss with the SAE spliced {where}",
              "              CE (nats/token)  KL from clean", "------------  ---------------  -------------",
              f"clean         {d['ce_clean']:15.4f}",
              f"spliced       {d['ce_spliced']:15.4f}  {d['kl_spliced']:13.4f}",
              f"zero-ablated  {d['ce_zero_ablated']:15.4f}  {d['kl_zero_ablated']:13.4f}",
              f"CE loss recovered: {d['ce_loss_recovered']:.3f} (1: splicing costs nothing; 0: as bad as zero-ablating)"]
    return "\n".join(lines)
