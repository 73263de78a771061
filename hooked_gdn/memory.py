"""`MatrixMemory`: a layer's matrix memory, the one component every recurrent mixer is built on.

Each head keeps a state S_t [d_k, d_v]; each position decays (and, with an erase, partly removes) it by
the layer's `Transition`, writes a rank-1 k̂_t δ_tᵀ and reads o_t = S_tᵀ q̂_t (docs/design.md §5). This
class owns everything about that memory and nothing else: its hook points, under the names every family
shares (``hook_read_query``, ``hook_write_key``, ``hook_write_value``, ``hook_state``,
``hook_final_state``, ``hook_recurrence_out``); the chunked recurrence with write and state edits
carried forward exactly, and the sequential one whose hooks fire per position (§8); the states at
``state_positions``; and the cache's recurrent state.

A mixer *is* a `MatrixMemory`: the Gated DeltaNet layer (`hooked_gdn.layers.GatedDeltaNet`) and
Mamba-2's SSD mixer (`hooked_gdn.mamba2.Mamba2Mixer`) subclass it, call its constructor with their
transition, hold only what is their own (projections, conv, gates, output norm) and hand their q̂, k̂,
v, g and β to `recur`. So the memory's hook points sit directly on the mixer
(``blocks.L.linear_attn.hook_state``), as TransformerLens users address them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from .delta_rule import DeltaRuleEdits, Transition, gated_delta_rule, read, write
from .dplr import DIAGONAL_PLUS_LOW_RANK, DPLREdits, dplr, erase_value, update
from .hook_points import CheckedHookPoint, any_hooked
from .sites import tell_positions

if TYPE_CHECKING:
    from .layers import ForwardContext


class MatrixMemory(nn.Module):
    """The matrix memory of a layer's heads (see the module docstring); ``transition`` is its kind."""

    #: what the memory census (`hooked_gdn.census`) reads beyond the shared hooks: the hook whose mean is its β
    #: column (the write strength: GDN's β_t, Mamba-2's Δ_t), and whether the norm the read goes into centres it
    RATE_HOOK = "hook_beta"
    READ_NORM_CENTRES = False

    def __init__(self, layer: int, transition: Transition):
        super().__init__()
        self.layer, self.transition = layer, transition
        # b batch, p positions, H heads; the memory's hook points are fp32
        self.hook_read_query = CheckedHookPoint()  # [b, p, H, d_k]: q̂
        self.hook_write_key = CheckedHookPoint()  # [b, p, H, d_k]: k̂; edits carried
        self.hook_write_value = CheckedHookPoint()  # [b, p, H, d_v]: δ; edits carried
        self.hook_state = CheckedHookPoint()  # [b, P, H, d_k, d_v]: S_t at state_positions; edits carried
        self.hook_final_state = CheckedHookPoint(position_axis=None)  # [b, H, d_k, d_v]: what a cache continues from
        self.hook_recurrence_out = CheckedHookPoint()  # [b, p, H, d_v]: o

    def recur(
        self,
        read_query: Float[Tensor, "b p H d_k"],
        write_key: Float[Tensor, "b p H d_k"],
        value: Float[Tensor, "b p H d_v"],
        log_decay: Float[Tensor, "b p H"],
        strength: Float[Tensor, "b p H"],
        ctx: ForwardContext,
        out_dtype: torch.dtype | None = None,
    ) -> Float[Tensor, "b p H d_v"]:
        """The reads o_t of the current input (in ``out_dtype``, default fp32), continuing from and updating
        ``ctx.cache``; the inputs are fp32 and already expanded to the H value heads."""
        return self._recur(read_query, (write_key, value, log_decay, strength), ctx, out_dtype)

    def _recur(self, read_query: Tensor, inputs: tuple, ctx: ForwardContext, out_dtype: torch.dtype | None = None) -> Tensor:
        """What every engine's recurrence shares: the read query's hook, the cache's state in and out, the final
        state's and the read's hooks; ``inputs`` are the engine's other inputs, in its order, which the mode's
        recurrence (``_parallel`` or ``_sequential``, given the query first) takes."""
        read_query = self.hook_read_query(read_query)
        initial = None if ctx.cache is None else ctx.cache.recurrent_states.get(self.layer)
        recurrence = self._sequential if ctx.sequential else self._parallel
        out, final = recurrence((read_query, *inputs), initial, ctx)
        final = self.hook_final_state(final)
        if ctx.cache is not None:
            ctx.cache.update_recurrent_state(self.layer, final)
        return self.hook_recurrence_out(out if out_dtype is None else out.to(out_dtype))

    def _parallel(self, inputs, initial, ctx: ForwardContext):
        """Chunked recurrence; write and state edits returned by hooks are carried forward exactly."""
        q_hat, k_hat, v, g, beta = inputs
        run = lambda edits, positions: gated_delta_rule(q_hat, k_hat, v, g, beta, initial, positions, edits, ctx.chunk_size,
                                                        self.transition)
        fire_writes = lambda result, edits: self._force_edited_writes(k_hat, result.write_value, edits)
        return self._carry_edits(run, fire_writes, DeltaRuleEdits(), k_hat.shape[1], ctx)

    def _force_edited_writes(self, key: Tensor, value: Tensor, edits) -> bool:
        """Fire the write hooks on the write's two sides; where either side of a row changed, that row's write is
        forced to the hooks' key and value (``edits.write_mask``, ``write_key``, ``write_value``: the fields
        `DeltaRuleEdits` and `DPLREdits` share). Returns whether any row was."""
        key, key_edited, _ = self.hook_write_key.fire_and_diff(key, 1)
        value, value_edited, _ = self.hook_write_value.fire_and_diff(value, 1)
        edited = [m for m in (key_edited, value_edited) if m is not None]
        if edited:
            edits.write_mask = edited[0] if len(edited) == 1 else edited[0] | edited[1]
            edits.write_key, edits.write_value = key.float(), value.float()
        return bool(edited)

    def _carry_edits(self, run, fire_writes, edits, T: int, ctx: ForwardContext):
        """The parallel flow every engine shares: ``run(edits, positions)`` (the chunked engine with edits, giving
        ``out``, ``final_state`` and ``states`` at ``positions``), then the write hooks (``fire_writes(result,
        edits)`` fills ``edits`` from what they changed and says whether they did), rerun with those edits, then
        the state hook at the chosen positions, rerun with its differences.

        The states and writes are formed beside the reads, so a gradient reaches them only as an edit's. A backward
        hook on the state hook makes its difference (zero where no forward hook edits) an edit at every position it
        fired at, carried as any edit is: the reads then depend on the hooked states, whose gradient is the loss's
        through everything after them, as the sequential loop's (tests/test_backward_hooks.py). An edit at every row
        would force every write as given, cutting each later write's dependence on the state that the loop keeps
        (docs/design.md §8.3), so a backward hook on a write (`write_hooks`) is refused here: the loop gives it."""
        write_hooked = [name for hp in self.write_hooks() for name in hp.backward_hooked_names()]
        if write_hooked:
            raise ValueError(f"backward hooks on {', '.join(write_hooked)} need recurrence='sequential': the chunked "
                             "recurrence forms the writes beside its reads, so no gradient passes through them there; "
                             "the sequential loop passes each position's on (its hooks fire once a position, with p = 1)")
        hooked_state = any_hooked(self.hook_state)
        positions = None
        if hooked_state:
            positions = ctx.state_positions if ctx.state_positions is not None else torch.arange(T, device=self.device_of(ctx))
        result = run(None, positions)
        if any_hooked(*self.write_hooks()):
            tell_positions(ctx.past_length + torch.arange(T), *self.write_hooks())
            if fire_writes(result, edits):
                result = run(edits, positions)
        if hooked_state:
            tell_positions(ctx.past_length + positions.cpu(), self.hook_state)
            recompute = lambda: run(edits, positions).states
            states, edited, original = self.hook_state.fire_and_diff(result.states, 2, recompute)
            if self.hook_state.backward_hooked_names():
                edited = torch.ones(states.shape[:3], dtype=torch.bool, device=states.device)
            if edited is not None:
                rows = edited.any(dim=(0, 2)).nonzero().flatten()
                edits.diff_positions = positions[rows]
                edits.state_diff = (states - original)[:, rows].float()
                result = run(edits, None)
        return result.out, result.final_state

    @property
    def W_O(self) -> Float[Tensor, "H d_v d_model"]:
        """TransformerLens' per-head output weights: head h adds ``hook_gated_out``[..., h, :] @ W_O[h] to the
        residual stream (every mixer ends in ``W_o`` applied to its heads' gated outputs, concatenated)."""
        return rearrange(self.W_o, "m (h d) -> h d m", h=self.cfg.n_value_heads)

    def read_norm_eps(self) -> float:
        """The ε of the norm the read o_t goes into (both mixers' gated RMSNorm, ``norm``)."""
        return self.norm.eps

    def write_hooks(self) -> tuple:
        """The hook points whose edits force a position's write (and, with an erase of its own, its erase)."""
        return (self.hook_write_key, self.hook_write_value)

    @staticmethod
    def device_of(ctx: ForwardContext):
        return ctx.position_ids.device

    def _sequential(self, inputs, initial, ctx: ForwardContext):
        """One position at a time; the write and state hooks fire per position with p = 1."""
        q_hat, k_hat, v, g, beta = inputs
        state = initial if initial is not None else k_hat.new_zeros(k_hat.shape[0], k_hat.shape[2], k_hat.shape[3], v.shape[3])
        fire_state = set(range(k_hat.shape[1]) if ctx.state_positions is None else ctx.state_positions.tolist())
        outs = []
        for t in range(k_hat.shape[1]):
            tell_positions(torch.tensor([ctx.past_length + t]), *self.write_hooks(), self.hook_state)
            decayed, delta = self.transition.decay_and_predict(state, k_hat[:, t], v[:, t], g[:, t], beta[:, t])
            key = self.hook_write_key(k_hat[:, t : t + 1])[:, 0]
            delta = self.hook_write_value(delta[:, None])[:, 0]
            state = write(decayed, key.float(), delta.float())
            if t in fire_state:
                state = self.hook_state(state[:, None])[:, 0].float()
            outs.append(read(state, q_hat[:, t]))
        return torch.stack(outs, 1), state


class DPLRMemory(MatrixMemory):
    """A `MatrixMemory` whose transition is diagonal plus low rank (RWKV-7, `hooked_gdn.dplr`): a per-channel decay
    w_t, an erase along its own removal key κ̂_t at its own rate a_t, and a write k̃_t v_tᵀ that does not depend
    on the state. Its erase (a_t ⊙ κ̂_t) e_tᵀ, with e_t = −S_{t−1}ᵀ κ̂_t, is a second rank-1 term, so it has a hook
    point of its own, ``hook_erase_value`` [b, p, H, d_v] (e_t; edits carried: a changed row forces that erase,
    zeros delete it); ``hook_write_key`` is k̃_t and ``hook_write_value`` v_t. States, final state and reads are
    the memory's, as for every family."""

    def __init__(self, layer: int):
        super().__init__(layer, DIAGONAL_PLUS_LOW_RANK)
        self.hook_erase_value = CheckedHookPoint()  # [b, p, H, d_v]: e_t; edits carried

    def write_hooks(self) -> tuple:
        return (self.hook_write_key, self.hook_write_value, self.hook_erase_value)

    def recur_dplr(
        self,
        read_query: Float[Tensor, "b p H d_k"],
        log_w: Float[Tensor, "b p H d_k"],
        kappa: Float[Tensor, "b p H d_k"],
        a: Float[Tensor, "b p H d_k"],
        write_key: Float[Tensor, "b p H d_k"],
        value: Float[Tensor, "b p H d_v"],
        ctx: ForwardContext,
    ) -> Float[Tensor, "b p H d_v"]:
        """The reads o_t = S_tᵀ r_t (fp32), continuing from and updating ``ctx.cache``; inputs fp32."""
        return self._recur(read_query, (log_w, kappa, a, write_key, value), ctx)

    def _parallel(self, inputs, initial, ctx: ForwardContext):
        run = lambda edits, positions: dplr(*inputs, initial, positions, edits, ctx.chunk_size)
        key, value = inputs[4], inputs[5]

        def fire_writes(result, edits: DPLREdits) -> bool:
            written = self._force_edited_writes(key, value, edits)
            erase, erase_edited, _ = self.hook_erase_value.fire_and_diff(result.erase_value, 1)
            if erase_edited is not None:
                edits.erase_mask, edits.erase_value = erase_edited, erase.float()
            return written or erase_edited is not None

        return self._carry_edits(run, fire_writes, DPLREdits(), key.shape[1], ctx)

    def _sequential(self, inputs, initial, ctx: ForwardContext):
        """One position at a time; the write, erase and state hooks fire per position with p = 1."""
        r, log_w, kappa, a, k, v = inputs
        state = initial if initial is not None else k.new_zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3])
        fire_state = set(range(k.shape[1]) if ctx.state_positions is None else ctx.state_positions.tolist())
        outs = []
        for t in range(k.shape[1]):
            tell_positions(torch.tensor([ctx.past_length + t]), *self.write_hooks(), self.hook_state)
            erase = self.hook_erase_value(erase_value(state, kappa[:, t])[:, None])[:, 0].float()
            key = self.hook_write_key(k[:, t : t + 1])[:, 0].float()
            value = self.hook_write_value(v[:, t : t + 1])[:, 0].float()
            state = update(state, log_w[:, t], kappa[:, t], a[:, t], erase, key, value)
            if t in fire_state:
                state = self.hook_state(state[:, None])[:, 0].float()
            outs.append(read(state, r[:, t]))
        return torch.stack(outs, 1), state
