"""Evaluation metrics against direct computations, and splicing costs at their known extremes."""

from __future__ import annotations

import pytest
import torch

from writesae import BilinearMatrixSAE, MatrixSAE
from writesae.evals import downstream_metrics, downstream_references, reconstruction_metrics
from hooked_gdn.sites import site_name
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


@pytest.fixture(name="model", scope="module")
def model_fixture():
    return random_tiny_model(HookedSAEGatedDeltaNet)


def make_sae(model, kind: str, **kw):
    layer = model.cfg.gdn_layers[1]
    return BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=16, k=2, heads=[1, 3],
                             site=site_name(layer, kind), seed=0, **kw)


TOKENS = torch.randint(0, 101, (3, 24), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("mode", ["loop", "single"])
@pytest.mark.parametrize("kind", ["state", "write"])
def test_downstream_metrics_with_the_error_term_recover_everything(model, mode, kind):
    sae = make_sae(model, kind)
    sae.use_error_term = True  # splicing then changes nothing: all of the loss is recovered
    exact = downstream_metrics(model, sae, TOKENS, mode)
    assert exact["kl_spliced"] == pytest.approx(0, abs=1e-6)
    assert exact["ce_spliced"] == pytest.approx(exact["ce_clean"], abs=1e-5)
    assert exact["kl_zero_ablated"] > 1e-6
    assert exact["ce_loss_recovered"] == pytest.approx(1, abs=1e-3)
    sae.use_error_term = False
    assert downstream_metrics(model, sae, TOKENS, mode)["kl_spliced"] > 1e-7  # a random SAE costs something


@pytest.mark.parametrize("mode", ["loop", "single"])
@pytest.mark.parametrize("kind", ["state", "write"])
def test_an_sae_that_reconstructs_zero_is_the_zero_ablation(model, mode, kind):
    # the zero ablation must act exactly where the splice acts: at one position per sequence in
    # single mode, for writes too (whose hook fires at every position)
    sae = make_sae(model, kind, sparsity="relu")
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)  # no feature ever fires, and b_dec = 0: X̂ = 0
    metrics = downstream_metrics(model, sae, TOKENS, mode)
    assert metrics["kl_zero_ablated"] > 1e-6
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_zero_ablated"], rel=1e-6)
    assert metrics["kl_spliced"] == pytest.approx(metrics["kl_zero_ablated"], rel=1e-5)
    assert metrics["ce_loss_recovered"] == pytest.approx(0, abs=1e-4)


@pytest.mark.parametrize("mode", ["loop", "single"])
def test_shared_references_score_every_sae_on_the_heads_as_alone(model, mode):
    references = downstream_references(model, make_sae(model, "state"), TOKENS, mode, seed=3)
    sae = make_sae(model, "state", tied=True)  # another SAE on the same site and heads
    torch.nn.init.normal_(sae.V, generator=torch.Generator().manual_seed(1))
    assert downstream_metrics(model, sae, TOKENS, mode, seed=3, references=references) == downstream_metrics(model, sae, TOKENS, mode, seed=3)
    other_heads = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=16, k=2, heads=[0, 1],
                                    site=make_sae(model, "state").cfg.site)
    with pytest.raises(ValueError, match=r"another splice: heads \[1, 3\], not \[0, 1\]"):
        downstream_metrics(model, other_heads, TOKENS, mode, seed=3, references=references)
    with pytest.raises(ValueError, match="another splice: other tokens"):
        downstream_metrics(model, make_sae(model, "state"), TOKENS[:2], mode, seed=3, references=references)


def test_an_fvu_above_1_is_named_by_model_head_and_explained():
    from writesae.evals import worse_than_the_mean

    assert worse_than_the_mean([0.4, 1.0], heads=[1, 3]) is None  # 1 is the mean's own FVU: not worse
    message = worse_than_the_mean([0.4, 1.25, float("nan")], heads=[0, 2, 3])
    assert message.startswith("held-out FVU above 1 for head 2 (1.25), head 3 (nan): there the SAE reconstructs worse "
                              "than predicting the held-out mean would")
    assert "distribution shift" in message
