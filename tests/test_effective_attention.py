"""Exact effective attention (hooked_gdn.effective_attention) against the model's own read.

On random tiny models with slow decays (α ≈ 0.99, so old writes and the erase terms matter), both
decompositions rebuild ``hook_recurrence_out`` to fp32 rounding, with and without an initial
state. With fewer positions than d_v the written values are linearly independent, so the
reconstruction pins down every c_tj: no other pattern gives the same reads.
"""

from __future__ import annotations

import math

import pytest
import torch

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.effective_attention import effective_attention
from hooked_gdn.sites import gdn_hook_name
from tests.conftest import tiny_hf_config

D_K, D_V = 16, 32


def slow_decays_(model: HookedGatedDeltaNet) -> HookedGatedDeltaNet:
    """Slows every GDN decay of ``model`` in place (and returns it), so that writes far back stay in every read."""
    with torch.no_grad():
        for block in model.blocks:
            if block.is_gdn:  # g = −exp(A_log)·softplus(a + dt_bias) ≈ −0.05·softplus(−2 + small): α ≈ 0.994
                block.linear_attn.A_log.fill_(math.log(0.05))
                block.linear_attn.dt_bias.fill_(-2.0)
                block.linear_attn.W_a.mul_(0.1)
    return model


def slow_decay_model() -> HookedGatedDeltaNet:
    torch.manual_seed(0)
    return slow_decays_(HookedGatedDeltaNet.from_config(
        tiny_hf_config("grouped", linear_key_head_dim=D_K, linear_value_head_dim=D_V)).eval())


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x - reference).abs().amax() / reference.abs().amax())


def gla_heuristic_error(cache, layer: int) -> float:
    """The read rebuilt without the erase: Σ_j G_{j→t} (q̂_tᵀ k̂_j) β_j v_j."""
    writes = effective_attention(cache, layer, "writes")
    inputs = effective_attention(cache, layer, "inputs")
    heuristic = torch.einsum("bhtj,bjhv->bthv", writes.pattern, inputs.values)
    return relative_error(heuristic, cache[gdn_hook_name(layer, "hook_recurrence_out")])


@pytest.mark.parametrize("over", ["writes", "inputs"])
def test_decomposition_rebuilds_the_read(over):
    model = slow_decay_model()
    tokens = torch.randint(1, 101, (2, 24), generator=torch.Generator().manual_seed(1))  # 24 < d_v
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, chunk_size=8)  # three chunks
    for layer in model.cfg.gdn_layers:
        ea = effective_attention(cache, layer, over)
        o = cache[gdn_hook_name(layer, "hook_recurrence_out")]
        assert ea.pattern.shape == (2, 4, 24, 24) and ea.values.shape == o.shape
        assert torch.linalg.matrix_rank(ea.values.permute(0, 2, 1, 3).double()).eq(24).all()  # c is unique
        assert relative_error(ea.out(), o) < 1e-5
        assert (ea.pattern.triu(1) == 0).all()
        torch.testing.assert_close(ea.contributions().sum(2), ea.out(), atol=1e-6, rtol=1e-5)
        assert gla_heuristic_error(cache, layer) > 0.1  # the erase matters in this model


def test_the_two_decompositions_differ_where_the_erase_acts():
    """Same read, different weights: over the writes c_tt = q̂_tᵀ k̂_t; over the inputs also c_tt = q̂_tᵀ k̂_t
    (no erase after the last write), but earlier columns differ by the later erases."""
    model = slow_decay_model()
    tokens = torch.randint(1, 101, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    writes, inputs = effective_attention(cache, 1, "writes"), effective_attention(cache, 1, "inputs")
    diagonal = lambda p: p.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(diagonal(writes.pattern), diagonal(inputs.pattern), atol=1e-6, rtol=1e-5)
    assert (writes.pattern - inputs.pattern).tril(-1).abs().amax() > 1e-2


@pytest.mark.parametrize("over", ["writes", "inputs"])
def test_initial_state_from_a_prefix(over):
    model = slow_decay_model()
    g = torch.Generator().manual_seed(3)
    prefix, continuation = torch.randint(1, 101, (2, 20), generator=g), torch.randint(1, 101, (2, 12), generator=g)
    with torch.no_grad():
        prefix_cache = model.prefill(prefix)
        initial = dict(prefix_cache.recurrent_states)  # the forward below replaces these entries
        _, cache = model.run_with_cache(continuation, cache=prefix_cache)
    for layer in model.cfg.gdn_layers:
        o = cache[gdn_hook_name(layer, "hook_recurrence_out")]
        ea = effective_attention(cache, layer, over, initial_state=initial[layer])
        assert relative_error(ea.out(), o) < 1e-5
        assert relative_error(ea.out() - ea.initial, o) > 0.05  # the prefix's state is a real part of the read


def test_heads_and_bad_layers():
    model = slow_decay_model()
    tokens = torch.randint(1, 101, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    full = effective_attention(cache, 2, "inputs")
    some = effective_attention(cache, 2, "inputs", heads=[3, 1])
    torch.testing.assert_close(some.pattern, full.pattern[:, [3, 1]])
    torch.testing.assert_close(some.out(), full.out()[:, :, [3, 1]])
    with pytest.raises(ValueError, match="is layer 3 a GDN layer"):
        effective_attention(cache, 3)  # the attention layer
    with pytest.raises(ValueError, match="out of range"):
        effective_attention(cache, 0, heads=4)
    with pytest.raises(ValueError, match="over must be one of"):
        effective_attention(cache, 0, over="keys")
