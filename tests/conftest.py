"""Tiny random Qwen3.5 configs, and pairs of (transformers model, our model) with the same weights.

Our model is always loaded through ``from_pretrained`` from a folder that transformers saved, so the
real loading path is what the parity tests exercise.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

from hooked_gdn import HookedGatedDeltaNet

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


def tiny_hf_config(name: str = "grouped", **overrides) -> Qwen3_5TextConfig:
    kwargs = dict(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        eos_token_id=0, pad_token_id=0,
    )
    kwargs.update(TINY_CONFIGS[name])
    kwargs.update(overrides)
    return Qwen3_5TextConfig(**kwargs)


def random_tiny_model(cls=HookedGatedDeltaNet):
    """The "grouped" tiny config with Qwen3.5's random initialisation (seed 0), in eval mode."""
    torch.manual_seed(0)
    return cls.from_config(tiny_hf_config("grouped")).eval()


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every norm and gate non-trivial values, so that parity tests can see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("A_log", "dt_bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(name, seed)``: the folder of a randomized tiny transformers checkpoint, saved once a session."""
    folders = {}

    def folder(name: str = "grouped", seed: int = 0):
        if (name, seed) not in folders:
            torch.manual_seed(seed)
            hf = Qwen3_5ForCausalLM(tiny_hf_config(name)).eval()
            randomize_(hf, seed)
            folders[name, seed] = tmp_path_factory.mktemp(f"hf-{name}-{seed}")
            hf.save_pretrained(folders[name, seed])
        return folders[name, seed]

    return folder


@pytest.fixture(scope="session")
def make_pair(tiny_checkpoint):
    """``make_pair(name, dtype, seed)``: (transformers model, our model) loaded from one saved tiny checkpoint."""

    def make(name: str = "grouped", dtype=torch.float32, seed: int = 0):
        folder = tiny_checkpoint(name, seed)
        hf = Qwen3_5ForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        return hf, HookedGatedDeltaNet.from_pretrained(folder, dtype=dtype).eval()

    return make


@pytest.fixture
def model(tiny_checkpoint):
    """Our model on the "grouped" tiny checkpoint, fresh for each test (so a test may change it)."""
    return HookedGatedDeltaNet.from_pretrained(tiny_checkpoint()).eval()
