"""The read of a GDN head as (past write, write-SAE feature) terms (writesae.memory_attribution).

Checked against what we did not write: the model's own read (``hook_recurrence_out``), the plain sequential
recurrence in transition form (S_t = α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ, looped here from the cached
v, β, g, k̂, never from δ), and TransformerLens' ``apply_ln_to_stack`` + ``logit_attrs`` for the direct logit
effect. On random tiny models with slow decays (old writes matter), grouped heads, odd lengths, SAEs with a
decoder bias, an input scale and a subset of heads in a shuffled order; and on the shipped gdn-austen with its
shipped write SAE.
"""

from __future__ import annotations

import pytest
import torch

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.sites import gdn_hook_name, site_name
from tests.conftest import tiny_hf_config
from tests.test_effective_attention import relative_error, slow_decays_
from writesae.memory_attribution import (memory_attribution, memory_view, memory_view_html, rebuilt_state, state_parts,
                                         top_terms)
from writesae.sae import ARCHITECTURES

TOLERANCE = 1e-5


def slow_decay_model(name: str = "grouped") -> HookedGatedDeltaNet:
    """A random tiny model whose GDN decays are slow (α ≈ 0.994, `slow_decays_`), so that writes far back are a
    real part of every read."""
    torch.manual_seed(0)
    return slow_decays_(HookedGatedDeltaNet.from_config(tiny_hf_config(name)).eval())


def random_write_sae(model, layer: int, architecture: str = "bilinear", heads=(3, 1, 0), rank: int = 1,
                     input_scale: float = 1.0, seed: int = 0):
    """A random write SAE with a non-zero decoder bias (so the bias terms are seen) and codes of every sign the
    sparsity allows."""
    cfg = model.cfg
    options = dict(rank=rank) if architecture != "flat" else {}
    sae = ARCHITECTURES[architecture](d_k=cfg.d_key, d_v=cfg.d_value, n_features=24, k=5, site=site_name(layer, "write"),
                                      heads=list(heads), n_heads=cfg.n_value_heads, input_scale=input_scale, seed=seed,
                                      **options)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return sae.eval()


def one_sequence_run(length: int, seed: int, layer_index: int):
    """`slow_decay_model`, one random sequence of ``length`` tokens (seeded), its full cache, its GDN layer
    ``layer_index`` and a `random_write_sae` there."""
    model = slow_decay_model()
    tokens = torch.randint(1, 101, (1, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    layer = model.cfg.gdn_layers[layer_index]
    return model, tokens, cache, layer, random_write_sae(model, layer)


def sequential_states(cache, layer: int, head: int, sequence: int, initial=None) -> torch.Tensor:
    """S_t for every t by the plain recurrence in transition form [T, d_k, d_v], from v, β, g, k̂ alone."""
    get = lambda hook: cache[gdn_hook_name(layer, hook)][sequence, :, head].double()
    k, v, g, beta = get("hook_write_key"), get("hook_v"), get("hook_log_decay"), get("hook_beta")
    state = torch.zeros(k.shape[-1], v.shape[-1], dtype=torch.float64) if initial is None else initial.double()
    states = []
    for t in range(k.shape[0]):
        erase = torch.eye(k.shape[-1], dtype=torch.float64) - beta[t] * torch.outer(k[t], k[t])
        state = g[t].exp() * erase @ state + beta[t] * torch.outer(k[t], v[t])
        states.append(state)
    return torch.stack(states)


def tl_direct_logits(model, cache, layer: int, head: int, tokens: torch.Tensor) -> torch.Tensor:
    """The head's direct logit effect [b, T] on ``tokens`` [b, T] by TransformerLens: its W_o slice of the
    cached gated output, through ``logit_attrs`` (which divides by the run's final-norm scale, ``apply_ln_to_stack``)."""
    d_v = model.cfg.d_value
    W_o = model.blocks[layer].linear_attn.W_o[:, head * d_v:(head + 1) * d_v]
    head_out = cache[gdn_hook_name(layer, "hook_gated_out")][:, :, head] @ W_o.T  # [b, T, d_model]
    return cache.logit_attrs(head_out[None], tokens)[0].detach()


@pytest.mark.parametrize("config, length", [("grouped", 23), ("one_key_head", 37)])
@pytest.mark.parametrize("architecture, rank, input_scale", [("bilinear", 1, 1.0), ("bilinear", 2, 3.0),
                                                             ("matrix", 1, 0.5), ("flat", 1, 2.0)])
def test_terms_sum_to_the_read_and_to_the_direct_logit_effect(config, length, architecture, rank, input_scale):
    model = slow_decay_model(config)
    tokens = torch.randint(1, 101, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, chunk_size=8)
    layer = model.cfg.gdn_layers[-1]
    heads = (2, 0) if model.cfg.n_value_heads == 3 else (3, 1, 0)
    sae = random_write_sae(model, layer, architecture, heads, rank, input_scale)
    positions = [0, 1, length // 2, length - 2]
    next_tokens = tokens[1, [p + 1 for p in positions]]
    for head in heads:
        a = memory_attribution(model, cache, sae, head, positions, sequence=1, logit_tokens=next_tokens[:, None])
        o = cache[gdn_hook_name(layer, "hook_recurrence_out")][1, positions, head]
        assert relative_error(a.read.float(), o) == 0
        assert relative_error(a.total_read(), o.double()) < TOLERANCE
        # the error and bias terms are real parts of the read, and the feature terms more than them
        assert relative_error(a.total_read() - a.error_reads.sum(1), o.double()) > 1e-3
        assert relative_error(a.total_read() - a.bias_reads.sum(1), o.double()) > 1e-3
        # writes from the future contribute nothing
        assert not a.feature_reads[0, 1:].any() and not a.error_reads[0, 1:].any()
        tl = tl_direct_logits(model, cache, layer, head, tokens.roll(-1, 1))[1, positions]
        assert relative_error(a.direct_logits[:, 0], tl.double()) < TOLERANCE
        assert relative_error(a.total_logits()[:, 0], tl.double()) < TOLERANCE


def test_terms_match_the_plain_sequential_recurrence_and_rebuild_the_state():
    """Against a recurrence we loop ourselves, with an initial state from a prefix."""
    model = slow_decay_model()
    g = torch.Generator().manual_seed(3)
    prefix, continuation = torch.randint(1, 101, (2, 9), generator=g), torch.randint(1, 101, (2, 17), generator=g)
    with torch.no_grad():
        prefix_cache = model.prefill(prefix)
        initial = dict(prefix_cache.recurrent_states)  # the forward below replaces these entries
        _, cache = model.run_with_cache(continuation, cache=prefix_cache)
    layer = model.cfg.gdn_layers[0]
    sae = random_write_sae(model, layer, input_scale=2.0)
    for head in (3, 1):
        positions = list(range(17))
        a = memory_attribution(model, cache, sae, head, positions, sequence=0, initial_state=initial[layer])
        states = sequential_states(cache, layer, head, 0, initial[layer][0, head])
        q_hat = cache[gdn_hook_name(layer, "hook_read_query")][0, :, head].double()
        reads = torch.einsum("tkv,tk->tv", states, q_hat)
        assert relative_error(a.total_read(), reads) < TOLERANCE
        assert relative_error(a.total_read() - a.initial_read, reads) > 0.01  # the prefix's state is read
        rebuilt, n_atoms = rebuilt_state(a, sae)
        errors, initial_part = state_parts(a)
        assert relative_error(rebuilt + errors + initial_part, states) < TOLERANCE
        assert relative_error(rebuilt + errors, states) > 0.01
        assert n_atoms.tolist() == [int((a.codes[: t + 1] != 0).sum()) for t in positions]


def test_rebuilt_state_keeps_the_largest_terms():
    model, tokens, cache, layer, sae = one_sequence_run(length=15, seed=2, layer_index=1)
    a = memory_attribution(model, cache, sae, 1, [14])
    rebuilt, _ = rebuilt_state(a, sae)
    some, n_atoms = rebuilt_state(a, sae, top=4)
    assert n_atoms.tolist() == [4]
    # by hand: the four (j, i) terms of largest ‖G a atom‖, plus the bias Σ_j G b_dec
    atoms, norms = (x[sae.cfg.dictionary(1)].detach().double() for x in (sae.atoms(), sae.atom_norms()))
    weights = a.decay[0, :, None] * a.codes
    order = (weights.abs() * norms[a.features]).flatten().topk(4).indices
    expected = sum(weights.flatten()[i] * atoms[a.features.flatten()[i]] for i in order)
    expected = expected + a.decay[0].sum() * sae.b_dec[sae.cfg.dictionary(1)].detach().double()
    assert relative_error(some[0], expected) < 1e-10
    assert relative_error(some, rebuilt) > 1e-3
    without_bias, _ = rebuilt_state(a, sae, bias=False)
    bias = a.decay[0].sum() * sae.b_dec[sae.cfg.dictionary(1)].detach().double()
    assert relative_error(rebuilt - without_bias, bias[None]) < 1e-10


def test_top_terms_and_view():
    model, tokens, cache, layer, sae = one_sequence_run(length=21, seed=4, layer_index=0)
    a = memory_attribution(model, cache, sae, 0, [20], logit_tokens=[5, 9])
    by_read = top_terms(a, 0, n=6)
    assert len(by_read) == 6
    sizes = [abs(t["read_projection"]) for t in by_read]
    assert sizes == sorted(sizes, reverse=True)
    # the largest |⟨term, ô⟩| over every active term, by hand
    unit = a.read[0] / a.read[0].norm()
    projections = (a.feature_reads[0] @ unit).masked_fill(a.codes == 0, 0)
    assert sizes[0] == pytest.approx(float(projections.abs().max()), rel=1e-9)
    far = top_terms(a, 0, n=100, min_distance=8)
    assert far and all(t["distance"] >= 8 for t in far)
    assert len(far) == int((a.codes[: 21 - 8] != 0).sum())
    by_logit = top_terms(a, 0, n=3, by="logit", token=1)
    assert abs(by_logit[0]["logit"]) == pytest.approx(float(a.feature_logits[0, ..., 1].abs().max()), rel=1e-9)
    view = memory_view(model, cache, sae, tokens, 0, 20, n=4)
    assert len(view["terms"]) == 4 and "direct_logit" not in view  # no next token at the last position
    view = memory_view(model, cache, sae, tokens, 0, 12, n=4)
    assert view["direct_logit"] == pytest.approx(sum(view["parts_logit"].values()), rel=1e-6)
    assert view["read_norm"] == pytest.approx(sum(view["parts_read_projection"].values()), rel=1e-6)
    html = memory_view_html(view)
    assert html.count("<tr>") == 5 and "what its memory retrieves" in html


def test_clear_errors():
    model, tokens, cache, layer, sae = one_sequence_run(length=9, seed=5, layer_index=0)
    state_sae = ARCHITECTURES["bilinear"](d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=8, k=2,
                                          site=site_name(layer, "state"), heads=0)
    with pytest.raises(ValueError, match="needs a write SAE"):
        memory_attribution(model, cache, state_sae, 0, [3])
    with pytest.raises(ValueError, match="head 2 has no dictionary"):
        memory_attribution(model, cache, sae, 2, [3])
    with pytest.raises(ValueError, match="query positions"):
        memory_attribution(model, cache, sae, 0, [9])
    with pytest.raises(ValueError, match="no logits"):
        top_terms(memory_attribution(model, cache, sae, 0, [3]), by="logit")
    with pytest.raises(ValueError, match="the cache lacks"):
        memory_attribution(model, {}, sae, 0, [3])


def test_mamba2_is_refused_with_what_it_would_need():
    from hooked_gdn.mamba2 import HookedMamba2
    from tests.test_mamba2 import tiny_config

    model = HookedMamba2.from_config(tiny_config()).eval()
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.randint(1, 61, (1, 7)))
    sae = ARCHITECTURES["bilinear"](d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=8, k=2,
                                    site=site_name(0, "write"), heads=0)
    with pytest.raises(NotImplementedError, match="Mamba-2 would need its output path"):
        memory_attribution(model, cache, sae, 0, [3])


def test_shipped_model_with_its_write_sae():
    from hooked_gdn.pretrained import heldout_windows
    from writesae import load_sae

    model = HookedGatedDeltaNet.from_pretrained("gdn-austen").eval()
    sae = load_sae("gdn-austen/L5-write").eval()
    tokens = heldout_windows(model.tokenizer, 257)[:1]  # an odd length
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    positions = [0, 40, 128, 255]
    next_tokens = tokens[0, [p + 1 for p in positions]][:, None]
    for head in range(4):
        a = memory_attribution(model, cache, sae, head, positions, logit_tokens=next_tokens)
        tl = tl_direct_logits(model, cache, 5, head, tokens.roll(-1, 1))[0, positions]
        assert relative_error(a.total_read(), a.read) < TOLERANCE
        assert relative_error(a.total_logits()[:, 0], tl.double()) < TOLERANCE
        assert relative_error(a.direct_logits[:, 0], tl.double()) < TOLERANCE
