"""TransformerLens 3.x and 4.x: the one difference we handle (`add_hook`'s handle), and SAELens beside us.

TransformerLens 4 returns the new hook's `LensHandle` from ``HookPoint.add_hook``; 3.x (the versions
sae-lens allows) returns None. `hooked_gdn.hook_points.add_hook_with_handle` hides that; the tests
below run it and SAE splicing under both behaviours, whichever TransformerLens is installed (the
3.x one is simulated on 4.x and is real on 3.x). CI runs this file with the main suite (newest 4.x)
and again in a venv with the newest 3.x beside sae-lens (`.ci/run`), where the last test runs too.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from transformer_lens.hook_points import HookPoint

from hooked_gdn.hook_points import add_hook_with_handle
from hooked_gdn.sites import site_name
from writesae import BilinearMatrixSAE
from writesae.splice import HookedSAEGatedDeltaNet

from .conftest import random_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(name="add_hook", params=["installed", "returns None (3.x)"])
def add_hook_fixture(request, monkeypatch):
    """``HookPoint.add_hook`` as installed, and as TransformerLens 3.x has it: the same, returning None."""
    if request.param != "installed":
        original = HookPoint.add_hook

        def add_hook_returning_none(self, *args, **kwargs):
            original(self, *args, **kwargs)

        monkeypatch.setattr(HookPoint, "add_hook", add_hook_returning_none)
    return request.param


@pytest.mark.parametrize("prepend", [False, True])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_add_hook_with_handle_returns_the_handle_it_added(add_hook, prepend, direction):
    hp = HookPoint()
    calls = []
    hp.add_hook(lambda x, hook: calls.append("old"), dir=direction)
    handle = add_hook_with_handle(hp, lambda x, hook: calls.append("new"), dir=direction, is_permanent=True, prepend=prepend)
    handles = hp.fwd_hooks if direction == "fwd" else hp.bwd_hooks
    assert len(handles) == 2 and handles[0 if prepend else 1] is handle and handle.is_permanent
    x = torch.ones(3, requires_grad=True)
    hp(x).sum().backward() if direction == "bwd" else hp(x)
    assert calls == (["new", "old"] if prepend else ["old", "new"])
    handle.hook.remove()  # removed as writesae.splice removes it: only the new hook goes
    handles.remove(handle)
    calls.clear()
    hp(x).sum().backward() if direction == "bwd" else hp(x)
    assert calls == ["old"] and len(handles) == 1


def test_splice_attaches_first_and_detaches_only_its_hooks(add_hook):
    """An SAE spliced at a site that already has a user's hook: the user's hook sees the spliced value
    while attached, and is all that is left after ``reset_saes``, with the model's logits back."""
    model = random_tiny_model(HookedSAEGatedDeltaNet)
    layer = model.cfg.gdn_layers[1]
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=24, k=4, sparsity="topk",
                            site=site_name(layer, "state"), heads="all", seed=0)
    hook_state = model.blocks[layer].linear_attn.hook_state
    seen = []
    with torch.no_grad():
        clean = model(TOKENS)
        model.add_hook(hook_state.name, lambda s, hook: seen.append(s.clone()), is_permanent=True)
        model(TOKENS)
        model.add_sae(sae, use_error_term=False)
        assert len(hook_state.fwd_hooks) == 2
        spliced = model(TOKENS)
        model.reset_saes()
        assert len(hook_state.fwd_hooks) == 1 and not any(".sae." in name for name in model.hook_dict)
        after = model(TOKENS)
        model.reset_hooks(including_permanent=True)
    assert (spliced - clean).abs().max() > 1e-4  # the splice acted
    assert not torch.equal(seen[1], seen[0])  # the user's hook saw the spliced state, not the clean one
    assert torch.equal(seen[2], seen[0])
    assert torch.equal(after, clean)


def test_the_installed_transformer_lens_is_in_the_declared_range():
    declared = re.search(r'^\s*"(transformer-lens[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    installed = importlib.metadata.version("transformer-lens")
    assert Requirement(declared).specifier.contains(installed), f"transformer-lens {installed} is outside {declared!r}"


def test_an_saelens_sae_runs_on_our_hook_points_in_one_environment():
    """sae-lens installed beside us (TransformerLens 3.x): its SAEs use the same `HookPoint` class as our
    model, and one spliced into our residual stream sees there what our cache holds."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (CI installs it in the TransformerLens 3.x venv)")
    model = random_tiny_model(HookedSAEGatedDeltaNet)
    torch.manual_seed(0)
    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=model.cfg.d_model, d_sae=32, k=4))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0.0, 0.3)
    assert isinstance(sae.hook_sae_acts_post, HookPoint)
    codes = []
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: codes.append(acts))
    name = "blocks.1.hook_resid_post"
    with torch.no_grad():
        clean, cache = model.run_with_cache(TOKENS, names_filter=name)
        spliced = model.run_with_hooks(TOKENS, fwd_hooks=[(name, lambda x, hook: sae(x))])
        torch.testing.assert_close(codes[0], sae.encode(cache[name]))
    assert codes[0].shape == (2, 20, 32) and int((codes[0] > 0).sum(-1).max()) == 4
    assert (spliced - clean).abs().max() > 1e-3
