"""The sparsity rules of DESIGN §4: maps from pre-activations to codes, both [*batch, n_dicts, n].

Every rule acts on each dictionary (head) separately:

- ``TopK``: ReLU, then keep the k largest of each sample.
- ``BatchTopK``: in training mode keep the k·B largest of a batch of B samples; in eval mode keep
  whatever clears a threshold calibrated in training, so a sample's code never depends on its batch.
- ``nn.ReLU`` (trained with the SAE's ``l1_penalty``).
- ``JumpReLU``: a = z·H(z − θ) with a learned per-feature θ and straight-through θ-gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TopK(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())


class BatchTopK(nn.Module):
    """Top k·B activations of a B-sample batch per head in training; a calibrated threshold in eval.

    ``threshold`` [n_dicts] is the running average of the smallest activation each training batch
    kept (0 when the batch had fewer than k·B positive activations, as then every positive one was
    kept): the plain mean over the first 1/momentum batches, an exponential average after that.
    Only training-mode passes that record gradients update it; passes under ``torch.no_grad()``
    (evaluation in training mode, the hook-free recompute behind ``use_error_term``) leave it alone.
    In eval mode a = ReLU(z)·[z ≥ threshold]; before any calibration that is plain ReLU.
    """

    momentum = 0.01

    def __init__(self, k: int, n_dicts: int):
        super().__init__()
        self.k = k
        self.register_buffer("threshold", torch.zeros(n_dicts))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    def forward(self, pre: Tensor) -> Tensor:
        acts = pre.relu()
        if not self.training:
            return acts * (pre >= self.threshold[:, None])
        n_dicts, n = pre.shape[-2:]
        per_head = acts.reshape(-1, n_dicts, n).transpose(0, 1).reshape(n_dicts, -1)  # [n_dicts, B·n]
        n_samples = per_head.shape[1] // n
        kept, indices = per_head.topk(self.k * n_samples, dim=-1, sorted=False)
        if torch.is_grad_enabled():
            self._calibrate(kept.detach().amin(-1))
        codes = torch.zeros_like(per_head).scatter(-1, indices, kept)
        return codes.reshape(n_dicts, -1, n).transpose(0, 1).reshape(pre.shape)

    @torch.no_grad()
    def _calibrate(self, smallest_kept: Tensor) -> None:
        self.n_updates += 1
        rate = max(1.0 / self.n_updates.item(), self.momentum)
        self.threshold.lerp_(smallest_kept.to(self.threshold.dtype), rate)


class JumpReLU(nn.Module):
    """a = z·H(z − θ), θ = exp(log_threshold) [n_dicts, n] (Rajamanoharan et al., 2024).

    H has no useful derivative, so θ learns through straight-through estimates: the step's
    derivative in θ is replaced by −K((z − θ)/ε)/ε, K the rectangle on [−½, ½] and ε the bandwidth.
    """

    def __init__(self, n_dicts: int, n_features: int, bandwidth: float, initial_threshold: float):
        super().__init__()
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((n_dicts, n_features), float(initial_threshold)).log())

    def forward(self, pre: Tensor) -> Tensor:
        return _Jump.apply(pre, self.log_threshold.exp(), self.bandwidth, False)

    def l0_penalty(self, pre: Tensor) -> Tensor:
        """Σ_i H(z_i − θ_i) [*batch, n_dicts], differentiable in θ (not in z) by the estimate above."""
        return _Jump.apply(pre, self.log_threshold.exp(), self.bandwidth, True).sum(-1)


class _Jump(torch.autograd.Function):
    """z·H(z − θ), or H(z − θ) itself when ``step``, with the straight-through θ-gradient."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float, step: bool) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth, ctx.step = bandwidth, step
        gate = (pre > theta).to(pre.dtype)
        return gate if step else pre * gate

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        kernel = ((pre - theta).abs() <= ctx.bandwidth / 2).to(grad.dtype) / ctx.bandwidth  # K((z−θ)/ε)/ε
        # d/dθ of z·H(z − θ) is estimated as −θ·K/ε (the jump's height times the step's estimate).
        grad_theta = -grad * kernel * (1.0 if ctx.step else theta)
        grad_pre = None if ctx.step else grad * (pre > theta)
        return grad_pre, grad_theta.reshape(-1, *theta.shape).sum(0), None, None


def make_sparsity(cfg) -> nn.Module:
    """The sparsity rule an `SAEConfig` names."""
    n_dicts = len(cfg.head_indices)
    if cfg.sparsity == "topk":
        return TopK(cfg.k)
    if cfg.sparsity == "batchtopk":
        return BatchTopK(cfg.k, n_dicts)
    if cfg.sparsity == "relu":
        return nn.ReLU()
    return JumpReLU(n_dicts, cfg.n_features, cfg.jumprelu_bandwidth, cfg.jumprelu_initial_threshold)
