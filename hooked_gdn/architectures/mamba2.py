"""Mamba-2 (transformers' ``Mamba2ForCausalLM``, ``model_type`` "mamba2"): its config conversion (refusing the
options the model does not implement), its weight names, and its blocks (`hooked_gdn.mamba2`).

transformers' weights keep their layout; only their names change: ``backbone.layers.L.`` holds a
layer, ``backbone.embeddings`` the embedding and ``backbone.norm_f`` the final norm.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..mamba2 import FinalNorm, HookedMamba2Config, Mamba2Block, init_mamba2_weights
from .base import Architecture, Placement, first_token_id, renamed

MODEL_TYPE = "mamba2"
# transformers' names inside a layer (backbone.layers.{i}.) -> ours inside a block
LAYER_RENAMES = {
    "norm.weight": "ln1.w",
    "mixer.in_proj.weight": "linear_attn.W_in",
    "mixer.in_proj.bias": "linear_attn.b_in",
    "mixer.conv1d.weight": "linear_attn.conv_weight",
    "mixer.conv1d.bias": "linear_attn.conv_bias",
    "mixer.dt_bias": "linear_attn.dt_bias",
    "mixer.A_log": "linear_attn.A_log",
    "mixer.D": "linear_attn.D",
    "mixer.norm.weight": "linear_attn.norm.w",
    "mixer.out_proj.weight": "linear_attn.W_o",
    "mixer.out_proj.bias": "linear_attn.b_o",
}


def hooked_config(hf_config, model_name: str = "custom"):
    """`HookedMamba2Config` from a transformers ``Mamba2Config``; unimplemented options are refused."""
    implemented = {"hidden_act": "silu", "time_step_limit": (0.0, float("inf"))}
    given = {"hidden_act": hf_config.hidden_act, "time_step_limit": tuple(float(x) for x in hf_config.time_step_limit)}
    for option, value in implemented.items():
        if given[option] != value:
            raise ValueError(f"unsupported {option}={given[option]!r}: the Mamba-2 model implements only {option}={value!r} "
                             "(transformers' default)")
    c = hf_config
    return HookedMamba2Config(
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        d_vocab=c.vocab_size,
        n_value_heads=c.num_heads,
        n_key_heads=c.n_groups,
        d_key=c.state_size,
        d_value=c.head_dim,
        conv_kernel=c.conv_kernel,
        eps=c.layer_norm_epsilon,
        use_bias=c.use_bias,
        use_conv_bias=c.use_conv_bias,
        residual_in_fp32=c.residual_in_fp32,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        eos_token_id=first_token_id(c.eos_token_id),
        pad_token_id=c.pad_token_id,
        model_name=model_name,
        architecture=MODEL_TYPE,
    )


def layer_placements(layer: int, name: str, cfg: HookedMamba2Config, shape: Sequence[int]) -> list[Placement] | None:
    return renamed(LAYER_RENAMES, name)


def final_norm(cfg: HookedMamba2Config) -> FinalNorm:
    return FinalNorm(cfg.d_model, cfg.eps, zero_centred=False)


ARCHITECTURE = Architecture(
    MODEL_TYPE, "Mamba-2", (MODEL_TYPE,), hooked_config, layer_placements, block=Mamba2Block, final_norm=final_norm,
    init_weights=init_mamba2_weights, text_prefixes=("backbone.",), embedding_keys=("embeddings.weight", "embedding.weight"),
    final_norm_key="norm_f.weight", embedding_pad_row_frozen=False,
    config_names={"d_model": "hidden_size", "n_layers": "num_hidden_layers", "d_vocab": "vocab_size", "n_value_heads": "num_heads",
                  "n_key_heads": "n_groups", "d_key": "state_size", "d_value": "head_dim", "conv_kernel": "conv_kernel"},
)
