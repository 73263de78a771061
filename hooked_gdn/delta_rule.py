"""The gated delta rule of docs/design.md §2, computed as in §6: a plain sequential reference, the chunked
fast path, and edits.

Every function takes the recurrence's inputs in TransformerLens layout, position on dim 1, already
head-expanded to the H_v value heads and in fp32:

- ``q``: read queries q̂ [b, T, H, d_k] (l2-normalised and scaled by 1/sqrt(d_k)),
- ``k``: write keys k̂ [b, T, H, d_k] (l2-normalised),
- ``v``: values v [b, T, H, d_v], ``g``: log decays g [b, T, H], ``beta``: write strengths β [b, T, H].

Per head, with S_0 = 0 or a given initial state [b, H, d_k, d_v]:

    S̃ = α_t S_{t−1},  δ_t = β_t (v_t − S̃ᵀ k̂_t),  S_t = S̃ + k̂_t δ_tᵀ,  o_t = S_tᵀ q̂_t,  α_t = exp(g_t).

The map S_{t−1} ↦ S̃_t that every position applies before its write is a named `Transition`:
``DELTA_RULE`` (α_t with the delta rule's erase, Gated DeltaNet) or ``SCALAR_DECAY`` (α_t alone, δ_t = β_t v_t:
Mamba-2's SSD layer, h_t = exp(Δ_t A) h_{t−1} + B_t (Δ_t x_t)ᵀ, y_t = h_tᵀ C_t, with q̂ = C, k̂ = B, v = x,
β = Δ, g = Δ A; `hooked_gdn.mamba2`). Every function below takes one, and edits mean the same under both.

``gated_delta_rule_reference`` runs that one position at a time; it is the ground truth that the
chunked path and every edit path are tested against. ``chunked_gated_delta_rule`` is the WY/UT
form: within a chunk of C positions the δ's solve one unit-lower-triangular system, so the cost is
a few matmuls per chunk and O(T·C·d) overall. ``gated_delta_rule`` adds edits (`DeltaRuleEdits`):
it runs the chunked form between edited positions and takes one exact step at each of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

DEFAULT_CHUNK_SIZE = 64

# the recurrence's inputs and outputs (b batch, T positions, H value heads)
Queries = Keys = Float[Tensor, "b T H d_k"]
Values = Float[Tensor, "b T H d_v"]
PerHead = Float[Tensor, "b T H"]  # g, β
State = Float[Tensor, "b H d_k d_v"]


@dataclass
class DeltaRuleOutput:
    out: Values  # o_t
    write_value: Values  # δ_t, as written (forced where an edit forced it)
    final_state: State  # S_T
    states: Float[Tensor, "b P H d_k d_v"] | None = None  # S_t at the requested positions


def edited_positions(masks: list[Tensor | None], diff_positions: Tensor | None) -> list[int]:
    """The positions an edit touches, in order: where any of the [b, T, H] ``masks`` is set, and ``diff_positions``."""
    edited = set()
    for mask in masks:
        if mask is not None:
            edited |= set(mask.any(dim=(0, 2)).nonzero().flatten().tolist())
    if diff_positions is not None:
        edited |= set(diff_positions.tolist())
    return sorted(edited)


@dataclass
class DeltaRuleEdits:
    """Edits carried exactly through the recurrence.

    ``write_mask`` [b, T, H] marks forced writes: there the write is ``write_key ⊗ write_value``
    (rows of [b, T, H, d_k] and [b, T, H, d_v]) instead of the delta rule's k̂_t δ_tᵀ; a zero value
    deletes it. ``state_diff`` [b, P, H, d_k, d_v] is added to S_t, after its write, at each of
    ``diff_positions`` [P]. Later positions follow the delta rule from the edited state.
    """

    write_mask: Tensor | None = None
    write_key: Tensor | None = None
    write_value: Tensor | None = None
    diff_positions: Tensor | None = None
    state_diff: Tensor | None = None

    def positions(self) -> list[int]:
        """The edited positions, in order."""
        return edited_positions([self.write_mask], self.diff_positions)

    def write_at(self, t: int, key: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        if self.write_mask is None:
            return key, delta
        forced = self.write_mask[:, t, :, None]
        return torch.where(forced, self.write_key[:, t], key), torch.where(forced, self.write_value[:, t], delta)

    def add_state_diff(self, t: int, state: Tensor) -> Tensor:
        if self.diff_positions is None:
            return state
        for i in (self.diff_positions == t).nonzero().flatten().tolist():
            state = state + self.state_diff[:, i]
        return state


@dataclass(frozen=True)
class Transition:
    """A kind of memory transition: the map A_t that a head's state goes through at one position before
    its write (docs/design.md §5). Each mixer's `hooked_gdn.memory.MatrixMemory` holds one, and it is
    the one owner of that map: the engine's steps, effective attention over the inputs, the
    logit-shift propagation and its gradient all ask it.

    - ``DELTA_RULE`` (Gated DeltaNet): A_t = α_t (I − β_t k̂_t k̂_tᵀ); the write δ_t = β_t (v_t − S̃ᵀ k̂_t)
      holds what the erase took out.
    - ``SCALAR_DECAY`` (Mamba-2's SSD): A_t = α_t I; δ_t = β_t v_t.

    Both are symmetric, so ``adjoint`` is ``apply``; a per-channel decay with its own removal key and
    rate (RWKV-7's diag(w_t) − (a_t ⊙ κ̂_t) κ̂_tᵀ) is neither, which is why the two are named apart.
    """

    name: str
    erases: bool  # the delta rule's erase term: S̃ᵀ k̂_t is subtracted from the value before it is written

    def apply(self, x: Float[Tensor, "... d_k"], k: Float[Tensor, "... d_k"], g: Tensor, beta: Tensor) -> Float[Tensor, "... d_k"]:
        """A_t x for key-space vectors x (the rows of S_{t−1}, or an edit of them carried forward). ``k``,
        and ``g``, ``beta`` with a trailing axis added, broadcast against ``x``."""
        if self.erases:
            x = x - (beta[..., None] * (x * k).sum(-1, keepdim=True)) * k
        return g.exp()[..., None] * x

    def adjoint(self, x: Float[Tensor, "... d_k"], k: Float[Tensor, "... d_k"], g: Tensor, beta: Tensor) -> Float[Tensor, "... d_k"]:
        """A_tᵀ x: a query carried back to an earlier position (effective attention over the inputs, the
        gradient of a later read with respect to an earlier state)."""
        return self.apply(x, k, g, beta)  # both kinds are symmetric

    def decay_and_predict(self, state: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        """One position's S̃ = α S and write value δ = β (v − S̃ᵀ k̂) (β v without the erase), for S [b, H, d_k, d_v]
        and per-head rows."""
        decayed = state * g.exp()[..., None, None]
        delta = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", decayed, k) if self.erases else v)
        return decayed, delta


DELTA_RULE = Transition("delta_rule", erases=True)
SCALAR_DECAY = Transition("scalar_decay", erases=False)


def write(decayed: Tensor, k: Tensor, delta: Tensor) -> Tensor:
    """S = S̃ + k̂ δᵀ."""
    return decayed + k[..., :, None] * delta[..., None, :]


def read(state: Tensor, q: Tensor) -> Tensor:
    """o = Sᵀ q̂."""
    return torch.einsum("bhkv,bhk->bhv", state, q)


def _zero_state(k: Tensor, v: Tensor) -> Tensor:
    return k.new_zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3])


def _edited_step(state, t, q, k, v, g, beta, edits: DeltaRuleEdits | None, transition: Transition):
    """Position t of the recurrence with its edits applied: returns (S_t, o_t, δ_t)."""
    decayed, delta = transition.decay_and_predict(state, k[:, t], v[:, t], g[:, t], beta[:, t])
    key = k[:, t]
    if edits is not None:
        key, delta = edits.write_at(t, key, delta)
    state = write(decayed, key, delta)
    if edits is not None:
        state = edits.add_state_diff(t, state)
    return state, read(state, q[:, t]), delta


def gated_delta_rule_reference(
    q: Queries, k: Keys, v: Values, g: PerHead, beta: PerHead,
    initial_state: State | None = None, edits: DeltaRuleEdits | None = None, transition: Transition = DELTA_RULE,
) -> DeltaRuleOutput:
    """The recurrence one position at a time, exactly as written; returns the states at every position."""
    step = lambda state, t: _edited_step(state, t, q, k, v, g, beta, edits, transition)
    return DeltaRuleOutput(*step_by_step(step, _zero_state(k, v) if initial_state is None else initial_state, k.shape[1]))


def step_by_step(step, initial: Tensor, T: int):
    """``step(state, t)`` (giving the state, o_t and the per-position second output) from ``initial`` over T
    positions: the outputs, the second outputs, the final state and every state, stacked on dim 1."""
    state, outs, seconds, states = initial, [], [], []
    for t in range(T):
        state, o, second = step(state, t)
        outs.append(o)
        seconds.append(second)
        states.append(state)
    return torch.stack(outs, 1), torch.stack(seconds, 1), state, torch.stack(states, 1)


def chunked_gated_delta_rule(
    q: Queries, k: Keys, v: Values, g: PerHead, beta: PerHead,
    initial_state: State | None = None, state_positions: Int[Tensor, " P"] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE, transition: Transition = DELTA_RULE,
) -> DeltaRuleOutput:
    """The WY/UT chunked form. ``state_positions`` [P] asks for S_t at those positions.

    Within a chunk starting from state S_0, with γ_i the cumulative log decay up to position i and
    D_ij = exp(γ_i − γ_j) for j ≤ i:

        (I + A) δ = β v − β e^γ k̂ S_0,   A_ij = β_i D_ij k̂_iᵀ k̂_j (j < i),
        o_i = e^{γ_i} S_0ᵀ q̂_i + Σ_{j≤i} D_ij (q̂_iᵀ k̂_j) δ_j,
        S_i = e^{γ_i} S_0 + Σ_{j≤i} D_ij k̂_j δ_jᵀ.

    Without the erase (``SCALAR_DECAY``) there is no system to solve: A = 0 and δ = β v (the SSD form
    of Mamba-2).
    The chunk-start states come from a loop over chunks. Some states at requested positions are then the
    last line, computed for all of them at once; every state is the recurrence's own step from each chunk's
    start (`every_state`), which writes each state once, at a few flops per entry.
    """
    b, T, H, d_k = k.shape
    d_v = v.shape[-1]
    C = chunk_size
    pad = -T % C
    q, k, v = (F.pad(x.transpose(1, 2), (0, 0, 0, pad)) for x in (q, k, v))  # [b, H, T', d]
    g, beta = (F.pad(x.transpose(1, 2), (0, pad)) for x in (g, beta))  # padding: g = β = k̂ = 0
    N = (T + pad) // C
    q, k, v = (x.reshape(b, H, N, C, -1) for x in (q, k, v))
    g, beta = (x.reshape(b, H, N, C) for x in (g, beta))

    gamma = g.cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    u, w = v * beta[..., None], None  # δ = u − w S_0
    if transition.erases:
        k_beta = k * beta[..., None]
        system = (k_beta @ k.transpose(-1, -2)) * decay  # I + A, with its diagonal taken as 1 below
        u = torch.linalg.solve_triangular(system, u, upper=False, unitriangular=True)
        w = torch.linalg.solve_triangular(system, k_beta * gamma.exp()[..., None], upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * gamma.exp()[..., None]
    k_to_chunk_end = k * (gamma[..., -1:] - gamma).exp()[..., None]
    chunk_decay = gamma[..., -1].exp()[..., None, None]

    state = k.new_zeros(b, H, d_k, d_v) if initial_state is None else initial_state
    outs, deltas, chunk_starts = [], [], []  # lists, not in-place writes, so autograd can run back through
    for n in range(N):
        chunk_starts.append(state)
        delta_n = u[:, :, n] if w is None else u[:, :, n] - w[:, :, n] @ state
        outs.append(q_decayed[:, :, n] @ state + qk[:, :, n] @ delta_n)
        deltas.append(delta_n)
        state = state * chunk_decay[:, :, n] + k_to_chunk_end[:, :, n].transpose(-1, -2) @ delta_n
    out, delta = torch.stack(outs, 2), torch.stack(deltas, 2)

    states = None
    if state_positions is not None:
        if len(state_positions) == T and bool((state_positions == torch.arange(T, device=k.device)).all()):
            states = every_state(chunk_starts, g.exp()[..., None], [(k, delta)], T)
        else:  # some states: gather the rows of their chunks; e^{γ_i} S_0 first, then += Σ_j D_ij k̂_j δ_jᵀ in place
            n, i = state_positions // C, state_positions % C
            states = torch.stack(chunk_starts, 2)[:, :, n].mul_(gamma[:, :, n, i].exp()[..., None, None])  # [b, H, P, d_k, d_v]
            weighted_keys = (k[:, :, n] * decay[:, :, n, i][..., None]).transpose(-1, -2)  # D_ij k̂_j, 0 for j > i
            states.view(-1, d_k, d_v).baddbmm_(weighted_keys.reshape(-1, d_k, C), delta[:, :, n].reshape(-1, C, d_v))
            states = states.transpose(1, 2)

    unchunk = lambda x: rearrange(x, "b h n c d -> b (n c) h d")[:, :T]
    return DeltaRuleOutput(unchunk(out), unchunk(delta), state, states)


def every_state(
    chunk_starts: list[State], decay: Float[Tensor, "b H N C d_k_or_1"],
    terms: list[tuple[Float[Tensor, "b H N C d_k"], Float[Tensor, "b H N C d_v"]]], T: int,
) -> Float[Tensor, "b T H d_k d_v"]:
    """Every state S_t, t < T, of a chunked recurrence whose step is S_t = decay_t ⊙ S_{t−1} + Σ key_t value_tᵀ (one
    rank-1 term per pair of ``terms``; ``decay`` scales the rows, per head or per channel), given each chunk's
    start state and the chunked rows (C positions per chunk, padding past T).

    The step itself is taken, at position i of every chunk at once, into the [b, T, H, d_k, d_v] result in place:
    each state is written once, and read once by its successor. Unrolled within the chunk, the same states are one
    product with C keys per state (S_i = e^{γ_i} S_0 + Σ_j D_ij k̂_j δ_jᵀ): 2·C flops per entry and a [C, d_k, C]
    tensor of weighted keys per chunk, which cost two to three times the writing of the states; the step costs
    2 + 2·len(terms) flops per entry and nothing beside the result (benchmarks/bench_engine.py, P2b)."""
    b, H, N, C = decay.shape[:4]
    d_k, d_v = terms[0][0].shape[-1], terms[0][1].shape[-1]
    by_chunk = lambda x: x.movedim(1, 3)  # [b, N, C, H, ...]: position i of every chunk is one slice
    decay = by_chunk(decay)[..., None]
    terms = [(by_chunk(key)[..., :, None], by_chunk(value)[..., None, :]) for key, value in terms]
    states = chunk_starts[0].new_empty(b, T, H, d_k, d_v)
    previous = torch.stack(chunk_starts, 1)  # [b, N, H, d_k, d_v]
    for i in range(min(C, T)):
        current = states[:, i::C]  # position i of each chunk that reaches it (the last may not)
        n = current.shape[1]
        current.copy_(previous[:, :n]).mul_(decay[:, :n, i])  # in place, so autograd can run back through
        for key, value in terms:
            current.addcmul_(key[:, :n, i], value[:, :n, i])
        previous = current
    return states


def gated_delta_rule(
    q: Queries, k: Keys, v: Values, g: PerHead, beta: PerHead,
    initial_state: State | None = None, state_positions: Int[Tensor, " P"] | None = None,
    edits: DeltaRuleEdits | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE, transition: Transition = DELTA_RULE,
) -> DeltaRuleOutput:
    """The chunked recurrence with edits: chunked between edited positions, one exact step at each."""
    edited = edits.positions() if edits is not None else []
    if not edited:
        return chunked_gated_delta_rule(q, k, v, g, beta, initial_state, state_positions, chunk_size, transition)
    chunk = lambda start, end, state, positions: chunked_gated_delta_rule(
        q[:, start:end], k[:, start:end], v[:, start:end], g[:, start:end], beta[:, start:end], state, positions, chunk_size,
        transition)
    step = lambda state, t: _edited_step(state, t, q, k, v, g, beta, edits, transition)
    initial = _zero_state(k, v) if initial_state is None else initial_state
    return DeltaRuleOutput(*between_edits(chunk, step, initial, k.shape[1], edited, state_positions))


def between_edits(chunk, step, initial: Tensor, T: int, edited: list[int], state_positions: Tensor | None):
    """A recurrence with edits at the positions ``edited``: ``chunk(start, end, state, positions)`` (its chunked
    form over [start, end), giving out, the per-position second output, the final state and the states at
    ``positions``, the fields of a `DeltaRuleOutput` or alike, in that order) on each stretch between them and ``step(state, t)`` (an exact step with the edits, giving
    the state, o_t and the second output) at each. Returns the four, states at ``state_positions``."""
    wanted = state_positions.tolist() if state_positions is not None else []
    state, outs, seconds, states = initial, [], [], {}
    start = 0
    for e in edited + [T]:
        if e > start:
            in_segment = [p for p in wanted if start <= p < e]
            segment = chunk(start, e, state, torch.tensor(in_segment, device=initial.device) - start if in_segment else None)
            out, second, state, segment_states = (getattr(segment, f.name) for f in fields(segment))
            outs.append(out)
            seconds.append(second)
            states.update({p: segment_states[:, j] for j, p in enumerate(in_segment)})
        if e == T:
            break
        state, o, second = step(state, e)
        outs.append(o[:, None])
        seconds.append(second[:, None])
        if e in wanted:
            states[e] = state
        start = e + 1
    stacked = torch.stack([states[p] for p in wanted], 1) if wanted else None
    return torch.cat(outs, 1), torch.cat(seconds, 1), state, stacked
