"""The sparse MoE block's hook points, against transformers' router and a hand computation of the experts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hooked_gdn.sites import MOE_HOOKS, block_name, moe_hook_name

TOKENS = torch.randint(0, 101, (2, 23), generator=torch.Generator().manual_seed(0))


def moe_cache(model, tokens=TOKENS):
    names = [moe_hook_name(layer, hook) for layer in model.cfg.moe_layers for hook in MOE_HOOKS]
    names += [block_name(layer, name) for layer in model.cfg.moe_layers for name in ("hook_mlp_out", "hook_resid_mid")]
    return model.run_with_cache(tokens, names_filter=names)


@pytest.mark.parametrize("name", ["qwen3_5_moe", "qwen3_next"])
def test_moe_hooks_have_their_shapes_and_transformers_router_values(make_pair, name):
    hf, ours = make_pair(name)
    cfg = ours.cfg
    b, p, E, k = *TOKENS.shape, cfg.n_experts, cfg.n_experts_per_token
    with torch.no_grad():
        theirs = hf(TOKENS, output_router_logits=True).router_logits  # one [b·p, E] per MoE layer
        _, cache = moe_cache(ours)
    assert len(theirs) == len(cfg.moe_layers) == (4 if name == "qwen3_5_moe" else 3)
    for layer, their_logits in zip(cfg.moe_layers, theirs):
        logits, indices = cache["router_logits", layer], cache["expert_indices", layer]
        weights = cache["topk_weights", layer]
        assert logits.shape == (b, p, E) and indices.shape == weights.shape == (b, p, k) and indices.dtype == torch.long
        assert cache["shared_expert_gate", layer].shape == (b, p, 1)
        assert (logits.flatten(0, 1) - their_logits).abs().max().item() <= 1e-5
        their_probs = their_logits.softmax(-1).view(b, p, E)
        assert torch.equal(indices, their_probs.topk(k, -1).indices)
        chosen = their_probs.gather(-1, indices)
        expected = chosen / chosen.sum(-1, keepdim=True) if cfg.norm_topk_prob else chosen
        assert (weights - expected).abs().max().item() <= 1e-6
        total = cache["experts_out", layer] + cache["shared_expert_gate", layer] * cache["shared_expert_out", layer]
        assert (cache["mlp_out", layer] - total).abs().max().item() <= 1e-6


def test_forcing_the_chosen_experts_in_another_order_changes_nothing(make_pair):
    _, ours = make_pair("qwen3_5_moe")
    layer = ours.cfg.moe_layers[1]
    with torch.no_grad():
        clean = ours(TOKENS)
        reordered = ours.run_with_hooks(TOKENS, fwd_hooks=[(moe_hook_name(layer, "hook_expert_indices"),
                                                           lambda indices, hook: indices.flip(-1))])
    assert (reordered - clean).abs().max().item() <= 1e-6  # each weight follows its expert


def test_forcing_other_experts_equals_a_hand_computation_with_them(make_pair):
    hf, ours = make_pair("qwen3_5_moe")
    layer, t = ours.cfg.moe_layers[2], 9
    with torch.no_grad():
        clean, cache = moe_cache(ours)
        least_likely = cache["router_logits", layer][:, t].topk(2, -1, largest=False).indices  # [b, 2], never chosen

        def force(indices, hook):
            indices = indices.clone()
            indices[:, t] = least_likely
            return indices

        with ours.hooks(fwd_hooks=[(moe_hook_name(layer, "hook_expert_indices"), force)]):
            forced, forced_cache = moe_cache(ours)
        # by hand, from transformers' own weights of that layer
        theirs = hf.model.layers[layer]
        x = theirs.post_attention_layernorm(cache["resid_mid", layer][:, t])  # [b, d_model]
        probs = F.linear(x, theirs.mlp.gate.weight).softmax(-1)
        expected = torch.sigmoid(theirs.mlp.shared_expert_gate(x)) * theirs.mlp.shared_expert(x)
        weights = probs.gather(-1, least_likely)
        weights = weights / weights.sum(-1, keepdim=True)
        for i in range(2):
            for row, e in enumerate(least_likely[:, i].tolist()):
                gate, up = F.linear(x[row], theirs.mlp.experts.gate_up_proj[e]).chunk(2, -1)
                expected[row] += weights[row, i] * F.linear(F.silu(gate) * up, theirs.mlp.experts.down_proj[e])
    assert not (least_likely[:, :, None] == cache["expert_indices", layer][:, t, None, :]).any()
    assert (forced_cache["mlp_out", layer][:, t] - expected).abs().max().item() <= 1e-5
    assert (forced_cache["mlp_out", layer][:, t] - cache["mlp_out", layer][:, t]).abs().max().item() > 1e-3
    assert (forced[:, :t] - clean[:, :t]).abs().max().item() <= 1e-6  # causal: earlier positions untouched
    assert (forced[:, t] - clean[:, t]).abs().max().item() > 1e-4


def test_editing_the_router_reroutes_as_in_transformers(make_pair):
    hf, ours = make_pair("qwen3_next")
    layer = ours.cfg.moe_layers[0]
    with torch.no_grad():
        clean, cache = moe_cache(ours)
        ours.blocks[layer].mlp.router.neg_()  # the least likely experts become the most likely
        hf.model.layers[layer].mlp.gate.weight.neg_()
        edited, edited_cache = moe_cache(ours)
        expected = hf(TOKENS).logits
    assert (edited - expected).abs().max().item() <= 1e-4
    assert (edited - clean).abs().max().item() > 1e-3
    assert not torch.equal(edited_cache["expert_indices", layer], cache["expert_indices", layer])


def test_expert_index_edits_must_be_integers_in_range(make_pair):
    _, ours = make_pair("qwen3_5_moe")
    name = moe_hook_name(ours.cfg.moe_layers[0], "hook_expert_indices")
    with pytest.raises(TypeError, match="must return an integer tensor"):
        ours.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda indices, hook: indices.float())])
    with pytest.raises(ValueError, match=r"expert indices must lie in \[0, 6\)"):
        ours.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda indices, hook: indices + 6)])
    with pytest.raises(ValueError, match="not an MoE hook point"):
        moe_hook_name(0, "hook_expert_weights")
