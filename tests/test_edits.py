"""Edits returned by hooks carry through the recurrence: parallel mode against sequential mode."""

from __future__ import annotations

import pytest
import torch

from hooked_gdn.sites import edit_at_positions, gdn_hook_name

from .conftest import FAMILIES


def site(model, name):
    return gdn_hook_name(model.cfg.gdn_layers[1], name)


def edit_cases(model):
    H, dk, dv = model.cfg.n_value_heads, model.cfg.d_key, model.cfg.d_value
    g = torch.Generator().manual_seed(0)
    new_key = torch.nn.functional.normalize(torch.randn(dk, generator=g), dim=0)
    new_value = torch.randn(dv, generator=g)
    diffs = {p: torch.randn(H, dk, dv, generator=g) for p in (5, 17, 40)}

    def delete(rows, pos):
        rows[:, 1] = 0
        return rows

    def set_value(rows, pos):
        rows[:, 0] = new_value
        return rows

    def set_key(rows, pos):
        rows[:, 0] = new_key
        return rows

    def add_diff(rows, pos):
        return rows + diffs[pos]

    return {
        "delete write": [(site(model, "hook_write_value"), edit_at_positions(delete, [20]))],
        "replace write": [(site(model, "hook_write_key"), edit_at_positions(set_key, [20])),
                          (site(model, "hook_write_value"), edit_at_positions(set_value, [20]))],
        "state difference at one position": [(site(model, "hook_state"), edit_at_positions(add_diff, [17]))],
        "state differences at several positions": [(site(model, "hook_state"), edit_at_positions(add_diff, [5, 17, 40]))],
    }


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
@pytest.mark.parametrize("case", ["delete write", "replace write", "state difference at one position",
                                  "state differences at several positions"])
def test_parallel_edit_equals_sequential_edit(model, case):
    tokens = torch.randint(0, 101, (2, 45), generator=torch.Generator().manual_seed(1))
    hooks = edit_cases(model)[case]
    with torch.no_grad():
        clean = model(tokens)
        parallel = model.run_with_hooks(tokens, fwd_hooks=hooks)
        sequential = model.run_with_hooks(tokens, fwd_hooks=hooks, recurrence="sequential")
    assert (parallel - sequential).abs().max().item() <= 1e-4
    first = {"delete write": 20, "replace write": 20}.get(case, 5 if "several" in case else 17)
    assert (parallel[:, :first] - clean[:, :first]).abs().max().item() <= 1e-5
    assert (parallel[:, first] - clean[:, first]).abs().max().item() > 1e-4
    assert (parallel[:, -1] - clean[:, -1]).abs().max().item() > 1e-4  # carried to the end


def test_sequential_without_edits_equals_parallel(model):
    tokens = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        assert (model(tokens, recurrence="sequential") - model(tokens)).abs().max().item() <= 1e-4


def test_sequential_cache_concatenates_per_position_firings(model):
    tokens = torch.randint(0, 101, (1, 12))
    names = [site(model, "hook_state"), site(model, "hook_write_value")]
    _, par = model.run_with_cache(tokens, names_filter=names)
    _, seq = model.run_with_cache(tokens, names_filter=names, recurrence="sequential")
    for name in names:
        assert seq[name].shape == par[name].shape
        assert (seq[name] - par[name]).abs().max().item() <= 1e-5


def test_deleting_the_write_equals_zero_beta(model):
    t, head = 20, 1
    tokens = torch.randint(0, 101, (2, 45), generator=torch.Generator().manual_seed(2))

    def zero(rows, pos):
        rows[:, head] = 0
        return rows

    with torch.no_grad():
        deleted = model.run_with_hooks(tokens, fwd_hooks=[(site(model, "hook_write_value"), edit_at_positions(zero, [t]))])

        def zero_beta(x, hook):
            x = x.clone()
            x[:, t, head] = 0
            return x

        no_beta = model.run_with_hooks(tokens, fwd_hooks=[(site(model, "hook_beta"), zero_beta)])
    assert (deleted - no_beta).abs().max().item() <= 1e-5


def test_in_place_edits_count(model):
    tokens = torch.randint(0, 101, (1, 30))

    def in_place(x, hook):
        x[:, 10] = 0  # TransformerLens habit: edit in place, return nothing

    with torch.no_grad():
        returned = model.run_with_hooks(tokens, fwd_hooks=[(site(model, "hook_write_value"), edit_at_positions(lambda r, p: r * 0, [10]))])
        edited = model.run_with_hooks(tokens, fwd_hooks=[(site(model, "hook_write_value"), in_place)])
    assert torch.allclose(returned, edited, atol=1e-6)


def test_final_state_edit_carries_into_continuation(model):
    tokens = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        cache = model.prefill(tokens[:, :10])
        clean = model(tokens[:, 10:], cache=cache.copy())
        with model.hooks(fwd_hooks=[(site(model, "hook_final_state"), lambda x, hook: x + 10.0)]):
            edited_cache = model.prefill(tokens[:, :10])
        edited = model(tokens[:, 10:], cache=edited_cache)
    assert (clean - edited).abs().max().item() > 1e-4
