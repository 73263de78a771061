"""The memory census against decays we set by hand and statistics computed independently with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from .conftest import random_tiny_model, tiny_hf_config
from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.census import MemoryCensus, memory_census
from hooked_gdn.sites import gdn_hook_name

HALF_LIVES = [2.0, 8.0, 32.0, 128.0]  # tokens, one per value head of the "grouped" config


def _set_constant_decays(model, half_lives, A=(1.0, 3.0, 0.5, 7.0)):
    """W_a = 0 makes g = −A · softplus(dt_bias) constant; choose dt_bias to give each half-life."""
    with torch.no_grad():
        for layer in model.cfg.gdn_layers:
            mixer = model.blocks[layer].linear_attn
            A_ = torch.tensor(A[: len(half_lives)])
            dt = math.log(2) / torch.tensor(half_lives) / A_  # softplus(dt_bias) = ln 2 / (A · half-life)
            mixer.W_a.zero_()
            mixer.A_log.copy_(A_.log())
            mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def test_half_lives_and_beta_are_the_ones_set():
    model = random_tiny_model()
    _set_constant_decays(model, HALF_LIVES)
    with torch.no_grad():
        for layer in model.cfg.gdn_layers:
            model.blocks[layer].linear_attn.W_b.zero_()  # β = σ(0) = ½ everywhere
    census = memory_census(model, torch.randint(1, 101, (3, 21)))
    assert len(census.heads) == len(model.cfg.gdn_layers) * 4
    for record in census.heads:
        target = HALF_LIVES[record.head]
        assert record.half_life == pytest.approx((target,) * 3, rel=1e-4)
        assert record.alpha == pytest.approx((0.5 ** (1 / target),) * 3, rel=1e-5)
        assert record.mean_beta == pytest.approx(0.5, abs=1e-6)
    assert census.count(16) == 2 * len(model.cfg.gdn_layers) and census.count(64) == len(model.cfg.gdn_layers)


def test_a_head_whose_decay_does_not_depend_on_the_input_is_called_fixed_and_the_others_learned():
    """Heads 0 and 2 get a constant decay (W_a = 0), heads 1 and 3 keep one computed from the input."""
    model = random_tiny_model()
    with torch.no_grad():
        for layer in model.cfg.gdn_layers:
            mixer = model.blocks[layer].linear_attn
            mixer.W_a.mul_(5)  # W_a: [H, d_model]
            mixer.W_a[[0, 2]] = 0
    census = memory_census(model, torch.randint(1, 101, (3, 21), generator=torch.Generator().manual_seed(0)))
    for record in census.heads:
        assert record.decay_is_fixed == (record.head in (0, 2)), record
        assert record.decay_kind == ("fixed" if record.head in (0, 2) else "learned")


def test_the_shipped_census_calls_fixed_exactly_the_heads_trained_with_a_fixed_decay():
    import json

    from hooked_gdn.pretrained import CENSUS_FILE, PRETRAINED_MODELS

    folder = PRETRAINED_MODELS["gdn-austen"]
    fixed = set(json.loads((folder / "training_stats.json").read_text())["settings"]["fixed_heads"])
    census = MemoryCensus.load_json(folder / CENSUS_FILE)
    assert {r.head for r in census.heads if r.decay_is_fixed} == fixed
    assert all(r.decay_is_fixed == (r.head in fixed) for r in census.heads)


def test_decay_percentiles_are_numpys_10th_50th_and_90th_of_the_cached_decays():
    """Constant decays, as above, cannot tell one percentile from another or from the mean: here the decays
    depend on the input, spread over orders of magnitude within a head."""
    model = random_tiny_model()
    with torch.no_grad():
        for layer in model.cfg.gdn_layers:
            model.blocks[layer].linear_attn.W_a.mul_(20)  # half-lives from under 0.1 token to over 20 in one head
    tokens = torch.randint(1, 101, (3, 21), generator=torch.Generator().manual_seed(0))
    names = [gdn_hook_name(layer, "hook_log_decay") for layer in model.cfg.gdn_layers]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    census = memory_census(model, tokens)
    for layer, name in zip(model.cfg.gdn_layers, names):
        g = cache[name].double().flatten(0, 1).numpy()  # [positions, H]
        for h in range(g.shape[1]):
            percentiles = np.percentile(g[:, h], [10, 50, 90])
            record = census.head(layer, h)
            assert record.alpha == pytest.approx(tuple(np.exp(percentiles)), rel=1e-6)
            assert record.half_life == pytest.approx(tuple(math.log(0.5) / percentiles), rel=1e-6)
            assert record.half_life[2] > 2 * record.half_life[0]  # spread: no percentile stands in for another


def test_state_statistics_match_numpy_on_the_cached_states():
    model = random_tiny_model()
    _set_constant_decays(model, [1.0, 4.0, 16.0, 64.0])
    tokens = torch.randint(1, 101, (2, 23))
    layer = model.cfg.gdn_layers[1]
    names = [gdn_hook_name(layer, f"hook_{n}") for n in ("state", "write_key", "write_value", "recurrence_out")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    S = cache[names[0]].double().numpy()  # [b, p, h, d_k, d_v]
    k, d, o = (cache[n].double().numpy() for n in names[1:])
    sigma = np.linalg.svd(S, compute_uv=False)
    rank = sigma.sum(-1) ** 2 / (sigma**2).sum(-1)
    top = sigma[..., 0] ** 2 / (sigma**2).sum(-1)
    cos2 = np.einsum("bphk,bphkv,bphv->bph", k, S, d) ** 2 / ((S**2).sum((-1, -2)) * (k**2).sum(-1) * (d**2).sum(-1))
    read = np.sqrt((o**2).mean(-1)) / math.sqrt(model.cfg.eps)

    census = memory_census(model, tokens)
    for h in range(4):
        record = census.head(layer, h)
        # numpy's median averages the two middle values, torch's takes the lower one: compare with
        # the lower middle value
        lower_median = lambda x: np.sort(x[..., h].ravel())[(x[..., h].size - 1) // 2]
        assert record.effective_rank == pytest.approx(lower_median(rank), rel=1e-4)
        assert record.top_share == pytest.approx(lower_median(top), rel=1e-4)
        assert record.write_share == pytest.approx(lower_median(cos2), rel=1e-4)
        assert record.read_rms_over_sqrt_eps == pytest.approx(lower_median(read), rel=1e-4)


def test_read_is_measured_against_the_epsilon_of_the_norm_it_goes_into():
    """OLMo-Hybrid's GDN output norm has ε = 1e-5 whatever its rms_norm_eps (here 1e-3)."""
    model = HookedGatedDeltaNet.from_config(tiny_hf_config("olmo_hybrid", rms_norm_eps=1e-3)).eval()
    layer = model.cfg.gdn_layers[0]
    assert model.cfg.eps == 1e-3 and model.blocks[layer].linear_attn.norm.eps == 1e-5
    tokens = torch.randint(1, 101, (1, 9), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, names_filter=gdn_hook_name(layer, "hook_recurrence_out"))
    rms = cache[gdn_hook_name(layer, "hook_recurrence_out")][0, :, 0].float().pow(2).mean(-1).sqrt()
    expected = rms.median() / math.sqrt(1e-5)  # torch's median: the lower middle value, as the census takes
    assert memory_census(model, tokens).head(layer, 0).read_rms_over_sqrt_eps == pytest.approx(float(expected), rel=1e-5)


def test_one_write_is_a_rank_one_state_made_entirely_of_that_write():
    model = random_tiny_model()
    census = memory_census(model, torch.randint(1, 101, (2, 1)))
    for record in census.heads:
        assert record.effective_rank == pytest.approx(1.0, abs=1e-4)
        assert record.top_share == pytest.approx(1.0, abs=1e-5)
        assert record.write_share == pytest.approx(1.0, abs=1e-5)


def test_fast_decay_leaves_only_the_current_write_and_slow_decay_accumulates_rank():
    model = random_tiny_model()
    _set_constant_decays(model, [0.01, 0.01, 1e4, 1e4])
    census = memory_census(model, torch.randint(1, 101, (2, 40)))
    for record in census.heads:
        if record.head < 2:
            assert record.write_share == pytest.approx(1.0, abs=1e-4) and record.effective_rank == pytest.approx(1.0, abs=1e-3)
        else:
            assert record.write_share < 0.5 and record.effective_rank > 3


def test_state_every_forms_fewer_states_but_keeps_every_decay():
    model = random_tiny_model()
    tokens = torch.randint(1, 101, (2, 30))
    every, strided = memory_census(model, tokens), memory_census(model, tokens, state_every=7)
    for a, b in zip(every.heads, strided.heads):
        assert a.half_life == b.half_life and a.mean_beta == b.mean_beta
    assert any(a.effective_rank != b.effective_rank for a, b in zip(every.heads, strided.heads))


def test_long_memory_layer_has_the_most_heads_above_the_threshold():
    model = random_tiny_model()
    _set_constant_decays(model, [1.0, 2.0, 3.0, 4.0])
    slow = model.blocks[model.cfg.gdn_layers[1]].linear_attn
    with torch.no_grad():
        slow.dt_bias.fill_(-12.0)  # half-life ≈ 1e5 / A tokens in every head of that layer
    census = memory_census(model, torch.randint(1, 101, (1, 12)))
    assert census.long_memory_layer() == model.cfg.gdn_layers[1]


def test_json_keeps_every_figure_and_infinite_half_lives_load_back_large(tmp_path):
    model = random_tiny_model()
    with torch.no_grad():
        model.blocks[0].linear_attn.dt_bias[0] = -1e4  # softplus underflows to 0: α = 1, an infinite half-life
    census = memory_census(model, torch.randint(1, 101, (1, 9)))
    assert math.isinf(census.head(0, 0).half_life[1])
    census.save_json(tmp_path / "census.json")
    loaded = MemoryCensus.load_json(tmp_path / "census.json")
    assert loaded == census
    census.plot_half_lives(tmp_path / "half_lives.png")
    assert (tmp_path / "half_lives.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_without_gdn_layers_or_text_is_refused():
    torch.manual_seed(0)
    attention_only = HookedGatedDeltaNet.from_config(tiny_hf_config("grouped", layer_types=["full_attention"] * 4))
    with pytest.raises(ValueError, match="no Gated DeltaNet layers"):
        memory_census(attention_only, torch.randint(1, 101, (1, 5)))
    model = random_tiny_model()
    with pytest.raises(ValueError, match=r"shape \[n, pos\]"):
        memory_census(model, torch.zeros(1, 0, dtype=torch.long))


def test_empty_text_is_refused():
    model = HookedGatedDeltaNet.from_pretrained("gdn-austen")
    with pytest.raises(ValueError, match="at least two tokens"):
        memory_census(model, "")
    with pytest.raises(ValueError, match="at least two tokens"):
        memory_census(model, [])


@pytest.mark.slow
def test_census_command_prints_the_table_and_writes_json_and_heatmap(tmp_path, capsys):
    from writesae.cli import main

    main(["census", "--tokens", "96", "--context", "48", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    census = MemoryCensus.load_json(tmp_path / "census.json")
    assert census.n_tokens == 96 and census.context == 48 and len(census.heads) == 24  # 6 GDN layers × 4 heads
    assert sum(line.startswith("| ") and line[2].isdigit() for line in printed.splitlines()) == 24
    assert (tmp_path / "half_lives.png").stat().st_size > 0
