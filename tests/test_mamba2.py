"""Mamba-2 (`hooked_gdn.mamba2`): the erase-free recurrence against references, parity with transformers'
``Mamba2ForCausalLM``, carried edits, generation, refusals, and WriteSAE end to end on its states."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig
from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.census import memory_census
from hooked_gdn.delta_rule import SCALAR_DECAY, chunked_gated_delta_rule, gated_delta_rule, gated_delta_rule_reference
from hooked_gdn.effective_attention import effective_attention
from hooked_gdn.loading import hf_to_hooked_state_dict
from hooked_gdn.mamba2 import HookedMamba2
from hooked_gdn.pretrained import PRETRAINED_MODELS, heldout_loss
from hooked_gdn.sites import edit_at_positions, gdn_hook_name, site_name
from writesae import BilinearMatrixSAE
from writesae.evals import downstream_metrics
from writesae.experiments import logit_shift
from writesae.patching import get_act_patch_sae_features, sae_acts_name
from writesae.splice import HookedSAEMamba2
from writesae.store import ActivationStore, StoreConfig
from writesae.train import TrainConfig, train

from .conftest import tiny_hf_config
from .test_delta_rule import assert_close, edits_for, random_inputs

# ---------------------------------------------------------------- the recurrence without the erase term


def ssd_inputs(seed, b, T, H, G, N, P):
    """Mamba-2's own inputs: x [b,T,H,P], Δ [b,T,H] > 0, A [H] < 0, B and C [b,T,G,N], h_0 [b,H,N,P]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, T, H, generator=g))
    A = -torch.rand(H, generator=g) * 3
    B, C = torch.randn(b, T, G, N, generator=g), torch.randn(b, T, G, N, generator=g)
    return x, dt, A, B, C, torch.randn(b, H, N, P, generator=g)


def as_delta_rule(x, dt, A, B, C):
    """The delta rule's q̂, k̂, v, g, β for the same recurrence: C and B per head, x, Δ A, Δ."""
    heads = x.shape[2] // B.shape[2]
    return C.repeat_interleave(heads, 2), B.repeat_interleave(heads, 2), x, dt * A, dt


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 40), G=st.sampled_from([1, 2]), chunk_size=st.sampled_from([1, 8, 64]))
def test_erase_free_recurrence_equals_mamba2_in_its_own_symbols(seed, T, G, chunk_size):
    """The sequential reference with the SCALAR_DECAY transition is h_t = exp(Δ_t A) h_{t−1} + B_t (Δ_t x_t)ᵀ, y_t = h_tᵀ C_t,
    written here in Mamba-2's symbols; the chunked form agrees with it, and with transformers' own SSD scan."""
    b, H, N, P = 2, 4, 6, 5
    x, dt, A, B, C, h0 = ssd_inputs(seed, b, T, H, G, N, P)
    q, k, v, g, beta = as_delta_rule(x, dt, A, B, C)
    h, ys, hs = h0, [], []
    for t in range(T):
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + k[:, t, :, :, None] * (dt[:, t, :, None] * x[:, t])[:, :, None, :]
        ys.append(torch.einsum("bhnp,bhn->bhp", h, q[:, t]))
        hs.append(h)
    ref = gated_delta_rule_reference(q, k, v, g, beta, h0, transition=SCALAR_DECAY)
    assert_close(ref.out, torch.stack(ys, 1), 1e-5)
    assert_close(ref.states, torch.stack(hs, 1), 1e-5)
    assert_close(ref.write_value, dt[..., None] * x, 1e-6)

    positions = torch.randperm(T, generator=torch.Generator().manual_seed(seed))[: max(1, T // 3)].sort().values
    fast = chunked_gated_delta_rule(q, k, v, g, beta, h0, positions, chunk_size, transition=SCALAR_DECAY)
    assert_close(fast.out, ref.out)
    assert_close(fast.final_state, ref.final_state)
    assert_close(fast.states, ref.states[:, positions])
    theirs, final = mamba2_chunk_scan(x, dt, A, B, C, chunk_size=max(chunk_size, 2), initial_states=h0.transpose(-1, -2),
                                      return_final_states=True)
    assert_close(fast.out, theirs)
    assert_close(fast.final_state, final.transpose(-1, -2))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), T=st.integers(4, 40), chunk_size=st.sampled_from([4, 16]),
       kind=st.sampled_from(["delete", "replace", "state_one", "state_several"]))
def test_erase_free_edits_carried_exactly(seed, T, chunk_size, kind):
    b, H, d_k, d_v = 2, 2, 8, 5
    q, k, v, g, beta, initial = random_inputs(seed, b, T, H, d_k, d_v)
    edits = edits_for(seed, b, T, H, d_k, d_v, kind)
    ref = gated_delta_rule_reference(q, k, v, g, beta, initial, edits, transition=SCALAR_DECAY)
    fast = gated_delta_rule(q, k, v, g, beta, initial, torch.arange(T), edits, chunk_size, transition=SCALAR_DECAY)
    assert_close(fast.out, ref.out)
    assert_close(fast.write_value, ref.write_value)
    assert_close(fast.states, ref.states)
    clean = gated_delta_rule_reference(q, k, v, g, beta, initial, transition=SCALAR_DECAY)
    first = edits.positions()[0]
    assert torch.equal(ref.out[:, :first], clean.out[:, :first])
    assert not torch.allclose(ref.out[:, first:], clean.out[:, first:])
    with_erase = gated_delta_rule_reference(q, k, v, g, beta, initial, edits)
    assert not torch.allclose(with_erase.out, ref.out)  # the flag is the erase term, and it matters


# ---------------------------------------------------------------- the model against transformers

TINY = {
    "groups": dict(num_heads=4, head_dim=8, state_size=6, n_groups=2, hidden_size=16, num_hidden_layers=2, use_bias=True),
    "one_group_tied": dict(num_heads=3, head_dim=6, state_size=10, n_groups=1, hidden_size=9, num_hidden_layers=3,
                           tie_word_embeddings=True, use_conv_bias=False),
}


def tiny_config(name="groups", **overrides) -> Mamba2Config:
    kwargs = dict(vocab_size=61, expand=2, chunk_size=8, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                  tie_word_embeddings=False) | TINY[name] | overrides
    return Mamba2Config(**kwargs)


def perturb_(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every weight off its initialisation (A, D, norms, biases too), so that tests see each of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(name="checkpoint", scope="module")
def checkpoint_fixture(tmp_path_factory):
    """``checkpoint(name)``: a perturbed random transformers Mamba-2, saved once."""
    folders = {}

    def folder(name="groups"):
        if name not in folders:
            torch.manual_seed(0)
            hf = perturb_(Mamba2ForCausalLM(tiny_config(name)).eval())
            folders[name] = tmp_path_factory.mktemp(f"mamba2-{name}")
            hf.save_pretrained(folders[name])
        return folders[name]

    return folder


def pair(folder):
    return Mamba2ForCausalLM.from_pretrained(folder).eval(), HookedMamba2.from_pretrained(folder).eval()


TOKENS = torch.randint(2, 61, (2, 21), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("length", [1, 7, 21])
def test_logits_match_transformers_fp32(checkpoint, name, length):
    hf, ours = pair(checkpoint(name))
    with torch.no_grad():
        assert (ours(TOKENS[:, :length]) - hf(TOKENS[:, :length]).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(TINY))
def test_gradients_match_transformers(checkpoint, name):
    """The chunked recurrence's backward: the loss's gradient in every parameter equals transformers' (its reference
    forward under autograd), mapped to our names and layouts by the loader's own map; the pad token's row of W_E
    included (transformers' Mamba-2 embedding has no padding_idx)."""
    hf, ours = pair(checkpoint(name))
    tokens = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(1))
    assert (tokens == ours.cfg.pad_token_id).any()
    ours(tokens, "loss").backward()
    hf(tokens, labels=tokens).loss.backward()
    expected = hf_to_hooked_state_dict({n: p.grad for n, p in hf.named_parameters()}, ours.cfg)
    assert set(expected) == {n for n, _ in ours.named_parameters()}
    for n, p in ours.named_parameters():
        assert (p.grad - expected[n]).abs().max().item() <= 1e-5 * expected[n].abs().max().item() + 1e-8, n


@pytest.mark.parametrize("name", list(TINY))
def test_left_padding_matches_transformers_and_the_unpadded_run(checkpoint, name):
    """Padding equals no padding only without in_proj's bias: with it, padding's projection (the bias)
    enters the conv window of the first real tokens, in transformers as here."""
    hf, ours = pair(checkpoint(name))
    mask = torch.ones_like(TOKENS)
    mask[0, :6] = 0
    with torch.no_grad():
        padded = ours(TOKENS, attention_mask=mask)
        assert (padded - hf(TOKENS, attention_mask=mask).logits)[mask.bool()].abs().max().item() <= 1e-4
        unpadded_gap = (padded[0, 6:] - ours(TOKENS[:1, 6:])[0]).abs().max().item()
    assert unpadded_gap <= 1e-4 if not ours.cfg.use_bias else unpadded_gap > 1e-3


def test_greedy_generation_equals_transformers(checkpoint):
    hf, ours = pair(checkpoint())
    mask = torch.ones_like(TOKENS[:, :9])
    mask[1, :3] = 0
    theirs = hf.generate(TOKENS[:, :9], attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(TOKENS[:, :9], attention_mask=mask, max_new_tokens=12, stop_at_eos=False), theirs)


def test_from_config_is_transformers_initialisation():
    model = HookedMamba2.from_config(tiny_config())
    mixer = model.blocks[0].linear_attn
    torch.testing.assert_close(mixer.A_log.exp(), torch.arange(1.0, 5.0))
    assert torch.equal(mixer.D, torch.ones(4))
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert bool(((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all())


def test_mamba1_and_unimplemented_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Mamba-1"):
        HookedMamba2.from_config(MambaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1))
    with pytest.raises(ValueError, match="time_step_limit"):
        HookedMamba2.from_config(tiny_config(time_step_limit=(0.0, 0.1)))
    with pytest.raises(ValueError, match="hidden_act"):
        HookedMamba2.from_config(tiny_config(hidden_act="gelu"))
    with pytest.raises(ValueError, match="HookedMamba2 builds Mamba-2 models; this is a Qwen3.5 config .* use HookedGatedDeltaNet"):
        HookedMamba2.from_config(tiny_hf_config())


def test_the_one_model_class_builds_mamba2():
    """``HookedGatedDeltaNet`` builds (and loads) Mamba-2 too; ``HookedMamba2`` is the same class restricted."""
    torch.manual_seed(0)
    general = HookedGatedDeltaNet.from_config(tiny_config())
    torch.manual_seed(0)
    named = HookedMamba2.from_config(tiny_config())
    assert isinstance(named, HookedGatedDeltaNet) and type(general.blocks[0]) is type(named.blocks[0])
    assert general.cfg == named.cfg
    assert all(torch.equal(a, b) for a, b in zip(general.state_dict().values(), named.state_dict().values()))


# ---------------------------------------------------------------- hooks, edits and generation


@pytest.fixture(name="model")
def model_fixture(checkpoint):
    return HookedMamba2.from_pretrained(checkpoint()).eval()


def test_hooks_have_the_gdn_names_and_mamba2_shapes(model):
    names = ["hook_read_query", "hook_write_key", "hook_write_value", "hook_beta", "hook_log_decay", "hook_state",
             "hook_final_state", "hook_recurrence_out", "hook_q", "hook_k", "hook_v"]
    _, cache = model.run_with_cache(TOKENS, names_filter=[gdn_hook_name(1, n) for n in names], state_positions=[3, -1])
    got = {n: tuple(cache[gdn_hook_name(1, n)].shape) for n in names}
    assert got == {"hook_read_query": (2, 21, 4, 6), "hook_write_key": (2, 21, 4, 6), "hook_write_value": (2, 21, 4, 8),
                   "hook_beta": (2, 21, 4), "hook_log_decay": (2, 21, 4), "hook_state": (2, 2, 4, 6, 8),
                   "hook_final_state": (2, 4, 6, 8), "hook_recurrence_out": (2, 21, 4, 8), "hook_q": (2, 21, 2, 6),
                   "hook_k": (2, 21, 2, 6), "hook_v": (2, 21, 4, 8)}
    c = lambda n: cache[gdn_hook_name(1, n)]
    # the write is B_t (Δ_t x_t)ᵀ, the decay Δ_t A, and the read h_tᵀ C_t of the state
    assert_close(c("hook_write_value"), c("hook_beta")[..., None] * c("hook_v"), 1e-6)
    assert_close(c("hook_log_decay"), -c("hook_beta") * model.blocks[1].linear_attn.A_log.exp(), 1e-6)
    assert_close(c("hook_write_key")[:, :, ::2], c("hook_k"), 0)
    assert_close(c("hook_state")[:, 1], c("hook_final_state"), 1e-5)
    assert_close(torch.einsum("bhnp,bhn->bhp", c("hook_state")[:, 0], c("hook_read_query")[:, 3]),
                 c("hook_recurrence_out")[:, 3], 1e-5)


def test_sequential_equals_parallel_and_prefill_continues(model):
    with torch.no_grad():
        full = model(TOKENS)
        assert (model(TOKENS, recurrence="sequential") - full).abs().max().item() <= 1e-5
        cache = model.prefill(TOKENS[:, :13])
        assert (model(TOKENS[:, 13:], cache=cache) - full[:, 13:]).abs().max().item() <= 1e-5


EDITS = {  # hook, positions, the edit of a position's rows
    "delete_write": ("hook_write_value", [5, 11], lambda rows, t: torch.zeros_like(rows)),
    "replace_key": ("hook_write_key", [9], lambda rows, t: torch.randn(rows.shape, generator=torch.Generator().manual_seed(t))),
    # several state edits are carried as differences (docs/design.md §8.4), which agrees with the loop for added ones
    "state": ("hook_state", [4, 12], lambda rows, t: rows + torch.randn(rows.shape, generator=torch.Generator().manual_seed(t))),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_parallel_edits_equal_sequential_edits(model, case):
    hook, positions, edit = EDITS[case]
    hooks = [(gdn_hook_name(1, hook), edit_at_positions(edit, positions))]
    with torch.no_grad():
        clean = model(TOKENS)
        parallel = model.run_with_hooks(TOKENS, fwd_hooks=hooks)
        sequential = model.run_with_hooks(TOKENS, fwd_hooks=hooks, recurrence="sequential")
    first = positions[0]
    assert (parallel[:, :first] - clean[:, :first]).abs().max().item() <= 1e-6
    assert (parallel[:, -1] - clean[:, -1]).abs().max().item() > 1e-4  # carried to the end
    assert (parallel - sequential).abs().max().item() <= 1e-4


def test_deleting_the_write_equals_zeroing_b(model):
    """Δx is carried into the state only through B_t (Δ_t x_t)ᵀ; x also feeds D x_t, Δ the decay. So
    deleting the write at t (hook_write_value, an edit carried by the engine) equals B_t = 0 (hook_k,
    an input of the recurrence)."""
    t = 8
    with torch.no_grad():
        deleted = model.run_with_hooks(TOKENS, fwd_hooks=[(gdn_hook_name(0, "hook_write_value"),
                                                          edit_at_positions(lambda r, _: torch.zeros_like(r), [t]))])
        zero_b = model.run_with_hooks(TOKENS, fwd_hooks=[(gdn_hook_name(0, "hook_k"), lambda B, hook: B.index_fill(1, torch.tensor(t), 0.0))])
        clean = model(TOKENS)
    assert (deleted - zero_b).abs().max().item() <= 1e-5
    assert (deleted - clean).abs().max().item() > 1e-4


def test_write_hooks_fire_at_every_generation_step(model):
    fired = []
    hook = lambda x, hook: fired.append(x.shape[1])
    with model.hooks(fwd_hooks=[(gdn_hook_name(1, "hook_write_value"), hook)]):
        model.generate(TOKENS[:1, :5], max_new_tokens=4, stop_at_eos=False)
    assert fired == [5, 1, 1, 1]


def test_census_half_lives_are_those_of_the_weights():
    """With dt's rows of in_proj zeroed, Δ = softplus(dt_bias) at every position, so each head's
    half-life is ln 2 / (A softplus(dt_bias)) exactly, computed here from the weights alone."""
    torch.manual_seed(0)
    model = HookedMamba2.from_config(tiny_config()).eval()
    H = model.cfg.n_value_heads
    with torch.no_grad():
        for block in model.blocks:
            block.linear_attn.W_in[-H:] = 0  # the dt rows come last: z, x, B, C, dt
    census = memory_census(model, TOKENS, state_every=4)
    assert [(r.layer, r.head) for r in census.heads] == [(layer, h) for layer in range(2) for h in range(H)]
    for r in census.heads:
        mixer = model.blocks[r.layer].linear_attn
        half_life = math.log(2) / (mixer.A_log[r.head].exp() * torch.nn.functional.softplus(mixer.dt_bias[r.head])).item()
        assert r.half_life == pytest.approx((half_life,) * 3, rel=1e-4)
        assert 1 <= r.effective_rank <= min(model.cfg.d_key, model.cfg.d_value)


def test_logit_shift_propagator_is_the_decay_alone(model):
    """Without the erase term a state edit ε v wᵀ at t0 is carried as G_{t0→t} ε v wᵀ: the exact read
    change is the paper's decay-only form, and both equal the read change measured by editing the state."""
    t0, head, layer = 6, 2, 1
    g = torch.Generator().manual_seed(5)
    v, w = torch.randn(model.cfg.d_key, generator=g), torch.randn(model.cfg.d_value, generator=g)
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS[:1], names_filter=[gdn_hook_name(layer, s) for s in logit_shift.SITES])
    exact = logit_shift.exact_read_change(cache, layer, head, t0, v, w, 0.3)
    _, measured = logit_shift.measured_change(model, TOKENS[:1], layer, head, t0, v, w, 0.3)
    assert_close(exact, measured[t0:], 1e-4)
    assert_close(logit_shift.paper_read_change(cache, layer, head, t0, v, w, 0.3), exact, 1e-5)
    assert exact.abs().max() > 1e-3


# ---------------------------------------------------------------- WriteSAE on Mamba-2 states


HEADS = [0, 1, 2, 3]  # every head, so that patching all codes restores the whole state


def test_writesae_trains_splices_and_patches_on_mamba2_states(tmp_path):
    """One layer, so that patching every code of its state gives back the clean spliced run's logits."""
    torch.manual_seed(0)
    model = perturb_(HookedSAEMamba2.from_config(tiny_config(num_hidden_layers=1))).eval()
    g = torch.Generator().manual_seed(0)
    documents = [torch.randint(2, 61, (30,), generator=g) for _ in range(40)]
    store = ActivationStore(model, documents, StoreConfig(layer=0, heads=HEADS, context=12, positions="all", buffer_size=256,
                                                          model_batch_size=8, heldout_fraction=0.2))
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=32, k=4, heads=HEADS,
                            n_heads=model.cfg.n_value_heads, seed=0)
    result = train(sae, store, TrainConfig(out_dir=str(tmp_path), steps=30, batch_size=32, lr=1e-2, warmup_steps=3, log_every=1,
                                           eval_every=30, eval_samples=128, checkpoint_every=0, progress=False,
                                           input_scale_samples=128))
    assert result.sae.cfg.site == site_name(0, "state") and result.heldout_metrics["fvu"] < 0.9
    sae = result.sae.eval()

    with torch.no_grad():
        clean = model(TOKENS)
        exact = model.run_with_saes(TOKENS, saes=[sae], use_error_term=True)
        spliced = model.run_with_saes(TOKENS, saes=[sae], use_error_term=False)
    assert (exact - clean).abs().max().item() <= 1e-5
    assert (spliced - clean).abs().max().item() > 1e-4
    metrics = downstream_metrics(model, sae, TOKENS, "loop")
    assert metrics["kl_spliced"] > 0 and metrics["kl_zero_ablated"] > 0

    # patching every code from the clean spliced run into a corrupted one gives the clean spliced run
    corrupted = TOKENS[:1].clone()
    corrupted[0, 0] = TOKENS[0, 0] % 58 + 2
    with torch.no_grad():
        clean_spliced, cache = model.run_with_cache_with_saes(TOKENS[:1], saes=[sae], use_error_term=False,
                                                              names_filter=sae_acts_name(sae), recurrence="sequential")
    seen = []
    get_act_patch_sae_features(model, corrupted, cache, lambda logits: seen.append(logits) or logits[0, -1, 0], sae,
                               index_axis_names=(), use_error_term=False, show_progress=False)
    later = slice(model.cfg.conv_kernel, None)  # past the conv window over the corrupted token
    assert (seen[0][:, later] - clean_spliced[:, later]).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- the shipped mamba2-austen

SHIPPED = PRETRAINED_MODELS["mamba2-austen"]


def test_shipped_model_loads_offline_and_equals_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = HookedMamba2.from_pretrained("mamba2-austen").eval()
    assert model.tokenizer is not None and model.cfg.n_key_heads > 1
    assert sum(f.stat().st_size for f in SHIPPED.glob("*.safetensors")) <= 10 * 2**20  # bf16, a few M parameters
    hf = Mamba2ForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    tokens = model.to_tokens("Captain Wentworth had no fortune. He had been lucky in his profession.")
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_shipped_model_heldout_loss_matches_its_card():
    stats = json.loads((SHIPPED / "training_stats.json").read_text())
    assert f"{stats['heldout_loss']:.4f}" in (SHIPPED / "README.md").read_text()
    nats, bits_per_char = heldout_loss(HookedMamba2.from_pretrained("mamba2-austen").eval())
    assert nats == pytest.approx(stats["heldout_loss"], rel=0.005)
    assert bits_per_char == pytest.approx(stats["heldout_bits_per_char"], rel=0.005)


@pytest.mark.parametrize("over", ["writes", "inputs"])
def test_effective_attention_rebuilds_the_read(model, over):
    """Over the inputs the propagator is the decay alone (no erase): the decomposition equals the one
    over the writes, and both add back up to the read."""
    tokens = torch.randint(1, model.cfg.d_vocab, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, chunk_size=8)
    for layer in model.cfg.gdn_layers:
        ea = effective_attention(cache, layer, over)
        o = cache[gdn_hook_name(layer, "hook_recurrence_out")]
        assert (ea.out() - o).abs().max() <= 1e-5 * o.abs().max()
    writes, inputs = (effective_attention(cache, 1, over) for over in ("writes", "inputs"))
    torch.testing.assert_close(inputs.pattern, writes.pattern, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inputs.values, writes.values, rtol=1e-5, atol=1e-6)


def test_effective_attention_over_the_inputs_adds_up_on_the_shipped_model():
    """It did not (relative error 0.23 on layer 1): the erase of the delta rule was applied to B_t."""
    model = HookedMamba2.from_pretrained("mamba2-austen")
    tokens = model.to_tokens("Anne had been forced into prudence in her youth, she learned romance as she grew older.")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    o = cache[gdn_hook_name(1, "hook_recurrence_out")]
    assert (effective_attention(cache, 1, "inputs").out() - o).abs().max() <= 1e-5 * o.abs().max()
