"""Dense baselines for an SAE's reconstruction: PCA with k components per head.

An SAE with L0 = k reconstructs each sample from k atoms chosen per sample; PCA with k components
reconstructs it from one fixed k-dimensional subspace per head, X̂ = μ + P Pᵀ (X − μ) on the flattened
X ∈ R^{d_k·d_v}. PCA-k is the bar a sparse dictionary has to clear at the same L0.
`PCABaseline` has ``encode``/``decode`` like an SAE (codes are the k coordinates Pᵀ (X − μ)), so
`writesae.evals.reconstruction_metrics` evaluates it unchanged (its L0 is then k).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


class PCABaseline:
    """Per-head mean μ [n_heads, d_k·d_v] and top-k principal directions P [n_heads, d_k·d_v, k]."""

    def __init__(self, mean: Float[Tensor, "n_heads D"], components: Float[Tensor, "n_heads D k"], d_k: int, d_v: int):
        self.b_dec, self.components, self.d_k, self.d_v = mean, components, d_k, d_v

    @classmethod
    @torch.no_grad()
    def fit(cls, samples: Float[Tensor, "n n_heads d_k d_v"], k: int, seed: int = 0, oversample: int = 8) -> "PCABaseline":
        """Fit on training samples with randomised PCA (``torch.pca_lowrank``, seeded) per head."""
        n, n_heads, d_k, d_v = samples.shape
        if not 1 <= k <= min(n, d_k * d_v):
            raise ValueError(f"k={k} components need 1 <= k <= min(samples={n}, d_k·d_v={d_k * d_v})")
        flat = samples.flatten(-2).float()
        torch.manual_seed(seed)  # pca_lowrank's random projection
        components = []
        for h in range(n_heads):
            _, _, V = torch.pca_lowrank(flat[:, h], q=min(k + oversample, n, d_k * d_v), center=True, niter=6)
            components.append(V[:, :k])
        return cls(flat.mean(0), torch.stack(components), d_k, d_v)

    @property
    def k(self) -> int:
        return self.components.shape[-1]

    def encode(self, x: Float[Tensor, "*batch n_heads d_k d_v"]) -> Float[Tensor, "*batch n_heads k"]:
        return torch.einsum("...hd,hdk->...hk", x.flatten(-2) - self.b_dec, self.components)

    def decode(self, codes: Float[Tensor, "*batch n_heads k"]) -> Float[Tensor, "*batch n_heads d_k d_v"]:
        flat = torch.einsum("...hk,hdk->...hd", codes, self.components) + self.b_dec
        return flat.unflatten(-1, (self.d_k, self.d_v))

    def __call__(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
