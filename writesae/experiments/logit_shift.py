"""The logit-shift prediction: how a rank-1 state edit ε v wᵀ at (layer, head, t0) moves the logits.

Per head the GDN recurrence (DESIGN §2) is, with α_t = exp(g_t),

    S_t = α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ,      o_t = S_tᵀ q̂_t.

k̂, β, g and q̂ come from the layer's input, which an edit of this layer's state cannot reach, so the
recurrence is affine in S: adding ΔS to S_{t0} (after its write) adds ΔS_t = M_{t0→t} ΔS to every
later state, with the propagator

    M_{t0→t} = A_t A_{t−1} ⋯ A_{t0+1},   A_s = α_s (I − β_s k̂_s k̂_sᵀ)   (later factors on the left),

and M_{t0→t0} = I. For ΔS = ε v wᵀ the read changes by exactly Δo_t = ε ⟨M_{t0→t}ᵀ q̂_t, v⟩ w, at
every ε, not to first order. The paper's approximation keeps only the decays:
Δo_t ≈ ε G_{t0→t} ⟨q̂_t, v⟩ w with G_{t0→t} = Π_{s=t0+1..t} α_s.

Beyond this layer the network is not linear (the gated RMSNorm of o, later layers), so both read
changes are pushed to the logits by one Jacobian-vector product of the logits with respect to
``hook_recurrence_out`` around the clean run; only that step is a first-order approximation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .edits import edit_at_positions, gdn_hook_name, one_sequence

SITES = ("hook_read_query", "hook_write_key", "hook_beta", "hook_log_decay")


def _carry(x: Tensor, k_hat: Tensor, beta: Tensor, g: Tensor, t0: int) -> Tensor:
    """M_{t0→t} x for every t in t0 … T−1, stacked: [T − t0, *x.shape].

    One head's k̂ [T, d_k], β [T], g [T]; x is [d_k] or [d_k, n]. Applies A_s = α_s (I − β_s k̂_s k̂_sᵀ)
    one position at a time, never forming a d_k × d_k matrix unless x is one.
    """
    out = [x]
    for s in range(t0 + 1, k_hat.shape[0]):
        k = k_hat[s]
        k_col = k.view(-1, *([1] * (x.dim() - 1)))
        x = g[s].exp() * (x - beta[s] * k_col * (k @ x))
        out.append(x)
    return torch.stack(out)


def propagator(k_hat: Tensor, beta: Tensor, g: Tensor, t0: int, t: int) -> Tensor:
    """M_{t0→t} [d_k, d_k] of one head: what a state change at t0 has become at t (ΔS_t = M ΔS_{t0}).

    Takes one head's k̂ [T, d_k], β [T], g [T]. (The read query does not enter M; it enters the read
    change ⟨Mᵀ q̂_t, v⟩ w.)
    """
    if not 0 <= t0 <= t < k_hat.shape[0]:
        raise ValueError(f"need 0 <= t0 <= t < {k_hat.shape[0]}, got t0={t0}, t={t}")
    eye = torch.eye(k_hat.shape[1], dtype=k_hat.dtype, device=k_hat.device)
    return _carry(eye, k_hat[: t + 1], beta, g, t0)[-1]


def _head_inputs(cache, layer: int, head: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One head's q̂ [T, d_k], k̂ [T, d_k], β [T], g [T] from a cache of the layer's ``SITES``."""
    q, k, beta, g = (cache[gdn_hook_name(layer, name)] for name in SITES)
    if q.shape[0] != 1:
        raise ValueError(f"the cache must hold one sequence, got a batch of {q.shape[0]}")
    return q[0, :, head].float(), k[0, :, head].float(), beta[0, :, head].float(), g[0, :, head].float()


def exact_read_change(cache, layer: int, head: int, t0: int, v: Tensor, w: Tensor, eps: float) -> Tensor:
    """Δo_t = ε ⟨M_{t0→t}ᵀ q̂_t, v⟩ w for t = t0 … T−1: [T − t0, d_v], exact for any ε.

    ``cache`` is a clean ``run_with_cache`` holding the layer's q̂, k̂, β and g (``SITES``).
    ⟨Mᵀ q̂, v⟩ = ⟨q̂, M v⟩, so v is carried forward instead of forming M.
    """
    q, k, beta, g = _head_inputs(cache, layer, head)
    carried = _carry(v.to(k), k, beta, g, t0)  # M_{t0→t} v, [T − t0, d_k]
    gain = (q[t0:] * carried).sum(-1)
    return eps * gain[:, None] * w.to(k)


def paper_read_change(cache, layer: int, head: int, t0: int, v: Tensor, w: Tensor, eps: float) -> Tensor:
    """The approximation ε G_{t0→t} ⟨q̂_t, v⟩ w, G the product of the decays α over (t0, t]: [T − t0, d_v]."""
    q, _, _, g = _head_inputs(cache, layer, head)
    decay = torch.cat([g.new_zeros(1), g[t0 + 1:].cumsum(0)]).exp()  # G_{t0→t0} = 1
    gain = decay * (q[t0:] @ v.to(q))
    return eps * gain[:, None] * w.to(q)


def _clean_cache(model, tokens: Tensor, layer: int):
    return model.run_with_cache(tokens, names_filter=[gdn_hook_name(layer, name) for name in SITES])


@torch.no_grad()  # forward-mode AD is unaffected; no reverse graph is built
def logit_jvp(model, tokens: Tensor, layer: int, head: int, t0: int, read_change: Tensor) -> Tensor:
    """The logits' first-order change [T, d_vocab] when o of (layer, head) moves by ``read_change`` [T − t0, d_v] from t0.

    A forward-mode Jacobian-vector product around the clean run: exact through this layer's
    output (Δo is already exact), linearised through the gated RMSNorm and every later layer.
    """
    tokens = one_sequence(tokens, "the logit-shift study")
    name = gdn_hook_name(layer, "hook_recurrence_out")
    # Forward-mode AD has no rule for the fused attention kernel; an observing hook on the
    # attention pattern makes the attention layers take their explicit softmax path instead.
    explicit_attention = [(f"blocks.{i}.attn.hook_pattern", lambda x, hook: None)
                          for i, block in enumerate(model.blocks) if not block.is_gdn]

    def logits_given(shift: Tensor) -> Tensor:
        hooks = [(name, lambda o, hook: o + shift.to(o.dtype))] + explicit_attention
        return model.run_with_hooks(tokens, fwd_hooks=hooks).float()

    _, cache = model.run_with_cache(tokens, names_filter=name)
    o = cache[name]
    direction = torch.zeros_like(o)
    direction[0, t0:, head] = read_change.to(o.dtype)
    _, tangent = torch.func.jvp(logits_given, (torch.zeros_like(o),), (direction,))
    return tangent[0]


def predicted_logit_change(model, tokens: Tensor, layer: int, head: int, t0: int, v: Tensor, w: Tensor, eps: float) -> Tensor:
    """Exact read change ε ⟨M_{t0→t}ᵀ q̂_t, v⟩ w, pushed to the logits by a JVP: [T, d_vocab]."""
    tokens = one_sequence(tokens, "the logit-shift study")
    with torch.no_grad():
        _, cache = _clean_cache(model, tokens, layer)
    return logit_jvp(model, tokens, layer, head, t0, exact_read_change(cache, layer, head, t0, v, w, eps))


def paper_approximation(model, tokens: Tensor, layer: int, head: int, t0: int, v: Tensor, w: Tensor, eps: float) -> Tensor:
    """The decay-only read change ε G_{t0→t} ⟨q̂_t, v⟩ w, pushed through the same JVP: [T, d_vocab]."""
    tokens = one_sequence(tokens, "the logit-shift study")
    with torch.no_grad():
        _, cache = _clean_cache(model, tokens, layer)
    return logit_jvp(model, tokens, layer, head, t0, paper_read_change(cache, layer, head, t0, v, w, eps))


def state_edit_hook(head: int, t0: int, v: Tensor, w: Tensor, eps: float):
    """A ``hook_state`` hook adding ε v wᵀ to S_{t0} of ``head``; run it with ``state_positions=[t0]``."""

    def add(states: Tensor, position: int) -> Tensor:  # [b, H_v, d_k, d_v]
        states[:, head] += eps * torch.outer(v, w).to(states)
        return states

    return edit_at_positions(add, t0)


@torch.no_grad()
def measured_logit_change(model, tokens: Tensor, layer: int, head: int, t0: int, v: Tensor, w: Tensor, eps: float) -> Tensor:
    """Logits with ε v wᵀ added to S_{t0} (carried forward) minus clean logits: [T, d_vocab]."""
    tokens = one_sequence(tokens, "the logit-shift study")
    clean = model(tokens).float()
    hooks = [(gdn_hook_name(layer, "hook_state"), state_edit_hook(head, t0, v, w, eps))]
    edited = model.run_with_hooks(tokens, fwd_hooks=hooks, state_positions=[t0]).float()
    return (edited - clean)[0]


def r_squared(predicted: Tensor, measured: Tensor) -> float:
    """1 − Σ(measured − predicted)² / Σ(measured − mean)², over all entries."""
    predicted, measured = predicted.double().flatten(), measured.double().flatten()
    residual = (measured - predicted).pow(2).sum()
    total = (measured - measured.mean()).pow(2).sum()
    return float(1.0 - residual / total)


def logit_shift_study(
    model, tokens: Tensor, layer: int, head: int, t0: int,
    directions: Sequence[tuple[Tensor, Tensor]], epsilons: Sequence[float],
) -> dict:
    """R² of the exact and the paper's prediction against measured logit changes, over (v, w) directions.

    Both predictions are linear in ε, so each costs one JVP per direction (at ε = 1, then scaled).
    Returns ``{"epsilons", "distances", "by_eps": {ε: {"exact", "paper"}},
    "by_distance": {ε: {"exact": [R² at t0 + d], "paper": [...]}}}``, each R² pooled over the
    directions (and, by ε, over positions t ≥ t0 and the vocabulary).
    """
    tokens = one_sequence(tokens, "the logit-shift study")
    with torch.no_grad():
        _, cache = _clean_cache(model, tokens, layer)
    predictions = {"exact": [], "paper": []}
    for v, w in directions:
        for method, read_change in (("exact", exact_read_change), ("paper", paper_read_change)):
            change = read_change(cache, layer, head, t0, v, w, 1.0)
            predictions[method].append(logit_jvp(model, tokens, layer, head, t0, change)[t0:])
    predictions = {method: torch.stack(p) for method, p in predictions.items()}  # [n_dir, T − t0, vocab]

    distances = list(range(tokens.shape[1] - t0))
    by_eps, by_distance = {}, {}
    for eps in epsilons:
        measured = torch.stack([measured_logit_change(model, tokens, layer, head, t0, v, w, eps)[t0:]
                                for v, w in directions])
        by_eps[eps] = {m: r_squared(eps * p, measured) for m, p in predictions.items()}
        by_distance[eps] = {m: [r_squared(eps * p[:, d], measured[:, d]) for d in distances]
                            for m, p in predictions.items()}
    return {"epsilons": list(epsilons), "distances": distances, "by_eps": by_eps, "by_distance": by_distance}
