"""WriteSAE's sites and tools on RWKV-7 (a tiny random checkpoint): the erase site (a_t ⊙ κ̂_t) e_tᵀ beside the state
and the write k̃_t v_tᵀ; store and cache samples; a few training steps; splicing, exact with the error term and, at
one position, the state edit by hand; patching; and the erase site refused where a family has no erase of its own.

Expected values are formed here from the model's cached hook points (and e_t from the state before it), independently
of the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from hooked_gdn.patching import Patch, generic_activation_patch, run_with_patches
from hooked_gdn.sites import Site, edit_at_positions, gdn_hook_name, parse_model_site, site_name
from writesae import BilinearMatrixSAE, FlatSAE, MatrixSAE
from writesae.dashboard import build_dashboard, key_factors
from writesae.disk_cache import CachedActivations, write_cache
from writesae.experiments import site_codes
from writesae.patching import get_act_patch_sae_features, sae_acts_name
from writesae.splice import HookedSAEGatedDeltaNet, zero_ablation_hooks
from writesae.store import ActivationStore, StoreConfig
from writesae.train import TrainConfig, train

from .conftest import random_tiny_model
from .rwkv7_models import random_blinkdl_state, save_fla
from .test_mamba2 import tiny_config as tiny_mamba2_config

LAYER = 1  # the second layer, so v_first couples it to layer 0
KINDS = ("state", "write", "erase")
TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(name="model", scope="module")
def model_fixture(tmp_path_factory):
    folder = save_fla(random_blinkdl_state(), tmp_path_factory.mktemp("rwkv7"))
    return HookedSAEGatedDeltaNet.from_pretrained(folder).eval()


def layer_hook(name: str) -> str:
    return gdn_hook_name(LAYER, name)


def make_sae(model, kind: str, cls=BilinearMatrixSAE, heads="all", n_features: int = 16):
    return cls(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=n_features, k=4, sparsity="topk",
               site=site_name(LAYER, kind), heads=heads, seed=0)


def expected_sites(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each site's matrix at every position [b, T, H, d_k, d_v], from the cached hooks of the sequential recurrence
    (the tools run the parallel one); e_t checked against the state before position t (S_{−1} = 0), not the
    decayed one."""
    names = [layer_hook(h) for h in ("hook_state", "hook_write_key", "hook_write_value", "hook_erase_rate",
                                     "hook_erase_key", "hook_erase_value")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names, recurrence="sequential")
    c = {name.rsplit("hook_", 1)[1]: cache[name] for name in names}
    before = torch.cat([torch.zeros_like(c["state"][:, :1]), c["state"][:, :-1]], 1)  # S_{t−1}
    erase_value = -torch.einsum("bthkv,bthk->bthv", before, c["erase_key"])
    torch.testing.assert_close(c["erase_value"], erase_value, rtol=1e-4, atol=1e-5)
    erase_key = c["erase_rate"] * c["erase_key"]
    return {"state": c["state"], "write": c["write_key"][..., :, None] * c["write_value"][..., None, :],
            "erase": erase_key[..., :, None] * c["erase_value"][..., None, :]}


def documents(n: int = 8, length: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 256, (length,), generator=g) for _ in range(n)]


def make_store(model, kind: str, **kw) -> ActivationStore:
    cfg = dict(layer=LAYER, kind=kind, context=8, positions=[0, 3, -1], buffer_size=24, model_batch_size=4,
               heldout_fraction=0.25) | kw
    return ActivationStore(model, documents(), StoreConfig(**cfg))


def test_the_sites_are_the_state_the_write_and_the_erase(model):
    assert [parse_model_site(site_name(LAYER, kind), model) for kind in KINDS] == [Site(LAYER, kind) for kind in KINDS]
    assert Site(LAYER, "erase").key_hooks == [layer_hook("hook_erase_rate"), layer_hook("hook_erase_key")]
    assert Site(LAYER, "erase").value_hook == layer_hook("hook_erase_value") == site_name(LAYER, "erase")
    assert Site(LAYER, "write").key_hooks == [layer_hook("hook_write_key")]
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter=lambda name: name.startswith(f"blocks.{LAYER}.linear_attn.hook_erase"))
    for short in ("erase_rate", "erase_key", "erase_value"):  # the erase's hooks by their short names, as GDN's
        assert cache[short, LAYER] is cache[layer_hook(f"hook_{short}")]


@pytest.mark.parametrize("kind", KINDS)
def test_store_samples_are_the_site_at_their_origins_and_the_cache_holds_them(model, kind, tmp_path):
    store = make_store(model, kind, heads=[1])
    x, origin = store.next_batch(12, with_origin=True)
    tokens = torch.stack([store.context_tokens(c) for c in origin[:, 0].tolist()])
    expected = expected_sites(model, tokens)[kind][torch.arange(12), origin[:, 1]][:, [1]]
    assert x.shape == (12, 1, 64, 64)
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-5)  # the store runs the parallel recurrence
    assert x[origin[:, 1] > 0].abs().amax(dim=(1, 2, 3)).min() > 0  # only position 0's erase is 0: it reads S_{−1} = 0
    write_cache(make_store(model, kind, heads=[1]), tmp_path, model_name="tiny", corpus="random", shard_samples=6,
                progress=False, log=None)
    cached = CachedActivations(tmp_path, buffer_size=24)
    for from_cache, from_store in zip(cached.heldout_batches(6), store.heldout_batches(6), strict=True):
        torch.testing.assert_close(from_cache, from_store)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.filterwarnings("ignore:step 3. held-out FVU above 1")  # 3 steps: undertrained, as the warning says
def test_a_writesae_trains_on_each_site(model, kind, tmp_path):
    store = make_store(model, kind, positions="all", buffer_size=64)
    result = train(make_sae(model, kind), store, TrainConfig(
        out_dir=str(tmp_path), steps=3, batch_size=16, warmup_steps=1, log_every=1, eval_every=3, eval_samples=16,
        input_scale_samples=32, checkpoint_every=0, progress=False))
    assert result.step == 3
    assert all(math.isfinite(v) for v in result.train_metrics.values() if isinstance(v, float))
    assert math.isfinite(result.heldout_metrics["fvu"])


@pytest.mark.parametrize("kind, cls", [("state", FlatSAE), ("write", MatrixSAE), ("erase", BilinearMatrixSAE),
                                       ("erase", FlatSAE)])
@pytest.mark.parametrize("recurrence", ["parallel", "sequential"])
def test_the_error_term_makes_a_splice_exact(model, kind, cls, recurrence):
    sae = make_sae(model, kind, cls)
    with torch.no_grad():
        clean = model(TOKENS)
        exact = model.run_with_saes(TOKENS, saes=[sae], use_error_term=True, recurrence=recurrence)
        spliced = model.run_with_saes(TOKENS, saes=[sae], use_error_term=False, recurrence=recurrence)
    assert (exact - clean).abs().max().item() <= 1e-5
    assert (spliced - clean).abs().max().item() > 1e-3  # a random SAE does change the model


@pytest.mark.parametrize("kind", ["write", "erase"])
@pytest.mark.parametrize("recurrence", ["parallel", "sequential"])
def test_a_splice_at_one_position_is_the_state_edit_by_hand(model, kind, recurrence):
    t, head = 7, 1
    sae = make_sae(model, kind, heads=head)
    with torch.no_grad():
        x = expected_sites(model, TOKENS)[kind][:, t, head]
        difference = sae(x[:, None])[:, 0] - x

        def add(states, hook):
            states = states.clone()
            states[:, 0, head] += difference
            return states

        by_hand = model.run_with_hooks(TOKENS, fwd_hooks=[(site_name(LAYER, "state"), add)], state_positions=[t])
        spliced = model.run_with_saes(TOKENS, saes=[sae], state_positions=[t], recurrence=recurrence)
    assert (by_hand - model(TOKENS)).abs().max().item() > 1e-3
    assert (spliced - by_hand).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["write", "erase"])
def test_a_splice_after_a_cached_prefix_reads_its_own_positions(model, kind):
    """Continuing from a prefix's cache, the erase's rate and key fire with the new positions only, numbered from
    the prefix's length: the splice must pair them with the erase values of the same positions."""
    sae = make_sae(model, kind, heads=1)
    with torch.no_grad():
        in_the_loop = model.run_with_saes(TOKENS, saes=[sae], recurrence="sequential")
        at_12 = model.run_with_saes(TOKENS, saes=[sae], state_positions=[12])
        with model.saes([sae]):
            cache = model.prefill(TOKENS[:, :9], recurrence="sequential")
            continued_in_the_loop = model(TOKENS[:, 9:], cache=cache, recurrence="sequential")
            cache = model.prefill(TOKENS[:, :9], state_positions=[])
            continued_at_12 = model(TOKENS[:, 9:], cache=cache, state_positions=[3])
    assert (continued_in_the_loop - in_the_loop[:, 9:]).abs().max().item() <= 1e-5
    assert (continued_at_12 - at_12[:, 9:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["write", "erase"])
@pytest.mark.parametrize("recurrence", ["parallel", "sequential"])
def test_zero_ablation_at_one_position_is_the_forced_deletion_through_the_hooks(model, kind, recurrence):
    """Zeroing the site on a head at t (a state difference) equals deleting that write or erase through its value
    hook (a forced write or erase of zero, carried by the memory)."""
    t, head = 6, 0
    sae = make_sae(model, kind, heads=head)

    def zero_value(rows, position):
        rows[:, head] = 0
        return rows

    with torch.no_grad():
        ablated = model.run_with_hooks(TOKENS, fwd_hooks=zero_ablation_hooks(model, sae), state_positions=[t],
                                       recurrence=recurrence)
        forced = model.run_with_hooks(TOKENS, fwd_hooks=[(site_name(LAYER, kind), edit_at_positions(zero_value, t))],
                                      recurrence=recurrence)
    assert (forced - model(TOKENS)).abs().max().item() > 1e-4
    assert (ablated - forced).abs().max().item() <= 1e-4


@pytest.mark.parametrize("activation", ["state", "write"])
def test_patching_the_clean_run_at_one_position_is_the_forced_edit(model, activation):
    t = 5
    clean_tokens, corrupted = TOKENS[:1], TOKENS[1:]
    names = [layer_hook(h) for h in ("hook_state", "hook_write_key", "hook_write_value")]
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_tokens, names_filter=names)
        _, own = model.run_with_cache(corrupted, names_filter=names)
        hooks = ("hook_state",) if activation == "state" else ("hook_write_key", "hook_write_value")
        patched = run_with_patches(model, corrupted, [Patch(layer_hook(h), clean[layer_hook(h)], (t,)) for h in hooks])
        put = lambda h: edit_at_positions(lambda rows, position: clean[layer_hook(h)][:, position].clone(), t)
        by_hand = model.run_with_hooks(corrupted, fwd_hooks=[(layer_hook(h), put(h)) for h in hooks], state_positions=[t])
        metric = lambda logits: logits[0, -1].logsumexp(-1) - logits[0, -1, 0]
        unchanged = generic_activation_patch(model, corrupted, own, metric, activation, ("pos",), layers=[LAYER],
                                             positions=[2, t], show_progress=False)
        baseline = metric(model(corrupted))
    assert (patched - model(corrupted)).abs().max().item() > 1e-4
    assert (patched - by_hand).abs().max().item() <= 1e-5
    torch.testing.assert_close(unchanged, baseline.expand(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["state", "erase"])
def test_patching_sae_features_from_the_run_itself_changes_nothing(model, kind):
    sae = make_sae(model, kind)
    tokens = TOKENS[:1, :8]
    with torch.no_grad():
        clean, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True,
                                                      names_filter=sae_acts_name(sae))
    metric = lambda logits: logits[0, -1, 3]
    grid = get_act_patch_sae_features(model, tokens, cache, metric, sae, features=[0, 1], index_axis_names=("pos",),
                                      show_progress=False)
    torch.testing.assert_close(grid, clean[0, -1, 3].expand(8), rtol=1e-5, atol=1e-5)


def test_the_dashboard_of_an_erase_sae_codes_the_erase_and_aligns_the_erase_key(model):
    head = 1
    sae = make_sae(model, "erase", heads=[head], n_features=8)
    dashboard = build_dashboard(model, sae, TOKENS, n_contexts=2, n_keys=3, n_logits=3, ablation_firings=1, batch_size=2,
                                progress=False)
    with torch.no_grad():
        codes = sae.encode(expected_sites(model, TOKENS)["erase"][:, :, [head]])[:, :, 0]  # [b, T, n]
        _, cache = model.run_with_cache(TOKENS, names_filter=[layer_hook("hook_erase_rate"), layer_hook("hook_erase_key")])
    erase_key = (cache[layer_hook("hook_erase_rate")] * cache[layer_hook("hook_erase_key")])[:, :, head]  # a ⊙ κ̂ [b, T, d_k]
    torch.testing.assert_close(site_codes(model, sae, TOKENS)[:, :, 0], codes, rtol=1e-4, atol=1e-5)  # the experiments' codes
    assert dashboard.features
    for card in dashboard.features:
        assert card.n_firings == int((codes[..., card.feature] > 0).sum())
        alignment = erase_key @ key_factors(sae)[0, card.feature]
        assert card.keys_aligned[0].alignment == pytest.approx(alignment.max().item(), abs=1e-5)
        assert card.keys_opposed[0].alignment == pytest.approx(alignment.min().item(), abs=1e-5)


@pytest.mark.parametrize("family", ["grouped", "mamba2"])
def test_the_erase_site_is_refused_where_the_family_has_no_erase_of_its_own(family):
    model = (random_tiny_model(HookedSAEGatedDeltaNet) if family == "grouped"
             else HookedSAEGatedDeltaNet.from_config(tiny_mamba2_config()))
    layer = model.cfg.gdn_layers[0]
    name, why = ("Qwen3.5", "its erase is part of its write") if family == "grouped" else ("Mamba-2", "it has no erase")
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=8, k=2, site=site_name(layer, "erase"))
    for refuse in (lambda: model.add_sae(sae), lambda: ActivationStore(model, documents(), layer=layer, kind="erase")):
        with pytest.raises(ValueError, match=f"the erase site exists only in layers with an erase term of their own .*"
                                             f"is a {name} model, and {why}"):
            refuse()
