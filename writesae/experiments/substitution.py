"""The atom substitution test (DESIGN §5): does an SAE atom stand in for the write it explains?

At a firing (sequence, position t, head h, feature i with top code a_i) the native write k̂_t δ_tᵀ
of head h is removed and a matrix M is put in its place, S_t = α_t S_{t−1} + M, and the model
continues from that state (the edit is carried to every later position). Conditions:

- ``atom``: M = a_i · atom_i / s, the SAE's decode of that single code (s = ``cfg.input_scale``);
  neither b_dec nor the SAE's error X − X̂ is added back: the test asks what the feature alone does;
- ``atom_norm_matched``: the same direction rescaled to the native write's norm, ‖M‖_F = ‖k̂_t δ_tᵀ‖_F;
- ``delete``: M = 0;
- ``random``: M = u wᵀ, u ~ N(0, I_{d_k}), w ~ N(0, I_{d_v}), rescaled to ‖k̂_t δ_tᵀ‖_F.

Each is scored by KL(p_clean ‖ p_condition) (see `kl_from_clean`). The atom "wins" when its KL is
below the deletion's: it carries what the write carried, better than nothing at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_gdn.sites import edit_at_positions, gdn_hook_name, parse_site

from .edits import kl_from_clean
from .features import site_codes
from .stats import clustered_bootstrap, wilson_interval

CONDITIONS = ("atom", "atom_norm_matched", "delete", "random")


@dataclass(frozen=True)
class Firing:
    """Feature ``feature`` is the top code of head ``head`` (a model head index) at ``position``
    of sequence ``sequence``, with code ``coefficient``."""

    sequence: int
    position: int
    head: int
    feature: int
    coefficient: float


def _writes(model, tokens: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """Clean logits, k̂ [b, p, H_v, d_k] and δ [b, p, H_v, d_v] of ``layer``."""
    key, value = gdn_hook_name(layer, "hook_write_key"), gdn_hook_name(layer, "hook_write_value")
    logits, cache = model.run_with_cache(tokens, names_filter=[key, value])
    return logits, cache[key], cache[value]


@torch.no_grad()
def find_firings(model, sae, tokens: Int[Tensor, "batch pos"], min_activation: float = 0.0,
                 features: Iterable[int] | None = None) -> list[Firing]:
    """Every (sequence, position, head) whose top code exceeds ``min_activation``, as a `Firing`.

    A state SAE codes S_t; a write SAE codes k̂_t δ_tᵀ through ``encode_factors``. ``features``
    (ids, on any head) keeps only firings whose top feature is one of them; a feature that is
    active but not the top code of its head and position is not a firing.
    """
    heads = sae.cfg.head_indices
    coefficient, top = site_codes(model, sae, tokens).max(-1)  # [b, p, n_dicts]
    keep = coefficient > min_activation
    if features is not None:
        keep &= torch.isin(top, torch.tensor(list(features), device=top.device))
    return [Firing(b, p, heads[d], int(top[b, p, d]), float(coefficient[b, p, d]))
            for b, p, d in keep.nonzero().tolist()]


@torch.no_grad()
def install_matrix(model, tokens: Int[Tensor, "batch pos"], layer: int, head: int, position: int,
                   matrix: Float[Tensor, "d_k d_v"] | Float[Tensor, "batch d_k d_v"]) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits [b, p, d_vocab] with head ``head``'s write at ``position`` replaced by ``matrix``
    ([d_k, d_v], or [b, d_k, d_v] for one matrix per sequence), carried forward.

    The write is deleted (δ_t = 0 through ``hook_write_value``) and M added to S_t through
    ``hook_state`` (fired only at ``position``), so S_t = α_t S_{t−1} + M for a matrix of any rank;
    for M = v wᵀ this is the same as forcing the write to (k̂, δ) = (v, w).
    """
    def delete(delta_rows: Tensor, t: int) -> Tensor:
        delta_rows[:, head] = 0
        return delta_rows

    def add(state_rows: Tensor, t: int) -> Tensor:
        state_rows[:, head] += matrix.to(state_rows)
        return state_rows

    hooks = [(gdn_hook_name(layer, "hook_write_value"), edit_at_positions(delete, position)),
             (gdn_hook_name(layer, "hook_state"), edit_at_positions(add, position))]
    return model.run_with_hooks(tokens, fwd_hooks=hooks, state_positions=[position])


@torch.no_grad()
def substitution_test(model, sae, tokens: Int[Tensor, "batch pos"], firings: Iterable[Firing], horizon: int = 8,
                      seed: int = 0) -> list[dict]:
    """One record per firing, with the four conditions of the module docstring run as one batch.

    The native write is k̂_t δ_tᵀ of the firing's head (‖k̂_t δ_tᵀ‖_F = ‖k̂_t‖‖δ_t‖). KLs against the
    clean run, per condition:

    - ``kl_next``: at position t, i.e. the prediction of token t + 1 right after the edit;
    - ``kl_sum`` / ``kl_mean``: summed / averaged over positions t … t + horizon − 1, cut at the end
      of the sequence (``positions_scored`` says how many were used).

    The random directions come from one generator seeded with ``seed`` and drawn in firing order,
    so a rerun with the same firings gives the same records.
    """
    layer = parse_site(sae.cfg.site).layer
    atoms = sae.atoms().float()
    generator = torch.Generator().manual_seed(seed)
    clean, k_hat, delta = _writes(model, tokens, layer)
    records = []
    for f in firings:
        t, h = f.position, f.head
        native_norm = k_hat[f.sequence, t, h].norm() * delta[f.sequence, t, h].norm()
        coded = atoms[sae.cfg.dictionary(h), f.feature] * f.coefficient / sae.cfg.input_scale
        u = torch.randn(atoms.shape[-2], generator=generator)
        w = torch.randn(atoms.shape[-1], generator=generator)
        matrices = torch.stack([
            coded,
            coded * (native_norm / coded.norm()),
            torch.zeros_like(coded),
            torch.outer(u, w) * (native_norm / (u.norm() * w.norm())),
        ])
        sequence = tokens[f.sequence].repeat(len(CONDITIONS), 1)
        kl = kl_from_clean(clean[f.sequence], install_matrix(model, sequence, layer, h, t, matrices))
        window = kl[:, t : t + horizon]
        records.append({
            **asdict(f),
            "native_norm": float(native_norm),
            "positions_scored": window.shape[1],
            "kl_next": dict(zip(CONDITIONS, kl[:, t].tolist())),
            "kl_sum": dict(zip(CONDITIONS, window.sum(1).tolist())),
            "kl_mean": dict(zip(CONDITIONS, window.mean(1).tolist())),
        })
    return records


def summarize(records: list[dict], n_resamples: int = 2000, seed: int = 0, metric: str = "kl_next",
              atom: str = "atom", confidence: float = 0.95) -> dict:
    """Win rates over ``records`` (from `substitution_test`), scored by ``metric`` ("kl_next",
    "kl_sum" or "kl_mean") with the atom condition ``atom`` ("atom" or "atom_norm_matched"):

    - ``atom_beats_delete``: KL_atom < KL_delete;
    - ``strict_chain``: KL_atom < KL_delete < KL_random.

    Each gives ``wins``, ``n``, ``rate``, the Wilson interval (records taken as independent), and
    cluster-bootstrap (low, high) intervals of the rate clustered by feature (a (head, feature)
    pair: each head has its own dictionary) and by passage (the sequence). ``n_features`` and
    ``n_passages`` count the clusters: with a single cluster the bootstrap interval has zero width.
    """
    if not records:
        raise ValueError("no records to summarize")
    kl = {c: np.array([r[metric][c] for r in records]) for c in (atom, "delete", "random")}
    beats = kl[atom] < kl["delete"]
    chain = beats & (kl["delete"] < kl["random"])
    features = [(r["head"], r["feature"]) for r in records]
    feature_ids = np.unique(features, axis=0, return_inverse=True)[1].ravel()
    passages = np.array([r["sequence"] for r in records])

    def rate(hits: np.ndarray) -> dict:
        wins, n = int(hits.sum()), len(hits)
        boot = dict(statistic=np.mean, n_resamples=n_resamples, confidence=confidence, seed=seed)
        return {
            "wins": wins, "n": n, "rate": wins / n,
            "wilson": wilson_interval(wins, n, confidence),
            "bootstrap_by_feature": clustered_bootstrap(hits, feature_ids, **boot)[1:],
            "bootstrap_by_passage": clustered_bootstrap(hits, passages, **boot)[1:],
        }

    return {"n": len(records), "n_features": int(feature_ids.max()) + 1, "n_passages": len(set(passages.tolist())),
            "metric": metric, "atom_condition": atom,
            "atom_beats_delete": rate(beats), "strict_chain": rate(chain)}
