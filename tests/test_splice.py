"""SAEs attached to the model: splicing with carry semantics, patching their features, errors."""

from __future__ import annotations

import pytest
import torch

from hooked_gdn.sites import gdn_hook_name, site_name
from writesae import BilinearMatrixSAE, FlatSAE, load_sae, save_sae
from writesae.splice import HookedSAEGatedDeltaNet

from .conftest import FAMILIES, random_tiny_model


@pytest.fixture(name="model", scope="module")
def model_fixture(request):
    """The "grouped" tiny model; a test runs on every family with ``parametrize("model", FAMILIES, indirect=True)``."""
    return random_tiny_model(HookedSAEGatedDeltaNet, getattr(request, "param", "grouped"))


def make_sae(model, kind="state", heads="all", cls=BilinearMatrixSAE, **kwargs):
    return cls(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=24, k=4, sparsity="topk",
               site=site_name(model.cfg.gdn_layers[1], kind), heads=heads, seed=0, **kwargs)


TOKENS = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
@pytest.mark.parametrize("kind", ["state", "write"])
@pytest.mark.parametrize("recurrence", ["parallel", "sequential"])
def test_error_term_leaves_logits_unchanged(model, kind, recurrence):
    sae = make_sae(model, kind)
    with torch.no_grad():
        clean = model(TOKENS)
        spliced = model.run_with_saes(TOKENS, saes=[sae], use_error_term=True, recurrence=recurrence)
        without_error = model.run_with_saes(TOKENS, saes=[sae], use_error_term=False, recurrence=recurrence)
    assert (spliced - clean).abs().max().item() <= 1e-5
    assert (without_error - clean).abs().max().item() > 1e-4  # a random SAE does change the model


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
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
    sae = make_sae(model, "write", heads=head)
    layer = model.cfg.gdn_layers[1]
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter=[gdn_hook_name(layer, "hook_write_key"),
                                                              gdn_hook_name(layer, "hook_write_value")])
        k = cache["write_key", layer][:, t, head]
        delta = cache["write_value", layer][:, t, head]
        write = k[:, :, None] * delta[:, None, :]
        difference = sae(write[:, None])[:, 0] - write

        def add(states, hook):
            states = states.clone()
            states[:, 0, head] += difference
            return states

        by_hand = model.run_with_hooks(TOKENS, fwd_hooks=[(site_name(layer, "state"), add)], state_positions=[t])
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
    kw = dict(n_features=8, k=2, heads="all")
    valid = ", ".join(site_name(layer, kind) for layer in model.cfg.gdn_layers for kind in ("state", "write"))
    with pytest.raises(ValueError, match="d_k"):
        model.add_sae(BilinearMatrixSAE(d_k=5, d_v=model.cfg.d_value, site=site_name(gdn, "state"), **kw))
    for bad in ("blocks.0.hook_resid_pre", site_name(attn, "state")):  # one error, listing the sites
        with pytest.raises(ValueError) as error:
            model.add_sae(BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, site=bad, **kw))
        assert str(error.value) == f"the SAE's site does not exist on custom: {bad!r} is not an SAE site; the sites are {valid}"
    with pytest.raises(ValueError, match="made for a site of 7 heads; this site has 4"):
        model.add_sae(BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, site=site_name(gdn, "state"),
                                        heads=[0], n_features=8, k=2, n_heads=7))
    with pytest.raises(ValueError, match=rf"the SAE's head\(s\) \[5\] do not exist in GDN layer {gdn}: its value heads are 0 … 3"):
        model.add_sae(BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, site=site_name(gdn, "state"),
                                        heads=[5], n_features=8, k=2))
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


@pytest.mark.parametrize("entry", ["run_with_saes", "run_with_cache_with_saes", "saes", "add_sae"])
@pytest.mark.parametrize("own", [False, True])
def test_use_error_term_given_for_a_call_ends_with_it(model, entry, own):
    """A per-call ``use_error_term`` holds only while the SAE is attached, as in SAELens: a later splice
    without it must use the SAE's own setting, not silently reproduce the clean model."""
    sae = make_sae(model)
    sae.use_error_term = own
    with torch.no_grad():
        expected = model.run_with_saes(TOKENS, saes=[sae])
        if entry == "run_with_saes":
            model.run_with_saes(TOKENS, saes=[sae], use_error_term=not own)
        elif entry == "run_with_cache_with_saes":
            model.run_with_cache_with_saes(TOKENS, saes=[sae], use_error_term=not own)
        elif entry == "saes":
            with pytest.raises(RuntimeError, match="inside"), model.saes([sae], use_error_term=not own):
                assert sae.use_error_term is (not own)
                raise RuntimeError("inside")  # restored on the way out of an error too
        else:
            model.add_sae(sae, use_error_term=not own)
            assert sae.use_error_term is (not own)
            model.reset_saes()
        assert sae.use_error_term is own
        assert torch.equal(model.run_with_saes(TOKENS, saes=[sae]), expected)


@pytest.fixture(name="tiny", scope="module")
def tiny_fixture(tmp_path_factory):
    from .test_transformer_lens_tools import tiny_models

    return tiny_models(tmp_path_factory, HookedSAEGatedDeltaNet)


def vector_sae(model, hook: str, d: int, folder) -> FlatSAE:
    """A vector SAE at ``hook`` as `load_sae` reads one from an SAELens folder (written here in SAELens' format)."""
    save_sae(FlatSAE(d_k=1, d_v=d, n_features=4 * d, k=3, site=hook, seed=0), folder, format="saelens")
    sae = load_sae(folder)
    assert (sae.cfg.d_k, sae.cfg.d_v, sae.cfg.site) == (1, d, hook)
    return sae


def as_vector_hook(sae, heads_flattened: bool = False):
    """The SAE's own forward at its hook as a plain hook, on each vector x as X = xᵀ (a hook_z's heads flattened)."""
    def hook(x, hook):
        lead = x.shape[:-2] if heads_flattened else x.shape[:-1]
        return sae(x.reshape(*lead, 1, 1, -1)).reshape(x.shape)

    return [(sae.cfg.site, hook)]


@pytest.mark.parametrize("family", ["qwen3_5", "mamba2", "rwkv7"])
def test_a_vector_sae_from_an_saelens_folder_splices_at_its_hook(tiny, family, tmp_path):
    """An SAELens SAE of a vector activation, loaded by load_sae (no sae-lens needed: the TransformerLens 4
    environment), splices at its hook as its own forward does there as a hook, error term and all, on the residual
    stream and on a point inside the memory in both recurrence modes; its hook points sit under <hook>.sae."""
    model = tiny(family)
    tokens = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    stream = f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"
    sae = vector_sae(model, stream, model.cfg.d_model, tmp_path / "stream")
    clean = model(tokens)
    spliced = model.run_with_saes(tokens, saes=[sae])
    torch.testing.assert_close(spliced, model.run_with_hooks(tokens, fwd_hooks=as_vector_hook(sae)), rtol=0, atol=0)
    assert (spliced - clean).abs().max() > 1e-2
    torch.testing.assert_close(model.run_with_saes(tokens, saes=[sae], use_error_term=True), clean, rtol=0, atol=1e-4)
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names_filter=lambda name: name.startswith(stream))
    assert cache[f"{stream}.sae.hook_sae_acts_post"].shape == (*tokens.shape, 1, 4 * model.cfg.d_model)
    assert not model.acts_to_saes and torch.equal(model(tokens), clean)

    gated = "blocks.0.linear_attn.hook_gated_out"
    _, inner = model.run_with_cache(tokens, names_filter=gated)
    sae = vector_sae(model, gated, inner[gated].shape[-1], tmp_path / "gated")
    runs = [model.run_with_saes(tokens, saes=[sae], recurrence=recurrence) for recurrence in ("parallel", "sequential")]
    torch.testing.assert_close(runs[0], model.run_with_hooks(tokens, fwd_hooks=as_vector_hook(sae)), rtol=0, atol=1e-6)
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-5)


def test_a_vector_sae_reads_an_attention_layers_heads_flattened(tiny, tmp_path):
    """At an attention layer's hook_z [b, p, heads, d_head] a vector SAE of heads × d_head reads the heads flattened,
    as SAELens' hook_z SAEs do."""
    model = tiny("qwen3_5")
    layer = next(L for L, block in enumerate(model.blocks) if not block.is_gdn)
    hook = f"blocks.{layer}.attn.hook_z"
    tokens = torch.tensor([[3, 5, 8, 13, 2]])
    _, clean = model.run_with_cache(tokens, names_filter=hook)
    sae = vector_sae(model, hook, clean[hook].shape[-2] * clean[hook].shape[-1], tmp_path)
    spliced = model.run_with_saes(tokens, saes=[sae])
    torch.testing.assert_close(spliced, model.run_with_hooks(tokens, fwd_hooks=as_vector_hook(sae, heads_flattened=True)),
                               rtol=0, atol=0)
    assert (spliced - model(tokens)).abs().max() > 1e-3


def test_vector_sae_refusals(tiny):
    model = tiny("qwen3_5")
    tokens = torch.tensor([[3, 5, 8]])
    wide = FlatSAE(d_k=1, d_v=model.cfg.d_model + 1, n_features=8, k=2, site="blocks.1.hook_resid_post", seed=0)
    with pytest.raises(ValueError, match=r"reads vectors of 49, but its value \(1, 3, 48\) has 48 on its last axis \(and "
                                         r"not 49 on its last two\)"):
        model.run_with_saes(tokens, saes=[wide])
    head = FlatSAE(d_k=1, d_v=model.cfg.d_model, n_features=8, k=2, site="blocks.1.hook_resid_post", heads=2, n_heads=4,
                   seed=0)
    with pytest.raises(ValueError, match="reads heads \\[2\\]: a vector SAE is one dictionary"):
        model.add_sae(head)
    assert not model.acts_to_saes
