"""What every family module provides: its config conversion, its checkpoint weight-name mapping, and the
parts of its model (blocks, final norm, initialisation) that `HookedGatedDeltaNet` builds from them.

A checkpoint key maps to a list of `Placement`s, each saying where the tensor (or a part of it)
goes in our state dict: ``ours[target][index] = theirs[source]``. A plain rename is one
placement of the whole tensor; a fused projection that we keep as several matrices (Qwen3-Next's
``in_proj_qkvz``) is several placements with row selections; one expert of a checkpoint that
stores experts separately is a placement into one slice of our stacked expert tensor. A key that
is not part of the text model (a vision tower, a multi-token-prediction head) maps to no
placements, and a key the family does not know is refused with its name. So a loader can stream a
checkpoint one tensor at a time: it needs only the key, the tensor's shape and the config (the shape
only where a family's files come in two layouts, e.g. OLMo-Hybrid's split convs).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor, nn

from ..config import HookedGDNConfig, HookedModelConfig
from ..layers import Block, RMSNorm, init_hybrid_weights
from ..sites import block_name

# where the text model's weights sit: ...ForConditionalGeneration (multimodal), ...ForCausalLM
TEXT_PREFIXES = ("model.language_model.", "model.")
# not part of the text model: vision towers, multi-token-prediction heads
IGNORED_PREFIXES = ("model.visual.", "visual.", "mtp.", "model.mtp.")
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


@dataclass(frozen=True, eq=False)
class Placement:
    """``ours[target][index] = theirs[source]``: indices as tensor indexing takes them (a tuple of
    ints and slices, or a LongTensor of rows); () is the whole tensor."""

    target: str
    index: tuple = ()
    source: tuple | Tensor = ()

    def take(self, tensor: Tensor) -> Tensor:
        """The part of the checkpoint tensor that goes to ``ours[target][index]``."""
        return tensor[self.source]


# (layer, key inside the decoder layer, config, the tensor's shape) -> placements inside the block, or None if unknown
LayerPlacements = Callable[[int, str, HookedModelConfig, Sequence[int]], "list[Placement] | None"]


def hybrid_final_norm(cfg: HookedGDNConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.eps, cfg.zero_centred_norms)


@dataclass(frozen=True)
class Architecture:
    """One family: the transformers ``model_type``s it reads, the two functions that hold its checkpoints'
    differences, and what builds its model. The defaults are the GDN hybrids' (pre-norm blocks of
    `hooked_gdn.layers`, transformers' ``model.layers.L.`` key layout)."""

    key: str  # HookedModelConfig.architecture, e.g. "qwen3_5_moe"
    name: str  # as people call it, e.g. "Qwen3.5-MoE"
    model_types: tuple[str, ...]
    hooked_config: Callable[..., HookedModelConfig]  # (transformers config, model_name) -> our config
    layer_placements: LayerPlacements
    block: Callable[[HookedModelConfig, int], nn.Module] = Block  # (config, layer) -> blocks.L
    final_norm: Callable[[HookedModelConfig], nn.Module] = hybrid_final_norm  # config -> ln_final
    init_weights: Callable[[nn.Module, float], None] = init_hybrid_weights  # (model, std): transformers' initialisation
    text_prefixes: tuple[str, ...] = TEXT_PREFIXES  # what precedes "layers.L." and the embedding's and final norm's keys
    embedding_keys: tuple[str, ...] = ("embed_tokens.weight",)
    final_norm_key: str = "norm.weight"
    config_names: dict[str, str] = field(default_factory=dict)  # our size fields -> the transformers config's, for messages
    embedding_norm: Callable[[HookedModelConfig], nn.Module] | None = None  # config -> ln_embed (None: no such norm)
    # whether the reference's embedding gives the pad token's row no gradient (transformers' nn.Embedding with
    # padding_idx = pad_token_id, as the GDN hybrids'); the forward is the same either way
    embedding_pad_row_frozen: bool = True
    # whether a layer after the first reads what layer 0 computed besides the residual stream (RWKV-7's v_first), so
    # that a forward can start only at layer 0 (`HookedGatedDeltaNet.can_start_at`)
    later_layers_read_layer_0: bool = False
    # keys (after the text prefix) that go to the model itself rather than a block, e.g. a norm stored in layer 0's folder
    top_level_keys: dict[str, str] = field(default_factory=dict)
    # config.json's dict -> a config object for ``hooked_config``, for a family transformers does not register (None: AutoConfig)
    read_config: Callable[[dict], object] | None = None

    def placements(self, key: str, cfg: HookedModelConfig, shape: Sequence[int]) -> list[Placement]:
        """Where checkpoint tensor ``key`` of ``shape`` goes in our state dict; [] for keys outside the text model."""
        if key.startswith(IGNORED_PREFIXES):
            return []
        if key == "lm_head.weight":
            return [Placement("lm_head")]
        local = next((key[len(p):] for p in self.text_prefixes if key.startswith(p)), None)
        if local in self.embedding_keys:
            return [Placement("W_E")]
        if local == self.final_norm_key:
            return [Placement("ln_final.w")]
        if local in self.top_level_keys:
            return [Placement(self.top_level_keys[local])]
        match = _LAYER_KEY.fullmatch(local) if local is not None else None
        found = None
        if match is not None and int(match[1]) < cfg.n_layers:
            layer = int(match[1])
            found = self.layer_placements(layer, match[2], cfg, shape)
        if found is None:
            raise ValueError(f"unexpected weight {key!r}: not part of a {self.name} checkpoint of this config")
        return [replace(p, target=block_name(layer, p.target)) for p in found]


def renamed(table: dict[str, str], name: str) -> list[Placement] | None:
    """One whole-tensor placement if ``name`` is in the rename table."""
    return [Placement(table[name])] if name in table else None


def refuse_options(hf_config, family: str, implemented: dict) -> None:
    """Refuse transformers options the layers hard-code, at any value but the implemented one."""
    for option, value in implemented.items():
        if getattr(hf_config, option, value) != value:
            raise ValueError(f"unsupported {option}={getattr(hf_config, option)!r}: HookedGatedDeltaNet implements only "
                             f"{option}={value!r}, as {family} uses")


def first_token_id(token_id):
    """transformers allows a list of EOS ids; generation stops at the first."""
    return token_id[0] if isinstance(token_id, list) else token_id
