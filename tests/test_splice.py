"""SAEs attached to the model: splicing with carry semantics, patching their features, errors."""

from __future__ import annotations

import pytest
import torch

from writesae import BilinearMatrixSAE, FlatSAE
from writesae.splice import HookedSAEGatedDeltaNet

from .conftest import random_tiny_model


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(HookedSAEGatedDeltaNet)


def make_sae(model, kind="hook_state", heads="all", cls=BilinearMatrixSAE, **kwargs):
    layer = model.cfg.gdn_layers[1]
    return cls(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=24, k=4, sparsity="topk",
               site=f"blocks.{layer}.linear_attn.{kind}", heads=heads, n_heads=model.cfg.n_value_heads, **kwargs)


TOKENS = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["hook_state", "hook_write_value"])
@pytest.mark.parametrize("recurrence", ["parallel", "sequential"])
def test_error_term_leaves_logits_unchanged(model, kind, recurrence):
    sae = make_sae(model, kind)
    with torch.no_grad():
        clean = model(TOKENS)
        spliced = model.run_with_saes(TOKENS, saes=[sae], use_error_term=True, recurrence=recurrence)
        without_error = model.run_with_saes(TOKENS, saes=[sae], use_error_term=False, recurrence=recurrence)
    assert (spliced - clean).abs().max().item() <= 1e-5
    assert (without_error - clean).abs().max().item() > 1e-4  # a random SAE does change the model


def test_zeroing_a_feature_changes_logits_from_the_spliced_position_on(model):
    t = 12
    sae = make_sae(model, heads=[1, 2])
    acts = f"{sae.cfg.site}.sae.hook_sae_acts_post"
    with torch.no_grad():
        clean, cache = model.run_with_cache_with_saes(TOKENS, saes=[sae], use_error_term=True, state_positions=[t], names_filter=acts)
        codes = cache[acts]  # [b, 1, n_heads, n_features]
        assert codes.shape == (2, 1, 2, 24)
        feature = int(codes[0, 0, 0].argmax())
        assert codes[0, 0, 0, feature] > 0

        def zero_feature(a, hook):
            a = a.clone()
            a[..., feature] = 0
            return a

        with model.saes([sae], use_error_term=True):
            patched = model.run_with_hooks(TOKENS, fwd_hooks=[(acts, zero_feature)], state_positions=[t])
    assert (patched[:, :t] - clean[:, :t]).abs().max().item() <= 1e-6
    assert (patched[0, t] - clean[0, t]).abs().max().item() > 1e-5
    assert (patched[0, -1] - clean[0, -1]).abs().max().item() > 1e-6


def test_write_splice_adds_the_reconstruction_error_of_the_write(model):
    t, head = 9, 3
    sae = make_sae(model, "hook_write_value", heads=head)
    site = f"blocks.{model.cfg.gdn_layers[1]}.linear_attn"
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter=[f"{site}.hook_write_key", f"{site}.hook_write_value"])
        k = cache[f"{site}.hook_write_key"][:, t, head]
        delta = cache[f"{site}.hook_write_value"][:, t, head]
        write = k[:, :, None] * delta[:, None, :]
        difference = sae(write[:, None])[:, 0] - write

        def add(states, hook):
            states = states.clone()
            states[:, 0, head] += difference
            return states

        by_hand = model.run_with_hooks(TOKENS, fwd_hooks=[(f"{site}.hook_state", add)], state_positions=[t])
        spliced = model.run_with_saes(TOKENS, saes=[sae], state_positions=[t])
        in_the_loop = model.run_with_saes(TOKENS, saes=[sae], state_positions=[t], recurrence="sequential")
    assert (spliced - by_hand).abs().max().item() <= 1e-5
    assert (in_the_loop - by_hand).abs().max().item() <= 1e-4


def test_sae_hook_points_are_named_under_the_site_and_removed_on_reset(model):
    sae = make_sae(model, cls=FlatSAE, heads=0)
    with torch.no_grad():
        clean = model(TOKENS)
    model.add_sae(sae)
    names = [n for n in model.hook_dict if ".sae." in n]
    assert f"{sae.cfg.site}.sae.hook_sae_acts_post" in names and len(names) == 6
    model.reset_saes()
    assert not any(".sae." in n for n in model.hook_dict)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), clean)
        assert not model.blocks[model.cfg.gdn_layers[1]].linear_attn.hook_state.fwd_hooks


def test_attach_errors_are_clear(model):
    gdn, attn = model.cfg.gdn_layers[1], model.cfg.attention_layers[0]
    kw = dict(n_features=8, k=2, n_heads=model.cfg.n_value_heads)
    with pytest.raises(ValueError, match="d_k"):
        model.add_sae(BilinearMatrixSAE(d_k=5, d_v=model.cfg.d_value, site=f"blocks.{gdn}.linear_attn.hook_state", **kw))
    with pytest.raises(ValueError, match="site"):
        model.add_sae(BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, site="blocks.0.hook_resid_pre", **kw))
    with pytest.raises(ValueError, match="not a GDN layer"):
        model.add_sae(BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, site=f"blocks.{attn}.linear_attn.hook_state", **kw))
    with pytest.raises(ValueError, match="heads"):
        model.add_sae(BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, site=f"blocks.{gdn}.linear_attn.hook_state",
                                        heads=[0], n_features=8, k=2, n_heads=7))
    assert not model.acts_to_saes


def test_readme_splice_example_runs():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- readme-example: splice-and-patch -->\n```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert torch.allclose(namespace["logits"], namespace["clean"], atol=1e-5)
    t, shift = namespace["t"], namespace["shift"]
    assert (shift[:t] < 1e-6).all() and shift[t] > 0
