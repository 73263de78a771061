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
from jaxtyping import Float, Int
from torch import Tensor

from hooked_gdn.sites import block_name, edit_at_positions, gdn_hook_name

from .edits import one_sequence
from .features import Direction

SITES = ("hook_read_query", "hook_write_key", "hook_beta", "hook_log_decay")
METHODS = ("exact", "paper")


def _carry(v: Float[Tensor, " d_k"], k_hat: Tensor, beta: Tensor, g: Tensor, t0: int) -> Float[Tensor, "T_minus_t0 d_k"]:
    """M_{t0→t} v for every t in t0 … T−1, stacked, from one head's k̂ [T, d_k], β [T], g [T]:
    A_s = α_s (I − β_s k̂_s k̂_sᵀ) applied one position at a time, never forming a d_k × d_k matrix."""
    out = [v]
    for s in range(t0 + 1, k_hat.shape[0]):
        v = g[s].exp() * (v - beta[s] * k_hat[s] * (k_hat[s] @ v))
        out.append(v)
    return torch.stack(out)


def _head_inputs(cache, layer: int, head: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One head's q̂ [T, d_k], k̂ [T, d_k], β [T], g [T] from a cache of the layer's ``SITES``."""
    q, k, beta, g = (cache[gdn_hook_name(layer, name)] for name in SITES)
    if q.shape[0] != 1:
        raise ValueError(f"the cache must hold one sequence, got a batch of {q.shape[0]}")
    return q[0, :, head].float(), k[0, :, head].float(), beta[0, :, head].float(), g[0, :, head].float()


def exact_read_change(cache, layer: int, head: int, t0: int, v: Float[Tensor, " d_k"], w: Float[Tensor, " d_v"],
                      eps: float) -> Float[Tensor, "T_minus_t0 d_v"]:
    """Δo_t = ε ⟨M_{t0→t}ᵀ q̂_t, v⟩ w for t = t0 … T−1, exact for any ε.

    ``cache`` is a clean ``run_with_cache`` holding the layer's q̂, k̂, β and g (``SITES``).
    ⟨Mᵀ q̂, v⟩ = ⟨q̂, M v⟩, so v is carried forward instead of forming M.
    """
    q, k, beta, g = _head_inputs(cache, layer, head)
    carried = _carry(v.to(k), k, beta, g, t0)  # M_{t0→t} v, [T − t0, d_k]
    gain = (q[t0:] * carried).sum(-1)
    return eps * gain[:, None] * w.to(k)


def paper_read_change(cache, layer: int, head: int, t0: int, v: Float[Tensor, " d_k"], w: Float[Tensor, " d_v"],
                      eps: float) -> Float[Tensor, "T_minus_t0 d_v"]:
    """The approximation ε G_{t0→t} ⟨q̂_t, v⟩ w, G the product of the decays α over (t0, t]."""
    q, _, _, g = _head_inputs(cache, layer, head)
    decay = torch.cat([g.new_zeros(1), g[t0 + 1:].cumsum(0)]).exp()  # G_{t0→t0} = 1
    gain = decay * (q[t0:] @ v.to(q))
    return eps * gain[:, None] * w.to(q)


def _clean_cache(model, tokens: Tensor, layer: int):
    return model.run_with_cache(tokens, names_filter=[gdn_hook_name(layer, name) for name in SITES])


@torch.no_grad()  # forward-mode AD is unaffected; no reverse graph is built
def logit_jvp(model, tokens: Int[Tensor, "1 T"], layer: int, head: int, t0: int,
              read_change: Float[Tensor, "T_minus_t0 d_v"]) -> Float[Tensor, "T d_vocab"]:
    """The logits' first-order change when o of (layer, head) moves by ``read_change`` from t0 on.

    A forward-mode Jacobian-vector product around the clean run: exact through this layer's
    output (Δo is already exact), linearised through the gated RMSNorm and every later layer.
    """
    tokens = one_sequence(tokens, "the logit-shift study")
    name = gdn_hook_name(layer, "hook_recurrence_out")
    # Forward-mode AD has no rule for the fused attention kernel; an observing hook on the
    # attention pattern makes the attention layers take their explicit softmax path instead.
    explicit_attention = [(block_name(i, "attn.hook_pattern"), lambda x, hook: None)
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


def state_edit_hook(head: int, t0: int, v: Tensor, w: Tensor, eps: float):
    """A ``hook_state`` hook adding ε v wᵀ to S_{t0} of ``head``; run it with ``state_positions=[t0]``."""

    def add(states: Tensor, position: int) -> Tensor:  # [b, H_v, d_k, d_v]
        states[:, head] += eps * torch.outer(v, w).to(states)
        return states

    return edit_at_positions(add, t0)


@torch.no_grad()
def measured_logit_change(model, tokens: Int[Tensor, "1 T"], layer: int, head: int, t0: int, v: Float[Tensor, " d_k"],
                          w: Float[Tensor, " d_v"], eps: float) -> Float[Tensor, "T d_vocab"]:
    """Logits with ε v wᵀ added to S_{t0} (carried forward) minus clean logits."""
    tokens = one_sequence(tokens, "the logit-shift study")
    clean = model(tokens).float()
    hooks = [(gdn_hook_name(layer, "hook_state"), state_edit_hook(head, t0, v, w, eps))]
    edited = model.run_with_hooks(tokens, fwd_hooks=hooks, state_positions=[t0]).float()
    return (edited - clean)[0]


READ_CHANGES = {"exact": exact_read_change, "paper": paper_read_change}


class PooledR2:
    """R² = 1 − Σ(m − p)² / Σ(m − m̄)² pooled over entries added in pieces: Σ(m − p)², Σm, Σm² and
    the count are kept (in float64), not the entries."""

    def __init__(self):
        self.residual = self.total = self.total_sq = 0.0
        self.n = 0

    def add(self, predicted: Tensor, measured: Tensor) -> None:
        p, m = predicted.double().flatten(), measured.double().flatten()
        self.residual += float((m - p).pow(2).sum())
        self.total += float(m.sum())
        self.total_sq += float(m.pow(2).sum())
        self.n += m.numel()

    def value(self) -> float:
        variance = self.total_sq - self.total**2 / self.n
        return 1.0 - self.residual / variance if variance > 0 else float("nan")


def logit_shift_study(
    model, tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"], layer: int, t0: int,
    directions: Sequence[Direction], epsilons: Sequence[float], relative_to_state: bool = False,
    samples: int = 0, generator: torch.Generator | None = None,
) -> dict:
    """R² of the exact and the paper's prediction against measured logit changes, pooled over the
    passages of ``tokens``, the ``directions`` (each in its own head) and the positions t ≥ t0.

    Each direction's edit is ε v wᵀ added to its head's S_{t0}, with ε = e for each e in
    ``epsilons``, or e · ‖S_{t0}‖_F (that head's clean state norm in that passage) when
    ``relative_to_state``. Both predictions are linear in ε, so each costs one JVP per passage and
    direction (at ε = 1, then scaled); each ε costs one edited forward. ``samples`` entries
    (position ≥ t0, token) per passage and direction are drawn from ``generator`` at the first ε,
    for a scatter plot.

    Returns ``{"epsilons", "distances", "mean_state_norm" (None unless relative), "r2_by_eps":
    {group: {e: {"exact", "paper"}}}, "r2_by_distance": {e: {"exact": [R² at t0 + d], "paper":
    [...]}}, "samples": {"exact", "paper", "measured"} (flat tensors)}``; the groups are "all" and
    each direction kind ("atom", "random").
    """
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    distances = list(range(tokens.shape[1] - t0))
    groups = ["all", *dict.fromkeys(d.kind for d in directions)]
    by_eps = {(g, e, m): PooledR2() for g in groups for e in epsilons for m in METHODS}
    by_distance = {(e, d, m): PooledR2() for e in epsilons for d in distances for m in METHODS}
    drawn = {m: [] for m in (*METHODS, "measured")}
    state_site, state_norms = gdn_hook_name(layer, "hook_state"), []
    for passage in tokens:
        passage = passage[None]
        with torch.no_grad():
            _, cache = _clean_cache(model, passage, layer)
            if relative_to_state:
                _, states = model.run_with_cache(passage, names_filter=state_site, state_positions=[t0])
        for head in dict.fromkeys(d.head for d in directions):
            scale = float(states[state_site][0, 0, head].float().norm()) if relative_to_state else 1.0
            state_norms.append(scale)
            for direction in (d for d in directions if d.head == head):
                v, w = direction.v, direction.w
                unit = {m: logit_jvp(model, passage, layer, head, t0, read_change(cache, layer, head, t0, v, w, 1.0))[t0:]
                        for m, read_change in READ_CHANGES.items()}
                chosen = torch.randint(0, unit["exact"].numel(), (samples,), generator=generator)
                for e in epsilons:
                    eps = e * scale
                    measured = measured_logit_change(model, passage, layer, head, t0, v, w, eps)[t0:]
                    for m in METHODS:
                        predicted = eps * unit[m]
                        for group in ("all", direction.kind):
                            by_eps[group, e, m].add(predicted, measured)
                        for d in distances:
                            by_distance[e, d, m].add(predicted[d], measured[d])
                        if e == epsilons[0]:
                            drawn[m].append(predicted.flatten()[chosen])
                    if e == epsilons[0]:
                        drawn["measured"].append(measured.flatten()[chosen])
    return {
        "epsilons": list(epsilons), "distances": distances,
        "mean_state_norm": sum(state_norms) / len(state_norms) if relative_to_state else None,
        "r2_by_eps": {g: {e: {m: by_eps[g, e, m].value() for m in METHODS} for e in epsilons} for g in groups},
        "r2_by_distance": {e: {m: [by_distance[e, d, m].value() for d in distances] for m in METHODS} for e in epsilons},
        "samples": {name: torch.cat(values) for name, values in drawn.items()},
    }
