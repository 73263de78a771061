"""The other GDN families (Qwen3.5-MoE, Qwen3-Next, OLMo-Hybrid) against transformers' own modeling code."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

from hooked_gdn import HookedGatedDeltaNet, HookedGDNConfig
from hooked_gdn.architectures import FAMILIES

from .conftest import tiny_hf_config

FAMILY_NAMES = ["qwen3_5_moe", "qwen3_next", "olmo_hybrid", "olmo_hybrid_nope"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_logits_match_transformers_fp32_with_padding(make_pair, name):
    hf, ours = make_pair(name)
    g = torch.Generator().manual_seed(0)
    odd, long = torch.randint(1, 101, (2, 37), generator=g), torch.randint(1, 101, (1, 130), generator=g)
    mask = torch.ones(3, 45, dtype=torch.long)
    mask[0, :7] = 0
    mask[2, :30] = 0
    padded = torch.randint(1, 101, (3, 45), generator=g)
    with torch.no_grad():
        for tokens in (odd, long, odd[:1, :1]):
            assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
        got, expected = ours(padded, attention_mask=mask), hf(padded, attention_mask=mask).logits
        alone = ours(padded[2:, 30:])
    assert (got - expected)[mask.bool()].abs().max().item() <= 1e-4
    assert (got[2, 30:] - alone[0]).abs().max().item() <= 1e-4


def test_each_family_sets_its_options():
    """What each family's config conversion must read (the parity above fails without it)."""
    moe, nxt, olmo, nope = (HookedGDNConfig.from_hf_config(tiny_hf_config(name)) for name in FAMILY_NAMES)
    assert moe.mlp_types == ["moe"] * 4 and moe.norm_topk_prob and moe.zero_centred_norms
    assert nxt.mlp_types == ["moe", "dense", "moe", "moe"] and not nxt.norm_topk_prob
    assert olmo.allow_neg_eigval and not olmo.zero_centred_norms and olmo.attention_block_norm == "post"
    assert not olmo.attention_output_gate and not olmo.qk_norm_per_head and olmo.gdn_norm_eps == 1e-5
    assert nope.rotary_dim == 0 and olmo.rotary_dim == olmo.d_head


def test_olmo_beta_reaches_above_one(make_pair):
    ours = make_pair("olmo_hybrid")[1]
    _, cache = ours.run_with_cache(torch.randint(0, 101, (2, 40)), names_filter=lambda n: n.endswith("hook_beta"))
    beta = torch.cat([cache["beta", layer] for layer in ours.cfg.gdn_layers])
    assert beta.max() > 1 and beta.min() > 0 and beta.max() < 2


def test_qwen3_5_moe_multimodal_checkpoint_loads_text_weights(tmp_path):
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=48, patch_size=4,
                  temporal_patch_size=1, spatial_merge_size=1)
    torch.manual_seed(0)
    config = Qwen3_5MoeConfig(text_config=tiny_hf_config("qwen3_5_moe").to_dict(), vision_config=vision)
    hf = Qwen3_5MoeForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "vl")
    ours = HookedGatedDeltaNet.from_pretrained(tmp_path / "vl")
    tokens = torch.randint(0, 101, (2, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(tokens) - hf(input_ids=tokens).logits).abs().max().item() <= 1e-4


def test_olmo_original_checkpoint_layout_loads(make_pair, tiny_checkpoint, tmp_path):
    """OLMo-core's names (attention_layer_norm, feedforward_layer_norm) and q/k/v convs of their own widths,
    rather than the equal thirds transformers' save_pretrained writes."""
    hf, ours = make_pair("olmo_hybrid")
    cfg = ours.cfg
    widths = [cfg.n_key_heads * cfg.d_key] * 2 + [cfg.n_value_heads * cfg.d_value]
    original = {}
    for key, tensor in hf.state_dict().items():
        key = key.replace("input_layernorm", "attention_layer_norm")
        if ".linear_attn." in key:
            key = key.replace("post_attention_layernorm", "feedforward_layer_norm")
        if key.endswith("linear_attn.conv1d.weight"):
            for part, rows in zip("qkv", tensor.split(widths)):
                original[key.replace("conv1d", f"{part}_conv1d")] = rows.contiguous()
        else:
            original[key] = tensor.contiguous()
    folder = tmp_path / "olmo"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint("olmo_hybrid") / "config.json").read_text())
    save_file(original, folder / "model.safetensors")
    tokens = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(HookedGatedDeltaNet.from_pretrained(folder)(tokens), ours(tokens))


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="unsupported model type 'llama'") as error:
        HookedGDNConfig.from_hf_config(LlamaConfig())
    for family in FAMILIES:
        assert family.name in str(error.value) and family.model_types[0] in str(error.value)


def test_a_checkpoint_missing_one_expert_is_refused_by_name(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen3_5_moe")
    weights = load_file(source / "model.safetensors")
    del weights["model.layers.2.mlp.experts.4.up_proj.weight"]
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"blocks\.2\.mlp\.up_proj"):
        HookedGatedDeltaNet.from_pretrained(folder)


def test_a_tensor_of_another_family_is_refused_by_name(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen3_next")
    weights = load_file(source / "model.safetensors")
    weights["model.layers.0.linear_attn.g_proj.weight"] = torch.zeros(32, 48)  # OLMo-Hybrid's gate projection
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.linear_attn\.g_proj\.weight"):
        HookedGatedDeltaNet.from_pretrained(folder)
