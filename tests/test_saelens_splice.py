"""SAELens' own SAEs and transcoders attached to our models as SAELens' ``HookedSAETransformer`` attaches them
(`writesae.saelens_splice`): ``add_sae``, ``saes``, ``run_with_saes``, ``run_with_cache_with_saes``,
``run_with_hooks_with_saes`` and ``reset_saes``, on a GDN hybrid, Mamba-2 and RWKV-7.

The references are SAELens' own: its SAE's ``forward`` (which applies the error term as its wrapper does) run as
a plain hook at the same point, and the cache names ``HookedSAETransformer`` gives a TransformerLens model.

sae-lens needs transformer-lens<4: these tests run in the TransformerLens 3.x subset of .ci/run and are skipped
where sae-lens is not importable.
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not importable here (it needs transformer-lens<4): "
                                                  "the TransformerLens 3.x subset of .ci/run installs it")
from transformer_lens import HookedTransformerConfig  # noqa: E402

from hooked_gdn.sites import site_name  # noqa: E402
from writesae import FlatSAE, load_sae  # noqa: E402
from writesae.splice import HookedSAEGatedDeltaNet  # noqa: E402

from .test_transformer_lens_tools import tiny_models  # noqa: E402

FAMILIES = ("qwen3_5", "mamba2", "rwkv7")
WITH_MLP = ("qwen3_5", "rwkv7")
TOKENS = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(name="tiny", scope="module")
def tiny_fixture(tmp_path_factory):
    return tiny_models(tmp_path_factory, HookedSAEGatedDeltaNet)


def saelens_sae(hook: str, d_in: int, kind: str = "topk", seed: int = 0, **config):
    """An SAELens SAE at ``hook`` with random weights large enough that splicing it changes the logits."""
    d_sae = 4 * d_in
    if kind == "topk":
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=3, **config))
    elif kind == "standard":
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d_in, d_sae=d_sae, **config))
    else:
        sae = sae_lens.Transcoder(sae_lens.TranscoderConfig(d_in=d_in, d_sae=d_sae, d_out=d_in,
                                                            apply_b_dec_to_input=False, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
    sae.cfg.metadata.hook_name = hook
    return sae


def transcoder(d: int, read: str, replaced: str, seed: int = 0):
    sae = saelens_sae(read, d, kind="transcoder", seed=seed)
    sae.cfg.metadata.hook_name_out = replaced
    return sae


def as_hook(sae, error_term: bool = False):
    """SAELens' own SAE forward at its point, as a plain hook, with or without its error term: the reference for a
    splice."""

    def forward(x, hook):
        own = sae.use_error_term
        with warnings.catch_warnings():  # SAELens deprecates setting it on the SAE in favour of add_sae's argument
            warnings.simplefilter("ignore", DeprecationWarning)
            sae.use_error_term = error_term
            try:
                return sae(x)
            finally:
                sae.use_error_term = own

    return [(sae.cfg.metadata.hook_name, forward)]


def transcoder_hooks(tc, error_term: bool):
    """A transcoder as plain hooks (its input kept, its output replaced), with SAELens' error term."""
    kept = {}

    def keep(x, hook):
        kept["x"] = x

    def replace(out, hook):
        recons = tc.decode(tc.encode(kept["x"]))
        with torch.no_grad():
            error = out - tc.decode(tc.encode(kept["x"]))
        return recons + error if error_term else recons

    return [(tc.cfg.metadata.hook_name, keep), (tc.cfg.metadata.hook_name_out, replace)]


def sae_names(cache, point: str) -> set[str]:
    """The cached names under ``point`` (an SAE's output hook), less the prefix."""
    return {name.removeprefix(point) for name in cache.keys() if name.startswith(point + ".")}


@pytest.mark.parametrize("error_term", [False, True])
def test_cache_names_are_hooked_sae_transformers(tiny, error_term):
    """The hook points an attached SAE and transcoder add are those SAELens' HookedSAETransformer adds to a
    TransformerLens model, by name, with and without the error term; none is left after the run."""
    reference = sae_lens.HookedSAETransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=32, act_fn="relu", d_vocab=20))
    model = tiny("qwen3_5")
    cases = ((lambda d, L: saelens_sae(f"blocks.{L}.hook_resid_post", d), "blocks.{}.hook_resid_post"),
             (lambda d, L: transcoder(d, f"blocks.{L}.hook_resid_mid", f"blocks.{L}.hook_mlp_out"), "blocks.{}.hook_mlp_out"))
    for make, point in cases:
        _, theirs = reference.run_with_cache_with_saes(torch.randint(0, 20, (1, 5)), saes=[make(16, 0)],
                                                       use_error_term=error_term)
        _, ours = model.run_with_cache_with_saes(TOKENS, saes=[make(model.cfg.d_model, 1)], use_error_term=error_term)
        expected = sae_names(theirs, point.format(0))
        assert {".hook_sae_input", ".hook_sae_acts_post", ".hook_sae_output"} <= expected
        assert (".hook_sae_error" in expected) == error_term
        assert sae_names(ours, point.format(1)) == expected
    assert not model.acts_to_saes and not [name for name in model.hook_dict if "hook_sae" in name]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["topk", "standard"])
@pytest.mark.parametrize("error_term", [False, True])
def test_splice_is_saelens_forward(tiny, family, kind, error_term):
    """Spliced into the residual stream, an SAELens SAE gives the logits its own forward gives as a hook there
    (the error term's too), its cached features are its encoding of the clean stream, hooks on the point see the
    splice, and detaching it leaves the model and the SAE as they were."""
    model = tiny(family)
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"
    sae = saelens_sae(hook, model.cfg.d_model, kind)
    clean = model(TOKENS)
    _, clean_cache = model.run_with_cache(TOKENS, names_filter=hook)
    spliced = model.run_with_saes(TOKENS, saes=sae, use_error_term=error_term)
    torch.testing.assert_close(spliced, model.run_with_hooks(TOKENS, fwd_hooks=as_hook(sae, error_term)), rtol=0, atol=1e-6)
    if error_term:
        torch.testing.assert_close(spliced, clean, rtol=0, atol=1e-4)
    else:
        assert (spliced - clean).abs().max() > 1e-2
    seen = {}
    model.add_hook(hook, lambda x, hook: seen.update(x=x.clone()))  # before the SAE: it still sees the splice
    try:
        _, cache = model.run_with_cache_with_saes(TOKENS, saes=sae, use_error_term=error_term,
                                                  names_filter=lambda name: name.startswith(hook))
    finally:
        model.reset_hooks()
    torch.testing.assert_close(seen["x"], cache[f"{hook}.hook_sae_output"], rtol=0, atol=0)
    torch.testing.assert_close(cache[f"{hook}.hook_sae_acts_post"], sae.encode(clean_cache[hook]))
    torch.testing.assert_close(cache[hook], cache[f"{hook}.hook_sae_output"], rtol=0, atol=0)
    assert sae.use_error_term is False and not model.acts_to_saes  # the SAE's own setting, untouched
    torch.testing.assert_close(model(TOKENS), clean, rtol=0, atol=0)


def test_feature_edits_reach_the_output_past_the_error_term(tiny):
    """With the error term, zeroing a feature by a hook changes the point's value by that feature's decoded share,
    as in SAELens (its error is the clean reconstruction's, formed with the SAE's hooks off)."""
    model = tiny("qwen3_5")
    hook = "blocks.1.hook_resid_post"
    sae = saelens_sae(hook, model.cfg.d_model, "standard")
    _, clean = model.run_with_cache(TOKENS, names_filter=hook)
    feature = int(sae.encode(clean[hook]).sum((0, 1)).argmax())

    def zero(acts, hook):
        acts[..., feature] = 0

    with model.saes([sae], use_error_term=True), model.hooks(fwd_hooks=[(f"{hook}.hook_sae_acts_post", zero)]):
        _, cache = model.run_with_cache(TOKENS, names_filter=hook)
    acts = sae.encode(clean[hook])
    share = acts[..., feature, None] * sae.W_dec[feature]
    torch.testing.assert_close(cache[hook], clean[hook] - share, rtol=0, atol=1e-5)
    assert share.abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_point_in_both_recurrence_modes(tiny, family):
    """At a point inside the memory, whose edits are carried (the write's value), the splice gives SAELens'
    forward's logits in the parallel and the sequential recurrence (where it runs once a position), and the two
    modes agree, features and all."""
    model = tiny(family)
    hook = "blocks.0.linear_attn.hook_write_value"
    _, clean = model.run_with_cache(TOKENS, names_filter=hook)
    sae = saelens_sae(hook, clean[hook].shape[-1])
    logits, caches = {}, {}
    for recurrence in ("parallel", "sequential"):
        logits[recurrence] = model.run_with_saes(TOKENS, saes=[sae], recurrence=recurrence)
        reference = model.run_with_hooks(TOKENS, fwd_hooks=as_hook(sae), recurrence=recurrence)
        torch.testing.assert_close(logits[recurrence], reference, rtol=0, atol=1e-6)
        _, caches[recurrence] = model.run_with_cache_with_saes(TOKENS, saes=[sae], recurrence=recurrence,
                                                               names_filter=lambda name: name.startswith(hook))
    (parallel, sequential), (parallel_cache, sequential_cache) = logits.values(), caches.values()
    torch.testing.assert_close(sequential, parallel, rtol=0, atol=1e-5)
    torch.testing.assert_close(sequential_cache[f"{hook}.hook_sae_acts_post"],
                               parallel_cache[f"{hook}.hook_sae_acts_post"], rtol=1e-4, atol=1e-4)
    assert (parallel - model(TOKENS)).abs().max() > 1e-3


def test_hook_z_sae_flattens_the_heads(tiny):
    """An attention layer's hook_z SAE reads heads × d_head, flattened by SAELens' own reshaping."""
    model = tiny("qwen3_5")
    layer = next(L for L in range(model.cfg.n_layers) if L not in model.cfg.gdn_layers)
    hook = f"blocks.{layer}.attn.hook_z"
    _, clean = model.run_with_cache(TOKENS, names_filter=hook)
    heads, d_head = clean[hook].shape[-2:]
    sae = saelens_sae(hook, heads * d_head, reshape_activations="hook_z")
    spliced = model.run_with_saes(TOKENS, saes=[sae])
    _, cache = model.run_with_cache_with_saes(TOKENS, saes=[sae])
    torch.testing.assert_close(spliced, model.run_with_hooks(TOKENS, fwd_hooks=as_hook(sae)), rtol=0, atol=1e-6)
    assert cache[f"{hook}.hook_sae_acts_post"].shape == (*TOKENS.shape, 4 * heads * d_head)


@pytest.mark.parametrize("family", WITH_MLP)
@pytest.mark.parametrize("error_term", [False, True])
def test_transcoder_reads_one_point_and_replaces_another(tiny, family, error_term):
    model = tiny(family)
    tc = transcoder(model.cfg.d_model, "blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    spliced = model.run_with_saes(TOKENS, saes=[tc], use_error_term=error_term)
    _, cache = model.run_with_cache_with_saes(TOKENS, saes=[tc], use_error_term=error_term)
    torch.testing.assert_close(spliced, model.run_with_hooks(TOKENS, fwd_hooks=transcoder_hooks(tc, error_term)),
                               rtol=0, atol=1e-6)
    assert (spliced - model(TOKENS)).abs().max() > 1e-2 or error_term
    assert "blocks.1.hook_mlp_out.hook_sae_acts_post" in cache
    assert model.acts_to_saes == {}


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_an_attached_sae(tiny, family):
    """Generation continues the cache with the SAE spliced at every step, as under SAELens' forward as a hook."""
    model = tiny(family)
    sae = saelens_sae(f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre", model.cfg.d_model)
    with model.saes([sae]):
        spliced = model.generate(TOKENS[:1], max_new_tokens=5, stop_at_eos=False, verbose=False)
    with model.hooks(fwd_hooks=as_hook(sae)):
        reference = model.generate(TOKENS[:1], max_new_tokens=5, stop_at_eos=False, verbose=False)
    torch.testing.assert_close(spliced, reference, rtol=0, atol=0)
    assert not torch.equal(spliced, model.generate(TOKENS[:1], max_new_tokens=5, stop_at_eos=False, verbose=False))


@pytest.mark.parametrize("error_term", [False, True])
def test_gradients_reach_the_sae_as_through_its_forward(tiny, error_term):
    """The loss's gradient in the SAE's parameters is what its own forward as a hook gives (with the error term,
    whose error SAELens forms without a gradient); the SAE's parameters never become the model's."""
    model = tiny("rwkv7")
    sae = saelens_sae("blocks.0.hook_resid_post", model.cfg.d_model, "standard")
    grads = []
    for run in (lambda: model.run_with_saes(TOKENS, saes=[sae], use_error_term=error_term, return_type="loss"),
                lambda: model.run_with_hooks(TOKENS, fwd_hooks=as_hook(sae, error_term), return_type="loss")):
        sae.zero_grad(set_to_none=True)
        run().backward()
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
    assert not any(name.startswith("blocks.0.hook_resid_post") for name, _ in model.named_parameters())


def test_beside_a_writesae_sae_and_detached_by_name(tiny):
    """A writesae SAE at a memory site and an SAELens SAE on the stream attach together; ``reset_saes`` takes the
    hook an SAELens SAE reads, as a string."""
    model = tiny("qwen3_5")
    layer = model.cfg.gdn_layers[0]
    ours = FlatSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=16, k=2, site=site_name(layer, "state"), seed=0)
    theirs = saelens_sae("blocks.2.hook_resid_post", model.cfg.d_model)
    model.add_sae(ours)
    model.add_sae(theirs)
    try:
        _, cache = model.run_with_cache(TOKENS)
        assert f"{site_name(layer, 'state')}.sae.hook_sae_acts_post" in cache
        assert "blocks.2.hook_resid_post.hook_sae_acts_post" in cache
        model.reset_saes("blocks.2.hook_resid_post")
        assert list(model.acts_to_saes.values()) == [ours]
        assert not [name for name in model.hook_dict if name.startswith("blocks.2.hook_resid_post.")]
    finally:
        model.reset_saes()


def test_refusals_name_the_problem(tiny):
    model = tiny("qwen3_5")
    d = model.cfg.d_model
    with pytest.raises(KeyError, match=r"'blocks.1.hook_resid_pst' is not a hook point.*near: blocks.1.hook_resid_post"):
        model.add_sae(saelens_sae("blocks.1.hook_resid_pst", d))
    with pytest.raises(ValueError, match=r"reads d_in = 47 .* has 48 on its last axis"):
        model.run_with_saes(TOKENS, saes=[saelens_sae("blocks.1.hook_resid_post", d - 1)])
    first, second = saelens_sae("blocks.1.hook_resid_post", d), saelens_sae("blocks.1.hook_resid_post", d, seed=1)
    model.add_sae(first)
    try:
        with pytest.raises(ValueError, match="already attached at blocks.1.hook_resid_post"):
            model.add_sae(second)
        with pytest.raises(ValueError, match="already attached at blocks.1.hook_resid_post"):
            model.add_sae(transcoder(d, "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"))
    finally:
        model.reset_saes()
    with pytest.raises(TypeError, match="writesae SAE or an SAELens SAE"):
        model.add_sae(torch.nn.Linear(d, d))
    tc = transcoder(d, "blocks.0.hook_resid_mid", "blocks.1.hook_mlp_out")
    with model.saes([tc]), pytest.raises(RuntimeError, match="fired before its input hook blocks.0.hook_resid_mid"):
        _, resid = model.run_with_cache(TOKENS, names_filter="blocks.0.hook_resid_post")
        model(resid["blocks.0.hook_resid_post"], start_at_layer=1)
    assert not model.acts_to_saes and not [name for name in model.hook_dict if "hook_sae" in name]


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_gradients_for_attribution(tiny, family):
    """``run_with_cache_with_saes(..., incl_bwd=True)`` caches each feature's gradient of the loss (SAELens'
    attribution patching over features): on the stream it is autograd's through the SAE's own forward; inside the
    memory (the write's value, an edit carried through the recurrence) the parallel recurrence gives the
    sequential loop's."""
    model = tiny(family)
    stream = f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"
    sae = saelens_sae(stream, model.cfg.d_model, "standard")
    loss, cache = model.run_with_cache_with_saes(TOKENS, saes=[sae], use_error_term=True, incl_bwd=True,
                                                 return_type="loss", names_filter=lambda name: name.endswith("acts_post"))
    kept = {}

    def keep_features(x, hook):
        kept["acts"] = sae.encode(x)
        kept["acts"].retain_grad()
        return sae.decode(kept["acts"]) + (x - sae.decode(sae.encode(x))).detach()

    reference = model.run_with_hooks(TOKENS, fwd_hooks=[(stream, keep_features)], return_type="loss")
    reference.backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(cache[f"{stream}.hook_sae_acts_post_grad"], kept["acts"].grad, rtol=1e-5, atol=1e-7)

    write = "blocks.0.linear_attn.hook_write_value"
    _, clean = model.run_with_cache(TOKENS, names_filter=write)
    sae = saelens_sae(write, clean[write].shape[-1], "standard")
    grads = [model.run_with_cache_with_saes(TOKENS, saes=[sae], use_error_term=True, incl_bwd=True, return_type="loss",
                                            recurrence=recurrence, names_filter=lambda name: name.endswith("acts_post"),
                                            )[1][f"{write}.hook_sae_acts_post_grad"] for recurrence in ("parallel", "sequential")]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    assert grads[1].abs().max() > 1e-2


def bypassing(sae, excluded: list[int], tokens):
    """SAELens' exclude_special_tokens as a plain hook on a point with one row per input position: the SAE's forward
    where the token is not excluded, the value itself where it is."""

    def hook(x, hook):
        return torch.where(torch.isin(tokens, torch.tensor(excluded))[..., None], x, sae(x))

    return [(sae.cfg.metadata.hook_name, hook)]


@pytest.mark.parametrize("family", FAMILIES)
def test_exclude_special_tokens_bypasses_the_sae_there(tiny, family):
    """With ``exclude_special_tokens=True`` the SAE leaves the value at the tokenizer's structural special tokens
    (here the EOS that is also its pad and, with prepend_bos, its BOS) and splices elsewhere, its error term 0 there;
    a list of ids excludes those tokens."""
    model = tiny(family)
    prompts = ["It is a truth universally acknowledged", "Emma"]
    tokens = model.to_tokens(prompts, prepend_bos=True)
    special = [model.tokenizer.eos_token_id]
    assert torch.isin(tokens, torch.tensor(special)).sum() > 2  # the BOS of each row and the short row's padding
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"
    sae = saelens_sae(hook, model.cfg.d_model)
    with mock.patch.object(model, "_tokenize", wraps=model._tokenize) as tokenize:
        spliced = model.run_with_saes(prompts, saes=[sae], exclude_special_tokens=True, prepend_bos=True)
    assert tokenize.call_count == 1  # the tokens the SAE is bypassed by are those the forward reads
    reference = model.run_with_hooks(prompts, fwd_hooks=bypassing(sae, special, tokens), prepend_bos=True)
    torch.testing.assert_close(spliced, reference, rtol=0, atol=1e-6)
    _, cache = model.run_with_cache_with_saes(prompts, saes=[sae], exclude_special_tokens=True, use_error_term=True,
                                              prepend_bos=True, names_filter=lambda name: name.startswith(hook))
    at_special = torch.isin(tokens, torch.tensor(special))
    assert not cache[f"{hook}.hook_sae_error"][at_special].any() and cache[f"{hook}.hook_sae_error"][~at_special].any()
    word = [model.to_single_token(" truth")]
    torch.testing.assert_close(model.run_with_saes(prompts, saes=[sae], exclude_special_tokens=word, prepend_bos=True),
                               model.run_with_hooks(prompts, fwd_hooks=bypassing(sae, word, tokens), prepend_bos=True),
                               rtol=0, atol=1e-6)
    assert model.tokens_in_flight is None and not model.acts_to_saes


@pytest.mark.parametrize("family", FAMILIES)
def test_exclude_special_tokens_inside_the_memory_and_across_a_cache(tiny, family):
    """At a point inside the memory the excluded positions are found from the positions the layer tells it: the
    parallel recurrence, the sequential loop and a continued cache (its positions counting the cached prefix) agree."""
    model = tiny(family)
    write = "blocks.0.linear_attn.hook_write_value"
    _, clean = model.run_with_cache(TOKENS, names_filter=write)
    sae = saelens_sae(write, clean[write].shape[-1])
    excluded = [int(TOKENS[0, 1]), int(TOKENS[1, 5])]
    runs = {recurrence: model.run_with_saes(TOKENS, saes=[sae], exclude_special_tokens=excluded, recurrence=recurrence)
            for recurrence in ("parallel", "sequential")}
    torch.testing.assert_close(runs["sequential"], runs["parallel"], rtol=0, atol=1e-5)
    with model.saes([sae], exclude_special_tokens=excluded):
        cache = model.prefill(TOKENS[:, :3])
        continued = model(TOKENS[:, 3:], cache=cache)
    torch.testing.assert_close(continued, runs["parallel"][:, 3:], rtol=0, atol=1e-5)
    everywhere = model.run_with_saes(TOKENS, saes=[sae])
    assert (everywhere - runs["parallel"]).abs().max() > 1e-4  # the exclusion changes something


def test_exclude_special_tokens_refusals(tiny):
    model = tiny("qwen3_5")
    sae = saelens_sae("blocks.1.hook_resid_post", model.cfg.d_model)
    with pytest.raises(TypeError, match="True, False or a list of token ids"):
        model.add_sae(sae, exclude_special_tokens="eos")
    with model.saes([sae], exclude_special_tokens=[0]), pytest.raises(ValueError, match="pass tokens="):
        model(torch.zeros(1, 3, model.cfg.d_model), start_at_layer=1)
    ours = FlatSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=16, k=2,
                   site=site_name(model.cfg.gdn_layers[0], "state"), seed=0)
    with pytest.raises(ValueError, match="exclude_special_tokens is for SAELens SAEs"):
        model.add_sae(ours, exclude_special_tokens=True)
    tokenizer, model.tokenizer = model.tokenizer, None
    try:
        with pytest.raises(ValueError, match="has none: pass the token ids to exclude as a list"):
            model.add_sae(sae, exclude_special_tokens=True)
    finally:
        model.tokenizer = tokenizer
    assert not model.acts_to_saes


@pytest.mark.parametrize("family", FAMILIES)
def test_an_saelens_folder_splices_the_same_read_by_saelens_or_by_load_sae(tiny, family, tmp_path):
    """An SAELens SAE's folder splices to the same logits and features whether SAELens loads it (attached as
    SAELens attaches it) or writesae's load_sae does (a vector SAE, which needs no sae-lens)."""
    model = tiny(family)
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"
    theirs = saelens_sae(hook, model.cfg.d_model, "standard")
    theirs.save_model(tmp_path)
    loaded = sae_lens.SAE.load_from_disk(tmp_path)
    ours = load_sae(tmp_path)
    for error_term in (False, True):
        logits, cache = model.run_with_cache_with_saes(TOKENS, saes=[loaded], use_error_term=error_term,
                                                       names_filter=lambda name: name.endswith("hook_sae_acts_post"))
        our_logits, our_cache = model.run_with_cache_with_saes(TOKENS, saes=[ours], use_error_term=error_term,
                                                               names_filter=lambda name: name.endswith("hook_sae_acts_post"))
        torch.testing.assert_close(our_logits, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(our_cache[f"{hook}.sae.hook_sae_acts_post"][..., 0, :],
                                   cache[f"{hook}.hook_sae_acts_post"], rtol=1e-5, atol=1e-6)


def test_an_saelens_hook_z_folder_splices_the_same_read_by_saelens_or_by_load_sae(tiny, tmp_path):
    model = tiny("qwen3_5")
    layer = next(L for L, block in enumerate(model.blocks) if not block.is_gdn)
    hook = f"blocks.{layer}.attn.hook_z"
    _, clean = model.run_with_cache(TOKENS, names_filter=hook)
    saelens_sae(hook, clean[hook].shape[-2] * clean[hook].shape[-1], reshape_activations="hook_z").save_model(tmp_path)
    theirs = model.run_with_saes(TOKENS, saes=[sae_lens.SAE.load_from_disk(tmp_path)])
    torch.testing.assert_close(model.run_with_saes(TOKENS, saes=[load_sae(tmp_path)]), theirs, rtol=1e-5, atol=1e-5)
    assert (theirs - model(TOKENS)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_an_sae_of_one_head_replaces_that_head(tiny, family):
    """An SAE with ``hook_head_index`` (as SAELens trains one on a head of a per-head point) reads and replaces that
    head of a memory layer's gated output only: its own forward on that head, the other heads as they were."""
    model = tiny(family)
    hook = "blocks.0.linear_attn.hook_gated_out"
    _, clean = model.run_with_cache(TOKENS, names_filter=hook)
    sae = saelens_sae(hook, clean[hook].shape[-1])
    sae.cfg.metadata.hook_head_index = 1

    def on_head_one(x, hook):
        x = x.clone()
        x[..., 1, :] = sae(x[..., 1, :])
        return x

    for recurrence in ("parallel", "sequential"):
        spliced = model.run_with_saes(TOKENS, saes=[sae], recurrence=recurrence)
        reference = model.run_with_hooks(TOKENS, fwd_hooks=[(hook, on_head_one)], recurrence=recurrence)
        torch.testing.assert_close(spliced, reference, rtol=0, atol=1e-6)
    _, cache = model.run_with_cache_with_saes(TOKENS, saes=[sae], names_filter=lambda name: name.startswith(hook))
    others = [h for h in range(clean[hook].shape[-2]) if h != 1]
    torch.testing.assert_close(cache[hook][..., others, :], clean[hook][..., others, :], rtol=0, atol=0)
    assert not torch.equal(cache[hook][..., 1, :], clean[hook][..., 1, :])
    assert cache[f"{hook}.hook_sae_acts_post"].shape == (*TOKENS.shape, sae.cfg.d_sae)
    sae.cfg.metadata.hook_head_index = 9
    with pytest.raises(ValueError, match="reads head 9 \\(hook_head_index\\)"):
        model.run_with_saes(TOKENS, saes=[sae])
