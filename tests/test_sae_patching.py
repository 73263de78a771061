"""Patching SAE feature activations (writesae.patching): everything = clean, nothing = corrupted,
one feature at one position = a hand-written hook on the codes, and the refusals."""

from __future__ import annotations

import pytest
import torch

from hooked_gdn.sites import site_name
from writesae import BilinearMatrixSAE
from writesae.patching import get_act_patch_sae_features, sae_acts_name
from writesae.splice import HookedSAEGatedDeltaNet

from .conftest import random_tiny_model, tiny_hf_config

T = 12


def make_sae(model, layer: int, kind: str = "state", heads="all") -> BilinearMatrixSAE:
    return BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=16, k=4, sparsity="topk",
                             site=site_name(layer, kind), heads=heads, seed=0)


def clean_and_corrupted(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(1, 101, (1, T), generator=torch.Generator().manual_seed(seed))
    corrupted = clean.clone()
    corrupted[0, 0] = clean[0, 0] % 100 + 1
    return clean, corrupted


def codes_cache(model, sae, tokens, **kwargs):
    with torch.no_grad():
        return model.run_with_cache_with_saes(tokens, saes=[sae], names_filter=sae_acts_name(sae), **kwargs)


def test_patching_every_feature_gives_the_clean_spliced_run():
    """One GDN layer, whose state the SAE replaces in the loop (no error term). With every code
    patched, the states are the clean run's; from position 4 on, past the conv window over the
    corrupted token at 0, so are the queries, and with them the logits."""
    torch.manual_seed(0)
    cfg = tiny_hf_config("grouped", num_hidden_layers=1, layer_types=["linear_attention"])
    model = HookedSAEGatedDeltaNet.from_config(cfg).eval()
    sae = make_sae(model, 0)
    clean, corrupted = clean_and_corrupted()
    clean_logits, cache = codes_cache(model, sae, clean, use_error_term=False, recurrence="sequential")
    with torch.no_grad():
        corrupted_logits = model.run_with_saes(corrupted, saes=[sae], use_error_term=False, recurrence="sequential")
    seen = []
    value = get_act_patch_sae_features(model, corrupted, cache, lambda logits: seen.append(logits) or logits[0, -1, 0],
                                       sae, index_axis_names=(), use_error_term=False, show_progress=False)
    assert value.shape == () and len(seen) == 1
    later = slice(4, None)
    assert (corrupted_logits[:, later] - clean_logits[:, later]).abs().amax() > 1e-3
    torch.testing.assert_close(seen[0][:, later], clean_logits[:, later], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["state", "write"])
def test_patching_from_the_corrupted_run_itself_changes_nothing(kind):
    model = random_tiny_model(HookedSAEGatedDeltaNet)
    sae = make_sae(model, 1, kind, heads=[1, 3])
    _, corrupted = clean_and_corrupted()
    _, own = codes_cache(model, sae, corrupted, use_error_term=True)
    metric = lambda logits: logits[0, -1, 5] - logits[0, -1, 7]
    with torch.no_grad():
        reference = float(metric(model(corrupted)))
    grid = get_act_patch_sae_features(model, corrupted, own, metric, sae, features=[0, 5, 9], positions=[2, 10],
                                      show_progress=False)
    assert grid.shape == (2, 2, 3)
    by_head = get_act_patch_sae_features(model, corrupted, own, metric, sae, index_axis_names=("head",), show_progress=False)
    assert by_head.shape == (2,)
    for values in (grid, by_head):
        torch.testing.assert_close(values, torch.full_like(values, reference), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["state", "write"])
def test_one_feature_at_one_position_equals_a_manual_hook(kind):
    model = random_tiny_model(HookedSAEGatedDeltaNet)
    sae = make_sae(model, 2, kind, heads=[1, 3])
    clean, corrupted = clean_and_corrupted()
    corrupted[0, 5] = clean[0, 5] % 100 + 1
    _, cache = codes_cache(model, sae, clean, use_error_term=True)
    clean_codes = cache[sae_acts_name(sae)]  # [1, T, 2 dictionaries, 16]
    t = 8
    metric = lambda logits: logits[0, t:].log_softmax(-1)[:, 5].sum()
    features = [int(i) for i in (clean_codes[0, t, 1] > 0).nonzero().flatten()[:2]]
    grid = get_act_patch_sae_features(model, corrupted, cache, metric, sae, features=features, positions=[t],
                                      heads=[3], show_progress=False)
    with torch.no_grad():
        unpatched = float(metric(model(corrupted)))
    for k, feature in enumerate(features):
        def put_clean(codes, hook, feature=feature):
            codes = codes.clone()
            codes[:, 0, 1, feature] = clean_codes[:, t, 1, feature]  # head 3 is the SAE's dictionary 1
            return codes

        with torch.no_grad(), model.saes([sae], use_error_term=True):
            manual = model.run_with_hooks(corrupted, state_positions=[t], fwd_hooks=[(sae_acts_name(sae), put_clean)])
        assert abs(float(grid[0, 0, k]) - float(metric(manual))) < 1e-5
        assert abs(float(grid[0, 0, k]) - unpatched) > 1e-6  # the patch does move the metric


def test_refusals():
    model = random_tiny_model(HookedSAEGatedDeltaNet)
    sae = make_sae(model, 1, heads=[0, 2])
    clean, corrupted = clean_and_corrupted()
    _, cache = codes_cache(model, sae, clean, use_error_term=True)
    metric = lambda logits: logits[0, -1, 0]
    with pytest.raises(ValueError, match="not an SAE site"):  # layer 3 is the attention layer
        get_act_patch_sae_features(model, corrupted, cache, metric, make_sae(model, 3), show_progress=False)
    with pytest.raises(ValueError, match="same number of tokens"):
        get_act_patch_sae_features(model, corrupted[:, :-1], cache, metric, sae, show_progress=False)
    with pytest.raises(ValueError, match=r"heads \[1\] have no dictionary"):
        get_act_patch_sae_features(model, corrupted, cache, metric, sae, heads=[1], show_progress=False)
    with pytest.raises(ValueError, match="the clean cache has no"):
        get_act_patch_sae_features(model, corrupted, {}, metric, sae, show_progress=False)
    with pytest.raises(ValueError, match="features"):
        get_act_patch_sae_features(model, corrupted, cache, metric, sae, features=[16], show_progress=False)
    assert not model.acts_to_saes  # nothing left attached
