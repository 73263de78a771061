"""TransformerLens habits on the hybrid: weights in TL's orientation, ActivationCache helpers, and
the direct-logit-attribution recipe end to end."""

from __future__ import annotations

import pytest
import torch
from einops import einsum

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.sites import block_name, gdn_hook_name

from .conftest import tiny_hf_config


@pytest.fixture(name="run", scope="module", params=["grouped", "tied"])
def run_fixture(request):
    """A randomized tiny model (untied, or with tied embeddings), tokens, and its logits and full cache."""
    torch.manual_seed(0)
    model = HookedGatedDeltaNet.from_config(tiny_hf_config(request.param)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):  # norms away from identity, so a misplaced (1 + w) shows
                p.add_(0.3 * torch.randn_like(p))
    tokens = torch.randint(0, 101, (3, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return model, tokens, logits, cache


def test_weights_read_as_transformer_lens_reads_them(run):
    model, _, logits, cache = run
    cfg = model.cfg
    assert model.W_U.shape == (cfg.d_model, cfg.d_vocab) and model.W_E.shape == (cfg.d_vocab, cfg.d_model)
    torch.testing.assert_close(model.ln_final(cache["resid_post", -1]) @ model.W_U, logits)
    layer = cfg.attention_layers[0]
    attn, group = model.blocks[layer].attn, cfg.n_heads // cfg.n_key_value_heads
    x = model.blocks[layer].ln1(cache["resid_pre", layer])
    per_head = lambda W: einsum(x, W, "b p m, h m d -> b p h d")
    assert attn.W_Q.shape == attn.W_K.shape == attn.W_V.shape == (cfg.n_heads, cfg.d_model, cfg.d_head)
    torch.testing.assert_close(attn.q_norm(per_head(attn.W_Q)), cache["q", layer])
    torch.testing.assert_close(attn.k_norm(per_head(attn.W_K))[:, :, ::group], cache["k", layer])
    torch.testing.assert_close(per_head(attn.W_V)[:, :, ::group], cache["v", layer])
    assert torch.equal(per_head(attn.W_V)[:, :, ::group], per_head(attn.W_V)[:, :, group - 1 :: group])  # repeated per group
    gated = cache["z", layer] * cache[block_name(layer, "attn.hook_gate")]
    torch.testing.assert_close(einsum(gated, attn.W_O, "b p h d, h d m -> b p m"), cache["attn_out", layer])
    mlp = model.blocks[layer].mlp
    torch.testing.assert_close(model.blocks[layer].ln2(cache["resid_mid", layer]) @ mlp.W_gate, cache["pre", layer])
    torch.testing.assert_close(cache["post", layer] @ mlp.W_out, cache["mlp_out", layer])
    torch.testing.assert_close(cache.get_neuron_results(layer).sum(-2), cache["mlp_out", layer], rtol=1e-5, atol=1e-6)


def test_short_keys(run):
    model, tokens, _, cache = run
    gdn, attn = model.cfg.gdn_layers[0], model.cfg.attention_layers[0]
    n = model.cfg.n_layers
    assert cache["resid_post", -1] is cache[block_name(n - 1, "hook_resid_post")]
    assert cache["write_value", gdn] is cache[gdn_hook_name(gdn, "hook_write_value")]
    assert cache["q", gdn] is cache[gdn_hook_name(gdn, "hook_q")]  # a GDN layer's own q
    assert cache["q", attn] is cache[block_name(attn, "attn.hook_q")]
    assert cache["scale", gdn, "ln1"] is cache[block_name(gdn, "ln1.hook_scale")]
    _, with_states = model.run_with_cache(tokens, names_filter=gdn_hook_name(gdn, "hook_state"))
    assert with_states["state", gdn].shape == (3, 14, model.cfg.n_value_heads, model.cfg.d_key, model.cfg.d_value)


def test_direct_logit_attribution_recipe(run):
    # TransformerLens' recipe: the residual stream at the last position decomposed into components,
    # scaled by ln_final's cached scale, dotted with the answer tokens' residual directions
    model, tokens, logits, cache = run
    answer, wrong = tokens[:, 3], tokens[:, 5]
    stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    assert labels == ["embed"] + [f"{l}_{part}" for l in range(model.cfg.n_layers) for part in ("attn_out", "mlp_out")]
    attrs = cache.logit_attrs(stack, tokens=answer, incorrect_tokens=wrong, pos_slice=-1)  # [components, batch]
    rows = torch.arange(len(tokens))
    logit_diff = logits[rows, -1, answer] - logits[rows, -1, wrong]
    torch.testing.assert_close(attrs.sum(0), logit_diff, rtol=1e-4, atol=1e-4)
    # the logit lens: the accumulated stream, through ln_final, reaches the logits at the last layer
    accumulated = cache.accumulated_resid(layer=-1, incl_mid=True, apply_ln=True, pos_slice=-1)
    torch.testing.assert_close(accumulated[-1] @ model.W_U, logits[:, -1])
    # the failing call: scaling a whole accumulated stack by the cached final scale
    scaled = cache.apply_ln_to_stack(cache.accumulated_resid(layer=-1), layer=-1)
    directions = model.tokens_to_residual_directions(answer)  # [batch, d_model]
    torch.testing.assert_close(einsum(scaled[-1], directions, "b p d, b d -> b p"), logits[rows, :, answer],
                               rtol=1e-4, atol=1e-4)


def test_a_string_token_resolves_on_the_shipped_tokenizer():
    model = HookedGatedDeltaNet.from_pretrained("gdn-austen")
    token = model.to_single_token(" the")
    assert model.to_string([token]) == " the"
    torch.testing.assert_close(model.tokens_to_residual_directions(" the"), model.tokens_to_residual_directions(token))
    with pytest.raises(ValueError, match="not one"):
        model.to_single_token(" Wentworth's")


def test_transformer_lens_ssm_helpers_return_our_cached_state_and_exact_effective_attention(run):
    from hooked_gdn.effective_attention import effective_attention

    model, tokens, _, cache = run
    layer = model.cfg.gdn_layers[-1]
    with pytest.raises(KeyError, match="states are cached only when asked for"):
        cache.compute_ssm_state(layer)
    with torch.no_grad():
        _, with_states = model.run_with_cache(tokens, names_filter=lambda name: name.endswith(
            ("hook_state", "hook_read_query", "hook_write_key", "hook_v", "hook_beta", "hook_log_decay")))
    states = with_states.compute_ssm_state(layer)
    assert torch.equal(states, with_states[gdn_hook_name(layer, "hook_state")])
    assert torch.equal(with_states.compute_ssm_state(layer, time_step=5), states[:, 5])
    every = with_states.compute_ssm_state()  # a hybrid: a dict over its memory layers
    assert sorted(every) == list(model.cfg.gdn_layers)
    pattern = with_states.compute_ssm_effective_attention(layer)
    assert torch.equal(pattern, effective_attention(with_states, layer, over="inputs").pattern)
    assert pattern.shape == (3, model.cfg.n_value_heads, 14, 14)
    with pytest.raises(ValueError, match="include_dt_scaling is an option of TransformerLens' Mamba mixers"):
        with_states.compute_ssm_effective_attention(layer, include_dt_scaling=True)
    attention = model.cfg.attention_layers[0]
    with pytest.raises(TypeError, match=f"layer {attention} has no matrix memory"):
        with_states.compute_ssm_state(attention)


def test_neuron_results_on_a_model_without_mlps_say_so():
    model = HookedGatedDeltaNet.from_pretrained("mamba2-austen").eval()
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randint(0, 50, (1, 6)))
    for neuron_results in (cache.stack_neuron_results, cache.get_neuron_results):
        with pytest.raises(NotImplementedError, match="blocks have no MLP, so no neurons"):
            neuron_results(1)
    stacked = cache.compute_ssm_effective_attention()  # every block a memory layer: a stack, dim 0 = layer
    assert stacked.shape == (model.cfg.n_layers, 1, model.cfg.n_value_heads, 6, 6)


@pytest.mark.parametrize("family", ["qwen3_5", "mamba2", "rwkv7"])
def test_cached_activations_are_contiguous(family, tmp_path):
    """Every cached activation is contiguous, as TransformerLens' are, whichever way it is cached (many hook values
    are views: a head split, a transpose), so ``.view`` works on it (SAELens' activation store takes one); and it
    holds no more than itself."""
    from .test_transformer_lens_tools import save_tiny

    save_tiny(family, tmp_path)
    model = HookedGatedDeltaNet.from_pretrained(tmp_path)
    tokens = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    for recurrence in ("parallel", "sequential"):
        _, cache = model.run_with_cache(tokens, recurrence=recurrence)
        assert [name for name, value in cache.items() if not value.is_contiguous()] == [], recurrence
        _, sliced = model.run_with_cache(tokens, recurrence=recurrence, pos_slice=slice(1, 3))
        assert [name for name, value in sliced.items() if not value.is_contiguous()] == [], recurrence
    hooks_cache = model.add_caching_hooks()
    try:
        model(tokens)
    finally:
        model.reset_hooks()
    assert [name for name, value in hooks_cache.items() if not value.is_contiguous()] == []
    v = cache["blocks.0.linear_attn.hook_v"]  # (a view of the whole projection on GDN and Mamba-2)
    assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
