"""Write ablation, installing matrices, firings and the intervals, on a tiny random model (the substitution test's
records and summary: tests/test_substitution.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hooked_gdn.sites import gdn_hook_name, site_name
from writesae import BilinearMatrixSAE
from writesae.experiments import (
    atom_and_random_directions, atom_direction, clustered_bootstrap, edit_at_positions, find_firings,
    frequent_features, install_matrix, native_writes, site_codes, substitution_test, wilson_interval, write_ablation,
)

from .conftest import random_tiny_model


@pytest.fixture(name="model", scope="module")
def model_fixture():
    return random_tiny_model()


@pytest.fixture(name="tokens", scope="module")
def tokens_fixture():
    return torch.randint(1, 101, (2, 24), generator=torch.Generator().manual_seed(3))


def make_sae(model, kind: str, heads="all"):
    return BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=16, k=3, heads=heads,
                             site=site_name(model.cfg.gdn_layers[1], kind), n_heads=model.cfg.n_value_heads,
                             input_scale=2.0, seed=0)


def zero_beta(model, tokens, layer, heads, positions):
    def edit(beta, hook):
        beta = beta.clone()
        for t in positions:
            beta[:, t, heads] = 0
        return beta

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(gdn_hook_name(layer, "hook_beta"), edit)])


# --- stats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("successes, expected", [(8, (0.4902, 0.9433)), (0, (0.0, 0.2775)), (10, (0.7225, 1.0))])
def test_wilson_interval_known_values(successes, expected):
    assert wilson_interval(successes, 10) == pytest.approx(expected, abs=1e-3)
    low, high = wilson_interval(successes, 10, confidence=0.99)
    assert low <= expected[0] + 1e-9 and high >= expected[1] - 1e-9  # wider at higher confidence


def test_clustered_bootstrap_constant_statistic_has_zero_width():
    values = np.arange(12.0)
    assert clustered_bootstrap(values, values % 3, statistic=lambda x: 7.0, n_resamples=50) == (7.0, 7.0, 7.0)


def test_clustered_bootstrap_with_singleton_clusters_is_the_ordinary_bootstrap():
    values = np.random.default_rng(1).normal(size=30)
    draws = np.random.default_rng(5).integers(0, 30, size=(500, 30))
    means = values[draws].mean(1)
    expected = (values.mean(), *np.quantile(means, [0.025, 0.975]))
    assert clustered_bootstrap(values, np.arange(30), n_resamples=500, seed=5) == pytest.approx(expected, abs=1e-12)


def test_clustered_bootstrap_resamples_whole_clusters():
    # 5 clusters of 20 identical values: only 5 independent observations, not 100
    values = np.repeat([0.0, 1.0, 2.0, 3.0, 4.0], 20)
    _, low_c, high_c = clustered_bootstrap(values, np.repeat(np.arange(5), 20), n_resamples=500)
    _, low_i, high_i = clustered_bootstrap(values, np.arange(100), n_resamples=500)
    assert high_c - low_c > 2 * (high_i - low_i)
    # each resample's mean is a mean of 5 cluster values, so a multiple of 1/5
    assert low_c * 5 == pytest.approx(round(low_c * 5)) and high_c * 5 == pytest.approx(round(high_c * 5))


# --- write ablation ----------------------------------------------------------------------------

def test_write_ablation_deletes_like_zero_beta(model, tokens):
    layer, heads, positions = model.cfg.gdn_layers[1], [0, 2], [5, 9]
    result = write_ablation(model, tokens, layer, heads, positions, scale=0.0)
    assert (result["logits"] - zero_beta(model, tokens, layer, heads, positions)).abs().max() <= 1e-5
    assert (result["logits"][:, :5] - result["clean_logits"][:, :5]).abs().max() <= 1e-6
    assert result["kl"][:, :5].abs().max() <= 1e-6 and result["loss_change"][:, :5].abs().max() <= 1e-6
    assert result["kl"][:, 5].min() > 1e-8 and result["kl"][:, -1].min() > 1e-8  # at t and carried
    assert result["mean_kl"].shape == (24,) and result["mean_loss_change"].shape == (23,)
    assert torch.allclose(result["mean_kl"], result["kl"].mean(0))


def test_write_ablation_scale_one_changes_nothing(model, tokens):
    result = write_ablation(model, tokens, model.cfg.gdn_layers[0], 1, [3, 4], scale=1.0)
    assert (result["logits"] - result["clean_logits"]).abs().max() <= 1e-5
    half = write_ablation(model, tokens, model.cfg.gdn_layers[0], 1, [3, 4], scale=0.5)
    assert half["kl"][:, 3].min() > 1e-8


# --- installing matrices -----------------------------------------------------------------------

def test_install_native_write_reproduces_clean_logits(model, tokens):
    layer, head, t = model.cfg.gdn_layers[1], 3, 7
    names = [gdn_hook_name(layer, "hook_write_key"), gdn_hook_name(layer, "hook_write_value")]
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=names)
    native = cache[names[0]][:, t, head, :, None] * cache[names[1]][:, t, head, None, :]  # [b, d_k, d_v]
    assert (install_matrix(model, tokens, layer, head, t, native) - clean).abs().max() <= 1e-5
    # a matrix of the right norm but another direction does change things
    assert (install_matrix(model, tokens, layer, head, t, native.flip(-1)) - clean).abs().max() > 1e-4


def test_install_rank_one_equals_forcing_the_write(model, tokens):
    layer, head, t = model.cfg.gdn_layers[1], 1, 10
    g = torch.Generator().manual_seed(0)
    v, w = torch.randn(model.cfg.d_key, generator=g), torch.randn(model.cfg.d_value, generator=g)

    def set_row(vector):
        def edit(rows, position):
            rows[:, head] = vector
            return rows
        return edit_at_positions(edit, t)

    with torch.no_grad():
        forced = model.run_with_hooks(tokens, fwd_hooks=[(gdn_hook_name(layer, "hook_write_key"), set_row(v)),
                                                         (gdn_hook_name(layer, "hook_write_value"), set_row(w))])
    installed = install_matrix(model, tokens, layer, head, t, torch.outer(v, w))
    assert (installed - forced).abs().max() <= 1e-5
    assert (installed - model(tokens)).abs().max() > 1e-4


def test_installing_zero_equals_zero_beta(model, tokens):
    layer, head, t = model.cfg.gdn_layers[0], 2, 6
    zero = torch.zeros(model.cfg.d_key, model.cfg.d_value)
    installed = install_matrix(model, tokens, layer, head, t, zero)
    assert (installed - zero_beta(model, tokens, layer, [head], [t])).abs().max() <= 1e-5


# --- firings and the substitution test ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["write", "state"])
def test_find_firings_are_top_codes(model, tokens, kind):
    sae = make_sae(model, kind)
    layer = model.cfg.gdn_layers[1]
    key, value, state = (gdn_hook_name(layer, n) for n in ("hook_write_key", "hook_write_value", "hook_state"))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[key, value, state])
        x = cache[state] if kind == "state" else cache[key][..., :, None] * cache[value][..., None, :]
        codes = sae.encode(x)  # [b, p, H_v, n]: the dense route, against find_firings' own
    firings = find_firings(model, sae, tokens)
    assert len(firings) == int((codes.amax(-1) > 0).sum()) > 0
    for f in firings:
        row = codes[f.sequence, f.position, f.head]
        assert int(row.argmax()) == f.feature and float(row.max()) == pytest.approx(f.coefficient, rel=1e-4)
    # a threshold and a feature filter keep only what they should
    threshold = float(np.median([f.coefficient for f in firings]))
    strong = find_firings(model, sae, tokens, min_activation=threshold)
    assert set(strong) == {f for f in firings if f.coefficient > threshold} and 0 < len(strong) < len(firings)
    chosen = {firings[0].feature}
    assert all(f.feature in chosen for f in find_firings(model, sae, tokens, features=chosen))
    assert len(find_firings(model, sae, tokens, features=chosen)) == sum(f.feature in chosen for f in firings)


def test_the_papers_native_write_is_the_state_change_without_the_erase(model, tokens):
    # β k̂ vᵀ = S_t − α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1}, by hand from the clean states
    layer, head, t = model.cfg.gdn_layers[1], 2, 9
    names = [gdn_hook_name(layer, n) for n in ("hook_write_key", "hook_write_value", "hook_beta", "hook_v",
                                               "hook_log_decay", "hook_state")]
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=names, state_positions=[t - 1, t])
    previous, state = cache[names[-1]][:, 0, head].double(), cache[names[-1]][:, 1, head].double()
    k_hat, beta = cache[names[0]][:, t, head].double(), cache[names[2]][:, t, head].double()
    alpha = cache[names[4]][:, t, head].double().exp()
    erase_kept = alpha[:, None, None] * (previous - beta[:, None, None] * k_hat[:, :, None] * (k_hat[:, None, :] @ previous))
    paper = native_writes(cache, layer, "beta_k_v")[:, t, head]
    ours = native_writes(cache, layer, "k_delta")[:, t, head]
    torch.testing.assert_close(paper.double(), state - erase_kept, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.double(), state - alpha[:, None, None] * previous, rtol=1e-4, atol=1e-5)
    assert (paper - ours).norm() > 1e-3 * ours.norm()  # the erase is not negligible here
    # installing the native write back (either definition) changes nothing; installing zero under the
    # paper's definition leaves S_t = α (I − β k̂ k̂ᵀ) S_{t−1}, set here through hook_state
    for native, matrix in (("k_delta", ours), ("beta_k_v", paper)):
        assert (install_matrix(model, tokens, layer, head, t, matrix, native=native) - clean).abs().max() <= 1e-5

    def set_state(rows, position):
        rows[:, head] = erase_kept.to(rows)
        return rows

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(names[-1], edit_at_positions(set_state, t))], state_positions=[t])
    zero = torch.zeros(model.cfg.d_key, model.cfg.d_value)
    assert (install_matrix(model, tokens, layer, head, t, zero, native="beta_k_v") - expected).abs().max() <= 1e-5
    assert (expected - clean).abs().max() > 1e-4


def test_experiments_refuse_heads_layers_and_positions_they_do_not_cover(model, tokens):
    sae, layer = make_sae(model, "write", heads=[1, 3]), model.cfg.gdn_layers[1]
    firing = find_firings(model, sae, tokens)[0]
    with pytest.raises(ValueError, match=r"head 0 has no dictionary in this SAE; its heads are \[1, 3\]"):
        substitution_test(model, sae, tokens, [dataclasses.replace(firing, head=0)])
    with pytest.raises(ValueError, match="firing position 24 is outside the text: it has 24 tokens"):
        substitution_test(model, sae, tokens, [dataclasses.replace(firing, position=24)])
    with pytest.raises(ValueError, match="native write is one of"):
        substitution_test(model, sae, tokens, [firing], native="delta")
    zero = torch.zeros(model.cfg.d_key, model.cfg.d_value)
    attention = next(i for i in range(model.cfg.n_layers) if i not in model.cfg.gdn_layers)
    with pytest.raises(ValueError, match=rf"layer {attention} is not a GDN layer of this model"):
        install_matrix(model, tokens, attention, 1, 3, zero)
    with pytest.raises(ValueError, match=r"head\(s\) \[4\] do not exist in GDN layer"):
        install_matrix(model, tokens, layer, 4, 3, zero)
    with pytest.raises(ValueError, match=r"position \[30\] outside the text: it has 24 tokens"):
        install_matrix(model, tokens, layer, 1, 30, zero)
    with pytest.raises(ValueError, match=r"position \[-25\] outside the text"):
        write_ablation(model, tokens, layer, [1], [3, -25])
    with pytest.raises(ValueError, match=rf"layer {attention} is not a GDN layer"):
        write_ablation(model, tokens, attention, [1], [3])


# --- the SAE's features, by model head -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["state", "write"])
def test_frequent_features_are_indexed_by_model_head(model, tokens, kind):
    # dictionaries 0 and 1 of this SAE are model heads 1 and 3
    sae = make_sae(model, kind, heads=[1, 3])
    site = gdn_hook_name(model.cfg.gdn_layers[1], "hook_state")
    with torch.no_grad():
        if kind == "state":
            _, cache = model.run_with_cache(tokens, names_filter=site)
            x = cache[site]
        else:
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: "hook_write_" in name)
            layer = model.cfg.gdn_layers[1]
            x = cache["write_key", layer][..., :, None] * cache["write_value", layer][..., None, :]
        codes = sae.encode(x[:, :, [1, 3]])  # the dense route, against site_codes' own
    torch.testing.assert_close(site_codes(model, sae, tokens), codes, rtol=1e-5, atol=1e-6)
    chosen = frequent_features(model, sae, tokens, 3)
    assert list(chosen) == [1, 3]
    for d, head in enumerate([1, 3]):
        frequency = (codes[:, :, d] > 0).float().mean((0, 1))
        assert [f for f, _ in chosen[head]] == frequency.argsort(descending=True)[:3].tolist()
        assert [share for _, share in chosen[head]] == pytest.approx(frequency.sort(descending=True).values[:3].tolist())
    assert list(frequent_features(model, sae, tokens, 1, heads=[3])) == [3]
    with pytest.raises(ValueError, match=r"head 0 has no dictionary in this SAE; its heads are \[1, 3\]"):
        frequent_features(model, sae, tokens, 1, heads=[0])


def test_atom_directions_are_unit_factors_of_the_model_heads_atom():
    sae = BilinearMatrixSAE(d_k=5, d_v=4, n_features=6, k=2, heads=[1, 3], input_scale=0.25, seed=0)
    sae.fold_input_scale_()  # as a trained SAE is saved: W now has norm 1 / s = 4
    direction = atom_direction(sae, 3, 2)
    assert (direction.head, direction.kind, direction.label) == (3, "atom", "feature 2")
    assert direction.v.norm() == pytest.approx(1) and direction.w.norm() == pytest.approx(1)
    atom = sae.atoms()[1, 2].detach()  # dictionary 1 is head 3
    torch.testing.assert_close(torch.outer(direction.v, direction.w), atom / atom.norm())
    directions = atom_and_random_directions(sae, {3: [2, 0], 1: [5]}, 1, torch.Generator().manual_seed(0))
    assert [(d.head, d.label) for d in directions] == [(3, "feature 2"), (3, "feature 0"), (3, "random 0"),
                                                        (1, "feature 5"), (1, "random 0")]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, generator=g)
    torch.testing.assert_close(directions[2].v, v / v.norm())
