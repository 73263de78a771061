"""benchmarks/RESULTS.md's generated sections agree with the committed results (benchmarks/results_md.py),
and the GPU check's section renders both before its first run and from a run's file."""

from __future__ import annotations

import json
import sys

from benchmarks import gpu_check, results_md


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
    assert results["errors"] == [] and len(results["sae"]["rows"]) == 24
    assert all(r["step_flops"] > 0 and r["ratio_to_matmul"] > 0 for r in results["sae"]["rows"])
    monkeypatch.setattr(gpu_check, "RESULTS_JSON", out)
    block = results_md.render("gpu_check")
    assert block.startswith("**Not a GPU measurement**")
    assert "| BilinearMatrixSAE | 16 × 16 | 256 | 64 |" in block
