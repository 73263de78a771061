"""The memory census and exact effective attention on RWKV-7 (hooked_gdn.census, hooked_gdn.effective_attention):
per-channel decays summarised per head, the in-context rate as β, the GroupNorm's ε; the read rebuilt over the
writes and erases and over the inputs through the full propagator G_t = diag(w_t) − (a_t ⊙ κ̂_t) κ̂_tᵀ, from a zero
state and after a prefix, with the bonus reported apart.

Tiny random checkpoints (tests/rwkv7_models.py: 2 heads of 64 channels, 2 layers) with w_0 lowered so most
channels keep tens of tokens; 23 positions, chunks of 8 (the last one padded).
"""

from __future__ import annotations

import math

import pytest
import torch

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.census import memory_census
from hooked_gdn.effective_attention import effective_attention
from hooked_gdn.sites import gdn_hook_name

from .rwkv7_models import random_blinkdl_state, save_fla

T, CHUNK = 23, 8


@pytest.fixture(name="model", scope="module")
def model_fixture(tmp_path_factory):
    folder = save_fla(random_blinkdl_state(decay_bias=-3.0), tmp_path_factory.mktemp("rwkv7-analysis"))
    return HookedGatedDeltaNet.from_pretrained(folder).eval()


def tokens(b: int, p: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 256, (b, p), generator=torch.Generator().manual_seed(seed))


def hook(layer: int, short: str) -> str:
    return gdn_hook_name(layer, f"hook_{short}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    return float((actual - expected).abs().amax() / expected.abs().amax())


# ---------------------------------------------------------------- the census


def test_census_summarises_each_heads_channels_and_its_in_context_rate(model):
    """The half-life percentiles of a head are over its 64 channels and every position; β is the mean a_t."""
    windows = tokens(3, T, 1)
    census = memory_census(model, windows, state_every=2)
    H, N = model.cfg.n_value_heads, model.cfg.d_value
    assert [(r.layer, r.head) for r in census.heads] == [(layer, h) for layer in range(2) for h in range(H)]
    names = [hook(layer, s) for layer in range(2) for s in ("log_decay", "erase_rate", "recurrence_out")]
    with torch.no_grad():
        _, cache = model.run_with_cache(windows, names_filter=names)
    for r in census.heads:
        numbers = [*r.alpha, *r.half_life, r.mean_beta, r.effective_rank, r.top_share, r.write_share, r.read_rms_over_sqrt_eps]
        assert all(math.isfinite(x) for x in numbers), r
        assert 0.545 < r.alpha[0] <= r.alpha[1] <= r.alpha[2] < 1 and 0 < r.half_life[0] <= r.half_life[1] <= r.half_life[2]
        assert 1 - 1e-4 <= r.effective_rank <= N + 1e-4 and 0 < r.top_share <= 1 + 1e-6
        assert 0 <= r.write_share <= 1 + 1e-6 and r.read_rms_over_sqrt_eps > 0 and 0 < r.mean_beta < 1
        log_w = cache[hook(r.layer, "log_decay")][..., r.head, :].double()  # [b, p, N]
        assert r.half_life[1] == pytest.approx(math.log(0.5) / float(torch.quantile(log_w.flatten(), 0.5)), rel=1e-6)
        assert r.alpha[0] == pytest.approx(float(torch.quantile(log_w.flatten(), 0.1).exp()), rel=1e-6)
        rate = cache[hook(r.layer, "erase_rate")][..., r.head, :].double()
        assert r.mean_beta == pytest.approx(float(rate.mean()), rel=1e-5)
        # the GroupNorm centres the read, so its scale is the std of o_t, against the GroupNorm's ε
        o = cache[hook(r.layer, "recurrence_out")][..., r.head, :].double()
        std = (o - o.mean(-1, keepdim=True)).pow(2).mean(-1).sqrt() / math.sqrt(model.cfg.group_norm_eps)
        assert r.read_rms_over_sqrt_eps == pytest.approx(float(std.flatten().median()), rel=1e-4)
    # the channels of a head span far more than its positions: the percentiles are not the median's alone
    assert all(r.half_life[2] > 2 * r.half_life[0] for r in census.heads)


def test_one_write_is_the_whole_state(model):
    """From a zero state the first state is k̃_0 v_0ᵀ (e_0 = 0): rank 1, all of it the write."""
    for r in memory_census(model, tokens(2, 1, 2)).heads:
        assert r.effective_rank == pytest.approx(1.0, abs=1e-4) and r.write_share == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- effective attention


@pytest.fixture(name="runs", scope="module")
def runs_fixture(model):
    """A run from a zero state, and the same tokens continuing a 9-token prefix, with the prefix's states."""
    x = tokens(2, T, 3)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, chunk_size=CHUNK)
        prefix = model.prefill(tokens(2, 9, 4))
        initial = dict(prefix.recurrent_states)  # the run below replaces these entries
        _, continued = model.run_with_cache(x, cache=prefix, chunk_size=CHUNK)
    return cache, continued, initial


@pytest.mark.parametrize("over", ["writes", "inputs"])
@pytest.mark.parametrize("layer", [0, 1])
def test_decomposition_rebuilds_the_read(runs, layer, over):
    cache, continued, initial = runs
    o = cache[hook(layer, "recurrence_out")]
    ea = effective_attention(cache, layer, over)
    assert ea.pattern.shape == (2, 2, T, T) and ea.values.shape == o.shape and bool((ea.pattern.triu(1) == 0).all())
    assert relative_error(ea.out(), o) <= 1e-5
    assert relative_error(ea.contributions().sum(2) + ea.initial, ea.out()) <= 1e-5
    assert bool((ea.initial == 0).all())
    # the past matters: the diagonal alone (each position's own write, and erase) is far from the read
    own = torch.einsum("bht,bthv->bthv", ea.pattern.diagonal(dim1=-2, dim2=-1), ea.values)
    if ea.erase_pattern is not None:
        own = own + torch.einsum("bht,bthv->bthv", ea.erase_pattern.diagonal(dim1=-2, dim2=-1), ea.erase_values)
    assert relative_error(own, o) > 0.1
    o_continued = continued[hook(layer, "recurrence_out")]
    after_prefix = effective_attention(continued, layer, over, initial_state=initial[layer])
    assert relative_error(after_prefix.out(), o_continued) <= 1e-5
    assert relative_error(after_prefix.out() - after_prefix.initial, o_continued) > 0.05  # the prefix is a real part


@pytest.mark.parametrize("layer", [0, 1])
def test_the_erases_are_terms_of_their_own_and_the_two_decompositions_differ(runs, layer):
    """Over the writes the erases carry a real part of the read (e_j = −S_{j−1}ᵀ κ̂_j, weighted by d_tj); over the
    inputs they are inside G, so the weights on v_j differ below the diagonal and agree on it (c_tt = r_tᵀ k̃_t)."""
    cache = runs[0]
    o = cache[hook(layer, "recurrence_out")]
    writes, inputs = effective_attention(cache, layer, "writes"), effective_attention(cache, layer, "inputs")
    assert writes.erase_pattern is not None and inputs.erase_pattern is None
    torch.testing.assert_close(writes.erase_values, cache[hook(layer, "erase_value")])
    without_erases = torch.einsum("bhtj,bjhv->bthv", writes.pattern, writes.values)
    assert relative_error(without_erases, o) > 0.05
    diagonal = lambda p: p.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(diagonal(writes.pattern), diagonal(inputs.pattern), atol=1e-6, rtol=1e-5)
    assert relative_error(inputs.pattern, writes.pattern) > 1e-2


def test_the_bonus_is_reported_apart(model, runs):
    """(r_t · (r_k ⊙ k̃_t)) v_t, from the weights here, equals the result's ``bonus`` and ``hook_bonus``; it is not
    in ``out()``, which is the read before the GroupNorm."""
    cache = runs[0]
    for layer in (0, 1):
        r, k, v = (cache[hook(layer, s)] for s in ("read_query", "write_key", "write_value"))
        by_hand = (r * k * model.blocks[layer].linear_attn.r_k.detach()).sum(-1, keepdim=True) * v
        for over in ("writes", "inputs"):
            ea = effective_attention(cache, layer, over, heads=[1, 0])
            torch.testing.assert_close(ea.bonus, cache[hook(layer, "bonus")][:, :, [1, 0]])
            torch.testing.assert_close(ea.bonus, by_hand[:, :, [1, 0]], atol=1e-6, rtol=1e-5)
            assert relative_error(ea.out(), cache[hook(layer, "recurrence_out")][:, :, [1, 0]]) <= 1e-5
