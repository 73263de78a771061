"""`HookedGDNConfig`: the architecture of a Qwen3.5-style hybrid, in TransformerLens' names."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SUPPORTED_MODEL_TYPES = ("qwen3_5_text", "qwen3_5")
# transformers options the layers do not read, at the only values they implement
_FIXED_OPTIONS = {"hidden_act": "silu", "attention_bias": False}


@dataclass
class HookedGDNConfig:
    """Sizes and options of a Gated DeltaNet + gated attention hybrid.

    GDN layers: ``n_key_heads`` (H_k) key/query heads of size ``d_key`` (d_k) and ``n_value_heads``
    (H_v) value heads of size ``d_value`` (d_v); each key head serves H_v / H_k consecutive value
    heads. Attention layers: ``n_heads`` query heads and ``n_key_value_heads`` KV heads of size
    ``d_head``, with q/k RMSNorm, a sigmoid output gate and rotary embeddings on the first
    ``rotary_dim`` features.
    """

    d_model: int
    n_layers: int
    d_vocab: int
    d_mlp: int
    layer_types: list[str]  # "linear_attention" (GDN) or "full_attention", one per layer
    n_heads: int
    n_key_value_heads: int
    d_head: int
    rotary_dim: int
    rotary_base: float
    n_key_heads: int
    n_value_heads: int
    d_key: int
    d_value: int
    conv_kernel: int = 4
    eps: float = 1e-6
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_name: str = "custom"
    dtype: torch.dtype = torch.float32
    # TransformerLens attributes that ActivationCache helpers read
    normalization_type: str = "RMS"
    attn_only: bool = False
    act_fn: str = "silu"

    def __post_init__(self):
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        unknown = set(self.layer_types) - {"linear_attention", "full_attention"}
        if unknown:
            raise ValueError(f"unknown layer types {sorted(unknown)}")
        if self.n_value_heads % self.n_key_heads:
            raise ValueError(f"n_value_heads ({self.n_value_heads}) must be a multiple of n_key_heads ({self.n_key_heads})")
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads ({self.n_key_value_heads})")

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @classmethod
    def from_hf_config(cls, hf_config, model_name: str = "custom") -> "HookedGDNConfig":
        """Build from a transformers config of type ``qwen3_5_text``, or ``qwen3_5`` (its text config)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model type {model_type!r}: HookedGatedDeltaNet supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen3.5 Gated DeltaNet hybrids)"
            )
        tie = getattr(hf_config, "tie_word_embeddings", False)
        if model_type == "qwen3_5":
            hf_config = hf_config.text_config
            tie = tie or getattr(hf_config, "tie_word_embeddings", False)
        c = hf_config
        for option, implemented in _FIXED_OPTIONS.items():  # what the layers hard-code: refuse anything else
            if getattr(c, option, implemented) != implemented:
                raise ValueError(f"unsupported {option}={getattr(c, option)!r}: HookedGatedDeltaNet implements only "
                                 f"{option}={implemented!r}, as Qwen3.5 uses")
        rope = c.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope['rope_type']!r}: only 'default' rotary embeddings are implemented")
        head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
        return cls(
            d_model=c.hidden_size,
            n_layers=c.num_hidden_layers,
            d_vocab=c.vocab_size,
            d_mlp=c.intermediate_size,
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
            tie_word_embeddings=bool(tie),
            eos_token_id=c.eos_token_id if not isinstance(c.eos_token_id, list) else c.eos_token_id[0],
            pad_token_id=c.pad_token_id,
            model_name=model_name,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d
