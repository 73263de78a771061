"""The SAEs shipped for gdn-austen: loading by name, offline, and their eval cards' figures."""

import json

import pytest
import torch

import writesae.io as io
from hooked_gdn.sites import site_name
from writesae import load_sae
from writesae.evals import reconstruction_metrics
from writesae.sae import BilinearMatrixSAE

SHIPPED = ("gdn-austen/L5-state", "gdn-austen/L5-write")


def test_shipped_names_resolve_and_unknown_ones_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "PRETRAINED_SAES_DIR", tmp_path / "pretrained")
    sae = BilinearMatrixSAE(d_k=4, d_v=3, n_features=8, k=2, site=site_name(1, "state"), seed=0)
    sae.save(tmp_path / "pretrained" / "tiny" / "L1-state")
    assert io.pretrained_saes() == ["tiny/L1-state"]
    assert torch.equal(load_sae("tiny/L1-state").V, sae.V)
    with pytest.raises(FileNotFoundError, match=r"tiny/L2-state is neither an SAE folder nor a shipped SAE \(shipped: tiny/L1-state\)"):
        load_sae("tiny/L2-state")


def test_a_shipped_name_that_is_also_a_local_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "PRETRAINED_SAES_DIR", tmp_path / "pretrained")
    sae = BilinearMatrixSAE(d_k=4, d_v=3, n_features=8, k=2, site=site_name(1, "state"), seed=0)
    sae.save(tmp_path / "pretrained" / "tiny" / "L1-state")
    sae.save(tmp_path / "tiny" / "L1-state")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="names both a shipped SAE and"):
        load_sae("tiny/L1-state")
    assert load_sae("./tiny/L1-state").cfg == sae.cfg


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sae_loads_offline_and_its_card_reports_its_eval(name):
    assert name in io.pretrained_saes()
    sae = load_sae(name)
    results = json.loads((io.PRETRAINED_SAES_DIR / name / "eval.json").read_text())
    kind = name.rsplit("-", 1)[1]
    assert sae.cfg.site == site_name(5, kind) and sae.cfg.head_indices == [0, 1, 2, 3]
    assert sae.cfg.model_name == "gdn-austen" and sae.cfg.k == results["settings"]["k"]
    assert results["convergence"]["converged"], "the shipped SAE must have converged (< 2% over the last fifth)"
    card = (io.PRETRAINED_SAES_DIR / name / "README.md").read_text()
    for method in ("writesae", "pca", "flat"):
        for fvu in results["reconstruction"][method]["fvu"]:
            assert f"{fvu:.3f}" in card


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sae_heldout_fvu_reproduces(name):
    from hooked_gdn.pretrained import austen_corpus
    from writesae.splice import HookedSAEGatedDeltaNet
    from writesae.store import ActivationStore, StoreConfig

    results = json.loads((io.PRETRAINED_SAES_DIR / name / "eval.json").read_text())
    s = results["settings"]
    model = HookedSAEGatedDeltaNet.from_pretrained("gdn-austen").eval()
    documents, heldout = austen_corpus()
    store = ActivationStore(model, documents, StoreConfig(layer=results["layer"], kind=results["kind"], context=s["window"],
                                                          positions=s["positions_per_window"], heldout_documents=heldout,
                                                          seed=s["seed"]))
    measured = reconstruction_metrics(load_sae(name), store.heldout_batches(512))
    recorded = results["reconstruction"]["writesae"]
    assert measured["samples"] == recorded["samples"]
    assert measured["fvu"] == pytest.approx(recorded["fvu"], rel=1e-3)
