"""Evaluation metrics against direct computations, and splicing costs at their known extremes."""

from __future__ import annotations

import pytest
import torch

from writesae import BilinearMatrixSAE, MatrixSAE
from writesae.evals import downstream_metrics, reconstruction_metrics
from writesae.splice import HookedSAEGatedDeltaNet

from .conftest import random_tiny_model


def test_reconstruction_metrics_match_direct_formulas():
    sae = MatrixSAE(d_k=6, d_v=5, n_features=40, k=3, heads=[0, 2], n_heads=3, seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(b, 2, 6, 5, generator=g) * 2 + 1 for b in (7, 11, 5)]
    got = reconstruction_metrics(sae, batches, dense_above=0.2)
    x = torch.cat(batches).double()
    with torch.no_grad():
        codes = sae.encode(x.float())
        x_hat = sae.decode(codes).double()
    for h in range(2):
        fvu = ((x[:, h] - x_hat[:, h]) ** 2).sum() / ((x[:, h] - x[:, h].mean(0)) ** 2).sum()
        assert got["fvu"][h] == pytest.approx(fvu.item(), rel=1e-6)
        active = codes[:, h] != 0
        assert got["l0"][h] == pytest.approx(active.sum(-1).double().mean().item())
        freq = active.double().mean(0)
        assert got["dead_fraction"][h] == pytest.approx((freq == 0).double().mean().item())
        assert got["dense_fraction"][h] == pytest.approx((freq > 0.2).double().mean().item())
    assert got["samples"] == 23


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(HookedSAEGatedDeltaNet)


@pytest.mark.parametrize("mode", ["loop", "single"])
@pytest.mark.parametrize("site", ["hook_state", "hook_write_value"])
def test_downstream_metrics_at_the_extremes(model, mode, site):
    layer = model.cfg.gdn_layers[1]
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=16, k=2, heads="all",
                            n_heads=model.cfg.n_value_heads, site=f"blocks.{layer}.linear_attn.{site}", seed=0)
    tokens = torch.randint(0, 101, (3, 24), generator=torch.Generator().manual_seed(2))
    sae.use_error_term = True  # splicing then changes nothing: all of the loss is recovered
    exact = downstream_metrics(model, sae, tokens, mode)
    assert exact["kl_spliced"] == pytest.approx(0, abs=1e-6)
    assert exact["ce_spliced"] == pytest.approx(exact["ce_clean"], abs=1e-5)
    assert exact["kl_zero_ablated"] > 1e-6
    assert exact["ce_loss_recovered"] == pytest.approx(1, abs=1e-3)
    sae.use_error_term = False
    lossy = downstream_metrics(model, sae, tokens, mode)
    assert lossy["kl_spliced"] > 1e-7
    assert lossy["ce_zero_ablated"] == pytest.approx(exact["ce_zero_ablated"])
