"""hooked_gdn: language models with a matrix memory (the Gated DeltaNet hybrids Qwen3.5, Qwen3.5-MoE,
Qwen3-Next, OLMo-Hybrid, and Mamba-2), with TransformerLens hook points on the memory's state and write."""

from .activation_cache import GDNActivationCache
from .cache import GDNCache
from .config import HookedGDNConfig, HookedModelConfig
from .delta_rule import (DELTA_RULE, SCALAR_DECAY, DeltaRuleEdits, Transition, chunked_gated_delta_rule, gated_delta_rule,
                         gated_delta_rule_reference)
from .mamba2 import HookedMamba2, HookedMamba2Config
from .memory import MatrixMemory
from .model import HookedGatedDeltaNet

__all__ = [
    "GDNActivationCache",
    "GDNCache",
    "HookedGDNConfig",
    "HookedGatedDeltaNet",
    "HookedMamba2",
    "HookedMamba2Config",
    "HookedModelConfig",
    "MatrixMemory",
    "Transition",
    "DELTA_RULE",
    "SCALAR_DECAY",
    "DeltaRuleEdits",
    "chunked_gated_delta_rule",
    "gated_delta_rule",
    "gated_delta_rule_reference",
]
