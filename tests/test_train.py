"""The trainer (writesae.train) on a tiny random model's states: it learns, resumes exactly, stops on NaN."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from writesae import ARCHITECTURES, BilinearMatrixSAE, load_sae
from writesae.store import ActivationStore, StoreConfig
from writesae.sparsity import auxk_loss
from writesae.train import CONVERGED_BELOW, TrainConfig, convergence, lr_at, train

from .conftest import random_tiny_model

HEADS = [0, 2]


@pytest.fixture(name="model", scope="module")
def model_fixture():
    return random_tiny_model()


@pytest.fixture(name="documents", scope="module")
def documents_fixture():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 101, (40,), generator=g) for _ in range(80)]


def make_store(model, documents, **kw) -> ActivationStore:
    cfg = dict(layer=1, heads=HEADS, context=16, positions="all", buffer_size=512, model_batch_size=8, heldout_fraction=0.2) | kw
    return ActivationStore(model, documents, StoreConfig(**cfg))


def make_sae(model, **kw) -> BilinearMatrixSAE:
    kw = dict(n_features=256, k=24, seed=0) | kw
    return BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, heads=HEADS, n_heads=model.cfg.n_value_heads, **kw)


def run(model, documents, out, store_kw=None, sae_kw=None, **kw):
    cfg = dict(out_dir=str(out), steps=12, batch_size=32, lr=1e-2, warmup_steps=3, log_every=1, eval_every=0,
               eval_samples=256, checkpoint_every=0, progress=False, input_scale_samples=256) | kw
    return train(make_sae(model, **(sae_kw or {})), make_store(model, documents, **(store_kw or {})), TrainConfig(**cfg))


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_learns_and_writes_metrics_and_the_sae(model, documents, tmp_path):
    result = run(model, documents, tmp_path, steps=80, batch_size=64, warmup_steps=5, eval_every=40,
                 dead_after_samples=500, auxk_k=8)
    train_records = [r for r in records(tmp_path) if r["split"] == "train"]
    heldout = [r for r in records(tmp_path) if r["split"] == "heldout"]
    assert [r["step"] for r in train_records] == list(range(1, 81)) and [r["step"] for r in heldout] == [40, 80]
    assert sum(r["loss"] for r in train_records[-5:]) / 5 < 0.6 * train_records[0]["loss"]
    assert heldout[-1]["fvu"] < 0.5 and heldout[-1]["fvu"] < heldout[0]["fvu"] * 1.05
    for r in train_records:
        assert r["loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("loss_")), rel=1e-5)
        assert set(r) >= {"lr", "l0", "fvu", "dead_fraction", "samples_per_s", "loss_reconstruction", "loss_auxk"}
        assert 0 < r["l0"] <= 24
    assert result.heldout_metrics == heldout[-1] and result.step == 80 and result.start_step == 0

    # s was estimated from the store, and folded into the saved SAE without changing what it computes
    sae = result.sae.eval()
    store = make_store(model, documents)
    assert sae.cfg.input_scale == store.estimate_input_scale(256) != 1
    saved = load_sae(tmp_path / "sae").eval()
    assert saved.cfg.input_scale == 1 and saved.cfg.site == "blocks.1.linear_attn.hook_state"
    x = next(store.heldout_batches(64))
    with torch.no_grad():
        torch.testing.assert_close(saved(x), sae(x), rtol=1e-4, atol=1e-5 * x.abs().max().item())


class Interrupted(Exception):
    pass


def tamper_with_batch(monkeypatch, call: int, tamper) -> None:
    """Pass the ``call``-th training batch any store gives (in this test) through ``tamper``, which may raise."""
    next_batch, calls = ActivationStore.next_batch, []

    def patched(self, *args, **kwargs):
        calls.append(1)
        x = next_batch(self, *args, **kwargs)
        return tamper(x) if len(calls) == call else x

    monkeypatch.setattr(ActivationStore, "next_batch", patched)


def crash(x):
    raise Interrupted


@pytest.mark.parametrize("interruption", ["crash at step 9", "a 6-step call"])
def test_resume_equals_the_uninterrupted_run(model, documents, tmp_path, monkeypatch, interruption):
    # BatchTopK with a short dead window, so the threshold, dead counters and AuxK are all in play
    kw = dict(store_kw=dict(positions=3, buffer_size=64), sae_kw=dict(n_features=64, k=2, sparsity="batchtopk"),
              dead_after_samples=64, auxk_k=4, eval_every=5, checkpoint_every=6)
    if interruption == "a 6-step call":
        kw["decay"] = "constant"  # a schedule that does not depend on the number of steps
    whole = run(model, documents, tmp_path / "whole", **kw)
    if interruption == "crash at step 9":
        tamper_with_batch(monkeypatch, 9, crash)
        with pytest.raises(Interrupted):
            run(model, documents, tmp_path / "split", **kw)
        assert max(r["step"] for r in records(tmp_path / "split")) == 8
    else:
        run(model, documents, tmp_path / "split", **kw | dict(steps=6))
    resumed = run(model, documents, tmp_path / "split", **kw)
    assert resumed.start_step == 6 and resumed.step == 12
    assert any(r.get("loss_auxk", 0) > 0 for r in records(tmp_path / "whole"))
    a, b = whole.sae.state_dict(), resumed.sae.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert whole.sae.cfg == resumed.sae.cfg
    saved_a, saved_b = load_sae(tmp_path / "whole" / "sae").state_dict(), load_sae(tmp_path / "split" / "sae").state_dict()
    assert all(torch.equal(saved_a[name], saved_b[name]) for name in saved_a)
    timeless = lambda out: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records(out) if r["split"] == "train"]
    assert timeless(tmp_path / "split") == timeless(tmp_path / "whole")  # one record per step, the same values
    checkpoint = tmp_path / "split" / "checkpoint"
    with pytest.raises(ValueError) as error:
        run(model, documents, tmp_path / "split", **kw | dict(batch_size=16))
    assert str(error.value) == (f"cannot resume from {checkpoint}: batch_size: the checkpoint has 32, this run 16 "
                                f"(use another out_dir (--out), or resume=False)")
    with pytest.raises(ValueError) as error:  # the SAE's own config: the fields that differ, not two whole configs
        run(model, documents, tmp_path / "split", **kw | dict(sae_kw=dict(n_features=32, k=2, sparsity="batchtopk")))
    assert str(error.value) == (f"cannot resume from {checkpoint}: sae.n_features: the checkpoint has 64, this run 32 "
                                f"(use another out_dir (--out), or resume=False)")


def test_a_nan_batch_stops_training_and_keeps_the_last_good_checkpoint(model, documents, tmp_path, monkeypatch):
    tamper_with_batch(monkeypatch, 5, lambda x: x.fill_(math.nan))
    with pytest.raises(FloatingPointError, match=r"step 5: non-finite input batch X, reconstruction loss term.*step 4"):
        run(model, documents, tmp_path, checkpoint_every=2, decay="constant")
    checkpoint = tmp_path / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 4
    sae = load_sae(checkpoint / "sae")
    assert all(torch.isfinite(t).all() for t in sae.state_dict().values())
    assert not (tmp_path / "sae").exists()  # no final SAE from a failed run
    # the checkpoint is the state after step 4: the same as a clean 4-step run's
    clean = run(model, documents, tmp_path / "clean", steps=4, checkpoint_every=2, decay="constant")
    assert all(torch.equal(t, sae.state_dict()[name]) for name, t in clean.sae.state_dict().items())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 17, -1])
def test_the_finiteness_guard_names_exactly_the_tensors_with_a_nan_or_an_infinity(bad, where):
    from writesae.train import _nonfinite

    tensors = {"fine": torch.randn(5, 7), "scalar": torch.tensor(2.0), "big": torch.full((3, 12), 3e38),
               "half": torch.randn(4, 9, dtype=torch.float16)}
    assert _nonfinite(tensors) == []
    for name in ("fine", "half"):
        broken = dict(tensors, **{name: tensors[name].clone()})
        broken[name].view(-1)[where] = bad
        assert _nonfinite(broken) == [name]
    assert _nonfinite(dict(tensors, scalar=torch.tensor(bad))) == ["scalar"]
    witnessed = {"X": torch.randn(4, 9)}
    witnessed["X"].view(-1)[where] = bad
    summing_finitely = {name: t for name, t in tensors.items() if name != "big"}
    assert _nonfinite(summing_finitely, witnessed) == []  # trusted while what witnesses it sums finitely
    assert _nonfinite(tensors, witnessed) == ["X"]  # checked where the sums are not finite, though all are
    assert _nonfinite(dict(tensors, scalar=torch.tensor(bad)), witnessed) == ["X", "scalar"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("arch", ["flat", "matrix", "bilinear"])
def test_a_non_finite_input_makes_the_reconstruction_term_non_finite(arch, sparsity, bad):
    """What lets the trainer's guard leave the input batch unsummed (`_nonfinite`'s ``witnessed``): one NaN or
    infinity anywhere in X makes the reconstruction loss term non-finite, for every architecture and sparsity
    rule, in the batch's first, a middle and its last number, whether or not a hook made X̂."""
    from writesae.train import _loss_terms

    sae = ARCHITECTURES[arch](d_k=4, d_v=3, n_features=12, k=3, seed=0, sparsity=sparsity, input_scale=0.7)
    for hooked in (False, True):
        if hooked:
            sae.hook_sae_recons.add_hook(lambda recons, hook: recons)
        for where in (0, 29, -1):
            x = torch.randn(5, 1, 4, 3, generator=torch.Generator().manual_seed(0))
            x.view(-1)[where] = bad
            terms, _, _ = _loss_terms(sae, x, torch.zeros(1, 12, dtype=torch.bool), TrainConfig(batch_size=5))
            assert not torch.isfinite(terms["reconstruction"]), (hooked, where)


def test_a_diverging_run_names_what_went_non_finite(model, documents, tmp_path):
    with pytest.raises(FloatingPointError, match=r"step \d+: non-finite (parameter|\w+ loss term)"):
        run(model, documents, tmp_path, lr=1e30, warmup_steps=0, steps=20)


def test_dead_features_are_counted_in_samples(model, documents, tmp_path):
    sae = make_sae(model, n_features=16, sparsity="relu")
    with torch.no_grad():
        sae.b_enc[:, :4] = -1e3  # these never fire; the rest always do
        sae.b_enc[:, 4:] = 1e3
    train(sae, make_store(model, documents), TrainConfig(out_dir=str(tmp_path), steps=4, batch_size=16, dead_after_samples=40,
                                                         lr=1e-6, log_every=1, eval_every=0, checkpoint_every=0, progress=False))
    assert [r["dead_fraction"] for r in records(tmp_path)] == [0, 0, 0.25, 0.25]  # dead once > 40 samples: after 48


def test_auxk_reconstructs_the_residual_from_dead_features_only(model):
    sae = make_sae(model, n_features=8, k=2, dtype="float64")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, model.cfg.d_key, model.cfg.d_value, generator=g, dtype=torch.float64)
    residual = torch.randn(x.shape, generator=g, dtype=torch.float64)
    dead = torch.zeros(2, 8, dtype=torch.bool)
    assert auxk_loss(sae, sae.encode_pre(x), residual, dead, k=4).item() == 0
    dead[0, 3] = True
    pre = sae.encode_pre(x)
    loss = auxk_loss(sae, pre, residual, dead, k=4)
    atom = torch.einsum("rk,rv->kv", sae.V[0, 3], sae.W[0, 3])
    e_hat = pre[:, 0, 3].relu()[:, None, None] * atom
    expected = (residual[:, 0] - e_hat).pow(2).sum() / residual[:, 0].pow(2).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    touched = sae.V.grad.abs().sum((-2, -1)) != 0
    assert touched[0, 3] and touched.sum() == 1  # only the dead feature's atom learns from AuxK


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_lr_schedule(decay):
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay=decay)
    lrs = [lr_at(step, cfg) for step in range(1, 101)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == 1.0 and lrs[-1] > 0
    decayed = lrs[10:]
    assert all(a >= b for a, b in zip(decayed, decayed[1:]))
    assert (decayed[-1] == 1.0) == (decay == "constant")
    if decay == "linear":
        assert decayed[45] == pytest.approx(1 - 45 / 90)
    if decay == "cosine":
        assert decayed[45] == pytest.approx(0.5)


def metrics_records(heldout_fvus: dict[int, list[float]]) -> list[dict]:
    """A metrics.jsonl's records: a held-out evaluation per step given, each after a training record."""
    written = []
    for step, fvus in heldout_fvus.items():
        written.append({"step": step, "split": "train", "fvu": 0.5, "fvu_per_head": [9.0] * len(fvus)})
        written.append({"step": step, "split": "heldout", "fvu": sum(fvus) / len(fvus), "fvu_per_head": fvus})
    return written


def test_convergence_compares_each_heads_heldout_fvu_over_the_last_fifth():
    assert CONVERGED_BELOW == 0.02
    # head 0 moved 1% of its final FVU from step 40 to 50, head 1 nothing; the training records are not read
    settled = convergence(metrics_records({10: [0.9, 0.9], 20: [0.7, 0.6], 30: [0.55, 0.5], 40: [0.505, 0.5], 50: [0.5, 0.5]}))
    assert settled["fvu_at_four_fifths"] == [0.505, 0.5] and settled["fvu_at_end"] == [0.5, 0.5]
    assert settled["relative_change"] == pytest.approx([0.01, 0.0]) and settled["converged"]
    # head 1 still moving 3% of its final FVU (2.9% of the earlier one): not converged, whatever head 0 does
    moving = convergence(metrics_records({80: [0.5, 0.515], 100: [0.5, 0.5]}))
    assert moving["relative_change"] == pytest.approx([0.0, 0.03]) and not moving["converged"]
    # 0.0099 is 2.02% of the earlier FVU and 1.98% of the final one, the reference
    assert convergence(metrics_records({80: [0.5, 0.49], 100: [0.5, 0.4999]}))["converged"]
    with pytest.raises(ValueError, match=r"4/5 of training \(step 40\).*evaluated at steps \[25, 50\]"):
        convergence(metrics_records({25: [0.6], 50: [0.5]}))
    with pytest.raises(ValueError, match="none"):
        convergence([{"step": 5, "split": "train", "fvu": 0.5}])


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("arch", ["flat", "matrix", "tied"])
def test_every_architecture_and_sparsity_trains(model, documents, tmp_path, arch, sparsity):
    kw = dict(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=32, k=4, sparsity=sparsity, heads=HEADS,
              n_heads=model.cfg.n_value_heads, seed=0, rank=1 if arch == "flat" else 2, tied=arch == "tied")
    sae = ARCHITECTURES["bilinear" if arch == "tied" else arch](**kw)
    before = {name: t.clone() for name, t in sae.state_dict().items()}
    train(sae, make_store(model, documents, buffer_size=64), TrainConfig(
        out_dir=str(tmp_path), steps=3, batch_size=16, lr=1e-3, warmup_steps=0, dead_after_samples=16, auxk_k=4,
        log_every=1, eval_every=3, eval_samples=32, checkpoint_every=0, progress=False))
    rs = records(tmp_path)
    assert [r["split"] for r in rs] == ["train"] * 3 + ["heldout"]
    assert all(math.isfinite(v) for r in rs for v in r.values() if isinstance(v, float))
    assert ("loss_sparsity" in rs[0]) == (sparsity in ("relu", "jumprelu"))
    assert not torch.equal(before["b_dec"], sae.b_dec)
    saved = load_sae(tmp_path / "sae")
    assert saved.cfg.input_scale == (sae.cfg.input_scale if arch == "tied" else 1.0)  # a tied SAE cannot fold s


@pytest.mark.parametrize("name", ["checkpoint", "metrics.jsonl", "sae", "writesae-outputs.json"])
def test_files_the_tool_did_not_create_are_refused_before_the_first_step(model, documents, tmp_path, monkeypatch, name):
    mine = tmp_path / name
    if name.endswith("json") or name.endswith("jsonl"):
        mine.write_text("my own notes\n")
    else:
        mine.mkdir()
        (mine / "notes.txt").write_text("my own notes\n")
    (tmp_path / "other.txt").write_text("untouched\n")
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    tamper_with_batch(monkeypatch, 1, crash)  # a first step would raise Interrupted instead
    with pytest.raises(FileExistsError, match=f"{mine} exists and (was not created by writesae|is not a writesae manifest)"):
        run(model, documents, tmp_path)
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def test_the_tool_replaces_its_own_outputs_and_nothing_else(model, documents, tmp_path):
    (tmp_path / "notes.txt").write_text("untouched\n")
    run(model, documents, tmp_path, steps=2, checkpoint_every=2)
    manifest = json.loads((tmp_path / "writesae-outputs.json").read_text())
    assert manifest["created"] == [".writesae.lock", "checkpoint", "metrics.jsonl", "sae"]  # the lock: held only while it runs
    run(model, documents, tmp_path, steps=4, checkpoint_every=2, resume=False)  # ours: replaced
    assert max(r["step"] for r in records(tmp_path)) == 4 and min(r["step"] for r in records(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl", "notes.txt", "sae", "writesae-outputs.json"]
    assert (tmp_path / "notes.txt").read_text() == "untouched\n"


def test_a_second_run_on_a_folder_being_trained_into_is_refused_before_it_writes(model, documents, tmp_path):
    """While one run holds the folder's lock (here held by hand, as a first run would), a second stops naming it
    and writes nothing; once it is released, training runs."""
    from writesae.outputs import output_lock

    run(model, documents, tmp_path, steps=2, checkpoint_every=2)
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    with output_lock(tmp_path, "writesae train"):
        with pytest.raises(BlockingIOError, match=str(os.getpid())):
            run(model, documents, tmp_path, steps=4, checkpoint_every=2)
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*") if p.name != ".writesae.lock"} == before
    run(model, documents, tmp_path, steps=4, checkpoint_every=2)
    assert max(r["step"] for r in records(tmp_path)) == 4


class Killed(BaseException):
    """A SIGKILL, as far as the code under test can tell: nothing after it runs, not even clean-up."""


def test_a_kill_between_the_checkpoint_renames_resumes_from_the_newest_copy(model, documents, tmp_path, monkeypatch):
    kw = dict(steps=12, checkpoint_every=4, decay="constant")
    whole = run(model, documents, tmp_path / "whole", **kw)
    out = tmp_path / "split"
    renames_into_place = []

    def replace(src, dst, real=os.replace):
        if Path(dst) == out / "checkpoint":
            renames_into_place.append(src)
            if len(renames_into_place) == 2:  # the step-8 swap: the step-4 checkpoint has just been moved aside
                raise Killed
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
    with pytest.raises(Killed):
        run(model, documents, out, **kw)
    monkeypatch.undo()
    assert not (out / "checkpoint").exists() and len([p for p in out.iterdir() if p.name.startswith(".checkpoint")]) == 2

    with pytest.warns(UserWarning, match=r"restored the newest complete checkpoint \(step 8\)"):
        resumed = run(model, documents, out, **kw)
    assert resumed.start_step == 8
    assert all(torch.equal(t, whole.sae.state_dict()[name]) for name, t in resumed.sae.state_dict().items())
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the leftover copies are gone


def test_a_run_that_diverges_without_a_nan_says_so(model, documents, tmp_path):
    with pytest.warns(RuntimeWarning, match=r"step 12: the SAE looks diverged: held-out FVU .* \(above 10"):
        result = run(model, documents, tmp_path, lr=1e6, eval_every=12)
    assert result.diverged.startswith("held-out FVU") and result.heldout_metrics["fvu"] > 1e3
    sae = make_sae(model, sparsity="relu")
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # no feature ever fires
    with pytest.warns(RuntimeWarning, match=r"every held-out code is zero \(L0 = 0\)"):
        result = train(sae, make_store(model, documents), TrainConfig(out_dir=str(tmp_path / "silent"), steps=2, batch_size=16,
                                                                      lr=1e-9, eval_every=2, eval_samples=64, progress=False))
    assert "L0 = 0" in result.diverged
    healthy = run(model, documents, tmp_path / "healthy", eval_every=12)
    assert healthy.diverged is None


def test_a_last_heldout_fvu_above_1_warns_of_a_distribution_shift_without_failing(model, documents, tmp_path):
    # held out: documents of one token repeated, unlike any training text; the SAE reconstructs worse than their mean
    shifted = [*documents[:64], *[torch.full((40,), 77) for _ in range(16)]]
    store = make_store(model, shifted, heldout_documents=[str(i) for i in range(64, 80)])
    cfg = TrainConfig(out_dir=str(tmp_path), steps=24, batch_size=32, lr=1e-2, warmup_steps=3, eval_every=12,
                      eval_samples=256, checkpoint_every=0, progress=False, input_scale_samples=256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(make_sae(model), store, cfg)
    fvu = result.heldout_metrics["fvu_per_head"]
    assert result.diverged is None and all(1 < value <= 10 for value in fvu)
    shown = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert shown == [f"step 24: held-out FVU above 1 for head 0 ({fvu[0]:.3g}), head 2 ({fvu[1]:.3g}): there the SAE "
                     f"reconstructs worse than predicting the held-out mean would. This happens when the "
                     f"held-out text differs from the training text (a distribution shift: the SAE learnt the training "
                     f"samples' mean and spread, and the held-out mean lies elsewhere), or when the SAE is undertrained"]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_fused_adam_steps_as_the_foreach_adam_it_replaced(model, arch):
    """`make_optimizer` fuses Adam where the device has the kernel (here, the CPU); five trainer steps
    with it land where the per-operation (``foreach``) Adam lands, to float64 rounding."""
    from writesae.train import _guard, make_optimizer, training_step

    cfg = TrainConfig(batch_size=16, lr=1e-2, betas=(0.8, 0.95))
    x = torch.randn(5, 16, len(HEADS), model.cfg.d_key, model.cfg.d_value, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    kw = dict(d_k=model.cfg.d_key, d_v=model.cfg.d_value, heads=HEADS, n_heads=model.cfg.n_value_heads, n_features=32,
              k=4, seed=0, dtype="float64")
    fused, reference = (ARCHITECTURES[arch](**kw) for _ in range(2))
    optimizers = make_optimizer(fused, cfg), torch.optim.Adam(reference.parameters(), lr=cfg.lr, betas=cfg.betas, foreach=True)
    assert optimizers[0].param_groups[0]["fused"]
    guard = functools.partial(_guard, 0, Path(os.devnull), None)
    for sae, optimizer in zip((fused, reference), optimizers):
        since_fired = torch.zeros(sae.n_dicts, sae.cfg.n_features, dtype=torch.long)
        for batch in x:
            training_step(sae, optimizer, batch, since_fired, cfg, guard)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert not torch.equal(p, ARCHITECTURES[arch](**kw).get_parameter(name)), name  # the steps moved it
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_the_reconstruction_term_gives_autograds_values_and_gradients(lead, input_grad, with_offset):
    """`_SquaredResidual` (the trainer's reconstruction term, two passes forward and one back) against autograd's
    chain ‖(A − o) − C‖²_F on the same inputs, its minuend given as A − o without o's gradient, which the offset takes
    instead: per-sample values, the residual it hands the sparsity rule, and the gradients of C, o and (where it asks)
    A, under a weighting of the samples as a loss applies; its backward fills no batch of zeros for the residual,
    which takes no gradient."""
    from writesae.train import _SquaredResidual

    g = torch.Generator().manual_seed(0)
    a, c, weights = (torch.randn(*lead, 2, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    offset = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    weights = weights[..., 0, 0]
    leaves = [(a.clone().requires_grad_(input_grad), c.clone().requires_grad_(), offset.clone().requires_grad_())
              for _ in range(2)]
    minuend = leaves[0][0] - leaves[0][2].detach() if with_offset else leaves[0][0]
    squared, residual = _SquaredResidual.apply(minuend, leaves[0][1], leaves[0][2] if with_offset else None)
    expected_residual = (leaves[1][0] - leaves[1][2] if with_offset else leaves[1][0]) - leaves[1][1]
    expected = expected_residual.pow(2).sum((-2, -1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        (squared * weights).sum().backward()
    assert not [e for e in profile.events() if e.name in ("aten::fill_", "aten::zero_") and list(a.shape) in e.input_shapes]
    (expected * weights).sum().backward()
    torch.testing.assert_close(squared, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(residual, expected_residual.detach(), rtol=0, atol=0)
    assert not residual.requires_grad
    torch.testing.assert_close(leaves[0][1].grad, leaves[1][1].grad, rtol=1e-12, atol=0)
    if with_offset:
        torch.testing.assert_close(leaves[0][2].grad, leaves[1][2].grad, rtol=1e-12, atol=0)
    if input_grad:
        torch.testing.assert_close(leaves[0][0].grad, leaves[1][0].grad, rtol=1e-12, atol=0)
    else:
        assert leaves[0][0].grad is None


def _trainer_loss_and_gradients(sae, x: torch.Tensor) -> tuple[dict, dict]:
    from writesae.train import _loss_terms

    sae.zero_grad(set_to_none=True)
    cfg = TrainConfig(batch_size=len(x), auxk_k=4, auxk_weight=1 / 32)
    dead = torch.zeros(sae.n_dicts, sae.cfg.n_features, dtype=torch.bool)
    dead[:, ::3] = True  # AuxK reads the residual
    terms, codes, residual = _loss_terms(sae, x, dead, cfg)
    sum(terms.values()).backward()
    return ({**terms, "codes": codes, "residual": residual},
            {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("few_positive", [False, True])
@pytest.mark.parametrize("n", [8, 48])
@pytest.mark.parametrize("arch", ["flat", "matrix", "bilinear"])
def test_topk_decodes_the_codes_it_kept_as_it_decodes_codes_a_hook_returns(arch, n, few_positive, monkeypatch):
    """Where nothing is hooked at hook_sae_acts_post, TopK decodes the k codes it kept
    (`TopK.codes_and_summed_atoms`) instead of finding them again in the codes (`TopK.summed_atoms`, taken once a
    hook is there): the same loss terms, codes, residual and gradients, bit for bit in float32, on the dense decode
    (n = 8) and the gathered one (n = 48), also where samples have fewer than k positive pre-activations (their
    kept zeros then sit at other features than the codes' top-k picks)."""
    from writesae.train import _loss_terms

    d, k, batch = 8, 4, 5
    monkeypatch.setattr("writesae.sae.dense_decode_is_cheaper", lambda *shape: n == 8)
    sae = ARCHITECTURES[arch](d_k=d, d_v=d, n_features=n, k=k, seed=0, input_scale=0.7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, d, d, generator=g)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g))
        if few_positive:  # about one feature in twenty positive: most samples keep zeros
            sae.b_enc.sub_(sae.encode_pre(x).flatten().quantile(0.95))
    kept = _trainer_loss_and_gradients(sae, x)
    if few_positive:
        assert ((kept[0]["codes"] > 0).sum(-1) < k).any()
    seen = []
    sae.hook_sae_acts_post.add_hook(lambda codes, hook: seen.append(codes.shape))
    found = _trainer_loss_and_gradients(sae, x)
    sae.hook_sae_acts_post.remove_hooks()
    assert seen == [(batch, 1, n)]
    for got, want in zip(kept, found):
        assert got.keys() == want.keys() and len(got) > 1
        for name in got:
            assert torch.equal(got[name], want[name]), name
    sae.hook_sae_acts_post.add_hook(lambda codes, hook: torch.zeros_like(codes))  # an edit reaches the loss
    terms, _, _ = _loss_terms(sae, x, torch.zeros(1, n, dtype=torch.bool), TrainConfig(batch_size=batch))
    sae.hook_sae_acts_post.remove_hooks()
    torch.testing.assert_close(terms["reconstruction"], (x * 0.7 - sae.b_dec).pow(2).sum((-2, -1)).mean())


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("arch", ["flat", "matrix", "bilinear"])
def test_the_trainer_skips_the_reconstruction_only_where_no_hook_could_see_it(model, arch, sparsity):
    """`writesae.train._loss_terms` takes the residual (X·s − b_dec) − Σ a_i atom_i from the centred input the
    encoder read, without forming X̂, while nothing is hooked at hook_sae_recons, and through X̂ (firing the hook) once something is: the loss terms, the residual
    and every parameter's gradient agree between the two (float64, to rounding) and with autograd's chain on
    ``sae.decode``; and a hook that edits X̂ there reaches the loss."""
    from writesae.train import _loss_terms

    kw = dict(d_k=model.cfg.d_key, d_v=model.cfg.d_value, heads=HEADS, n_heads=model.cfg.n_value_heads, n_features=32,
              k=4, seed=0, dtype="float64", sparsity=sparsity, input_scale=0.7)
    sae = ARCHITECTURES[arch](**kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, len(HEADS), model.cfg.d_key, model.cfg.d_value, generator=g, dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g, dtype=torch.float64))  # 0 at initialisation
    skipped = _trainer_loss_and_gradients(sae, x)
    seen = []
    sae.hook_sae_recons.add_hook(lambda recons, hook: seen.append(recons.shape))
    formed = _trainer_loss_and_gradients(sae, x)
    sae.hook_sae_recons.remove_hooks()
    assert seen == [x.shape]
    for got, want in zip(skipped, formed):
        assert got.keys() == want.keys()
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():  # the same codes (BatchTopK's in training mode too), leaving its threshold alone
        expected = ((x - sae.decode(sae.encode(x))) * 0.7).pow(2).sum((-2, -1)).mean()
    torch.testing.assert_close(skipped[0]["reconstruction"], expected, rtol=1e-10, atol=0)
    sae.hook_sae_recons.add_hook(lambda recons, hook: torch.zeros_like(recons))
    terms, _, _ = _loss_terms(sae, x, torch.zeros(sae.n_dicts, 32, dtype=torch.bool), TrainConfig(batch_size=7))
    torch.testing.assert_close(terms["reconstruction"], (x * 0.7).pow(2).sum((-2, -1)).mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("arch", ["flat", "matrix", "bilinear"])
def test_the_reconstruction_reaches_an_input_that_asks_for_a_gradient(arch):
    """Where X itself takes a gradient, the centred input the encoder hands the trainer carries it
    (`writesae.sae._keep_centred`), and the residual takes b_dec's part through it rather than as an offset: X's
    gradient and every parameter's are autograd's through ``sae.decode`` (float64); with X taking none, the
    parameters' gradients are the same."""
    from writesae.train import _loss_terms

    sae = ARCHITECTURES[arch](d_k=4, d_v=3, n_features=12, k=3, seed=0, dtype="float64", input_scale=0.7)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g, dtype=torch.float64))
    x = torch.randn(5, 1, 4, 3, generator=g, dtype=torch.float64)
    found = []
    for input_grad in (True, False):
        leaf = x.clone().requires_grad_(input_grad)
        sae.zero_grad(set_to_none=True)
        terms, _, _ = _loss_terms(sae, leaf, torch.zeros(1, 12, dtype=torch.bool), TrainConfig(batch_size=5))
        terms["reconstruction"].backward()
        found.append({"X": leaf.grad, **{name: p.grad for name, p in sae.named_parameters() if p.grad is not None}})
    sae.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_()
    ((leaf - sae.decode(sae.encode(leaf))) * 0.7).pow(2).sum((-2, -1)).mean().backward()
    expected = {"X": leaf.grad, **{name: p.grad for name, p in sae.named_parameters() if p.grad is not None}}
    assert found[0].keys() == expected.keys() and found[1]["X"] is None
    for name, want in expected.items():
        torch.testing.assert_close(found[0][name], want, rtol=1e-10, atol=1e-12, msg=name)
        if name != "X":
            torch.testing.assert_close(found[1][name], want, rtol=1e-10, atol=1e-12, msg=name)


def test_a_hook_point_counts_as_hooked_while_any_hook_could_run():
    """`writesae.sae.hook_point_is_hooked`: a TransformerLens hook (forward or backward), a plain torch forward or
    backward hook, or a global module hook makes it true; removing them makes it false again."""
    from writesae.sae import hook_point_is_hooked

    point = BilinearMatrixSAE(d_k=4, d_v=4, n_features=8, k=2, seed=0).hook_sae_recons
    assert not hook_point_is_hooked(point)
    for direction in ("fwd", "bwd"):
        point.add_hook(lambda t, hook: None, dir=direction)
        assert hook_point_is_hooked(point)
        point.remove_hooks(direction)
        assert not hook_point_is_hooked(point)
    for register in (point.register_forward_hook, point.register_forward_pre_hook, point.register_full_backward_hook,
                     torch.nn.modules.module.register_module_forward_hook):
        handle = register(lambda *args: None)
        assert hook_point_is_hooked(point)
        handle.remove()
        assert not hook_point_is_hooked(point)


def test_training_runs_inside_the_block_that_keeps_freed_memory(model, documents, tmp_path, monkeypatch):
    """Every step of `train` reuses the memory the last one freed (writesae.host_memory): a trainer that
    left the block out would fault its gradients in afresh every step."""
    entered = []

    @contextlib.contextmanager
    def recording():
        entered.append("enter")
        yield
        entered.append("exit")

    monkeypatch.setattr("writesae.train.freed_memory_kept", recording)
    run(model, documents, tmp_path, steps=2, batch_size=16)
    assert entered == ["enter", "exit"]
