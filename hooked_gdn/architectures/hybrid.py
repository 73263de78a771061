"""What the four GDN hybrid families share in transformers: the config fields they name alike and the weight
names of the parts they have in common (pre-norms, GDN state parameters, attention, dense MLP).

Each family module adds only what differs (Qwen3.5's fused ``in_proj_qkv``, OLMo-Hybrid's separate
projections and post-norm attention blocks, the MoE blocks).
"""

from __future__ import annotations

from .base import first_token_id, refuse_options

IMPLEMENTED_OPTIONS = {"hidden_act": "silu", "attention_bias": False}  # what the layers hard-code

# transformers' names inside a decoder layer -> ours inside a block
PRE_NORM_RENAMES = {"input_layernorm.weight": "ln1.w", "post_attention_layernorm.weight": "ln2.w"}
MLP_RENAMES = {"mlp.gate_proj.weight": "mlp.gate_proj", "mlp.up_proj.weight": "mlp.up_proj",
               "mlp.down_proj.weight": "mlp.down_proj"}
GDN_RENAMES = {"linear_attn.conv1d.weight": "linear_attn.conv_weight", "linear_attn.A_log": "linear_attn.A_log",
               "linear_attn.dt_bias": "linear_attn.dt_bias"}
ATTENTION_RENAMES = {
    "self_attn.q_proj.weight": "attn.q_proj",
    "self_attn.k_proj.weight": "attn.k_proj",
    "self_attn.v_proj.weight": "attn.v_proj",
    "self_attn.o_proj.weight": "attn.o_proj",
    "self_attn.q_norm.weight": "attn.q_norm.w",
    "self_attn.k_norm.weight": "attn.k_norm.w",
}
# our size fields -> the names the GDN hybrids' transformers configs give them (for messages)
CONFIG_NAMES = {
    "d_model": "hidden_size", "n_layers": "num_hidden_layers", "d_vocab": "vocab_size", "n_heads": "num_attention_heads",
    "n_key_value_heads": "num_key_value_heads", "d_head": "head_dim", "rotary_dim": "head_dim × partial_rotary_factor",
    "n_key_heads": "linear_num_key_heads", "n_value_heads": "linear_num_value_heads", "d_key": "linear_key_head_dim",
    "d_value": "linear_value_head_dim", "conv_kernel": "linear_conv_kernel_dim", "d_mlp": "intermediate_size",
    "n_experts": "num_experts", "n_experts_per_token": "num_experts_per_tok", "d_expert": "moe_intermediate_size",
    "d_shared_expert": "shared_expert_intermediate_size",
}


def hybrid_fields(c, tie: bool, family: str, model_name: str) -> dict:
    """The `HookedGDNConfig` fields every GDN hybrid's text config names alike, its options checked first.

    Rotary embeddings cover ``partial_rotary_factor`` (default 1) of each head, and none when
    ``rope_theta`` is None (OLMo-Hybrid's released checkpoints are NoPE)."""
    refuse_options(c, family, IMPLEMENTED_OPTIONS)
    rope = c.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope_type {rope['rope_type']!r}: only 'default' rotary embeddings are implemented")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    theta = rope.get("rope_theta", 10000.0)
    return dict(
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        d_vocab=c.vocab_size,
        layer_types=list(c.layer_types),
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_head=head_dim,
        rotary_dim=0 if theta is None else int(head_dim * rope.get("partial_rotary_factor", 1.0)),
        rotary_base=float(10000.0 if theta is None else theta),
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

