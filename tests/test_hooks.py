"""Hook points: names and shapes of docs/design.md §7, observed values against a plain recurrence, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn import sites
from hooked_gdn.sites import block_name, site_name

from .conftest import FAMILIES

GDN_HOOKS = [
    "hook_in", "hook_q_pre_conv", "hook_k_pre_conv", "hook_v_pre_conv", "hook_q", "hook_k", "hook_v",
    "hook_beta_logit", "hook_beta", "hook_log_decay", "hook_read_query", "hook_write_key", "hook_write_value",
    "hook_state", "hook_final_state", "hook_recurrence_out", "hook_gate_input", "hook_gated_out", "hook_out",
]
ATTN_HOOKS = ["hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_gate"]
BLOCK_HOOKS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
               "mlp.hook_pre", "mlp.hook_post"]


def test_every_design_hook_exists(model):
    cfg = model.cfg
    assert sorted(sites.GDN_HOOKS) == sorted(GDN_HOOKS)  # the short keys' vocabulary is docs/design.md §7's
    assert "hook_embed" in model.hook_dict
    for i in range(cfg.n_layers):
        for name in BLOCK_HOOKS:
            assert block_name(i, name) in model.hook_dict
        mixer, names = ("linear_attn", GDN_HOOKS) if i in cfg.gdn_layers else ("attn", ATTN_HOOKS)
        for name in names:
            assert block_name(i, f"{mixer}.{name}") in model.hook_dict


def test_run_with_cache_shapes(model):
    cfg = model.cfg
    b, p = 2, 11
    H, Hk, dk, dv, D = cfg.n_value_heads, cfg.n_key_heads, cfg.d_key, cfg.d_value, cfg.d_model
    _, cache = model.run_with_cache(torch.randint(0, 101, (b, p)), names_filter=lambda n: True)
    gdn = block_name(cfg.gdn_layers[0], "linear_attn")
    attn = block_name(cfg.attention_layers[0], "attn")
    expected = {
        "hook_embed": (b, p, D),
        "blocks.0.hook_resid_pre": (b, p, D), "blocks.0.hook_attn_out": (b, p, D), "blocks.0.hook_mlp_out": (b, p, D),
        "blocks.0.mlp.hook_pre": (b, p, cfg.d_mlp), "blocks.0.mlp.hook_post": (b, p, cfg.d_mlp),
        f"{gdn}.hook_in": (b, p, D),
        f"{gdn}.hook_q_pre_conv": (b, p, Hk, dk), f"{gdn}.hook_k": (b, p, Hk, dk), f"{gdn}.hook_v": (b, p, H, dv),
        f"{gdn}.hook_beta_logit": (b, p, H), f"{gdn}.hook_beta": (b, p, H), f"{gdn}.hook_log_decay": (b, p, H),
        f"{gdn}.hook_read_query": (b, p, H, dk), f"{gdn}.hook_write_key": (b, p, H, dk),
        f"{gdn}.hook_write_value": (b, p, H, dv), f"{gdn}.hook_state": (b, p, H, dk, dv),
        f"{gdn}.hook_final_state": (b, H, dk, dv), f"{gdn}.hook_recurrence_out": (b, p, H, dv),
        f"{gdn}.hook_gate_input": (b, p, H, dv), f"{gdn}.hook_gated_out": (b, p, H, dv), f"{gdn}.hook_out": (b, p, D),
        f"{attn}.hook_q": (b, p, cfg.n_heads, cfg.d_head), f"{attn}.hook_k": (b, p, cfg.n_key_value_heads, cfg.d_head),
        f"{attn}.hook_attn_scores": (b, cfg.n_heads, p, p), f"{attn}.hook_pattern": (b, cfg.n_heads, p, p),
        f"{attn}.hook_z": (b, p, cfg.n_heads, cfg.d_head), f"{attn}.hook_gate": (b, p, cfg.n_heads, cfg.d_head),
    }
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    assert set(cache.keys()) == set(model.hook_dict)


def test_default_cache_leaves_out_states(model):
    _, cache = model.run_with_cache(torch.randint(0, 101, (1, 5)))
    assert not any(k.endswith("hook_state") for k in cache.keys())
    assert any(k.endswith("hook_final_state") for k in cache.keys())


def plain_recurrence(q, k, v, beta, g, n_value_heads):
    """docs/design.md §2 written out again, from the cached projections: returns (q̂, k̂, δ, S, o) over positions."""
    group = n_value_heads // q.shape[2]
    l2norm = lambda x: x / ((x * x).sum(-1, keepdim=True) + 1e-6).sqrt()  # eps inside the root, as transformers
    q_hat = l2norm(q.float().repeat_interleave(group, 2)) / q.shape[-1] ** 0.5
    k_hat = l2norm(k.float().repeat_interleave(group, 2))
    b, T, H, dk = k_hat.shape
    S = torch.zeros(b, H, dk, v.shape[-1])
    deltas, states, outs = [], [], []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        delta = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k_hat[:, t]))
        S = S + k_hat[:, t, :, :, None] * delta[:, :, None, :]
        deltas.append(delta)
        states.append(S)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q_hat[:, t]))
    return q_hat, k_hat, torch.stack(deltas, 1), torch.stack(states, 1), torch.stack(outs, 1)


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
@pytest.mark.parametrize("length", [1, 29, 70])
def test_state_and_write_hooks_equal_the_plain_recurrence(model, length):
    layer = model.cfg.gdn_layers[-1]
    site = block_name(layer, "linear_attn")
    _, cache = model.run_with_cache(torch.randint(0, 101, (2, length)), names_filter=lambda n: n.startswith(site))
    q_hat, k_hat, delta, states, out = plain_recurrence(
        cache[f"{site}.hook_q"], cache[f"{site}.hook_k"], cache[f"{site}.hook_v"].float(),
        cache[f"{site}.hook_beta"].float(), cache[f"{site}.hook_log_decay"], model.cfg.n_value_heads,
    )
    # the state grows like the sum of writes; compare relative to its scale
    close = lambda a, b: (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    assert close(cache[f"{site}.hook_read_query"], q_hat)
    assert close(cache[f"{site}.hook_write_key"], k_hat)
    assert close(cache[f"{site}.hook_write_value"], delta)
    assert close(cache[f"{site}.hook_state"], states)
    assert close(cache[f"{site}.hook_final_state"], states[:, -1])
    assert close(cache[f"{site}.hook_recurrence_out"], out)


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_state_positions_select_exactly_those_states(model):
    site = site_name(model.cfg.gdn_layers[0], "state")
    tokens = torch.randint(0, 101, (2, 90))
    _, full = model.run_with_cache(tokens, names_filter=site)
    _, some = model.run_with_cache(tokens, names_filter=site, state_positions=[0, 3, 64, -1])
    _, one = model.run_with_cache(tokens, names_filter=site, state_positions=70)
    assert some[site].shape[1] == 4 and one[site].shape[1] == 1
    assert torch.allclose(some[site], full[site][:, [0, 3, 64, 89]], atol=1e-6)
    assert torch.allclose(one[site][:, 0], full[site][:, 70], atol=1e-6)
    with pytest.raises(ValueError, match="state_positions"):
        model(tokens, state_positions=[90])


def test_observing_hooks_change_nothing(model):
    tokens = torch.randint(0, 101, (2, 40))
    clean = model(tokens)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
    with model.hooks(fwd_hooks=[(lambda n: True, lambda x, hook: x)]):
        hooked = model(tokens)
    # hooking the attention pattern swaps fused attention for explicit scores: equal up to rounding
    assert (clean - hooked).abs().max().item() <= 1e-5
    assert torch.allclose(cache["blocks.1.hook_resid_post"], model.run_with_cache(tokens)[1]["blocks.1.hook_resid_post"])


def test_string_input_without_a_tokenizer_is_rejected(model):
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        model("hello")


def test_unsupported_config_is_rejected():
    with pytest.raises(ValueError, match="qwen3_5_text"):
        HookedGatedDeltaNet.from_config(LlamaConfig(hidden_size=32, num_hidden_layers=1))


def test_unknown_hook_name_is_rejected(model):
    with pytest.raises(ValueError, match="unknown hook name"):
        model.run_with_hooks(torch.zeros(1, 3, dtype=torch.long), fwd_hooks=[("blocks.0.linear_attn.hook_nope", print)])
    with pytest.raises(ValueError, match="unknown hook name"):
        model.run_with_cache(torch.zeros(1, 3, dtype=torch.long), names_filter=["blocks.99.hook_resid_pre"])


def test_bad_inputs_are_rejected(model):
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 101\)"):
        model(torch.tensor([[5, 101]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))


def test_hook_returning_wrong_shape_is_named(model):
    name = site_name(model.cfg.gdn_layers[0], "write")
    with pytest.raises(ValueError, match="hook_write_value returned"):
        model.run_with_hooks(torch.zeros(1, 4, dtype=torch.long), fwd_hooks=[(name, lambda x, hook: x[:, :2])])


def test_states_are_formed_only_when_hooked(model, monkeypatch):
    import hooked_gdn.memory as memory

    asked = []
    real = memory.gated_delta_rule

    def recording(*args, **kwargs):
        asked.append(args[6])  # state_positions
        return real(*args, **kwargs)

    monkeypatch.setattr(memory, "gated_delta_rule", recording)
    tokens = torch.randint(0, 101, (1, 20))
    model(tokens)
    model.run_with_cache(tokens)  # the default cache leaves states out
    assert asked and all(p is None for p in asked)
    asked.clear()
    layer = model.cfg.gdn_layers[1]
    model.run_with_cache(tokens, names_filter=site_name(layer, "state"), state_positions=[3, 7])
    assert [None if p is None else p.tolist() for p in asked] == [None if i != layer else [3, 7] for i in model.cfg.gdn_layers]


def test_checkpoint_that_is_not_a_gdn_model_is_rejected(tmp_path):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=50)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"unsupported model type 'llama': the supported families are Qwen3\.5 .*Mamba-2 \(mamba2\)"):
        HookedGatedDeltaNet.from_pretrained(tmp_path / "llama")


def test_stop_at_layer_returns_the_residual_stream_there(model):
    tokens = torch.randint(0, 101, (2, 15))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    stopped = model(tokens, stop_at_layer=2)
    assert torch.equal(stopped, cache["blocks.1.hook_resid_post"])


@pytest.mark.parametrize("positions, error, message", [
    ([5, 1], ValueError, "must be increasing"),
    ([-1, 2], ValueError, "must be increasing"),
    ([1, 1], ValueError, "repeat a position"),
    ([1, -7], ValueError, "repeat a position"),
    ([1.0, 2.0], TypeError, "integer positions"),
    (torch.tensor([1.5]), TypeError, "integer positions"),
    (torch.ones(8, dtype=torch.bool), TypeError, "boolean mask"),
    (True, TypeError, "integer positions"),
])
def test_state_positions_are_never_reinterpreted(model, positions, error, message):
    site = site_name(model.cfg.gdn_layers[0], "state")
    with pytest.raises(error, match=message):
        model.run_with_cache(torch.randint(0, 101, (1, 8)), names_filter=site, state_positions=positions)


def test_state_positions_keep_the_order_given(model):
    site = site_name(model.cfg.gdn_layers[0], "state")
    tokens = torch.randint(0, 101, (1, 8))
    _, every = model.run_with_cache(tokens, names_filter=site)
    for positions, rows in (([2, -1], [2, 7]), (torch.tensor([0, 5]), [0, 5]), (3, [3])):
        _, cache = model.run_with_cache(tokens, names_filter=site, state_positions=positions)
        # every state comes from the recurrence's step, chosen ones from the chunk's closed form: equal to fp32 rounding
        torch.testing.assert_close(cache[site], every[site][:, rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", [[[1, 2, 1]], [[1, 0.5, 1]], [[1, -1, 1]]])
def test_attention_mask_must_be_zeros_and_ones(model, mask):
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(padding\) and 1"):
        model(torch.tensor([[3, 4, 5]]), attention_mask=torch.tensor(mask))


def test_boolean_and_float_zero_one_masks_are_masks(model):
    tokens = torch.tensor([[3, 4, 5], [6, 7, 8]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    expected = model(tokens, attention_mask=mask)
    assert torch.equal(model(tokens, attention_mask=mask.bool()), expected)
    assert torch.equal(model(tokens, attention_mask=mask.float()), expected)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_hook_returning_a_non_float_tensor_is_refused(model, dtype):
    name = site_name(model.cfg.gdn_layers[0], "write")
    with pytest.raises(TypeError, match=f"hook_write_value returned a tensor of dtype {dtype}"):
        model.run_with_hooks(torch.zeros(1, 4, dtype=torch.long), fwd_hooks=[(name, lambda x, hook: x.to(dtype))])
    with pytest.raises(TypeError, match="hook_resid_post returned a tensor of dtype"):
        model.run_with_hooks(torch.zeros(1, 4, dtype=torch.long), fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x.to(dtype))])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_tokens_of_any_integer_dtype_are_token_ids(model, dtype):
    tokens = torch.tensor([[3, 40, 100, 7]])
    assert torch.equal(model(tokens.to(dtype)), model(tokens))


def test_empty_input_and_one_position_loss_are_refused(model):
    for tokens in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long)):
        with pytest.raises(ValueError, match="the input has no tokens"):
            model(tokens)
    with pytest.raises(ValueError, match="needs at least 2 positions"):
        model(torch.tensor([[5]]), "loss")
    with pytest.raises(ValueError, match="no position whose token and next token are both unmasked"):
        model(torch.tensor([[5, 6, 7]]), "loss", attention_mask=torch.tensor([[0, 0, 1]]))


@pytest.mark.parametrize("option", [{"hidden_act": "gelu"}, {"attention_bias": True}])
def test_options_the_layers_do_not_implement_are_refused(option):
    from .conftest import tiny_hf_config

    (name, value), = option.items()
    with pytest.raises(ValueError, match=f"unsupported {name}={value!r}"):
        HookedGatedDeltaNet.from_config(tiny_hf_config(**option))


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_no_state_positions_cache_no_states(model):
    site = site_name(model.cfg.gdn_layers[0], "state")
    tokens = torch.randint(0, 101, (2, 20))
    _, cache = model.run_with_cache(tokens, names_filter=site, state_positions=[])  # [] reads as a float tensor
    assert cache[site].shape[:2] == (2, 0)
    assert torch.equal(model(tokens, state_positions=[]), model(tokens))
