"""Backward hooks, as TransformerLens users attach them (``bwd_hooks=``, ``add_hook(..., dir="bwd")``,
``run_with_cache(incl_bwd=True)``): each gets the gradient of the loss at its point, checked against what a forward
hook sees, the gradient of a zero it adds there; on a hybrid GDN model, Mamba-2 and RWKV-7, in both recurrence modes,
and on a spliced SAE's codes."""

from __future__ import annotations

import pytest
import torch

from hooked_gdn.mamba2 import HookedMamba2

from .conftest import random_tiny_model, randomize_, tiny_hf_config
from .rwkv7_models import hooked_from_blinkdl, random_blinkdl_state
from .test_mamba2 import perturb_, tiny_config

FAMILIES = ["gdn", "mamba2", "rwkv7"]
TOKENS = torch.randint(1, 50, (2, 11), generator=torch.Generator().manual_seed(0))


def tiny_model(family: str):
    """A random tiny model of ``family`` (the GDN one has an attention layer too), every weight off its initialisation."""
    if family == "gdn":
        model = random_tiny_model()
        randomize_(model)
        return model
    if family == "mamba2":
        torch.manual_seed(0)
        return perturb_(HookedMamba2.from_config(tiny_config()).eval())
    return hooked_from_blinkdl(random_blinkdl_state()).eval()


def loss(model, mode: str, **kwargs) -> torch.Tensor:
    return model(TOKENS, recurrence=mode, **kwargs).log_softmax(-1)[..., 3].sum()


def state_hook_names(model) -> list[str]:
    """Every memory's state hook and its alias (Mamba-2's ``mixer.hook_ssm_state``)."""
    return [name for name in model.hook_dict if name.endswith(("linear_attn.hook_state", "mixer.hook_ssm_state"))]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_a_backward_hook_gets_the_gradient_at_its_point(family, mode):
    """Backward hooks on every hook point at once (in parallel mode all but the memory's states, whose zero added by
    a forward hook is no edit there, and writes, which it refuses) receive, firing by firing, the gradient of a zero a
    forward hook adds at the same point: every point the loss depends on fires, and no other. The memory's states and
    writes fire once a position in sequential mode."""
    model = tiny_model(family)
    beside = set(model._write_hook_names() + state_hook_names(model))
    names = [name for name in model.hook_dict if mode == "sequential" or name not in beside]
    received: dict[str, list[torch.Tensor]] = {}
    with model.hooks(bwd_hooks=[(name, lambda grad, hook: received.setdefault(hook.name, []).append(grad.clone()))
                                for name in names]):
        loss(model, mode).backward()
    zeros: dict[str, list[torch.Tensor]] = {}

    def add_zero(x, hook):
        zero = torch.zeros_like(x, requires_grad=True)
        zeros.setdefault(hook.name, []).append(zero)
        return x + zero

    with model.hooks(fwd_hooks=[(name, add_zero) for name in names]):
        value = loss(model, mode)
    leaves = [zero for name in names for zero in zeros[name]]
    gradients = iter(torch.autograd.grad(value, leaves, allow_unused=True))
    expected = {name: [next(gradients) for _ in zeros[name]] for name in names}
    for name in names:
        wanted = [g for g in expected[name] if g is not None]
        got = received.get(name, [])[::-1]  # a backward pass fires last what the forward fired first
        assert len(got) == len(wanted), f"{name}: {len(got)} firings for {len(wanted)} gradients"
        for g, w in zip(got, wanted):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
    assert "blocks.0.hook_resid_pre" in received
    if mode == "sequential":
        memory_points = [name for name in beside if name.endswith(("hook_state", "hook_write_value"))]
        assert memory_points and all(len(received[name]) == TOKENS.shape[1] for name in memory_points)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", [None, [2, 5, 9]])
def test_a_backward_hook_on_the_state_gets_the_loops_gradient_in_parallel_mode(family, positions):
    """In parallel mode a backward hook on a state hook (or its alias) gets, at each of the state positions, the
    gradient the sequential loop's gets, through everything after that state; the forward's output is unchanged."""
    model = tiny_model(family)
    for name in state_hook_names(model)[:2]:
        received = {}
        for mode in ("parallel", "sequential"):
            fired = []
            with model.hooks(bwd_hooks=[(name, lambda grad, hook: fired.append(grad.clone()))]):
                value = loss(model, mode, state_positions=positions)
                value.backward()
            received[mode] = (value, torch.cat(fired[::-1], 1))
        torch.testing.assert_close(received["parallel"][0], loss(model, "parallel", state_positions=positions))
        assert received["parallel"][1].abs().max() > 0
        loop = received["sequential"][1]
        torch.testing.assert_close(received["parallel"][1], loop, rtol=1e-4, atol=1e-5 * loop.abs().max().item(), msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_mode_refuses_backward_hooks_on_the_memorys_writes(family):
    """The chunked recurrence forces a written row as given, where the loop takes a write again from the state an
    earlier edit changed, so it cannot give the loop's gradient at a write: the forward refuses a backward hook there
    by name and says what gives it."""
    model = tiny_model(family)
    for name in model._write_hook_names():
        with model.hooks(bwd_hooks=[(name, lambda grad, hook: None)]), pytest.raises(ValueError) as refused:
            loss(model, "parallel")
        assert name in str(refused.value) and "recurrence='sequential'" in str(refused.value)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_run_with_cache_incl_bwd_caches_every_gradient(mode):
    """``run_with_cache(incl_bwd=True)`` caches ``name + "_grad"`` beside each activation, each the gradient a
    backward hook receives (per-position firings joined in position order), leaving the memory's writes out of a
    default filter's gradients in parallel mode; named there, they are refused; so are a non-scalar output and one
    without a gradient (under torch.no_grad)."""
    model = tiny_model("gdn")
    value, cache = model.run_with_cache(TOKENS, return_type="loss", incl_bwd=True, recurrence=mode)
    received = {}
    writes = set(model._write_hook_names())
    names = [name for name in cache.keys() if not name.endswith("_grad") and (mode == "sequential" or name not in writes)]
    with model.hooks(bwd_hooks=[(name, lambda grad, hook: received.setdefault(hook.name, []).append(grad)) for name in names]):
        model(TOKENS, return_type="loss", recurrence=mode).backward()
    assert set(received) and {name + "_grad" for name in received} == {key for key in cache.keys() if key.endswith("_grad")}
    for name, fired in received.items():
        torch.testing.assert_close(cache[name + "_grad"], torch.cat(fired[::-1], 1) if len(fired) > 1 else fired[0],
                                   rtol=1e-5, atol=1e-7, msg=name)
    write = "blocks.0.linear_attn.hook_write_value"
    assert (write + "_grad" in cache.keys()) == (mode == "sequential")
    if mode == "parallel":
        with pytest.raises(ValueError, match="recurrence='sequential'"):
            model.run_with_cache(TOKENS, return_type="loss", incl_bwd=True, names_filter=[write])
    with pytest.raises(ValueError, match="must be one number"):
        model.run_with_cache(TOKENS, incl_bwd=True, recurrence=mode)
    with torch.no_grad(), pytest.raises(ValueError, match="carries no gradient"):
        model.run_with_cache(TOKENS, return_type="loss", incl_bwd=True, recurrence=mode)


@pytest.mark.parametrize("kind", ["state", "write"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_a_backward_hook_on_a_spliced_saes_codes_gets_their_gradient(kind, mode):
    """Attribution over SAE features, as SAELens users run it: with an SAE spliced in (error term on), a backward hook
    on its ``hook_sae_acts_post`` gets the gradient of a zero a forward hook adds to the codes."""
    from hooked_gdn.sites import site_name
    from writesae import BilinearMatrixSAE
    from writesae.splice import HookedSAEGatedDeltaNet

    torch.manual_seed(0)
    model = HookedSAEGatedDeltaNet.from_config(tiny_hf_config()).eval()
    randomize_(model)
    site = site_name(model.cfg.gdn_layers[0], kind)
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=16, k=3, site=site, heads="all", seed=0)
    name, found = f"{site}.sae.hook_sae_acts_post", {}
    with model.saes([sae], use_error_term=True):
        with model.hooks(bwd_hooks=[(name, lambda grad, hook: found.setdefault("hook", []).append(grad))]):
            loss(model, mode, state_positions=[2, 5]).backward()

        def add_zero(codes, hook):
            found.setdefault("zeros", []).append(torch.zeros_like(codes, requires_grad=True))
            return codes + found["zeros"][-1]

        with model.hooks(fwd_hooks=[(name, add_zero)]):
            wanted = torch.autograd.grad(loss(model, mode, state_positions=[2, 5]), found["zeros"])
    assert len(found["hook"]) == len(wanted) and wanted[0].abs().max() > 0
    for got, want in zip(found["hook"][::-1], wanted):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
