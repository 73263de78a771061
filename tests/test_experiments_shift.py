"""The logit-shift prediction (exact propagator vs measurement vs the paper's approximation) and
installs in generation, on a random tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hooked_gdn.delta_rule import DELTA_RULE
from hooked_gdn.sites import gdn_hook_name
from writesae.experiments import edit_at_positions, install, logit_shift as ls
from writesae.experiments.features import Direction

from .conftest import random_tiny_model

LAYER, HEAD, T0 = 1, 0, 10


def site(name):
    return gdn_hook_name(LAYER, name)


@pytest.fixture(name="tiny", scope="module")
def tiny_fixture():
    return random_tiny_model()  # fp32, H_v = 4, d_k = 12, d_v = 8


@pytest.fixture(name="slow", scope="module")
def slow_fixture():
    """The tiny model with layer 1's decays slowed to α ≈ 0.9 (from ≈ 0.3): an edit at t0 is still
    carried many positions later, through every (I − β k̂ k̂ᵀ) on the way."""
    model = random_tiny_model()
    with torch.no_grad():
        model.blocks[LAYER].linear_attn.A_log.fill_(math.log(0.08))  # g ≈ −0.08 · softplus(1 + a)
    return model


@pytest.fixture(name="tokens", scope="module")
def tokens_fixture():
    return torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(1))


def unit_directions(model, n, seed=0, head=HEAD, kind="random"):
    g = torch.Generator().manual_seed(seed)
    return [Direction(head, kind, f"{kind} {i}", F.normalize(torch.randn(model.cfg.d_key, generator=g), dim=0),
                      F.normalize(torch.randn(model.cfg.d_value, generator=g), dim=0)) for i in range(n)]


@pytest.mark.parametrize("eps", [1e-3, 1.0, 50.0])
def test_exact_read_change_equals_measured_at_any_eps(tiny, tokens, eps):
    (d,) = unit_directions(tiny, 1)
    seen = {}
    with torch.no_grad():
        _, cache = tiny.run_with_cache(tokens, names_filter=[site(s) for s in ls.SITES] + [site("hook_recurrence_out")])
        tiny.run_with_hooks(tokens, state_positions=[T0], fwd_hooks=[
            (site("hook_state"), ls.state_edit_hook(HEAD, T0, d.v, d.w, eps)),
            (site("hook_recurrence_out"), lambda o, hook: seen.__setitem__("o", o.clone())),
        ])
    change = (seen["o"] - cache[site("hook_recurrence_out")])[0]  # [T, H, d_v]
    predicted = ls.exact_read_change(cache, LAYER, HEAD, T0, d.v, d.w, eps)
    assert predicted.shape == (tokens.shape[1] - T0, tiny.cfg.d_value)
    # exact up to fp32 rounding of the reads themselves, however large ε is
    edited = seen["o"][0, T0:, HEAD]
    error = (change[T0:, HEAD] - predicted).norm()
    assert error <= 1e-5 * edited.norm() and error <= 1e-3 * predicted.norm()
    assert predicted[-1].norm() > 1e-4 * predicted[0].norm()  # the change is carried to the end
    others = [h for h in range(tiny.cfg.n_value_heads) if h != HEAD]
    rounding = 1e-5 * cache[site("hook_recurrence_out")].abs().max()  # the edit path re-runs the recurrence
    assert change[:, others].abs().max() <= rounding and change[:T0].abs().max() <= rounding


def test_exact_read_change_is_the_product_of_the_steps_by_hand():
    # a hand-made cache of one head: ⟨M_{t0→t}ᵀ q̂_t, v⟩ with M = A_t ⋯ A_{t0+1}, later factors on the left
    g_ = torch.Generator().manual_seed(3)
    T, d_k, t0 = 6, 5, 2
    q, k = (F.normalize(torch.randn(1, T, 1, d_k, generator=g_), dim=-1) for _ in range(2))
    beta, g = torch.rand(1, T, 1, generator=g_), -torch.rand(1, T, 1, generator=g_)
    cache = dict(zip((gdn_hook_name(0, name) for name in ls.SITES), (q, k, beta, g)))
    v, w = torch.randn(d_k, generator=g_), torch.randn(3, generator=g_)
    A = [g[0, s, 0].exp() * (torch.eye(d_k) - beta[0, s, 0] * torch.outer(k[0, s, 0], k[0, s, 0])) for s in range(T)]
    M = [torch.eye(d_k), A[3], A[4] @ A[3], A[5] @ A[4] @ A[3]]
    expected = torch.stack([(M[i].T @ q[0, t0 + i, 0]) @ v * w for i in range(T - t0)])
    torch.testing.assert_close(ls.exact_read_change(cache, 0, 0, t0, v, w, 1.0, transition=DELTA_RULE), expected)
    with pytest.raises(ValueError, match="pass transition=DELTA_RULE for a Gated DeltaNet layer"):
        ls.exact_read_change(cache, 0, 0, t0, v, w, 1.0)  # a plain dict does not say which recurrence it is
    # the factors do not commute, so the order is visible
    assert not torch.allclose(A[4] @ A[3], A[3] @ A[4], atol=1e-4)


def test_paper_approximation_is_exact_without_writes(tiny, tokens):
    (d,) = unit_directions(tiny, 1, seed=4)
    v, w = d.v, d.w

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


def test_with_slow_decays_the_exact_propagation_predicts_what_the_papers_approximation_misses(slow, tokens):
    # after t0 (at t0 both predictions are the edit itself, and would dominate a pooled R²)
    _, cache = slow.run_with_cache(tokens, names_filter=[site(s) for s in ls.SITES])
    assert cache[site("hook_log_decay")][0, :, HEAD].exp().mean() == pytest.approx(0.9, abs=0.02)
    pooled = {method: ls.PooledR2() for method in ls.READ_CHANGES}
    for d in unit_directions(slow, 3):
        measured = ls.measured_change(slow, tokens, LAYER, HEAD, T0, d.v, d.w, 1e-3)[0][T0 + 1:]
        for method, read_change in ls.READ_CHANGES.items():
            change = read_change(cache, LAYER, HEAD, T0, d.v, d.w, 1e-3)
            pooled[method].add(ls.logit_jvp(slow, tokens, LAYER, HEAD, T0, change)[T0 + 1:], measured)
    assert pooled["exact"].value() > 0.999
    assert pooled["paper"].value() < 0.95


def test_the_study_pools_passages_heads_and_directions_after_t0(slow):
    tokens = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(5))
    t0 = 8
    directions = unit_directions(slow, 2, head=0, kind="atom") + unit_directions(slow, 1, seed=1, head=2)
    study = ls.logit_shift_study(slow, tokens, LAYER, t0, directions, epsilons=[1e-3, 30.0], relative_to_state=True,
                                 samples=5, generator=torch.Generator().manual_seed(0))
    assert set(study["r2"]) == {"all"} and set(study["r2"]["all"]) == {"all", "atom", "random"}  # one group by default
    assert study["head_groups"] == {0: "all", 2: "all"} and set(study["r2_by_head"]) == {0, 2}
    assert study["bins"] == [[1, 2], [2, 4], [4, 8]] and set(study["r2_by_distance"]) == {0, 2}
    small = study["r2"]["all"]["all"][1e-3]
    assert small["read"]["exact"] > 1 - 1e-6 and small["logits"]["exact"] > 0.999  # exact at the read, JVP after
    assert small["read"]["paper"] < 0.99 and min(study["r2_by_distance"][0][1e-3]["read"]["exact"]) > 1 - 1e-6
    # large edits leave the linear regime of the network after the layer (the RMSNorm of o, later layers)
    assert study["r2"]["all"]["all"][30.0]["logits"]["exact"] < small["logits"]["exact"]
    assert study["r2"]["all"]["all"][30.0]["read"]["exact"] > 1 - 1e-6  # but not the read: the layer is affine in S
    # ε is relative to each head's clean state norm at t0 in each passage
    with torch.no_grad():
        _, states = slow.run_with_cache(tokens, names_filter=site("hook_state"), state_positions=[t0])
    norms = states[site("hook_state")][:, 0, [0, 2]].flatten(-2).norm(dim=-1)  # [passage, head]
    assert study["mean_state_norm"] == pytest.approx(dict(zip([0, 2], norms.mean(0).tolist())), rel=1e-5)  # per head
    assert all(len(values) == 2 * 3 * 5 for values in study["samples"].values())  # passages × directions × samples
    assert study["samples"]["head"].tolist() == 2 * ([0] * 10 + [2] * 5)  # each sample's head
    # R² of the paper's read in head 2 (one direction), by hand over positions t > t0 only: t0 is left out
    (d,) = directions[2:]
    predicted, measured = [], []
    for i in range(2):
        with torch.no_grad():
            _, cache = slow.run_with_cache(tokens[i : i + 1], names_filter=[site(s) for s in ls.SITES])
        eps = 1e-3 * norms[i, 1].item()
        predicted.append(ls.paper_read_change(cache, LAYER, 2, t0, d.v, d.w, eps)[1:])
        measured.append(ls.measured_change(slow, tokens[i : i + 1], LAYER, 2, t0, d.v, d.w, eps)[1][t0 + 1:])
    predicted, measured = torch.cat(predicted).double(), torch.cat(measured).double()
    by_hand = 1 - (measured - predicted).pow(2).sum() / (measured - measured.mean()).pow(2).sum()
    assert study["r2_by_head"][2][1e-3]["read"]["paper"] == pytest.approx(float(by_hand), abs=1e-6)
    assert study["r2_by_distance"][2][1e-3]["read"]["paper"][-1] < 1
    # each octave's share of the measured read change's sum of squares, by hand (rows are t − t0 = 1 … 7 per passage)
    squares = torch.stack(measured.pow(2).sum(-1).split(16 - t0 - 1)).sum(0)
    by_bin = torch.stack([squares[lo - 1 : hi - 1].sum() for lo, hi in study["bins"]])
    assert study["share_by_distance"][2][1e-3]["read"] == pytest.approx((by_bin / by_bin.sum()).tolist(), rel=1e-9)
    # the first passage's first sample: drawn with the generator, at the smallest ε, predicted as ε · JVP
    first = torch.randint(0, (16 - t0 - 1) * slow.cfg.d_vocab, (5,), generator=torch.Generator().manual_seed(0))
    eps = 1e-3 * norms[0, 0].item()
    logits, _ = ls.measured_change(slow, tokens[:1], LAYER, 0, t0, directions[0].v, directions[0].w, eps)
    torch.testing.assert_close(study["samples"]["measured"][:5], logits[t0 + 1:].flatten()[first])


def leaves(tree) -> dict:
    """A nested dict of numbers (or lists of them) as {path: number}."""
    if isinstance(tree, dict):
        return {(key, *path): x for key, sub in tree.items() for path, x in leaves(sub).items()}
    if isinstance(tree, list):
        return {(i,): x for i, x in enumerate(tree)}
    return {(): tree}


def test_the_study_pools_within_each_head_group_and_never_across(slow):
    # heads of different mechanisms (decay kinds, say) are labelled apart: each group's R² is the study of its heads alone
    tokens = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(5))
    t0, eps = 8, [1e-3]
    directions = (unit_directions(slow, 1, head=0, kind="atom") + unit_directions(slow, 1, seed=1, head=1)
                  + unit_directions(slow, 2, seed=2, head=2))
    groups = {0: "fixed", 1: "fixed", 2: "learned"}
    study = ls.logit_shift_study(slow, tokens, LAYER, t0, directions, eps, relative_to_state=True, head_groups=groups)
    assert study["head_groups"] == groups
    assert set(study["r2"]) == {"fixed", "learned"}
    assert set(study["r2"]["fixed"]) == {"all", "atom", "random"} and set(study["r2"]["learned"]) == {"all", "random"}
    for group in ("fixed", "learned"):
        alone = ls.logit_shift_study(slow, tokens, LAYER, t0, [d for d in directions if groups[d.head] == group], eps,
                                     relative_to_state=True)
        assert leaves(study["r2"][group]) == pytest.approx(leaves(alone["r2"]["all"]), rel=1e-12)
        for h in alone["r2_by_head"]:
            assert leaves(study["r2_by_head"][h]) == pytest.approx(leaves(alone["r2_by_head"][h]), rel=1e-12)
            assert leaves(study["r2_by_distance"][h]) == pytest.approx(leaves(alone["r2_by_distance"][h]), rel=1e-12)
    # pooled across the groups the numbers are other ones: what labelling the heads keeps apart
    across = ls.logit_shift_study(slow, tokens, LAYER, t0, directions, eps, relative_to_state=True)["r2"]["all"]["all"]
    for group in ("fixed", "learned"):
        assert abs(across[1e-3]["read"]["paper"] - study["r2"][group]["all"][1e-3]["read"]["paper"]) > 1e-3
    with pytest.raises(ValueError, match=r"head_groups has no group for head\(s\) \[2\]"):
        ls.logit_shift_study(slow, tokens, LAYER, t0, directions, eps, head_groups={0: "fixed", 1: "fixed"})


def test_state_gradient_is_the_adjoint_of_the_exact_read_change():
    # Σ_t ⟨g_t, Δo_t⟩ = vᵀ J_t0 w for every t0, with a hand-made cache of one head
    gen = torch.Generator().manual_seed(4)
    T, d_k, d_v = 9, 5, 3
    q, k = (F.normalize(torch.randn(1, T, 1, d_k, generator=gen), dim=-1) for _ in range(2))
    beta, g = torch.rand(1, T, 1, generator=gen), -torch.rand(1, T, 1, generator=gen)
    cache = dict(zip((gdn_hook_name(0, name) for name in ls.SITES), (q, k, beta, g)))
    read_grad = torch.randn(T, d_v, generator=gen)
    positions = [2, 5, 8]
    J = ls.state_gradient(cache, 0, 0, read_grad, positions, transition=DELTA_RULE)
    assert J.shape == (3, d_k, d_v)
    for t0, J_t0 in zip(positions, J):
        for _ in range(3):
            v, w = torch.randn(d_k, generator=gen), torch.randn(d_v, generator=gen)
            forward = (ls.exact_read_change(cache, 0, 0, t0, v, w, 1.0, transition=DELTA_RULE) * read_grad[t0:]).sum()
            assert float(v @ J_t0 @ w) == pytest.approx(float(forward), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match=r"install position \[9\] outside the text: it has 9 tokens"):
        ls.state_gradient(cache, 0, 0, read_grad, [9], transition=DELTA_RULE)


def test_the_logit_shift_study_refuses_what_it_cannot_measure(tiny, tokens):
    (d,) = unit_directions(tiny, 1)
    with pytest.raises(ValueError, match=r"t0 \[24\] outside the text: it has 24 tokens"):
        ls.logit_shift_study(tiny, tokens, LAYER, 24, [d], [1e-3])
    with pytest.raises(ValueError, match="t0 = 23 is the last position"):
        ls.logit_shift_study(tiny, tokens, LAYER, -1, [d], [1e-3])
    with pytest.raises(ValueError, match=r"head\(s\) \[7\] do not exist in GDN layer 1"):
        ls.logit_shift_study(tiny, tokens, LAYER, T0, [Direction(7, "random", "r", d.v, d.w)], [1e-3])
    with pytest.raises(ValueError, match="layer 3 is not a GDN layer of this model"):
        ls.logit_shift_study(tiny, tokens, 3, T0, [d], [1e-3])
    atom = Direction(HEAD, "atom", "feature 0", d.v, d.w, layer=2)
    with pytest.raises(ValueError, match="feature 0 of head 0 belongs to GDN layer 2 \\(its SAE's site\\), not to layer 1"):
        ls.logit_shift_study(tiny, tokens, LAYER, T0, [atom], [1e-3])


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


def _additive_install(model, prompt, units, directions, m, positions):
    """An install rebuilt by hand: log-softmax of the last position after S_t ← S_t + m n_t v wᵀ − k̂_t δ_tᵀ in each unit
    at each position (n_t = ‖k̂_t‖ ‖δ_t‖ of the clean run), through hook_state."""
    layers = sorted({layer for layer, _ in units})
    names = [gdn_hook_name(layer, name) for layer in layers for name in ("hook_write_key", "hook_write_value")]
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt, names_filter=names)
    hooks = []
    for layer in layers:
        def add(states, t, layer=layer):
            for (unit_layer, head), d in zip(units, directions):
                if unit_layer == layer:
                    k = cache[gdn_hook_name(layer, "hook_write_key")][0, t, head]
                    delta = cache[gdn_hook_name(layer, "hook_write_value")][0, t, head]
                    states[:, head] += m * k.norm() * delta.norm() * torch.outer(d.v, d.w) - torch.outer(k, delta)
            return states

        hooks.append((gdn_hook_name(layer, "hook_state"), edit_at_positions(add, positions)))
    with torch.no_grad():
        return model.run_with_hooks(prompt, fwd_hooks=hooks, state_positions=positions)[0, -1].log_softmax(-1)


def test_an_install_adds_m_times_the_native_norm_of_its_own_position_to_the_state(tiny, tokens):
    # at middle positions, whose native writes differ in norm: the direction at m × ‖k̂_t δ_tᵀ‖_F of t itself
    prompt, positions, m = tokens[:, :12], [4, 7], 2.5
    (d,) = unit_directions(tiny, 1, seed=5)
    with torch.no_grad():
        clean, cache = tiny.run_with_cache(prompt, names_filter=[site("hook_write_key"), site("hook_write_value")])
    native = cache[site("hook_write_key")][0, :, HEAD].norm(dim=-1) * cache[site("hook_write_value")][0, :, HEAD].norm(dim=-1)
    assert abs(native[4] / native[7] - 1) > 0.05
    lift = (_additive_install(tiny, prompt, [(LAYER, HEAD)], [d], m, positions) - clean[0, -1].log_softmax(-1))[[3, 7]]
    result = install.install_in_generation(tiny, prompt, LAYER, HEAD, d.v, d.w, m, positions=positions,
                                           max_new_tokens=4, target_tokens=[3, 7])
    torch.testing.assert_close(torch.tensor(result["lift"]), lift, rtol=1e-4, atol=1e-5)
    assert lift.abs().max() > 1e-3


def test_an_install_at_consecutive_positions_is_the_additive_edit_not_a_forced_write(slow, tokens):
    """Forcing k̂ and δ at t0 and t0 + 1 drops the −α β k̂ k̂ᵀ ΔS term of t0's edit at t0 + 1: another edit than the one
    the first-order prediction is derived for. The install is the additive one. (The slow decays keep t0's edit large
    at t0 + 1, so the two edits differ by far more than the tolerance.)"""
    tiny, prompt, positions, m = slow, tokens[:, :12], [9, 10, 11], 3.0
    read = site("hook_recurrence_out")
    with torch.no_grad():
        _, cache = tiny.run_with_cache(prompt, names_filter=[site("hook_write_key"), site("hook_write_value"), read])
    k_hat, delta = cache[site("hook_write_key")][0, :, HEAD], cache[site("hook_write_value")][0, :, HEAD]
    native = k_hat.norm(dim=-1) * delta.norm(dim=-1)
    # v along the key of position 10, so that 10's erase, k̂_10 k̂_10ᵀ, meets 9's edit in full
    (random,) = unit_directions(tiny, 1, seed=5)
    d = Direction(HEAD, "random", "along k̂_10", F.normalize(k_hat[10], dim=0), random.w)
    out = install.install_directions(tiny, prompt, [(LAYER, HEAD)], d.v[None, None], d.w[None, None], [m], positions, 2)
    additive = _additive_install(tiny, prompt, [(LAYER, HEAD)], [d], m, positions)
    torch.testing.assert_close(out["log_probs"][0], additive, rtol=0, atol=2e-5)

    def edited_read(fwd_hooks, **kwargs):  # the head's read at the last position under an edit
        with torch.no_grad(), tiny.hooks(fwd_hooks=fwd_hooks):
            _, edited = tiny.run_with_cache(prompt, names_filter=read, **kwargs)
        return edited[read][0, -1, HEAD]

    def add(states, t):
        states[:, HEAD] += m * native[t] * torch.outer(d.v, d.w) - torch.outer(k_hat[t], delta[t])
        return states

    def force(site_name, rows_of):
        def edit(rows, t):
            rows[:, HEAD] = rows_of(t)
            return rows

        return (site(site_name), edit_at_positions(edit, positions))

    additive_read = edited_read([(site("hook_state"), edit_at_positions(add, positions))], state_positions=positions)
    forced_read = edited_read([force("hook_write_key", lambda t: d.v), force("hook_write_value", lambda t: m * native[t] * d.w)])
    change = (additive_read - cache[read][0, -1, HEAD]).norm()
    assert (forced_read - additive_read).norm() > 0.05 * change > 0


def test_an_install_in_several_heads_and_layers_is_each_units_additive_edit(tiny, tokens):
    prompt, positions, m = tokens[:, :12], [9, 10, 11], 2.0
    units = [(LAYER, 0), (LAYER, 2)] + [(layer, 1) for layer in tiny.cfg.gdn_layers if layer != LAYER][:1]
    directions = unit_directions(tiny, len(units), seed=7)
    out = install.install_directions(tiny, prompt, units, torch.stack([d.v for d in directions])[None],
                                     torch.stack([d.w for d in directions])[None], [m], positions, 2)
    torch.testing.assert_close(out["log_probs"][0], _additive_install(tiny, prompt, units, directions, m, positions),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="names a \\(layer, head\\) twice"):
        install.install_directions(tiny, prompt, [units[0], units[0]], torch.zeros(1, 2, 12), torch.zeros(1, 2, 8), [m])


def test_the_aimed_direction_moves_its_target_as_predicted_and_more_than_random_directions(tiny, tokens):
    prompt, positions = tokens[:, :12], [9, 10, 11]
    (target,) = install.pick_targets(tiny, prompt, rank_range=(20, 60), n=1, seed=3)
    J, offset = install.install_gradient(tiny, prompt, LAYER, HEAD, target, positions)
    aimed, sigma = install.aimed_direction(J, HEAD, "aimed")
    assert float(aimed.v @ J @ aimed.w) == pytest.approx(sigma, rel=1e-4) and sigma > 0
    with torch.no_grad():
        clean, cache = tiny.run_with_cache(prompt, names_filter=[site("hook_write_key"), site("hook_write_value")])
    k_hat, delta = cache[site("hook_write_key")][0, :, HEAD], cache[site("hook_write_value")][0, :, HEAD]
    native = k_hat.norm(dim=-1) * delta.norm(dim=-1)

    def lift(v, w, eps):  # log p(target) after adding ε n_t v wᵀ to S_t at each install position, measured
        def add(states, t):
            states[:, HEAD] += eps * native[t] * torch.outer(v, w)
            return states

        with torch.no_grad():
            edited = tiny.run_with_hooks(prompt, fwd_hooks=[(site("hook_state"), edit_at_positions(add, positions))],
                                         state_positions=positions)
        return float(edited[0, -1].log_softmax(-1)[target] - clean[0, -1].log_softmax(-1)[target])

    def first_order(v, w, eps=1e-2):  # the central difference: no second-order term
        return (lift(v, w, eps) - lift(v, w, -eps)) / (2 * eps)

    assert first_order(aimed.v, aimed.w) == pytest.approx(sigma, rel=2e-3)
    for d in unit_directions(tiny, 8, seed=11):
        assert float(d.v @ J @ d.w) < sigma
        assert first_order(d.v, d.w) == pytest.approx(float(d.v @ J @ d.w), rel=1e-2, abs=2e-3 * sigma)
        assert lift(d.v, d.w, 1e-2) < lift(aimed.v, aimed.w, 1e-2)
    # the offset c is Σ ⟨J_t0, k̂ δᵀ⟩: at one position, the native write's own gain
    J_one, c_one = install.install_gradient(tiny, prompt, LAYER, HEAD, target, [10])
    assert float(k_hat[10] @ J_one @ delta[10]) / float(native[10]) == pytest.approx(c_one, rel=1e-4)


def test_the_aimed_atom_is_the_dictionarys_best_by_first_order_gain(tiny):
    from writesae import BilinearMatrixSAE

    sae = BilinearMatrixSAE(d_k=tiny.cfg.d_key, d_v=tiny.cfg.d_value, n_features=16, k=3, heads=[0, 2],
                            site=gdn_hook_name(LAYER, "hook_state"), n_heads=4, seed=0)
    J = torch.randn(tiny.cfg.d_key, tiny.cfg.d_value, generator=torch.Generator().manual_seed(0))
    atom, gain = install.aimed_atom(sae, 2, J)
    gains = [float(torch.outer(a.v, a.w).flatten() @ J.flatten()) for a in
             (install.atom_direction(sae, 2, i) for i in range(16))]
    assert (atom.kind, atom.label, atom.layer) == ("aimed_atom", f"feature {max(range(16), key=gains.__getitem__)}", LAYER)
    assert gain == pytest.approx(max(gains), rel=1e-5)
    with pytest.raises(ValueError, match=r"head 1 has no dictionary in this SAE"):
        install.aimed_atom(sae, 1, J)


def test_the_install_study_refuses_an_sae_of_another_layer(tiny, tokens):
    from writesae import BilinearMatrixSAE

    other = next(layer for layer in tiny.cfg.gdn_layers if layer != LAYER)
    sae = BilinearMatrixSAE(d_k=tiny.cfg.d_key, d_v=tiny.cfg.d_value, n_features=16, k=3, heads=[0],
                            site=gdn_hook_name(other, "hook_state"), n_heads=4, seed=0)
    with pytest.raises(ValueError, match=f"belongs to GDN layer {other} \\(its SAE's site\\), not to layer {LAYER}"):
        install.install_study(tiny, [tokens[0, :12]], LAYER, [0], sae=sae, multipliers=(1.0,), max_new_tokens=2,
                              rank_range=(10, 40), n_targets=1, scopes=("head",))


def test_the_install_study_aims_at_each_target_and_scores_controls_on_all(tiny, tokens):
    prompts = [tokens[0, :12], tokens[0, 4:16]]
    controls = unit_directions(tiny, 1, seed=5, kind="random") + unit_directions(tiny, 1, seed=6, head=2)
    study = install.install_study(tiny, prompts, LAYER, [0, 2], controls, multipliers=(1.0, 300.0), max_new_tokens=4,
                                  rank_range=(10, 40), n_targets=2, scopes=("head",))
    runs = study["runs"]
    targets = [install.pick_targets(tiny, p, (10, 40), 2, seed=i) for i, p in enumerate(prompts)]
    # per prompt and head: 2 aimed directions scored on their own target, the head's control on both, at 2 m
    assert len(runs) == 2 * 2 * (2 + 2) * 2
    aimed = [r for r in runs if r["kind"] == "aimed"]
    assert [(r["prompt"], r["head"], r["target"], r["m"]) for r in aimed] == [
        (i, h, y, m) for i in range(2) for h in (0, 2) for y in targets[i] for m in (1.0, 300.0)]
    assert all(r["label"] == f"aimed at {r['target']}" for r in aimed)
    assert {(r["prompt"], r["target"]) for r in study["clean"]} == {(i, y) for i in range(2) for y in targets[i]}
    # the aimed direction has the largest first-order gain for its target in its head
    for r in aimed:
        rivals = [x for x in runs if (x["prompt"], x["head"], x["target"], x["m"]) == (r["prompt"], r["head"], r["target"], r["m"])]
        assert r["gain"] == max(x["gain"] for x in rivals) and len(rivals) == 2
        # the same offset c for every direction scored on that target (it is the native writes' own)
        offsets = [x["m"] * x["gain"] - x["predicted_lift"] for x in rivals]
        assert offsets[1] == pytest.approx(offsets[0], rel=1e-5, abs=1e-7)
    # one run, rebuilt by hand: install_in_generation of that direction at that m
    r = aimed[1]
    J, offset = install.install_gradient(tiny, prompts[r["prompt"]], LAYER, r["head"], r["target"])
    d, _ = install.aimed_direction(J, r["head"], "aimed")
    alone = install.install_in_generation(tiny, prompts[r["prompt"]], LAYER, r["head"], d.v, d.w, r["m"], max_new_tokens=4,
                                          target_tokens=[r["target"]])
    assert alone["included"] == [r["included"]] and alone["lift"] == pytest.approx([r["lift"]], rel=1e-3, abs=1e-4)
    assert r["predicted_lift"] == pytest.approx(r["m"] * r["gain"] - offset, rel=1e-5)
    summary = install.summarize_installs(runs)
    assert set(summary) == {"aimed", "random"} and summary["random"][300.0]["n"] == 2 * 2 * 2
    chosen = [x for x in runs if x["kind"] == "aimed" and x["m"] == 300.0]
    assert summary["aimed"][300.0]["inclusion_rate"] == sum(x["included"] for x in chosen) / len(chosen)
    assert summary["aimed"][300.0]["mean_lift"] == pytest.approx(np.mean([x["lift"] for x in chosen]))
    with pytest.raises(ValueError, match=r"head\(s\) \[5\] do not exist"):
        install.install_study(tiny, prompts, LAYER, [5])
    with pytest.raises(ValueError, match=r"install position \[12\] outside the text: it has 12 tokens"):
        install.install_directions(tiny, prompts[0], [(LAYER, 0)], controls[0].v[None, None], controls[0].w[None, None], [1.0],
                                   positions=[12])
    with pytest.raises(ValueError, match=r"unknown install scope\(s\) \['heads'\]"):
        install.install_study(tiny, prompts, LAYER, [0], scopes=("heads",))


def test_joint_installs_sum_each_heads_first_order_terms_and_write_every_unit(tiny, tokens):
    prompts = [tokens[0, :12]]
    controls = (unit_directions(tiny, 1, seed=5, head=0) + unit_directions(tiny, 1, seed=6, head=2))
    study = install.install_study(tiny, prompts, LAYER, [0, 2], controls, multipliers=(2.0,), max_new_tokens=3,
                                  rank_range=(10, 40), n_targets=2, scopes=("head", "layer", "layers"))
    runs = study["runs"]
    by_scope = {scope: [r for r in runs if r["scope"] == scope] for scope in install.SCOPES}
    n_units = len(tiny.cfg.gdn_layers) * tiny.cfg.n_value_heads
    assert {r["units"] for r in by_scope["layer"]} == {2} and {r["units"] for r in by_scope["layers"]} == {n_units}
    assert {r["head"] for r in by_scope["layer"] + by_scope["layers"]} == {None}
    # the joint aimed install's first-order gain and offset are the sums of each head's alone
    for joint in [r for r in by_scope["layer"] if r["kind"] == "aimed"]:
        alone = [r for r in by_scope["head"] if (r["kind"], r["target"]) == ("aimed", joint["target"])]
        assert len(alone) == 2
        assert joint["gain"] == pytest.approx(sum(r["gain"] for r in alone), rel=1e-5)
        assert joint["predicted_lift"] == pytest.approx(sum(r["predicted_lift"] for r in alone), rel=1e-5, abs=1e-6)
    # the joint control puts each head's own control in it, scored on every target
    joint_random = [r for r in by_scope["layer"] if r["kind"] == "random"]
    assert [r["label"] for r in joint_random] == ["random 0 of each head"] * 2
    # every unit's aimed direction maximises its own gain, so the joint aimed install beats joint random ones
    for y in {r["target"] for r in by_scope["layers"]}:
        aimed = next(r for r in by_scope["layers"] if (r["kind"], r["target"]) == ("aimed", y))
        random = next(r for r in by_scope["layers"] if (r["kind"], r["target"]) == ("random", y))
        assert aimed["gain"] > random["gain"]


def test_pick_targets_ranks_lie_in_range(tiny, tokens):
    prompt = tokens[:, :12]
    targets = install.pick_targets(tiny, prompt, rank_range=(10, 40), n=6, seed=2)
    with torch.no_grad():
        logits = tiny(prompt)[0, -1]
    ranks = [int((logits > logits[t]).sum()) for t in targets]
    assert len(set(targets)) == 6 and all(10 <= r < 40 for r in ranks)
    assert targets == install.pick_targets(tiny, prompt, rank_range=(10, 40), n=6, seed=2)  # seeded
