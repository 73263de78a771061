"""PCA-k, the dense baseline of the SAE eval cards, against an exact SVD."""

import pytest
import torch

from writesae.baselines import PCABaseline
from writesae.evals import reconstruction_metrics


def _samples(n=300, heads=2, d_k=4, d_v=3, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, heads, d_k, d_v, generator=g) * torch.linspace(0.2, 2.0, d_k * d_v).view(d_k, d_v)
    coords = torch.randn(n, heads, rank, generator=g)
    basis = torch.randn(heads, rank, d_k * d_v, generator=g)
    mean = torch.randn(heads, d_k * d_v, generator=g)
    return (torch.einsum("nhr,hrd->nhd", coords, basis) + mean).view(n, heads, d_k, d_v)


def test_pca_reconstructs_samples_of_a_k_dimensional_affine_subspace():
    x = _samples(rank=3)
    pca = PCABaseline.fit(x, k=3)
    assert torch.allclose(pca(x), x, atol=1e-4)
    metrics = reconstruction_metrics(pca, [x[:150], x[150:]])
    assert max(metrics["fvu"]) < 1e-8 and metrics["l0"] == pytest.approx([3.0, 3.0])


def test_pca_projection_equals_the_exact_svd_one():
    x = _samples()
    k = 5
    pca = PCABaseline.fit(x, k=k)
    for h in range(x.shape[1]):
        flat = x[:, h].flatten(1).double()
        centred = flat - flat.mean(0)
        _, _, Vh = torch.linalg.svd(centred, full_matrices=False)
        exact = centred @ Vh[:k].T @ Vh[:k] + flat.mean(0)
        assert torch.allclose(pca(x)[:, h].flatten(1).double(), exact, atol=1e-4)


def _decaying_spectrum_samples(n=400, heads=2, d_k=8, d_v=8, decay=0.95, seed=0):
    """Full-rank samples whose principal standard deviations fall geometrically, as real states' do."""
    g = torch.Generator().manual_seed(seed)
    D = d_k * d_v
    basis = torch.linalg.qr(torch.randn(heads, D, D, generator=g)).Q
    coords = torch.randn(n, heads, D, generator=g) * decay ** torch.arange(D)
    mean = torch.randn(heads, D, generator=g)
    return (torch.einsum("nhr,hdr->nhd", coords, basis) + mean).view(n, heads, d_k, d_v)


@pytest.mark.parametrize("k", [4, 16])
def test_pca_fvu_is_the_eckart_young_minimum_on_a_full_rank_spectrum(k):
    """With d_k·d_v = 64 above k + the oversampling, the random projection alone misses the top subspace (its
    FVU 0.02–0.04 above the minimum): the power iterations are what make PCA-k the best rank-k reconstruction."""
    x = _decaying_spectrum_samples()
    fvu = reconstruction_metrics(PCABaseline.fit(x, k=k), [x])["fvu"]
    for h in range(x.shape[1]):
        flat = x[:, h].flatten(1).double()
        sigma = torch.linalg.svdvals(flat - flat.mean(0))
        assert fvu[h] == pytest.approx(float(sigma[k:].pow(2).sum() / sigma.pow(2).sum()), abs=1e-5)


def test_pca_fvu_falls_with_k_and_reaches_zero_at_full_rank():
    x = _samples()
    fvu = [sum(reconstruction_metrics(PCABaseline.fit(x, k=k), [x])["fvu"]) for k in (1, 4, 8, 12)]
    assert fvu == sorted(fvu, reverse=True) and fvu[-1] < 1e-8


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k=13 components"):
        PCABaseline.fit(_samples(), k=13)
