"""The shipped ``rwkv7-austen``, tested as the other shipped models are: it loads offline from its flash-linear-attention
format folder, its logits equal BlinkDL's reference implementation run on the same weights (written back as a BlinkDL
``.pth`` through the inverse of our one name map), and its card's figures (held-out loss, census) are what the model
gives."""

from __future__ import annotations

import json

import pytest
import torch

from hooked_gdn.architectures.rwkv7 import BLINKDL_LAYER_NAMES, BLINKDL_NAMES
from hooked_gdn.loading import read_safetensors
from hooked_gdn.pretrained import PRETRAINED_MODELS, heldout_loss
from hooked_gdn.rwkv7 import HookedRWKV7

from .test_pretrained import assert_census_matches_its_card

SHIPPED = PRETRAINED_MODELS["rwkv7-austen"]


@pytest.fixture(name="shipped", scope="module")
def shipped_fixture():
    return HookedRWKV7.from_pretrained("rwkv7-austen").eval()


def as_blinkdl(fla: dict) -> dict:
    """An fla-format state dict in BlinkDL's names and layouts: the inverse of `blinkdl_to_fla`'s map (BlinkDL's loader
    squeezes every tensor, so the flat ones need not regain their [1, 1, C])."""
    theirs = {fla_name: name for name, fla_name in BLINKDL_NAMES.items()}
    layer_names = {fla_name: (name, layout) for name, (fla_name, layout) in BLINKDL_LAYER_NAMES.items()}
    state = {}
    for key, tensor in fla.items():
        if key in theirs:
            state[theirs[key]] = tensor
            continue
        _, _, layer, local = key.split(".", 3)
        name, layout = layer_names[local]
        state[f"blocks.{layer}.{name}"] = tensor.T if layout == "transposed" else tensor
    return state


def test_loads_offline_as_the_fla_format_it_is_stored_in(shipped, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["model_type"] == "rwkv7" and shipped.tokenizer is not None
    assert HookedRWKV7.from_pretrained("rwkv7-austen").cfg.n_value_heads == config["num_heads"]
    assert sum(f.stat().st_size for f in SHIPPED.glob("*.safetensors")) <= 16 * 2**20  # bf16, a few M parameters


def test_logits_and_states_equal_blinkdls_on_the_shipped_weights(shipped, tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_V7_ON", "1")  # read when rwkv.model is first imported
    from rwkv.model import RWKV

    weights = {k: v.float() for k, v in read_safetensors(SHIPPED).items()}
    torch.save(as_blinkdl(weights), tmp_path / "rwkv7-austen.pth")
    reference = RWKV(str(tmp_path / "rwkv7-austen"), strategy="cpu fp32")
    tokens = shipped.to_tokens("Captain Wentworth had no fortune. He had been lucky in his profession.")
    names = [f"blocks.{i}.linear_attn.hook_final_state" for i in range(shipped.cfg.n_layers)]
    with torch.no_grad():
        logits, cache = shipped.run_with_cache(tokens, names_filter=names)
    theirs, state = reference.forward(tokens[0].tolist(), None, full_output=True)
    assert (logits[0] - theirs).abs().max().item() <= 1e-4 * max(1.0, theirs.abs().max().item())
    for i, name in enumerate(names):
        ours = cache[name][0]
        assert (ours - state[3 * i + 1].transpose(-1, -2)).abs().max().item() <= 1e-5 * max(1.0, ours.abs().max().item())


@pytest.mark.slow
def test_heldout_loss_matches_its_card(shipped):
    stats = json.loads((SHIPPED / "training_stats.json").read_text())
    assert f"{stats['heldout_loss']:.4f}" in (SHIPPED / "README.md").read_text()
    nats, bits_per_char = heldout_loss(shipped)
    assert nats == pytest.approx(stats["heldout_loss"], rel=0.005)
    assert bits_per_char == pytest.approx(stats["heldout_bits_per_char"], rel=0.005)


@pytest.mark.slow
def test_census_matches_its_card(shipped):
    assert_census_matches_its_card(shipped, SHIPPED)
