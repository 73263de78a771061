"""Qwen3.5 (dense): the reference family; docs/design.md §2 is its GDN layer.

transformers: ``Qwen3_5ForCausalLM`` (``qwen3_5_text``) and ``Qwen3_5ForConditionalGeneration``
(``qwen3_5``, whose vision tower is ignored). Zero-centred (1 + w) RMSNorms, pre-norm blocks,
gated attention with per-head q/k norms and partial rotary, separate ``in_proj_qkv``/``z``/``b``/``a``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import HookedGDNConfig
from .base import Architecture, Placement, first_token_id, refuse_options, renamed

# transformers' names inside a decoder layer -> ours inside a block
LAYER_RENAMES = {
    "input_layernorm.weight": "ln1.w",
    "post_attention_layernorm.weight": "ln2.w",
    "linear_attn.in_proj_qkv.weight": "linear_attn.W_qkv",
    "linear_attn.in_proj_z.weight": "linear_attn.W_z",
    "linear_attn.in_proj_b.weight": "linear_attn.W_b",
    "linear_attn.in_proj_a.weight": "linear_attn.W_a",
    "linear_attn.conv1d.weight": "linear_attn.conv_weight",
    "linear_attn.A_log": "linear_attn.A_log",
    "linear_attn.dt_bias": "linear_attn.dt_bias",
    "linear_attn.norm.weight": "linear_attn.norm.w",
    "linear_attn.out_proj.weight": "linear_attn.W_o",
    "self_attn.q_proj.weight": "attn.q_proj",
    "self_attn.k_proj.weight": "attn.k_proj",
    "self_attn.v_proj.weight": "attn.v_proj",
    "self_attn.o_proj.weight": "attn.o_proj",
    "self_attn.q_norm.weight": "attn.q_norm.w",
    "self_attn.k_norm.weight": "attn.k_norm.w",
    "mlp.gate_proj.weight": "mlp.gate_proj",
    "mlp.up_proj.weight": "mlp.up_proj",
    "mlp.down_proj.weight": "mlp.down_proj",
}
IMPLEMENTED_OPTIONS = {"hidden_act": "silu", "attention_bias": False}


def text_config(hf_config):
    """The text config of a multimodal config (its own, otherwise), and whether the embeddings are tied."""
    tie = bool(getattr(hf_config, "tie_word_embeddings", False))
    if hasattr(hf_config, "text_config"):
        hf_config = hf_config.text_config
        tie = tie or bool(getattr(hf_config, "tie_word_embeddings", False))
    return hf_config, tie


def shared_fields(c, tie: bool, family: str, model_name: str) -> dict:
    """The HookedGDNConfig fields every Qwen GDN family names alike (Qwen3.5, Qwen3.5-MoE, Qwen3-Next)."""
    refuse_options(c, family, IMPLEMENTED_OPTIONS)
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope_type {rope['rope_type']!r}: only 'default' rotary embeddings are implemented")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return dict(
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        d_vocab=c.vocab_size,
        layer_types=list(c.layer_types),
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_head=head_dim,
        rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0)),
        rotary_base=float(rope.get("rope_theta", 10000.0)),
        n_key_heads=c.linear_num_key_heads,
        n_value_heads=c.linear_num_value_heads,
        d_key=c.linear_key_head_dim,
        d_value=c.linear_value_head_dim,
        conv_kernel=c.linear_conv_kernel_dim,
        eps=c.rms_norm_eps,
        tie_word_embeddings=tie,
        eos_token_id=first_token_id(c.eos_token_id),
        pad_token_id=c.pad_token_id,
        model_name=model_name,
    )


def hooked_config(hf_config, model_name: str = "custom") -> HookedGDNConfig:
    c, tie = text_config(hf_config)
    return HookedGDNConfig(**shared_fields(c, tie, "Qwen3.5", model_name), d_mlp=c.intermediate_size, architecture="qwen3_5")


def layer_placements(layer: int, name: str, cfg: HookedGDNConfig, shape: Sequence[int]) -> list[Placement] | None:
    return renamed(LAYER_RENAMES, name)


ARCHITECTURE = Architecture("qwen3_5", "Qwen3.5", ("qwen3_5_text", "qwen3_5"), hooked_config, layer_placements)
