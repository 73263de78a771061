"""Loading Qwen3.5 checkpoints (transformers format: config.json + safetensors) into `HookedGatedDeltaNet`."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from .config import HookedGDNConfig
from .pretrained import pretrained_path
from .sites import block_name

# transformers' names inside a decoder layer -> ours inside a block
_LAYER_RENAMES = {
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
_TEXT_PREFIXES = ("model.language_model.", "model.")  # Qwen3_5ForConditionalGeneration, Qwen3_5ForCausalLM
_IGNORED_PREFIXES = ("model.visual.", "visual.", "mtp.")  # the vision tower and multi-token-prediction head
_EMBEDDING_KEYS = tuple(f"{p}embed_tokens.weight" for p in _TEXT_PREFIXES)
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A shipped short name, a local folder, or a hub id (downloaded; needs the internet).

    A shipped name that is also a path here is ambiguous, and refused rather than guessed.
    """
    shipped = pretrained_path(str(name_or_path))
    path = Path(name_or_path)
    if shipped is not None:
        if path.exists() and path.resolve() != shipped.resolve():
            raise ValueError(f"{str(name_or_path)!r} names both the shipped model and {path.resolve()}: pass "
                             f"'./{name_or_path}' for the local one, or {shipped} for the shipped one")
        return shipped
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path} is not a checkpoint folder")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def hf_to_hooked_state_dict(hf_state: dict[str, torch.Tensor], cfg: HookedGDNConfig) -> dict[str, torch.Tensor]:
    """Rename a transformers Qwen3.5 (text or multimodal) state dict to ours; vision weights are dropped."""
    ours = {}
    for key, tensor in hf_state.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        if key == "lm_head.weight":
            ours["lm_head"] = tensor
            continue
        local = next((key[len(p):] for p in _TEXT_PREFIXES if key.startswith(p)), None)
        if local == "embed_tokens.weight":
            ours["W_E"] = tensor
        elif local == "norm.weight":
            ours["ln_final.w"] = tensor
        elif local is not None and (m := _LAYER_KEY.fullmatch(local)) and m.group(2) in _LAYER_RENAMES:
            ours[block_name(int(m.group(1)), _LAYER_RENAMES[m.group(2)])] = tensor
        else:
            raise ValueError(f"unexpected weight {key!r}: this checkpoint is not a Qwen3.5 Gated DeltaNet model")
    if cfg.tie_word_embeddings and "lm_head" in ours:
        head = ours.pop("lm_head")
        if "W_E" in ours and not torch.equal(head, ours["W_E"]):
            raise ValueError("tie_word_embeddings is set, but lm_head.weight differs from the embedding: "
                             "set tie_word_embeddings=False to use the separate head")
    return ours


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_pretrained(cls, name_or_path, device=None, dtype=None):
    folder = resolve_checkpoint(name_or_path)
    cfg = HookedGDNConfig.from_hf_config(AutoConfig.from_pretrained(folder), model_name=str(name_or_path))
    has_tokenizer = any((folder / f).exists() for f in _TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    weights = read_safetensors(folder)
    head, embedding = weights.get("lm_head.weight"), next((weights[k] for k in _EMBEDDING_KEYS if k in weights), None)
    if cfg.tie_word_embeddings and head is not None and embedding is not None and not torch.equal(head, embedding):
        # transformers keeps both weights when they differ (with a warning), so the head is separate
        warnings.warn(f"{name_or_path}: config.json sets tie_word_embeddings, but the checkpoint's lm_head.weight differs "
                      "from its embedding; using the separate head, as transformers does")
        cfg.tie_word_embeddings = False
    model = cls(cfg, tokenizer)
    state = hf_to_hooked_state_dict(weights, cfg)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"checkpoint {name_or_path} lacks weights for {missing[:5]}{' …' if len(missing) > 5 else ''}")
    dtype = dtype or torch.float32
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model.cfg.dtype = dtype
    return model.to(device=device, dtype=dtype)
