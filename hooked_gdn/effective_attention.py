"""Exact effective attention of a Gated DeltaNet head: its read o_t as a weighted sum over past positions.

The recurrence (docs/design.md §2, positions 0-based, S_init the state before position 0: zero, or a cached
prefix's) unrolls in two exact ways (docs/design.md §9):

- **over the writes** δ_j. S_t = α_t S_{t−1} + k̂_t δ_tᵀ, so with G_{j→t} = Π_{s=j+1..t} α_s

      o_t = Σ_{j≤t} c_tj δ_j + G_{−1→t} S_initᵀ q̂_t,      c_tj = G_{j→t} q̂_tᵀ k̂_j;

- **over the inputs** β_j v_j. S_t = A_t S_{t−1} + β_t k̂_t v_tᵀ with A_t = α_t (I − β_t k̂_t k̂_tᵀ)
  (the decay and the delta rule's erase), so

      o_t = Σ_{j≤t} c_tj β_j v_j + (A_t⋯A_0 S_init)ᵀ q̂_t,   c_tj = q̂_tᵀ A_t⋯A_{j+1} k̂_j.

The first weighs the writes the model actually made (each δ_j already holds what the erase took
out), the second what each token brought (v_j), passed through every later erase.

**RWKV-7** (docs/design.md §17; its memory's transition is `hooked_gdn.dplr.DIAGONAL_PLUS_LOW_RANK`):
S_t = diag(w_t) S_{t−1} + (a_t ⊙ κ̂_t) e_tᵀ + k̃_t v_tᵀ, o_t = S_tᵀ r_t, the erase a rank-1 term of its own
along κ̂_t (not the written key), so it cannot be folded into the write's value. With γ_t = Σ_{s≤t} log w_s
per channel:

- **over the writes** v_j *and the erases* e_j (`over_writes_dplr`), unrolling the diagonal decay alone:

      o_t = Σ_{j≤t} c_tj v_j + Σ_{j≤t} d_tj e_j + (e^{γ_t} ⊙ r_t)ᵀ S_init,
      c_tj = r_tᵀ (e^{γ_t − γ_j} ⊙ k̃_j),   d_tj = r_tᵀ (e^{γ_t − γ_j} ⊙ a_j ⊙ κ̂_j);

  the second pair is `EffectiveAttention.erase_pattern` on ``erase_values`` (the cached e_j, which hold
  the state they erased from, the initial one included), and ``out()`` sums both;
- **over the inputs** v_j (`over_inputs_dplr`), the erases folded into the propagator G_t = diag(w_t) −
  (a_t ⊙ κ̂_t) κ̂_tᵀ: c_tj = r_tᵀ G_t⋯G_{j+1} k̃_j, initial term (G_t⋯G_0 S_init)ᵀ r_t, r_t carried back by
  the transition's ``adjoint`` Gᵀ (G is not symmetric).

Both rebuild ``hook_recurrence_out``, S_tᵀ r_t. RWKV-7's bonus (r_t · (r_k ⊙ k̃_t)) v_t is added to the
head's output after the read's GroupNorm, so it is no part of o_t: it is reported beside the pattern as
``bonus`` (the cached ``hook_bonus``), not in ``out()``. Dropping the erase
from the second (c_tj = G_{j→t} q̂_tᵀ k̂_j on β_j v_j, the gated-linear-attention form, TransformerLens
4.3's "effective attention") is a heuristic, not a decomposition: benchmarks/bench_effective_attention.py
measures how far it is.

`effective_attention(cache, layer)` reads the layer's hook points from a `run_with_cache` cache;
`over_writes` and `over_inputs` take the tensors. Patterns are [batch, head, query, key] as
TransformerLens' attention patterns, zero above the diagonal; values and reads are in hook layout
[batch, pos, head, d_v].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor

from .delta_rule import DELTA_RULE, Transition
from .dplr import DIAGONAL_PLUS_LOW_RANK, DPLRTransition
from .sites import gdn_hook_name

DECOMPOSITIONS = ("writes", "inputs")


@dataclass
class EffectiveAttention:
    """o_t = Σ_j pattern[t, j] · values[j] (+ Σ_j erase_pattern[t, j] · erase_values[j]) + initial[t], per
    head, exactly.

    ``values`` are the δ_j (``over="writes"``) or the β_j v_j (``over="inputs"``); RWKV-7's are its
    written v_j both ways. ``initial`` is the initial state's contribution (zero when the sequence starts
    from a zero state). ``erase_pattern`` and ``erase_values`` (the e_j) are set only over the writes of a
    layer whose erase is a term of its own (RWKV-7); ``bonus`` only on RWKV-7: its (r_t · (r_k ⊙ k̃_t)) v_t,
    added after the read's GroupNorm and so not part of ``out()``.
    """

    pattern: Float[Tensor, "batch head query key"]
    values: Float[Tensor, "batch key head d_v"]
    initial: Float[Tensor, "batch query head d_v"]
    over: str
    erase_pattern: Float[Tensor, "batch head query key"] | None = None
    erase_values: Float[Tensor, "batch key head d_v"] | None = None
    bonus: Float[Tensor, "batch query head d_v"] | None = None

    def out(self) -> Float[Tensor, "batch query head d_v"]:
        """The read o_t the decomposition reconstructs (``hook_recurrence_out`` of the layer)."""
        out = einsum(self.pattern, self.values, "b h t j, b j h v -> b t h v") + self.initial
        if self.erase_pattern is not None:
            out = out + einsum(self.erase_pattern, self.erase_values, "b h t j, b j h v -> b t h v")
        return out

    def contributions(self) -> Float[Tensor, "batch query key head d_v"]:
        """Each position j's term c_tj · values_j (+ d_tj · erase_values_j) of o_t (its sum over ``key`` plus
        ``initial`` is ``out()``)."""
        terms = einsum(self.pattern, self.values, "b h t j, b j h v -> b t j h v")
        if self.erase_pattern is not None:
            terms = terms + einsum(self.erase_pattern, self.erase_values, "b h t j, b j h v -> b t j h v")
        return terms


def segment_decay(g: Float[Tensor, "batch pos head"]) -> Float[Tensor, "batch head query key"]:
    """G_{j→t} = exp(Σ_{s=j+1..t} g_s) for j ≤ t, else 0.

    The cumulative sum is taken in fp64: over long sequences Σ g reaches thousands, and the
    difference of two fp32 sums would lose the exponent's small digits.
    """
    gamma = rearrange(g.double().cumsum(1), "b t h -> b h t")
    T = g.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=g.device).tril()
    log_decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf"))
    return log_decay.exp().to(g.dtype)


def over_writes(
    q_hat: Float[Tensor, "batch pos head d_k"],
    k_hat: Float[Tensor, "batch pos head d_k"],
    delta: Float[Tensor, "batch pos head d_v"],
    g: Float[Tensor, "batch pos head"],
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
) -> EffectiveAttention:
    """c_tj = G_{j→t} q̂_tᵀ k̂_j on the writes δ_j; initial term G_{−1→t} S_initᵀ q̂_t."""
    pattern = segment_decay(g) * einsum(q_hat, k_hat, "b t h k, b j h k -> b h t j")
    initial = q_hat.new_zeros(*q_hat.shape[:3], delta.shape[-1])
    if initial_state is not None:
        decay_from_start = g.double().cumsum(1).exp().to(g.dtype)  # G_{−1→t} = Π_{s=0..t} α_s
        initial = decay_from_start[..., None] * einsum(initial_state.to(q_hat.dtype), q_hat, "b h k v, b t h k -> b t h v")
    return EffectiveAttention(pattern, delta, initial, "writes")


def _carry_queries_back(q: Float[Tensor, "b h t d_k"], k: Float[Tensor, "b h t d_k"], step) -> tuple[Tensor, Tensor]:
    """c_tj = r_tjᵀ k_j, r_tj = A_{j+1}ᵀ⋯A_tᵀ q_t, ``step(rows, s)`` applying A_sᵀ to every row: one sweep from
    the last position to the first carries every query at once. Returns the pattern [b, h, t, j] and the
    rows carried back to position 0, r_t0 (for the initial state's term, one more step)."""
    b, H, T, d_k = k.shape
    carried = q.new_zeros(b, H, T, d_k)  # row t: r_tj for t ≥ j; rows t < j stay zero
    columns = []
    for j in range(T - 1, -1, -1):
        if j + 1 < T:
            carried = step(carried, j + 1)
        carried = carried.index_copy(2, torch.tensor([j], device=q.device), q[:, :, j : j + 1])
        columns.append(einsum(carried, k[:, :, j], "b h t k, b h k -> b h t"))
    return torch.stack(columns[::-1], -1), carried


def over_inputs(
    q_hat: Float[Tensor, "batch pos head d_k"],
    k_hat: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    g: Float[Tensor, "batch pos head"],
    beta: Float[Tensor, "batch pos head"],
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    transition: Transition = DELTA_RULE,
) -> EffectiveAttention:
    """c_tj = q̂_tᵀ A_t⋯A_{j+1} k̂_j on β_j v_j; initial term (A_t⋯A_0 S_init)ᵀ q̂_t.

    A_s is the layer's `hooked_gdn.delta_rule.Transition`: α_s (I − β_s k̂_s k̂_sᵀ), or α_s I for
    ``SCALAR_DECAY`` (Mamba-2, where this equals the decomposition over the writes). r_tj = A_{j+1}ᵀ⋯A_tᵀ q̂_t
    is q̂_t carried back to position j by the adjoints; one sweep from the last position to the first
    carries every query at once (O(T² d_k) per head) and c_tj = r_tjᵀ k̂_j.
    """
    q = rearrange(q_hat, "b t h k -> b h t k")
    k = rearrange(k_hat, "b t h k -> b h t k")
    g_, beta_ = rearrange(g, "b t h -> b h t"), rearrange(beta, "b t h -> b h t")
    step = lambda rows, s: transition.adjoint(rows, k[:, :, s, None], g_[:, :, s, None], beta_[:, :, s, None])
    return _over_inputs(q, k, beta[..., None] * v, step, initial_state)


def _over_inputs(q, k, values, step, initial_state) -> EffectiveAttention:
    """Over the inputs, given the queries and keys [b, H, T, d_k] and ``step(rows, s)``, the adjoint of position s's
    transition: the pattern of `_carry_queries_back`, and the initial state's term read by each query carried back
    through position 0 too (A_0ᵀ⋯A_tᵀ q̂_t)."""
    pattern, carried = _carry_queries_back(q, k, step)
    initial = torch.zeros_like(values)
    if initial_state is not None:
        carried = step(carried, 0)
        initial = einsum(initial_state.to(q.dtype), carried, "b h k v, b h t k -> b t h v")
    return EffectiveAttention(pattern, values, initial, "inputs")


def over_writes_dplr(
    r: Float[Tensor, "batch pos head d_k"],
    k_tilde: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    log_w: Float[Tensor, "batch pos head d_k"],
    kappa: Float[Tensor, "batch pos head d_k"],
    a: Float[Tensor, "batch pos head d_k"],
    erase: Float[Tensor, "batch pos head d_v"],
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
) -> EffectiveAttention:
    """RWKV-7 over its writes and erases: c_tj = r_tᵀ (e^{γ_t − γ_j} ⊙ k̃_j) on v_j, d_tj = r_tᵀ (e^{γ_t − γ_j} ⊙
    a_j ⊙ κ̂_j) on e_j; initial term (e^{γ_t} ⊙ r_t)ᵀ S_init (γ_t = Σ_{s≤t} log w_s, per channel).

    Each exponent γ_t − γ_j is one fp64 difference (≤ 0), as `segment_decay`'s; one query at a time keeps the
    per-channel decays [b, t + 1, H, d_k], not [b, T, T, H, d_k].
    """
    b, T, H, _ = k_tilde.shape
    gamma = log_w.double().cumsum(1)
    keys, removals = k_tilde.double(), (a * kappa).double()
    pattern, erase_pattern = (r.new_zeros(b, H, T, T, dtype=torch.float64) for _ in range(2))
    for t in range(T):
        carried = r[:, t, None].double() * (gamma[:, t, None] - gamma[:, : t + 1]).exp()  # r_t ⊙ e^{γ_t − γ_j}, [b, j, H, d_k]
        pattern[:, :, t, : t + 1] = einsum(carried, keys[:, : t + 1], "b j h k, b j h k -> b h j")
        erase_pattern[:, :, t, : t + 1] = einsum(carried, removals[:, : t + 1], "b j h k, b j h k -> b h j")
    initial = r.new_zeros(*r.shape[:3], v.shape[-1])
    if initial_state is not None:
        decayed_query = (r.double() * gamma.exp()).to(r.dtype)  # e^{γ_t} ⊙ r_t
        initial = einsum(initial_state.to(r.dtype), decayed_query, "b h k v, b t h k -> b t h v")
    return EffectiveAttention(pattern.to(r.dtype), v, initial, "writes", erase_pattern.to(r.dtype), erase)


def over_inputs_dplr(
    r: Float[Tensor, "batch pos head d_k"],
    k_tilde: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    log_w: Float[Tensor, "batch pos head d_k"],
    kappa: Float[Tensor, "batch pos head d_k"],
    a: Float[Tensor, "batch pos head d_k"],
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    transition: DPLRTransition = DIAGONAL_PLUS_LOW_RANK,
) -> EffectiveAttention:
    """RWKV-7 over its inputs: c_tj = r_tᵀ G_t⋯G_{j+1} k̃_j on v_j; initial term (G_t⋯G_0 S_init)ᵀ r_t, with
    G_s = diag(w_s) − (a_s ⊙ κ̂_s) κ̂_sᵀ the transition's. r_t is carried back by its ``adjoint`` G_sᵀ."""
    q, k = rearrange(r, "b t h k -> b h t k"), rearrange(k_tilde, "b t h k -> b h t k")
    log_w_, kappa_, a_ = (rearrange(x, "b t h k -> b h t k") for x in (log_w, kappa, a))
    step = lambda rows, s: transition.adjoint(rows, log_w_[:, :, s, None], kappa_[:, :, s, None], a_[:, :, s, None])
    return _over_inputs(q, k, v, step, initial_state)


def recurrence_transition(cache: Mapping[str, Tensor], layer: int, transition: Transition | None = None) -> Transition:
    """Layer ``layer``'s `Transition` (``DELTA_RULE`` for GDN, ``SCALAR_DECAY`` for Mamba-2): ``transition``
    when given, else read off the model of a ``run_with_cache`` cache. A cache without its model (a
    plain dict) does not say, so it needs ``transition``: guessing would give a decomposition that does
    not add up on the other family."""
    if transition is not None:
        return transition
    model = getattr(cache, "model", None)
    if model is None:
        raise ValueError("this cache does not say which transition the layer's memory has (it holds no model): pass "
                         "transition=DELTA_RULE for a Gated DeltaNet layer or transition=SCALAR_DECAY for a Mamba-2 layer "
                         "(hooked_gdn.delta_rule)")
    return model.blocks[layer].linear_attn.transition


def _select_heads(x: Tensor, heads: Sequence[int] | None, dim: int) -> Tensor:
    return x if heads is None else x.index_select(dim, torch.tensor(heads, device=x.device))


#: the hook points each decomposition reads (short names), for the erase folded into the write (GDN, Mamba-2) and
#: for an erase of its own (RWKV-7's `DPLRTransition`, whose layers also have the bonus)
HOOKS = {"writes": ("read_query", "write_key", "write_value", "log_decay"),
         "inputs": ("read_query", "write_key", "v", "log_decay", "beta")}
DPLR_HOOKS = {"writes": ("read_query", "write_key", "write_value", "log_decay", "erase_key", "erase_rate", "erase_value",
                         "bonus"),
              "inputs": ("read_query", "write_key", "write_value", "log_decay", "erase_key", "erase_rate", "bonus")}


def _known_transition(cache: Mapping[str, Tensor], layer: int, transition: Transition | None) -> Transition | None:
    """``transition``, else layer ``layer``'s read off the cache's model; None where neither says (a plain dict, or
    a layer without a memory, which the missing hooks then name)."""
    if transition is not None:
        return transition
    blocks = getattr(getattr(cache, "model", None), "blocks", ())
    block = blocks[layer] if -len(blocks) <= layer < len(blocks) else None
    return getattr(getattr(block, "linear_attn", None), "transition", None)


def effective_attention(
    cache: Mapping[str, Tensor],
    layer: int,
    over: str = "writes",
    heads: int | Sequence[int] | None = None,
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    transition: Transition | None = None,
) -> EffectiveAttention:
    """The exact effective attention of GDN layer ``layer`` from a ``model.run_with_cache(tokens)`` cache.

    ``over="writes"`` uses the cached q̂ (``hook_read_query``), k̂ (``hook_write_key``), δ
    (``hook_write_value``) and g (``hook_log_decay``); ``over="inputs"`` uses q̂, k̂, v (``hook_v``),
    g and β (``hook_beta``). On an RWKV-7 layer (a `DPLRTransition`), both use r, k̃, v (``hook_write_value``),
    log w, κ̂ (``hook_erase_key``), a (``hook_erase_rate``) and the bonus (``hook_bonus``), and over the writes
    also e (``hook_erase_value``). Every one of them is in a default ``run_with_cache`` cache.
    ``heads`` selects value heads (default all); the result's head axis follows their order.
    ``initial_state`` [b, H_v, d_k, d_v] is the state the cached run started from, for a run that
    continued a prefix (``model(tokens, cache=prefix)``: take ``prefix.recurrent_states[layer]``
    before the call, which replaces it); it is given for all heads. ``transition``: the layer's
    (`recurrence_transition`), read off the cache's model unless given.
    """
    if over not in DECOMPOSITIONS:
        raise ValueError(f"over must be one of {DECOMPOSITIONS}, got {over!r}")
    known = _known_transition(cache, layer, transition)
    erases_apart = isinstance(known, DPLRTransition)
    wanted = (DPLR_HOOKS if erases_apart else HOOKS)[over]
    names = {short: gdn_hook_name(layer, f"hook_{short}") for short in wanted}
    missing = [name for name in names.values() if name not in cache]
    if missing:
        raise ValueError(f"the cache lacks {missing}: is layer {layer} a GDN layer? A default "
                         f"model.run_with_cache(tokens) caches these hooks of every GDN layer")
    heads = [heads] if isinstance(heads, int) else None if heads is None else list(heads)
    n_heads = cache[names["log_decay"]].shape[2]
    if heads is not None and any(not 0 <= h < n_heads for h in heads):
        raise ValueError(f"heads {heads} out of range: layer {layer} has {n_heads} value heads")
    x = {short: _select_heads(cache[name].float(), heads, 2) for short, name in names.items()}
    if initial_state is not None:
        initial_state = _select_heads(initial_state.float(), heads, 1)
    if erases_apart:
        inputs = (x["read_query"], x["write_key"], x["write_value"], x["log_decay"], x["erase_key"], x["erase_rate"])
        result = (over_writes_dplr(*inputs, x["erase_value"], initial_state) if over == "writes"
                  else over_inputs_dplr(*inputs, initial_state, known))
        result.bonus = x["bonus"]
        return result
    if over == "writes":
        return over_writes(x["read_query"], x["write_key"], x["write_value"], x["log_decay"], initial_state)
    return over_inputs(x["read_query"], x["write_key"], x["v"], x["log_decay"], x["beta"], initial_state,
                       recurrence_transition(cache, layer, transition))
