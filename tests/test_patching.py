"""Activation patching over the GDN memory (hooked_gdn.patching).

- Patching everything equals the clean run: in a model of GDN layers only, the corruption (one
  token at position 0) reaches later positions only through the memory, so patching every state (or
  every write with its decay, or every read) of every layer and head gives the clean logits there.
- Patching nothing equals the corrupted run: patching from the corrupted run's own cache, or at
  positions before the corruption, leaves every grid entry at the corrupted metric.
- One position's state patch equals a hand-written hook in the sequential recurrence (the
  ground truth), on a hybrid with attention layers; so does a patch at two positions, which runs in
  the sequential recurrence itself.
"""

from __future__ import annotations

import pytest
import torch

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.patching import (
    Patch,
    activation_hooks,
    generic_activation_patch,
    get_act_patch_memory_every,
    get_act_patch_read,
    get_act_patch_state,
    get_act_patch_write,
    logit_diff_recovered,
    plot_patching_heatmap,
    position_labels,
    run_with_patches,
)
from hooked_gdn.sites import edit_at_positions, gdn_hook_name, hook_positions
from tests.conftest import random_tiny_model, tiny_hf_config

T = 12
CONV_REACH = 3  # a GDN layer's conv mixes the kernel's 4 positions: q̂_t, k̂_t, v_t see x_{t-3..t}


def gdn_only_model(layers: int = 2) -> HookedGatedDeltaNet:
    torch.manual_seed(0)
    cfg = tiny_hf_config("grouped", num_hidden_layers=layers, layer_types=["linear_attention"] * layers)
    return HookedGatedDeltaNet.from_config(cfg).eval()


def clean_and_corrupted(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 101, (1, T), generator=g)
    corrupted = clean.clone()
    corrupted[0, 0] = clean[0, 0] % 100 + 1
    return clean, corrupted


def gdn_cache(model, tokens, **kwargs):
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=lambda name: "linear_attn" in name, **kwargs)


def patch_all(model, cache, activation: str) -> list[Patch]:
    return [Patch(gdn_hook_name(layer, hook), cache[gdn_hook_name(layer, hook)])
            for layer in model.cfg.gdn_layers for hook in activation_hooks(activation)]


@pytest.mark.parametrize("activations, first_clean", [
    (["state"], 2 * CONV_REACH + 1),  # q̂ of layer 1 at t reads the corrupted conv window until t > 2·3
    (["write", "log_decay"], 2 * CONV_REACH + 1),  # S_t = α_t S_{t−1} + k̂_t δ_tᵀ: decays and writes fix the state
    (["read"], 1),  # o_t and the residual stream at t ≥ 1 are all the later layers see
])
def test_patching_everything_gives_the_clean_run(activations, first_clean):
    model = gdn_only_model()
    clean, corrupted = clean_and_corrupted()
    clean_logits, cache = gdn_cache(model, clean)
    with torch.no_grad():
        corrupted_logits = model(corrupted)
        patched = run_with_patches(model, corrupted, [p for a in activations for p in patch_all(model, cache, a)])
    later = slice(first_clean, None)
    assert (corrupted_logits[:, later] - clean_logits[:, later]).abs().amax() > 1e-3  # the corruption does reach them
    torch.testing.assert_close(patched[:, later], clean_logits[:, later], atol=2e-6, rtol=1e-5)


def test_patching_one_layers_writes_alone_is_not_the_clean_run():
    """The contrast to the test above: writes without their decays leave the layer's state off."""
    model = gdn_only_model()
    clean, corrupted = clean_and_corrupted()
    clean_logits, cache = gdn_cache(model, clean)
    with torch.no_grad():
        patched = run_with_patches(model, corrupted, patch_all(model, cache, "write"))
    assert (patched[:, 2 * CONV_REACH + 1:] - clean_logits[:, 2 * CONV_REACH + 1:]).abs().amax() > 1e-6


def logit_difference(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, 5] - logits[0, -1, 7]


@pytest.mark.parametrize("activation, axes", [
    ("state", ("layer", "pos", "head")),
    ("state", ("layer", "head")),  # every position at once: the sequential recurrence
    ("write", ("layer", "pos")),
    ("write_key", ("pos",)),
    ("read", ("layer", "pos", "head")),
])
def test_patching_from_the_corrupted_run_itself_changes_nothing(activation, axes):
    model = random_tiny_model()
    _, corrupted = clean_and_corrupted()
    _, own_cache = gdn_cache(model, corrupted)
    with torch.no_grad():
        reference = float(logit_difference(model(corrupted)))
    grid = generic_activation_patch(model, corrupted, own_cache, logit_difference, activation, axes,
                                    positions=[1, 6, 11], show_progress=False)
    assert grid.shape == tuple({"layer": 3, "pos": 3, "head": 4}[a] for a in axes)
    torch.testing.assert_close(grid, torch.full_like(grid, reference), atol=2e-5, rtol=0)


def test_patching_before_the_corruption_changes_nothing():
    """Clean and corrupted agree on positions 0…5: patching their states there is patching nothing."""
    model = random_tiny_model()
    clean, _ = clean_and_corrupted()
    corrupted = clean.clone()
    corrupted[0, 6:] = torch.flip(clean[0, 6:], [0])
    _, cache = gdn_cache(model, clean)
    with torch.no_grad():
        reference = model(corrupted)
        patched = run_with_patches(model, corrupted, [Patch(p.name, p.clean, positions=tuple(range(6))) for p in patch_all(model, cache, "state")])
        empty = run_with_patches(model, corrupted, [])
    torch.testing.assert_close(patched, reference, atol=2e-6, rtol=1e-5)
    assert torch.equal(empty, reference)


def test_one_position_state_patch_equals_a_manual_hook():
    model = random_tiny_model()  # GDN layers 0, 1, 2 and an attention layer
    clean, corrupted = clean_and_corrupted()
    corrupted[0, 4] = clean[0, 4] % 100 + 1
    _, cache = gdn_cache(model, clean)
    layers, positions = [1, 2], [3, 8]
    grid = get_act_patch_state(model, corrupted, cache, logit_difference, layers=layers, positions=positions, show_progress=False)
    assert grid.shape == (2, 2, 4)
    with torch.no_grad():
        unpatched = float(logit_difference(model(corrupted)))
    moved = 0
    for i, layer in enumerate(layers):
        for j, t in enumerate(positions):
            for head in range(4):
                clean_state = cache[gdn_hook_name(layer, "hook_state")][:, t, head]

                def put_clean(states, hook, t=t, head=head, clean_state=clean_state):
                    if hook_positions(hook).tolist() == [t]:
                        states = states.clone()
                        states[:, 0, head] = clean_state
                        return states

                with torch.no_grad():
                    manual = model.run_with_hooks(corrupted, recurrence="sequential",
                                                  fwd_hooks=[(gdn_hook_name(layer, "hook_state"), put_clean)])
                assert abs(float(grid[i, j, head]) - float(logit_difference(manual))) < 2e-5
                moved += abs(float(grid[i, j, head]) - unpatched) > 1e-4
    assert moved >= 8  # most patches move the metric, so the comparison is not between two unchanged runs


def test_a_state_patch_at_two_positions_equals_the_same_edit_by_hand_in_the_sequential_recurrence():
    """Two positions, the fewest that need the sequential recurrence: in parallel mode the clean − corrupted
    difference patched in at the first would be carried to the second and added to its own."""
    model = random_tiny_model()
    with torch.no_grad():
        model.blocks[1].linear_attn.dt_bias.fill_(-12.0)  # half-lives ≈ 1e5 / A tokens: position 3's state reaches 8
    clean, corrupted = clean_and_corrupted()
    _, cache = gdn_cache(model, clean)
    name, positions, head = gdn_hook_name(1, "hook_state"), (3, 8), 2
    clean_states = cache[name]

    def put_clean(rows, t):
        rows[:, head] = clean_states[:, t, head]
        return rows

    patch = Patch(name, clean_states, positions, (head,))
    with torch.no_grad():
        patched = run_with_patches(model, corrupted, [patch])
        sequential = run_with_patches(model, corrupted, [patch], recurrence="sequential")
        by_hand = model.run_with_hooks(corrupted, recurrence="sequential", fwd_hooks=[(name, edit_at_positions(put_clean, positions))])
        parallel = run_with_patches(model, corrupted, [patch], recurrence="parallel")
    torch.testing.assert_close(patched, by_hand, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(sequential, by_hand, atol=2e-6, rtol=1e-5)
    assert (parallel - by_hand)[:, positions[1]:].abs().amax() > 1e-3  # the summed differences do move the logits


def test_every_site_is_indexed_like_its_grid():
    model = random_tiny_model()
    clean, corrupted = clean_and_corrupted()
    _, cache = gdn_cache(model, clean)
    every = get_act_patch_memory_every(model, corrupted, cache, logit_difference, positions=[2, 9], show_progress=False)
    assert every.shape == (3, 3, 2)
    for k, fn in enumerate([get_act_patch_state, get_act_patch_write, get_act_patch_read]):
        torch.testing.assert_close(every[k], fn(model, corrupted, cache, logit_difference, ("layer", "pos"),
                                                positions=[2, 9], show_progress=False))
    # an axis left out is patched whole: the read patched at all heads of layer 2, position 9
    by_pos = get_act_patch_read(model, corrupted, cache, logit_difference, ("layer", "pos"), show_progress=False)
    with torch.no_grad():
        direct = run_with_patches(model, corrupted, [Patch(gdn_hook_name(2, "hook_recurrence_out"),
                                                           cache[gdn_hook_name(2, "hook_recurrence_out")], (9,))])
    assert abs(float(by_pos[2, 9]) - float(logit_difference(direct))) < 1e-6


def test_value_side_write_patch_keeps_the_corrupted_key():
    model = random_tiny_model()
    clean, corrupted = clean_and_corrupted()
    _, clean_cache = gdn_cache(model, clean)
    _, corrupted_cache = gdn_cache(model, corrupted)
    layer, t, head = 1, 2, 3
    seen = {}

    def observe(states, hook):
        seen["state"] = states[:, 0].clone()

    name = gdn_hook_name(layer, "hook_write_value")
    with torch.no_grad(), model.hooks([(gdn_hook_name(layer, "hook_state"), observe)]):
        run_with_patches(model, corrupted, [Patch(name, clean_cache[name], (t,), (head,))], state_positions=[t])
    key = corrupted_cache[gdn_hook_name(layer, "hook_write_key")][:, t, head]
    before = corrupted_cache[gdn_hook_name(layer, "hook_state")][:, t, head] - torch.outer(key[0], corrupted_cache[name][0, t, head])
    expected = before + torch.outer(key[0], clean_cache[name][0, t, head])
    torch.testing.assert_close(seen["state"][:, head], expected, atol=1e-6, rtol=1e-5)


def test_mismatched_lengths_and_missing_sites_are_refused():
    model = random_tiny_model()
    clean, corrupted = clean_and_corrupted()
    _, cache = gdn_cache(model, clean)
    _, longer = gdn_cache(model, torch.cat([clean, clean[:, :1]], 1))
    with pytest.raises(ValueError, match="same number of tokens"):
        get_act_patch_state(model, corrupted, longer, logit_difference, show_progress=False)
    with pytest.raises(ValueError, match=r"layers \[3\] are not Gated DeltaNet layers.*\[0, 1, 2\]"):
        get_act_patch_read(model, corrupted, cache, logit_difference, layers=[3], show_progress=False)
    with pytest.raises(ValueError, match="cannot patch 'attn_out'"):
        generic_activation_patch(model, corrupted, cache, logit_difference, "attn_out", show_progress=False)
    with pytest.raises(ValueError, match="States are cached only when named"):
        get_act_patch_state(model, corrupted, model.run_with_cache(clean)[1], logit_difference, show_progress=False)
    with pytest.raises(ValueError, match="heads"):
        get_act_patch_state(model, corrupted, cache, logit_difference, heads=[4], show_progress=False)
    with pytest.raises(ValueError, match="index_axis_names"):
        get_act_patch_state(model, corrupted, cache, logit_difference, index_axis_names=("layer", "feature"), show_progress=False)


def test_heatmap_has_one_panel_per_site(tmp_path):
    values = torch.linspace(-1, 2, 3 * 2 * 5).reshape(3, 2, 5)
    fig = plot_patching_heatmap(values, row_labels=["L0", "L1"], col_labels=list("abcde"),
                                panel_titles=["state", "write", "read"], path=tmp_path / "h.png")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3
    assert all(im.get_clim() == (-2.0, 2.0) for im in images)  # one scale, centred on 0
    assert (tmp_path / "h.png").stat().st_size > 0


def test_logit_diff_recovered_is_0_for_the_corrupted_run_and_1_for_the_clean_run():
    model = random_tiny_model()
    clean, corrupted = clean_and_corrupted()
    metric = logit_diff_recovered(model, clean, corrupted, 5, 7)
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    assert metric.clean == pytest.approx(float(logit_difference(clean_logits)))
    assert float(metric(clean_logits)) == pytest.approx(1.0, abs=1e-5)
    assert float(metric(corrupted_logits)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="nothing to patch"):
        logit_diff_recovered(model, clean, clean, 5, 7)


def test_position_labels_name_each_position_by_its_token():
    model = HookedGatedDeltaNet.from_pretrained("gdn-austen")
    assert position_labels(model, "Anne walked") == ["0:'Anne'", "1:' walked'"]


def _tiny(family: str) -> HookedGatedDeltaNet:
    from tests.rwkv7_models import hooked_from_blinkdl, random_blinkdl_state
    from tests.test_mamba2 import tiny_config as tiny_mamba2_config

    torch.manual_seed(0)
    if family == "mamba2":
        return HookedGatedDeltaNet.from_config(tiny_mamba2_config("groups", vocab_size=101)).eval()
    return random_tiny_model() if family == "hybrid" else hooked_from_blinkdl(random_blinkdl_state(d_vocab=101))


@pytest.mark.parametrize("family", ["hybrid", "mamba2", "rwkv7"])
def test_a_grid_skips_what_the_corrupted_run_computes_with_the_same_result(family):
    """Each patched run skips what the corrupted run computes: the blocks before its patched layer, or the positions
    before its patched position (continuing the corrupted run's cache): the grids are those of every run from the
    embedding, to the float rounding of a continued recurrence, with far fewer block-positions computed (counted at
    every block's input). Sites whose hook points tell their positions (state, write, read) and one that does not
    (v). RWKV-7's runs cannot start after layer 0 but can skip positions."""
    model = _tiny(family)
    clean, corrupted = clean_and_corrupted()
    _, cache = model.run_with_cache(clean, names_filter=lambda name: "linear_attn" in name)
    metric = lambda logits: logits[0, -1].log_softmax(-1)[3]
    counted = []
    count = [(f"blocks.{layer}.hook_resid_pre", lambda x, hook: counted.append(x.shape[1])) for layer in range(model.cfg.n_layers)]
    work = {}
    for skip in (True, False):
        counted.clear()
        with model.hooks(fwd_hooks=count):
            work[skip] = {site: generic_activation_patch(model, corrupted, cache, metric, site, ("layer", "pos"),
                                                         show_progress=False, skip_unpatched_blocks=skip)
                          for site in ("state", "write", "read", "v")}
        work[skip, "block-positions"] = sum(counted)
    for site in ("state", "write", "read", "v"):
        torch.testing.assert_close(work[True][site], work[False][site], rtol=1e-4, atol=1e-4, msg=site)
    assert work[True, "block-positions"] < 0.7 * work[False, "block-positions"]
    every_layer = {skip: generic_activation_patch(model, corrupted, cache, metric, "state", ("pos",), show_progress=False,
                                                  skip_unpatched_blocks=skip) for skip in (True, False)}
    torch.testing.assert_close(every_layer[True], every_layer[False], rtol=1e-4, atol=1e-4)


def test_a_run_from_the_corrupted_prefix_equals_the_whole_run():
    """run_with_patches from a cached prefix: a state patched at two positions (sequential, its state_positions
    shifted by the prefix) and a value patched where its hook point tells no positions give the whole patched run's
    logits; a patch before the prefix is refused."""
    from hooked_gdn.patching import CorruptedRun

    model = random_tiny_model()
    clean, corrupted = clean_and_corrupted()
    _, cache = model.run_with_cache(clean, names_filter=lambda name: "linear_attn" in name)
    layer = model.cfg.gdn_layers[1]
    patches = [Patch(gdn_hook_name(layer, "hook_state"), cache[gdn_hook_name(layer, "hook_state")], (6, 9)),
               Patch(gdn_hook_name(layer, "hook_v"), cache[gdn_hook_name(layer, "hook_v")], (7,), (1,))]
    run = CorruptedRun(model, corrupted, model.cfg.gdn_layers)
    with torch.no_grad():
        whole = run_with_patches(model, corrupted, patches)
        for start in (0, 3, 6):
            prefix = (start, run.prefix_cache(start), run.logits)
            torch.testing.assert_close(run_with_patches(model, corrupted, patches, from_prefix=prefix), whole,
                                       rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="skips positions before 7, where a patch lies"):
            run_with_patches(model, corrupted, patches, from_prefix=(7, run.prefix_cache(7), run.logits))
