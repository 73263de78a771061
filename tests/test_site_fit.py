"""One check that an SAE fits where it reads (writesae.site_fit): every tool that takes an SAE and a
model, or an SAE and samples, refuses the same misfits with the same words, before it computes or writes anything."""

from __future__ import annotations

import re

import pytest
import torch

from hooked_gdn.sites import site_name
from writesae import BilinearMatrixSAE
from writesae.cli import main as cli_main
from writesae.dashboard import build_dashboard
from writesae.experiments import find_firings, substitution_test
from writesae.patching import get_act_patch_sae_features
from writesae.site_fit import check_layer_heads, check_sae_fits
from writesae.splice import HookedSAEGatedDeltaNet, zero_ablation_hooks
from writesae.store import ActivationStore, StoreConfig
from writesae.train import TrainConfig, train

from .conftest import random_tiny_model

LAYER, HEADS = 1, [1]  # a GDN layer of the tiny model (d_k=12, d_v=8, 4 value heads; layer 3 is attention)
TOKENS = torch.randint(1, 101, (1, 12), generator=torch.Generator().manual_seed(0))

# the misfit: (what it changes in an SAE that fits, the error every tool gives for it)
MISFITS = {
    "d_k": (dict(d_k=13), r"the SAE reads d_k=13, d_v=8; .* gives d_k=12, d_v=8"),
    "site": (dict(site=site_name(3, "state")),  # the model's refusal lists its sites; the samples' names theirs
             r"the SAE's site (does not exist on .*: 'blocks\.3\.linear_attn\.hook_state' is not an SAE site; the sites "
             r"are blocks\.0\.linear_attn\.hook_state, .*|is blocks\.3\.linear_attn\.hook_state, but .* holds "
             r"blocks\.1\.linear_attn\.hook_state)"),
    "heads": (dict(heads=[1, 4]), r"the SAE's head\(s\) \[4\] do not exist in GDN layer 1: its value heads are 0 … 3"),
    "n_heads": (dict(n_heads=7), r"the SAE was made for a site of 7 heads; this site has 4 "
                                 r"\(blocks\.1\.linear_attn\.hook_state of .*\)"),
}


@pytest.fixture(name="model", scope="module")
def model_fixture():
    return random_tiny_model(HookedSAEGatedDeltaNet)


def sae_with(**misfit) -> BilinearMatrixSAE:
    kw = dict(d_k=12, d_v=8, n_features=8, k=2, site=site_name(LAYER, "state"), heads=HEADS, seed=0) | misfit
    return BilinearMatrixSAE(**kw)


def samples(model) -> ActivationStore:
    documents = [torch.randint(1, 101, (20,), generator=torch.Generator().manual_seed(i)) for i in range(10)]
    return ActivationStore(model, documents, StoreConfig(layer=LAYER, heads=HEADS, context=8, positions=2, buffer_size=16))


def command(name: str):
    """A ``writesae`` command run on the SAE saved in a folder; its error is what it printed."""

    def run(model, sae, tmp_path, checkpoint, capsys):
        sae.save(tmp_path / "sae")
        with pytest.raises(SystemExit) as exit:
            cli_main([name, str(tmp_path / "sae"), "--model", str(checkpoint), "--out", str(tmp_path / "out")])
        assert exit.value.code == 2 and not (tmp_path / "out").exists()
        raise ValueError(capsys.readouterr().err)

    return run


TOOLS = {  # each tool, given a model, an SAE and a scratch folder
    "add_sae": lambda model, sae, tmp_path, *_: model.add_sae(sae),
    "zero_ablation_hooks": lambda model, sae, tmp_path, *_: zero_ablation_hooks(model, sae),
    "dashboard": lambda model, sae, tmp_path, *_: build_dashboard(model, sae, TOKENS, progress=False),
    "patching": lambda model, sae, tmp_path, *_: get_act_patch_sae_features(model, TOKENS, {}, lambda logits: logits, sae),
    "substitution_test": lambda model, sae, tmp_path, *_: substitution_test(model, sae, TOKENS, []),
    "find_firings": lambda model, sae, tmp_path, *_: find_firings(model, sae, TOKENS),
    "train": lambda model, sae, tmp_path, *_: train(sae, samples(model), TrainConfig(out_dir=str(tmp_path / "run"),
                                                                                       steps=1, progress=False)),
    "writesae eval": command("eval"),
    "writesae dashboard": command("dashboard"),
}


@pytest.mark.parametrize("misfit", MISFITS)
@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_refuses_an_sae_that_does_not_fit_with_the_one_check(model, tmp_path, tiny_checkpoint, capsys, tool,
                                                                        misfit):
    change, error = MISFITS[misfit]
    forwards = []
    model.add_hook("hook_embed", lambda x, hook: forwards.append(1))
    try:
        with pytest.raises(ValueError) as refused:
            TOOLS[tool](model, sae_with(**change), tmp_path, tiny_checkpoint(), capsys)
        attached = list(model.acts_to_saes)
    finally:  # the model is shared: a tool that let the misfit in must not spoil the next case
        model.reset_hooks()
        model.reset_saes()
    assert re.search(error, str(refused.value)), str(refused.value)
    assert forwards == [] and attached == [] and not (tmp_path / "run").exists()


def test_the_check_learns_the_head_count_of_a_site_the_sae_fits_and_leaves_a_misfit_as_it_was(model):
    sae = sae_with(heads="all")
    assert check_sae_fits(sae, model).name == site_name(LAYER, "state") and sae.cfg.head_indices == [0, 1, 2, 3]
    refused = sae_with(heads=[1, 4])
    with pytest.raises(ValueError, match=MISFITS["heads"][1]):
        check_sae_fits(refused, model)
    assert refused.cfg.n_heads is None
    store = samples(model)
    assert check_sae_fits(sae_with(), source=store).layer == LAYER
    with pytest.raises(ValueError, match=r"the SAE reads heads \[0, 1, 2, 3\]; the store gives samples of heads \[1\]"):
        check_sae_fits(sae_with(heads="all"), source=store)
    with pytest.raises(TypeError, match="a model or a sample source"):
        check_sae_fits(sae, model, source=store)


def test_a_layer_and_heads_without_an_sae_are_checked_by_the_same_rule(model):
    check_layer_heads(model, LAYER, [0, 3])
    with pytest.raises(ValueError, match=r"^head\(s\) \[4\] do not exist in GDN layer 1: its value heads are 0 … 3$"):
        check_layer_heads(model, LAYER, [4])
    with pytest.raises(ValueError, match=r"layer 3 is not a GDN layer of this model; its GDN layers are \[0, 1, 2\]"):
        check_layer_heads(model, 3)
