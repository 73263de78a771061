"""The chunked recurrence and its edit paths against the sequential reference of docs/design.md §6.1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hooked_gdn.delta_rule import (
    DELTA_RULE, SCALAR_DECAY, DeltaRuleEdits, chunked_gated_delta_rule, gated_delta_rule, gated_delta_rule_reference,
)


def random_inputs(seed, b, T, H, d_k, d_v, decay_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, T, H, d_k, generator=g), dim=-1) / d_k**0.5
    k = F.normalize(torch.randn(b, T, H, d_k, generator=g), dim=-1)
    v = torch.randn(b, T, H, d_v, generator=g)
    log_decay = -decay_scale * torch.rand(b, T, H, generator=g)
    beta = torch.rand(b, T, H, generator=g)
    initial = torch.randn(b, H, d_k, d_v, generator=g)
    return q, k, v, log_decay, beta, initial


def assert_close(a, b, tol=1e-4):
    # fp32: the chunk's triangular solve over up to 64 nearly parallel keys (d_k = 4) loses a few more
    # digits than the step-by-step reference; a wrong formula is off by O(1)
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000), b=st.integers(1, 2), T=st.integers(1, 70), H=st.integers(1, 3),
    d_k=st.sampled_from([4, 8, 16]), d_v=st.sampled_from([3, 8]), chunk_size=st.sampled_from([1, 4, 16, 64]),
    with_initial=st.booleans(), decay_scale=st.sampled_from([0.01, 3.0, 30.0]),
)
def test_chunked_equals_sequential(seed, b, T, H, d_k, d_v, chunk_size, with_initial, decay_scale):
    q, k, v, g, beta, initial = random_inputs(seed, b, T, H, d_k, d_v, decay_scale)
    initial = initial if with_initial else None
    positions = torch.randperm(T, generator=torch.Generator().manual_seed(seed))[: max(1, T // 3)]
    ref = gated_delta_rule_reference(q, k, v, g, beta, initial)
    fast = chunked_gated_delta_rule(q, k, v, g, beta, initial, positions, chunk_size)
    assert_close(fast.out, ref.out)
    assert_close(fast.write_value, ref.write_value)
    assert_close(fast.final_state, ref.final_state)
    assert_close(fast.states, ref.states[:, positions])


def edits_for(seed, b, T, H, d_k, d_v, kind):
    g = torch.Generator().manual_seed(seed + 1)
    edits = DeltaRuleEdits()
    if kind in ("delete", "replace"):
        edits.write_mask = torch.zeros(b, T, H, dtype=torch.bool)
        edits.write_mask[:, T // 2, 0] = True
        edits.write_mask[-1, T - 1, H - 1] = True
        edits.write_key = F.normalize(torch.randn(b, T, H, d_k, generator=g), dim=-1)
        edits.write_value = torch.zeros(b, T, H, d_v) if kind == "delete" else torch.randn(b, T, H, d_v, generator=g)
    else:
        positions = [T // 3] if kind == "state_one" else [1, T // 3, T // 3, T - 2]
        edits.diff_positions = torch.tensor(positions)
        edits.state_diff = torch.randn(b, len(positions), H, d_k, d_v, generator=g)
    return edits


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000), T=st.integers(4, 60), chunk_size=st.sampled_from([4, 16, 64]),
    kind=st.sampled_from(["delete", "replace", "state_one", "state_several"]),
)
def test_edits_carried_exactly(seed, T, chunk_size, kind):
    b, H, d_k, d_v = 2, 2, 8, 5
    q, k, v, g, beta, initial = random_inputs(seed, b, T, H, d_k, d_v)
    edits = edits_for(seed, b, T, H, d_k, d_v, kind)
    ref = gated_delta_rule_reference(q, k, v, g, beta, initial, edits)
    fast = gated_delta_rule(q, k, v, g, beta, initial, torch.arange(T), edits, chunk_size)
    assert_close(fast.out, ref.out)
    assert_close(fast.write_value, ref.write_value)
    assert_close(fast.states, ref.states)
    # and the edit did something, from its position on
    clean = gated_delta_rule_reference(q, k, v, g, beta, initial)
    first = edits.positions()[0]
    assert torch.equal(ref.out[:, :first], clean.out[:, :first])
    assert not torch.allclose(ref.out[:, first:], clean.out[:, first:])


def test_forced_write_is_exactly_the_given_matrix():
    b, T, H, d_k, d_v = 1, 12, 1, 6, 4
    q, k, v, g, beta, initial = random_inputs(0, b, T, H, d_k, d_v)
    edits = edits_for(0, b, T, H, d_k, d_v, "replace")
    t = T // 2
    out = gated_delta_rule(q, k, v, g, beta, initial, torch.tensor([t - 1, t]), edits, 4)
    written = out.states[:, 1] - g[:, t].exp()[..., None, None] * out.states[:, 0]
    expected = edits.write_key[:, t, :, :, None] * edits.write_value[:, t, :, None, :]
    assert_close(written, expected, 1e-5)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000), b=st.integers(1, 2), T=st.integers(1, 150), H=st.integers(1, 3),
    d_k=st.sampled_from([4, 8]), d_v=st.sampled_from([3, 8]), chunk_size=st.sampled_from([1, 4, 16, 64]),
    with_initial=st.booleans(), decay_scale=st.sampled_from([0.01, 3.0, 30.0]), erases=st.booleans(),
)
def test_every_state_equals_sequential_and_the_product_form(seed, b, T, H, d_k, d_v, chunk_size, with_initial, decay_scale,
                                                           erases):
    """Every state (the step taken per position of all chunks at once, `every_state`) against the sequential
    reference and against the unrolled per-chunk product it replaced, which the engine still uses for other
    positions: asked for in reverse order, the same positions take that path. Both transitions (GDN, Mamba-2)."""
    transition = DELTA_RULE if erases else SCALAR_DECAY
    q, k, v, g, beta, initial = random_inputs(seed, b, T, H, d_k, d_v, decay_scale)
    initial = initial if with_initial else None
    ref = gated_delta_rule_reference(q, k, v, g, beta, initial, transition=transition)
    every = chunked_gated_delta_rule(q, k, v, g, beta, initial, torch.arange(T), chunk_size, transition)
    product = chunked_gated_delta_rule(q, k, v, g, beta, initial, torch.arange(T).flip(0), chunk_size, transition)
    assert every.states.shape == (b, T, H, d_k, d_v) and every.states.is_contiguous()  # the layout hook_state hands on
    assert_close(every.states, ref.states)
    assert_close(every.states, product.states.flip(1))
    # the states asked for change nothing else
    plain = chunked_gated_delta_rule(q, k, v, g, beta, initial, None, chunk_size, transition)
    for field in ("out", "write_value", "final_state"):
        assert torch.equal(getattr(every, field), getattr(plain, field))


def test_every_state_carries_the_gradient():
    """The in-place writes of every state keep autograd's graph: the gradient of a function of every state, with
    respect to each input but the query, is the sequential reference's."""
    b, T, H, d_k, d_v = 2, 11, 2, 4, 3
    inputs = [x.requires_grad_() for x in random_inputs(3, b, T, H, d_k, d_v)]
    weights = torch.randn(b, T, H, d_k, d_v, generator=torch.Generator().manual_seed(4))
    grads = {}
    for name, fn in (("fast", lambda *x: chunked_gated_delta_rule(*x[:5], x[5], torch.arange(T), 4)),
                     ("reference", gated_delta_rule_reference)):
        grads[name] = torch.autograd.grad((fn(*inputs).states * weights).sum(), inputs[1:])  # the states do not read q̂
    for fast, ref in zip(grads["fast"], grads["reference"]):
        assert_close(fast, ref)
