"""Qwen3.5-MoE: Qwen3.5 with every MLP a sparse MoE block (routed experts plus a sigmoid-gated shared expert).

transformers: ``Qwen3_5MoeForCausalLM`` (``qwen3_5_moe_text``) and
``Qwen3_5MoeForConditionalGeneration`` (``qwen3_5_moe``; vision tower ignored). The GDN and
attention layers are Qwen3.5's. The router takes the top ``num_experts_per_tok`` of a softmax over
``num_experts`` and always renormalises their weights. Checkpoints store each expert's
``gate_proj``/``up_proj``/``down_proj`` separately (as on the hub, and as ``save_pretrained``
writes them); transformers' in-memory layout, stacked ``experts.gate_up_proj`` [E, 2I, D] and
``experts.down_proj`` [E, D, I], is read too. Both go to our stacked [E, …] expert tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import re

from ..config import HookedGDNConfig
from . import qwen3_5
from .base import Architecture, Placement, renamed
from .hybrid import CONFIG_NAMES, hybrid_fields

_SHARED_RENAMES = {
    "gate.weight": "mlp.router",
    "shared_expert.gate_proj.weight": "mlp.shared_expert.gate_proj",
    "shared_expert.up_proj.weight": "mlp.shared_expert.up_proj",
    "shared_expert.down_proj.weight": "mlp.shared_expert.down_proj",
    "shared_expert_gate.weight": "mlp.shared_expert_gate",
    "experts.down_proj": "mlp.down_proj",
}
_ONE_EXPERT = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def moe_placements(name: str, cfg: HookedGDNConfig) -> list[Placement] | None:
    """Placements of a sparse MoE block's weight (``name`` inside ``mlp.``); shared with Qwen3-Next."""
    if name == "experts.gate_up_proj":  # [E, 2I, D]: gate rows, then up rows
        d = cfg.d_expert
        return [Placement("mlp.gate_proj", source=(slice(None), slice(0, d))),
                Placement("mlp.up_proj", source=(slice(None), slice(d, 2 * d)))]
    if (match := _ONE_EXPERT.fullmatch(name)) and int(match[1]) < cfg.n_experts:
        return [Placement(f"mlp.{match[2]}", index=(int(match[1]),))]
    return renamed(_SHARED_RENAMES, name)


def moe_fields(c) -> dict:
    return dict(n_experts=c.num_experts, n_experts_per_token=c.num_experts_per_tok, d_expert=c.moe_intermediate_size,
                d_shared_expert=c.shared_expert_intermediate_size)


def hooked_config(hf_config, model_name: str = "custom") -> HookedGDNConfig:
    c, tie = qwen3_5.text_config(hf_config)
    return HookedGDNConfig(
        **hybrid_fields(c, tie, "Qwen3.5-MoE", model_name), **moe_fields(c),
        d_mlp=c.moe_intermediate_size,  # no dense MLPs; TransformerLens' d_mlp of an MoE model is an expert's width
        mlp_types=["moe"] * c.num_hidden_layers, norm_topk_prob=True, architecture="qwen3_5_moe",
    )


def layer_placements(layer: int, name: str, cfg: HookedGDNConfig, shape: Sequence[int]) -> list[Placement] | None:
    if name.startswith("mlp."):
        return moe_placements(name.removeprefix("mlp."), cfg)
    return qwen3_5.layer_placements(layer, name, cfg, shape)


ARCHITECTURE = Architecture("qwen3_5_moe", "Qwen3.5-MoE", ("qwen3_5_moe_text", "qwen3_5_moe"), hooked_config, layer_placements,
                            config_names=CONFIG_NAMES | {"d_mlp": "moe_intermediate_size"})
