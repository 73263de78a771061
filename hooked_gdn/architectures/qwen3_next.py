"""Qwen3-Next: Qwen3.5's layers with fused GDN input projections, and MoE or dense MLPs per layer.

transformers: ``Qwen3NextForCausalLM`` (``qwen3_next``). Its norms (zero-centred (1 + w) RMSNorm,
the gated output norm) and its gated attention are Qwen3.5's. The differences:

- ``in_proj_qkvz`` and ``in_proj_ba`` are fused, in grouped order: for each key head g, the rows
  [q_g (d_k) | k_g (d_k) | v of its H_v/H_k value heads | z of them], and [b of them | a of them].
  They are split at load into Qwen3.5's W_qkv (all q, then all k, then all v: the conv's order),
  W_z, W_b and W_a, so the layer itself is Qwen3.5's.
- MLPs: a sparse MoE block (Qwen3.5-MoE's) where ``num_experts > 0``, the layer is not in
  ``mlp_only_layers`` and (layer + 1) is a multiple of ``decoder_sparse_step``; otherwise a dense
  SwiGLU of width ``intermediate_size``. The router renormalises the top-k weights only when
  ``norm_topk_prob``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import HookedGDNConfig
from . import qwen3_5, qwen3_5_moe
from .base import Architecture, Placement
from .hybrid import CONFIG_NAMES, hybrid_fields


def _grouped_rows(cfg: HookedGDNConfig, widths: list[int]) -> list[torch.Tensor]:
    """Rows of each part of a fused projection whose key-head groups are [part 0 | part 1 | …] with the
    given widths: one LongTensor per part, its groups in key-head order."""
    block = sum(widths)
    starts = torch.tensor([0, *widths[:-1]]).cumsum(0)
    return [torch.cat([torch.arange(g * block + s, g * block + s + w) for g in range(cfg.n_key_heads)])
            for s, w in zip(starts.tolist(), widths)]


def fused_projection_placements(name: str, cfg: HookedGDNConfig) -> list[Placement] | None:
    group = cfg.n_value_heads // cfg.n_key_heads
    if name == "linear_attn.in_proj_qkvz.weight":
        q, k, v, z = _grouped_rows(cfg, [cfg.d_key, cfg.d_key, group * cfg.d_value, group * cfg.d_value])
        return [Placement("linear_attn.W_qkv", source=torch.cat([q, k, v])), Placement("linear_attn.W_z", source=z)]
    if name == "linear_attn.in_proj_ba.weight":
        b, a = _grouped_rows(cfg, [group, group])
        return [Placement("linear_attn.W_b", source=b), Placement("linear_attn.W_a", source=a)]
    return None


def hooked_config(hf_config, model_name: str = "custom") -> HookedGDNConfig:
    c = hf_config
    sparse = [c.num_experts > 0 and i not in c.mlp_only_layers and (i + 1) % c.decoder_sparse_step == 0
              for i in range(c.num_hidden_layers)]
    return HookedGDNConfig(
        **hybrid_fields(c, bool(c.tie_word_embeddings), "Qwen3-Next", model_name), **qwen3_5_moe.moe_fields(c),
        d_mlp=c.intermediate_size, mlp_types=["moe" if s else "dense" for s in sparse], norm_topk_prob=c.norm_topk_prob,
        architecture="qwen3_next",
    )


def layer_placements(layer: int, name: str, cfg: HookedGDNConfig, shape: Sequence[int]) -> list[Placement] | None:
    if name.startswith("mlp.") and cfg.mlp_types[layer] == "moe":
        return qwen3_5_moe.moe_placements(name.removeprefix("mlp."), cfg)
    return fused_projection_placements(name, cfg) or qwen3_5.layer_placements(layer, name, cfg, shape)


ARCHITECTURE = Architecture("qwen3_next", "Qwen3-Next", ("qwen3_next",), hooked_config, layer_placements, config_names=CONFIG_NAMES)
