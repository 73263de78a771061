"""The SAE benchmark's own arithmetic (benchmarks/bench_sae.py) and the provenance every benchmark
records (benchmarks/provenance.py), on tiny shapes: no timing is asserted."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import provenance as provenance_module
from benchmarks.bench_sae import CLASSES, OP_KINDS, time_by_op_kind, train_step, training_step_flops
from writesae.sae import dense_decode_is_cheaper


@pytest.mark.parametrize("n, batch", [(16, 4), (32, 16)])
def test_the_step_flops_are_those_torch_counts_where_every_product_is_a_matrix_product(n, batch):
    """A flat SAE on shapes where both routes are dense runs only matrix products (no gathers, no
    rank-1 outer products), so torch's own FLOP counter sees the whole count."""
    d, k = 8, 4
    assert dense_decode_is_cheaper(batch, n, k, d, d, None)
    step = train_step(CLASSES["flat"](d_k=d, d_v=d, n_features=n, k=k, seed=0), torch.randn(batch, 1, d, d))
    step()  # Adam's moments are allocated on the first step
    with FlopCounterMode(display=False) as counter:
        step()
    assert counter.get_total_flops() == training_step_flops("flat", batch, n, k, d, d) == step.flops


def test_the_time_breakdown_finds_each_kind_of_operator_it_names(monkeypatch):
    """Every kind but the gathers runs in a dense flat step; a renamed operator would land in "other"
    and show here as a zero."""
    monkeypatch.setattr("benchmarks.bench_sae.HEAD_SHAPES", {"tiny": (8, 8)})
    row = time_by_op_kind("flat", "tiny", 64, 4, repeats=2)
    assert set(row["ms"]) == {*OP_KINDS, "other operators", "between operators"}
    assert all(row["ms"][kind] > 0 for kind in ("matrix products", "top-k", "Adam", "other operators"))


def test_a_results_file_records_its_command_versions_and_load_and_is_written_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_x.py", "--repeats", "2"])
    record = provenance_module.provenance("bench_x", repeats=2, cpu_threads=[1, 2])
    assert record["command"] == "python -m benchmarks.bench_x --repeats 2"
    assert record["torch"] == torch.__version__ and record["cpu_threads"] == [1, 2] and record["repeats"] == 2
    assert len(record["load_average_before"]) == 3
    path = tmp_path / "results" / "x.json"
    provenance_module.write_results(path, {"provenance": record, "rows": [1]})
    written = json.loads(path.read_text())
    assert written["rows"] == [1] and len(written["provenance"]["load_average_after"]) == 3
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary left beside it
    line = provenance_module.run_line(written["provenance"], threads="1/2 CPU threads")
    assert line.startswith("`python -m benchmarks.bench_x --repeats 2` on ") and "1/2 CPU threads, load average" in line
    del written["provenance"]["load_average_after"]  # a file from before the load was recorded
    assert "load average" not in provenance_module.run_line(written["provenance"])
