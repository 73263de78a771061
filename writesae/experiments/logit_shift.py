"""The logit-shift prediction: how a rank-1 state edit ε v wᵀ at (layer, head, t0) moves the logits.

Per head the GDN recurrence (docs/design.md §5) is, with α_t = exp(g_t),

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
``hook_recurrence_out`` around the clean run; only that step is a first-order approximation. The
study compares both predictions with the measured change at the read Δo (where the exact form has
no approximation at all) and at the logits, at positions t > t0 only: at t0 both are ε ⟨q̂_t0, v⟩ w.

The adjoint runs the other way (`state_gradient`): given ∂f/∂o_t for every t (one VJP of any scalar f
of the logits, `read_gradient`), ∂f/∂S_t0 = Σ_{t ≥ t0} M_{t0→t}ᵀ q̂_t (∂f/∂o_t)ᵀ, a d_k × d_v matrix J
with f's first-order change under ε v wᵀ equal to ε vᵀ J w; installs use it to aim (see `install`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_gdn.delta_rule import Transition
from hooked_gdn.effective_attention import recurrence_transition
from hooked_gdn.sites import block_name, edit_at_positions, gdn_hook_name

from ..site_fit import check_layer_heads
from .edits import check_positions, one_sequence
from .features import Direction

SITES = ("hook_read_query", "hook_write_key", "hook_beta", "hook_log_decay")
METHODS = ("exact", "paper")


@dataclass
class _Head:
    """One head's q̂ [T, d_k], k̂ [T, d_k], β [T] and g [T], and its layer's transition."""

    q: Tensor
    k: Tensor
    beta: Tensor
    g: Tensor
    transition: Transition

    def step(self, x: Float[Tensor, "... d_k"], s: int) -> Float[Tensor, "... d_k"]:
        """A_s x: the layer's own `hooked_gdn.delta_rule.Transition` (α_s I for Mamba-2's SSD)."""
        return self.transition.apply(x, self.k[s], self.g[s], self.beta[s])

    def step_back(self, x: Float[Tensor, "... d_k"], s: int) -> Float[Tensor, "... d_k"]:
        """A_sᵀ x, the adjoint of `step`."""
        return self.transition.adjoint(x, self.k[s], self.g[s], self.beta[s])


def _carry(v: Float[Tensor, " d_k"], head: _Head, t0: int) -> Float[Tensor, "T_minus_t0 d_k"]:
    """M_{t0→t} v for every t in t0 … T−1, stacked: A_s applied one position at a time, never forming
    a d_k × d_k matrix."""
    out = [v]
    for s in range(t0 + 1, head.k.shape[0]):
        v = head.step(v, s)
        out.append(v)
    return torch.stack(out)


def _one_head(cache, layer: int, head: int, name: str) -> Tensor:
    """One head's values of the layer's hook ``name`` in a cache of one sequence, in fp32."""
    x = cache[gdn_hook_name(layer, name)]
    if x.shape[0] != 1:
        raise ValueError(f"the cache must hold one sequence, got a batch of {x.shape[0]}")
    return x[0, :, head].float()


def _head_inputs(cache, layer: int, head: int, transition: Transition | None) -> _Head:
    """One head's inputs from a cache of the layer's ``SITES`` (``transition``: see
    `hooked_gdn.effective_attention.recurrence_transition`)."""
    return _Head(*(_one_head(cache, layer, head, name) for name in SITES), recurrence_transition(cache, layer, transition))


def exact_read_change(cache, layer: int, head: int, t0: int, v: Float[Tensor, " d_k"], w: Float[Tensor, " d_v"],
                      eps: float, transition: Transition | None = None) -> Float[Tensor, "T_minus_t0 d_v"]:
    """Δo_t = ε ⟨M_{t0→t}ᵀ q̂_t, v⟩ w for t = t0 … T−1, exact for any ε.

    ``cache`` is a clean ``run_with_cache`` holding the layer's q̂, k̂, β and g (``SITES``); a plain
    dict needs ``transition`` (`hooked_gdn.effective_attention.recurrence_transition`).
    ⟨Mᵀ q̂, v⟩ = ⟨q̂, M v⟩, so v is carried forward instead of forming M.
    """
    inputs = _head_inputs(cache, layer, head, transition)
    carried = _carry(v.to(inputs.k), inputs, t0)  # M_{t0→t} v, [T − t0, d_k]
    gain = (inputs.q[t0:] * carried).sum(-1)
    return eps * gain[:, None] * w.to(inputs.k)


def paper_read_change(cache, layer: int, head: int, t0: int, v: Float[Tensor, " d_k"], w: Float[Tensor, " d_v"],
                      eps: float) -> Float[Tensor, "T_minus_t0 d_v"]:
    """The approximation ε G_{t0→t} ⟨q̂_t, v⟩ w, G the product of the decays α over (t0, t]."""
    q, g = (_one_head(cache, layer, head, name) for name in ("hook_read_query", "hook_log_decay"))
    decay = torch.cat([g.new_zeros(1), g[t0 + 1:].cumsum(0)]).exp()  # G_{t0→t0} = 1
    gain = decay * (q[t0:] @ v.to(q))
    return eps * gain[:, None] * w.to(q)


def state_gradient(cache, layer: int, head: int, read_grad: Float[Tensor, "T d_v"],
                   positions: Sequence[int], transition: Transition | None = None) -> Float[Tensor, "n_positions d_k d_v"]:
    """J_t0 = Σ_{t ≥ t0} M_{t0→t}ᵀ q̂_t g_tᵀ for each t0 in ``positions``, g_t = ``read_grad[t]`` = ∂f/∂o_t.

    The adjoint of `exact_read_change`: Σ_t ⟨g_t, Δo_t⟩ = ε vᵀ J_t0 w for the edit ε v wᵀ at t0. The sum
    is accumulated backwards, X_t = q̂_t g_tᵀ + A_{t+1}ᵀ X_{t+1}, J_t0 = X_t0.
    """
    inputs = _head_inputs(cache, layer, head, transition)
    q = inputs.q
    positions = check_positions(positions, q.shape[0], "install position")
    read_grad = read_grad.to(q)
    wanted = set(positions)
    x, found = torch.zeros(q.shape[1], read_grad.shape[1], dtype=q.dtype), {}
    for t in range(q.shape[0] - 1, min(positions) - 1, -1):
        if t + 1 < q.shape[0]:  # x ← A_{t+1}ᵀ x, on x's columns (key-space vectors)
            x = inputs.step_back(x.T, t + 1).T
        x = x + torch.outer(q[t], read_grad[t])
        if t in wanted:
            found[t] = x
    return torch.stack([found[t] for t in positions])


@torch.enable_grad()
def read_gradients(model, tokens: Int[Tensor, "1 T"], layer: int, position: int,
                   target: int) -> Float[Tensor, "T H d_v"]:
    """g_t = ∂ log p(target | tokens[: position + 1]) / ∂o_t of every value head of ``layer``, for every t: one
    backward pass (a vector-Jacobian product) around the clean run; zero for t > ``position``."""
    tokens = one_sequence(tokens, "the read gradient")
    check_layer_heads(model, layer)
    (position,) = check_positions(position, tokens.shape[1])
    name = gdn_hook_name(layer, "hook_recurrence_out")
    shift = torch.zeros(1, tokens.shape[1], model.cfg.n_value_heads, model.cfg.d_value, requires_grad=True)
    logits = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda o, hook: o + shift.to(o.dtype))])
    log_p = logits[0, position].float().log_softmax(-1)[target]
    (grad,) = torch.autograd.grad(log_p, shift)
    return grad[0]


def read_gradient(model, tokens: Int[Tensor, "1 T"], layer: int, head: int, position: int,
                  target: int) -> Float[Tensor, "T d_v"]:
    """`read_gradients` of one head."""
    check_layer_heads(model, layer, [head])
    return read_gradients(model, tokens, layer, position, target)[:, head]


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
def measured_change(model, tokens: Int[Tensor, "1 T"], layer: int, head: int, t0: int, v: Float[Tensor, " d_k"],
                    w: Float[Tensor, " d_v"], eps: float) -> tuple[Float[Tensor, "T d_vocab"], Float[Tensor, "T d_v"]]:
    """(Δlogits, Δo of ``head``): the logits and the head's read with ε v wᵀ added to S_{t0}
    (carried forward), minus the clean run's."""
    tokens = one_sequence(tokens, "the logit-shift study")
    check_layer_heads(model, layer, [head])
    (t0,) = check_positions(t0, tokens.shape[1], "t0")
    read = gdn_hook_name(layer, "hook_recurrence_out")
    clean, cache = model.run_with_cache(tokens, names_filter=read)
    seen = {}
    hooks = [(gdn_hook_name(layer, "hook_state"), state_edit_hook(head, t0, v, w, eps)),
             (read, lambda o, hook: seen.__setitem__("o", o))]
    edited = model.run_with_hooks(tokens, fwd_hooks=hooks, state_positions=[t0])
    return (edited.float() - clean.float())[0], (seen["o"].float() - cache[read].float())[0, :, head]


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


def distance_bins(max_distance: int) -> list[tuple[int, int]]:
    """[1, 2), [2, 4), [4, 8), … up to ``max_distance`` (inclusive): distances t − t0 ≥ 1 by octave."""
    bins, lo = [], 1
    while lo <= max_distance:
        bins.append((lo, min(2 * lo, max_distance + 1)))
        lo *= 2
    return bins


SCALES = ("read", "logits")


def logit_shift_study(
    model, tokens: Int[Tensor, "batch pos"] | Int[Tensor, " pos"], layer: int, t0: int,
    directions: Sequence[Direction], epsilons: Sequence[float], relative_to_state: bool = False,
    samples: int = 0, generator: torch.Generator | None = None, head_groups: Mapping[int, str] | None = None,
) -> dict:
    """R² of the exact and the paper's prediction against the measured change, at the head's read Δo
    and at the logits, pooled over the passages of ``tokens``, the ``directions`` (each in its own
    head) and the positions t > t0 (at t0 both predictions are the edit itself).

    ``head_groups`` labels each head of ``directions`` (e.g. with its decay kind,
    `hooked_gdn.census.HeadCensus.decay_kind`); R² is pooled within a label and never across two, since
    heads of different mechanisms are different results. By default every head is in one group, "all".

    Each direction's edit is ε v wᵀ added to its head's S_{t0}, with ε = e for each e in
    ``epsilons``, or e · ‖S_{t0}‖_F (that head's clean state norm in that passage) when
    ``relative_to_state``. Both predictions are linear in ε, so each costs one JVP per passage and
    direction (at ε = 1, then scaled); each ε costs one edited forward. ``samples`` logit entries
    (position > t0, token) per passage and direction are drawn from ``generator`` at the first ε,
    for a scatter plot.

    Returns ``{"epsilons", "t0", "bins" ([lo, hi) of t − t0), "head_groups" ({head: label}),
    "mean_state_norm" ({head: mean over passages}; None unless relative), "r2": {group: {kind: {e: {scale:
    {method: R²}}}}}, "r2_by_head": {head: {e: {scale: {method: R²}}}}, "r2_by_distance": {head: {e: {scale:
    {method: [R² per bin]}}}}, "share_by_distance": {head: {e: {scale: [share per bin]}}}, "samples": {"exact",
    "paper", "measured", "head"} (flat tensors)}``; scales are "read" and "logits", methods "exact" and
    "paper", the kinds "all" and each direction kind of the group ("atom", "random"); a bin's share is its
    part of the measured change's sum of squares over t > t0 (how much of the edit's effect lies at that
    distance, so an R² on next to nothing reads as such).
    """
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    check_layer_heads(model, layer, [d.head for d in directions])
    (t0,) = check_positions(t0, tokens.shape[1], "t0")
    if t0 == tokens.shape[1] - 1:
        raise ValueError(f"t0 = {t0} is the last position: no later position is left to predict")
    for direction in directions:
        direction.check_layer(layer)
    bins = distance_bins(tokens.shape[1] - 1 - t0)
    heads = list(dict.fromkeys(d.head for d in directions))
    if head_groups is None:
        head_groups = {h: "all" for h in heads}
    unlabelled = [h for h in heads if h not in head_groups]
    if unlabelled:
        raise ValueError(f"head_groups has no group for head(s) {unlabelled}")
    head_groups = {h: head_groups[h] for h in heads}
    kinds = {group: ["all", *dict.fromkeys(d.kind for d in directions if head_groups[d.head] == group)]
             for group in dict.fromkeys(head_groups.values())}
    pooled = {(g, k, e, s, m): PooledR2() for g in kinds for k in kinds[g] for e in epsilons for s in SCALES
              for m in METHODS}
    by_head = {(h, e, s, m): PooledR2() for h in heads for e in epsilons for s in SCALES for m in METHODS}
    by_distance = {(h, e, b, s, m): PooledR2() for h in heads for e in epsilons for b in bins for s in SCALES
                   for m in METHODS}
    drawn = {m: [] for m in (*METHODS, "measured", "head")}
    state_site, state_norms = gdn_hook_name(layer, "hook_state"), {h: [] for h in heads}
    for passage in tokens:
        passage = passage[None]
        with torch.no_grad():
            _, cache = _clean_cache(model, passage, layer)
            if relative_to_state:
                _, states = model.run_with_cache(passage, names_filter=state_site, state_positions=[t0])
        for head in heads:
            scale = float(states[state_site][0, 0, head].float().norm()) if relative_to_state else 1.0
            state_norms[head].append(scale)
            for direction in (d for d in directions if d.head == head):
                v, w = direction.v, direction.w
                read = {m: read_change(cache, layer, head, t0, v, w, 1.0)[1:] for m, read_change in READ_CHANGES.items()}
                unit = {"read": read, "logits": {
                    m: logit_jvp(model, passage, layer, head, t0, read_change(cache, layer, head, t0, v, w, 1.0))[t0 + 1:]
                    for m, read_change in READ_CHANGES.items()}}
                chosen = torch.randint(0, unit["logits"]["exact"].numel(), (samples,), generator=generator)
                for e in epsilons:
                    eps = e * scale
                    logits, o = measured_change(model, passage, layer, head, t0, v, w, eps)
                    measured = {"read": o[t0 + 1:], "logits": logits[t0 + 1:]}
                    for s in SCALES:
                        for m in METHODS:
                            predicted = eps * unit[s][m]
                            by_head[head, e, s, m].add(predicted, measured[s])
                            for kind in ("all", direction.kind):
                                pooled[head_groups[head], kind, e, s, m].add(predicted, measured[s])
                            for lo, hi in bins:
                                by_distance[head, e, (lo, hi), s, m].add(predicted[lo - 1 : hi - 1], measured[s][lo - 1 : hi - 1])
                    if e == epsilons[0]:
                        for m in METHODS:
                            drawn[m].append(eps * unit["logits"][m].flatten()[chosen])
                        drawn["measured"].append(measured["logits"].flatten()[chosen])
                        drawn["head"].append(torch.full((samples,), head))

    def share(h, e, s):  # each bin's part of the measured sum of squares (by_distance keeps it, alike for both methods)
        sums = [by_distance[h, e, b, s, "exact"].total_sq for b in bins]
        return [x / sum(sums) if sum(sums) > 0 else float("nan") for x in sums]

    return {
        "epsilons": list(epsilons), "t0": t0, "bins": [list(b) for b in bins], "head_groups": head_groups,
        "mean_state_norm": {h: sum(n) / len(n) for h, n in state_norms.items()} if relative_to_state else None,
        "r2": {g: {k: {e: _r2_values(pooled, g, k, e) for e in epsilons} for k in kinds[g]} for g in kinds},
        "r2_by_head": {h: {e: _r2_values(by_head, h, e) for e in epsilons} for h in heads},
        "r2_by_distance": {h: {e: {s: {m: [by_distance[h, e, b, s, m].value() for b in bins] for m in METHODS}
                                   for s in SCALES} for e in epsilons} for h in heads},
        "share_by_distance": {h: {e: {s: share(h, e, s) for s in SCALES} for e in epsilons} for h in heads},
        "samples": {name: torch.cat(entries) for name, entries in drawn.items()},
    }


def _r2_values(pools: dict, *key) -> dict:
    """{scale: {method: R²}} of the pools keyed (*key, scale, method)."""
    return {s: {m: pools[(*key, s, m)].value() for m in METHODS} for s in SCALES}
