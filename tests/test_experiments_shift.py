"""The logit-shift prediction (exact propagator vs measurement) and installs in generation, on a random tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from writesae.experiments import install, logit_shift as ls

from .conftest import random_tiny_model

LAYER, HEAD, T0 = 1, 0, 10  # head 0 of this layer decays slowest (α ≈ 0.6), so edits carry far


def site(name):
    return f"blocks.{LAYER}.linear_attn.{name}"


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_model()  # fp32, H_v = 4, d_k = 12, d_v = 8


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(1))


def unit_directions(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(F.normalize(torch.randn(model.cfg.d_key, generator=g), dim=0),
             F.normalize(torch.randn(model.cfg.d_value, generator=g), dim=0)) for _ in range(n)]


@pytest.mark.parametrize("eps", [1e-3, 1.0, 50.0])
def test_exact_read_change_equals_measured_at_any_eps(tiny, tokens, eps):
    (v, w), = unit_directions(tiny, 1)
    seen = {}
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, names_filter=[site(s) for s in ls.SITES] + [site("hook_recurrence_out")])
        tiny.run_with_hooks(tokens, state_positions=[T0], fwd_hooks=[
            (site("hook_state"), ls.state_edit_hook(HEAD, T0, v, w, eps)),
            (site("hook_recurrence_out"), lambda o, hook: seen.__setitem__("o", o.clone())),
        ])
    change = (seen["o"] - cache[site("hook_recurrence_out")])[0]  # [T, H, d_v]
    predicted = ls.exact_read_change(cache, LAYER, HEAD, T0, v, w, eps)
    assert predicted.shape == (tokens.shape[1] - T0, tiny.cfg.d_value)
    # exact up to fp32 rounding of the reads themselves, however large ε is
    edited = seen["o"][0, T0:, HEAD]
    error = (change[T0:, HEAD] - predicted).norm()
    assert error <= 1e-5 * edited.norm() and error <= 1e-3 * predicted.norm()
    assert predicted[-1].norm() > 1e-4 * predicted[0].norm()  # the change is carried to the end
    others = [h for h in range(tiny.cfg.n_value_heads) if h != HEAD]
    rounding = 1e-5 * cache[site("hook_recurrence_out")].abs().max()  # the edit path re-runs the recurrence
    assert change[:, others].abs().max() <= rounding and change[:T0].abs().max() <= rounding


def test_jvp_prediction_matches_measured_logit_shift_for_small_eps(tiny, tokens):
    study = ls.logit_shift_study(tiny, tokens, LAYER, HEAD, T0, unit_directions(tiny, 3), epsilons=[1e-3, 3.0])
    assert study["by_eps"][1e-3]["exact"] > 0.99
    assert min(study["by_distance"][1e-3]["exact"]) > 0.9
    assert len(study["by_distance"][1e-3]["paper"]) == tokens.shape[1] - T0
    # Large edits leave the linear regime of the network after the layer (the RMSNorm of o, later layers).
    assert study["by_eps"][3.0]["exact"] < study["by_eps"][1e-3]["exact"]
    # The single-direction helpers agree with the study's pooled computation.
    v, w = unit_directions(tiny, 1)[0]
    measured = ls.measured_logit_change(tiny, tokens, LAYER, HEAD, T0, v, w, 1e-3)
    assert ls.r_squared(ls.predicted_logit_change(tiny, tokens, LAYER, HEAD, T0, v, w, 1e-3), measured) > 0.99
    assert ls.r_squared(ls.paper_approximation(tiny, tokens, LAYER, HEAD, T0, v, w, 1e-3), measured) > 0.5


def test_propagator_steps_by_hand():
    g_ = torch.Generator().manual_seed(3)
    T, d_k = 6, 5
    k = F.normalize(torch.randn(T, d_k, generator=g_), dim=-1)
    beta, g = torch.rand(T, generator=g_), -torch.rand(T, generator=g_)
    A = [g[s].exp() * (torch.eye(d_k) - beta[s] * torch.outer(k[s], k[s])) for s in range(T)]
    assert torch.allclose(ls.propagator(k, beta, g, 2, 2), torch.eye(d_k))
    assert torch.allclose(ls.propagator(k, beta, g, 2, 3), A[3], atol=1e-6)
    # later factors on the left; the factors do not commute, so the order is visible
    assert torch.allclose(ls.propagator(k, beta, g, 2, 4), A[4] @ A[3], atol=1e-6)
    assert not torch.allclose(A[4] @ A[3], A[3] @ A[4], atol=1e-4)
    # with β = 0 only the decays remain: M = G I, G = Π α_s
    assert torch.allclose(ls.propagator(k, torch.zeros(T), g, 1, 5), g[2:6].sum().exp() * torch.eye(d_k), atol=1e-6)


def test_paper_approximation_is_exact_without_writes(tiny, tokens):
    (v, w), = unit_directions(tiny, 1, seed=4)

    def no_writes(beta, hook):
        return torch.zeros_like(beta)

    with torch.no_grad(), tiny.hooks(fwd_hooks=[(site("hook_beta"), no_writes)]):
        _, cache = tiny.run_with_cache(tokens, names_filter=[site(s) for s in ls.SITES])
    with torch.no_grad():
        _, with_writes = tiny.run_with_cache(tokens, names_filter=[site(s) for s in ls.SITES])
    exact = ls.exact_read_change(cache, LAYER, HEAD, T0, v, w, 1.0)
    assert torch.allclose(ls.paper_read_change(cache, LAYER, HEAD, T0, v, w, 1.0), exact, atol=1e-7)
    # with the writes, the (I − β k̂ k̂ᵀ) terms make a difference
    difference = ls.paper_read_change(with_writes, LAYER, HEAD, T0, v, w, 1.0) - ls.exact_read_change(with_writes, LAYER, HEAD, T0, v, w, 1.0)
    assert difference.norm() > 1e-3 * exact.norm()


def test_install_of_the_native_write_changes_nothing(tiny, tokens):
    prompt, t = tokens[:, :12], 11
    with torch.no_grad():
        _, cache = tiny.run_with_cache(prompt, names_filter=[site("hook_write_key"), site("hook_write_value")])
    k_hat, delta = cache[site("hook_write_key")][0, t, HEAD], cache[site("hook_write_value")][0, t, HEAD]
    targets = install.pick_targets(tiny, prompt, rank_range=(5, 20), n=4)
    same = install.install_in_generation(tiny, prompt, LAYER, HEAD, k_hat, delta, 1.0, positions=[t],
                                         max_new_tokens=8, target_tokens=targets)
    assert same["continuation"] == same["clean_continuation"]
    assert max(abs(x) for x in same["lift"]) < 1e-4


def test_large_install_changes_the_continuation(tiny, tokens):
    prompt = tokens[:, :12]
    (v, w), = unit_directions(tiny, 1, seed=5)
    result = install.install_in_generation(tiny, prompt, LAYER, HEAD, v, w, 300.0, max_new_tokens=8, target_tokens=[3, 7])
    assert result["continuation"] != result["clean_continuation"]
    assert len(result["included"]) == len(result["lift"]) == 2
    study = install.install_study(tiny, [prompt], LAYER, HEAD, v, w, multipliers=(1.5, 300.0), max_new_tokens=4,
                                  rank_range=(10, 40), n_targets=5)
    assert set(study) == {1.5, 300.0} and study[300.0]["n"] == 5
    assert 0.0 <= study[300.0]["inclusion_rate"] <= 1.0


def test_pick_targets_ranks_lie_in_range(tiny, tokens):
    prompt = tokens[:, :12]
    targets = install.pick_targets(tiny, prompt, rank_range=(10, 40), n=6, seed=2)
    with torch.no_grad():
        logits = tiny(prompt)[0, -1]
    ranks = [int((logits > logits[t]).sum()) for t in targets]
    assert len(set(targets)) == 6 and all(10 <= r < 40 for r in ranks)
    assert targets == install.pick_targets(tiny, prompt, rank_range=(10, 40), n=6, seed=2)  # seeded
