"""benchmarks/RESULTS.md's generated sections agree with the committed results (benchmarks/results_md.py),
and the GPU check's section renders both before its first run and from a run's file."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import bench_sae, gpu_check, results_md


def test_results_md_sections_agree_with_the_results_files():
    text = results_md.RESULTS_MD.read_text()
    found = results_md.sections(text)
    assert "gpu_check" in found
    stale = [name for name, body in found.items() if results_md.render(name) != body]
    assert not stale, f"run `python -m benchmarks.results_md` to regenerate {stale}"


def test_gpu_section_says_when_the_check_has_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESULTS_JSON", tmp_path / "absent.json")
    assert results_md.render("gpu_check").startswith("Not yet run on a GPU.")


def test_gpu_section_renders_a_run_and_flags_a_cpu_test_run(tmp_path, monkeypatch):
    """A real (CPU, --small, SAE-only, one timed step) run of the script, written and then rendered."""
    out = tmp_path / "gpu_check.json"
    monkeypatch.delenv("OUT", raising=False)
    for name, value in gpu_check.OFFLINE.items():  # main sets them; keep them out of the other tests
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--device", "cpu", "--small", "--only", "sae", "--sae-repeats", "1",
                                      "--out", str(out)])
    gpu_check.main()
    results = json.loads(out.read_text())
    sae = results["sae"]
    assert results["errors"] == []
    # bench_sae's grid at its smallest shapes, with its bounds, plain step, fixed cost and decode routes
    assert [(r["architecture"], r["head_shape"], r["n_features"], r["batch"]) for r in sae["rows"]] == [
        (a, shape, min(bench_sae.N_FEATURES), min(bench_sae.BATCHES)) for a in bench_sae.CLASSES for shape in bench_sae.HEAD_SHAPES]
    assert all(r["matmul_fraction"] > 0 and 0 < r["work_bound_fraction"] <= r["products_bound_fraction"] for r in sae["rows"])
    assert json.dumps(sae["summary"]) == json.dumps(bench_sae.summary(sae["rows"]))  # (NaN where no step is big)
    assert len(sae["plain_step"]) == len(sae["rows"]) and len(sae["fixed_cost"]) == len(bench_sae.CLASSES)
    assert sae["decode"] and sae["rules"] == json.loads(json.dumps(bench_sae.rule_constants()))
    monkeypatch.setattr(gpu_check, "RESULTS_JSON", out)
    block = results_md.render("gpu_check")
    assert block.startswith("**Not a GPU measurement**")
    assert "| bilinear | 64×64 | 64 | 32 | gathered |" in block and "Goal ≤ 2 ms overhead at the smallest shapes" in block
    assert "Decode routes" in block


def test_gpu_section_renders_the_earlier_checks_sae_rows_by_bench_saes_names():
    """The committed run predates the check's bench_sae grid: its rows, keyed by class and in seconds and FLOP/s, are
    renamed and scaled, the numbers unchanged, and P7 reads its BilinearMatrixSAE step from them."""
    from benchmarks.run_cost import run_shape_row

    old = {"architecture": "BilinearMatrixSAE", "d_k": 128, "d_v": 128, "n_features": 16384, "k": 32, "batch": 1024,
           "step_s": 0.04, "states_per_s": 25600.0, "step_flops": 2e12, "achieved_flops_per_s": 5e13,
           "matmul_flops_per_s": 6.25e13, "ratio_to_matmul": 0.8, "overhead_s": 0.008}
    (row,) = gpu_check.sae_rows({"k": 32, "rows": [old]})
    assert row == {"architecture": "bilinear", "d_k": 128, "d_v": 128, "n_features": 16384, "batch": 1024, "k": 32,
                   "step_ms": 40.0, "states_per_s": 25600.0, "step_gflop": 2000.0, "gflop_per_s": 50000.0,
                   "matmul_gflop_per_s": 62500.0, "matmul_fraction": 0.8, "overhead_ms": 8.0}
    assert run_shape_row([row]) is row
    rows = [{"architecture": "bilinear"}]
    assert gpu_check.sae_rows({"rows": rows, "rules": {}}) is rows


def test_gpu_section_renders_a_run_cut_short_in_its_sae_grid(tmp_path, monkeypatch):
    """A run stopped after its first grid step (the device call's time limit) keeps that row and a verdict that fits
    it, and renders without the sections it did not reach."""
    out = tmp_path / "gpu_check.json"
    monkeypatch.delenv("OUT", raising=False)
    for name, value in gpu_check.OFFLINE.items():
        monkeypatch.setenv(name, value)
    real_step_row, calls = bench_sae.step_row, []

    def step_row_then_stop(*args):
        if calls:
            raise KeyboardInterrupt  # as a run killed mid-grid: nothing after it is measured or written
        calls.append(args)
        return real_step_row(*args)

    monkeypatch.setattr(bench_sae, "step_row", step_row_then_stop)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--device", "cpu", "--small", "--only", "sae", "--sae-repeats", "1",
                                      "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main()
    sae = json.loads(out.read_text())["sae"]
    assert len(sae["rows"]) == 1 and not sae["plain_step"] and not sae["fixed_cost"] and not sae["decode"]
    assert json.dumps(sae["summary"]) == json.dumps(bench_sae.summary(sae["rows"]))
    monkeypatch.setattr(gpu_check, "RESULTS_JSON", out)
    block = results_md.render("gpu_check")
    assert "| flat | 128×128 | 64 | 32 |" in block and "Decode routes" not in block
