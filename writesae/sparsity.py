"""The sparsity rules of docs/design.md §13: maps from pre-activations z to codes a, both [*batch, n_dicts, n],
and the terms each adds to the training loss.

Every rule acts on each dictionary (head) separately:

- ``TopK``: ReLU, then keep the k largest of each sample. Trained with AuxK.
- ``BatchTopK``: in training mode keep the k·B largest of a batch of B samples; in eval mode keep
  whatever clears a threshold calibrated in training, so a sample's code never depends on its batch.
  Trained with AuxK.
- ``ReLU``: trained with the L1 penalty weighted by atom norm, ``sae.cfg.l1_coefficient`` · Σ_i a_i ‖atom_i‖_F.
- ``JumpReLU``: a = z·H(z − θ) with a learned per-feature θ and straight-through θ-gradients.
  Trained with the L0 surrogate, ``l0_coefficient`` · Σ_i H(z_i − θ_i).

`SPARSITIES` maps each rule's name (an `SAEConfig`'s ``sparsity``) to its class, which builds it from
the config (``from_config``). ``training_terms`` gives a rule's weighted loss terms (means over
samples and heads), the trainer's settings (`writesae.train.TrainConfig`: ``auxk_k``,
``auxk_weight``, ``l0_coefficient``) supplying the weights; ``summed_atoms`` is the reconstruction the
trainer uses (Σ_i a_i atom_i), the cheapest one the rule allows.

AuxK (Gao et al., 2024): auxk_weight · mean over heads with a dead feature of
Σ_b ‖e − ê‖²_F / Σ_b ‖e‖²_F, with e = s(X − X̂) (no gradient) the residual and
ê = Σ_{i ∈ D} ReLU(z_i) atom_i, D the auxk_k largest pre-activations among that head's dead features:
dead features learn to explain what the live ones miss, normalised by the residual's energy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from . import distributed

if TYPE_CHECKING:
    from .sae import SAEBase, SAEConfig
    from .train import TrainConfig

Codes = Float[Tensor, "*batch n_dicts n"]


def under_torch_func() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, jvp, vmap, ...) is running. The SAEs' encoders and gathered
    decodes then take plain operators, the same products and sums as their autograd Functions, whose gradients,
    tangents and batching rules are torch's (those Functions' backward routes, with `writesae.sae._gradient_support`'s
    sync on the gradient, sparse CSR products and ``embedding_bag``, have none); and `BatchTopK` leaves its threshold
    alone (a transform may not change a module's state). It is the check `torch.autograd.Function.apply` makes before
    it refuses a Function without transform support."""
    return torch._C._are_functorch_transforms_active()


class Sparsity(nn.Module):
    """A sparsity rule: ``forward`` maps z to a; the training terms and the reconstruction's path are its own.

    ``uses_k``: whether ``cfg.k`` sets how many features the rule keeps.
    """

    uses_k = False

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> Sparsity:
        """The rule with the settings an `SAEConfig` gives it."""
        raise NotImplementedError

    def training_terms(self, sae: SAEBase, pre: Codes, codes: Codes, residual: Float[Tensor, "batch n_dicts d_k d_v"],
                       dead: Bool[Tensor, "n_dicts n"], cfg: TrainConfig) -> dict[str, Tensor]:
        """The rule's weighted loss terms, besides the reconstruction (``residual`` is s(X − X̂), detached)."""
        return {}

    def summed_atoms(self, sae: SAEBase, codes: Codes) -> Float[Tensor, "*batch n_dicts d_k d_v"]:
        """Σ_i a_i atom_i of codes this rule made, in `SAEBase.decode_atoms`' units (no b_dec, no 1/s): the
        trainer's reconstruction (`SAEBase.recons_from_atoms` makes X̂ of it)."""
        return sae._decode_dense(codes)

    def codes_and_summed_atoms(self, sae: SAEBase, pre: Codes) -> tuple[Codes, Float[Tensor, "*batch n_dicts d_k d_v"]]:
        """The codes of z and their `summed_atoms`, where no hook can edit the codes in between (the trainer's
        reconstruction where ``hook_sae_acts_post`` is not hooked): a rule that knows which codes it kept may
        decode them without finding them again."""
        codes = self(pre)
        return codes, self.summed_atoms(sae, codes)


class _AuxKTrained(Sparsity):
    uses_k = True

    def training_terms(self, sae, pre, codes, residual, dead, cfg):
        if cfg.auxk_weight <= 0:
            return {}
        return {"auxk": cfg.auxk_weight * auxk_loss(sae, pre, residual, dead, cfg.auxk_k)}


def auxk_loss(sae: SAEBase, pre: Float[Tensor, "batch n_dicts n"], residual: Float[Tensor, "batch n_dicts d_k d_v"],
              dead: Bool[Tensor, "n_dicts n"], k: int) -> Float[Tensor, ""]:
    """The unweighted AuxK term (module docstring) from pre-activations z, the residual e (scaled
    units) and the dead mask; 0 when nothing is dead."""
    heads = dead.any(-1)
    if not heads.any():
        return pre.new_zeros(())
    k = min(k, int(dead.sum(-1).max()))
    values, indices = pre.masked_fill(~dead, -math.inf).topk(k, dim=-1)  # heads with < k dead ones get zeros
    e_hat = sae.decode_atoms(indices, values.relu())
    error = (residual - e_hat).pow(2).sum((0, 2, 3))
    # over the global batch when data-parallel: this rank's error over every rank's energy, times W,
    # so that the ranks' mean gradient is the whole batch's
    energy = distributed.sum_over_ranks(residual.pow(2).sum((0, 2, 3))).clamp_min(torch.finfo(residual.dtype).tiny)
    return (error * distributed.rank_and_world()[1] / energy)[heads].mean()


class TopK(_AuxKTrained):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.k)

    def forward(self, pre: Codes) -> Codes:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return self._codes(pre, values.relu(), indices)

    @staticmethod
    def _codes(pre: Codes, kept: Tensor, indices: Tensor) -> Codes:
        """The codes: the kept values at their features, zeros elsewhere."""
        return torch.zeros_like(pre).scatter(-1, indices, kept)

    def summed_atoms(self, sae, codes):
        """Only the k active atoms: O(B·k·d_k·d_v), not O(n·d_k·d_v)."""
        values, indices = codes.topk(self.k, dim=-1)
        return sae.decode_atoms(indices, values)

    def codes_and_summed_atoms(self, sae, pre):
        """The atoms of the k codes this rule keeps, largest first as in `summed_atoms`, without its second top-k
        over every feature: at n = 16,384 and batch 1,024 that, and the dense gradient it passed back through the
        codes, took a few percent of a flat or matrix step. The same numbers (tests/test_train.py)."""
        values, indices = pre.topk(self.k, dim=-1)
        kept = values.relu()
        return self._codes(pre, kept, indices), sae.decode_atoms(indices, kept)


class ReLU(Sparsity):
    @classmethod
    def from_config(cls, cfg):
        return cls()

    def forward(self, pre: Codes) -> Codes:
        return pre.relu()

    def training_terms(self, sae, pre, codes, residual, dead, cfg):
        return {"sparsity": sae.cfg.l1_coefficient * sae.l1_penalty(codes).mean()}


class BatchTopK(_AuxKTrained):
    """Top k·B activations of a B-sample batch per head in training; a calibrated threshold in eval.

    ``threshold`` [n_dicts] is the running average of the smallest activation each training batch
    kept (0 when the batch had fewer than k·B positive activations, as then every positive one was
    kept): the plain mean over the first 1/momentum batches, an exponential average after that.
    Only training-mode passes that record gradients update it; passes under ``torch.no_grad()``
    (evaluation in training mode, the hook-free recompute behind ``use_error_term``) and under a torch.func
    transform (`under_torch_func`) leave it alone.
    Data-parallel (`writesae.distributed`), such a pass keeps the k·B largest of the global batch
    of B = W·b samples: each rank's k·B largest are gathered, and the (k·B)-th largest of them all is
    the threshold every rank applies to its own b samples.
    In eval mode a = ReLU(z)·[z ≥ threshold]; before any calibration that is plain ReLU.
    """

    momentum = 0.01

    def __init__(self, k: int, n_dicts: int):
        super().__init__()
        self.k = k
        self.register_buffer("threshold", torch.zeros(n_dicts))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.k, len(cfg.head_indices))

    def forward(self, pre: Codes) -> Codes:
        acts = pre.relu()
        if not self.training:
            return acts * (pre >= self.threshold[:, None])
        per_head = rearrange(acts, "... h n -> h (... n)")
        n_samples = per_head.shape[1] // pre.shape[-1]
        world = distributed.rank_and_world()[1]
        calibrating = torch.is_grad_enabled() and not under_torch_func()
        if world > 1 and calibrating:
            keep = self.k * n_samples * world
            local = per_head.detach().topk(min(keep, per_head.shape[1]), dim=-1).values
            threshold = rearrange(distributed.gather_rows(local), "w h m -> h (w m)").topk(keep, dim=-1).values.amin(-1)
            self._calibrate(threshold)
            codes = per_head * (per_head >= threshold[:, None])
        else:
            kept, indices = per_head.topk(self.k * n_samples, dim=-1, sorted=False)
            if calibrating and n_samples:  # an empty batch kept nothing to calibrate by
                self._calibrate(kept.detach().amin(-1))
            codes = torch.zeros_like(per_head).scatter(-1, indices, kept)
        return rearrange(codes, "h (b n) -> b h n", n=pre.shape[-1]).reshape(pre.shape)

    @torch.no_grad()
    def _calibrate(self, smallest_kept: Tensor) -> None:
        self.n_updates += 1
        rate = max(1.0 / self.n_updates.item(), self.momentum)
        self.threshold.lerp_(smallest_kept.to(self.threshold.dtype), rate)


class JumpReLU(Sparsity):
    """a = z·H(z − θ), θ = exp(log_threshold) [n_dicts, n] (Rajamanoharan et al., 2024).

    H has no useful derivative, so θ learns through straight-through estimates: the step's
    derivative in θ is replaced by −K((z − θ)/ε)/ε, K the rectangle on [−½, ½] and ε the bandwidth.
    """

    def __init__(self, n_dicts: int, n_features: int, bandwidth: float, initial_threshold: float):
        super().__init__()
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((n_dicts, n_features), float(initial_threshold)).log())

    @classmethod
    def from_config(cls, cfg):
        return cls(len(cfg.head_indices), cfg.n_features, cfg.jumprelu_bandwidth, cfg.jumprelu_initial_threshold)

    def forward(self, pre: Codes) -> Codes:
        return _Jump.apply(pre, self.log_threshold.exp(), self.bandwidth, False)

    def l0_penalty(self, pre: Codes) -> Float[Tensor, "*batch n_dicts"]:
        """Σ_i H(z_i − θ_i), differentiable in θ (not in z) by the estimate above."""
        return _Jump.apply(pre, self.log_threshold.exp(), self.bandwidth, True).sum(-1)

    def training_terms(self, sae, pre, codes, residual, dead, cfg):
        return {"sparsity": cfg.l0_coefficient * self.l0_penalty(pre).mean()}


class _Jump(torch.autograd.Function):
    """z·H(z − θ), or H(z − θ) itself when ``step``, with the straight-through θ-gradient. It works under
    torch.func's transforms (grad and jacrev by the backward, jvp by the same estimates, vmap by a generated rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pre: Tensor, theta: Tensor, bandwidth: float, step: bool) -> Tensor:
        gate = (pre > theta).to(pre.dtype)
        return gate if step else pre * gate

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor, float, bool], output: Tensor) -> None:
        pre, theta, ctx.bandwidth, ctx.step = inputs
        ctx.save_for_backward(pre, theta)
        ctx.save_for_forward(pre, theta)

    @staticmethod
    def _through_theta(ctx, pre: Tensor, theta: Tensor, factor: Tensor) -> Tensor:
        """``factor`` (a gradient of the output, or θ's tangent) times the estimated derivative in θ, per element of z:
        d/dθ of z·H(z − θ) is estimated as −θ·K((z − θ)/ε)/ε (the jump's height times the step's estimate), of
        H(z − θ) as −K((z − θ)/ε)/ε."""
        kernel = ((pre - theta).abs() <= ctx.bandwidth / 2).to(factor.dtype) / ctx.bandwidth
        return -factor * kernel * (1.0 if ctx.step else theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        grad_theta = _Jump._through_theta(ctx, pre, theta, grad)
        grad_pre = None if ctx.step else grad * (pre > theta)
        return grad_pre, grad_theta.reshape(-1, *theta.shape).sum(0), None, None

    @staticmethod
    def jvp(ctx, pre_tangent: Tensor | None, theta_tangent: Tensor | None, *_) -> Tensor:
        pre, theta = ctx.saved_tensors
        tangent = torch.zeros_like(pre)
        if pre_tangent is not None and not ctx.step:
            tangent = tangent + pre_tangent * (pre > theta)
        if theta_tangent is not None:
            tangent = tangent + _Jump._through_theta(ctx, pre, theta, theta_tangent)
        return tangent


SPARSITIES: dict[str, type[Sparsity]] = {
    "topk": TopK,
    "batchtopk": BatchTopK,
    "relu": ReLU,
    "jumprelu": JumpReLU,
}
"""Every sparsity rule by the name an `SAEConfig` (and ``writesae train --sparsity``) gives it."""


def make_sparsity(cfg: SAEConfig) -> Sparsity:
    """The sparsity rule an `SAEConfig` names."""
    return SPARSITIES[cfg.sparsity].from_config(cfg)
