"""Tiny random configs of every GDN family, and pairs of (transformers model, our model) with the same weights.

Our model is always loaded through ``from_pretrained`` from a folder that transformers saved, so the
real loading path is what the parity tests exercise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    OlmoHybridConfig, OlmoHybridForCausalLM, Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig, Qwen3NextConfig, Qwen3NextForCausalLM,
)

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.pretrained import PRETRAINED_MODELS

# One thread: these tensors are tiny, and a second thread only waits for a time slice at every op
# when the machine's other core is busy.
torch.set_num_threads(1)

# Three shapes: grouped GDN heads with d_k != d_v and partial rotary; equal heads, tied embeddings,
# attention every 2nd layer; one key head serving three value heads, attention first.
TINY_CONFIGS = {
    "grouped": dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=8,
                    num_hidden_layers=4, tie_word_embeddings=False),
    "tied": dict(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                 num_hidden_layers=4, full_attention_interval=2, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 1.0}),
    "one_key_head": dict(linear_num_key_heads=1, linear_num_value_heads=3, linear_key_head_dim=16, linear_value_head_dim=6,
                         num_hidden_layers=3, layer_types=["full_attention", "linear_attention", "linear_attention"]),
}
# The other families (hooked_gdn.architectures), each with grouped GDN heads (d_k != d_v) and grouped KV heads:
# Qwen3.5-MoE, every MLP routed; Qwen3-Next with a dense MLP at layer 1 and unnormalised top-k weights;
# OLMo-Hybrid with β ∈ (0, 2), with rotary and without (NoPE, as its released checkpoints).
_EXPERTS = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24)
_GDN = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=8,
            num_hidden_layers=4)
FAMILY_CONFIGS = {  # name -> (transformers config class, causal-LM class, config keywords)
    "grouped": (Qwen3_5TextConfig, Qwen3_5ForCausalLM, {}),
    "tied": (Qwen3_5TextConfig, Qwen3_5ForCausalLM, {}),
    "one_key_head": (Qwen3_5TextConfig, Qwen3_5ForCausalLM, {}),
    "qwen3_5_moe": (Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM, _GDN | _EXPERTS),
    "qwen3_next": (Qwen3NextConfig, Qwen3NextForCausalLM,
                   _GDN | _EXPERTS | dict(intermediate_size=64, mlp_only_layers=[1], norm_topk_prob=False)),
    "olmo_hybrid": (OlmoHybridConfig, OlmoHybridForCausalLM, _GDN | dict(intermediate_size=64)),
    "olmo_hybrid_nope": (OlmoHybridConfig, OlmoHybridForCausalLM, _GDN | dict(
        intermediate_size=64, rope_parameters={"rope_type": "default", "rope_theta": None})),
}
# one tiny model per family, for the capability tests that run across families ("grouped" is Qwen3.5's)
FAMILIES = ["grouped", "qwen3_5_moe", "qwen3_next", "olmo_hybrid"]


def tiny_hf_config(name: str = "grouped", **overrides):
    config_class, _, family = FAMILY_CONFIGS[name]
    kwargs = dict(vocab_size=101, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, eos_token_id=0, pad_token_id=0)
    if config_class is not OlmoHybridConfig:  # OLMo: d_head = d_model / heads, rotary on all of it
        kwargs |= dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    if config_class is Qwen3_5TextConfig:
        kwargs |= dict(intermediate_size=64) | TINY_CONFIGS[name]
    kwargs.update(family)
    kwargs.update(overrides)
    return config_class(**kwargs)


def save_tiny_checkpoint_with_tokenizer(folder: Path) -> Path:
    """A random tiny Qwen3.5 saved by transformers into ``folder`` (seeded by the caller), with the shipped
    model's tokenizer files beside it so that commands reading text can run on it."""
    Qwen3_5ForCausalLM(tiny_hf_config("grouped", vocab_size=4096)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(PRETRAINED_MODELS["gdn-austen"] / name, folder / name)
    return folder


def random_tiny_model(cls=HookedGatedDeltaNet, name: str = "grouped"):
    """A tiny config ("grouped" unless named) with Qwen3.5's random initialisation (seed 0), in eval mode."""
    torch.manual_seed(0)
    return cls.from_config(tiny_hf_config(name)).eval()


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every norm and gate non-trivial values, so that parity tests can see them, and MoE routers
    decisive ones (at their 0.02 initialisation every expert is about equally likely)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("A_log", "dt_bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.mul_(50.0)


@pytest.fixture(name="tiny_checkpoint", scope="session")
def tiny_checkpoint_fixture(tmp_path_factory):
    """``tiny_checkpoint(name, seed)``: the folder of a randomized tiny transformers checkpoint, saved once a session."""
    folders = {}

    def folder(name: str = "grouped", seed: int = 0):
        if (name, seed) not in folders:
            torch.manual_seed(seed)
            hf = FAMILY_CONFIGS[name][1](tiny_hf_config(name)).eval()
            randomize_(hf, seed)
            folders[name, seed] = tmp_path_factory.mktemp(f"hf-{name}-{seed}")
            hf.save_pretrained(folders[name, seed])
        return folders[name, seed]

    return folder


@pytest.fixture(name="make_pair", scope="session")
def make_pair_fixture(tiny_checkpoint):
    """``make_pair(name, dtype, seed)``: (transformers model, our model) loaded from one saved tiny checkpoint."""

    def make(name: str = "grouped", dtype=torch.float32, seed: int = 0):
        folder = tiny_checkpoint(name, seed)
        hf = FAMILY_CONFIGS[name][1].from_pretrained(folder, dtype=dtype).eval()
        return hf, HookedGatedDeltaNet.from_pretrained(folder, dtype=dtype).eval()

    return make


@pytest.fixture(name="model")
def model_fixture(request, tiny_checkpoint):
    """Our model on the "grouped" tiny checkpoint, fresh for each test (so a test may change it); a test
    runs it on every family with ``@pytest.mark.parametrize("model", FAMILIES, indirect=True)``."""
    return HookedGatedDeltaNet.from_pretrained(tiny_checkpoint(getattr(request, "param", "grouped"))).eval()
