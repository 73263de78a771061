"""Library plots draw on their own `matplotlib.figure.Figure`: the user's backend (a notebook's inline one,
an interactive window) is never switched under them."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch

from hooked_gdn.census import MemoryCensus
from hooked_gdn.patching import plot_patching_heatmap
from hooked_gdn.pretrained import CENSUS_FILE, pretrained_path
from writesae import BilinearMatrixSAE
from writesae.quickstart import save_plots


@pytest.fixture(name="users_backend")
def users_backend_fixture():
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend no library function would pick
    yield "svg"
    matplotlib.use(before)


def test_library_plots_leave_the_users_backend_alone(users_backend, tmp_path):
    figure = plot_patching_heatmap(torch.randn(2, 3, 5), path=tmp_path / "patching.png")
    MemoryCensus.load_json(pretrained_path("gdn-austen") / CENSUS_FILE).plot_half_lives(tmp_path / "half_lives.png")
    sae = BilinearMatrixSAE(d_k=4, d_v=4, n_features=8, k=2, heads=[0], n_heads=1, seed=0)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "heldout", "fvu": 0.5}) + "\n")
    save_plots(sae, torch.rand(16, 1, 8), tmp_path / "metrics.jsonl", tmp_path)
    assert matplotlib.get_backend() == users_backend
    assert figure.axes and all((tmp_path / name).read_bytes()[:4] == b"\x89PNG" for name in
                               ("patching.png", "half_lives.png", "atoms.png", "activations.png", "training_curve.png"))
