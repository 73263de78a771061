"""Model configs in TransformerLens' names: `HookedModelConfig`, what every family shares (sizes of the
matrix-memory heads, norms, tokens), and `HookedGDNConfig`, a Gated DeltaNet + attention hybrid's. Mamba-2's
is `hooked_gdn.mamba2.HookedMamba2Config`."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

MIXER_TYPES = ("linear_attention", "full_attention")  # GDN, gated (or plain) full attention
MLP_TYPES = ("dense", "moe")  # SwiGLU, or routed SwiGLU experts plus a shared expert
BLOCK_NORMS = ("pre", "post")


class ConfigSizeError(ValueError):
    """A size field of a config that is not a positive (or, for counts, non-negative) integer; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(kw_only=True)
class HookedModelConfig:
    """What every family's config holds: the sizes of its matrix-memory layers and the rest of a language model.

    Memory layers: ``n_key_heads`` (H_k) key/query heads (Mamba-2: its B/C groups) of size ``d_key``
    (d_k; Mamba-2: d_state) and ``n_value_heads`` (H_v) value heads of size ``d_value`` (d_v; Mamba-2:
    head_dim); each key head serves H_v / H_k consecutive value heads. ``architecture`` is the family's
    key in `hooked_gdn.architectures`, which builds its blocks; ``layer_types`` (a field or a property of
    each family's config) says which layers are memory layers ("linear_attention") and which attention.
    Fields are keyword-only.

    TransformerLens' code reads more from ``cfg`` than sizes. ``n_ctx`` and ``original_architecture``
    follow from the family; the model built from the config sets what only it knows: ``device`` (its
    embedding's, kept right when it moves), ``n_params``, ``tokenizer_prepends_bos`` and
    ``default_prepend_bos`` (what ``prepend_bos=None`` means: whatever the tokenizer does, until set).
    ``n_heads`` and ``d_head`` are the attention layers' (`HookedGDNConfig`) or, in a family without
    attention, the memory's heads (`AttentionFreeHeads`).
    """

    d_model: int
    n_layers: int
    d_vocab: int
    n_key_heads: int
    n_value_heads: int
    d_key: int
    d_value: int
    architecture: str
    conv_kernel: int = 4
    eps: float = 1e-6
    rotary_dim: int = 0  # attention layers' rotary features (0: none, or no attention layers)
    rotary_base: float = 10000.0
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_name: str = "custom"
    dtype: torch.dtype = torch.float32
    # TransformerLens attributes that ActivationCache helpers read
    normalization_type: str = "RMS"
    attn_only: bool = False
    act_fn: str = "silu"

    #: TransformerLens' longest input: none here. The memories are fixed-size states, and the attention layers compute
    #: their rotary angles per position (no table), so any length runs (as transformers runs it; a checkpoint's
    #: max_position_embeddings is the length its attention was trained to, not a limit).
    n_ctx = sys.maxsize
    #: TransformerLens' switch for caching each head's result: `HookedGatedDeltaNet.set_use_attn_result` sets it on a
    #: model's config (a fact of the model, not of the checkpoint's config)
    use_attn_result = False
    # set by the model built from this config (not fields: facts of the model, not of the checkpoint's config):
    # its embedding's device, its parameters outside the embedding and unembedding (TransformerLens' n_params,
    # norms counted), whether its tokenizer puts a BOS first by itself, and what prepend_bos=None means: at first
    # that same answer, so that strings get the tokenizer's own special tokens (none, for every shipped tokenizer)
    device = None
    n_params = None
    tokenizer_prepends_bos = False
    default_prepend_bos = False
    default_padding_side = None  # what padding_side=None means: the model sets hooked_gdn.model.DEFAULT_PADDING_SIDE

    #: the size fields, which must be integers > 0 (``SIZES``) or >= 0 (``COUNTS``); each family's config adds its own
    SIZES: ClassVar[tuple[str, ...]] = ("d_model", "n_layers", "d_vocab", "n_key_heads", "n_value_heads", "d_key", "d_value",
                                        "conv_kernel")
    COUNTS: ClassVar[tuple[str, ...]] = ("rotary_dim",)

    def __post_init__(self):
        for name in (*self.SIZES, *self.COUNTS):
            value, least = getattr(self, name), 1 if name in self.SIZES else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigSizeError(name, f"{name} must be an integer >= {least}, got {value!r}")
        if self.n_value_heads % self.n_key_heads:
            raise ValueError(f"n_value_heads ({self.n_value_heads}) must be a multiple of n_key_heads ({self.n_key_heads}), "
                             f"the heads that share a key (Mamba-2: the heads and n_groups)")

    @property
    def original_architecture(self) -> str:
        """TransformerLens' name of the architecture a model was converted from: the transformers class this
        family reproduces (``Qwen3_5ForCausalLM``, ``Mamba2ForCausalLM``, …)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        from .architectures import BY_KEY

        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BY_KEY[self.architecture].model_types[0]]

    def sizes(self) -> dict[str, int]:
        """Every size field (`SIZES`, `COUNTS`) and its value."""
        return {name: getattr(self, name) for name in (*self.SIZES, *self.COUNTS)}

    @property
    def gdn_layers(self) -> list[int]:
        """The layers with a matrix memory (``blocks.L.linear_attn``)."""
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @classmethod
    def from_hf_config(cls, hf_config, model_name: str = "custom") -> "HookedModelConfig":
        """Build from a transformers config of any supported family (`hooked_gdn.architectures`)."""
        from .architectures import architecture_for

        family = architecture_for(hf_config)
        try:
            return family.hooked_config(hf_config, model_name)
        except ConfigSizeError as error:  # named as the transformers config names it
            theirs = family.config_names.get(error.field)
            if theirs is None:
                raise
            raise ConfigSizeError(error.field, f"{error} (config.json's {theirs})") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d


class AttentionFreeHeads:
    """TransformerLens' ``n_heads`` and ``d_head`` for a family without attention (Mamba-2, RWKV-7): the memory's
    H_v value heads of size d_v, as TransformerLens' bridge counts those models' heads. Code that takes them for
    attention heads fails on the hook points and weights it then asks for (``hook_z``, ``hook_pattern``, ``W_O``),
    which these models do not have."""

    @property
    def n_heads(self) -> int:
        return self.n_value_heads

    @property
    def d_head(self) -> int:
        return self.d_value


@dataclass(kw_only=True)
class HookedGDNConfig(HookedModelConfig):
    """Sizes and options of a Gated DeltaNet + full attention hybrid (the GDN families of `hooked_gdn.architectures`).

    GDN layers: the memory sizes of `HookedModelConfig`. Attention layers: ``n_heads`` query heads and
    ``n_key_value_heads`` KV heads of size ``d_head``, with q/k RMSNorm and rotary embeddings on the first
    ``rotary_dim`` features (0: none) of base ``rotary_base``.

    The options below default to Qwen3.5; each family's module sets the ones it differs in:

    - ``mlp_types``: per layer, "dense" (SwiGLU of width ``d_mlp``) or "moe" (``n_experts`` SwiGLU
      experts of width ``d_expert``, the top ``n_experts_per_token`` by router softmax, their weights
      renormalised when ``norm_topk_prob``; plus a sigmoid-gated shared expert of width
      ``d_shared_expert``). None: all dense.
    - ``zero_centred_norms``: RMSNorms scale by (1 + w) (Qwen) or by w (OLMo-Hybrid).
    - ``attention_block_norm``: "pre", x + attn(ln1(x)), or "post", x + ln1_post(attn(x)) and
      likewise for the MLP (OLMo-Hybrid's attention blocks; GDN blocks are always pre-norm).
    - ``attention_output_gate``: the sigmoid gate on the attention output (Qwen); ``qk_norm_per_head``:
      q/k RMSNorm over each head's d_head (Qwen) or over all heads' features at once (OLMo-Hybrid).
    - ``allow_neg_eigval``: β = 2σ(b) ∈ (0, 2), so I − β k̂k̂ᵀ may have a negative eigenvalue (OLMo-Hybrid).
    - ``gated_norm_eps``: ε of the GDN output norm (None: ``eps``).
    """

    d_mlp: int
    layer_types: list[str]  # "linear_attention" (GDN) or "full_attention", one per layer
    n_heads: int
    n_key_value_heads: int
    d_head: int
    mlp_types: list[str] | None = None
    n_experts: int = 0
    n_experts_per_token: int = 0
    d_expert: int = 0
    d_shared_expert: int = 0
    norm_topk_prob: bool = True
    zero_centred_norms: bool = True
    attention_block_norm: str = "pre"
    attention_output_gate: bool = True
    qk_norm_per_head: bool = True
    allow_neg_eigval: bool = False
    gated_norm_eps: float | None = None

    SIZES: ClassVar[tuple[str, ...]] = (*HookedModelConfig.SIZES, "d_mlp", "n_heads", "n_key_value_heads", "d_head")
    COUNTS: ClassVar[tuple[str, ...]] = (*HookedModelConfig.COUNTS, "n_experts", "n_experts_per_token", "d_expert",
                                         "d_shared_expert")

    def __post_init__(self):
        super().__post_init__()
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        unknown = set(self.layer_types) - set(MIXER_TYPES)
        if unknown:
            raise ValueError(f"unknown layer types {sorted(unknown)}; the layer types are {MIXER_TYPES}")
        if self.mlp_types is None:
            self.mlp_types = ["dense"] * self.n_layers
        if len(self.mlp_types) != self.n_layers or set(self.mlp_types) - set(MLP_TYPES):
            raise ValueError(f"mlp_types must give one of {MLP_TYPES} for each of the {self.n_layers} layers, got {self.mlp_types}")
        if "moe" in self.mlp_types and not 0 < self.n_experts_per_token <= self.n_experts:
            raise ValueError(f"an MoE layer needs 0 < n_experts_per_token ({self.n_experts_per_token}) <= n_experts ({self.n_experts})")
        if self.attention_block_norm not in BLOCK_NORMS:
            raise ValueError(f"attention_block_norm must be one of {BLOCK_NORMS}, got {self.attention_block_norm!r}")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.d_head:
            raise ValueError(f"rotary_dim must be even and in [0, d_head={self.d_head}], got {self.rotary_dim}")
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads ({self.n_key_value_heads})")

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.mlp_types) if t == "moe"]

    @property
    def gdn_norm_eps(self) -> float:
        return self.eps if self.gated_norm_eps is None else self.gated_norm_eps
