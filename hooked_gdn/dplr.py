"""The diagonal-plus-low-rank (DPLR) memory recurrence of RWKV-7 (docs/design.md §17): a per-channel decay and an
erase along its own removal key, computed as a plain sequential reference, a chunked form and with carried edits.

Per head, with S_0 = 0 or a given initial state [b, H, d_k, d_v] (key-major, as everywhere here):

    e_t = −S_{t−1}ᵀ κ̂_t,   S_t = diag(w_t) S_{t−1} + (a_t ⊙ κ̂_t) e_tᵀ + k̃_t v_tᵀ,   o_t = S_tᵀ r_t,

that is S_t = G_t S_{t−1} + k̃_t v_tᵀ with G_t = diag(w_t) − (a_t ⊙ κ̂_t) κ̂_tᵀ. The erase reads the state
*before* the decay. Inputs in TransformerLens layout, position on dim 1, fp32: ``r`` (the read query),
``log_w`` (log w_t ≤ 0, per channel), ``kappa`` (the removal key κ̂), ``a`` (the in-context rate), ``k``
(the written key k̃) [b, T, H, d_k], and ``v`` [b, T, H, d_v].

The write k̃_t v_tᵀ does not depend on the state; the erase (a_t ⊙ κ̂_t) e_tᵀ does, and the two do not
merge into one rank-1 matrix, so edits name them apart (`DPLREdits`). Gated DeltaNet is the special case
w_t = α_t (every channel), κ̂_t = k̂_t, a_t = α_t β_t and k̃_t = β_t k̂_t (its erase reads the decayed state,
hence α_t in the rate); Mamba-2 is a_t = 0.

The chunked form (`chunked_dplr`): within a chunk starting from S_0, with γ_i the per-channel cumulative
log decay up to position i (γ_{−1} = 0) and α_j = a_j ⊙ κ̂_j, unrolling gives

    S_i = e^{γ_i} ⊙ S_0 + Σ_{j≤i} e^{γ_i − γ_j} ⊙ (α_j e_jᵀ + k̃_j v_jᵀ)           (⊙ over the rows, d_k),
    (I + P) E = −(κ̂ ⊙ e^{γ_{i−1}}) S_0 − Q V,   P_ij = κ̂_i · (e^{γ_{i−1} − γ_j} ⊙ α_j), Q_ij likewise with k̃_j (j < i),

one unit-lower-triangular solve per chunk. The pair products are matmuls of per-position factors
e^{γ_i} and e^{−γ_j} while the chunk's decay allows (`FACTORED_SPAN`: always, at
RWKV-7's decays and the default chunk); beyond it each exponent is formed as one difference γ_i − γ_j,
never positive, at the cost of a [C, C, d_k] tensor per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor

from .delta_rule import Transition, between_edits, edited_positions, every_state, step_by_step

DEFAULT_CHUNK_SIZE = 16

Rows = Float[Tensor, "b T H d_k"]  # r, log w, κ̂, a, k̃
Values = Float[Tensor, "b T H d_v"]
State = Float[Tensor, "b H d_k d_v"]


@dataclass(frozen=True)
class DPLRTransition(Transition):
    """RWKV-7's transition G_t = diag(w_t) − (a_t ⊙ κ̂_t) κ̂_tᵀ (`hooked_gdn.delta_rule.Transition`'s kind for this
    engine). It is not symmetric, so ``apply`` and ``adjoint`` differ; both take one position's per-channel
    ``log_w``, ``kappa`` and ``a``, broadcasting against ``x``."""

    def apply(self, x: Float[Tensor, "... d_k"], log_w: Tensor, kappa: Tensor, a: Tensor) -> Float[Tensor, "... d_k"]:
        """G_t x (a column of S_{t−1}, or an edit of it carried forward)."""
        return log_w.exp() * x - (a * kappa) * (kappa * x).sum(-1, keepdim=True)

    def adjoint(self, x: Float[Tensor, "... d_k"], log_w: Tensor, kappa: Tensor, a: Tensor) -> Float[Tensor, "... d_k"]:
        """G_tᵀ x (a read query carried back to an earlier position)."""
        return log_w.exp() * x - kappa * (a * kappa * x).sum(-1, keepdim=True)

    def decay_and_predict(self, *args):
        raise TypeError("the diagonal-plus-low-rank transition has no write prediction: its erase is a term of its own "
                        "(hooked_gdn.dplr.erase_value)")


DIAGONAL_PLUS_LOW_RANK = DPLRTransition("diagonal_plus_low_rank", erases=True)


@dataclass
class DPLROutput:
    out: Values  # o_t
    erase_value: Values  # e_t = −S_{t−1}ᵀ κ̂_t, as used (forced where an edit forced it)
    final_state: State
    states: Float[Tensor, "b P H d_k d_v"] | None = None  # S_t at the requested positions


@dataclass
class DPLREdits:
    """Edits carried exactly through the recurrence.

    ``write_mask`` [b, T, H] forces the write there to ``write_key ⊗ write_value`` ([b, T, H, d_k] and
    [b, T, H, d_v]) instead of k̃_t v_tᵀ; ``erase_mask`` [b, T, H] forces the erase to (a_t ⊙ κ̂_t) ⊗
    ``erase_value`` [b, T, H, d_v] instead of (a_t ⊙ κ̂_t) e_tᵀ (zeros delete it); ``state_diff``
    [b, P, H, d_k, d_v] is added to S_t, after its write, at each of ``diff_positions`` [P]. Later
    positions follow the recurrence from the edited state.
    """

    write_mask: Tensor | None = None
    write_key: Tensor | None = None
    write_value: Tensor | None = None
    erase_mask: Tensor | None = None
    erase_value: Tensor | None = None
    diff_positions: Tensor | None = None
    state_diff: Tensor | None = None

    def positions(self) -> list[int]:
        """The edited positions, in order."""
        return edited_positions([self.write_mask, self.erase_mask], self.diff_positions)


def _zero_state(k: Tensor, v: Tensor) -> Tensor:
    return k.new_zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3])


def erase_value(state: State, kappa: Float[Tensor, "b H d_k"]) -> Float[Tensor, "b H d_v"]:
    """e_t = −S_{t−1}ᵀ κ̂_t: what the erase removes, read from the state before the decay."""
    return -torch.einsum("bhkv,bhk->bhv", state, kappa)


def update(state: State, log_w, kappa, a, erase, key, value) -> State:
    """S_t = diag(w_t) S_{t−1} + (a_t ⊙ κ̂_t) e_tᵀ + k̃_t v_tᵀ, for one position's rows [b, H, d]."""
    return (state * log_w.exp()[..., None] + (a * kappa)[..., :, None] * erase[..., None, :]
            + key[..., :, None] * value[..., None, :])


def _step(state, t, r, log_w, kappa, a, k, v, edits: DPLREdits | None):
    """Position t, exactly, with its edits: returns (S_t, o_t, e_t)."""
    erase = erase_value(state, kappa[:, t])
    key, value = k[:, t], v[:, t]
    if edits is not None:
        if edits.erase_mask is not None:
            erase = torch.where(edits.erase_mask[:, t, :, None], edits.erase_value[:, t], erase)
        if edits.write_mask is not None:
            forced = edits.write_mask[:, t, :, None]
            key, value = torch.where(forced, edits.write_key[:, t], key), torch.where(forced, edits.write_value[:, t], value)
    state = update(state, log_w[:, t], kappa[:, t], a[:, t], erase, key, value)
    if edits is not None and edits.diff_positions is not None:
        for i in (edits.diff_positions == t).nonzero().flatten().tolist():
            state = state + edits.state_diff[:, i]
    return state, torch.einsum("bhkv,bhk->bhv", state, r[:, t]), erase


def dplr_reference(r: Rows, log_w: Rows, kappa: Rows, a: Rows, k: Rows, v: Values, initial_state: State | None = None,
                   edits: DPLREdits | None = None) -> DPLROutput:
    """The recurrence one position at a time, exactly as written; returns the states at every position."""
    step = lambda state, t: _step(state, t, r, log_w, kappa, a, k, v, edits)
    return DPLROutput(*step_by_step(step, _zero_state(k, v) if initial_state is None else initial_state, k.shape[1]))


#: the largest decay over one chunk, −γ_C (per channel), at which the pair products are formed from
#: per-position factors e^{γ_i} ≤ 1 and e^{−γ_j} ≤ e^{60} ≈ 1e26 (fp32 overflows at 3e38); above it (a decay
#: edited stronger than RWKV-7's layer makes: its floor, e^{−0.6065} a step, spans at most 9.7 over 16
#: positions) they are formed pair by pair.
FACTORED_SPAN = 60.0


def _pairs_factored(left, left_gamma, right, right_gamma, mask):
    """Σ_c left_ic right_jc e^{left_gamma_ic − right_gamma_jc} where ``mask`` [C_i, C_j], else 0: one matmul of
    per-position factors (see FACTORED_SPAN)."""
    return ((left * left_gamma.exp()) @ (right * (-right_gamma).exp()).transpose(-1, -2)) * mask


def _pairs_exact(left, left_gamma, right, right_gamma, mask):
    """The same, each pair's exponent formed as one difference (never positive where ``mask`` holds)."""
    decay = (left_gamma[..., :, None, :] - right_gamma[..., None, :, :]).masked_fill(~mask[..., None], float("-inf")).exp()
    return torch.einsum("...ic,...ijc,...jc->...ij", left, decay, right)


def chunked_dplr(r: Rows, log_w: Rows, kappa: Rows, a: Rows, k: Rows, v: Values, initial_state: State | None = None,
                 state_positions: Int[Tensor, " P"] | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> DPLROutput:
    """The chunked form of the module docstring; ``state_positions`` [P] asks for S_t at those positions."""
    b, T, H, d_k = k.shape
    d_v = v.shape[-1]
    C = chunk_size
    pad = -T % C  # padding: w = 1, κ̂ = a = k̃ = r = 0, v = 0: steps that change nothing
    chunked = lambda x: rearrange(F.pad(x, (0, 0, 0, 0, 0, pad)), "b (n c) h d -> b h n c d", c=C)
    r, log_w, kappa, a, k, v = (chunked(x) for x in (r, log_w, kappa, a, k, v))
    N = (T + pad) // C

    gamma = log_w.cumsum(-2)  # [b, H, N, C, d_k]: γ_i
    gamma_before = gamma - log_w  # γ_{i−1}
    removal = a * kappa  # α_j
    strict = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)  # j < i
    lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()  # j ≤ i
    pairs = _pairs_factored if bool((-gamma[..., -1, :]).max() <= FACTORED_SPAN) else _pairs_exact
    P = pairs(kappa, gamma_before, removal, gamma, strict)
    Q = pairs(kappa, gamma_before, k, gamma, strict)
    system = torch.eye(C, device=k.device) + P
    # E = W S_0 + U
    W = -torch.linalg.solve_triangular(system, kappa * gamma_before.exp(), upper=False, unitriangular=True)
    U = -torch.linalg.solve_triangular(system, Q @ v, upper=False, unitriangular=True)
    read_removal = pairs(r, gamma, removal, gamma, lower)
    read_key = pairs(r, gamma, k, gamma, lower)
    r_decayed = r * gamma.exp()
    to_end = (gamma[..., -1:, :] - gamma).exp()  # e^{γ_C − γ_j}
    removal_to_end, key_to_end = removal * to_end, k * to_end
    chunk_decay = gamma[..., -1, :].exp()[..., None]  # [b, H, N, d_k, 1]

    state = k.new_zeros(b, H, d_k, d_v) if initial_state is None else initial_state
    outs, erases, starts = [], [], []
    for n in range(N):
        starts.append(state)
        e = W[:, :, n] @ state + U[:, :, n]
        outs.append(r_decayed[:, :, n] @ state + read_removal[:, :, n] @ e + read_key[:, :, n] @ v[:, :, n])
        erases.append(e)
        state = (state * chunk_decay[:, :, n] + removal_to_end[:, :, n].transpose(-1, -2) @ e
                 + key_to_end[:, :, n].transpose(-1, -2) @ v[:, :, n])
    out, erase = torch.stack(outs, 2), torch.stack(erases, 2)

    states = None
    if state_positions is not None:
        if len(state_positions) == T and bool((state_positions == torch.arange(T, device=k.device)).all()):
            # every state: the step S_t = diag(w_t) S_{t−1} + α_t e_tᵀ + k̃_t v_tᵀ from each chunk's start, written once
            states = every_state(starts, log_w.exp(), [(removal, erase), (k, v)], T)
        else:  # some states: gather the rows of their chunks
            # S_i = e^{γ_i} ⊙ S_0 + Σ_j (e^{γ_i − γ_j} ⊙ α_j) e_jᵀ + (e^{γ_i − γ_j} ⊙ k̃_j) v_jᵀ: one product over the 2C terms
            values = torch.cat([erase, v], -2)  # [b, H, N, 2C, d_v]
            n, i = state_positions // C, state_positions % C
            start = torch.stack(starts, 2)[:, :, n]  # [b, H, P, d_k, d_v]
            exponent = gamma[:, :, n, i][..., None, :] - gamma[:, :, n]  # [b, H, P, C_j, d_k]: γ_i − γ_j
            decay = exponent.masked_fill(~lower[i][..., None], float("-inf")).exp()  # 0 for j > i
            keys = torch.cat([decay * removal[:, :, n], decay * k[:, :, n]], -2)  # [b, H, P, 2C, d_k]
            states = torch.baddbmm(start.mul_(gamma[:, :, n, i].exp()[..., None]).flatten(0, 2),
                                   keys.transpose(-1, -2).flatten(0, 2), values[:, :, n].flatten(0, 2))
            states = states.view_as(start).transpose(1, 2)

    unchunk = lambda x: rearrange(x, "b h n c d -> b (n c) h d")[:, :T]
    return DPLROutput(unchunk(out), unchunk(erase), state, states)


def dplr(r: Rows, log_w: Rows, kappa: Rows, a: Rows, k: Rows, v: Values, initial_state: State | None = None,
         state_positions: Int[Tensor, " P"] | None = None, edits: DPLREdits | None = None,
         chunk_size: int = DEFAULT_CHUNK_SIZE) -> DPLROutput:
    """The chunked recurrence with edits: chunked between edited positions, one exact step at each."""
    edited = edits.positions() if edits is not None else []
    if not edited:
        return chunked_dplr(r, log_w, kappa, a, k, v, initial_state, state_positions, chunk_size)
    inputs = (r, log_w, kappa, a, k, v)
    chunk = lambda start, end, state, positions: chunked_dplr(*(x[:, start:end] for x in inputs), state, positions, chunk_size)
    step = lambda state, t: _step(state, t, *inputs, edits)
    initial = _zero_state(k, v) if initial_state is None else initial_state
    return DPLROutput(*between_edits(chunk, step, initial, k.shape[1], edited, state_positions))
