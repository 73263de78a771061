"""Long inputs (issue 25, item 5): attention without padding builds no [p, total] mask, and a default
run_with_cache holds no T² tensor above DEFAULT_CACHE_MAX_PATTERN_LENGTH (it warns, and says how to get one)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from hooked_gdn import model as model_module
from hooked_gdn.layers import GatedAttention

LONG = model_module.DEFAULT_CACHE_MAX_PATTERN_LENGTH + 1


def _no_mask(*args, **kwargs):
    raise AssertionError("a [p, total] mask was built for an input without padding")


def test_unpadded_prefill_builds_no_mask_and_equals_the_masked_path(model, monkeypatch):
    tokens = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(GatedAttention, "_mask", _no_mask)
            causal = model(tokens)
            prefix = model.prefill(tokens[:, :39])
            last = model(tokens[:, 39:], cache=prefix)  # one token after a cached prefix sees every key: no mask
        # the masked path on the same input: is_causal turned into the additive mask _mask builds
        sdpa = F.scaled_dot_product_attention

        def with_mask(q, k, v, attn_mask=None, is_causal=False, **kw):
            if is_causal:
                p, total = q.shape[-2], k.shape[-2]
                allowed = torch.ones(p, total, dtype=torch.bool).tril(total - p)
                attn_mask = torch.zeros(p, total, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)
            return sdpa(q, k, v, attn_mask=attn_mask, **kw)

        with monkeypatch.context() as m:
            m.setattr(F, "scaled_dot_product_attention", with_mask)
            reference = model(tokens)
    assert (causal - reference).abs().max() <= 1e-6
    assert (last[:, 0] - causal[:, -1]).abs().max() <= 1e-5


def test_several_tokens_after_a_cached_prefix_stay_causal(model):
    tokens = torch.randint(0, 101, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        continued = model(tokens[:, 20:], cache=model.prefill(tokens[:, :20]))
    assert (continued - full[:, 20:]).abs().max() <= 1e-5


def test_short_default_cache_has_the_pattern(model):
    p = 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, cache = model.run_with_cache(torch.randint(0, 101, (1, p)))
    layer = model.cfg.attention_layers[0]
    assert cache["pattern", layer].shape == (1, model.cfg.n_heads, p, p)
    assert cache["attn_scores", layer].shape == (1, model.cfg.n_heads, p, p)


def test_long_default_cache_holds_no_quadratic_tensor_and_says_how_to_get_it(model):
    tokens = torch.randint(0, 101, (1, LONG), generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="names_filter"):
        _, cache = model.run_with_cache(tokens)
    for name, tensor in cache.items():
        assert list(tensor.shape).count(LONG) <= 1, (name, tuple(tensor.shape))
    layer = model.cfg.attention_layers[0]
    with pytest.raises(KeyError, match="DEFAULT_CACHE_MAX_PATTERN_LENGTH"):
        cache["pattern", layer]
    assert "blocks.0.hook_resid_post" in cache.cache_dict
    # asked for by name, it is there at any length
    _, named = model.run_with_cache(tokens[:, :LONG], names_filter=lambda n: n.endswith("hook_pattern"))
    assert named["pattern", layer].shape == (1, model.cfg.n_heads, LONG, LONG)


def test_the_threshold_counts_a_cached_prefix(model, monkeypatch):
    monkeypatch.setattr(model_module, "DEFAULT_CACHE_MAX_PATTERN_LENGTH", 16)
    tokens = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(3))
    prefix = model.prefill(tokens[:, :10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, cache = model.run_with_cache(tokens[:, 10:14], cache=prefix.copy())  # 14 keys
    assert cache["pattern", model.cfg.attention_layers[0]].shape[-1] == 14
    with pytest.warns(UserWarning, match="names_filter"):
        _, cache = model.run_with_cache(tokens[:, 10:], cache=prefix.copy())  # 20 keys
    assert not any(name.endswith(("hook_pattern", "hook_attn_scores")) for name in cache.cache_dict)
