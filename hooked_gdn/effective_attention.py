"""Exact effective attention of a Gated DeltaNet head: its read o_t as a weighted sum over past positions.

The recurrence (docs/design.md §2, positions 0-based, S_init the state before position 0: zero, or a cached
prefix's) unrolls in two exact ways (docs/design.md §9):

- **over the writes** δ_j. S_t = α_t S_{t−1} + k̂_t δ_tᵀ, so with G_{j→t} = Π_{s=j+1..t} α_s

      o_t = Σ_{j≤t} c_tj δ_j + G_{−1→t} S_initᵀ q̂_t,      c_tj = G_{j→t} q̂_tᵀ k̂_j;

- **over the inputs** β_j v_j. S_t = A_t S_{t−1} + β_t k̂_t v_tᵀ with A_t = α_t (I − β_t k̂_t k̂_tᵀ)
  (the decay and the delta rule's erase), so

      o_t = Σ_{j≤t} c_tj β_j v_j + (A_t⋯A_0 S_init)ᵀ q̂_t,   c_tj = q̂_tᵀ A_t⋯A_{j+1} k̂_j.

The first weighs the writes the model actually made (each δ_j already holds what the erase took
out), the second what each token brought (v_j), passed through every later erase. Dropping the erase
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
from .sites import gdn_hook_name

DECOMPOSITIONS = ("writes", "inputs")


@dataclass
class EffectiveAttention:
    """o_t = Σ_j pattern[t, j] · values[j] + initial[t], per head, exactly.

    ``values`` are the δ_j (``over="writes"``) or the β_j v_j (``over="inputs"``); ``initial`` is
    the initial state's contribution (zero when the sequence starts from a zero state).
    """

    pattern: Float[Tensor, "batch head query key"]
    values: Float[Tensor, "batch key head d_v"]
    initial: Float[Tensor, "batch query head d_v"]
    over: str

    def out(self) -> Float[Tensor, "batch query head d_v"]:
        """The read o_t the decomposition reconstructs (``hook_recurrence_out`` of the layer)."""
        return einsum(self.pattern, self.values, "b h t j, b j h v -> b t h v") + self.initial

    def contributions(self) -> Float[Tensor, "batch query key head d_v"]:
        """Each position j's term c_tj · values_j of o_t (its sum over ``key`` plus ``initial`` is ``out()``)."""
        return einsum(self.pattern, self.values, "b h t j, b j h v -> b t j h v")


def _segment_decay(g: Float[Tensor, "batch pos head"]) -> Float[Tensor, "batch head query key"]:
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
    pattern = _segment_decay(g) * einsum(q_hat, k_hat, "b t h k, b j h k -> b h t j")
    initial = q_hat.new_zeros(*q_hat.shape[:3], delta.shape[-1])
    if initial_state is not None:
        decay_from_start = g.double().cumsum(1).exp().to(g.dtype)  # G_{−1→t} = Π_{s=0..t} α_s
        initial = decay_from_start[..., None] * einsum(initial_state.to(q_hat.dtype), q_hat, "b h k v, b t h k -> b t h v")
    return EffectiveAttention(pattern, delta, initial, "writes")


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
    b, T, H, d_k = k_hat.shape
    q = rearrange(q_hat, "b t h k -> b h t k")
    k = rearrange(k_hat, "b t h k -> b h t k")
    g_, beta_ = rearrange(g, "b t h -> b h t"), rearrange(beta, "b t h -> b h t")
    step = lambda rows, s: transition.adjoint(rows, k[:, :, s, None], g_[:, :, s, None], beta_[:, :, s, None])
    carried = q.new_zeros(b, H, T, d_k)  # row t: r_tj for t ≥ j; rows t < j stay zero
    columns = []
    for j in range(T - 1, -1, -1):
        if j + 1 < T:
            carried = step(carried, j + 1)
        carried = carried.index_copy(2, torch.tensor([j], device=q.device), q[:, :, j : j + 1])
        columns.append(einsum(carried, k[:, :, j], "b h t k, b h k -> b h t"))
    pattern = torch.stack(columns[::-1], -1)
    values = beta[..., None] * v
    initial = torch.zeros_like(values)
    if initial_state is not None:
        carried = step(carried, 0)  # A_0⋯A_t q̂_t
        initial = einsum(initial_state.to(q.dtype), carried, "b h k v, b h t k -> b t h v")
    return EffectiveAttention(pattern, values, initial, "inputs")


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
    g and β (``hook_beta``). Every one of them is in a default ``run_with_cache`` cache.
    ``heads`` selects value heads (default all); the result's head axis follows their order.
    ``initial_state`` [b, H_v, d_k, d_v] is the state the cached run started from, for a run that
    continued a prefix (``model(tokens, cache=prefix)``: take ``prefix.recurrent_states[layer]``
    before the call, which replaces it); it is given for all heads. ``transition``: the layer's
    (`recurrence_transition`), read off the cache's model unless given.
    """
    if over not in DECOMPOSITIONS:
        raise ValueError(f"over must be one of {DECOMPOSITIONS}, got {over!r}")
    wanted = {"writes": ("read_query", "write_key", "write_value", "log_decay"),
              "inputs": ("read_query", "write_key", "v", "log_decay", "beta")}[over]
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
    if over == "writes":
        return over_writes(x["read_query"], x["write_key"], x["write_value"], x["log_decay"], initial_state)
    return over_inputs(x["read_query"], x["write_key"], x["v"], x["log_decay"], x["beta"], initial_state,
                       recurrence_transition(cache, layer, transition))
