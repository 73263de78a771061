"""Mamba-2 (transformers' ``Mamba2ForCausalLM``, ``model_type`` "mamba2") for `hooked_gdn.mamba2.HookedMamba2`.

Not a Gated DeltaNet family of `HookedGatedDeltaNet`: its model is its own class, so it is not in
this package's registry. This module holds what differs about its checkpoints: the config
conversion (refusing the options the model does not implement, and Mamba-1 checkpoints) and the
weight names. transformers' weights keep their layout; only their names change.
"""

from __future__ import annotations

import re

import torch
from transformers import AutoConfig, AutoTokenizer

from ..loading import _TOKENIZER_FILES, read_safetensors, resolve_checkpoint
from .base import first_token_id

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
RENAMES = {"backbone.embeddings.weight": "W_E", "backbone.embedding.weight": "W_E", "backbone.norm_f.weight": "ln_final.w",
           "lm_head.weight": "lm_head"}
_LAYER_KEY = re.compile(r"backbone\.layers\.(\d+)\.(.+)")


def hooked_config(hf_config, model_name: str = "custom"):
    """`HookedMamba2Config` from a transformers ``Mamba2Config``; Mamba-1 and unimplemented options are refused."""
    from ..mamba2 import HookedMamba2Config

    model_type = getattr(hf_config, "model_type", None)
    if model_type == "mamba":
        raise ValueError("this is a Mamba-1 checkpoint (model_type 'mamba'): HookedMamba2 implements Mamba-2 only "
                         "(model_type 'mamba2'), whose per-head state is a matrix written by rank-1 writes")
    if model_type != MODEL_TYPE:
        raise ValueError(f"unsupported model type {model_type!r}: HookedMamba2 loads Mamba-2 (model_type 'mamba2'); "
                         "HookedGatedDeltaNet loads the Gated DeltaNet hybrids")
    implemented = {"hidden_act": "silu", "time_step_limit": (0.0, float("inf"))}
    given = {"hidden_act": hf_config.hidden_act, "time_step_limit": tuple(float(x) for x in hf_config.time_step_limit)}
    for option, value in implemented.items():
        if given[option] != value:
            raise ValueError(f"unsupported {option}={given[option]!r}: HookedMamba2 implements only {option}={value!r} "
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
    )


def hooked_name(key: str) -> str | None:
    """Our parameter name for a transformers Mamba-2 checkpoint key (None if it is not one)."""
    if key in RENAMES:
        return RENAMES[key]
    match = _LAYER_KEY.fullmatch(key)
    if match is None or match[2] not in LAYER_RENAMES:
        return None
    return f"blocks.{match[1]}.{LAYER_RENAMES[match[2]]}"


def hooked_state_dict(hf_state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Our state dict from a transformers one; an unknown key is refused by name. With tied embeddings a
    stored lm_head must equal the embedding (transformers ties it)."""
    unknown = [key for key in hf_state if hooked_name(key) is None]
    if unknown:
        raise ValueError(f"not Mamba-2 weights: {unknown[:8]}")
    ours = {hooked_name(key): tensor for key, tensor in hf_state.items()}
    if cfg.tie_word_embeddings and "lm_head" in ours:
        if not torch.equal(ours.pop("lm_head"), ours["W_E"]):
            raise ValueError("tie_word_embeddings is set, but lm_head.weight differs from the embedding: "
                             "set tie_word_embeddings=False in config.json to use the separate head")
    return ours


def load_pretrained(cls, name_or_path, device=None, dtype=None):
    """A shipped name, a local folder or a hub id, read into memory (Mamba-2 models here are small)."""
    folder = resolve_checkpoint(name_or_path)
    cfg = hooked_config(AutoConfig.from_pretrained(folder), model_name=str(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(folder) if any((folder / f).exists() for f in _TOKENIZER_FILES) else None
    dtype = dtype or torch.float32
    model = cls(cfg, tokenizer).eval()  # loaded to be studied, as transformers' from_pretrained gives it
    state = hooked_state_dict(read_safetensors(folder), cfg)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {name_or_path} does not fit its config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.cfg.dtype = dtype
    return model.to(device=device, dtype=dtype)
