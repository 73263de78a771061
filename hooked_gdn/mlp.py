"""The feed-forward layers: the SwiGLU MLP, and the sparse MoE block of Qwen3.5-MoE and Qwen3-Next built of them.

The MoE block, for a token x (after ln2):

- router logits ``r = W_router x`` [E]; probabilities ``p = softmax(r)`` (fp32);
- chosen experts: the top k of p; their weights ``w_i = p_{e_i}`` (divided by Σ_i w_i when
  ``norm_topk_prob``);
- ``out = Σ_i w_i · expert_{e_i}(x) + σ(w_sgᵀ x) · shared_expert(x)``, each expert a SwiGLU.

Hook points (all under ``blocks.L.mlp``; the block's ``hook_mlp_out`` is the MoE block's output):
``hook_router_logits`` [b, p, E]; ``hook_expert_indices`` [b, p, k] (int64, TransformerLens' name);
``hook_topk_weights`` [b, p, k], the weights of those experts, in the same order;
``hook_experts_out`` [b, p, d_model], the routed experts' weighted sum; ``hook_shared_expert_out``
[b, p, d_model], before its gate; ``hook_shared_expert_gate`` [b, p, 1], the gate σ(w_sgᵀ x); and
the shared expert's own SwiGLU hooks (``shared_expert.hook_pre``, …).

Edits: a hook on ``hook_expert_indices`` forces experts, and the weights are then taken from
the router's probabilities of the experts given (renormalised as usual), so a forced set is
weighted as the router would weight it; ``hook_topk_weights`` then sets the weights themselves.
Editing ``router`` (the [E, d_model] weight) re-routes through the same path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from .hook_points import CheckedHookPoint


class GatedMLP(nn.Module):
    """SwiGLU: post = SiLU(x @ W_gate) ⊙ (x @ W_in), out = post @ W_out (TransformerLens' names)."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(d_mlp, d_model))
        self.up_proj = nn.Parameter(torch.empty(d_mlp, d_model))
        self.down_proj = nn.Parameter(torch.empty(d_model, d_mlp))
        self.hook_pre = CheckedHookPoint()  # [b, p, d_mlp]: x @ W_gate
        self.hook_pre_linear = CheckedHookPoint()  # [b, p, d_mlp]: x @ W_in
        self.hook_post = CheckedHookPoint()  # [b, p, d_mlp]: the neurons' activations

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.gate_proj.T

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.up_proj.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.down_proj.T

    def forward(self, x: Float[Tensor, "b p d_model"]) -> Float[Tensor, "b p d_model"]:
        pre = self.hook_pre(F.linear(x, self.gate_proj))
        post = self.hook_post(F.silu(pre) * self.hook_pre_linear(F.linear(x, self.up_proj)))
        return F.linear(post, self.down_proj)


class SparseMoE(nn.Module):
    """Routed experts (stacked [E, …] weights, transformers' [out, in] per expert) and a gated shared expert."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, d_expert: int, d_shared_expert: int, norm_topk_prob: bool):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk_prob = n_experts, top_k, norm_topk_prob
        self.router = nn.Parameter(torch.empty(n_experts, d_model))
        self.gate_proj = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.shared_expert = GatedMLP(d_model, d_shared_expert)
        self.shared_expert_gate = nn.Parameter(torch.empty(1, d_model))
        self.hook_router_logits = CheckedHookPoint()  # [b, p, E]
        self.hook_expert_indices = CheckedHookPoint()  # [b, p, k], int64: the chosen experts
        self.hook_topk_weights = CheckedHookPoint()  # [b, p, k]: their weights
        self.hook_experts_out = CheckedHookPoint()  # [b, p, d_model]: Σ_i w_i expert_{e_i}(x)
        self.hook_shared_expert_out = CheckedHookPoint()  # [b, p, d_model]: before its gate
        self.hook_shared_expert_gate = CheckedHookPoint()  # [b, p, 1]: σ(w_sgᵀ x)

    # TransformerLens' orientation: x @ W_gate[e], per expert
    @property
    def W_router(self) -> Float[Tensor, "d_model n_experts"]:
        return self.router.T

    @property
    def W_gate(self) -> Float[Tensor, "n_experts d_model d_expert"]:
        return self.gate_proj.transpose(1, 2)

    @property
    def W_in(self) -> Float[Tensor, "n_experts d_model d_expert"]:
        return self.up_proj.transpose(1, 2)

    @property
    def W_out(self) -> Float[Tensor, "n_experts d_expert d_model"]:
        return self.down_proj.transpose(1, 2)

    def expert(self, e: int, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        """Expert e's SwiGLU on tokens x."""
        return F.linear(F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])

    def forward(self, x: Float[Tensor, "b p d_model"]) -> Float[Tensor, "b p d_model"]:
        logits = self.hook_router_logits(F.linear(x, self.router))
        probs = logits.softmax(-1, dtype=torch.float32)
        indices = self.hook_expert_indices(probs.topk(self.top_k, -1).indices)
        self._check_indices(indices)
        weights = probs.gather(-1, indices)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = self.hook_topk_weights(weights.to(x.dtype))
        routed = self.hook_experts_out(self._experts(x, indices, weights))
        shared = self.hook_shared_expert_out(self.shared_expert(x))
        gate = self.hook_shared_expert_gate(F.linear(x, self.shared_expert_gate).sigmoid())
        return routed + gate * shared

    def _experts(self, x: Tensor, indices: Int[Tensor, "b p k"], weights: Float[Tensor, "b p k"]) -> Tensor:
        """Σ_i w_i expert_{e_i}(x), running each expert once on the tokens routed to it."""
        flat, out = x.reshape(-1, x.shape[-1]), torch.zeros(x.numel() // x.shape[-1], x.shape[-1], dtype=x.dtype, device=x.device)
        indices, weights = indices.reshape(-1, indices.shape[-1]), weights.reshape(-1, weights.shape[-1])
        for e in indices.unique().tolist():
            token, slot = (indices == e).nonzero(as_tuple=True)
            out.index_add_(0, token, self.expert(e, flat[token]) * weights[token, slot, None])
        return out.view_as(x)

    def _check_indices(self, indices: Tensor) -> None:
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"expert indices must be integers, got dtype {indices.dtype}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.n_experts):
            raise ValueError(f"expert indices must lie in [0, {self.n_experts}), got {int(indices.min())}..{int(indices.max())}")
