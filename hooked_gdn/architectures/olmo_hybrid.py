"""OLMo-Hybrid: GDN layers with β up to 2, plain RMSNorms, and post-norm attention blocks without a gate.

transformers: ``OlmoHybridForCausalLM`` (``olmo_hybrid``). The differences from Qwen3.5:

- RMSNorms scale by w (initialised to 1), not by (1 + w).
- GDN blocks are pre-norm, as Qwen's; attention blocks are post-norm (OLMo-2):
  x + ln1_post(attn(x)), then + ln2_post(mlp(·)), with no norm before the attention or the MLP.
- GDN: separate q/k/v/a/b projections and a gate projection ``g_proj`` (our W_z); the conv is
  Qwen's, stored in the original checkpoints as three (q/k/v) convs that we concatenate;
  ``linear_allow_neg_eigval`` makes β = 2σ(b) ∈ (0, 2); the gated output norm has ε = 1e-5
  whatever ``rms_norm_eps`` says (flash-linear-attention's default, which transformers keeps).
- Attention: no output gate; q/k RMSNorm over all heads' features at once, before the split
  into heads; rotary on the whole head, or none (NoPE) when ``rope_theta`` is None, as in the
  released checkpoints.

Checkpoint names: the original ``attention_layer_norm``/``feedforward_layer_norm`` are
transformers' ``input_layernorm``/``post_attention_layernorm``; both spellings are read. The
conv comes whole (``conv1d``), as three convs of q, k and v's widths (the original checkpoints), or
as three equal thirds of the whole (what transformers' ``save_pretrained`` writes, splitting the
fused conv with ``torch.chunk``); the tensor's row count tells the last two apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import HookedGDNConfig
from .base import Architecture, Placement, renamed
from .hybrid import ATTENTION_RENAMES, CONFIG_NAMES, GDN_RENAMES, MLP_RENAMES, PRE_NORM_RENAMES, hybrid_fields

GATED_NORM_EPS = 1e-5
_ORIGINAL_NAMES = {"attention_layer_norm.": "input_layernorm.", "feedforward_layer_norm.": "post_attention_layernorm."}
_GDN_RENAMES = PRE_NORM_RENAMES | MLP_RENAMES | GDN_RENAMES | {
    "linear_attn.g_proj.weight": "linear_attn.W_z",
    "linear_attn.b_proj.weight": "linear_attn.W_b",
    "linear_attn.a_proj.weight": "linear_attn.W_a",
    "linear_attn.o_norm.weight": "linear_attn.norm.w",
    "linear_attn.o_proj.weight": "linear_attn.W_o",
}
_ATTENTION_RENAMES = MLP_RENAMES | ATTENTION_RENAMES | {
    "post_attention_layernorm.weight": "ln1_post.w",
    "post_feedforward_layernorm.weight": "ln2_post.w",
}


def hooked_config(hf_config, model_name: str = "custom") -> HookedGDNConfig:
    c = hf_config
    return HookedGDNConfig(
        **hybrid_fields(c, bool(c.tie_word_embeddings), "OLMo-Hybrid", model_name),
        d_mlp=c.intermediate_size,
        architecture="olmo_hybrid",
        zero_centred_norms=False,
        attention_block_norm="post",
        attention_output_gate=False,
        qk_norm_per_head=False,
        allow_neg_eigval=bool(c.linear_allow_neg_eigval),
        gated_norm_eps=GATED_NORM_EPS,
    )


def _qkv_rows(cfg: HookedGDNConfig) -> list[int]:
    key_dim = cfg.n_key_heads * cfg.d_key
    return [key_dim, key_dim, cfg.n_value_heads * cfg.d_value]


def _part(i: int, widths: list[int], target: str) -> Placement:
    """Part i of [q | k | v] rows, the parts of the given widths."""
    start = sum(widths[:i])
    return Placement(target, index=(slice(start, start + widths[i]),))


def layer_placements(layer: int, name: str, cfg: HookedGDNConfig, shape: Sequence[int]) -> list[Placement] | None:
    for original, ours in _ORIGINAL_NAMES.items():
        if name.startswith(original):
            name = ours + name.removeprefix(original)
    if cfg.layer_types[layer] == "full_attention":
        return renamed(_ATTENTION_RENAMES, name)
    widths = _qkv_rows(cfg)
    for i, part in enumerate("qkv"):
        if name == f"linear_attn.{part}_proj.weight":
            return [_part(i, widths, "linear_attn.W_qkv")]
        if name == f"linear_attn.{part}_conv1d.weight":
            thirds = [len(rows) for rows in torch.arange(sum(widths)).chunk(3)]
            return [_part(i, widths if shape[0] == widths[i] else thirds, "linear_attn.conv_weight")]
    return renamed(_GDN_RENAMES, name)


ARCHITECTURE = Architecture("olmo_hybrid", "OLMo-Hybrid", ("olmo_hybrid",), hooked_config, layer_placements, config_names=CONFIG_NAMES)
