"""hooked_gdn: Gated DeltaNet hybrids (Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo-Hybrid; Mamba-2 in
`HookedMamba2`) with TransformerLens hook points on the state and the write."""

from .activation_cache import GDNActivationCache
from .cache import GDNCache
from .config import HookedGDNConfig
from .delta_rule import DeltaRuleEdits, chunked_gated_delta_rule, gated_delta_rule, gated_delta_rule_reference
from .mamba2 import HookedMamba2, HookedMamba2Config
from .model import HookedGatedDeltaNet

__all__ = [
    "GDNActivationCache",
    "GDNCache",
    "HookedGDNConfig",
    "HookedGatedDeltaNet",
    "HookedMamba2",
    "HookedMamba2Config",
    "DeltaRuleEdits",
    "chunked_gated_delta_rule",
    "gated_delta_rule",
    "gated_delta_rule_reference",
]
