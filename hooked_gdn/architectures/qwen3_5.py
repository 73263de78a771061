"""Qwen3.5 (dense): the reference family; docs/design.md §2 is its GDN layer.

transformers: ``Qwen3_5ForCausalLM`` (``qwen3_5_text``) and ``Qwen3_5ForConditionalGeneration``
(``qwen3_5``, whose vision tower is ignored). Zero-centred (1 + w) RMSNorms, pre-norm blocks,
gated attention with per-head q/k norms and partial rotary, separate ``in_proj_qkv``/``z``/``b``/``a``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import HookedGDNConfig
from .base import Architecture, Placement, renamed
from .hybrid import ATTENTION_RENAMES, CONFIG_NAMES, GDN_RENAMES, MLP_RENAMES, PRE_NORM_RENAMES, hybrid_fields

# transformers' names inside a decoder layer -> ours inside a block
LAYER_RENAMES = PRE_NORM_RENAMES | MLP_RENAMES | GDN_RENAMES | ATTENTION_RENAMES | {
    "linear_attn.in_proj_qkv.weight": "linear_attn.W_qkv",
    "linear_attn.in_proj_z.weight": "linear_attn.W_z",
    "linear_attn.in_proj_b.weight": "linear_attn.W_b",
    "linear_attn.in_proj_a.weight": "linear_attn.W_a",
    "linear_attn.norm.weight": "linear_attn.norm.w",
    "linear_attn.out_proj.weight": "linear_attn.W_o",
}


def text_config(hf_config):
    """The text config of a multimodal config (its own, otherwise), and whether the embeddings are tied."""
    tie = bool(getattr(hf_config, "tie_word_embeddings", False))
    if hasattr(hf_config, "text_config"):
        hf_config = hf_config.text_config
        tie = tie or bool(getattr(hf_config, "tie_word_embeddings", False))
    return hf_config, tie


def hooked_config(hf_config, model_name: str = "custom") -> HookedGDNConfig:
    c, tie = text_config(hf_config)
    return HookedGDNConfig(**hybrid_fields(c, tie, "Qwen3.5", model_name), d_mlp=c.intermediate_size, architecture="qwen3_5")


def layer_placements(layer: int, name: str, cfg: HookedGDNConfig, shape: Sequence[int]) -> list[Placement] | None:
    return renamed(LAYER_RENAMES, name)


ARCHITECTURE = Architecture("qwen3_5", "Qwen3.5", ("qwen3_5_text", "qwen3_5"), hooked_config, layer_placements,
                            config_names=CONFIG_NAMES)
