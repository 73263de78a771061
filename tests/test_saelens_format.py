"""SAELens' folder format (writesae.io): our SAEs exported to it, and SAELens SAEs loaded from it.

sae-lens cannot be installed beside TransformerLens 4, so SAELens' side is its published schema:
`saelens_reconstruction` is SAELens' encode and decode (``SAE.process_sae_in``, ``TopKSAE``,
``StandardSAE``, ``JumpReLUSAE``) written out from the raw tensors, and ``tests/fixtures/saelens``
holds SAELens folders written by hand to that schema (cfg.json by hand, the weights by its
``make_weights.py``), not by our exporter.

Where sae-lens is installed (the TransformerLens 3.x subset of .ci/run), SAELens itself is the other side:
its ``SAE.load_from_disk`` on our exports, and our `load_sae` on folders its ``save_model`` wrote.

Exactness: with input_scale 1 (or a power of two) a round trip ours → SAELens folder → `load_sae`
gives the same codes and reconstructions bit for bit (max abs difference 0); SAELens' formula on
the same tensors agrees with ours to the last bits, as a matmul and an einsum may sum in another
order (1e-12 in float64; the fixtures, float32: the same codes fire, values within 1e-6); a scale
that is not a power of two is folded into the weights, one more rounding each (1e-6 in float32).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from writesae import BilinearMatrixSAE, FlatSAE, load_sae, save_sae

try:
    import sae_lens
except ImportError:  # the main environment: sae-lens needs transformer-lens<4
    sae_lens = None

from .test_sae import calibrate, edit_cfg, inputs, make

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
ARCHS = ["flat", "matrix", "bilinear", "tied"]  # "tied" is the tied BilinearMatrixSAE
SITE = "blocks.1.linear_attn.hook_state"
needs_sae_lens = pytest.mark.skipif(sae_lens is None, reason="sae-lens is not importable here (it needs "
                                    "transformer-lens<4): the TransformerLens 3.x subset of .ci/run installs it")


def saelens_encode(cfg: dict, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SAELens' codes of x [..., d_in]: σ((x − b_dec) W_enc + b_enc) (x itself when apply_b_dec_to_input
    is false), σ TopK (the k largest, then ReLU), ReLU, or ReLU(z)·[z > ReLU(threshold)]."""
    centred = x - tensors["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x
    pre = centred @ tensors["W_enc"] + tensors["b_enc"]
    if cfg["architecture"] == "topk":
        values, indices = pre.topk(cfg["k"], dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())
    if cfg["architecture"] == "standard":
        return pre.relu()
    return pre.relu() * (pre > tensors["threshold"].relu())


def saelens_reconstruction(cfg: dict, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SAELens' forward of x [..., d_in]: f W_dec + b_dec, f its codes."""
    return saelens_encode(cfg, tensors, x) @ tensors["W_dec"] + tensors["b_dec"]


def one_head(arch: str, sparsity: str = "topk", heads=2, **kw):
    """A tiny one-dictionary SAE of head 2 of a 4-head site, d_k ≠ d_v (so a transposed flattening shows); or of
    the ``heads`` given, one dictionary each."""
    sae = make(arch, sparsity=sparsity, heads=heads, n_heads=4, site=SITE, model_name="tiny",
               model_fingerprint="abc123", **kw)
    if sparsity == "batchtopk":
        calibrate(sae)
    if sparsity == "jumprelu":  # thresholds of the pre-activations' size, which gate some positive codes and not others
        with torch.no_grad():
            theta = 0.05 + torch.rand(sae.activation.log_threshold.shape, generator=torch.Generator().manual_seed(3))
            sae.activation.log_threshold.copy_(theta.log())
    return sae.eval()


def export(sae, tmp_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    save_sae(sae, tmp_path / "saelens", format="saelens")
    return json.loads((tmp_path / "saelens" / "cfg.json").read_text()), load_file(tmp_path / "saelens" / "sae_weights.safetensors")


# --- ours → SAELens folder ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", ["topk", "relu", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_through_the_saelens_format_is_exact(tmp_path, arch, sparsity, dtype):
    sae = one_head(arch, sparsity, dtype=dtype)
    export(sae, tmp_path)
    loaded = load_sae(tmp_path / "saelens")
    assert type(loaded) is FlatSAE
    assert (loaded.cfg.site, loaded.cfg.head_indices, loaded.cfg.n_heads, loaded.cfg.d_k, loaded.cfg.d_v) == (SITE, [2], 4, 4, 3)
    assert (loaded.cfg.model_name, loaded.cfg.model_fingerprint, loaded.cfg.dtype) == ("tiny", "abc123", dtype)
    x = inputs(sae, 64)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", ["topk", "relu", "jumprelu", "batchtopk"])
def test_saelens_formula_on_the_exported_tensors_reconstructs_as_ours(tmp_path, arch, sparsity):
    sae = one_head(arch, sparsity)
    cfg, tensors = export(sae, tmp_path)
    x = inputs(sae, 64)
    flat = x[..., 0, :, :].flatten(-2)  # row-major: x[i·d_v + j] = X[i, j]
    theirs = saelens_reconstruction(cfg, tensors, flat)
    ours = sae(x)[..., 0, :, :].flatten(-2)
    assert (theirs - ours).abs().max() <= 1e-12
    if cfg["architecture"] == "jumprelu":  # the thresholds gate: plain ReLU would differ
        pre = sae.encode_pre(x)[..., 0, :]
        assert ((pre > 0) & (sae.encode(x)[..., 0, :] == 0)).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_tensors_are_our_weights_in_saelens_layout(tmp_path, arch):
    sae = one_head(arch, "jumprelu")
    cfg, tensors = export(sae, tmp_path)
    n, d_k, d_v = 12, 4, 3
    assert {name: list(t.shape) for name, t in tensors.items()} == {
        "W_enc": [d_k * d_v, n], "b_enc": [n], "W_dec": [n, d_k * d_v], "b_dec": [d_k * d_v], "threshold": [n]}
    if isinstance(sae, FlatSAE):
        atoms, encoder = sae.W_dec[0].reshape(n, d_k, d_v), sae.W_enc[0].reshape(n, d_k, d_v)
    else:
        U, P = (sae.V, sae.W) if sae.cfg.tied else (sae.U, sae.P) if isinstance(sae, BilinearMatrixSAE) else (None, None)
        atoms = torch.einsum("nrk,nrv->nkv", sae.V[0], sae.W[0])
        encoder = sae.W_enc[0].reshape(n, d_k, d_v) if U is None else torch.einsum("nrk,nrv->nkv", U[0], P[0])
    for i, a, b in [(0, 0, 0), (5, 1, 2), (11, 3, 1)]:  # entry (a, b) of a matrix is at a·d_v + b
        assert tensors["W_dec"][i, a * d_v + b] == atoms[i, a, b]
        assert tensors["W_enc"][a * d_v + b, i] == encoder[i, a, b]
        assert tensors["b_dec"][a * d_v + b] == sae.b_dec[0, a, b]
    assert torch.allclose(tensors["W_dec"], atoms.reshape(n, -1), rtol=0, atol=1e-15)
    assert torch.allclose(tensors["W_enc"], encoder.reshape(n, -1).T, rtol=0, atol=1e-15)
    assert torch.equal(tensors["b_enc"], sae.b_enc[0])
    assert torch.equal(tensors["threshold"], sae.activation.log_threshold[0].exp())


@pytest.mark.parametrize("sparsity, architecture", [("topk", "topk"), ("relu", "standard"), ("jumprelu", "jumprelu"),
                                                    ("batchtopk", "jumprelu")])
def test_exported_cfg_is_saelens_schema(tmp_path, sparsity, architecture):
    cfg, _ = export(one_head("flat", sparsity), tmp_path)
    assert {name: cfg[name] for name in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                                        "normalize_activations", "reshape_activations")} == {
        "architecture": architecture, "d_in": 12, "d_sae": 12, "dtype": "float64", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none"}
    assert (cfg.get("k"), cfg.get("rescale_acts_by_decoder_norm")) == ((3, False) if sparsity == "topk" else (None, None))
    metadata = cfg["metadata"]
    # SAELens reads the layout's version from metadata.sae_lens_version: below 6.0 it would convert the cfg
    assert metadata["sae_lens_version"] == "6.0.0"
    assert (metadata["hook_name"], metadata["hook_head_index"], metadata["model_name"]) == (SITE, 2, "tiny")
    assert (metadata["writesae"]["d_k"], metadata["writesae"]["d_v"], metadata["writesae"]["sparsity"]) == (4, 3, sparsity)


def test_a_batchtopk_threshold_keeps_a_code_equal_to_it(tmp_path):
    """Ours keeps z ≥ t, SAELens' jumprelu z > θ: the export's θ is the float just below t."""
    sae = one_head("flat", "batchtopk")
    x = inputs(sae, 8)
    pre = sae.encode_pre(x)
    kept = pre[3, 0].argmax()
    with torch.no_grad():
        sae.activation.threshold.fill_(pre[3, 0, kept])
    assert sae.encode(x)[3, 0, kept] == pre[3, 0, kept]
    cfg, tensors = export(sae, tmp_path)
    flat = x[..., 0, :, :].flatten(-2)
    theirs = saelens_reconstruction(cfg, tensors, flat)
    assert (theirs - sae(x)[..., 0, :, :].flatten(-2)).abs().max() <= 1e-12
    assert torch.equal(load_sae(tmp_path / "saelens")(x), sae(x))


def test_an_uncalibrated_batchtopk_exports_as_relu(tmp_path):
    sae = make("flat", sparsity="batchtopk").eval()  # threshold 0: every positive code is kept
    cfg, tensors = export(sae, tmp_path)
    assert cfg["architecture"] == "standard" and "threshold" not in tensors
    x = inputs(sae, 16)
    assert torch.equal(load_sae(tmp_path / "saelens")(x), sae(x))


@pytest.mark.parametrize("scale, tolerance", [(2.0, 0.0), (0.8, 1e-6)])
def test_input_scale_is_folded_into_the_exported_weights(tmp_path, scale, tolerance):
    """A power of two folds exactly; another scale rounds each folded weight once more."""
    sae = one_head("bilinear", "relu", dtype="float32", input_scale=scale)
    cfg, tensors = export(sae, tmp_path)
    x = inputs(sae, 64)
    loaded = load_sae(tmp_path / "saelens")
    assert loaded.cfg.input_scale == 1.0
    assert (loaded(x) - sae(x)).abs().max() <= tolerance
    theirs = saelens_reconstruction(cfg, tensors, x[..., 0, :, :].flatten(-2))
    assert (theirs - sae(x)[..., 0, :, :].flatten(-2)).abs().max() <= tolerance


def test_saving_as_saelens_replaces_only_an_sae_folder(tmp_path):
    (tmp_path / "saelens").mkdir()
    (tmp_path / "saelens" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an SAE folder"):
        save_sae(one_head("flat"), tmp_path / "saelens", format="saelens")
    save_sae(one_head("flat"), tmp_path / "sae", format="saelens")
    save_sae(one_head("matrix"), tmp_path / "sae", format="saelens")
    assert {p.name for p in (tmp_path / "sae").iterdir()} == {"cfg.json", "sae_weights.safetensors"}


@pytest.mark.parametrize("build, message", [
    (lambda: one_head("matrix", "topk", heads="all"), r"an SAELens SAE of several heads keeps the k largest codes of all "
     r"of them together, and this MatrixSAE has 4 dictionaries \(heads \[0, 1, 2, 3\]\), each keeping its own k: not "
     r"the same codes; pass head=h to export one head's dictionary"),
    (lambda: one_head("flat", "relu", heads=[0, 1]), r"reads every head of its site flattened together .* this FlatSAE "
     r"has 2 dictionaries \(heads \[0, 1\]\) of the site's 4: it would decode the others as b_dec; pass head=h"),
    (lambda: make("bilinear", sparsity="batchtopk").train(),
     r"BatchTopK SAE in training mode keeps the k·B largest codes of its batch.*call sae.eval\(\)"),
], ids=["top-k of several heads", "some heads of the site", "batchtopk training"])
def test_what_does_not_map_exactly_is_refused(tmp_path, build, message):
    with pytest.raises(ValueError, match=message):
        save_sae(build(), tmp_path / "sae", format="saelens")
    assert not (tmp_path / "sae").exists()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", ["topk", "jumprelu", "batchtopk"])
def test_one_head_of_a_multi_head_sae_exports_as_that_head_alone(tmp_path, arch, sparsity):
    """head=h exports model head h's dictionary (its own threshold included): the SAELens SAE computes on that
    head's matrices exactly what the multi-head SAE computes there."""
    sae = one_head(arch, sparsity, heads=[1, 3])
    save_sae(sae, tmp_path / "head3", format="saelens", head=3)
    loaded = load_sae(tmp_path / "head3")
    assert (loaded.cfg.head_indices, loaded.cfg.n_heads) == ([3], 4)
    x = inputs(sae, 64)
    assert torch.equal(loaded(x[..., 1:, :, :]), sae(x)[..., 1:, :, :])
    assert torch.equal(loaded.encode(x[..., 1:, :, :]), sae.encode(x)[..., 1:, :])
    assert not torch.equal(loaded(x[..., :1, :, :]), sae(x)[..., :1, :, :])  # head 1's dictionary is another


def whole_site(arch: str, sparsity: str, **kw):
    """An SAE with a dictionary for every head of its 4-head site (BatchTopK: one calibrated threshold per head)."""
    return one_head(arch, sparsity, heads="all", **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", ["relu", "jumprelu", "batchtopk"])
def test_every_head_exports_as_one_block_diagonal_saelens_sae(tmp_path, arch, sparsity):
    """Per-feature rules (ReLU, thresholds) on dictionaries of every head: one SAELens SAE over the site's heads
    flattened together, d_in = H·d_k·d_v, d_sae = H·n, each head's dictionary a diagonal block. SAELens' formula on
    it gives our codes and reconstructions (to the last bits: the zero blocks join the sums), and load_sae brings
    back the multi-head SAE, bit for bit."""
    sae = whole_site(arch, sparsity)
    cfg, tensors = export(sae, tmp_path)
    H, n, d = 4, 12, 12
    assert (cfg["d_in"], cfg["d_sae"], cfg["metadata"]["hook_head_index"]) == (H * d, H * n, None)
    assert not tensors["W_dec"][:n, d:].any() and torch.equal(tensors["W_dec"][n:2 * n, d:2 * d],
                                                              sae.atoms()[1].reshape(n, d))
    x = inputs(sae, 64)
    flat = x.flatten(-3)  # SAELens flattens [H, d_k, d_v] row-major, as it does a hook without hook_head_index
    codes = saelens_encode(cfg, tensors, flat)
    assert torch.equal(codes != 0, sae.encode(x).flatten(-2) != 0)
    assert (saelens_reconstruction(cfg, tensors, flat) - sae(x).flatten(-3)).abs().max() <= 1e-12
    loaded = load_sae(tmp_path / "saelens")
    assert (loaded.cfg.head_indices, loaded.cfg.n_features) == ([0, 1, 2, 3], n)
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))


def test_a_head_whose_batchtopk_threshold_is_0_exports_as_theta_0(tmp_path):
    """A head never calibrated (t = 0) keeps every positive code: θ = 0 in SAELens' jumprelu, which gates at 0.
    SAELens computes ours; load_sae refuses it, as a FlatSAE's θ = exp(log θ) cannot be 0."""
    sae = whole_site("flat", "batchtopk")
    with torch.no_grad():
        sae.activation.threshold[1] = 0.0
    cfg, tensors = export(sae, tmp_path)
    assert cfg["architecture"] == "jumprelu" and not tensors["threshold"][12:24].any() and tensors["threshold"][:12].all()
    x = inputs(sae, 64)
    assert (saelens_reconstruction(cfg, tensors, x.flatten(-3)) - sae(x).flatten(-3)).abs().max() <= 1e-12
    with pytest.raises(ValueError, match=r"a jumprelu threshold is <= 0"):
        load_sae(tmp_path / "saelens")


def test_a_saelens_sae_whose_features_read_several_heads_is_refused(tmp_path):
    export(whole_site("flat", "relu"), tmp_path)
    weights = load_file(tmp_path / "saelens" / "sae_weights.safetensors")
    weights["W_enc"][0, -1] = 0.5  # the last feature (head 3's) reads an entry of head 0
    save_file(weights, tmp_path / "saelens" / "sae_weights.safetensors")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    del cfg["metadata"]["writesae"]["weights_sha256"]
    (tmp_path / "saelens" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"W_enc or W_dec is not block-diagonal over the 4 heads \[0, 1, 2, 3\]"):
        load_sae(tmp_path / "saelens")


def test_head_is_refused_where_it_picks_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"head 2 has no dictionary in this SAE; its heads are \[1, 3\]"):
        save_sae(one_head("flat", heads=[1, 3]), tmp_path / "sae", format="saelens", head=2)
    with pytest.raises(ValueError, match=r"head picks the dictionary an SAELens folder holds"):
        save_sae(one_head("flat", heads=[1, 3]), tmp_path / "sae", head=1)
    assert not (tmp_path / "sae").exists()


def test_an_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown format 'sae_lens'; expected one of \['writesae', 'saelens'\]"):
        save_sae(make("flat"), tmp_path / "sae", format="sae_lens")


# --- SAELens folders → ours ----------------------------------------------------------------------


@pytest.mark.parametrize("name, sparsity", [("topk", "topk"), ("standard", "relu"), ("jumprelu", "jumprelu")])
def test_a_saelens_folder_loads_as_a_flat_sae_computing_saelens_formula(name, sparsity):
    folder = FIXTURES / name
    cfg = json.loads((folder / "cfg.json").read_text())
    tensors = load_file(folder / "sae_weights.safetensors")
    sae = load_sae(folder)
    assert type(sae) is FlatSAE
    assert (sae.cfg.sparsity, sae.cfg.d_k, sae.cfg.d_v, sae.cfg.n_features) == (sparsity, 1, 12, 8)
    assert (sae.cfg.site, sae.cfg.model_name, sae.cfg.head_indices) == ("blocks.3.hook_resid_post", "tiny-stories-1M", [0])
    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(0))
    codes, theirs = saelens_encode(cfg, tensors, x), saelens_reconstruction(cfg, tensors, x)
    assert 0 < (codes != 0).float().mean() < 1  # the sparsity rule is doing something on these inputs
    # the same codes fire; values agree to float32 rounding (a matmul against an einsum)
    assert torch.equal(sae.encode(x.reshape(256, 1, 1, 12)).reshape(256, 8) != 0, codes != 0)
    assert torch.allclose(sae.encode(x.reshape(256, 1, 1, 12)).reshape(256, 8), codes, rtol=1e-6, atol=1e-6)
    assert torch.allclose(sae(x.reshape(256, 1, 1, 12)).reshape(256, 12), theirs, rtol=1e-6, atol=1e-6)
    if name == "jumprelu":  # θ comes back as exp(log θ): θ itself, or a float one ulp away
        assert torch.allclose(sae.activation.log_threshold[0].exp(), tensors["threshold"], rtol=2**-23, atol=0)


def test_the_fixtures_hold_saelens_layout():
    for folder in FIXTURES.iterdir():
        if folder.is_dir():
            tensors = load_file(folder / "sae_weights.safetensors")
            assert tensors["W_enc"].shape == (12, 8) and tensors["W_dec"].shape == (8, 12)
            assert tensors["b_enc"].shape == (8,) and tensors["b_dec"].shape == (12,)


def saelens_copy(tmp_path: Path, name: str = "topk", tensors=None, **changes) -> Path:
    """A copy of a fixture folder with cfg.json entries changed (None removes one) and its tensors edited."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    edit_cfg(folder, **changes)
    if tensors is not None:
        weights = load_file(folder / "sae_weights.safetensors")
        tensors(weights)
        save_file(weights, folder / "sae_weights.safetensors")
    return folder


@pytest.mark.parametrize("name, changes, tensors, message", [
    ("topk", {"architecture": "gated"}, None, r"SAELens architecture 'gated' has no FlatSAE that computes it"),
    ("topk", {"normalize_activations": "expected_average_only_in"}, None,
     r"normalize_activations 'expected_average_only_in' rescales inputs"),
    ("topk", {"rescale_acts_by_decoder_norm": True}, None, r"picks the top k of z·‖W_dec,i‖.*fold_W_dec_norm"),
    ("standard", {"apply_b_dec_to_input": False}, None, r"apply_b_dec_to_input is false and b_dec is not 0"),
    ("jumprelu", {}, lambda t: t["threshold"].__setitem__(2, 0.0), r"a jumprelu threshold is <= 0"),
    ("topk", {}, lambda t: t.update(W_enc=t["W_enc"].T.contiguous()),
     r"W_enc has shape \[8, 12\], expected \[12, 8\]"),
    ("topk", {}, lambda t: t.pop("b_enc"), r"missing b_enc"),
    ("standard", {}, lambda t: t.update(scaling_factor=torch.ones(8)), r"unexpected scaling_factor"),
    ("standard", {}, lambda t: t["W_dec"].__setitem__((0, 0), float("nan")), r"non-finite values \(NaN or Inf\) in W_dec"),
], ids=["gated", "normalized", "rescaled topk", "b_dec not applied", "zero threshold", "transposed W_enc",
        "missing tensor", "extra tensor", "NaN"])
def test_saelens_folders_a_flat_sae_cannot_compute_are_refused(tmp_path, name, changes, tensors, message):
    with pytest.raises(ValueError, match=message):
        load_sae(saelens_copy(tmp_path, name, tensors, **changes))


def test_what_maps_exactly_after_all_loads(tmp_path):
    """apply_b_dec_to_input false with b_dec = 0 subtracts nothing either way; rescaling by unit norms is no rescaling."""
    def unit_rows_zero_b_dec(t):
        signs = torch.randn(8, 4, generator=torch.Generator().manual_seed(2)).sign()
        t["W_dec"].zero_()
        for i in range(8):  # four entries of ±1/2: norm exactly 1 in any float format
            t["W_dec"][i, [i, i + 1, i + 2, i + 3]] = 0.5 * signs[i]
        t["b_dec"].zero_()
    folder = saelens_copy(tmp_path, "topk", unit_rows_zero_b_dec, apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True)
    tensors = load_file(folder / "sae_weights.safetensors")
    cfg = json.loads((folder / "cfg.json").read_text())
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    ours = load_sae(folder)(x.reshape(64, 1, 1, 12)).reshape(64, 12)
    assert torch.allclose(saelens_reconstruction(cfg, tensors, x), ours, rtol=1e-6, atol=1e-6)


def test_a_folder_of_neither_format_is_refused_naming_the_files_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no cfg.json; an SAE folder, in writesae's or SAELens' format, "
                                                r"holds cfg.json and sae_weights.safetensors \(this one holds nothing\)"):
        load_sae(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"this one holds \['config.json'\]"):
        load_sae(tmp_path / "other")
    (tmp_path / "other" / "cfg.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match=r"neither writesae's SAE config .* nor SAELens' \(keys d_in, d_sae"):
        load_sae(tmp_path / "other")
    shutil.copy(FIXTURES / "topk" / "cfg.json", tmp_path / "other" / "cfg.json")
    with pytest.raises(FileNotFoundError, match=r"sae_weights.safetensors is missing"):
        load_sae(tmp_path / "other")


def test_a_corrupted_export_is_caught_by_its_checksum(tmp_path):
    export(one_head("flat"), tmp_path)
    file = tmp_path / "saelens" / "sae_weights.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"SHA-256 differs .* the file is corrupted"):
        load_sae(tmp_path / "saelens")


# --- against sae-lens itself -------------------------------------------------------------------------


SAELENS_CLASSES = {"topk": "TopKSAE", "relu": "StandardSAE", "jumprelu": "JumpReLUSAE", "batchtopk": "JumpReLUSAE"}


@needs_sae_lens
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", ["topk", "relu", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_saelens_loads_our_export_and_reconstructs_identically(tmp_path, arch, sparsity, dtype):
    """SAELens' own SAE.load_from_disk on our folder: the SAE class of our sparsity rule, and on each head
    matrix flattened row-major, the same codes and reconstruction as ours, bit for bit."""
    sae = one_head(arch, sparsity, dtype=dtype)
    export(sae, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"))
    assert type(theirs).__name__ == SAELENS_CLASSES[sparsity]
    assert (theirs.cfg.metadata.hook_name, theirs.cfg.metadata.hook_head_index, theirs.dtype) == (
        SITE, 2, getattr(torch, dtype))
    x = inputs(sae, 64)
    flat = x[..., 0, :, :].flatten(-2)
    with torch.no_grad():
        codes, reconstruction = theirs.encode(flat), theirs(flat)
    assert 0 < (codes != 0).float().mean() < 1
    assert torch.equal(codes, sae.encode(x)[..., 0, :])
    assert torch.equal(reconstruction, sae(x)[..., 0, :, :].flatten(-2))


@needs_sae_lens
@pytest.mark.parametrize("architecture, extra", [("standard", {}), ("topk", {"k": 3}), ("jumprelu", {})])
def test_our_load_sae_reads_a_folder_saelens_saved(tmp_path, architecture, extra):
    """An SAE that SAELens built (random weights, thresholds where it has them) and saved with its own
    save_model loads with load_sae and computes what SAELens computes."""
    theirs = sae_lens.SAE.from_dict({"architecture": architecture, "d_in": 12, "d_sae": 8, "dtype": "float32",
                                     "device": "cpu", "metadata": {"hook_name": "blocks.1.hook_resid_post"}, **extra})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            values = 0.3 * torch.randn(param.shape, generator=g)
            param.copy_(values.abs() + 0.05 if name == "threshold" else values)  # thresholds > 0, as ours are
    theirs.save_model(tmp_path / "theirs")
    ours = load_sae(tmp_path / "theirs")
    assert type(ours) is FlatSAE and (ours.cfg.site, ours.cfg.d_k, ours.cfg.d_v, ours.cfg.n_features) == (
        "blocks.1.hook_resid_post", 1, 12, 8)
    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes, reconstruction = theirs.encode(x), theirs(x)
    assert 0 < (codes != 0).float().mean() < 1
    ours_codes = ours.encode(x.reshape(256, 1, 1, 12)).reshape(256, 8)
    assert torch.equal(ours_codes != 0, codes != 0)
    torch.testing.assert_close(ours_codes, codes, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours(x.reshape(256, 1, 1, 12)).reshape(256, 12), reconstruction, rtol=1e-6, atol=1e-6)


@needs_sae_lens
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sparsity", ["relu", "jumprelu", "batchtopk"])
def test_saelens_loads_our_every_head_export_and_reconstructs_as_ours(tmp_path, arch, sparsity):
    """SAELens' SAE.load_from_disk on the block-diagonal export of every head's dictionary, applied to the site's
    heads flattened together: the same codes fire, and values agree to the last bits (the zero blocks join
    SAELens' sums, so its summation order is not ours)."""
    sae = whole_site(arch, sparsity)
    export(sae, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"))
    assert type(theirs).__name__ == SAELENS_CLASSES[sparsity] and theirs.cfg.metadata.hook_head_index is None
    x = inputs(sae, 64)
    with torch.no_grad():
        codes, reconstruction = theirs.encode(x.flatten(-3)), theirs(x.flatten(-3))
    assert torch.equal(codes != 0, sae.encode(x).flatten(-2) != 0)
    assert (codes - sae.encode(x).flatten(-2)).abs().max() <= 1e-12
    assert (reconstruction - sae(x).flatten(-3)).abs().max() <= 1e-12
