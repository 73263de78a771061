"""The atom substitution test (writesae.experiments.substitution): each condition is the matrix it says, the edit is
exact against the sequential recurrence, and the summary's noise filter and effect sizes are what they say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hooked_gdn.sites import edit_at_positions, gdn_hook_name, site_name
from writesae import BilinearMatrixSAE
from writesae.experiments import clustered_bootstrap, find_firings, install_matrix, kl_from_clean
from writesae.experiments.substitution import (
    CONDITIONS, REPLACEMENTS, best_rank1, condition_matrices, deletion_thresholds, effect_sizes, other_feature,
    substitution_test, summarize,
)

from .test_experiments_core import make_sae, model_fixture, tokens_fixture  # noqa: F401 (fixtures)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


# --- the conditions ------------------------------------------------------------------------------

def test_each_condition_is_the_matrix_it_says():
    g = torch.Generator().manual_seed(0)
    coded, other = torch.randn(5, 4, generator=g), 3 * torch.randn(5, 4, generator=g)
    # a rank-2 native write, so that its best rank-1 approximation is not the write itself
    native = 2 * torch.outer(torch.randn(5, generator=g), torch.randn(4, generator=g)) \
        + torch.outer(torch.randn(5, generator=g), torch.randn(4, generator=g))
    random_direction = torch.outer(torch.randn(5, generator=g), torch.randn(4, generator=g))
    m = dict(zip(CONDITIONS, condition_matrices(coded, other, native, random_direction)))
    c, n = coded.norm(), native.norm()
    assert torch.equal(m["native"], native) and torch.equal(m["delete"], torch.zeros(5, 4))
    assert torch.equal(m["atom"], coded)
    # the top singular pair, from numpy's SVD (Eckart–Young: the residual's norm is σ₂)
    u, s, vh = np.linalg.svd(native.double().numpy())
    top = torch.from_numpy(s[0] * np.outer(u[:, 0], vh[0])).float()
    assert float((native - best_rank1(native)).norm()) == pytest.approx(s[1], rel=1e-5)
    for condition, direction, norm in [("atom_native_norm", coded, n), ("other_atom", other, c),
                                       ("other_atom_native_norm", other, n), ("rank1_atom_norm", top, c),
                                       ("rank1_native_norm", top, n), ("random_atom_norm", random_direction, c),
                                       ("random_native_norm", random_direction, n)]:
        assert float(m[condition].norm()) == pytest.approx(float(norm), rel=1e-5), condition
        assert cosine(m[condition], direction) == pytest.approx(1, abs=1e-5), condition
        assert torch.linalg.matrix_rank(m[condition]) == torch.linalg.matrix_rank(direction), condition
    assert cosine(m["rank1_atom_norm"], native) < 0.999  # the rank-1 part, not the write


def test_other_feature_is_another_feature_of_the_dictionary_drawn_uniformly():
    g = torch.Generator().manual_seed(0)
    for feature in (0, 3, 6):
        drawn = [other_feature(7, feature, g) for _ in range(600)]
        assert feature not in drawn and set(drawn) == set(range(7)) - {feature}
        counts = np.bincount(drawn, minlength=7)
        assert counts.max() - counts[counts > 0].min() < 60  # about 100 each


# --- the edit, against the sequential recurrence -------------------------------------------------

@pytest.mark.parametrize("native", ["k_delta", "beta_k_v"])
def test_install_matrix_is_exact_against_the_sequential_recurrence(model, tokens, native):
    # ground truth: the sequential mode (one exact step per position) with S_t set by hand through hook_state to
    # α_t S_{t−1} + M (k̂δᵀ removed) or α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + M (βk̂vᵀ removed), from the clean states
    layer, head, t = model.cfg.gdn_layers[1], 1, 9
    names = [gdn_hook_name(layer, n) for n in ("hook_write_key", "hook_beta", "hook_log_decay", "hook_state")]
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=names, state_positions=[t - 1])
    previous = cache[names[3]][:, 0, head]
    k_hat, beta, alpha = cache[names[0]][:, t, head], cache[names[1]][:, t, head], cache[names[2]][:, t, head].exp()
    if native == "beta_k_v":
        previous = previous - beta[:, None, None] * k_hat[:, :, None] * (k_hat[:, None, :] @ previous)
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(model.cfg.d_key, model.cfg.d_value, generator=g) @ torch.diag(torch.rand(model.cfg.d_value, generator=g))
    target = alpha[:, None, None] * previous + matrix

    def set_state(rows, position):
        rows[:, head] = target.to(rows)
        return rows

    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(names[3], edit_at_positions(set_state, t))],
                                        state_positions=[t], recurrence="sequential")
    for recurrence in ("parallel", "sequential"):
        installed = install_matrix(model, tokens, layer, head, t, matrix, native=native, recurrence=recurrence)
        assert (installed - expected).abs().max() <= 1e-5, recurrence
    assert (expected - clean).abs().max() > 1e-3  # the edit does something


# --- the records -----------------------------------------------------------------------------------

def test_substitution_records_are_the_conditions_installed_one_by_one(model, tokens):
    sae, layer = make_sae(model, "write", heads=[1, 3]), model.cfg.gdn_layers[1]
    every = find_firings(model, sae, tokens)
    firings = [next(f for f in every if f.head == h and f.position < 16) for h in (1, 3)]
    late = next(f for f in every if f.head == 3 and f.position >= 21)
    horizon = {1: 2, 3: 5}
    with torch.no_grad():
        sae.b_dec.normal_()  # b_dec must not enter the atom's matrix; the codes are already taken
    records = substitution_test(model, sae, tokens, firings + [late], horizon=horizon, seed=0)
    assert substitution_test(model, sae, tokens, firings, horizon=horizon, seed=0) == records[:2]  # seeded
    assert [r["horizon"] for r in records] == [2, 5, 5]
    assert [r["positions_scored"] for r in records] == [2, 5, tokens.shape[1] - late.position]  # cut at the end
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=lambda name: "hook_write_" in name)
    g = torch.Generator().manual_seed(0)  # per firing, in order: u, w, then the other feature
    for r, f in zip(records, firings):
        assert (r["sequence"], r["position"], r["head"], r["feature"]) == (f.sequence, f.position, f.head, f.feature)
        u, w = torch.randn(model.cfg.d_key, generator=g), torch.randn(model.cfg.d_value, generator=g)
        j = other_feature(16, f.feature, g)
        assert r["other_feature"] == j != f.feature
        d = sae.cfg.dictionary(f.head)
        with torch.no_grad():
            code = torch.zeros(sae.n_dicts, 1)
            code[d] = f.coefficient
            decode = lambda i: (sae.decode_sparse(torch.full((sae.n_dicts, 1), i), code) - sae.b_dec / sae.cfg.input_scale)[d]
            atom, other = decode(f.feature), decode(j)
        where = (f.sequence, f.position, f.head)
        native = torch.outer(cache["write_key", layer][where], cache["write_value", layer][where])  # k̂δᵀ
        assert r["atom_norm"] == pytest.approx(float(atom.norm()), rel=1e-5)
        assert r["native_norm"] == pytest.approx(float(native.norm()), rel=1e-5)
        matrices = dict(zip(CONDITIONS, condition_matrices(atom, other, native, torch.outer(u, w))))
        sequence, end = tokens[f.sequence : f.sequence + 1], f.position + r["horizon"]
        for condition in CONDITIONS:  # installed alone (batching changes the last bits of these small KLs)
            logits = install_matrix(model, sequence, layer, f.head, f.position, matrices[condition])[0]
            kl = kl_from_clean(clean[f.sequence], logits)
            assert r["kl_next"][condition] == pytest.approx(float(kl[f.position]), rel=2e-2, abs=1e-6), condition
            assert r["kl_sum"][condition] == pytest.approx(float(kl[f.position:end].sum()), rel=2e-2, abs=1e-6), condition
        # the identity edits (the write put back, and its own rank-1 part at its norm) are at the noise floor;
        # deletion is far above it
        for condition in ("native", "rank1_native_norm"):
            assert abs(r["kl_sum"][condition]) < 1e-6, condition
        assert r["kl_sum"]["delete"] > 1e-4


# --- the summary -----------------------------------------------------------------------------------

def record(sequence, head, feature, native, delete, **kls):
    values = {c: 1.0 for c in CONDITIONS} | {"native": native, "delete": delete} | kls
    return {"sequence": sequence, "head": head, "feature": feature, "kl_next": values, "kl_sum": values}


def test_summarize_keeps_the_firings_where_deletion_beats_its_heads_noise_floor():
    records = [
        record(0, 0, 1, native=5e-8, delete=0.2, atom=0.05),    # head 0's noise floor: |−1e-7| → threshold 1e-6
        record(1, 0, 2, native=-1e-7, delete=9e-7, atom=0.0),   # below head 0's threshold: dropped
        record(3, 0, 2, native=-2e-8, delete=8e-7, atom=0.0),   # dropped too
        record(2, 0, 1, native=0.0, delete=0.1, atom=0.15),
        record(0, 1, 1, native=1e-3, delete=2e-3, atom=0.0),    # head 1's noise floor 1e-3: threshold 1e-2, dropped
        record(1, 1, 3, native=0.0, delete=0.5, atom=0.25),
    ]
    assert deletion_thresholds(records, "kl_next") == pytest.approx({0: 1e-6, 1: 1e-2})
    s = summarize(records, n_resamples=200)
    assert (s["n"], s["n_kept"], s["n_passages"], s["n_features"]) == (6, 3, 3, 2)
    assert s["noise"] == pytest.approx({0: 1e-7, 1: 1e-3}) and s["thresholds"] == pytest.approx({0: 1e-6, 1: 1e-2})
    # by hand, over the kept firings: 1 − atom / delete = 0.75, −0.5, 0.5
    assert s["effect"]["atom"]["median"][0] == pytest.approx(0.5)
    assert s["effect"]["atom"]["pooled"][0] == pytest.approx(1 - 0.45 / 0.8)
    kept = [records[i] for i in (0, 3, 5)]
    np.testing.assert_allclose(effect_sizes(kept, "atom", "kl_next"), [0.75, -0.5, 0.5])
    assert s["effect"]["atom"]["median"] == pytest.approx(
        clustered_bootstrap([0.75, -0.5, 0.5], [0, 2, 1], statistic=np.median, n_resamples=200))
    assert set(s["effect"]) == set(REPLACEMENTS)
    assert s["effect"]["other_atom"]["median"][0] == pytest.approx(float(np.median([1 - 1 / 0.2, 1 - 1 / 0.1, 1 - 1 / 0.5])))
    assert (s["rates"]["atom<delete"]["wins"], s["rates"]["atom<delete"]["n"]) == (2, 3)
    assert (s["rates_all_firings"]["atom<delete"]["wins"], s["rates_all_firings"]["atom<delete"]["n"]) == (5, 6)
    assert s["median_kl"]["delete"][0] == pytest.approx(0.2)
    # a larger factor drops more; none left is refused by name
    assert summarize(records, factor=1.5e6, n_resamples=50)["n_kept"] == 1  # head 0 at 0.15: only 0.2 left
    with pytest.raises(ValueError, match="deletion matters .* at none of the 2 firings"):
        summarize(records[:2], factor=1e7, n_resamples=50)
    with pytest.raises(ValueError, match="the metric is one of"):
        summarize(records, metric="kl_mean")
    with pytest.raises(ValueError, match="a comparison is 'a<b' or 'a<b<c'"):
        summarize(records, comparisons=["atom<random"], n_resamples=50)


# --- the study's choices (demos/substitution.py) -----------------------------------------------------

def test_the_study_scores_each_head_over_its_half_life_and_samples_firings_in_the_window():
    from demos.common import decay_kinds
    from demos.substitution import horizons, sample_firings
    from writesae.experiments import Firing

    assert horizons({0: 2.27, 1: 72.7, 2: 0.3, 3: 700.6}, 512) == {0: 3, 1: 73, 2: 1, 3: 512}
    # the shipped model's layer 5: heads 1 and 3 decay by a fixed, input-independent factor, heads 0 and 2 learn theirs
    kinds = decay_kinds(5, [0, 1, 2, 3])
    assert (kinds["fixed"], kinds["learned"]) == ([1, 3], [0, 2])
    firings = [Firing(s, p, h, 0, 1.0) for s in range(3) for p in range(10, 70) for h in (0, 3)]
    drawn = sample_firings(firings, 2, 16, 64, seed=0)
    assert len(drawn) == 3 * 2 * 2 and all(16 <= f.position <= 64 for f in drawn)
    assert {(f.sequence, f.head) for f in drawn} == {(s, h) for s in range(3) for h in (0, 3)}
    assert sample_firings(firings, 2, 16, 64, seed=0) == drawn != sample_firings(firings, 2, 16, 64, seed=1)
