"""The atom substitution test (docs/design.md §15): does an SAE atom stand in for the write it explains?

Terms, exactly as the code uses them:

- **Firing.** (sequence, position t, head h, feature i, code a_i): feature i is the largest code of
  head h's dictionary at position t, and a_i > 0 (`find_firings`). For a write SAE (the primary
  dictionary) the coded matrix is head h's write k̂_t δ_tᵀ at t (through ``encode_factors``), so a
  firing is a feature active in that write; for a state SAE it is S_t. One firing per (t, h) at most.
- **Native write** (``NATIVE_WRITES``): ``"k_delta"``, k̂_t δ_tᵀ = S_t − α_t S_{t−1}, the whole change
  the write makes (ours; the write SAE's input), or ``"beta_k_v"``, β_t k̂_t v_tᵀ, the paper's
  insertion alone.
- **Substitution.** Head h's native write at t is removed and a matrix M put in its place:
  S_t = α_t S_{t−1} + M (``"k_delta"``), or S_t = α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + M (``"beta_k_v"``,
  the erase kept). `install_matrix` does it through the model's write and state hooks (δ_t edited at
  t, M added to S_t at t), so the edit is carried: every later δ, state, read and logit follows the
  delta rule from the edited state. It equals the sequential recurrence with S_t set by hand
  (tests/test_substitution.py).

Conditions (``CONDITIONS``), with s = ``cfg.input_scale``, n = ‖native write‖_F and c = ‖a_i atom_i / s‖_F
(the atom's own norm):

- ``native``: M = the native write itself, an identity edit. It re-runs the firing with nothing
  changed (through the same edit path, batch shape and sequence cut), so its KL is the numerical
  noise floor of every comparison;
- ``delete``: M = 0, the write removed;
- ``atom`` / ``atom_native_norm``: M = a_i atom_i / s (the SAE's decode of that one code: no b_dec,
  no error term; the test asks what the feature alone carries), and the same matrix at norm n;
- ``other_atom`` / ``other_atom_native_norm``: another atom j ≠ i of the same dictionary (drawn
  uniformly, seeded) with the same code, a_i atom_j / s rescaled to norm c, and at norm n;
- ``rank1_atom_norm`` / ``rank1_native_norm``: the native write's own best rank-1 approximation
  σ₁ u₁ v₁ᵀ (its top singular pair), at norm c and at norm n. Both native writes are rank 1, so this
  is the native write's direction: at n it reproduces the write (a second identity edit), at c it is
  the write's direction at the atom's norm, which separates the atom's direction from its norm;
- ``random_atom_norm`` / ``random_native_norm``: u wᵀ with u ~ N(0, I_{d_k}), w ~ N(0, I_{d_v}) drawn
  per firing, at norm c and at norm n.

Scores: KL(p_clean ‖ p_condition) per position (`kl_from_clean`), at the next token (``kl_next``, the
prediction made at t) and summed over a horizon of H positions t … t + H − 1 (``kl_sum``), cut at the
end of the text (``positions_scored``); H may be given per head (the demo takes each head's half-life).

Summary (`summarize`), over the firings where deletion matters: those whose KL_delete exceeds
``NOISE_FACTOR`` × the largest |KL_native| of their head (`deletion_thresholds`). Per condition c the
paired effect size 1 − KL_c / KL_delete (1: c restores the clean prediction, 0: no better than
deleting, < 0: worse than deleting), as the median over firings and pooled (1 − Σ KL_c / Σ KL_delete),
each with a bootstrap interval over passages; and win rates (KL_a < KL_b).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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

CONDITIONS = ("native", "delete", "atom", "atom_native_norm", "other_atom", "other_atom_native_norm",
              "rank1_atom_norm", "rank1_native_norm", "random_atom_norm", "random_native_norm")
#: the conditions that put a matrix in the write's place, each scored against deletion by its effect size
REPLACEMENTS = CONDITIONS[2:]
NATIVE_WRITES = ("k_delta", "beta_k_v")
METRICS = ("kl_next", "kl_sum")
#: A firing counts (deletion matters) when KL_delete > NOISE_FACTOR × the largest |KL_native| of its head: the
#: identity edit's KL is rounding alone, and at 10× it the rounding moves KL_c / KL_delete by about 10% at most.
NOISE_FACTOR = 10.0
#: What `summarize` reports: "a<b" wins when KL_a < KL_b, "a<b<c" when KL_a < KL_b < KL_c.
COMPARISONS = (
    "atom<delete", "atom_native_norm<delete",
    "atom<other_atom", "atom_native_norm<other_atom_native_norm",
    "atom<rank1_atom_norm",
    "atom<random_atom_norm", "atom_native_norm<random_native_norm",
    "atom<delete<random_atom_norm",
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
                   native: str = "k_delta", recurrence: str = "parallel") -> Float[Tensor, "batch pos d_vocab"]:
    """Logits [b, p, d_vocab] with head ``head``'s native write at ``position`` replaced by ``matrix``
    ([d_k, d_v], or [b, d_k, d_v] for one matrix per sequence), carried forward.

    The native write (module docstring) is removed through ``hook_write_value`` (δ_t ← 0 for
    ``"k_delta"``; δ_t ← δ_t − β_t v_t for ``"beta_k_v"``, which leaves the write's erase
    −β_t k̂_t k̂_tᵀ S̃) and M is added to S_t through ``hook_state`` (fired only at ``position``), for
    a matrix of any rank. For ``"k_delta"`` and M = v wᵀ this is forcing the write to (k̂, δ) = (v, w).
    ``recurrence`` is the model's (§8.6); with one edited position both give the same logits.
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
    return model.run_with_hooks(tokens, fwd_hooks=hooks, state_positions=[position], recurrence=recurrence)


def with_norm(matrix: Float[Tensor, "... d_k d_v"], norm: Tensor | float) -> Float[Tensor, "... d_k d_v"]:
    """``matrix`` rescaled to Frobenius norm ``norm`` (a zero matrix stays zero)."""
    size = matrix.norm()
    return matrix * (norm / size) if size > 0 else matrix


def best_rank1(matrix: Float[Tensor, "d_k d_v"]) -> Float[Tensor, "d_k d_v"]:
    """σ₁ u₁ v₁ᵀ, the best rank-1 approximation of ``matrix`` (Eckart–Young): its top singular pair."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (s[0] * torch.outer(u[:, 0], vh[0])).to(matrix.dtype)


def other_feature(n_features: int, feature: int, generator: torch.Generator) -> int:
    """A feature j ≠ ``feature`` drawn uniformly from the other n_features − 1 of the dictionary."""
    j = int(torch.randint(n_features - 1, (), generator=generator))
    return j + (j >= feature)


def condition_matrices(coded: Float[Tensor, "d_k d_v"], other: Float[Tensor, "d_k d_v"],
                       native_write: Float[Tensor, "d_k d_v"], random_direction: Float[Tensor, "d_k d_v"]
                       ) -> Float[Tensor, "conditions d_k d_v"]:
    """The matrices M of ``CONDITIONS``, in that order (module docstring): from the firing's decode
    ``coded`` = a_i atom_i / s, the other atom's ``other`` = a_i atom_j / s, the native write and a
    random rank-1 direction, at the atom's norm ‖coded‖ and at the native norm ‖native_write‖."""
    atom_norm, native_norm = coded.norm(), native_write.norm()
    rank1 = best_rank1(native_write)
    matrices = {
        "native": native_write,
        "delete": torch.zeros_like(coded),
        "atom": coded,
        "atom_native_norm": with_norm(coded, native_norm),
        "other_atom": with_norm(other, atom_norm),
        "other_atom_native_norm": with_norm(other, native_norm),
        "rank1_atom_norm": with_norm(rank1, atom_norm),
        "rank1_native_norm": with_norm(rank1, native_norm),
        "random_atom_norm": with_norm(random_direction, atom_norm),
        "random_native_norm": with_norm(random_direction, native_norm),
    }
    return torch.stack([matrices[c] for c in CONDITIONS])


@torch.no_grad()
def substitution_test(model, sae, tokens: Int[Tensor, "batch pos"], firings: Iterable[Firing],
                      horizon: int | Mapping[int, int] = 8, seed: int = 0, native: str = "k_delta") -> list[dict]:
    """One record per firing, with the conditions of the module docstring run as one batch.

    ``native`` ("k_delta" or "beta_k_v") is the native write removed and whose norm scales the
    native-norm conditions. ``horizon``: H, or a mapping head -> H. KLs against the clean run, per condition:

    - ``kl_next``: at position t, i.e. the prediction of token t + 1 right after the edit;
    - ``kl_sum``: summed over positions t … t + H − 1, cut at the end of the sequence
      (``positions_scored`` says how many were used).

    Records also hold ``horizon``, ``native_norm``, ``atom_norm`` (‖a_i atom_i / s‖_F) and
    ``other_feature`` (j). Per firing, in firing order, one generator seeded with ``seed`` draws u, then
    w, then j, the same for both native definitions, so a rerun with the same firings gives the same records.
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
        span = horizon[h] if isinstance(horizon, Mapping) else horizon
        if span < 1:
            raise ValueError(f"the horizon of head {h} must be at least 1 position, got {span}")
        dictionary = atoms[sae.cfg.dictionary(h)]
        u = torch.randn(atoms.shape[-2], generator=generator)
        w = torch.randn(atoms.shape[-1], generator=generator)
        j = other_feature(dictionary.shape[0], f.feature, generator)
        scale = f.coefficient / sae.cfg.input_scale
        native_write = writes[f.sequence, t, h]
        matrices = condition_matrices(dictionary[f.feature] * scale, dictionary[j] * scale, native_write,
                                      torch.outer(u, w))
        end = t + span  # the model is causal: positions after the horizon need not run
        sequence = tokens[f.sequence, :end].repeat(len(CONDITIONS), 1)
        kl = kl_from_clean(clean[f.sequence, :end], install_matrix(model, sequence, layer, h, t, matrices, native))
        window = kl[:, t:end]
        records.append({
            **asdict(f),
            "native": native,
            "horizon": span,
            "other_feature": j,
            "native_norm": float(native_write.norm()),
            "atom_norm": float(matrices[CONDITIONS.index("atom")].norm()),
            "positions_scored": window.shape[1],
            "kl_next": dict(zip(CONDITIONS, kl[:, t].tolist())),
            "kl_sum": dict(zip(CONDITIONS, window.sum(1).tolist())),
        })
    return records


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"the metric is one of {METRICS}, got {metric!r}")


def deletion_thresholds(records: list[dict], metric: str, factor: float = NOISE_FACTOR) -> dict[int, float]:
    """Per head of ``records``: ``factor`` × the largest |KL_native| (the identity edit's KL, the noise
    floor) over that head's records, scored by ``metric``. A head's threshold comes from its own
    firings because the noise grows with the horizon summed."""
    _check_metric(metric)
    noise: dict[int, float] = {}
    for r in records:
        noise[r["head"]] = max(noise.get(r["head"], 0.0), abs(r[metric]["native"]))
    return {h: factor * n for h, n in sorted(noise.items())}


def deletion_matters(records: list[dict], metric: str, thresholds: Mapping[int, float]) -> np.ndarray:
    """Which records' KL_delete exceeds their head's threshold (`deletion_thresholds`)."""
    return np.array([r[metric]["delete"] > thresholds[r["head"]] for r in records], dtype=bool)


def effect_sizes(records: list[dict], condition: str, metric: str) -> np.ndarray:
    """1 − KL_condition / KL_delete, firing by firing: the share of deletion's damage the condition undoes."""
    kl = np.array([r[metric][condition] for r in records])
    deleted = np.array([r[metric]["delete"] for r in records])
    return 1 - kl / deleted


def summarize(records: list[dict], metric: str = "kl_next", comparisons: Sequence[str] = COMPARISONS,
              factor: float = NOISE_FACTOR, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Effect sizes, win rates and median KLs over the ``records`` (from `substitution_test`) where
    deletion matters, scored by ``metric`` ("kl_next" or "kl_sum").

    - ``thresholds`` / ``noise``: per head, the threshold on KL_delete (`deletion_thresholds`, with
      ``factor``) and the largest |KL_native|; ``n`` records, ``n_kept`` above the threshold;
    - ``effect[c]`` for each of ``REPLACEMENTS``: ``median`` (the median over firings of
      1 − KL_c / KL_delete) and ``pooled`` (1 − Σ KL_c / Σ KL_delete), each (value, low, high) with a
      bootstrap over passages (the sequence: the firings of one passage share its text);
    - ``rates[c]`` for each comparison c ("a<b": KL_a < KL_b; "a<b<c": both): ``wins``, ``n``,
      ``rate``, the Wilson interval (records taken as independent), and bootstrap intervals clustered by
      passage and by feature (a (head, feature) pair: each head has its own dictionary);
    - ``rates_all_firings[c]``: ``wins``, ``n``, ``rate`` over every record, the threshold not applied;
    - ``median_kl[c]``: (median, low, high) for every condition, bootstrap over passages.

    ``n_features`` and ``n_passages`` count the kept records' clusters: a bootstrap over fewer than ~30
    clusters gives intervals that are too narrow.
    """
    _check_metric(metric)
    if not records:
        raise ValueError("no records to summarize")
    thresholds = deletion_thresholds(records, metric, factor)
    matters = deletion_matters(records, metric, thresholds)
    kept = [r for r, m in zip(records, matters) if m]
    if not kept:
        raise ValueError(f"deletion matters ({metric} of delete above {factor} × the noise floor) at none of the "
                         f"{len(records)} firings: there is nothing to substitute for")
    kl = {c: np.array([r[metric][c] for r in kept]) for c in CONDITIONS}
    features = [(r["head"], r["feature"]) for r in kept]
    feature_ids = np.unique(features, axis=0, return_inverse=True)[1].ravel()
    passages = np.array([r["sequence"] for r in kept])
    boot = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)

    def wins(values: dict[str, np.ndarray], comparison: str) -> np.ndarray:
        chain = comparison.split("<")
        unknown = [c for c in chain if c not in CONDITIONS]
        if len(chain) < 2 or unknown:
            raise ValueError(f"a comparison is 'a<b' or 'a<b<c' of the conditions {CONDITIONS}, got {comparison!r}")
        return np.logical_and.reduce([values[a] < values[b] for a, b in zip(chain, chain[1:])])

    def rate(hits: np.ndarray) -> dict:
        n_wins, n = int(hits.sum()), len(hits)
        return {
            "wins": n_wins, "n": n, "rate": n_wins / n,
            "wilson": wilson_interval(n_wins, n, confidence),
            "bootstrap_by_feature": clustered_bootstrap(hits, feature_ids, **boot)[1:],
            "bootstrap_by_passage": clustered_bootstrap(hits, passages, **boot)[1:],
        }

    def effect(condition: str) -> dict:
        pooled = lambda rows: 1 - kl[condition][rows.astype(int)].sum() / kl["delete"][rows.astype(int)].sum()
        return {"median": clustered_bootstrap(effect_sizes(kept, condition, metric), passages, statistic=np.median,
                                              **boot),
                "pooled": clustered_bootstrap(np.arange(len(kept)), passages, statistic=pooled, **boot)}

    every = {c: np.array([r[metric][c] for r in records]) for c in CONDITIONS}
    all_firings = {}
    for c in comparisons:
        hits = wins(every, c)
        all_firings[c] = {"wins": int(hits.sum()), "n": len(hits), "rate": float(hits.mean())}
    noise = deletion_thresholds(records, metric, factor=1.0)
    return {"n": len(records), "n_kept": len(kept), "n_features": int(feature_ids.max()) + 1,
            "n_passages": len(set(passages.tolist())), "metric": metric, "noise_factor": factor,
            "noise": noise, "thresholds": thresholds,
            "effect": {c: effect(c) for c in REPLACEMENTS},
            "rates": {c: rate(wins(kl, c)) for c in comparisons},
            "rates_all_firings": all_firings,
            "median_kl": {c: clustered_bootstrap(kl[c], passages, statistic=np.median, **boot) for c in CONDITIONS}}
