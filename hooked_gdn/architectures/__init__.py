"""The Gated DeltaNet families `HookedGatedDeltaNet` loads, one module each, keyed by transformers' ``model_type``.

Each family module holds everything that differs about it: its config conversion (transformers'
config -> `HookedGDNConfig`, whose options select the layers' variants) and its checkpoint
weight-name mapping (`base.Placement`). The layers themselves are shared (`hooked_gdn.layers`,
`hooked_gdn.moe`).
"""

from __future__ import annotations

from . import olmo_hybrid, qwen3_5, qwen3_5_moe, qwen3_next
from .base import Architecture, Placement

FAMILIES = (qwen3_5.ARCHITECTURE, qwen3_5_moe.ARCHITECTURE, qwen3_next.ARCHITECTURE, olmo_hybrid.ARCHITECTURE)
ARCHITECTURES = {model_type: family for family in FAMILIES for model_type in family.model_types}
BY_KEY = {family.key: family for family in FAMILIES}  # HookedGDNConfig.architecture -> family


def supported() -> str:
    return "; ".join(f"{family.name} ({', '.join(family.model_types)})" for family in FAMILIES)


def architecture_for(hf_config) -> Architecture:
    """The family of a transformers config, by its ``model_type``; anything else is refused, naming the supported ones."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "mamba2":
        raise ValueError("this is a Mamba-2 checkpoint (model_type 'mamba2'): load it with hooked_gdn.mamba2.HookedMamba2")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported model type {model_type!r}: HookedGatedDeltaNet supports the Gated DeltaNet "
                         f"hybrids {supported()}")
    return ARCHITECTURES[model_type]


__all__ = ["ARCHITECTURES", "Architecture", "BY_KEY", "FAMILIES", "Placement", "architecture_for", "supported"]
