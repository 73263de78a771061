"""The DPLR recurrence of RWKV-7 (`hooked_gdn.dplr`): the sequential reference against the recurrence written
out by hand, the chunked form and the edit path against the reference, and Gated DeltaNet and Mamba-2 as its
special cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hooked_gdn.delta_rule import SCALAR_DECAY, DeltaRuleEdits, gated_delta_rule_reference
from hooked_gdn.dplr import DPLREdits, chunked_dplr, dplr, dplr_reference

from .test_delta_rule import assert_close


def rwkv7_inputs(seed: int, b: int = 2, T: int = 23, H: int = 3, d_k: int = 8, d_v: int = 6, strong_decay: bool = False):
    """RWKV-7's inputs as its layer makes them: w ∈ (0.545, 1) (strong: down to e^{−0.6065}, the layer's floor),
    a = σ(·) ∈ (0, 1), κ̂ unit per head, k̃ = k ⊙ (1 + (a − 1) ⊙ k_a), and an initial state."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    rows = (b, T, H, d_k)
    log_w = -0.6065 * torch.sigmoid(randn(*rows) + (3.0 if strong_decay else -1.0))
    a = torch.sigmoid(randn(*rows))
    kappa = torch.nn.functional.normalize(randn(*rows), dim=-1)
    k = randn(*rows) * (1 + (a - 1) * torch.rand(d_k, generator=g))
    return randn(*rows), log_w, kappa, a, k, randn(b, T, H, d_v), randn(b, H, d_k, d_v)


def test_reference_is_the_recurrence_as_written():
    """S_t = diag(w) S − (a ⊙ κ̂)(κ̂ᵀ S) + k̃ vᵀ (the erase reads the undecayed state), o = Sᵀ r, e = −Sᵀ κ̂."""
    r, log_w, kappa, a, k, v, S = rwkv7_inputs(0, b=1, T=5, H=1)
    got = dplr_reference(r, log_w, kappa, a, k, v, S)
    for t in range(5):
        w, kap, rate = log_w[0, t, 0].exp(), kappa[0, t, 0], a[0, t, 0]
        erase = -S[0, 0].T @ kap
        S = S.clone()
        S[0, 0] = torch.diag(w) @ S[0, 0] - torch.outer(rate * kap, kap @ S[0, 0]) + torch.outer(k[0, t, 0], v[0, t, 0])
        assert_close(got.erase_value[0, t, 0], erase)
        assert_close(got.states[0, t, 0], S[0, 0])
        assert_close(got.out[0, t, 0], S[0, 0].T @ r[0, t, 0])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 50), chunk_size=st.sampled_from([1, 4, 16, 64]),
       strong=st.booleans(), initial=st.booleans())
def test_chunked_equals_the_reference(seed, T, chunk_size, strong, initial):
    """Outputs, erase values, the final state and the state at every position, from a zero or a given state,
    at the slowest and the strongest decays RWKV-7's layer can make."""
    r, log_w, kappa, a, k, v, S0 = rwkv7_inputs(seed, T=T, strong_decay=strong)
    S0 = S0 if initial else None
    ref = dplr_reference(r, log_w, kappa, a, k, v, S0)
    fast = chunked_dplr(r, log_w, kappa, a, k, v, S0, torch.arange(T), chunk_size)
    for got, want in [(fast.out, ref.out), (fast.erase_value, ref.erase_value), (fast.final_state, ref.final_state),
                      (fast.states, ref.states)]:
        assert_close(got, want)


def test_states_at_chosen_positions():
    r, log_w, kappa, a, k, v, S0 = rwkv7_inputs(1, T=41)
    positions = torch.tensor([0, 15, 16, 17, 40])
    ref = dplr_reference(r, log_w, kappa, a, k, v, S0)
    fast = chunked_dplr(r, log_w, kappa, a, k, v, S0, positions, chunk_size=16)
    assert fast.states.shape == (2, 5, 3, 8, 6)
    assert_close(fast.states, ref.states[:, positions])


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_every_state_equals_the_product_form(chunk_size):
    """Every state (the step per position of all chunks at once, `hooked_gdn.delta_rule.every_state`) against the
    unrolled per-chunk product it replaced, which the engine still uses for other positions (asked for in reverse
    order, the same positions take that path), over several chunks and a partial last one, in the result's layout."""
    inputs = rwkv7_inputs(5, T=75, strong_decay=True)
    every = chunked_dplr(*inputs, torch.arange(75), chunk_size)
    product = chunked_dplr(*inputs, torch.arange(75).flip(0), chunk_size)
    assert every.states.shape == (2, 75, 3, 8, 6) and every.states.is_contiguous()
    assert_close(every.states, product.states.flip(1))
    assert_close(every.states, dplr_reference(*inputs).states)


@pytest.mark.parametrize("log_w", [None, -2.0])  # the layer's decays (factored) and decays beyond FACTORED_SPAN over 64
def test_every_state_has_the_references_gradient(log_w):
    """The every-state path writes its states in place; the gradient of every state with respect to every input is
    still the reference's."""
    inputs = list(rwkv7_inputs(2, T=37))
    if log_w is not None:
        inputs[1] = torch.full_like(inputs[1], log_w)
    inputs = [x.requires_grad_() for x in inputs]
    weights = torch.randn(2, 37, 3, 8, 6, generator=torch.Generator().manual_seed(3))
    (chunked_dplr(*inputs, torch.arange(37), chunk_size=64).states * weights).sum().backward()
    fast = [x.grad for x in inputs[1:]]  # the states do not depend on the read query r
    for x in inputs:
        x.grad = None
    (dplr_reference(*inputs).states * weights).sum().backward()
    for got, x in zip(fast, inputs[1:]):
        assert_close(got, x.grad)


@pytest.mark.parametrize("log_w", [-0.6065, -2.0])
def test_no_factor_overflows_over_a_long_chunk(log_w):
    """64 positions at RWKV-7's strongest decay (−γ_C = 38.8: the per-position factors stay below e^{38.8}) and
    at a decay no layer makes (−γ_C = 128: beyond FACTORED_SPAN, where e^{128} would overflow, each pair's
    exponent is formed as one difference): finite and exact either way."""
    r, _, kappa, a, k, v, S0 = rwkv7_inputs(2, T=128)
    log_w = torch.full_like(r, log_w)
    fast = chunked_dplr(r, log_w, kappa, a, k, v, S0, torch.arange(128), chunk_size=64)
    ref = dplr_reference(r, log_w, kappa, a, k, v, S0)
    assert torch.isfinite(fast.out).all()
    assert_close(fast.out, ref.out)
    assert_close(fast.states, ref.states)


def edits_for(seed: int, T: int, b: int = 2, H: int = 3, d_k: int = 8, d_v: int = 6) -> DPLREdits:
    """A forced write, a deleted erase, a forced erase and two state differences, on some heads."""
    g = torch.Generator().manual_seed(seed)
    write_mask = torch.zeros(b, T, H, dtype=torch.bool)
    write_mask[0, T // 3, 1] = True
    erase_mask = torch.zeros(b, T, H, dtype=torch.bool)
    erase_mask[:, T // 2, 0] = True  # deleted (zero value) on sequence 0, forced on sequence 1
    erase_value = torch.zeros(b, T, H, d_v)
    erase_value[1, T // 2, 0] = torch.randn(d_v, generator=g)
    return DPLREdits(write_mask=write_mask, write_key=torch.randn(b, T, H, d_k, generator=g),
                     write_value=torch.randn(b, T, H, d_v, generator=g), erase_mask=erase_mask, erase_value=erase_value,
                     diff_positions=torch.tensor([T // 4, T - 2]), state_diff=torch.randn(b, 2, H, d_k, d_v, generator=g))


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_edits_are_carried_exactly(chunk_size):
    T = 30
    r, log_w, kappa, a, k, v, S0 = rwkv7_inputs(3, T=T)
    edits = edits_for(3, T)
    ref = dplr_reference(r, log_w, kappa, a, k, v, S0, edits)
    fast = dplr(r, log_w, kappa, a, k, v, S0, torch.arange(T), edits, chunk_size)
    for got, want in [(fast.out, ref.out), (fast.erase_value, ref.erase_value), (fast.final_state, ref.final_state),
                      (fast.states, ref.states)]:
        assert_close(got, want)
    clean = dplr_reference(r, log_w, kappa, a, k, v, S0)
    first = T // 4
    assert_close(ref.out[:, :first], clean.out[:, :first])  # nothing changes before the first edit
    assert not torch.allclose(ref.out[:, -1], clean.out[:, -1])  # and every edit reaches the end


def test_a_deleted_erase_is_the_recurrence_without_it_there():
    T, t = 9, 4
    r, log_w, kappa, a, k, v, S0 = rwkv7_inputs(4, b=1, T=T)
    mask = torch.zeros(1, T, 3, dtype=torch.bool)
    mask[:, t] = True
    edited = dplr_reference(r, log_w, kappa, a, k, v, S0, DPLREdits(erase_mask=mask, erase_value=torch.zeros(1, T, 3, 6)))
    no_rate = a.clone()
    no_rate[:, t] = 0
    assert_close(edited.states, dplr_reference(r, log_w, kappa, no_rate, k, v, S0).states)


def gdn_as_dplr(q, k, v, g, beta):
    """Gated DeltaNet's inputs in DPLR form: w = α, κ̂ = k̂, a = α β, k̃ = β k̂ (every channel alike)."""
    alpha = g.exp()[..., None]
    rows = lambda x: x.expand_as(k)
    return q, rows(g[..., None]), k, rows(alpha * beta[..., None]), beta[..., None] * k, v


@pytest.mark.parametrize("T", [1, 17, 40])
def test_gated_deltanet_is_a_special_case(T):
    """The same engine on GDN's transition gives GDN's states and reads (`gated_delta_rule_reference`), and,
    with a = 0, Mamba-2's."""
    gen = torch.Generator().manual_seed(T)
    b, H, d_k, d_v = 2, 3, 8, 6
    q = torch.nn.functional.normalize(torch.randn(b, T, H, d_k, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(b, T, H, d_k, generator=gen), dim=-1)
    v, S0 = torch.randn(b, T, H, d_v, generator=gen), torch.randn(b, H, d_k, d_v, generator=gen)
    g, beta = -torch.rand(b, T, H, generator=gen), torch.rand(b, T, H, generator=gen) * 2
    gdn = gated_delta_rule_reference(q, k, v, g, beta, S0)
    as_dplr = chunked_dplr(*gdn_as_dplr(q, k, v, g, beta), S0, torch.arange(T), chunk_size=16)
    assert_close(as_dplr.states, gdn.states)
    assert_close(as_dplr.out, gdn.out)
    # GDN's write value δ = β v − β α k̂ᵀ S_{t−1} is the DPLR write (β v) plus its erase α β e_t
    assert_close(beta[..., None] * v + (g.exp() * beta)[..., None] * as_dplr.erase_value, gdn.write_value)
    r, log_w, kappa, a, k_tilde, v_ = gdn_as_dplr(q, k, v, g, beta)
    mamba = gated_delta_rule_reference(q, k, v, g, beta, S0, transition=SCALAR_DECAY)
    assert_close(chunked_dplr(r, log_w, kappa, torch.zeros_like(a), k_tilde, v_, S0).out, mamba.out)


def test_gdn_edits_are_dplr_edits():
    """A forced GDN write k̂ ⊗ δ is, in DPLR terms, the write forced to k̂ ⊗ δ with the erase deleted."""
    T, t = 12, 5
    gen = torch.Generator().manual_seed(7)
    b, H, d_k, d_v = 1, 2, 4, 3
    q, k = (torch.nn.functional.normalize(torch.randn(b, T, H, d_k, generator=gen), dim=-1) for _ in range(2))
    v, delta = torch.randn(b, T, H, d_v, generator=gen), torch.randn(b, T, H, d_v, generator=gen)
    g, beta = -torch.rand(b, T, H, generator=gen), torch.rand(b, T, H, generator=gen)
    mask = torch.zeros(b, T, H, dtype=torch.bool)
    mask[:, t, 1] = True
    gdn = gated_delta_rule_reference(q, k, v, g, beta, edits=DeltaRuleEdits(write_mask=mask, write_key=k, write_value=delta))
    forced = DPLREdits(write_mask=mask, write_key=k, write_value=delta, erase_mask=mask, erase_value=torch.zeros_like(v))
    assert_close(dplr_reference(*gdn_as_dplr(q, k, v, g, beta), edits=forced).states, gdn.states)
