"""TransformerLens' own tools on every family, called as TransformerLens users call them.

``transformer_lens.patching.get_act_patch_resid_pre`` / ``get_act_patch_block_every`` and
``transformer_lens.utilities.test_prompt`` read ``cfg`` (``device``, ``n_heads``, …) and pass ``prepend_bos``
to ``to_tokens`` / ``to_str_tokens``; here they run on a tiny random checkpoint of each family, saved as users
save theirs and loaded with ``from_pretrained``, with the shipped tokenizer beside it (so its vocabulary is
the tokenizer's). The patching results are checked against what must hold whatever the weights: an
activation that is the same in the clean and the corrupted run changes nothing when patched, and the
residual stream at the only position where the runs differ carries all of the difference.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformer_lens import ActivationCache, patching
from transformer_lens.utilities import Slice
from transformer_lens.utilities import test_prompt as tl_test_prompt
from transformers import AutoTokenizer, Mamba2ForCausalLM

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn import patching as hooked_patching
from hooked_gdn.architectures import BY_KEY
from hooked_gdn.hook_points import AliasHookPoint
from hooked_gdn.model import DEFAULT_PADDING_SIDE
from hooked_gdn.pretrained import PRETRAINED_MODELS

from .conftest import FAMILY_CONFIGS, tiny_hf_config
from .rwkv7_models import random_blinkdl_state, save_fla
from .test_mamba2 import tiny_config as tiny_mamba2_config

TOKENIZER = PRETRAINED_MODELS["gdn-austen"]  # the shipped tokenizer: no BOS, EOS = pad = "<|endoftext|>" (id 0)
VOCAB = 4096  # its vocabulary
CONFIG_NAMES = {"qwen3_5": "grouped", "qwen3_5_moe": "qwen3_5_moe", "qwen3_next": "qwen3_next", "olmo_hybrid": "olmo_hybrid"}
NO_ATTENTION = ("mamba2", "rwkv7")
PROMPT, ANSWER = "Mr. Darcy was", "not"
T = 5  # positions of the patching inputs
TL_HAS_LOGIT_LENS = hasattr(ActivationCache, "logit_lens")  # TransformerLens 4's; 3.x has none


def save_tiny(family: str, folder: Path) -> None:
    """A random tiny checkpoint of ``family`` with the shipped tokenizer's files beside it."""
    torch.manual_seed(0)
    if family in CONFIG_NAMES:
        FAMILY_CONFIGS[CONFIG_NAMES[family]][1](tiny_hf_config(CONFIG_NAMES[family], vocab_size=VOCAB)).save_pretrained(folder)
    elif family == "mamba2":
        Mamba2ForCausalLM(tiny_mamba2_config("groups", vocab_size=VOCAB)).save_pretrained(folder)
    else:
        save_fla(random_blinkdl_state(d_vocab=VOCAB), folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)


def tiny_models(tmp_path_factory, model_class=HookedGatedDeltaNet):
    """``model(family)``: the family's tiny model with the shipped tokenizer, as ``model_class``, each loaded once."""
    models = {}

    def model(family: str) -> HookedGatedDeltaNet:
        if family not in models:
            folder = tmp_path_factory.mktemp(f"tiny-{model_class.__name__}-{family}")
            save_tiny(family, folder)
            models[family] = model_class.from_pretrained(folder)
        return models[family]

    return model


@pytest.fixture(name="tiny", scope="module")
def tiny_fixture(tmp_path_factory):
    """``tiny(family)``: the family's tiny model with the shipped tokenizer, loaded once a module."""
    return tiny_models(tmp_path_factory)


def test_every_family_is_covered():
    assert set(CONFIG_NAMES) | set(NO_ATTENTION) == set(BY_KEY)


# ------------------------------------------------------------------ cfg


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_cfg_has_what_transformer_lens_reads(tiny, family):
    model = tiny(family)
    cfg = model.cfg
    assert cfg.device == model.W_E.device == torch.device("cpu")
    assert cfg.n_ctx == sys.maxsize  # no limit: fixed-size memories, rotary angles computed per position
    assert cfg.n_params == sum(p.numel() for p in model.parameters()) - model.W_E.numel() - (
        0 if model.lm_head is None else model.lm_head.numel())
    assert cfg.tokenizer_prepends_bos is False and cfg.default_prepend_bos is False
    written = json.loads((Path(cfg.model_name) / "config.json").read_text())["architectures"][0]
    assert cfg.original_architecture == written  # as transformers (flash-linear-attention for RWKV-7) names the class
    if family in NO_ATTENTION:
        assert (cfg.n_heads, cfg.d_head) == (cfg.n_value_heads, cfg.d_value)  # the memory's heads
    else:
        attention = model.blocks[cfg.attention_layers[0]].attn
        assert attention.W_O.shape == (cfg.n_heads, cfg.d_head, cfg.d_model)


def test_cfg_device_follows_the_model():
    model = HookedGatedDeltaNet.from_config(tiny_hf_config())
    moved = copy.deepcopy(model).to("meta")
    assert moved.cfg.device == torch.device("meta")
    assert model.cfg.device == torch.device("cpu")  # the copy's config is its own


# ------------------------------------------------------------------ prepend_bos and padding_side


def test_defaults_tokenize_as_before(tiny):
    """No BOS and left padding, the tokenizer's own ids and mask: what the model did before it took these keywords."""
    model = tiny("qwen3_5")
    texts = ["Mr. Darcy was", "Emma"]
    before = model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    assert DEFAULT_PADDING_SIDE == "left"
    assert torch.equal(model.to_tokens(texts), before["input_ids"])
    assert torch.equal(model.to_tokens(texts, prepend_bos=False, padding_side="left"), before["input_ids"])
    assert model.to_str_tokens(PROMPT) == [model.tokenizer.decode([i]) for i in before["input_ids"][0].tolist()]
    with torch.no_grad():
        assert torch.equal(model(texts), model(before["input_ids"], attention_mask=before["attention_mask"]))


def test_prepend_bos_puts_the_eos_first_for_a_tokenizer_without_bos(tiny):
    model = tiny("qwen3_5")
    tok = model.tokenizer
    assert tok.bos_token is None and tok.eos_token_id == tok.pad_token_id == 0
    plain, short = tok(PROMPT)["input_ids"], tok("Emma")["input_ids"]
    assert model.to_tokens(PROMPT, prepend_bos=True).tolist() == [[tok.eos_token_id, *plain]]
    assert model.to_str_tokens(PROMPT, prepend_bos=True) == [tok.eos_token] + model.to_str_tokens(PROMPT)
    # the BOS counts as a token (1 in the mask) although its id is the padding's
    left = model.to_tokens(["Emma", PROMPT], prepend_bos=True)
    assert left[0].tolist() == [tok.pad_token_id] * (len(plain) - len(short)) + [tok.eos_token_id, *short]
    with torch.no_grad():
        padded = model(["Emma", PROMPT], prepend_bos=True)
        alone = model(torch.tensor([[tok.eos_token_id, *short]]))
        assert torch.allclose(padded[0, -len(alone[0]):], alone[0], atol=1e-5)
        assert torch.allclose(padded[1], model(PROMPT, prepend_bos=True)[0], atol=1e-5)


def test_padding_side_right_pads_at_the_end_and_masks_it(tiny):
    model = tiny("qwen3_5")
    texts = ["Emma", PROMPT]
    n = len(model.tokenizer("Emma")["input_ids"])
    right, left = model.to_tokens(texts, padding_side="right"), model.to_tokens(texts)
    assert right[0, :n].tolist() == left[0, -n:].tolist() and (right[0, n:] == model.tokenizer.pad_token_id).all()
    with torch.no_grad():
        assert torch.allclose(model(texts, padding_side="right")[0, :n], model(texts)[0, -n:], atol=1e-5)
        # loss leaves the padding out on either side
        assert torch.allclose(model(texts, "loss", padding_side="right"), model(texts, "loss"), atol=1e-5)
    with pytest.raises(ValueError, match="padding_side must be one of"):
        model.to_tokens(texts, padding_side="middle")


def test_right_padding_is_refused_where_a_row_continues_from_its_last_position(tiny):
    model = tiny("mamba2")
    with pytest.raises(ValueError, match="right padding"):
        model.generate(["Emma", PROMPT], max_new_tokens=2, padding_side="right")
    with pytest.raises(ValueError, match="right padding"):
        model.prefill(["Emma", PROMPT], padding_side="right")
    model.generate([PROMPT, PROMPT], max_new_tokens=2, padding_side="right")  # nothing padded: nothing to refuse


def test_generate_run_with_cache_and_run_with_hooks_pass_prepend_bos_on(tiny):
    model = tiny("rwkv7")
    with_bos = model.to_tokens(PROMPT, prepend_bos=True)
    assert model.generate(PROMPT, max_new_tokens=3, prepend_bos=True) == model.to_string(
        model.generate(with_bos, max_new_tokens=3)[0])
    _, cache = model.run_with_cache(PROMPT, prepend_bos=True, names_filter="hook_embed")
    assert cache["hook_embed"].shape[1] == with_bos.shape[1]
    with torch.no_grad():
        assert torch.equal(model.run_with_hooks(PROMPT, prepend_bos=True, fwd_hooks=[]), model(with_bos))


def test_a_tokenizer_that_prepends_bos_keeps_it_by_default(tiny):
    """Llama-style tokenizers put their BOS first themselves: by default strings keep it (the tokenizer's own
    special tokens), prepend_bos=True adds no second one, and prepend_bos=False takes it off."""
    model = copy.deepcopy(tiny("qwen3_5"))
    plain = model.tokenizer
    model.tokenizer = AutoTokenizer.from_pretrained(TOKENIZER, bos_token="<|endoftext|>", add_bos_token=True)
    assert model.cfg.tokenizer_prepends_bos is True and model.cfg.default_prepend_bos is True
    texts = ["Emma", PROMPT]
    own = model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")["input_ids"]
    assert torch.equal(model.to_tokens(texts), own) and torch.equal(model.to_tokens(texts, prepend_bos=True), own)
    assert torch.equal(model.to_tokens(texts, prepend_bos=False), plain(texts, return_tensors="pt", padding=True,
                                                                         padding_side="left")["input_ids"])
    model.tokenizer = plain
    assert model.cfg.tokenizer_prepends_bos is False and model.cfg.default_prepend_bos is False


def test_to_tokens_move_to_device_and_truncate_as_transformer_lens(tiny):
    """move_to_device=False leaves the ids on the CPU, where the tokenizer made them; truncate keeps cfg.n_ctx
    tokens of each string (a prepended BOS counted, cut on the tokenizer's truncation side), which changes nothing
    while n_ctx is unlimited. SAELens' activation store calls to_tokens(row, truncate=False, move_to_device=False,
    prepend_bos=False)."""
    model = copy.deepcopy(tiny("qwen3_5"))
    full = model.to_tokens(PROMPT)
    n = full.shape[1]
    assert n > 3
    meta = copy.deepcopy(model).to("meta")  # a device the ids visibly move to
    assert meta.to_tokens(PROMPT).device == torch.device("meta")
    assert torch.equal(meta.to_tokens(PROMPT, move_to_device=False), full)  # stays on the CPU
    assert torch.equal(model.to_tokens(PROMPT, truncate=False, move_to_device=False, prepend_bos=False), full)
    model.cfg.n_ctx = 3
    assert torch.equal(model.to_tokens(PROMPT), full[:, :3])
    assert torch.equal(model.to_tokens(PROMPT, truncate=False), full)
    eos = model.tokenizer.eos_token_id
    assert model.to_tokens(PROMPT, prepend_bos=True).tolist() == [[eos, *full[0, :2].tolist()]]
    # strings of different lengths: each cut to n_ctx, then padded (and masked) to the longest
    short = model.to_tokens("Emma", truncate=False)
    both = model.to_tokens(["Emma", PROMPT], padding_side="right")
    assert both.shape[1] == 3 and both[0, :short.shape[1]].tolist() == short[0, :3].tolist()
    with torch.no_grad():  # forward truncates strings as to_tokens does
        assert torch.equal(model(PROMPT), model(full[:, :3]))
    model.tokenizer.truncation_side = "left"
    try:
        assert torch.equal(model.to_tokens(PROMPT), full[:, -3:])
    finally:
        model.tokenizer.truncation_side = "right"
    model.cfg.n_ctx = 0
    with pytest.raises(ValueError, match="cfg.n_ctx must be an int >= 1 to truncate to, got 0"):
        model.to_tokens(PROMPT)
    assert torch.equal(model.to_tokens(PROMPT, truncate=False), full)


# ------------------------------------------------------------------ TransformerLens' tools


def _runs(model, differ_at: int) -> tuple[torch.Tensor, torch.Tensor, object, Callable]:
    """Clean and corrupted tokens [1, T] that differ only at position ``differ_at``, the clean cache, and a metric
    (the log-probability of the clean run's top next token at the last position)."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(2, model.cfg.d_vocab, (1, T), generator=g)
    corrupted = clean.clone()
    corrupted[0, differ_at] = 2 + (clean[0, differ_at] - 1) % (model.cfg.d_vocab - 2)  # the next id, 0 and 1 skipped
    _, cache = model.run_with_cache(clean)
    with torch.no_grad():
        answer = int(model(clean)[0, -1].argmax())
    return clean, corrupted, cache, lambda logits: logits[0, -1].log_softmax(-1)[answer]


def _metric_of(model, tokens, metric) -> torch.Tensor:
    with torch.no_grad():
        return metric(model(tokens))


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_get_act_patch_resid_pre(tiny, family):
    """Runs that differ at the first position only: patching the clean embedding there (layer 0, position 0)
    recovers the clean metric; every other patch at layer 0 moves an activation the runs share."""
    model = tiny(family)
    clean, corrupted, cache, metric = _runs(model, differ_at=0)
    result = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    assert result.shape == (model.cfg.n_layers, T)
    torch.testing.assert_close(result[0, 0], _metric_of(model, clean, metric), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result[0, 1:], _metric_of(model, corrupted, metric).expand(T - 1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_metric_of(model, clean, metric), _metric_of(model, corrupted, metric), atol=1e-3)


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_get_act_patch_attn_out(tiny, family):
    """Every block's mixer output (hook_attn_out: a memory layer's or an attention layer's), patched position by
    position, on every family (Mamba-2 included, whose blocks have no MLP for block_every's third row): where the
    runs agree the patch changes nothing, and at the last position, where they differ, it moves the metric."""
    model = tiny(family)
    clean, corrupted, cache, metric = _runs(model, differ_at=T - 1)
    result = patching.get_act_patch_attn_out(model, corrupted, cache, metric)
    L = model.cfg.n_layers
    assert result.shape == (L, T)
    corrupted_metric = _metric_of(model, corrupted, metric)
    torch.testing.assert_close(result[:, :-1], corrupted_metric.expand(L, T - 1), atol=1e-5, rtol=1e-5)
    assert not torch.isclose(result[:, -1], corrupted_metric, atol=1e-4).all()


BLOCK_EVERY = [pytest.param(f, marks=pytest.mark.xfail(
    raises=KeyError, strict=True, reason="a Mamba-2 block has no MLP, so no blocks.L.hook_mlp_out to patch"))
    if f == "mamba2" else f for f in sorted(BY_KEY)]


@pytest.mark.parametrize("family", BLOCK_EVERY)
def test_get_act_patch_block_every(tiny, family):
    """Runs that differ at the last position only: every patch at an earlier position (residual stream,
    mixer output, MLP output) moves an activation the runs share, and the residual stream at the last
    position carries the whole difference into any layer, except where a layer reads more than the
    residual stream: RWKV-7's layers after the first also mix in layer 0's value (v_first)."""
    model = tiny(family)
    clean, corrupted, cache, metric = _runs(model, differ_at=T - 1)
    result = patching.get_act_patch_block_every(model, corrupted, cache, metric)
    L = model.cfg.n_layers
    assert result.shape == (3, L, T)  # resid_pre, attn_out (every mixer's), mlp_out
    torch.testing.assert_close(result[:, :, :-1], _metric_of(model, corrupted, metric).expand(3, L, T - 1),
                               atol=1e-5, rtol=1e-5)
    carried = 1 if family == "rwkv7" else L  # the layers whose resid_pre at the last position is all that differs
    recovered = _metric_of(model, clean, metric)
    torch.testing.assert_close(result[0, :carried, -1], recovered.expand(carried), atol=1e-5, rtol=1e-5)
    assert not torch.isclose(result[0, carried:, -1], recovered, atol=1e-3).any()


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_transformer_lens_per_head_patching_says_what_a_memory_layer_has_instead(tiny, family):
    """TransformerLens' per-head patching reads every block's attn.hook_z; a memory layer's KeyError names its
    counterpart, which hooked_gdn.patching patches by position and head (a head's output where the runs agree
    changes nothing); a block without an MLP says so where TransformerLens asks for its hook_mlp_out."""
    model = tiny(family)
    clean, corrupted, cache, metric = _runs(model, differ_at=T - 1)
    first = model.cfg.gdn_layers[0]
    with pytest.raises(KeyError, match=rf"blocks.{first}.attn.hook_z is not a hook point of this model: block {first} "
                                       rf".* is a memory layer.* blocks.{first}.linear_attn.hook_gated_out"):
        patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric)
    grid = hooked_patching.generic_activation_patch(model, corrupted, cache, metric, "gated_out", ("pos", "head"),
                                                    layers=[first], show_progress=False)
    assert grid.shape == (T, model.cfg.n_value_heads)
    torch.testing.assert_close(grid[:-1], _metric_of(model, corrupted, metric).expand(T - 1, model.cfg.n_value_heads),
                               atol=1e-5, rtol=1e-5)  # a head's output where the runs agree: nothing changes
    if not hasattr(model.blocks[0], "mlp"):
        with pytest.raises(KeyError, match="blocks have no MLP .* blocks.0.hook_attn_out"):
            patching.get_act_patch_mlp_out(model, corrupted, cache, metric)


def _position_axes(model, names) -> dict[str, int | None]:
    """Each hook's position axis as the model's own forward shows it: the one axis whose length follows the input's
    (a run of 5 positions against one of 6), None where none does or another does (a padded conv's p + K − 1)."""
    runs = [model.run_with_cache(torch.randint(1, VOCAB, (2, p)), names_filter=names)[1] for p in (5, 6)]
    axes = {}
    for name in runs[0].keys():
        moved = [i for i, (a, b) in enumerate(zip(runs[0][name].shape, runs[1][name].shape)) if a != b]
        axes[name] = moved[0] if moved and runs[0][name].shape[moved[0]] == 5 else None
    return axes


@pytest.mark.parametrize("family", sorted(BY_KEY))
@pytest.mark.parametrize("recurrence", ["parallel", "sequential"])
def test_run_with_cache_pos_slice_keeps_those_positions_of_every_activation(tiny, family, recurrence):
    """TransformerLens' pos_slice (an int keeps its axis, as there): every cached activation, states, patterns and
    gradients included, is the full cache's sliced along its position axis, which the test finds by varying the
    input's length; an activation without one is whole. return_cache_object=False gives the dict."""
    model = tiny(family)
    every = lambda name: True
    axes = _position_axes(model, every)
    assert sum(axis is None for axis in axes.values()) >= len(model.cfg.gdn_layers)  # each memory's final state
    tokens = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, full = model.run_with_cache(tokens, names_filter=every, recurrence=recurrence)
        for pos_slice in (-1, [0, 3], slice(1, None)):
            _, sliced = model.run_with_cache(tokens, names_filter=every, recurrence=recurrence, pos_slice=pos_slice,
                                             return_cache_object=False)
            assert isinstance(sliced, dict) and sliced.keys() == set(full.keys())
            for name, axis in axes.items():
                expected = full[name] if axis is None else Slice.unwrap(pos_slice).apply(full[name], dim=axis)
                assert torch.equal(sliced[name], expected), (name, pos_slice)
    _, with_grads = model.run_with_cache(tokens, "loss", names_filter=f"blocks.0.hook_resid_post", incl_bwd=True,
                                         pos_slice=-1)
    _, full_grads = model.run_with_cache(tokens, "loss", names_filter=f"blocks.0.hook_resid_post", incl_bwd=True)
    torch.testing.assert_close(with_grads["blocks.0.hook_resid_post_grad"], full_grads["blocks.0.hook_resid_post_grad"][:, -1:])


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_transformer_lens_caching_hooks_join_per_position_firings_as_run_with_cache_does(tiny, family):
    """add_caching_hooks (cache_all, cache_some): in sequential mode the memory's points fire once per position,
    and TransformerLens' hooks would keep the last firing; ours join them, forward and backward, into what
    run_with_cache gives, and the next forward replaces them."""
    model = tiny(family)
    every = lambda name: True
    runs = [torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    for remove_batch_dim in (False, True):
        cache = {}
        try:
            model.add_caching_hooks(names_filter=every, cache=cache, incl_bwd=True, remove_batch_dim=remove_batch_dim)
            for tokens in runs:
                model(tokens, "loss", recurrence="sequential").backward()
        finally:
            model.reset_hooks()
        model.zero_grad(set_to_none=True)
        _, expected = model.run_with_cache(runs[-1], "loss", names_filter=every, recurrence="sequential", incl_bwd=True,
                                           remove_batch_dim=remove_batch_dim)
        model.zero_grad(set_to_none=True)
        assert cache.keys() == set(expected.keys())
        for name, value in cache.items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    with pytest.raises(NotImplementedError, match=r"run_with_cache\(tokens, pos_slice=...\) takes it"):
        model.get_caching_hooks(pos_slice=-1)


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_start_at_layer_continues_from_the_residual_stream(tiny, family):
    """TransformerLens' start_at_layer: the residual stream entering block i, run through blocks i, …, gives the
    full forward's logits, loss and later residual streams (left padding and its mask included), also continuing a
    prefix's cache, which then continues only from block i on; RWKV-7's layers after the first need layer 0's
    value, and say so."""
    model = tiny(family)
    tokens = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    n = model.cfg.n_layers
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda name: "resid_pre" in name)
        loss = model(tokens, "loss", mask)
        for layer in (0, 1, n) if family != "rwkv7" else (0,):
            resid = cache["resid_pre", layer] if layer < n else model(tokens, attention_mask=mask, stop_at_layer=n)
            torch.testing.assert_close(model(resid, start_at_layer=layer, attention_mask=mask), logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(resid, "loss", mask, start_at_layer=layer, tokens=tokens), loss)
        torch.testing.assert_close(model(cache["resid_pre", 0], start_at_layer=0, stop_at_layer=1, attention_mask=mask),
                                   cache["resid_pre", 1], rtol=1e-5, atol=1e-5)
        if family == "rwkv7":
            assert not model.can_start_at(1) and model.can_start_at(0)
            with pytest.raises(ValueError, match=r"RWKV-7's layers after the first read .*v_first.* start at layer 0"):
                model(cache["resid_pre", 1], start_at_layer=1)
        resid = cache["resid_pre", 0]
        layer = 1 if family != "rwkv7" else 0  # a prefix's cache, continued from block `layer` on
        prefix = model.prefill(tokens[:, :4], attention_mask=mask[:, :4])
        continued = model(cache["resid_pre", layer][:, 4:], start_at_layer=layer, cache=prefix, attention_mask=mask[:, 4:])
        torch.testing.assert_close(continued, logits[:, 4:], rtol=1e-4, atol=1e-4)
        if layer:
            with pytest.raises(ValueError, match="blocks before 1 were left behind .* only with start_at_layer >= 1"):
                model(tokens[:, 5:], cache=prefix)
        for kwargs, message in ((dict(start_at_layer=n + 1), "start_at_layer must be an int in"),
                                (dict(start_at_layer=0, return_type="loss"), "needs the input's tokens: pass tokens="),
                                (dict(start_at_layer=0, tokens=tokens[:, 1:]), "tokens have shape"),
                                (dict(start_at_layer=0, attention_mask=mask[:, 1:]), "attention_mask has shape")):
            with pytest.raises(ValueError, match=message):
                model(resid, **kwargs)
        with pytest.raises(ValueError, match=r"the residual stream \[batch, pos, d_model"):
            model(tokens, start_at_layer=0)
        with pytest.raises(ValueError, match="tokens= goes with start_at_layer"):
            model(tokens, tokens=tokens)


@pytest.mark.parametrize("family", sorted(BY_KEY))
@pytest.mark.parametrize("prepend_bos", [None, True])
def test_test_prompt_prints_the_answers_rank(tiny, family, prepend_bos, capsys):
    model = tiny(family)
    tl_test_prompt(PROMPT, ANSWER, model, prepend_bos=prepend_bos, top_k=3)
    printed = capsys.readouterr().out
    prompt = model.to_tokens(PROMPT, prepend_bos=prepend_bos)
    answer = model.to_tokens(" " + ANSWER, prepend_bos=False)
    assert answer.shape == (1, 1)
    with torch.no_grad():
        logits = model(torch.cat([prompt, answer], 1))[0, prompt.shape[1] - 1]
    rank = int((logits > logits[answer[0, 0]]).sum())
    assert f"Tokenized prompt: {model.to_str_tokens(PROMPT, prepend_bos=prepend_bos)}" in printed
    assert ("<|endoftext|>" in printed.splitlines()[0]) == bool(prepend_bos)
    assert re.search(rf"Rank: {rank}\s+Logit:\s*{float(logits[answer[0, 0]]):.2f}", printed), printed
    assert f"Ranks of the answer tokens: [(' {ANSWER}', {rank})]" in printed


# ------------------------------------------------------------------ per-head and per-neuron results


@pytest.fixture(name="moved", scope="module")
def moved_fixture(tiny):
    """``moved(family)``: the tiny model with its norms' weights and Mamba-2's output bias moved off their
    initialisation (identity, zero), so that a share missing a norm's weight or the bias shows, and its cache."""
    models = {}

    def model_and_cache(family: str):
        if family not in models:
            model = copy.deepcopy(tiny(family))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith((".w", "b_o")):
                        p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
            tokens = model.to_tokens(["Mr. Darcy was not", "It is a truth universally"])
            with torch.no_grad():
                models[family] = model, tokens, *model.run_with_cache(tokens)
        return models[family]

    return model_and_cache


def _zeroing(index: int, dim: int):
    """A hook that zeroes entry ``index`` of its activation's axis ``dim`` (a head, or a neuron)."""
    def hook(x, hook):
        x = x.clone()
        x.select(dim, index).zero_()
        return x
    return hook


def _frozen_post_norm(model, cache, layer: int, norm: str) -> list:
    """A hook that holds block ``layer``'s post-norm ``norm`` at its clean scale (none where the block has none):
    with it, a share that RMSNorm passes is removed linearly, as the decomposition assumes."""
    if not getattr(model.blocks[layer], "post_norm", False):
        return []
    name = f"blocks.{layer}.{norm}.hook_scale"
    return [(name, lambda scale, hook: cache[name].clone())]


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_each_heads_result_is_what_removing_that_head_takes_from_its_mixers_output(moved, family):
    """The model's own forward is the reference: zeroing head h's input to W_O (a memory head's hook_gated_out, an
    attention head's hook_z, before its gate) takes exactly that head's result from the block's hook_attn_out, a
    post-norm held at its clean scale. A head mis-sliced from W_o, a missing gate or post-norm fails it."""
    model, tokens, _, cache = moved(family)
    stack, labels = cache.stack_head_results(return_labels=True)
    for layer in range(model.cfg.n_layers):
        heads = model.cfg.n_value_heads if model.blocks[layer].is_gdn else model.cfg.n_heads
        ours = [i for i, label in enumerate(labels) if label.startswith(f"L{layer}H")]
        assert [labels[i] for i in ours] == [f"L{layer}H{h}" for h in range(heads)]
        point = f"blocks.{layer}.linear_attn.hook_gated_out" if model.blocks[layer].is_gdn else f"blocks.{layer}.attn.hook_z"
        for h in {0, heads - 1}:
            with model.hooks(fwd_hooks=[(point, _zeroing(h, -2)), *_frozen_post_norm(model, cache, layer, "ln1_post")]):
                _, ablated = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_attn_out")
            torch.testing.assert_close(cache["attn_out", layer] - ablated["attn_out", layer], stack[ours[h]],
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(set(BY_KEY) - {"mamba2", "qwen3_5_moe", "qwen3_next"}))  # dense MLPs
def test_each_neurons_result_is_what_removing_it_takes_from_the_mlp_output(moved, family):
    """The same for a neuron (hook_post), where a norm follows the MLP too (OLMo-Hybrid's attention blocks)."""
    model, tokens, _, cache = moved(family)
    for layer in range(model.cfg.n_layers):
        results = cache.get_neuron_results(layer)
        torch.testing.assert_close(results.sum(-2), cache["mlp_out", layer], rtol=1e-4, atol=1e-5)
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", _zeroing(3, -1)),
                                    *_frozen_post_norm(model, cache, layer, "ln2_post")]):
            _, ablated = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_mlp_out")
        torch.testing.assert_close(cache["mlp_out", layer] - ablated["mlp_out", layer], results[..., 3, :],
                                   rtol=1e-4, atol=1e-5)
        for projection in (torch.randn(model.cfg.d_model), torch.randn(model.cfg.d_model, 3)):
            torch.testing.assert_close(cache.get_neuron_results(layer, project_output_onto=projection, pos_slice=-1),
                                       results[:, -1] @ projection, rtol=1e-4, atol=1e-5)
    # through ln_final and projected, as get_full_resid_decomposition asks for them (TransformerLens 4 forms this
    # stack by its own formula, which knows no post-norm)
    projection = torch.randn(model.cfg.d_model, 3)
    torch.testing.assert_close(cache.stack_neuron_results(-1, apply_ln=True, project_output_onto=projection),
                               cache.stack_neuron_results(-1, apply_ln=True) @ projection, rtol=1e-4, atol=1e-5)


FULL_DECOMPOSITIONS = [{}, {"layer": 1}, {"layer": 1, "mlp_input": True}, {"expand_neurons": False},
                       {"pos_slice": -1}]


@pytest.mark.parametrize("family", sorted(BY_KEY))
@pytest.mark.parametrize("options", FULL_DECOMPOSITIONS, ids=lambda o: ",".join(o) or "default")
def test_full_resid_decomposition_sums_to_the_residual_stream(moved, family, options):
    model, tokens, logits, cache = moved(family)
    if family in ("qwen3_5_moe", "qwen3_next") and options.get("expand_neurons", True):
        with pytest.raises(NotImplementedError, match="mixture of experts: its neurons are each expert's"):
            cache.get_full_resid_decomposition(**options)
        options = options | {"expand_neurons": False}
    if family == "mamba2" and options.get("mlp_input"):
        return  # no MLP, no resid_mid
    stack, labels = cache.get_full_resid_decomposition(return_labels=True, **options)
    assert len(labels) == len(stack) and labels[-2:] == ["embed", "bias"]
    layer = options.get("layer", model.cfg.n_layers)
    whole = cache[("resid_mid", layer) if options.get("mlp_input") else ("resid_post", -1) if layer == model.cfg.n_layers
                  else ("resid_pre", layer)]
    if options.get("pos_slice") == -1:
        whole = whole[:, -1]
    torch.testing.assert_close(stack.sum(0), whole, rtol=1e-4, atol=1e-5)
    if layer == model.cfg.n_layers:  # direct logit attribution: the shares' logits, through ln_final, sum to the model's
        # (RWKV-7's final LayerNorm has a bias, which adds its own term to each logit, in no share of the stream:
        # TransformerLens folds it into b_U)
        answer, final_bias = tokens[:, -1], getattr(model.ln_final, "b", torch.zeros(model.cfg.d_model))
        attrs = cache.logit_attrs(stack if options.get("pos_slice") == -1 else stack[:, :, -1], tokens=answer, pos_slice=-1)
        torch.testing.assert_close(attrs.sum(0) + (final_bias @ model.W_U)[answer],
                                   logits[torch.arange(len(tokens)), -1, answer], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_head_results_kept_by_compute_head_results_read_back_by_layer(moved, family):
    model, _, _, cache = moved(family)
    cache = copy.copy(cache)
    cache.cache_dict = dict(cache.cache_dict)
    stack = cache.stack_head_results(pos_slice=-1, incl_remainder=True)
    cache.compute_head_results()
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.{'linear_attn' if model.blocks[layer].is_gdn else 'attn'}.hook_result"
        assert cache["result", layer] is cache[name]
    assert torch.equal(cache.stack_head_results(pos_slice=-1, incl_remainder=True), stack)
    torch.testing.assert_close(stack.sum(0), cache["resid_post", -1][:, -1])


def test_stack_head_results_before_the_first_layer_is_empty_or_the_embedding(moved):
    _, _, _, cache = moved("qwen3_5")
    stack, labels = cache.stack_head_results(layer=0, return_labels=True, pos_slice=-1)
    assert stack.shape == (0, *cache["hook_embed"][:, -1].shape) and labels == []
    stack, labels = cache.stack_head_results(layer=0, return_labels=True, incl_remainder=True, pos_slice=-1)
    assert torch.equal(stack[0], cache["hook_embed"][:, -1]) and labels == ["remainder"]


@pytest.mark.parametrize("family", ["qwen3_5", "olmo_hybrid", "mamba2"])
def test_set_use_attn_result_keeps_each_layers_head_results_in_the_cache(tiny, family):
    """TransformerLens' set_use_attn_result: run_with_cache then holds cache["result", L], the heads'
    results, for each layer whose head inputs it cached; hooking a hook_result says what to edit instead."""
    model = tiny(family)
    tokens = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    assert model.cfg.use_attn_result is False
    try:
        model.set_use_attn_result(True)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
            first = model.cfg.gdn_layers[0]
            _, some = model.run_with_cache(tokens, names_filter=[f"blocks.{first}.linear_attn.hook_gated_out"])
    finally:
        model.set_use_attn_result(False)
    stack = cache.stack_head_results()
    heads = [cache["result", layer].shape[-2] for layer in range(model.cfg.n_layers)]
    torch.testing.assert_close(torch.cat([cache["result", layer] for layer in range(model.cfg.n_layers)], -2),
                               stack.movedim(0, -2))
    assert sum(heads) == len(stack)
    assert list(some.keys()) == [f"blocks.{first}.linear_attn.hook_gated_out", f"blocks.{first}.linear_attn.hook_result"]
    with torch.no_grad():
        _, without = model.run_with_cache(tokens)
    assert not any(name.endswith("hook_result") for name in without.keys())
    with pytest.raises(ValueError, match="not a hook point here: a head's result is formed from the cache"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{first}.attn.hook_result", lambda x, hook: x)])


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_next"])
def test_neuron_results_of_an_expert_block_are_refused(moved, family):
    _, _, _, cache = moved(family)
    for helper in (lambda: cache.get_neuron_results(0), lambda: cache.stack_neuron_results(-1)):
        with pytest.raises(NotImplementedError, match="block 0's MLP is a mixture of experts") as error:
            helper()
        assert "expand_neurons=False" in str(error.value)


def _lens_by_hand(model, cache, positions=slice(None)) -> torch.Tensor:
    """The logit lens computed here: each block's cached hook_resid_pre and the last block's hook_resid_post,
    through ln_final and W_U, [n_layers + 1, batch, pos, d_vocab]."""
    L = model.cfg.n_layers
    stack = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(L)] + [cache[f"blocks.{L - 1}.hook_resid_post"]]
    with torch.no_grad():
        return torch.stack([model.ln_final(resid[:, positions]) @ model.W_U for resid in stack])


@pytest.mark.skipif(not TL_HAS_LOGIT_LENS, reason="cache.logit_lens is TransformerLens 4's; this is TransformerLens 3")
@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_logit_lens_reads_each_layer_through_ln_final_and_unembed(tiny, family):
    """TransformerLens 4's cache.logit_lens on every family (GDN hybrids, Mamba-2, RWKV-7's LayerNorm), against the
    lens computed here from the cached residual stream; its last entry is the model's own logits."""
    model = tiny(family).eval()
    logits, cache = model.run_with_cache(PROMPT)
    by_hand = _lens_by_hand(model, cache)
    lens = cache.logit_lens(positions=None)
    L = model.cfg.n_layers
    assert lens.labels == [f"{i}_pre" for i in range(L)] + ["final_post"]
    assert lens.values.shape == (L + 1, *logits.shape)
    torch.testing.assert_close(lens.values, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lens.values[-1], logits, rtol=1e-5, atol=1e-5)
    # the entries differ from each other: a lens that read one layer everywhere would fail above
    assert not torch.allclose(by_hand[0], by_hand[-1], atol=1e-3)
    # targets: the answer's rank among all tokens at the last position, at every layer
    answer = model.to_single_token(" " + ANSWER)
    ranked = cache.logit_lens(targets=" " + ANSWER)
    last = by_hand[:, :, -1]
    assert torch.equal(ranked.rank_trajectory(" " + ANSWER), (last > last[..., answer:answer + 1]).sum(-1))
    torch.testing.assert_close(ranked.values[..., 0], last[..., answer], rtol=1e-5, atol=1e-5)
    top = cache.logit_lens(top_k=3, return_type="log_probs")
    assert torch.equal(top.readout.top_ids, last.topk(3, -1).indices)
    torch.testing.assert_close(top.values, last.log_softmax(-1).topk(3, -1).values, rtol=1e-5, atol=1e-5)
    # TransformerLens' function given the model and the prompt runs it and reads the same
    from transformer_lens.tools.analysis import logit_lens

    torch.testing.assert_close(logit_lens(model, PROMPT, positions=None).values, by_hand, rtol=1e-5, atol=1e-5)
    # with each block's resid_mid, where a block has one (a Mamba-2 block is one mixer, no MLP)
    if family == "mamba2":
        with pytest.raises(ValueError, match=r"incl_mid=True reads every block's hook_resid_mid, and blocks \[0, 1\] "
                                             r"of this Mamba-2 model have none"):
            cache.logit_lens(incl_mid=True)
    else:
        mid = cache.logit_lens(incl_mid=True, positions=None)
        assert mid.labels[1::2][:L] == [f"{i}_mid" for i in range(L)]
        with torch.no_grad():
            torch.testing.assert_close(mid.values[1], model.ln_final(cache["blocks.0.hook_resid_mid"]) @ model.W_U,
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mid.values[::2], by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(TL_HAS_LOGIT_LENS, reason="TransformerLens 4 has a logit lens")
def test_logit_lens_under_transformer_lens_3_says_what_computes_the_same(tiny):
    model = tiny("qwen3_5")
    logits, cache = model.run_with_cache(PROMPT)
    with pytest.raises(NotImplementedError, match=r"cache.logit_lens is TransformerLens 4's .* TransformerLens 3\.") as error:
        cache.logit_lens()
    recipe = "model.unembed(model.ln_final(cache.accumulated_resid(pos_slice=-1)))"
    assert recipe in str(error.value)
    with torch.no_grad():
        torch.testing.assert_close(eval(recipe), _lens_by_hand(model, cache)[:, :, -1], rtol=1e-5, atol=1e-5)


def test_unembed_and_b_U_are_what_forward_computes_last(tiny):
    model = tiny("olmo_hybrid")
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        assert torch.equal(model.unembed(model.ln_final(resid)), model(tokens))
        assert torch.equal(model.unembed(model.ln_final(resid)) + model.b_U, model(tokens))
    assert model.b_U.shape == (model.cfg.d_vocab,) and not model.b_U.any()


def _norms(model) -> dict[str, torch.nn.Module]:
    """Every norm with a hook_normalized, by its name (not Mamba-2's TransformerLens aliases of them)."""
    return {name.removesuffix(".hook_normalized"): model.get_submodule(name.removesuffix(".hook_normalized"))
            for name, hook_point in model.hook_dict.items()
            if name.endswith(".hook_normalized") and not isinstance(hook_point, AliasHookPoint)}


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_hook_normalized_is_transformer_lens_x_over_scale(moved, family):
    """Each norm's ``hook_normalized`` is TransformerLens' x / scale before the weight: torch's own rms_norm (RWKV-7's
    LayerNorms: layer_norm) of the norm's input without a weight, and the norm's output is it times the weight
    (plus the bias); ``cache["normalized", L, "ln2"]`` reads it. Edits are carried: zeroing the final norm's makes
    every position's logits the same, and doubling a block norm's is doubling its weight."""
    model, tokens, *_ = moved(family)  # norms' weights off 1, so that a point after the weight shows
    norms = _norms(model)
    seen = {}
    handles = [norm.register_forward_hook(lambda module, args, out, name=name: seen.update({name: (args[0], out)}))
               for name, norm in norms.items()]
    try:
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_normalized"))
    finally:
        for handle in handles:
            handle.remove()
    assert "ln_final" in norms and {f"blocks.0.{n}" for n in ("ln1",)} <= set(norms)
    for name, norm in norms.items():
        x, out = seen[name]
        d = x.shape[-1:]
        layer_norm = hasattr(norm, "b")
        reference = (torch.nn.functional.layer_norm(x.float(), d, eps=norm.eps) if layer_norm
                     else torch.nn.functional.rms_norm(x.float(), d, eps=norm.eps))
        normalized = cache[f"{name}.hook_normalized"]
        torch.testing.assert_close(normalized, reference, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(out.float(), normalized * norm.weight + (norm.b if layer_norm else 0), msg=name)
    if family != "mamba2":  # Mamba-2's blocks have one norm
        assert cache["normalized", 0, "ln2"] is cache["blocks.0.ln2.hook_normalized"]

    zeroed = model.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: torch.zeros_like(x))])
    torch.testing.assert_close(zeroed, zeroed[:1, :1].expand_as(zeroed), rtol=0, atol=0)
    norm = model.blocks[0].ln1
    doubled = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.ln1.hook_normalized", lambda x, hook: 2 * x)])
    with torch.no_grad():
        kept = norm.w.clone()
        norm.w.copy_(2 * norm.weight - (1 if getattr(norm, "zero_centred", False) else 0))  # weight 2·(1 + w) or 2·w
        try:
            twice_the_weight = model(tokens)
        finally:
            norm.w.copy_(kept)
    torch.testing.assert_close(doubled, twice_the_weight, rtol=1e-5, atol=1e-5)
    assert (doubled - model(tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_stacked_weights_are_transformer_lens_or_refused_saying_where(tiny, family):
    """``model.W_in``/``W_out``/``W_gate``/``b_in``/``b_out`` stack every block's MLP as TransformerLens does (so
    ``cache["post", L] @ model.W_out[L] + model.b_out[L]`` is the MLP's output), where every block has a dense MLP;
    elsewhere, and for the attention stacks (``W_Q`` … ``OV``, which need attention in every layer), ``hasattr`` is
    False and the error says why and where each layer's own weight is."""
    model = tiny(family)
    mlps = [getattr(block, "mlp", None) for block in model.blocks]
    if all(mlp is not None and hasattr(mlp, "W_in") and mlp.W_in.dim() == 2 for mlp in mlps):
        assert model.W_in.shape == (model.cfg.n_layers, model.cfg.d_model, mlps[0].W_in.shape[-1])
        for layer, mlp in enumerate(mlps):
            assert torch.equal(model.W_out[layer], mlp.W_out) and torch.equal(model.W_in[layer], mlp.W_in)
        tokens = model.to_tokens(["It is a truth universally acknowledged"])
        _, cache = model.run_with_cache(tokens)
        for layer in range(model.cfg.n_layers):
            if not getattr(model.blocks[layer], "post_norm", False):  # a post-norm follows OLMo-Hybrid's MLPs
                torch.testing.assert_close(cache["post", layer] @ model.W_out[layer] + model.b_out[layer],
                                           cache["mlp_out", layer])
        assert hasattr(model, "W_gate") == hasattr(mlps[0], "W_gate")
    else:
        assert not hasattr(model, "W_in")
        with pytest.raises(AttributeError, match=r"has no model.W_out: .*(have no MLP|mixtures of experts, whose "
                                                 r"weights are per expert \(model.blocks\[L\].mlp.W_out)"):
            model.W_out
    assert not hasattr(model, "W_Q") and not hasattr(model, "OV")
    memory = [i for i, block in enumerate(model.blocks) if block.is_gdn]
    with pytest.raises(AttributeError, match=re.escape(f"layers {memory} are memory layers")):
        model.W_Q
    attention = [i for i in range(model.cfg.n_layers) if i not in memory]
    for layer in attention:  # where the message sends the reader
        assert model.blocks[layer].attn.W_Q.dim() == 3
    with pytest.raises(AttributeError, match="has no attribute 'W_Qx'"):  # other names fail as ever
        model.W_Qx


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_all_head_labels_are_the_head_results_labels(tiny, family):
    model = tiny(family)
    _, cache = model.run_with_cache(model.to_tokens(["Emma"]))
    assert model.all_head_labels() == cache.stack_head_results(return_labels=True)[1]


def test_token_position_helpers(tiny):
    model = tiny("qwen3_5")
    prompt = "It is a truth universally acknowledged, a truth"
    str_tokens = model.to_str_tokens(prompt)
    token = model.to_single_token(" truth")
    assert model.to_single_str_token(token) == " truth"
    assert model.get_token_position(" truth", prompt) == str_tokens.index(" truth")
    assert model.get_token_position(token, model.to_tokens(prompt), mode="last") == len(str_tokens) - 1
    assert model.get_token_position(" truth", model.to_tokens(prompt)[0], mode="first") == str_tokens.index(" truth")
    with pytest.raises(ValueError, match="does not occur in the input"):
        model.get_token_position(" Emma", prompt)
    with pytest.raises(ValueError, match="mode must be 'first' or 'last'"):
        model.get_token_position(" truth", prompt, mode="middle")
    with pytest.raises(ValueError, match="one sequence"):
        model.get_token_position(" truth", model.to_tokens([prompt, prompt]))
    with pytest.raises(TypeError, match="one token id"):
        model.to_single_str_token(torch.tensor(3))


def test_transformer_lens_weight_processing_flags(tmp_path):
    """TransformerLens' weight processing is never done: its flags are taken as False (and
    ``from_pretrained_no_processing`` is ``from_pretrained``), refused as True; an unknown keyword is a TypeError."""
    save_tiny("qwen3_5", tmp_path)
    tokens = torch.tensor([[5, 9, 2, 7]])
    plain = HookedGatedDeltaNet.from_pretrained(tmp_path)(tokens)
    flags = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False,
                 refactor_factored_attn_matrices=False)
    assert torch.equal(HookedGatedDeltaNet.from_pretrained(tmp_path, **flags)(tokens), plain)
    assert torch.equal(HookedGatedDeltaNet.from_pretrained_no_processing(tmp_path)(tokens), plain)
    with pytest.raises(ValueError, match="center_unembed=True, fold_ln=True: these models' weights are used as the "
                                         "checkpoint has them"):
        HookedGatedDeltaNet.from_pretrained(tmp_path, fold_ln=True, center_unembed=True)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['fold_lm'\]"):
        HookedGatedDeltaNet.from_pretrained(tmp_path, fold_lm=False)


def test_all_head_labels_count_each_layers_own_heads():
    """Where the attention layers have fewer heads than the memory layers (2 query heads against 4 value heads),
    each layer's labels count its own."""
    torch.manual_seed(0)
    model = HookedGatedDeltaNet.from_config(tiny_hf_config("grouped", num_attention_heads=2, num_key_value_heads=1))
    _, cache = model.run_with_cache(torch.tensor([[3, 5, 8]]))
    labels = model.all_head_labels()
    assert labels == cache.stack_head_results(return_labels=True)[1]
    assert len(labels) == sum(model.cfg.n_value_heads if block.is_gdn else 2 for block in model.blocks)


@pytest.mark.parametrize("family", sorted(BY_KEY))
def test_input_to_embed_feeds_start_at_layer_0(tiny, family):
    """TransformerLens' ``input_to_embed``: the residual stream entering block 0 (hook_embed's value), the tokens, no
    positional embedding and the mask, which ``model(residual, start_at_layer=0, tokens=..., attention_mask=...)``
    runs to the logits of the strings themselves, padding and all."""
    model = tiny(family)
    prompts = ["It is a truth universally acknowledged", "Emma"]
    residual, tokens, positional, mask = model.input_to_embed(prompts)
    logits, cache = model.run_with_cache(prompts, names_filter="hook_embed")
    assert positional is None and torch.equal(tokens, model.to_tokens(prompts)) and mask is not None
    torch.testing.assert_close(residual, cache["hook_embed"], rtol=0, atol=0)
    torch.testing.assert_close(model(residual, start_at_layer=0, tokens=tokens, attention_mask=mask), logits,
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="continue one with model\\(tokens, cache=cache\\)"):
        model.input_to_embed(prompts, past_kv_cache=model.prefill(prompts))


def test_set_tokenizer_and_its_default_padding_side(tiny):
    """``set_tokenizer(tokenizer, default_padding_side=...)`` sets what padding_side=None means (left until then);
    a cache then refuses rows that end in padding, saying so."""
    model = tiny("qwen3_5")
    texts = ["Mr. Darcy was", "Emma"]
    tokenizer = model.tokenizer
    assert model.cfg.default_padding_side == DEFAULT_PADDING_SIDE == "left"
    try:
        model.set_tokenizer(tokenizer, default_padding_side="right")
        assert torch.equal(model.to_tokens(texts), tokenizer(texts, return_tensors="pt", padding=True,
                                                             padding_side="right")["input_ids"])
        assert torch.equal(model.to_tokens(texts, padding_side="left"), tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="left")["input_ids"])
        with pytest.raises(ValueError, match="some rows end in padding"):
            model.generate(texts, max_new_tokens=2, verbose=False)
        model.set_tokenizer(tokenizer)  # None: the padding side stays
        assert model.cfg.default_padding_side == "right"
        with pytest.raises(ValueError, match="default_padding_side must be one of"):
            model.set_tokenizer(tokenizer, default_padding_side="middle")
    finally:
        model.set_tokenizer(tokenizer, default_padding_side=DEFAULT_PADDING_SIDE)
    assert torch.equal(model.to_tokens(texts), tokenizer(texts, return_tensors="pt", padding=True,
                                                         padding_side="left")["input_ids"])
