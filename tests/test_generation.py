"""Prefix caches and generation, against one long forward and against transformers' generate."""

from __future__ import annotations

import pytest
import torch

from hooked_gdn.sites import edit_at_positions, gdn_hook_name, hook_positions

from .conftest import FAMILIES
from .test_edits import site


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_prefill_then_continue_equals_one_forward(model):
    tokens = torch.randint(0, 101, (2, 53), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(tokens)
        cache = model.prefill(tokens[:, :30])
        middle = model(tokens[:, 30:31], cache=cache)
        rest = model(tokens[:, 31:], cache=cache)
    assert cache.length == 53
    assert (torch.cat([middle, rest], 1) - whole[:, 30:]).abs().max().item() <= 1e-4


def test_the_cached_conv_state_is_a_copy_of_the_last_conv_inputs(model):
    tokens = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(5))
    K = model.cfg.conv_kernel
    cache = model.prefill(tokens)
    _, acts = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("_pre_conv"))
    for layer in model.cfg.gdn_layers:
        conv = cache.conv_states[layer]
        inputs = torch.cat([acts[gdn_hook_name(layer, f"hook_{x}_pre_conv")].flatten(2) for x in "qkv"], -1)
        assert torch.equal(conv, inputs[:, -(K - 1):].transpose(1, 2))
        # its own storage, not a view that keeps the whole prefill input alive
        assert conv.untyped_storage().nbytes() == conv.numel() * conv.element_size()


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_prefill_with_left_padding_continues_like_unpadded(model):
    tokens = torch.randint(1, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, :6] = 0
    more = torch.randint(1, 101, (2, 5))
    with torch.no_grad():
        cache = model.prefill(tokens, attention_mask=mask)
        continued = model(more, cache=cache)
        alone = model(torch.cat([tokens[1:, 6:], more[1:]], 1))
    assert (continued[1] - alone[0, -5:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generate_matches_transformers(make_pair, name):
    hf, ours = make_pair(name, seed=3)
    prompt = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                               attention_mask=torch.ones_like(prompt))
        got = ours.generate(prompt, max_new_tokens=12, stop_at_eos=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 20, 0.9), (1.3, None, None), (1.0, 5, None), (0.9, None, 0.5)])
def test_seeded_sampling_draws_transformers_tokens(make_pair, name, temperature, top_k, top_p):
    """Same seed, same logits: the sampled tokens are those transformers' generate draws (its top-k and top-p
    filters, and one multinomial draw a step). A filter left out, applied in the other order, or a temperature
    applied twice draws other tokens."""
    hf, ours = make_pair(name, seed=3)
    prompt = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.manual_seed(11)
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=True, temperature=temperature,
                               top_k=top_k or 0, top_p=top_p or 1.0, eos_token_id=None, pad_token_id=0,
                               attention_mask=torch.ones_like(prompt))
        torch.manual_seed(11)
        got = ours.generate(prompt, max_new_tokens=12, stop_at_eos=False, do_sample=True, temperature=temperature,
                            top_k=top_k, top_p=top_p)
    assert torch.equal(got, expected)


def test_a_large_frequency_penalty_never_repeats_a_token(model):
    """TransformerLens' freq_penalty subtracts the penalty times each token's count so far: at 1e4 no token of the
    row (prompt included, left-padded or not) is drawn again, where without it the same seed repeats one."""
    prompt = torch.tensor([[7, 8, 9, 10, 11, 12]])
    padded, mask = torch.tensor([[5, 5, 7, 8, 9, 10, 11, 12]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    torch.manual_seed(0)
    free = model.generate(prompt, max_new_tokens=40, stop_at_eos=False, do_sample=True, temperature=2.0)
    assert len(set(free[0].tolist())) < free.shape[1]
    for tokens, attention_mask in ((prompt, None), (padded, mask)):
        torch.manual_seed(0)
        penalised = model.generate(tokens, max_new_tokens=40, stop_at_eos=False, do_sample=True, temperature=2.0,
                                   freq_penalty=1e4, attention_mask=attention_mask)
        row = penalised[0, 2 if attention_mask is not None else 0:].tolist()
        assert len(set(row)) == len(row)


def test_generate_without_the_cache_reruns_the_sequence_and_gives_the_same_tokens(model):
    prompt = torch.randint(1, 101, (2, 6), generator=torch.Generator().manual_seed(4))
    seen = []
    with model.hooks(fwd_hooks=[(site(model, "hook_write_value"), lambda x, hook: seen.append(hook_positions(hook).tolist()))]):
        uncached = model.generate(prompt, max_new_tokens=3, stop_at_eos=False, use_past_kv_cache=False)
    assert seen == [list(range(6)), list(range(7)), list(range(8))]
    assert torch.equal(uncached, model.generate(prompt, max_new_tokens=3, stop_at_eos=False))


def test_generate_return_types_and_progress_bar(capsys):
    from hooked_gdn import HookedGatedDeltaNet

    model = HookedGatedDeltaNet.from_pretrained("gdn-austen")
    tokens = model.to_tokens(["It is a truth", "Mr. Darcy"])
    as_text = model.generate(tokens, max_new_tokens=3, return_type="str")
    assert isinstance(as_text, list) and as_text == [model.tokenizer.decode(row, skip_special_tokens=True)
                                                    for row in model.generate(tokens, max_new_tokens=3).tolist()]
    assert model.generate(tokens[:1], max_new_tokens=3, return_type="str") == as_text[0]
    assert torch.equal(model.generate("It is a truth", max_new_tokens=3, return_type="tokens"),
                       model.generate(model.to_tokens("It is a truth"), max_new_tokens=3))
    capsys.readouterr()
    model.generate("It is a truth", max_new_tokens=3, verbose=True, stop_at_eos=False)
    assert "3/3" in capsys.readouterr().err
    model.generate("It is a truth", max_new_tokens=3)
    assert capsys.readouterr().err == ""


def test_write_hook_fires_every_step_and_its_edit_steers_generation(model):
    prompt = torch.randint(1, 101, (1, 6), generator=torch.Generator().manual_seed(4))
    seen = []

    def record(x, hook):
        seen.append(hook_positions(hook).tolist())

    name = site(model, "hook_write_value")
    with model.hooks(fwd_hooks=[(name, record)]):
        model.generate(prompt, max_new_tokens=5, stop_at_eos=False)
    assert seen == [[0, 1, 2, 3, 4, 5], [6], [7], [8], [9]]

    clean = model.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    big = lambda rows, pos: rows * 0 + 50.0
    with model.hooks(fwd_hooks=[(name, edit_at_positions(big, [6, 7]))]):
        steered = model.generate(prompt, max_new_tokens=8, stop_at_eos=False)
    assert torch.equal(steered[:, :8], clean[:, :8])  # the prompt and the token chosen before the edit
    assert not torch.equal(steered, clean)


def test_generate_stops_at_eos(model):
    prompt = torch.randint(1, 101, (1, 4))
    eos = int(model.generate(prompt, max_new_tokens=1, stop_at_eos=False)[0, -1])
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=eos)
    assert out.shape[1] == 5 and int(out[0, -1]) == eos


def test_bad_generation_arguments_are_refused(model):
    tokens = torch.tensor([[3, 4, 5]])
    for kwargs, message in ((dict(do_sample=True, top_k=0), "top_k must be"), (dict(do_sample=True, top_k=102), "top_k must be"),
                            (dict(do_sample=True, temperature=0.0), "temperature > 0"),
                            (dict(do_sample=True, temperature=-1.0), "temperature > 0"),
                            (dict(do_sample=True, top_p=0.0), "top_p must be"), (dict(do_sample=True, top_p=1.5), "top_p must be"),
                            (dict(do_sample=True, freq_penalty=-1.0), "freq_penalty must be"),
                            (dict(return_type="embeds"), "return_type must be"),
                            (dict(max_new_tokens=-1), "max_new_tokens must be")):
        with pytest.raises(ValueError, match=message):
            model.generate(tokens, **kwargs)
    with pytest.raises(ValueError, match="the input has no tokens"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))
    assert torch.equal(model.generate(tokens, max_new_tokens=0), tokens)


@pytest.mark.parametrize("max_tokens_per_yield", [1, 4, 100])
def test_generate_stream_yields_generates_tokens_in_chunks(model, max_tokens_per_yield):
    """TransformerLens' generate_stream: the prompt with the first new tokens once there are max_tokens_per_yield of
    them, then chunks of max_tokens_per_yield new tokens, the rest last; joined, generate's tokens (sampled ones too,
    from the same seed), stopping at EOS as generate does."""
    prompt = torch.randint(1, 101, (2, 3), generator=torch.Generator().manual_seed(7))
    chunks = list(model.generate_stream(prompt, max_new_tokens=9, max_tokens_per_yield=max_tokens_per_yield,
                                        stop_at_eos=False))
    assert torch.equal(torch.cat(chunks, 1), model.generate(prompt, max_new_tokens=9, stop_at_eos=False))
    sizes = [chunk.shape[1] for chunk in chunks]
    assert sizes[0] == max(min(max_tokens_per_yield, 12), 4) and all(s == max_tokens_per_yield for s in sizes[1:-1])
    assert sum(sizes) == 12
    torch.manual_seed(0)
    sampled = torch.cat(list(model.generate_stream(prompt, max_new_tokens=5, max_tokens_per_yield=max_tokens_per_yield,
                                                   do_sample=True, stop_at_eos=False)), 1)
    torch.manual_seed(0)
    assert torch.equal(sampled, model.generate(prompt, max_new_tokens=5, do_sample=True, stop_at_eos=False))
    eos = int(model.generate(prompt[:1], max_new_tokens=1, stop_at_eos=False)[0, -1])
    stopped = torch.cat(list(model.generate_stream(prompt[:1], max_new_tokens=10, eos_token_id=eos,
                                                   max_tokens_per_yield=max_tokens_per_yield)), 1)
    assert torch.equal(stopped, model.generate(prompt[:1], max_new_tokens=10, eos_token_id=eos))
    assert list(model.generate_stream(prompt, max_new_tokens=0)) == []
    with pytest.raises(ValueError, match="max_tokens_per_yield must be"):
        next(model.generate_stream(prompt, max_tokens_per_yield=0))
