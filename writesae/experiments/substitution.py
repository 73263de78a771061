"""The atom substitution test (docs/design.md §15): does an SAE atom stand in for the write it explains?

At a firing (sequence, position t, head h, feature i with top code a_i) the native write of head h
is removed and a matrix M put in its place, and the model continues from that state (the edit is
carried to every later position). Two definitions of the native write (``NATIVE_WRITES``):

- ``"k_delta"``: k̂_t δ_tᵀ, the whole change the write makes, S_t − α_t S_{t−1} (ours; its erase
  −α_t β_t k̂_t k̂_tᵀ S_{t−1} included). Replacing it: S_t = α_t S_{t−1} + M.
- ``"beta_k_v"``: β_t k̂_t v_tᵀ, the paper's write, the insertion alone. Replacing it keeps the erase:
  S_t = α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + M.

Conditions (``CONDITIONS``), none favoured, with s = ``cfg.input_scale``:

- ``atom``: M = a_i · atom_i / s, the SAE's decode of that single code; neither b_dec nor the SAE's
  error X − X̂ is added back: the test asks what the feature alone does;
- ``atom_native_norm``: the same direction at the native write's norm;
- ``delete``: M = 0;
- ``random_atom_norm`` / ``random_native_norm``: one random rank-1 u wᵀ (u ~ N(0, I_{d_k}),
  w ~ N(0, I_{d_v}), drawn per firing) at the atom's own norm ‖a_i atom_i / s‖_F, and at the native
  write's norm: the control for each scaling of the atom.

Each is scored by KL(p_clean ‖ p_condition) (see `kl_from_clean`), at the next token and summed over
a horizon. An atom "wins" against a condition when its KL is lower.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_gdn.sites import edit_at_positions, gdn_hook_name

from ..site_fit import check_layer_heads, check_sae_fits
from .edits import check_positions, kl_from_clean
from .features import site_codes
from .stats import clustered_bootstrap, wilson_interval

CONDITIONS = ("atom", "atom_native_norm", "delete", "random_atom_norm", "random_native_norm")
NATIVE_WRITES = ("k_delta", "beta_k_v")
#: What `summarize` reports: "a<b" wins when KL_a < KL_b, "a<b<c" when KL_a < KL_b < KL_c.
COMPARISONS = (
    "atom<delete", "atom_native_norm<delete",
    "atom<random_atom_norm", "atom_native_norm<random_native_norm",
    "atom<delete<random_atom_norm", "atom_native_norm<delete<random_native_norm",
)
_WRITE_SITES = ("hook_write_key", "hook_write_value", "hook_beta", "hook_v")


@dataclass(frozen=True)
class Firing:
    """Feature ``feature`` is the top code of head ``head`` (a model head index) at ``position``
    of sequence ``sequence``, with code ``coefficient``."""

    sequence: int
    position: int
    head: int
    feature: int
    coefficient: float


def _check_native(native: str) -> None:
    if native not in NATIVE_WRITES:
        raise ValueError(f"the native write is one of {NATIVE_WRITES} (k̂δᵀ or the paper's βk̂vᵀ), got {native!r}")


def native_writes(cache, layer: int, native: str) -> Float[Tensor, "batch pos H_v d_k d_v"]:
    """Every head's native write at every position, k̂_t δ_tᵀ (``"k_delta"``) or β_t k̂_t v_tᵀ
    (``"beta_k_v"``), from a clean cache of the layer's ``hook_write_key``, ``hook_write_value``,
    ``hook_beta`` and ``hook_v``."""
    _check_native(native)
    k_hat, delta, beta, v = (cache[gdn_hook_name(layer, name)].float() for name in _WRITE_SITES)
    value = delta if native == "k_delta" else beta[..., None] * v
    return k_hat[..., :, None] * value[..., None, :]


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
                   matrix: Float[Tensor, "d_k d_v"] | Float[Tensor, "batch d_k d_v"],
                   native: str = "k_delta") -> Float[Tensor, "batch pos d_vocab"]:
    """Logits [b, p, d_vocab] with head ``head``'s native write at ``position`` replaced by ``matrix``
    ([d_k, d_v], or [b, d_k, d_v] for one matrix per sequence), carried forward.

    The native write (module docstring) is removed through ``hook_write_value`` (δ_t ← 0 for
    ``"k_delta"``; δ_t ← δ_t − β_t v_t for ``"beta_k_v"``, which leaves the write's erase
    −β_t k̂_t k̂_tᵀ S̃) and M is added to S_t through ``hook_state`` (fired only at ``position``), for
    a matrix of any rank. For ``"k_delta"`` and M = v wᵀ this is forcing the write to (k̂, δ) = (v, w).
    """
    _check_native(native)
    check_layer_heads(model, layer, [head])
    (position,) = check_positions(position, tokens.shape[-1])
    inputs = {}  # β and v of this forward: they are computed before the write, in every recurrence mode

    def keep(name):
        def hook(x: Tensor, hook) -> None:
            inputs[name] = x[:, position, head]
        return hook

    def remove(delta_rows: Tensor, t: int) -> Tensor:
        if native == "k_delta":
            delta_rows[:, head] = 0
        else:
            delta_rows[:, head] -= (inputs["hook_beta"][:, None] * inputs["hook_v"]).to(delta_rows)
        return delta_rows

    def add(state_rows: Tensor, t: int) -> Tensor:
        state_rows[:, head] += matrix.to(state_rows)
        return state_rows

    hooks = [(gdn_hook_name(layer, "hook_write_value"), edit_at_positions(remove, position)),
             (gdn_hook_name(layer, "hook_state"), edit_at_positions(add, position))]
    if native == "beta_k_v":
        hooks = [(gdn_hook_name(layer, name), keep(name)) for name in ("hook_beta", "hook_v")] + hooks
    return model.run_with_hooks(tokens, fwd_hooks=hooks, state_positions=[position])


@torch.no_grad()
def substitution_test(model, sae, tokens: Int[Tensor, "batch pos"], firings: Iterable[Firing], horizon: int = 8,
                      seed: int = 0, native: str = "k_delta") -> list[dict]:
    """One record per firing, with the conditions of the module docstring run as one batch.

    ``native`` ("k_delta" or "beta_k_v") is the native write removed and whose norm scales the
    native-norm conditions. KLs against the clean run, per condition:

    - ``kl_next``: at position t, i.e. the prediction of token t + 1 right after the edit;
    - ``kl_sum`` / ``kl_mean``: summed / averaged over positions t … t + horizon − 1, cut at the end
      of the sequence (``positions_scored`` says how many were used).

    Records also hold ``native_norm`` and ``atom_norm`` (‖a_i atom_i / s‖_F). The random directions
    come from one generator seeded with ``seed`` and drawn in firing order, the same for both native
    definitions, so a rerun with the same firings gives the same records.
    """
    _check_native(native)
    layer = check_sae_fits(sae, model).layer
    atoms = sae.atoms().float()
    generator = torch.Generator().manual_seed(seed)
    clean, cache = model.run_with_cache(tokens, names_filter=[gdn_hook_name(layer, name) for name in _WRITE_SITES])
    writes = native_writes(cache, layer, native)
    records = []
    for f in firings:
        t, h = f.position, f.head
        if not 0 <= t < tokens.shape[1]:
            raise ValueError(f"firing position {t} is outside the text: it has {tokens.shape[1]} tokens")
        coded = atoms[sae.cfg.dictionary(h), f.feature] * f.coefficient / sae.cfg.input_scale
        native_norm, atom_norm = writes[f.sequence, t, h].norm(), coded.norm()
        u = torch.randn(atoms.shape[-2], generator=generator)
        w = torch.randn(atoms.shape[-1], generator=generator)
        random = torch.outer(u, w) / (u.norm() * w.norm())
        matrices = torch.stack([coded, coded * (native_norm / atom_norm), torch.zeros_like(coded),
                                random * atom_norm, random * native_norm])
        end = t + horizon  # the model is causal: positions after the horizon need not run
        sequence = tokens[f.sequence, :end].repeat(len(CONDITIONS), 1)
        kl = kl_from_clean(clean[f.sequence, :end], install_matrix(model, sequence, layer, h, t, matrices, native))
        window = kl[:, t:end]
        records.append({
            **asdict(f),
            "native": native,
            "native_norm": float(native_norm),
            "atom_norm": float(atom_norm),
            "positions_scored": window.shape[1],
            "kl_next": dict(zip(CONDITIONS, kl[:, t].tolist())),
            "kl_sum": dict(zip(CONDITIONS, window.sum(1).tolist())),
            "kl_mean": dict(zip(CONDITIONS, window.mean(1).tolist())),
        })
    return records


def summarize(records: list[dict], metric: str = "kl_next", comparisons: Sequence[str] = COMPARISONS,
              n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Win rates and median KLs over ``records`` (from `substitution_test`), scored by ``metric``
    ("kl_next", "kl_sum" or "kl_mean").

    ``rates[c]`` for each comparison c of ``comparisons`` ("a<b": KL_a < KL_b; "a<b<c": both
    inequalities) gives ``wins``, ``n``, ``rate``, the Wilson interval (records taken as
    independent), and cluster-bootstrap (low, high) intervals of the rate clustered by feature (a
    (head, feature) pair: each head has its own dictionary) and by passage (the sequence).
    ``median_kl[condition]`` is (median, low, high), the interval a bootstrap over passages.
    ``n_features`` and ``n_passages`` count the clusters: a bootstrap over fewer than ~30 clusters
    gives intervals that are too narrow.
    """
    if not records:
        raise ValueError("no records to summarize")
    kl = {c: np.array([r[metric][c] for r in records]) for c in CONDITIONS}
    features = [(r["head"], r["feature"]) for r in records]
    feature_ids = np.unique(features, axis=0, return_inverse=True)[1].ravel()
    passages = np.array([r["sequence"] for r in records])
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)

    def wins(comparison: str) -> np.ndarray:
        chain = comparison.split("<")
        unknown = [c for c in chain if c not in CONDITIONS]
        if len(chain) < 2 or unknown:
            raise ValueError(f"a comparison is 'a<b' or 'a<b<c' of the conditions {CONDITIONS}, got {comparison!r}")
        return np.logical_and.reduce([kl[a] < kl[b] for a, b in zip(chain, chain[1:])])

    def rate(hits: np.ndarray) -> dict:
        n_wins, n = int(hits.sum()), len(hits)
        return {
            "wins": n_wins, "n": n, "rate": n_wins / n,
            "wilson": wilson_interval(n_wins, n, confidence),
            "bootstrap_by_feature": clustered_bootstrap(hits, feature_ids, **boot)[1:],
            "bootstrap_by_passage": clustered_bootstrap(hits, passages, **boot)[1:],
        }

    return {"n": len(records), "n_features": int(feature_ids.max()) + 1, "n_passages": len(set(passages.tolist())),
            "metric": metric,
            "rates": {c: rate(wins(c)) for c in comparisons},
            "median_kl": {c: clustered_bootstrap(kl[c], passages, statistic=np.median, **boot) for c in CONDITIONS}}
