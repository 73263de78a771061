"""RWKV-7 in flash-linear-attention's checkpoint format (``config.json`` with ``model_type`` "rwkv7", the names of the
``fla-hub/rwkv7-*`` models) and in BlinkDL's ``.pth`` state dicts, read through one name map; the model is
`hooked_gdn.rwkv7`.

transformers does not register RWKV-7, so ``config.json`` is read here (`read_config`, with
flash-linear-attention's defaults) and flash-linear-attention is never imported. A BlinkDL ``.pth``
(`load_blinkdl`) is read with ``torch.load(weights_only=True)``, its names and layouts turned into
flash-linear-attention's by `BLINKDL_NAMES` (the one map between the two), its config taken from its
tensors' shapes, and it then loads as an fla checkpoint does. `save_fla_checkpoint` writes a model in the
fla format (what ships as ``rwkv7-austen``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

from ..rwkv7 import HookedRWKV7Config, RWKV7Block, init_rwkv7_weights, layer_norm
from .base import Architecture, Placement, first_token_id

MODEL_TYPES = ("rwkv7", "rwkv7_fla")  # flash-linear-attention's name, and the one its newer releases register
# flash-linear-attention's names inside a layer (model.layers.{i}.) -> ours inside a block
LAYER_RENAMES = {
    **{f"attn.x_{c}": f"linear_attn.x_{c}" for c in "rwkvag"},
    "attn.k_k": "linear_attn.k_k",
    "attn.k_a": "linear_attn.k_a",
    "attn.r_k": "linear_attn.r_k",
    "attn.r_proj.weight": "linear_attn.W_r",
    "attn.k_proj.weight": "linear_attn.W_k",
    "attn.v_proj.weight": "linear_attn.W_v",
    "attn.o_proj.weight": "linear_attn.W_o",
    **{f"attn.{fla}_lora.lora.{i}.{kind}": f"linear_attn.{ours}.{part}"
       for fla, ours in (("w", "decay"), ("a", "rate"), ("v", "value_mix"), ("g", "gate"))
       for i, kind, part in ((0, "weight", "A"), (2, "weight", "B"), (2, "bias", "bias"))},
    "attn.g_norm.weight": "linear_attn.norm_w",
    "attn.g_norm.bias": "linear_attn.norm_b",
    "attn_norm.weight": "ln1.w",
    "attn_norm.bias": "ln1.b",
    "ffn_norm.weight": "ln2.w",
    "ffn_norm.bias": "ln2.b",
    "ffn.x_k": "mlp.x_k",
    "ffn.key.weight": "mlp.up_proj",
    "ffn.value.weight": "mlp.down_proj",
}
TOP_LEVEL_KEYS = {"layers.0.pre_norm.weight": "ln_embed.w", "layers.0.pre_norm.bias": "ln_embed.b", "norm.bias": "ln_final.b"}
# the token-shift mixes are stored [1, 1, C] in the time mix (and by older releases in the channel mix): ours are [C]
_MIXES = tuple(f"attn.x_{c}" for c in "rwkvag") + ("ffn.x_k",)

# BlinkDL's names -> (flash-linear-attention's, how its tensor becomes fla's): the one map between the two formats
_TRANSPOSED, _FLAT, _KEEP = "transposed", "flat", "keep"
BLINKDL_LAYER_NAMES = {
    **{f"att.x_{c}": (f"attn.x_{c}", _KEEP) for c in "rwkvag"},
    **{f"att.{p}0": (f"attn.{p}_lora.lora.2.bias", _FLAT) for p in "wav"},
    **{f"att.{p}1": (f"attn.{p}_lora.lora.0.weight", _TRANSPOSED) for p in "wavg"},
    **{f"att.{p}2": (f"attn.{p}_lora.lora.2.weight", _TRANSPOSED) for p in "wavg"},
    "att.k_k": ("attn.k_k", _FLAT),
    "att.k_a": ("attn.k_a", _FLAT),
    "att.r_k": ("attn.r_k", _KEEP),
    "att.receptance.weight": ("attn.r_proj.weight", _KEEP),
    "att.key.weight": ("attn.k_proj.weight", _KEEP),
    "att.value.weight": ("attn.v_proj.weight", _KEEP),
    "att.output.weight": ("attn.o_proj.weight", _KEEP),
    "att.ln_x.weight": ("attn.g_norm.weight", _KEEP),
    "att.ln_x.bias": ("attn.g_norm.bias", _KEEP),
    "ln0.weight": ("pre_norm.weight", _KEEP),
    "ln0.bias": ("pre_norm.bias", _KEEP),
    "ln1.weight": ("attn_norm.weight", _KEEP),
    "ln1.bias": ("attn_norm.bias", _KEEP),
    "ln2.weight": ("ffn_norm.weight", _KEEP),
    "ln2.bias": ("ffn_norm.bias", _KEEP),
    "ffn.x_k": ("ffn.x_k", _FLAT),
    "ffn.key.weight": ("ffn.key.weight", _KEEP),
    "ffn.value.weight": ("ffn.value.weight", _KEEP),
}
BLINKDL_NAMES = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
                 "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
# names of other RWKV versions' .pth files, and which version they are
_OTHER_VERSIONS = (("att.time_maa_x", "RWKV-6 (or a pre-release RWKV-7 'rc')"), ("att.time_faaaa", "RWKV-5"),
                   ("att.time_first", "RWKV-4"), ("att.time_decay", "an RWKV version before 7"))
_BLINKDL_LAYER = re.compile(r"blocks\.(\d+)\.(.+)")


def read_config(c: dict) -> SimpleNamespace:
    """config.json's dict as flash-linear-attention reads it (transformers has no RWKV-7 config): its ``RWKV7Config``
    fields, its defaults where the dict leaves them out."""
    defaults = dict(hidden_size=2048, hidden_ratio=4, intermediate_size=None, num_hidden_layers=24, head_dim=64, num_heads=None,
                    decay_low_rank_dim=64, gate_low_rank_dim=128, a_low_rank_dim=64, v_low_rank_dim=16, hidden_act="sqrelu",
                    norm_first=True, norm_bias=True, norm_eps=1e-5, attn=None, value_dim=None, vocab_size=32000,
                    tie_word_embeddings=False, eos_token_id=2, pad_token_id=None)
    return SimpleNamespace(**{**defaults, **c})


def _low_rank_default(c, given, scale: float, per_head: bool) -> int:
    """flash-linear-attention's rank for a low-rank map config.json leaves null: a multiple of 32 near scale · √C."""
    if given is not None:
        return given
    factor = c.head_dim / 64 if per_head else 1.0
    return max(32, int(round(scale * math.sqrt(c.hidden_size) * factor / 32) * 32))


def hooked_config(c, model_name: str = "custom") -> HookedRWKV7Config:
    """`HookedRWKV7Config` from flash-linear-attention's config; options the model does not implement are refused."""
    implemented = {"hidden_act": "sqrelu", "norm_first": True, "norm_bias": True, "attn": None}
    for option, value in implemented.items():
        if getattr(c, option) != value:
            raise ValueError(f"unsupported {option}={getattr(c, option)!r}: the RWKV-7 model implements only {option}={value!r} "
                             "(flash-linear-attention's default)")
    value_dims = c.value_dim if isinstance(c.value_dim, list) else [c.value_dim]
    if any(d not in (None, c.hidden_size) for d in value_dims):
        raise ValueError(f"unsupported value_dim={c.value_dim!r}: the RWKV-7 model implements value heads of the key heads' "
                         f"size (value_dim = hidden_size = {c.hidden_size})")
    if c.head_dim is None and c.num_heads is None:
        raise ValueError("config.json gives neither head_dim nor num_heads")
    head_dim = c.head_dim if c.head_dim is not None else c.hidden_size // c.num_heads
    if not isinstance(head_dim, int) or head_dim < 1 or c.hidden_size % head_dim:
        raise ValueError(f"unsupported head size {head_dim!r}: it must divide hidden_size ({c.hidden_size})")
    c.head_dim = head_dim
    d_mlp = c.intermediate_size
    if d_mlp is None:
        d_mlp = 32 * math.ceil(int(c.hidden_size * (c.hidden_ratio or 4)) / 32)
    return HookedRWKV7Config(
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        d_vocab=c.vocab_size,
        n_key_heads=c.hidden_size // head_dim,
        n_value_heads=c.hidden_size // head_dim,
        d_key=head_dim,
        d_value=head_dim,
        d_mlp=d_mlp,
        d_decay_lora=_low_rank_default(c, c.decay_low_rank_dim, 2.5, True),
        d_a_lora=_low_rank_default(c, c.a_low_rank_dim, 2.5, True),
        d_v_lora=_low_rank_default(c, c.v_low_rank_dim, 1.7, True),
        d_gate_lora=_low_rank_default(c, c.gate_low_rank_dim, 5.0, False),
        eps=c.norm_eps,
        group_norm_eps=head_dim * c.norm_eps,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        eos_token_id=first_token_id(c.eos_token_id),
        pad_token_id=c.pad_token_id,
        model_name=model_name,
        architecture="rwkv7",
    )


def layer_placements(layer: int, name: str, cfg: HookedRWKV7Config, shape: Sequence[int]) -> list[Placement] | None:
    if name not in LAYER_RENAMES or (name.startswith("attn.v_lora") and layer == 0):
        return None
    source = (0,) * (len(shape) - 1) if name in _MIXES else ()  # [1, 1, C] -> [C]
    return [Placement(LAYER_RENAMES[name], source=source)]


ARCHITECTURE = Architecture(
    "rwkv7", "RWKV-7", MODEL_TYPES, hooked_config, layer_placements, block=RWKV7Block, final_norm=layer_norm,
    init_weights=init_rwkv7_weights, text_prefixes=("model.",), embedding_keys=("embeddings.weight",),
    final_norm_key="norm.weight", embedding_norm=layer_norm, top_level_keys=TOP_LEVEL_KEYS, read_config=read_config,
    embedding_pad_row_frozen=False, later_layers_read_layer_0=True,
    config_names={"d_model": "hidden_size", "n_layers": "num_hidden_layers", "d_vocab": "vocab_size", "d_key": "head_dim",
                  "d_value": "head_dim", "d_mlp": "intermediate_size", "d_decay_lora": "decay_low_rank_dim",
                  "d_a_lora": "a_low_rank_dim", "d_v_lora": "v_low_rank_dim", "d_gate_lora": "gate_low_rank_dim"},
)


# ---------------------------------------------------------------------------------------------- the two formats


def fla_config(cfg: HookedRWKV7Config) -> dict:
    """config.json of ``cfg`` in flash-linear-attention's fields."""
    return {"model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"], "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "head_dim": cfg.d_value, "num_heads": cfg.n_value_heads,
            "intermediate_size": cfg.d_mlp, "decay_low_rank_dim": cfg.d_decay_lora, "a_low_rank_dim": cfg.d_a_lora,
            "v_low_rank_dim": cfg.d_v_lora, "gate_low_rank_dim": cfg.d_gate_lora, "hidden_act": "sqrelu",
            "norm_first": True, "norm_bias": True, "norm_eps": cfg.group_norm_eps / cfg.d_value, "attn": None,
            "vocab_size": cfg.d_vocab, "tie_word_embeddings": cfg.tie_word_embeddings, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id, "fuse_norm": False}


def fla_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under flash-linear-attention's names and shapes (the inverse of `layer_placements`)."""
    ours = model.state_dict()
    theirs = {"model.embeddings.weight": ours["W_E"], "model.norm.weight": ours["ln_final.w"]}
    theirs.update({f"model.{key}": ours[target] for key, target in TOP_LEVEL_KEYS.items()})
    if model.lm_head is not None:
        theirs["lm_head.weight"] = ours["lm_head"]
    for layer in range(model.cfg.n_layers):
        for name, target in LAYER_RENAMES.items():
            key = f"blocks.{layer}.{target}"
            if key in ours:
                tensor = ours[key]
                theirs[f"model.layers.{layer}.{name}"] = tensor.view(1, 1, -1) if name.startswith("attn.x_") else tensor
    return {key: tensor.contiguous() for key, tensor in theirs.items()}


def save_fla_checkpoint(model, folder: Path, dtype: torch.dtype | None = None) -> None:
    """config.json and model.safetensors of ``model`` in flash-linear-attention's format (tokenizer files are the
    caller's), into an existing folder."""
    from safetensors.torch import save

    from ..files import atomic_file

    state = {k: (v if dtype is None else v.to(dtype)).cpu() for k, v in fla_state_dict(model).items()}
    with atomic_file(Path(folder) / "config.json", "w") as f:
        f.write(json.dumps(fla_config(model.cfg), indent=2) + "\n")
    with atomic_file(Path(folder) / "model.safetensors", "wb") as f:
        f.write(save(state, metadata={"format": "pt"}))


def blinkdl_to_fla(state: dict) -> dict[str, torch.Tensor]:
    """A BlinkDL RWKV-7 state dict in flash-linear-attention's names and layouts; another RWKV version's, a file
    holding anything but tensors, or a name the map does not know is refused by name."""
    if not isinstance(state, dict):
        raise ValueError(f"a BlinkDL .pth holds a dict of tensors, this one a {type(state).__name__}")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"a BlinkDL .pth holds only tensors named by strings; this one also holds {not_tensors[:5]}")
    for marker, version in _OTHER_VERSIONS:
        if any(key.endswith(marker) for key in state):
            raise ValueError(f"this .pth is {version} (it has '{marker}' weights), not RWKV-7: only RWKV-7 is supported")
    if "blocks.0.att.r_k" not in state:
        raise ValueError("this .pth has no 'blocks.0.att.r_k': it is not an RWKV-7 state dict")
    fla, unknown = {}, []
    for key, tensor in state.items():
        match = _BLINKDL_LAYER.fullmatch(key)
        if key in BLINKDL_NAMES:
            fla[BLINKDL_NAMES[key]] = tensor
        elif match is not None and match[2] in BLINKDL_LAYER_NAMES:
            name, layout = BLINKDL_LAYER_NAMES[match[2]]
            if match[1] == "0" and match[2] in ("att.v0", "att.v1", "att.v2"):
                continue  # layer 0 has no value mix: BlinkDL's files carry unused placeholders
            fla[f"model.layers.{match[1]}.{name}"] = (tensor.flatten() if layout == _FLAT else tensor.T if layout == _TRANSPOSED
                                                      else tensor)  # only the one asked for: .T of a 3-D tensor is deprecated
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"this .pth has weights an RWKV-7 model does not: {unknown[:5]}")
    return fla


def blinkdl_config(fla_state: dict, model_name: str) -> HookedRWKV7Config:
    """The config of a BlinkDL state dict (already in fla's names), from its tensors' shapes; BlinkDL's GroupNorm ε
    (64e-5, its reference's constant) and LayerNorm ε (1e-5)."""
    n_heads, head_size = fla_state["model.layers.0.attn.r_k"].shape
    vocab, C = fla_state["model.embeddings.weight"].shape
    layers = {int(k.split(".")[2]) for k in fla_state if k.startswith("model.layers.")}
    rank = lambda p: fla_state[f"model.layers.{1 if p == 'v' else 0}.attn.{p}_lora.lora.0.weight"].shape[0]
    c = read_config(dict(hidden_size=C, num_hidden_layers=len(layers), head_dim=head_size, num_heads=n_heads,
                         intermediate_size=fla_state["model.layers.0.ffn.key.weight"].shape[0], vocab_size=vocab,
                         decay_low_rank_dim=rank("w"), a_low_rank_dim=rank("a"), gate_low_rank_dim=rank("g"),
                         v_low_rank_dim=rank("v") if len(layers) > 1 else 1, eos_token_id=0, pad_token_id=None))
    if n_heads * head_size != C:
        raise ValueError(f"this .pth's r_k has {n_heads} heads of {head_size}, which do not span its {C} channels")
    cfg = hooked_config(c, model_name)
    cfg.group_norm_eps = 64e-5
    return cfg


def load_blinkdl(cls, path: Path, device=None, dtype=None):
    """A BlinkDL RWKV-7 ``.pth`` as a ``cls`` model (eval mode), through `blinkdl_to_fla` and the fla placements."""
    from ..loading import hf_to_hooked_state_dict

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle's and torch's errors for non-tensor content differ by version
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a state dict of tensors that torch.load(weights_only=True) reads: {first}") from None
    fla = blinkdl_to_fla(state)
    cfg = blinkdl_config(fla, str(path))
    model = cls(cfg).eval()
    model.load_state_dict(hf_to_hooked_state_dict(fla, cfg))
    dtype = dtype or torch.float32
    model.cfg.dtype = dtype
    return model.to(device=device, dtype=dtype)
