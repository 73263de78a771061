"""The SAE core (writesae.sae, writesae.sparsity) and its on-disk format (writesae.io).

Every expected value is computed here from the parameters with einsum, independently of the
library's own helpers. Sizes are tiny and most checks run in float64, so that comparisons can be
tight and TopK selections are not decided by rounding.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from writesae import ARCHITECTURES, BilinearMatrixSAE, FlatSAE, MatrixSAE, SAEConfig, load_sae, save_sae
from writesae.sparsity import SPARSITIES, JumpReLU, make_sparsity

ARCHS = ["flat", "matrix", "bilinear", "tied"]  # "tied" is the tied BilinearMatrixSAE
FAST = settings(max_examples=20, deadline=None)


def make(arch: str, rank: int = 2, **kw):
    """A tiny SAE with random (non-zero) biases, so that every term of the formulas shows."""
    kw = {"d_k": 4, "d_v": 3, "n_features": 12, "k": 3, "seed": 0, "dtype": "float64", **kw}
    if arch == "tied":
        kw["tied"] = True
    sae = ARCHITECTURES["bilinear" if arch == "tied" else arch](rank=1 if arch == "flat" else rank, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * torch.randn(sae.b_dec.shape, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=g))
    return sae


def inputs(sae, *batch: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (*batch, sae.n_dicts, sae.cfg.d_k, sae.cfg.d_v)
    return torch.randn(shape, generator=g, dtype=sae.cfg.torch_dtype)


def atoms_of(sae) -> torch.Tensor:
    """The decoder atoms [n_dicts, n, d_k, d_v], straight from the parameters."""
    if isinstance(sae, FlatSAE):
        return sae.W_dec.reshape(sae.n_dicts, sae.cfg.n_features, sae.cfg.d_k, sae.cfg.d_v)
    return torch.einsum("hnrk,hnrv->hnkv", sae.V, sae.W)


def factors_of(sae) -> list[torch.Tensor]:
    if isinstance(sae, FlatSAE):
        return [sae.W_dec]
    if isinstance(sae, MatrixSAE) or sae.cfg.tied:
        return [sae.V, sae.W]
    return [sae.V, sae.W, sae.U, sae.P]


def calibrate(sae, batches: int = 3) -> None:
    """A few training-mode passes (which set a BatchTopK threshold), then eval mode."""
    sae.train()
    for i in range(batches):
        sae(inputs(sae, 8, seed=100 + i))
    sae.eval()


# --- shapes and parameter counts --------------------------------------------------------------


@pytest.mark.parametrize("arch, rank", [(a, r) for a in ARCHS for r in (1, 2) if (a, r) != ("flat", 2)])
@pytest.mark.parametrize("n_dicts", [1, 3])
def test_parameter_counts_and_shapes(arch, rank, n_dicts):
    d_k, d_v, n, h = 4, 3, 12, n_dicts
    sae = make(arch, rank=rank, heads=list(range(n_dicts)))
    formula = {
        "flat": 2 * n * d_k * d_v,
        "matrix": n * d_k * d_v + rank * n * (d_k + d_v),
        "bilinear": 2 * rank * n * (d_k + d_v),
        "tied": rank * n * (d_k + d_v),
    }[arch]
    assert sae.n_weight_parameters() == h * formula
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes["b_dec"] == (h, d_k, d_v) and shapes["b_enc"] == (h, n)
    if arch == "flat":
        assert shapes["W_enc"] == shapes["W_dec"] == (h, n, d_k * d_v)
    else:
        assert shapes["V"] == (h, n, rank, d_k) and shapes["W"] == (h, n, rank, d_v)
    assert ("W_enc" in shapes) == (arch in ("flat", "matrix"))
    assert ("U" in shapes and "P" in shapes) == (arch == "bilinear")
    codes = sae.encode(inputs(sae, 2, 5))
    assert codes.shape == (2, 5, h, n)
    assert sae.decode(codes).shape == (2, 5, h, d_k, d_v)


def test_head_indices_and_both_constructors():
    assert SAEConfig("matrix", 4, 3, 8, k=2, heads=2).head_indices == [2]
    assert SAEConfig("matrix", 4, 3, 8, k=2, heads="all", n_heads=3).head_indices == [0, 1, 2]
    assert SAEConfig("matrix", 4, 3, 8, k=2, heads=(3, 1), n_heads=4).head_indices == [3, 1]
    cfg = SAEConfig("matrix", d_k=4, d_v=3, n_features=8, rank=2, k=2, heads=[0, 1])
    from_cfg, from_keywords = MatrixSAE(cfg, seed=5), MatrixSAE(d_k=4, d_v=3, n_features=8, rank=2, k=2, heads=[0, 1], seed=5)
    assert from_cfg.cfg == from_keywords.cfg == cfg
    for (name, a), (_, b) in zip(from_cfg.state_dict().items(), from_keywords.state_dict().items()):
        assert torch.equal(a, b), name
    assert from_cfg.cfg is not cfg
    with pytest.raises(TypeError, match="not both"):
        MatrixSAE(cfg, k=3)
    with pytest.raises(ValueError, match="architecture='flat'"):
        FlatSAE(cfg)


# --- encoders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("tied", [True, False])
def test_bilinear_pre_activations(rank, tied):
    sae = make("tied" if tied else "bilinear", rank=rank, heads=[0, 1], n_heads=2)
    x = inputs(sae, 5)
    U, P = (sae.V, sae.W) if tied else (sae.U, sae.P)
    # ⟨X − b_dec, Σ_r U_ir P_irᵀ⟩_F + b_enc,i = Σ_r U_irᵀ (X − b_dec) P_ir + b_enc,i
    expected = torch.einsum("bhkv,hnrk,hnrv->bhn", x - sae.b_dec, U, P) + sae.b_enc
    torch.testing.assert_close(sae.encode_pre(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_features", [192, 200])  # whole blocks of 64 features; a last block of 8
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("batch", [(3, 2), (1,)])
def test_the_bilinear_encoder_forms_its_numbers_in_blocks_by_either_route_with_the_numbers_of_one_product(
        monkeypatch, n_features, grad, per_sample, batch):
    """With blocks of 64 features (the route's budget, `ENCODER_NUMBERS_PER_BLOCK` or `PER_SAMPLE_NUMBERS_PER_BLOCK`,
    set for it: 1 number still makes 64), by each route of `bilinear_forward_is_per_sample` (rows E_i, or every
    sample's products C P_ir), the bilinear pre-activations and, through them, every gradient are those of the one
    product with all n rows, with gradients (`_BilinearEncoder`) and without; rank 2 and two heads."""
    import writesae.sae as sae_module

    sae = make("bilinear", n_features=n_features, heads=[0, 1], n_heads=2)
    x = inputs(sae, *batch)
    samples = math.prod(batch)
    # a feature's numbers on each route: rank·B·d_k per-sample products, or d_k·d_v of its row
    feature_numbers, budget = ((2 * samples * 4, "PER_SAMPLE_NUMBERS_PER_BLOCK") if per_sample
                               else (12, "ENCODER_NUMBERS_PER_BLOCK"))
    assert sae_module._features_per_block(2, feature_numbers, getattr(sae_module, budget)) >= n_features  # one block
    expected = torch.einsum("...hd,hnd->...hn", (x - sae.b_dec).flatten(-2),
                            torch.einsum("hnrk,hnrv->hnkv", sae.U, sae.P).flatten(-2)) + sae.b_enc
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (expected * upstream).sum().backward()
    expected_grads = [p.grad.clone() for p in (sae.U, sae.P, sae.b_dec)]
    sae.zero_grad()
    routes = []
    monkeypatch.setattr(sae_module, "bilinear_forward_is_per_sample", lambda *shape: routes.append(shape) or per_sample)
    blocks = []
    features_per_block = sae_module._features_per_block
    monkeypatch.setattr(sae_module, "_features_per_block", lambda *a: blocks.append(a) or features_per_block(*a))
    for numbers in (64 * 2 * feature_numbers, 1):  # 64 features over both heads
        monkeypatch.setattr(sae_module, budget, numbers)
        assert features_per_block(2, feature_numbers, numbers) == 64
        with torch.set_grad_enabled(grad):
            pre = sae.encode_pre(x)
        torch.testing.assert_close(pre, expected, rtol=0, atol=1e-12)
        if grad:
            (pre * upstream).sum().backward()
            for got, wanted in zip((sae.U.grad, sae.P.grad, sae.b_dec.grad), expected_grads):
                torch.testing.assert_close(got, wanted, rtol=0, atol=1e-12)
            sae.zero_grad()
    assert routes == [(samples, 4, 3, 2)] * 2  # asked with every sample, (d_k, d_v) and the rank
    assert blocks == [(2, feature_numbers, 64 * 2 * feature_numbers), (2, feature_numbers, 1)]  # by the route's budget


def test_the_bilinear_forward_forms_per_sample_products_where_they_are_no_more_numbers_than_the_rows():
    from writesae.sae import bilinear_forward_is_per_sample

    assert bilinear_forward_is_per_sample(128, 128, 128, 1) and not bilinear_forward_is_per_sample(129, 128, 128, 1)
    assert bilinear_forward_is_per_sample(32, 64, 64, 2) and not bilinear_forward_is_per_sample(33, 64, 64, 2)
    assert bilinear_forward_is_per_sample(4, 1000, 4, 1) and not bilinear_forward_is_per_sample(5, 1000, 4, 1)
    assert not bilinear_forward_is_per_sample(0, 128, 128, 1)  # nothing to form: the rows' route takes empty batches


@pytest.mark.parametrize("budget", ["ENCODER_NUMBERS_PER_BLOCK", "PER_SAMPLE_NUMBERS_PER_BLOCK"])
def test_the_bilinear_encoder_blocks_hold_whole_tiles_within_the_budget(budget):
    import writesae.sae as sae_module
    from writesae.sae import FEATURES_PER_BLOCK_MULTIPLE, _features_per_block

    budget = getattr(sae_module, budget)
    for n_dicts, feature_numbers in ((1, 128 * 128), (1, 64 * 64), (8, 64 * 64), (3, 100 * 7), (1, 32 * 128)):
        features = _features_per_block(n_dicts, feature_numbers, budget)
        assert features % FEATURES_PER_BLOCK_MULTIPLE == 0
        assert features * n_dicts * feature_numbers <= budget
        assert (features + FEATURES_PER_BLOCK_MULTIPLE) * n_dicts * feature_numbers > budget
    assert _features_per_block(16, 128 * 128, budget) == FEATURES_PER_BLOCK_MULTIPLE  # past the budget: one multiple


@pytest.mark.parametrize("arch", ["flat", "matrix"])
def test_dense_pre_activations(arch):
    sae = make(arch)
    x = inputs(sae, 5)
    expected = torch.einsum("bhd,hnd->bhn", (x - sae.b_dec).flatten(-2), sae.W_enc) + sae.b_enc
    torch.testing.assert_close(sae.encode_pre(x), expected, rtol=0, atol=1e-12)


@FAST
@given(arch=st.sampled_from(ARCHS), sparsity=st.sampled_from(list(SPARSITIES)), rank=st.integers(1, 3),
       n_dicts=st.integers(1, 3), batch=st.lists(st.integers(1, 3), max_size=2), scale=st.sampled_from([1.0, 0.4]),
       seed=st.integers(0, 10**6))
def test_factor_encoding_equals_matrix_encoding(arch, sparsity, rank, n_dicts, batch, scale, seed):
    sae = make(arch, rank=rank, sparsity=sparsity, heads=list(range(n_dicts)), input_scale=scale, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(*batch, n_dicts, 4, generator=g, dtype=torch.float64)
    delta = torch.randn(*batch, n_dicts, 3, generator=g, dtype=torch.float64)
    x = k.unsqueeze(-1) * delta.unsqueeze(-2)
    torch.testing.assert_close(sae.encode_pre_factors(k, delta), sae.encode_pre(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(sae.encode_factors(k, delta), sae.encode(x), rtol=0, atol=1e-12)


def test_input_scale_means_weights_act_on_scaled_input():
    scaled, plain = make("matrix", input_scale=0.25).eval(), make("matrix").eval()
    plain.load_state_dict(scaled.state_dict())
    x = inputs(scaled, 4)
    torch.testing.assert_close(scaled.encode(x), plain.encode(x * 0.25), rtol=0, atol=1e-12)
    torch.testing.assert_close(scaled(x), plain(x * 0.25) / 0.25, rtol=0, atol=1e-12)


# --- decoders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_decode_is_the_table(arch):
    sae = make(arch, input_scale=0.5)
    codes = sae.encode(inputs(sae, 6))
    expected = (torch.einsum("bhn,hnkv->bhkv", codes, atoms_of(sae)) + sae.b_dec) / 0.5
    torch.testing.assert_close(sae.decode(codes), expected, rtol=0, atol=1e-12)


@FAST
@given(arch=st.sampled_from(ARCHS), m=st.integers(1, 12), batch=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_sparse_decode_equals_dense_decode(arch, m, batch, seed):
    sae = make(arch, heads=[0, 1], input_scale=2.0, seed=seed)
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 12, (batch, 2, m), generator=g)  # repeats allowed: they add up
    values = torch.randn(batch, 2, m, generator=g, dtype=torch.float64)
    dense = torch.zeros(batch, 2, 12, dtype=torch.float64).scatter_add(-1, indices, values)
    torch.testing.assert_close(sae.decode_sparse(indices, values), sae.decode(dense), rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_decode_of_topk_codes(arch):
    sae = make(arch, heads=[0, 1, 2], k=4)
    codes = sae.encode(inputs(sae, 3, 5))
    values, indices = codes.topk(4, dim=-1)
    torch.testing.assert_close(sae.decode_sparse(indices, values), sae.decode(codes), rtol=0, atol=1e-12)


@FAST
@given(arch=st.sampled_from(ARCHS), m=st.integers(1, 12), batch=st.lists(st.integers(1, 4), min_size=1, max_size=2),
       rank=st.integers(1, 3), grads=st.sampled_from(["both", "values", "weights"]), seed=st.integers(0, 10**6))
def test_dense_and_gathered_decode_paths_agree_in_values_and_gradients(arch, m, batch, rank, grads, seed):
    """decode_atoms' two routes (writesae.sae.dense_decode_is_cheaper picks one by the shapes) give the
    same sum and the same gradients, for the values and for every decoder weight, repeats included, at ranks 1-3
    (a factored decoder's gathered route is `_GatheredFactorProduct`), one or two leading batch axes, and either
    the values or the weights alone asking for a gradient."""
    sae = make(arch, heads=[0, 1], seed=seed, rank=rank)
    sae.requires_grad_(grads != "values")
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 12, (*batch, 2, m), generator=g)  # repeats allowed: they add up
    values = torch.randn(*batch, 2, m, generator=g, dtype=torch.float64)
    upstream = torch.randn(*batch, 2, 4, 3, generator=g, dtype=torch.float64)
    found = []
    for dense in (True, False):
        sae.zero_grad(set_to_none=True)
        v = values.clone().requires_grad_(grads != "weights")
        with mock.patch("writesae.sae.dense_decode_is_cheaper", lambda *shape: dense):
            out = sae.decode_atoms(indices, v)
        (out * upstream).sum().backward()
        assert (v.grad is None) == (grads == "weights")
        found.append([out, v.grad, *[p.grad for p in factors_of(sae)]])
    for dense, gathered in zip(*found):
        assert (dense is None) == (gathered is None)
        if dense is not None:
            torch.testing.assert_close(gathered, dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dense", [True, False])
@FAST
@given(batch=st.lists(st.integers(1, 4), min_size=1, max_size=2), rank=st.integers(1, 3), sparse_grad=st.booleans(),
       input_grad=st.booleans(), seed=st.integers(0, 10**6))
def test_the_encoders_backward_routes_give_autograds_gradients(arch, dense, batch, rank, sparse_grad, input_grad, seed):
    """The encoders' backward (dense: `_DenseEncoder`; bilinear, tied or not: `_BilinearEncoder`, which goes
    to the factors U, P without a ∂E), by either route of the shape rule, gives the gradients autograd gives
    through the plain product z = E · vec(X·s − b_dec), E = W_enc or Σ_r U_ir P_irᵀ, for TopK-sparse
    gradients of z and dense ones, at ranks 1-3 and one or two leading batch axes, down to every encoder weight
    (a dense encoder's gathered ∂W_enc by its CSR product), b_dec (summed over the samples without a per-sample
    ∂X) and X where it asks for a gradient; and the centred input X·s − b_dec they hand on, whose gradient, where X
    asks for one, reaches X and b_dec."""
    sae = make(arch, rank=rank, heads=[0, 1], seed=seed, input_scale=1.5)
    x = inputs(sae, *batch, seed=seed).requires_grad_(input_grad)
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(*batch, 2, 12, generator=g, dtype=torch.float64)
    if sparse_grad:  # what TopK passes back: at most k = 3 features per sample and head
        upstream = torch.zeros_like(upstream).scatter(-1, torch.rand(*batch, 2, 12, generator=g).topk(3, -1).indices,
                                                      upstream[..., :3])
    upstream_centred = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with (mock.patch("writesae.sae.dense_encoder_backward_is_dense", lambda *shape: dense),
          mock.patch("writesae.sae.bilinear_backward_is_dense", lambda *shape: dense)):
        pre, centred = sae._pre_and_centred(x)
        assert centred.requires_grad == input_grad  # else b_dec's part of its gradient is the caller's
        ((pre * upstream).sum() + (centred * upstream_centred).sum() * input_grad).backward()
    torch.testing.assert_close(centred, x * 1.5 - sae.b_dec, rtol=0, atol=1e-12)
    weights = [sae.W_enc] if arch in ("flat", "matrix") else list(sae.encoder_factors)
    found = [w.grad for w in weights] + [sae.b_dec.grad, x.grad]
    weights, b_dec = [w.detach().clone().requires_grad_() for w in weights], sae.b_dec.detach().clone().requires_grad_()
    x_again = x.detach().clone().requires_grad_(input_grad)
    E = weights[0] if arch in ("flat", "matrix") else torch.einsum("hnrk,hnrv->hnkv", *weights).flatten(-2)
    centred = x_again * 1.5 - b_dec
    ((torch.einsum("...hd,hnd->...hn", centred.flatten(-2), E) * upstream).sum()
     + (centred * upstream_centred).sum() * input_grad).backward()
    assert (found[-1] is None) == (not input_grad)
    for got, expected in zip(found, [w.grad for w in weights] + [b_dec.grad, x_again.grad]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_weights_first_is_picked_for_a_few_rows_against_at_least_twice_as_many_features_on_the_cpu():
    """`writesae.sae.weights_first_is_faster`'s window, at its edges (the "product layout" rows of
    benchmarks/results/sae.json behind it), and never off the CPU, where it was not timed."""
    from writesae.sae import weights_first_is_faster

    cpu = torch.device("cpu")
    assert weights_first_is_faster(16, 32, cpu) and weights_first_is_faster(32, 64, cpu)
    assert weights_first_is_faster(64, 128, cpu) and weights_first_is_faster(64, 16384, cpu)
    assert not weights_first_is_faster(15, 16384, cpu)  # too few rows
    assert not weights_first_is_faster(65, 16384, cpu)  # too many rows
    assert not weights_first_is_faster(32, 63, cpu)  # too few features for the rows
    assert not weights_first_is_faster(32, 64, torch.device("meta"))


@pytest.mark.parametrize("weights_first", [True, False])
@pytest.mark.parametrize("arch", ["flat", "matrix", "bilinear"])
def test_the_encoders_product_gives_einsums_numbers_in_either_layout(arch, weights_first):
    """c·Wᵀ formed weights first or in einsum's layout (`writesae.sae._times_weight_rows`) gives the plain einsum's
    numbers, with and without gradients, one or two leading axes and two heads: a dense encoder's product, and the
    bilinear encoder's with its rows E (rank 2 over more samples than its per-sample route takes)."""
    sae = make(arch, rank=2, heads=[0, 1], n_features=40, input_scale=1.5)
    E = sae.W_enc if arch != "bilinear" else torch.einsum("hnrk,hnrv->hnkv", *sae.encoder_factors).flatten(-2)
    for batch in [(20,), (4, 5)]:
        x = inputs(sae, *batch)
        expected = torch.einsum("...hd,hnd->...hn", (x * 1.5 - sae.b_dec).flatten(-2), E) + sae.b_enc
        with mock.patch("writesae.sae.weights_first_is_faster", side_effect=lambda *shape: weights_first) as rule:
            with torch.no_grad():
                torch.testing.assert_close(sae.encode_pre(x), expected.detach(), rtol=0, atol=1e-12)
            torch.testing.assert_close(sae.encode_pre(x), expected, rtol=0, atol=1e-12)
        assert (20, 40, x.device) in [call.args for call in rule.call_args_list]  # the rows of both leading axes


@pytest.mark.parametrize("weights_first", [True, False])
@pytest.mark.parametrize("need", ["both", "codes", "atoms"])
def test_the_dense_decodes_backward_gives_autograds_gradients_in_either_layout(weights_first, need):
    """`writesae.sae._DenseDecode`: Σ_i a_i atom_i and its gradients are autograd's through the plain einsum, its ∂codes
    formed by `_times_weight_rows` in either layout (to rounding, float64), for two heads and two leading axes, either
    input alone asking for a gradient."""
    from writesae.sae import _DenseDecode

    g = torch.Generator().manual_seed(0)
    codes, atoms = torch.randn(4, 5, 2, 40, generator=g, dtype=torch.float64), torch.randn(2, 40, 12, generator=g, dtype=torch.float64)
    upstream = torch.randn(4, 5, 2, 12, generator=g, dtype=torch.float64)
    found = []
    for route in ("decode", "einsum"):
        a, b = codes.clone().requires_grad_(need != "atoms"), atoms.clone().requires_grad_(need != "codes")
        with mock.patch("writesae.sae.weights_first_is_faster", lambda *shape: weights_first):
            out = _DenseDecode.apply(a, b) if route == "decode" else torch.einsum("...hn,hnd->...hd", a, b)
            (out * upstream).sum().backward()
        found.append([out, a.grad, b.grad])
    for got, expected in zip(*found):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_the_dense_decode_works_under_torch_func_as_the_einsum_does():
    """`writesae.sae._DenseDecode` under torch.func's transforms gives the plain einsum's numbers: jvp in either input
    or both (the product rule), grad in both, and per-sample gradients by vmap over grad; and an SAE's dense decode
    runs under jvp, as it did when it was an einsum."""
    from writesae.sae import _DenseDecode

    g = torch.Generator().manual_seed(0)
    codes, atoms = torch.randn(20, 2, 40, generator=g, dtype=torch.float64), torch.randn(2, 40, 12, generator=g, dtype=torch.float64)
    tangents = torch.randn_like(codes), torch.randn_like(atoms)
    einsum = lambda a, b: torch.einsum("...hn,hnd->...hd", a, b)
    found = []
    for decode in (_DenseDecode.apply, einsum):
        loss = lambda a, b, decode=decode: decode(a, b).pow(3).sum()
        found.append([*torch.func.jvp(decode, (codes, atoms), tangents),
                      torch.func.jvp(lambda a, decode=decode: decode(a, atoms), (codes,), tangents[:1])[1],
                      torch.func.jvp(lambda b, decode=decode: decode(codes, b), (atoms,), tangents[1:])[1],
                      *torch.func.grad(loss, argnums=(0, 1))(codes, atoms),
                      torch.func.vmap(torch.func.grad(lambda a, loss=loss: loss(a, atoms)))(codes)])
    for got, expected in zip(*found):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    sae = make("flat", n_features=40)
    _, change = torch.func.jvp(sae._decode_dense, (codes[:, :1],), (tangents[0][:, :1],))
    torch.testing.assert_close(change, einsum(tangents[0][:, :1], sae.W_dec).unflatten(-1, (4, 3)), rtol=0, atol=1e-12)


# every route of the encoders' backward and the decodes: dense, gathered, and a flat decoder's gathered decode in
# blocks of columns (`writesae.sae.gather_columns_per_block`)
ROUTES = [(a, r) for a in ARCHS for r in ("dense", "gathered")] + [("flat", "gathered in blocks")]


@contextlib.contextmanager
def _forced(route: str):
    """The rules that choose a route, patched to choose ``route``."""
    dense = route == "dense"
    with (mock.patch("writesae.sae.dense_decode_is_cheaper", lambda *_: dense),
          mock.patch("writesae.sae.dense_encoder_backward_is_dense", lambda *_: dense),
          mock.patch("writesae.sae.bilinear_backward_is_dense", lambda *_: dense),
          mock.patch("writesae.sae.gather_columns_per_block", lambda *_: 4 if route == "gathered in blocks" else 10**9)):
        yield


@pytest.mark.parametrize("arch, route", ROUTES)
@pytest.mark.parametrize("sparsity", list(SPARSITIES))
def test_an_sae_under_torch_func_gives_autograds_numbers(arch, route, sparsity):
    """Under torch.func's transforms an SAE takes plain operators (`writesae.sparsity.under_torch_func`) where autograd
    takes its Functions' backward routes, each forced here: jacrev and jvp of encode equal the Jacobian autograd
    forms through them, vmap equals encoding sample by sample, grad in the parameters by functional_call equals
    backward's (JumpReLU's θ by its straight-through estimate, with the L0 term), and jacrev of a sparse decode
    equals autograd's."""
    sae = make(arch, sparsity=sparsity, n_heads=2, heads="all", jumprelu_bandwidth=0.5, jumprelu_initial_threshold=0.05)
    x = inputs(sae, 5)
    with _forced(route):
        jacobian = torch.autograd.functional.jacobian(sae.encode, x)
        torch.testing.assert_close(torch.func.jacrev(sae.encode)(x), jacobian, rtol=0, atol=1e-12)
        tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
        torch.testing.assert_close(torch.func.jvp(sae.encode, (x,), (tangent,))[1],
                                   torch.einsum("...ijkl,ijkl->...", jacobian, tangent), rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.func.vmap(sae.encode)(x), torch.stack([sae.encode(one) for one in x]),
                                   rtol=0, atol=1e-12)

        class Loss(torch.nn.Module):  # JumpReLU's θ learns through its L0 term as well
            def __init__(self):
                super().__init__()
                self.sae = sae

            def forward(self, x):
                total = self.sae(x).square().sum()
                if isinstance(self.sae.activation, JumpReLU):
                    total = total + self.sae.activation.l0_penalty(self.sae.encode_pre(x)).sum()
                return total

        loss = Loss()
        params = dict(loss.named_parameters())
        detached = {name: p.detach() for name, p in params.items()}
        at = lambda p: torch.func.functional_call(loss, p, (x,))
        found = torch.func.grad(at)(detached)
        loss(x).backward()
        for name, p in params.items():
            torch.testing.assert_close(found[name], p.grad, rtol=0, atol=1e-11, msg=name)
        tangents = {name: torch.randn(p.shape, generator=torch.Generator().manual_seed(4), dtype=p.dtype)
                    for name, p in params.items()}  # the directional derivative, forward mode against the gradients
        torch.testing.assert_close(torch.func.jvp(at, (detached,), (tangents,))[1],
                                   sum((p.grad * tangents[name]).sum() for name, p in params.items()), rtol=1e-12, atol=1e-10)
        codes = sae.encode(x).detach()
        indices = codes.abs().topk(3, dim=-1).indices
        values = codes.gather(-1, indices) + 0.5
        decode = lambda v: sae.decode_sparse(indices, v)
        torch.testing.assert_close(torch.func.jacrev(decode)(values), torch.autograd.functional.jacobian(decode, values),
                                   rtol=0, atol=1e-12)


class _SparseRoundTrip(torch.nn.Module):
    """Σ ‖decode_sparse(the 3 largest codes)‖² over an SAE's codes of X (its encoder and its gathered decode), or the
    plain sum of the decode (whose gradient is one number expanded, stride 0)."""

    def __init__(self, sae, squared: bool = True):
        super().__init__()
        self.sae, self.squared = sae, squared

    def forward(self, x):
        codes = self.sae.encode(x)
        kept = codes.detach().abs().topk(3, dim=-1).indices
        decoded = self.sae.decode_sparse(kept, codes.gather(-1, kept))
        return decoded.square().sum() if self.squared else decoded.sum()


@pytest.mark.parametrize("arch, route", [(a, r) for a, r in ROUTES if (a, r) != ("flat", "gathered")])
def test_an_sae_differentiates_its_gradient_as_torch_func_does(arch, route):
    """With create_graph=True, a derivative of the gradient (here of ‖∂L/∂X‖² + Σ_θ ‖∂L/∂θ‖², in every parameter θ) through the
    encoders' and gathered decodes' autograd Functions equals torch.func's grad of grad through plain operators: a
    recorded backward takes differentiable operators (the encoders' dense products, the gathered rows, the factors
    folded with their codes formed again from the inputs). Not a flat decoder's gathered decode by embedding_bag:
    torch has no second derivative for its per-sample weights (docs/design.md §13; torch.func differentiates it twice)."""
    sae = make(arch, n_heads=2, heads="all")
    x = inputs(sae, 5)
    round_trip = _SparseRoundTrip(sae)
    with _forced(route):
        params = dict(round_trip.named_parameters())
        for with_x in (True, False):  # X needs a gradient of its own, or not (as a trainer's input)
            round_trip.zero_grad()
            wrt = [x.detach().requires_grad_()] if with_x else []
            sum(g.square().sum() for g in torch.autograd.grad(round_trip(wrt[0] if with_x else x), [*wrt, *params.values()],
                                                              create_graph=True)).backward()

            def penalty(p):
                grad_params, grad_x = torch.func.grad(at, argnums=(0, 1))(p, x)
                return sum(g.square().sum() for g in [*grad_params.values(), *[grad_x] * with_x])

            at = lambda p, x: torch.func.functional_call(round_trip, p, (x,))
            found = torch.func.grad(penalty)({name: p.detach() for name, p in params.items()})
            for name, p in params.items():
                assert p.grad is not None and p.grad.abs().max() > 0, name
                torch.testing.assert_close(p.grad, found[name], rtol=1e-10, atol=1e-10, msg=f"{name}, with X: {with_x}")


@pytest.mark.parametrize("arch, route", ROUTES)
@pytest.mark.parametrize("layout", ["transposed", "expanded", "more batch axes", "empty", "gradient expanded"])
def test_an_sae_gives_torch_funcs_gradients_for_inputs_of_every_layout(arch, route, layout):
    """Eager gradients in X and every parameter, through each forced route, equal torch.func's through plain
    operators for X transposed in its last two axes, X one sample expanded over the batch (stride 0), more batch
    axes, an empty batch (whose gathered backward once failed: embedding_bag refuses empty bags), and an upstream
    gradient that is one number expanded."""
    sae = make(arch, d_k=4, d_v=4, n_heads=2, heads="all")
    base = inputs(sae, 5)
    x = {"transposed": base.transpose(-1, -2), "expanded": base[:1].expand_as(base), "more batch axes": inputs(sae, 2, 3),
         "empty": base[:0], "gradient expanded": base}[layout]
    round_trip = _SparseRoundTrip(sae, squared=layout != "gradient expanded")
    with _forced(route):
        x_eager = x.detach().requires_grad_()
        round_trip(x_eager).backward()
        params = dict(round_trip.named_parameters())
        found_params, found_x = torch.func.grad(lambda p, x: torch.func.functional_call(round_trip, p, (x,)), argnums=(0, 1))(
            {name: p.detach() for name, p in params.items()}, x.detach().contiguous())
    torch.testing.assert_close(x_eager.grad, found_x, rtol=0, atol=1e-11)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, found_params[name], rtol=0, atol=1e-11, msg=name)


class _EncodeAndDecodeSparse(torch.nn.Module):
    """Σ ‖sae(X)‖² plus a weighted sum of ``decode_sparse(indices, values)``: every encoder and decode route's
    gradients in X, the values and every parameter at once."""

    def __init__(self, sae):
        super().__init__()
        self.sae = sae

    def forward(self, x, indices, values):
        decoded = self.sae.decode_sparse(indices, values)
        weights = torch.linspace(-1, 1, decoded.numel(), dtype=decoded.dtype).view(decoded.shape)
        return self.sae(x).square().sum() + (decoded * weights).sum()


@FAST
@given(arch_route=st.sampled_from(ROUTES), sparsity=st.sampled_from(list(SPARSITIES)), d_k=st.integers(1, 6),
       d_v=st.integers(1, 6), n=st.integers(1, 20), k=st.integers(1, 20), rank=st.integers(1, 3), n_dicts=st.integers(1, 3),
       batch=st.sampled_from([(), (0,), (1,), (3,), (2, 3)]), m=st.integers(1, 22), seed=st.integers(0, 10**6))
@example(arch_route=("flat", "dense"), sparsity="batchtopk", d_k=2, d_v=3, n=5, k=2, rank=1, n_dicts=1, batch=(0,), m=2,
         seed=0)  # BatchTopK once calibrated by an empty batch, and failed
@example(arch_route=("flat", "gathered in blocks"), sparsity="topk", d_k=2, d_v=3, n=1, k=1, rank=1, n_dicts=1, batch=(),
         m=2, seed=0)  # more terms a sample than W has rows: the blocked route's ∂values once failed
def test_an_saes_eager_gradients_equal_torch_funcs_at_any_shape(arch_route, sparsity, d_k, d_v, n, k, rank, n_dicts, batch,
                                                                m, seed):
    """For any shapes (no batch axis, an empty batch, one sample, two batch axes; k up to the dictionary, m past it),
    every sparsity rule, and each forced route, the eager gradients (the autograd Functions' backward routes) in X, a
    sparse decode's values and every parameter equal torch.func's through plain operators."""
    arch, route = arch_route
    sae = make(arch, rank=rank, d_k=d_k, d_v=d_v, n_features=n, k=min(k, n), sparsity=sparsity,
               heads=list(range(n_dicts)), jumprelu_bandwidth=0.5, jumprelu_initial_threshold=0.05, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n_dicts, d_k, d_v, generator=g, dtype=torch.float64)
    indices = torch.randint(0, n, (*batch, n_dicts, m), generator=g)  # repeats allowed: they add up
    values = torch.randn(*batch, n_dicts, m, generator=g, dtype=torch.float64)
    loss = _EncodeAndDecodeSparse(sae)
    params = dict(loss.named_parameters())
    with _forced(route):
        found_params, found_x, found_values = torch.func.grad(
            lambda p, x, v: torch.func.functional_call(loss, p, (x, indices, v)), argnums=(0, 1, 2))(
            {name: p.detach() for name, p in params.items()}, x, values)
        x.requires_grad_(), values.requires_grad_()
        loss(x, indices, values).backward()
    torch.testing.assert_close(x.grad, found_x, rtol=0, atol=1e-10)
    torch.testing.assert_close(values.grad, found_values, rtol=0, atol=1e-10)
    for name, p in params.items():
        expected = found_params[name]
        torch.testing.assert_close(torch.zeros_like(p) if p.grad is None else p.grad, expected, rtol=0, atol=1e-10, msg=name)


def test_the_dense_decode_outside_the_window_is_autograds_einsum_bit_for_bit():
    """Where `writesae.sae.weights_first_is_faster` says no, `_DenseDecode` makes the very products autograd's einsum
    makes, in float32: SAEs trained at those shapes keep every number they had before it."""
    from writesae.sae import _DenseDecode

    g = torch.Generator().manual_seed(0)
    for batch, n, d in [(256, 64, 4096), (7, 12, 12), (32, 16, 1024)]:
        codes, atoms, upstream = torch.randn(batch, 1, n, generator=g), torch.randn(1, n, d, generator=g), torch.randn(batch, 1, d, generator=g)
        found = []
        for decode in (_DenseDecode.apply, lambda a, b: torch.einsum("...hn,hnd->...hd", a, b)):
            a, b = codes.clone().requires_grad_(), atoms.clone().requires_grad_()
            out = decode(a, b)
            (out * upstream).sum().backward()
            found.append([out, a.grad, b.grad])
        assert all(torch.equal(got, expected) for got, expected in zip(*found))


@pytest.mark.parametrize("arch", ARCHS)
def test_no_atoms_and_no_gradient_are_handled_on_the_gathered_routes(arch):
    """m = 0 atoms decode to zeros; an all-zero gradient of z (every code dead) gives zero gradients, on
    the shapes where the rule gathers (a dictionary much larger than the few features used)."""
    sae = make(arch, n_features=4096, k=1)
    assert not torch.any(sae.decode_atoms(torch.zeros(2, 1, 0, dtype=torch.long), torch.zeros(2, 1, 0, dtype=torch.float64)))
    (sae.encode_pre(inputs(sae, 3)) * 0).sum().backward()
    assert all(not torch.any(p.grad) for p in sae.parameters() if p.grad is not None)


@pytest.mark.parametrize("dense", [True, False])
def test_decode_atoms_takes_the_route_the_shape_rule_names(monkeypatch, dense):
    import writesae.sae as sae_module

    sae = make("flat")
    called = []
    monkeypatch.setattr(sae_module, "dense_decode_is_cheaper", lambda *shape: dense)
    monkeypatch.setattr(sae, "_decode_dense", lambda codes: called.append("dense") or codes.sum())
    monkeypatch.setattr(sae, "_decode_gathered", lambda i, v: called.append("gathered") or v.sum())
    sae.decode_atoms(torch.zeros(2, 1, 3, dtype=torch.long), torch.ones(2, 1, 3, dtype=torch.float64))
    assert called == ["dense" if dense else "gathered"]


@pytest.mark.parametrize("arch", ["flat", "matrix"])
@pytest.mark.parametrize("dense", [True, False])
def test_a_dense_encoders_backward_takes_the_route_its_rule_names(arch, dense):
    """`_DenseEncoder`'s backward asks `dense_encoder_backward_is_dense` (not the decode's rule): gathered, its
    ∂W_enc is the CSR product over the kept rows."""
    import writesae.sae as sae_module

    sae = make(arch, n_features=12, k=3)
    with (mock.patch("writesae.sae.dense_encoder_backward_is_dense", lambda *shape: dense),
          mock.patch("writesae.sae.dense_decode_is_cheaper", lambda *shape: not dense),
          mock.patch.object(sae_module, "_rows_of_sparse_product", wraps=sae_module._rows_of_sparse_product) as gathered):
        sae.encode(inputs(sae, 4)).sum().backward()
    assert gathered.called == (not dense)


def test_dense_decode_rule_on_the_shapes_that_matter():
    """A flat decode crosses over at n = k·(G + 2)/2 − DENSE_DECODE_FIXED_FEATURES (280 at k = 32, 40 at k = 8, none
    at k = 4), and a dense encoder's backward at its own n = 8·k; factored atoms, whose gather is r·(d_k + d_v)
    numbers, gather at every shape the shipped SAEs and the bit-identity check (scripts.compare_with_commit) train,
    so their numbers do not move."""
    from writesae.sae import dense_decode_is_cheaper, dense_encoder_backward_is_dense

    for batch in (32, 256):  # the rule weighs the same per sample at any batch
        assert dense_decode_is_cheaper(batch, 64, 32, 64, 64, None)  # a 64-feature flat SAE at k = 32
        assert dense_decode_is_cheaper(batch, 279, 32, 64, 64, None)
        assert not dense_decode_is_cheaper(batch, 281, 32, 64, 64, None)
    assert dense_decode_is_cheaper(128, 39, 8, 64, 64, None) and not dense_decode_is_cheaper(128, 41, 8, 64, 64, None)
    assert not dense_decode_is_cheaper(128, 8, 4, 64, 64, None)
    assert not dense_decode_is_cheaper(32, 16384, 32, 128, 128, None)
    assert dense_encoder_backward_is_dense(32, 255, 32, 64, 64)
    assert not dense_encoder_backward_is_dense(32, 257, 32, 64, 64)
    assert not dense_encoder_backward_is_dense(32, 16384, 32, 128, 128)
    for n, m, batch in ((256, 16, 32), (256, 16, 4096), (64, 4, 32), (64, 32, 1024)):  # gdn-austen's SAEs; the check
        assert not dense_decode_is_cheaper(batch, n, m, 64, 64, 1)


@FAST
@given(batch=st.integers(1, 6), n_dicts=st.integers(1, 3), n=st.integers(1, 9), m=st.integers(0, 4),
       seed=st.integers(0, 10**6))
def test_the_sparse_product_is_the_sum_of_its_products_over_every_row(batch, n_dicts, n, m, seed):
    """`_rows_of_sparse_product` (a dense encoder's gathered ∂W_enc) gives row i the sum of values_sj x_s over
    the (sample, head) pairs s whose kept features include i, against adding the products in float64 (to float32
    rounding: on one AVX-512 CPU the kernel's rounding differed from adding the float32 products in order, where
    on another it gave equal bits), with repeated and unreached rows, m = 0 and several heads; rows no pair reaches are exactly zero
    even where the result's memory last held NaN (it is allocated empty and the product must not read it)."""
    from writesae.sae import _rows, _rows_of_sparse_product

    m = min(m, n)
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(batch, n_dicts, n, generator=g).argsort(-1)[..., :m]
    values, x = torch.randn(batch, n_dicts, m, generator=g), torch.randn(batch * n_dicts, 5, generator=g)
    rows = _rows(indices, n)
    expected = torch.zeros(n_dicts * n, 5, dtype=torch.float64)
    for s_, (row_list, value_list) in enumerate(zip(rows.flatten(0, 1).tolist(), values.flatten(0, 1).tolist())):
        for row, value in zip(row_list, value_list):
            expected[row] += value * x[s_].double()
    poisoned = torch.full((n_dicts * n, 5), float("nan"))
    del poisoned  # the allocator hands this block to the result next
    found = _rows_of_sparse_product(rows, values, x, n_dicts * n)
    torch.testing.assert_close(found.double(), expected, rtol=1e-5, atol=1e-5)
    unreached = torch.ones(n_dicts * n, dtype=torch.bool).index_fill_(0, rows.flatten(), False)
    assert torch.equal(found[unreached], torch.zeros_like(found[unreached]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["flat", "matrix"])
def test_a_half_precision_dense_encoders_gathered_backward_runs_in_float32(arch, dtype):
    """torch's CSR products on the CPU take float32 and float64 only (`writesae.sae.CSR_DTYPES`): a dense encoder's
    gathered ∂W_enc in half precision is computed in float32 and rounded once, so it matches float64's to the
    dtype's precision (before, it raised NotImplementedError), and a flat decode there keeps embedding_bag."""
    sae = make(arch, n_features=64, k=3, dtype=str(dtype).removeprefix("torch."))
    x = inputs(sae, 5).to(dtype)
    g = torch.Generator().manual_seed(0)
    upstream = torch.zeros(5, 1, 64).scatter(-1, torch.rand(5, 1, 64, generator=g).topk(3, -1).indices,
                                             torch.randn(5, 1, 3, generator=g))
    with (mock.patch("writesae.sae.dense_decode_is_cheaper", lambda *shape: False),
          mock.patch("writesae.sae.dense_encoder_backward_is_dense", lambda *shape: False),
          mock.patch("writesae.sae.gather_columns_per_block", _blocks_of(5))):  # blocks, where a dtype allows them
        (sae.encode_pre(x) * upstream.to(dtype)).sum().backward()
        values = upstream.topk(3, -1).values.to(dtype).requires_grad_()
        decoded = sae.decode_atoms(upstream.topk(3, -1).indices, values)
        decoded.sum().backward()
    assert decoded.dtype == values.grad.dtype == dtype
    W_enc = sae.W_enc.detach().double().requires_grad_()
    centred = (x.double() * sae.cfg.input_scale - sae.b_dec.detach().double()).flatten(-2)
    (torch.einsum("...hd,hnd->...hn", centred, W_enc) * upstream.double()).sum().backward()
    assert sae.W_enc.grad.dtype == dtype
    torch.testing.assert_close(sae.W_enc.grad.double(), W_enc.grad, rtol=2e-2, atol=2e-2)


def _blocks_of(width: int):
    """`gather_columns_per_block` forced to ``width`` columns (the last block shorter) wherever there is more."""
    return lambda m_rows, result_rows, n_terms, columns, device: min(width, columns)


@FAST
@given(batch=st.integers(1, 6), n_dicts=st.integers(1, 3), m=st.integers(0, 4), width=st.integers(1, 13),
       seed=st.integers(0, 10**6))
def test_the_sparse_product_in_blocks_of_columns_is_the_product_in_one(batch, n_dicts, m, width, seed):
    """`_csr_product` in blocks of columns (here any width, a last block shorter) gives the numbers of one block:
    each block sums the same terms in the same order. To float32 rounding, not bit for bit: on one AVX-512 CPU
    the sparse product's kernel rounded every column of a block differently (by up to 1e-6 here) wherever the
    block's width was not a multiple of 4, while the CPU the rule's constants were fitted on gave equal bits."""
    from writesae.sae import _rows, _rows_of_sparse_product

    g = torch.Generator().manual_seed(seed)
    rows = _rows(torch.rand(batch, n_dicts, 9, generator=g).argsort(-1)[..., :m], 9)
    values, x = torch.randn(batch, n_dicts, m, generator=g), torch.randn(batch * n_dicts, 12, generator=g)
    whole = _rows_of_sparse_product(rows, values, x, n_dicts * 9)
    with mock.patch("writesae.sae.gather_columns_per_block", _blocks_of(width)):
        torch.testing.assert_close(_rows_of_sparse_product(rows, values, x, n_dicts * 9), whole, rtol=1e-5, atol=1e-5)


@FAST
@given(batch=st.lists(st.integers(1, 4), min_size=1, max_size=2), heads=st.sampled_from([[0], [0, 1], [0, 1, 2]]),
       width=st.integers(1, 13), repeat=st.booleans(), grads=st.sampled_from(["both", "values", "W_dec"]),
       seed=st.integers(0, 10**6))
def test_a_flat_decode_in_blocks_of_columns_gives_embedding_bags_values_and_gradients(batch, heads, width, repeat, grads,
                                                                                      seed):
    """A flat decoder's gathered decode by `_BlockedGatheredRows` (CSR products in blocks of columns; ∂values
    summed over the blocks by sampled products) gives ``embedding_bag``'s decode, ∂values and ∂W_dec, for one or
    two leading batch axes, one to three heads, any block width, a feature repeated within a sample (it adds up),
    and either input alone asking for a gradient."""
    sae = make("flat", heads=heads, seed=seed)
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(*batch, len(heads), 12, generator=g).argsort(-1)[..., :3]
    if repeat:
        indices[..., 1] = indices[..., 0]
    values = torch.randn(*batch, len(heads), 3, generator=g, dtype=torch.float64)
    upstream = torch.randn(*batch, len(heads), 4, 3, generator=g, dtype=torch.float64)
    found = []
    for columns in (_blocks_of(width), lambda *shape: shape[3]):  # blocks, then embedding_bag
        sae.W_dec.grad = None
        sae.W_dec.requires_grad_(grads != "values")
        leaf = values.clone().requires_grad_(grads != "W_dec")
        with (mock.patch("writesae.sae.gather_columns_per_block", columns),
              mock.patch("writesae.sae.dense_decode_is_cheaper", lambda *shape: False)):
            decoded = sae.decode_atoms(indices, leaf)
            decoded.backward(upstream)
        found.append((decoded.detach(), leaf.grad, sae.W_dec.grad))
    (blocked, *blocked_grads), (reference, *reference_grads) = found
    torch.testing.assert_close(blocked, reference, rtol=0, atol=1e-12)
    for got, expected in zip(blocked_grads, reference_grads):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("blocked", [True, False])
def test_a_flat_decode_takes_blocks_where_the_rule_names_them(blocked):
    import writesae.sae as sae_module

    sae = make("flat")
    rule = _blocks_of(5) if blocked else (lambda *shape: shape[3])
    with (mock.patch("writesae.sae.gather_columns_per_block", rule),
          mock.patch("writesae.sae.dense_decode_is_cheaper", lambda *shape: False),
          mock.patch.object(sae_module._BlockedGatheredRows, "apply", wraps=sae_module._BlockedGatheredRows.apply) as apply):
        sae.decode_atoms(torch.tensor([[[0, 5, 7]]]), torch.ones(1, 1, 3, dtype=torch.float64))
    assert apply.called == blocked


def test_the_gathered_sum_rule_on_the_measured_shapes():
    """Where the gathered sum rows of benchmarks/results/sae.json found blocks of columns faster (k = 32 terms a
    sample): M past the cache and read dozens of times a row; one block where M fits the cache, where its rows
    are read a few times, where the result has many more rows than M, and off the CPU."""
    from writesae.sae import gather_columns_per_block

    cpu = torch.device("cpu")
    # (rows of M, rows of the result, terms, d): a dense encoder's ∂W_enc (M: the batch's states, the result: the
    # dictionary) and a flat decode (M: W_dec, the result: the batch), at the shapes the rows timed
    for m_rows, result_rows, terms, d in ((1024, 1024, 32768, 128), (512, 1024, 16384, 128), (4096, 1024, 131072, 64),
                                          (1024, 256, 8192, 128), (2048, 4096, 131072, 64)):
        assert gather_columns_per_block(m_rows, result_rows, terms, d * d, cpu) < d * d
    for m_rows, result_rows, terms, d in ((256, 1024, 8192, 128), (1024, 16384, 32768, 128), (1024, 4096, 32768, 128),
                                          (1024, 32, 1024, 128), (16384, 32, 1024, 128), (1024, 1024, 32768, 64),
                                          (16384, 256, 8192, 64)):
        assert gather_columns_per_block(m_rows, result_rows, terms, d * d, cpu) == d * d
    assert gather_columns_per_block(1024, 1024, 32768, 128 * 128, torch.device("meta")) == 128 * 128


def test_the_bilinear_backward_rule_on_the_measured_shapes():
    """Where the encoder backward rows of benchmarks/results/sae.json found each route faster: dense where a
    sample's gradient reaches half of a small dictionary at a large batch, gathered where it reaches few."""
    from writesae.sae import bilinear_backward_is_dense

    for d, n, m, batch in ((64, 64, 32, 1024), (128, 64, 32, 1024), (64, 64, 32, 256)):
        assert bilinear_backward_is_dense(batch, n, m, d, d, 1)
    for d, n, m, batch in ((64, 256, 32, 1024), (128, 1024, 32, 32), (64, 64, 8, 1024), (128, 16384, 32, 32)):
        assert not bilinear_backward_is_dense(batch, n, m, d, d, 1)


# --- sparsity rules ---------------------------------------------------------------------------


@FAST
@given(arch=st.sampled_from(ARCHS), k=st.integers(1, 12), batch=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_topk_codes_have_at_most_k_nonzeros(arch, k, batch, seed):
    sae = make(arch, k=k, heads=[0, 1], seed=seed)
    pre = sae.encode_pre(inputs(sae, batch, seed=seed))
    codes = sae.activation(pre)
    assert ((codes != 0).sum(-1) <= k).all() and (codes >= 0).all()
    # the kept ones are the k largest positive pre-activations, unchanged
    kth_largest = pre.topk(k, dim=-1).values[..., -1:]
    assert torch.equal(codes, torch.where((pre >= kth_largest) & (pre > 0), pre, torch.zeros_like(pre)))


@pytest.mark.parametrize("arch", ARCHS)
def test_batchtopk_threshold_and_batch_independence(arch):
    sae = make(arch, sparsity="batchtopk", k=2, heads=[0, 1]).train()
    first, second = inputs(sae, 6, seed=10), inputs(sae, 6, seed=11)
    codes_1 = sae.encode(first)
    assert ((codes_1 != 0).sum((0, 2)) <= 2 * 6).all()  # k·B per head over the batch
    smallest_1 = torch.where(codes_1 > 0, codes_1, torch.inf).amin((0, 2))
    torch.testing.assert_close(sae.activation.threshold, smallest_1)
    codes_2 = sae.encode(second)
    smallest_2 = torch.where(codes_2 > 0, codes_2, torch.inf).amin((0, 2))
    torch.testing.assert_close(sae.activation.threshold, (smallest_1 + smallest_2) / 2)  # running mean
    with torch.no_grad():
        sae.encode(inputs(sae, 6, seed=12))  # no gradients recorded: no calibration
    torch.testing.assert_close(sae.activation.threshold, (smallest_1 + smallest_2) / 2)

    sae.eval()
    batch = inputs(sae, 7, seed=13)
    together = sae.encode(batch)
    assert together.count_nonzero() > 0
    for i in range(7):
        alone = sae.encode(batch[i : i + 1])[0]
        assert torch.equal(alone != 0, together[i] != 0)
        torch.testing.assert_close(alone, together[i], rtol=0, atol=1e-12)
    pre = sae.encode_pre(batch)
    assert torch.equal(together, torch.where(pre >= sae.activation.threshold[:, None], pre.relu(), 0))


def test_jumprelu_straight_through_gradients():
    theta, eps = 0.5, 0.2
    act = JumpReLU(n_dicts=1, n_features=3, bandwidth=eps, initial_threshold=theta).double()
    # within the window |z − θ| ≤ ε/2: 0.45 and 0.58 (feature 0), 0.41 (feature 1); none for feature 2
    pre = torch.tensor([[[0.45, 0.41, 0.9]], [[0.58, 1.2, 0.1]], [[0.2, 0.3, 0.61]]], dtype=torch.float64)
    in_window = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    codes = act(pre)
    assert torch.equal(codes, pre * (pre > theta))
    codes.sum().backward()
    # d/dθ estimated as −θ K/ε per sample; d/d log θ multiplies by θ.
    torch.testing.assert_close(act.log_threshold.grad, -theta * theta / eps * in_window, rtol=1e-6, atol=1e-6)
    act.log_threshold.grad = None
    act.l0_penalty(pre).sum().backward()
    torch.testing.assert_close(act.log_threshold.grad, -theta / eps * in_window, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_jumprelu_gradient_reaches_log_threshold_through_the_sae(arch):
    sae = make(arch, sparsity="jumprelu", jumprelu_bandwidth=0.5, jumprelu_initial_threshold=0.2)
    x = inputs(sae, 16)
    pre = sae.encode_pre(x)
    loss = ((sae.decode(sae.activation(pre)) - x) ** 2).sum() + sae.activation.l0_penalty(pre).sum()
    loss.backward()
    grad = sae.activation.log_threshold.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_relu_l1_penalty_is_weighted_by_atom_norm(arch):
    sae = make(arch, sparsity="relu")
    with torch.no_grad():
        for factor in factors_of(sae):  # atoms of varied norms
            factor.mul_(torch.rand(factor.shape[:-1], dtype=factor.dtype).add(0.5).unsqueeze(-1))
    codes = sae.encode(inputs(sae, 5))
    assert (codes > 0).any()
    norms = atoms_of(sae).flatten(-2).norm(dim=-1)
    expected = torch.einsum("bhn,hn->bh", codes, norms)
    torch.testing.assert_close(sae.l1_penalty(codes), expected, rtol=0, atol=1e-12)


# --- hook points and the error term -----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_error_term_keeps_the_forward_while_codes_stay_patchable(arch):
    sae = make(arch, dtype="float32", sparsity="batchtopk", input_scale=0.7)
    calibrate(sae, batches=1)
    sae.train()  # batch-dependent codes: the hook-free recompute must still match the hooked pass
    x = inputs(sae, 6)
    reconstruction = sae(x)
    assert (reconstruction - x).abs().max() > 1e-3
    sae.use_error_term = True
    assert (sae(x) - x).abs().max() <= 1e-6
    codes = sae.encode(x).detach()
    handle = sae.hook_sae_acts_post.register_forward_hook(lambda module, args, acts: acts * 2)
    patched = sae(x)
    handle.remove()
    assert sae.activation.n_updates == 1 + 4  # the recompute behind the error term did not calibrate
    expected_shift = torch.einsum("bhn,hnkv->bhkv", codes, atoms_of(sae)).detach() / 0.7
    assert expected_shift.abs().max() > 1e-3
    torch.testing.assert_close(patched - x, expected_shift, rtol=1e-4, atol=1e-5)
    patched.sum().backward()  # the reconstruction path carries gradients
    assert sae.b_enc.grad is not None and sae.b_enc.grad.abs().sum() > 0


def test_hook_points_fire_with_their_values():
    sae = make("bilinear", heads=[0, 1])
    sae.use_error_term = True
    seen = {}
    for name in ("input", "acts_pre", "acts_post", "recons", "error", "output"):
        hook_point = getattr(sae, f"hook_sae_{name}")
        hook_point.register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, out.detach()))
    x = inputs(sae, 3)
    sae(x)
    assert torch.equal(seen["input"], x)
    torch.testing.assert_close(seen["acts_pre"], sae.encode_pre(x))
    torch.testing.assert_close(seen["acts_post"], sae.activation(seen["acts_pre"]))
    torch.testing.assert_close(seen["error"], x - seen["recons"])
    torch.testing.assert_close(seen["output"], seen["recons"] + seen["error"])


def test_hook_points_are_transformer_lens_hook_points_when_available():
    hook_points = pytest.importorskip("transformer_lens.hook_points")
    sae = make("matrix")
    assert isinstance(sae.hook_sae_acts_post, hook_points.HookPoint)
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: torch.zeros_like(acts))
    torch.testing.assert_close(sae(inputs(sae, 2)), sae.b_dec.expand(2, -1, -1, -1))


def test_core_imports_without_transformer_lens():
    script = (
        "import sys; sys.modules['transformer_lens'] = None\n"
        "import torch, writesae\n"
        "sae = writesae.BilinearMatrixSAE(d_k=3, d_v=2, n_features=4, k=1, seed=0)\n"
        "assert type(sae.hook_sae_acts_post) is torch.nn.Identity\n"
        "sae.hook_sae_acts_post.register_forward_hook(lambda m, a, out: out * 0)\n"
        "assert torch.allclose(sae(torch.randn(5, 1, 3, 2)), sae.b_dec)\n"
        "assert sys.modules['transformer_lens'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- factor normalisation and folding ---------------------------------------------------------


def scramble_norms_(sae, common_over_rank: bool = False) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for factor in factors_of(sae):
            shape = factor.shape[:-2] + (1,) if common_over_rank and factor.dim() == 4 else factor.shape[:-1]
            factor.mul_(torch.rand(shape, generator=g, dtype=factor.dtype).add(0.5).unsqueeze(-1))


@pytest.mark.parametrize("arch", ARCHS)
def test_normalize_factors_gives_unit_norms(arch):
    sae = make(arch, sparsity="relu")
    scramble_norms_(sae)
    sae.normalize_factors_()
    for factor in factors_of(sae):
        torch.testing.assert_close(factor.norm(dim=-1), torch.ones(factor.shape[:-1], dtype=factor.dtype))
    x = inputs(sae, 5)
    before = sae(x)
    sae.normalize_factors_()  # already unit: nothing changes, for every architecture
    torch.testing.assert_close(sae(x), before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch, rank", [("flat", 1), ("matrix", 1), ("matrix", 2)])
@pytest.mark.parametrize("sparsity", ["relu", "jumprelu"])
def test_normalize_factors_keeps_dense_encoder_saes_exact(arch, rank, sparsity):
    sae = make(arch, rank=rank, sparsity=sparsity, jumprelu_initial_threshold=0.05)
    scramble_norms_(sae, common_over_rank=True)  # one scale per feature: exactly compensable
    x = inputs(sae, 6)
    before = sae(x)
    assert sae.encode(x).count_nonzero() > 0
    sae.normalize_factors_()
    torch.testing.assert_close(sae(x), before, rtol=0, atol=1e-10)


def test_normalize_factors_keeps_each_features_contribution_norm_at_rank_2():
    sae = make("matrix", rank=2, sparsity="relu")
    scramble_norms_(sae)  # different scales per rank: the atom's shape changes, its weight must not
    x = inputs(sae, 6)
    contribution = lambda: sae.encode(x) * atoms_of(sae).flatten(-2).norm(dim=-1)  # ‖a_i atom_i‖_F
    before = contribution()
    sae.normalize_factors_()
    torch.testing.assert_close(contribution(), before, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ["flat", "matrix", "bilinear"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_fold_input_scale_keeps_codes_and_outputs(arch, sparsity):
    sae = make(arch, sparsity=sparsity, input_scale=2.5)
    calibrate(sae)
    x = inputs(sae, 6)
    k, delta = x[..., 0], x[..., 0, :]
    before = sae.encode(x), sae(x), sae.encode_factors(k, delta)
    assert before[0].count_nonzero() > 0
    sae.fold_input_scale_()
    assert sae.cfg.input_scale == 1.0
    for old, new in zip(before, (sae.encode(x), sae(x), sae.encode_factors(k, delta))):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-10)


def test_fold_input_scale_refuses_a_tied_sae():
    sae = make("tied", input_scale=2.5)
    with pytest.raises(ValueError, match="tied"):
        sae.fold_input_scale_()
    assert sae.cfg.input_scale == 2.5
    make("tied").fold_input_scale_()  # s = 1: nothing to fold


# --- saving and loading -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_save_load_round_trip(tmp_path, arch, sparsity):
    sae = make(arch, sparsity=sparsity, heads=[2, 0], n_heads=4, input_scale=0.8,
               site="blocks.1.linear_attn.hook_state", model_name="tiny")
    calibrate(sae)
    if sparsity == "jumprelu":
        with torch.no_grad():
            sae.activation.log_threshold.add_(torch.rand(sae.activation.log_threshold.shape, dtype=torch.float64))
    sae.save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert loaded.state_dict().keys() == sae.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    loaded.eval()
    x = inputs(sae, 5)
    assert torch.equal(loaded(x), sae(x))
    assert all(p.requires_grad for p in loaded.parameters())
    assert type(sae).load(tmp_path / "sae").cfg == sae.cfg


def test_saved_folder_holds_json_and_safetensors_only(tmp_path):
    sae = make("bilinear", sparsity="batchtopk")
    calibrate(sae)
    save_sae(sae, tmp_path / "sae")
    assert {p.name for p in (tmp_path / "sae").iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    assert {p.name for p in tmp_path.iterdir()} == {"sae"}  # no temporary folder left behind
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "bilinear" and cfg["writesae_version"] == "0.1.0"
    raw = (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()  # 8-byte header size, JSON header, data
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["activation.threshold"]["shape"] == [1]
    weights = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    assert torch.equal(weights["activation.threshold"], sae.activation.threshold)
    for module in ("sae.py", "sparsity.py", "io.py"):
        source = (Path(__file__).parents[1] / "writesae" / module).read_text()
        assert "import pickle" not in source and "torch.load" not in source and "torch.save" not in source


def test_save_replaces_an_sae_folder_but_nothing_else(tmp_path):
    save_sae(make("matrix", seed=0), tmp_path / "sae")
    newer = make("matrix", seed=1)
    save_sae(newer, tmp_path / "sae")
    assert torch.equal(load_sae(tmp_path / "sae").V, newer.V)
    assert {p.name for p in tmp_path.iterdir()} == {"sae"}
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an SAE folder"):
        save_sae(newer, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_loading_as_the_wrong_class_fails(tmp_path):
    make("matrix").save(tmp_path / "sae")
    with pytest.raises(ValueError, match="holds a MatrixSAE, not a BilinearMatrixSAE"):
        BilinearMatrixSAE.load(tmp_path / "sae")


def edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"d_k": 5}, r"V has shape \[1, 12, 2, 4\], expected \[1, 12, 2, 5\]"),
    ({"rank": 3}, r"W has shape \[1, 12, 2, 3\], expected \[1, 12, 3, 3\]"),
    ({"heads": [0, 1]}, r"b_dec has shape \[1, 4, 3\], expected \[2, 4, 3\]"),
    ({"tied": True}, r"unexpected U"),
    ({"sparsity": "jumprelu"}, r"missing activation.log_threshold"),
    ({"rank": None}, r"missing keys \['rank'\]"),
    ({"colour": "red"}, r"unknown keys \['colour'\]"),
    ({"architecture": "conv"}, r"unknown architecture 'conv'"),
])
def test_mismatched_cfg_fails_clearly(tmp_path, changes, message):
    make("bilinear").save(tmp_path / "sae")
    edit_cfg(tmp_path / "sae", **changes)
    with pytest.raises(ValueError, match=message):
        load_sae(tmp_path / "sae")


def test_mismatched_tensor_fails_clearly(tmp_path):
    make("flat").save(tmp_path / "sae")
    file = tmp_path / "sae" / "sae_weights.safetensors"
    tensors = load_file(file)
    tensors["b_enc"] = torch.zeros(1, 11, dtype=torch.float64)
    save_file(tensors, file)
    edit_cfg(tmp_path / "sae", weights_sha256=None)  # as in a folder saved without a checksum
    with pytest.raises(ValueError, match=r"n_features=12.*b_enc has shape \[1, 11\], expected \[1, 12\]"):
        load_sae(tmp_path / "sae")


def test_flipped_bytes_in_the_weights_are_caught_by_the_checksum(tmp_path):
    make("bilinear").save(tmp_path / "sae")
    file = tmp_path / "sae" / "sae_weights.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor's data: still a valid, finite float64
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: its SHA-256 differs .* the file is corrupted"):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t["b_dec"].view(-1)[0].fill_(math.nan), r"non-finite values \(NaN or Inf\) in b_dec"),
    (lambda t: t["V"].view(-1)[3].fill_(math.inf), r"non-finite values \(NaN or Inf\) in V"),
    (lambda t: t.update(W=t["W"].to(torch.int32)), r"W has dtype torch.int32, expected torch.float64"),
    (lambda t: t.update({"activation.n_updates": t["activation.n_updates"].double()}),
     r"activation.n_updates has dtype torch.float64, expected torch.int64"),
])
def test_weights_that_would_be_silently_cast_or_are_not_finite_are_refused(tmp_path, corrupt, message):
    make("bilinear", sparsity="batchtopk").save(tmp_path / "sae")
    file = tmp_path / "sae" / "sae_weights.safetensors"
    tensors = load_file(file)
    corrupt(tensors)
    save_file(tensors, file)
    edit_cfg(tmp_path / "sae", weights_sha256=None)  # the checks hold without a checksum too
    with pytest.raises(ValueError, match=message):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize("content, message", [
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe\x00", "is not valid JSON"),
    (b"null", "must hold a JSON object of SAE settings, got NoneType"),
    (b"[1, 2]", "must hold a JSON object of SAE settings, got list"),
    (b" " * (2 << 20), "is larger than 1048576 bytes"),
], ids=["not JSON", "not UTF-8", "null", "a list", "2 MiB"])
def test_an_unreadable_cfg_is_named(tmp_path, content, message):
    make("matrix").save(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        load_sae(tmp_path / "sae")
    assert str(error.value).startswith(str(tmp_path / "sae" / "cfg.json"))


def test_a_cfg_linked_to_a_device_is_refused_at_once(tmp_path):
    make("matrix").save(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").unlink()
    (tmp_path / "sae" / "cfg.json").symlink_to("/dev/zero")  # reading it to the end would never finish
    with pytest.raises(FileNotFoundError, match=r"cfg.json is missing or is not a regular file"):
        load_sae(tmp_path / "sae")


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_saved_folders_get_the_permissions_the_umask_allows(tmp_path, umask, folder_mode, file_mode):
    previous = os.umask(umask)
    try:
        save_sae(make("matrix"), tmp_path / "sae")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "sae").stat().st_mode) == folder_mode
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "sae").iterdir()} == {
        "cfg.json": file_mode, "sae_weights.safetensors": file_mode}


# --- clear errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"architecture": "conv"}, "unknown architecture"),
    ({"sparsity": "l2"}, "unknown sparsity"),
    ({"tied": True}, "tied=True needs the bilinear architecture"),
    ({"k": 13}, "k=13 exceeds n_features=12"),
    ({"heads": [0, 3], "n_heads": 3}, r"heads \[3\] out of range"),
    ({"heads": 4, "n_heads": 4}, r"heads \[4\] out of range"),
    ({"heads": -1}, r"heads \[-1\] out of range"),
    ({"heads": [1, 1]}, "repeat"),
    ({"heads": "some", "n_heads": 2}, "heads must be"),
    ({"rank": 0}, "rank must be a positive int"),
    ({"architecture": "flat", "rank": 2}, "flat SAE has no rank"),
    ({"dtype": "int32"}, "dtype"),
    ({"input_scale": 0.0}, "input_scale"),
])
def test_config_errors(changes, message):
    kw = {"architecture": "matrix", "d_k": 4, "d_v": 3, "n_features": 12, "k": 3, **changes}
    with pytest.raises(ValueError, match=message):
        SAEConfig(**kw)


def test_architectures_and_sparsity_rules_are_named_by_their_registries_alone():
    kw = {"architecture": "matrix", "d_k": 4, "d_v": 3, "n_features": 12, "k": 3}
    with pytest.raises(ValueError) as error:
        SAEConfig(**kw | {"sparsity": "l2"})
    assert str(error.value) == "unknown sparsity 'l2'; expected one of ['topk', 'batchtopk', 'relu', 'jumprelu']"
    assert list(SPARSITIES) == ["topk", "batchtopk", "relu", "jumprelu"]
    with pytest.raises(ValueError) as error:
        SAEConfig(**kw | {"architecture": "conv"})
    assert str(error.value) == "unknown architecture 'conv'; expected one of ['bilinear', 'flat', 'matrix']"
    assert all(cls.architecture == name for name, cls in ARCHITECTURES.items())
    for name, rule in SPARSITIES.items():
        assert type(make_sparsity(SAEConfig(**kw | {"sparsity": name}))) is rule
    # a rule that keeps cfg.k features is held to k <= n_features; one that does not ignores k
    assert [name for name, rule in SPARSITIES.items() if rule.uses_k] == ["topk", "batchtopk"]
    SAEConfig(**kw | {"sparsity": "relu", "k": 13})


@pytest.mark.parametrize("arch", ["flat", "matrix", "bilinear"])
def test_all_heads_learn_their_count_when_told(arch):
    kw = dict(d_k=4, d_v=3, n_features=12, k=3, rank=1 if arch == "flat" else 2, heads="all", seed=3)
    sae = ARCHITECTURES[arch](**kw)
    assert not list(sae.parameters())
    with pytest.raises(ValueError, match="does not know the site's number of heads yet"):
        sae.encode(torch.randn(2, 3, 4, 3))
    assert sae.learn_n_heads_(3) is sae and sae.cfg.n_heads == 3 and sae.n_dicts == 3
    told = ARCHITECTURES[arch](n_heads=3, **kw)  # the same seed: the same dictionaries
    assert sae.state_dict().keys() == told.state_dict().keys()
    assert all(torch.equal(t, told.state_dict()[name]) for name, t in sae.state_dict().items())
    with pytest.raises(ValueError, match="made for a site of 3 heads; this site has 4"):
        sae.learn_n_heads_(4)
    with pytest.raises(ValueError, match=r"heads \[2\] out of range"):
        make(arch, heads=[0, 2]).learn_n_heads_(2)


def test_wrong_input_shapes_fail_clearly():
    sae = make("bilinear", heads=[0, 1])
    with pytest.raises(ValueError, match=r"\[\.\.\., n_dicts=2, d_k=4, d_v=3\], got \(5, 2, 3, 4\)"):
        sae(torch.randn(5, 2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"n_dicts=2, d_k=4, d_v=3\], got \(4, 3\)"):
        sae.encode(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected k"):
        sae.encode_factors(torch.randn(5, 2, 4, dtype=torch.float64), torch.randn(5, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_features=12"):
        sae.decode(torch.randn(5, 2, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match="indices and values"):
        sae.decode_sparse(torch.zeros(5, 2, 3, dtype=torch.long), torch.zeros(5, 2, 4, dtype=torch.float64))


def test_every_file_and_folder_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    import writesae.io as io

    events = []
    real_fsync, real_replace = io._fsync, os.replace
    monkeypatch.setattr(io, "_fsync", lambda path: events.append(("fsync", Path(path).name)) or real_fsync(path))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("rename", Path(dst).name)) or real_replace(src, dst))
    save_sae(make("matrix"), tmp_path / "sae")
    rename = events.index(("rename", "sae"))
    synced = {name for kind, name in events[:rename] if kind == "fsync"}
    assert {"cfg.json", "sae_weights.safetensors"} <= synced and any(name.startswith(".sae.new.") for name in synced)
    assert ("fsync", tmp_path.name) in events[rename:]  # and the parent folder, so that the rename itself lasts
