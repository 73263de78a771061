"""Our model against transformers' Qwen3.5 with the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

from hooked_gdn import HookedGatedDeltaNet

from hooked_gdn.loading import hf_to_hooked_state_dict

from .conftest import FAMILIES, TINY_CONFIGS, tiny_hf_config


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("length", [1, 37, 130])
def test_logits_match_transformers_fp32(make_pair, name, length):
    hf, ours = make_pair(name)
    tokens = torch.randint(0, 101, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_left_padding_matches_transformers_and_unpadded_run(make_pair, name):
    hf, ours = make_pair(name)
    tokens = torch.randint(1, 101, (3, 45), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[0, :7] = 0
    mask[2, :30] = 0
    with torch.no_grad():
        expected = hf(tokens, attention_mask=mask).logits
        got = ours(tokens, attention_mask=mask)
        alone = ours(tokens[2:, 30:])
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() <= 1e-4
    assert (got[2, 30:] - alone[0]).abs().max().item() <= 1e-4


def test_bf16_close_to_transformers_bf16(make_pair):
    hf, ours = make_pair("grouped", dtype=torch.bfloat16)
    tokens = torch.randint(0, 101, (2, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        got = ours(tokens)
        fp32 = make_pair("grouped")[1](tokens)
    assert got.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    # bf16 keeps ~3 significant digits; both implementations round at the same places
    assert (got.float() - expected).abs().max().item() <= 0.02 * scale
    assert (got.float() - fp32).abs().max().item() <= 0.05 * scale


def test_multimodal_checkpoint_loads_text_weights(tmp_path):
    text = tiny_hf_config("grouped").to_dict()
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=48, patch_size=4,
                  temporal_patch_size=1, spatial_merge_size=1)
    torch.manual_seed(0)
    hf = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision)).eval()
    hf.save_pretrained(tmp_path / "vl")
    ours = HookedGatedDeltaNet.from_pretrained(tmp_path / "vl")
    tokens = torch.randint(0, 101, (2, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        got = ours(tokens)
    assert (got - expected).abs().max().item() <= 1e-4


def test_from_config_is_qwen_initialised():
    model = HookedGatedDeltaNet.from_config(tiny_hf_config("grouped"))
    gdn = model.blocks[0].linear_attn
    A = gdn.A_log.exp()
    assert ((A >= 0.01) & (A <= 16)).all()
    assert (gdn.dt_bias == 1).all() and (gdn.norm.w == 1).all() and (model.blocks[0].ln1.w == 0).all()
    assert abs(model.blocks[0].mlp.W_in.std().item() - 0.02) < 0.005
    logits = model(torch.randint(0, 101, (1, 9)))
    assert logits.shape == (1, 9, 101) and torch.isfinite(logits).all()


def test_loss_ignores_padding(model):
    ours = model
    tokens = torch.randint(1, 101, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(tokens)
    mask[1, :8] = 0
    with torch.no_grad():
        padded = ours(tokens, "loss", mask)
        per_token = torch.cat([ours(tokens[:1], "loss", loss_per_token=True)[0], ours(tokens[1:, 8:], "loss", loss_per_token=True)[0]])
    assert torch.allclose(padded, per_token.mean(), atol=1e-5)


# The decay parameters' gradients sum every position's through exponentials: in fp32 transformers' own are up to
# 1.7e-4 (relative to the largest) from its fp64 ones on the "grouped" tiny model, so they are held to less.
DECAY_PARAMETERS = ("A_log", "dt_bias")


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_transformers(make_pair, family):
    """The chunked recurrence's backward, and every other layer's: the loss's gradient in every parameter equals
    transformers' (its reference forward under autograd), mapped to our names and layouts by the loader's own map;
    the pad token's row of W_E takes none, as transformers' embedding (padding_idx) gives it none."""
    hf, ours = make_pair(family)
    tokens = torch.randint(0, 101, (2, 70), generator=torch.Generator().manual_seed(5))
    assert (tokens == ours.cfg.pad_token_id).any()
    ours(tokens, "loss").backward()
    hf(tokens, labels=tokens).loss.backward()
    expected = hf_to_hooked_state_dict({n: p.grad for n, p in hf.named_parameters() if p.grad is not None}, ours.cfg)
    for n, p in ours.named_parameters():
        got, want = p.grad, expected[n]
        tolerance = 1e-3 if n.endswith(DECAY_PARAMETERS) else 1e-5
        assert (got - want).abs().max().item() <= tolerance * want.abs().max().item() + 1e-8, n


def test_tied_config_with_a_separate_head_in_the_file_loads_like_transformers(tmp_path):
    import json

    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(0)
    Qwen3_5ForCausalLM(tiny_hf_config("grouped", tie_word_embeddings=False)).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    hf = Qwen3_5ForCausalLM.from_pretrained(tmp_path / "m").eval()
    with pytest.warns(UserWarning, match="lm_head.weight differs from its embedding"):
        ours = HookedGatedDeltaNet.from_pretrained(tmp_path / "m")
    tokens = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gated_norm_rounds_where_transformers_rounds(dtype):
    # in bf16 the normalised o is rounded before the multiply by w: computing through in fp32 differs
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNormGated

    from hooked_gdn.layers import GatedRMSNorm

    g = torch.Generator().manual_seed(7)
    ours, theirs = GatedRMSNorm(64, 1e-6), Qwen3_5RMSNormGated(64, eps=1e-6)
    with torch.no_grad():
        ours.w.copy_(1 + 0.3 * torch.randn(64, generator=g))
        theirs.weight.copy_(ours.w)
    o, z = (torch.randn(3, 5, 4, 64, generator=g).to(dtype) for _ in range(2))
    with torch.no_grad():
        assert torch.equal(ours.to(dtype)(o, z), theirs.to(dtype)(o, z))
