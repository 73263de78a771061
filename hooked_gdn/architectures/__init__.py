"""The families `HookedGatedDeltaNet` loads, one module each, keyed by transformers' ``model_type``: the four
Gated DeltaNet hybrids, Mamba-2 and RWKV-7.

Each family module holds everything that differs about it: its config conversion (transformers'
config -> its `HookedModelConfig`, whose options select the layers' variants), its checkpoint
weight-name mapping (`base.Placement`) and, where they are not the hybrids' (`hooked_gdn.layers`), its
blocks. Every family's memory is `hooked_gdn.memory.MatrixMemory`.
"""

from __future__ import annotations

from . import mamba2, olmo_hybrid, qwen3_5, qwen3_5_moe, qwen3_next, rwkv7
from .base import Architecture, Placement

FAMILIES = (qwen3_5.ARCHITECTURE, qwen3_5_moe.ARCHITECTURE, qwen3_next.ARCHITECTURE, olmo_hybrid.ARCHITECTURE,
            mamba2.ARCHITECTURE, rwkv7.ARCHITECTURE)
ARCHITECTURES = {model_type: family for family in FAMILIES for model_type in family.model_types}
BY_KEY = {family.key: family for family in FAMILIES}  # HookedModelConfig.architecture -> family
# model types people try that are not ours, and why
_OLDER_RWKV = ("an RWKV version before 7, whose per-head state is written without the in-context erase; the RWKV-7 family "
               "(model_type 'rwkv7') is supported")
NOT_SUPPORTED = {"rwkv": _OLDER_RWKV, "rwkv5": _OLDER_RWKV, "rwkv6": _OLDER_RWKV,
                 "mamba": "a Mamba-1 checkpoint: its per-head state is a vector; the Mamba-2 family (model_type 'mamba2') "
                          "has the matrix state written by rank-1 writes that this library hooks"}


def supported() -> str:
    return "; ".join(f"{family.name} ({', '.join(family.model_types)})" for family in FAMILIES)


def architecture_for(hf_config) -> Architecture:
    """The family of a transformers config, by its ``model_type``; anything else is refused, naming the supported ones."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        why = f"this is {NOT_SUPPORTED[model_type]}; " if model_type in NOT_SUPPORTED else ""
        raise ValueError(f"unsupported model type {model_type!r}: {why}the supported families are {supported()}")
    return ARCHITECTURES[model_type]


__all__ = ["ARCHITECTURES", "Architecture", "BY_KEY", "FAMILIES", "NOT_SUPPORTED", "Placement", "architecture_for", "supported"]
