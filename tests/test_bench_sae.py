"""The SAE benchmark's own arithmetic (benchmarks/bench_sae.py) and the provenance every benchmark
records (benchmarks/provenance.py), on tiny shapes: no timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import provenance as provenance_module
from benchmarks.bench_sae import (BIG_STEP_GFLOP, CLASSES, FLAT_DECODE_ROWS, GOAL_MATMUL_FRACTION, OP_KINDS, SLOW_PICK,
                                  SPARSE_WORK, farthest_big_steps, optimizer_step, plain_step, slow_picks, summary,
                                  time_by_op_kind, train_step, training_step_flops)
from writesae.sae import (bilinear_backward_is_dense, bilinear_forward_is_per_sample, dense_decode_is_cheaper,
                          dense_encoder_backward_is_dense)


@pytest.mark.parametrize("n, batch", [(8, 4), (11, 16)])
def test_the_step_flops_are_those_torch_counts_where_every_product_is_a_matrix_product(n, batch):
    """A flat SAE on shapes where both routes are dense runs only matrix products (no gathers, no
    rank-1 outer products), so torch's own FLOP counter sees the whole count."""
    d, k = 8, 8
    assert dense_decode_is_cheaper(batch, n, k, d, d, None) and dense_encoder_backward_is_dense(batch, n, k, d, d)
    step = train_step(CLASSES["flat"](d_k=d, d_v=d, n_features=n, k=k, seed=0), torch.randn(batch, 1, d, d))
    step()  # Adam's moments are allocated on the first step
    with FlopCounterMode(display=False) as counter:
        step()
    assert counter.get_total_flops() == training_step_flops("flat", batch, n, k, d, d) == step.flops


# (decode dense, encoder backward dense): (False, False), (True, True), (False, True) (a dense decode with a
# gathered backward no longer occurs: the dense backward, which forms no ∂x, is the cheaper one wherever the
# dense decode is); gathered, ∂b_dec over the kept pairs (n > batch·k) and over every feature (n ≤ batch·k); the
# forward by the rows E (batch·rank > d = 8) and by every sample's products (batch·rank ≤ 8)
BILINEAR_ROUTES = [(64, 4, 2, 2, False, False, True), (256, 8, 4, 3, False, False, False),
                   (32, 16, 2, 2, False, False, False), (16, 64, 8, 2, True, True, False),
                   (16, 16, 1, 3, False, True, False), (24, 2, 4, 3, False, False, True),
                   (256, 1, 4, 4, False, False, True), (16, 2, 4, 2, True, True, True)]


@pytest.mark.parametrize("n, batch, k, rank, dense_decode, dense_backward, per_sample_forward", BILINEAR_ROUTES)
def test_the_bilinear_step_flops_are_those_torch_counts_on_every_route(n, batch, k, rank, dense_decode, dense_backward,
                                                                       per_sample_forward):
    """At rank > 1 every product of a BilinearMatrixSAE step is a matrix product (at rank 1 the atoms are
    outer products, which torch does not count), whichever routes the decoder and the encoder's forward and
    backward take: the count follows the three rules."""
    d = 8
    assert dense_decode_is_cheaper(batch, n, k, d, d, rank) == dense_decode
    assert bilinear_backward_is_dense(batch, n, k, d, d, rank) == dense_backward
    assert bilinear_forward_is_per_sample(batch, d, d, rank) == per_sample_forward
    step = train_step(CLASSES["bilinear"](d_k=d, d_v=d, n_features=n, k=k, rank=rank, seed=0), torch.randn(batch, 1, d, d))
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    assert counter.get_total_flops() == training_step_flops("bilinear", batch, n, k, d, d, rank) == step.flops


def test_the_time_breakdown_finds_each_kind_of_operator_it_names(monkeypatch):
    """Every kind runs in a flat TopK step (its top-k is sparse work); an operator the classifier missed would land
    in "other operators" and show here as a zero."""
    monkeypatch.setattr("benchmarks.bench_sae.HEAD_SHAPES", {"tiny": (8, 8)})
    row = time_by_op_kind("flat", "tiny", 64, 4, repeats=2)
    assert set(row["ms"]) == {*OP_KINDS, "between operators"}
    assert all(row["ms"][kind] > 0 for kind in OP_KINDS)


@pytest.mark.parametrize("architecture", sorted(CLASSES))
def test_the_adam_floor_steps_every_parameter_once_and_nothing_else(architecture):
    """The floor under a step is the trainer's Adam alone: it must move every weight (a floor that skipped
    the encoder would understate the work), by Adam's first step (lr · sign of the gradient), and run no
    forward or backward (a gradient it computed would count the step's own work twice)."""
    sae = CLASSES[architecture](d_k=4, d_v=4, n_features=8, k=2, seed=0)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    with FlopCounterMode(display=False) as counter:
        optimizer_step(sae)()
    assert counter.get_total_flops() == 0
    for name, p in sae.named_parameters():
        moved = (before[name] - p.detach()).abs()
        assert moved.min() > 0, f"Adam did not move {name}"
        torch.testing.assert_close(moved, torch.full_like(moved, 1e-4), rtol=5e-3, atol=0)


def _row(architecture, gflop, fraction, n=64, batch=32, limit=0.5, adam_bound=0.9, products_bound=0.8, work_bound=0.7):
    return {"architecture": architecture, "head_shape": "tiny", "n_features": n, "batch": batch, "d_k": 8, "d_v": 8,
            "step_gflop": gflop, "matmul_fraction": fraction, "overhead_ms": 1.0, "adam_ms": 0.25,
            "limit_fraction": limit, "adam_bound_fraction": adam_bound, "products_bound_fraction": products_bound,
            "work_bound_fraction": work_bound}


def test_the_profiled_big_steps_are_each_sae_s_farthest_from_the_matmul_rate():
    rows = [_row("flat", BIG_STEP_GFLOP, 0.3, n=1), _row("flat", 5, 0.2, n=2), _row("flat", 0.5, 0.01, n=3),
            _row("bilinear", 2, 0.4, n=4), _row("matrix", 0.1, 0.05, n=5)]
    assert farthest_big_steps(rows) == [("flat", "tiny", 2, 32), ("bilinear", "tiny", 4, 32)]
    s = summary([*rows[:2], {**rows[3], "limit_fraction": 0.9}])
    assert s["big_steps"] == 3 and s["big_steps_meeting_goal"] == 0 and s["big_steps_limit_fraction"] == [0.5, 0.9]


def test_the_steps_adam_alone_keeps_from_the_goal_are_the_big_ones_whose_bound_is_below_it(monkeypatch):
    """A step's Adam bound is its FLOPs' time at the matmul rate over that plus Adam alone; the summary names the
    big steps whose bound is below the goal (at the goal is reachable), and gives Adam's time at the smallest shapes."""
    from benchmarks import bench_sae

    rows = [_row("flat", 2, 0.3, n=1, adam_bound=GOAL_MATMUL_FRACTION - 0.01), _row("flat", 2, 0.3, n=2,
            adam_bound=GOAL_MATMUL_FRACTION), _row("matrix", BIG_STEP_GFLOP / 2, 0.1, n=3, adam_bound=0.1),
            _row("bilinear", 3, 0.2, n=4, batch=1024, adam_bound=0.2)]
    s = summary(rows)
    assert s["big_steps_bound_by_adam"] == ["flat 8×8 n=1 batch=32", "bilinear 8×8 n=4 batch=1024"]
    assert s["smallest_adam_ms"] == {} and summary([_row("flat", 0.1, 0.1)])["smallest_adam_ms"] == {"flat 8×8": 0.25}

    monkeypatch.setattr(bench_sae, "HEAD_SHAPES", {"tiny": (4, 4)})
    monkeypatch.setattr(bench_sae, "step_and_matmul_seconds", lambda step, device, repeats: (1.0, 0.2, step.flops * 2))
    monkeypatch.setattr(bench_sae, "median_seconds", lambda fn, repeats, settle: 0.3)
    monkeypatch.setattr(bench_sae, "step_work_seconds", lambda step, repeats: (0.5, 0.2))
    row = bench_sae.step_row("flat", "tiny", 2 * bench_sae.K, 4, repeats=1)
    # the matmul ran twice the step's FLOPs in 0.2 s: the step's FLOPs take 0.1 s at its rate
    assert row["adam_bound_fraction"] == pytest.approx(0.1 / (0.1 + 0.3))
    assert row["products_bound_fraction"] == pytest.approx(0.1 / (0.5 + 0.3)) and row["products_ms"] == pytest.approx(500)
    assert row["work_bound_fraction"] == pytest.approx(0.1 / (0.5 + 0.2 + 0.3)) and row["sparse_work_ms"] == pytest.approx(200)
    assert row["limit_fraction"] == pytest.approx(0.4) and row["matmul_fraction"] == pytest.approx(0.1)


def test_the_steps_their_products_keep_from_the_goal_are_the_big_ones_whose_products_bound_is_below_it():
    rows = [_row("flat", 2, 0.3, n=1, products_bound=GOAL_MATMUL_FRACTION - 0.01),
            _row("flat", 2, 0.3, n=2, products_bound=GOAL_MATMUL_FRACTION),
            _row("matrix", BIG_STEP_GFLOP / 2, 0.1, n=3, products_bound=0.1)]
    assert summary(rows)["big_steps_bound_by_products"] == ["flat 8×8 n=1 batch=32"]


def test_the_steps_their_work_keeps_from_the_goal_are_the_big_ones_whose_work_bound_is_below_it():
    rows = [_row("flat", 2, 0.3, n=1, work_bound=GOAL_MATMUL_FRACTION - 0.01),
            _row("flat", 2, 0.3, n=2, work_bound=GOAL_MATMUL_FRACTION),
            _row("matrix", BIG_STEP_GFLOP / 2, 0.1, n=3, work_bound=0.1)]
    s = summary(rows)
    assert s["big_steps_bound_by_work"] == ["flat 8×8 n=1 batch=32"]
    assert s["big_steps_within_work_bound"] == pytest.approx([0.3 / (GOAL_MATMUL_FRACTION - 0.01), 0.3 / GOAL_MATMUL_FRACTION])


def test_a_slow_pick_is_one_over_the_threshold_and_the_slowest_is_named():
    rows = [{"picked_time_over_best": ratio} for ratio in (1.0, SLOW_PICK, SLOW_PICK + 0.01, 2.5)]
    assert slow_picks(rows) == {"rows": 4, "slow": 2, "slowest": 2.5}


def test_the_decode_table_brackets_the_flat_rules_crossover_at_every_k_it_times():
    """The flat rows the rule's constants are fitted to hold, at each k and head shape, a shape on each side of its
    crossover, so that the table can show a pick on the wrong side of it."""
    groups = {}
    for architecture, d, n, batch, k in FLAT_DECODE_ROWS:
        groups.setdefault((d, k), set()).add(dense_decode_is_cheaper(batch, n, k, d, d, None))
    assert len(groups) == 8 and all(picks == {True, False} for picks in groups.values())


def test_the_bounds_time_each_product_of_a_step_alone_at_its_layout_and_its_sparse_work_on_its_own_tensors(monkeypatch):
    """`step_work_seconds` records one call's dense matrix products (mm, bmm, addmm, baddbmm, an ``out=`` one too) and
    times each alone on fresh operands of the same shapes, strides and dtypes; and its sparse work (`SPARSE_WORK`, a
    product with a sparse operand), each timed alone on the tensors it ran on, without changing a tensor the step
    wrote to; other operators are neither."""
    from benchmarks import bench_sae

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(7, 5, generator=g).t()  # b: a transposed layout
    batched, bias, out = torch.randn(2, 3, 4, generator=g), torch.randn(3, 7, generator=g), torch.empty(3, 7)
    sparse = torch.eye(3).to_sparse_csr()
    rows, added = torch.tensor([2, 0]), torch.zeros(3, 5)
    calls = []

    def step():
        a @ b
        torch.bmm(batched, batched.transpose(1, 2))
        torch.addmm(bias, a, b, beta=0.5)
        torch.mm(a, b, out=out)
        torch.mm(sparse, a)
        a.topk(2)
        added.index_add_(0, rows, a[:2])
        (a + 1).sum()
        calls.append("step")

    def one_call(fn, repeats, settle):  # "seconds": 1 a call, and what each ran on
        timed.append(fn())
        return 1.0

    timed = []
    monkeypatch.setattr(bench_sae, "median_seconds", one_call)
    assert bench_sae.step_work_seconds(step, repeats=3) == (4.0, 3.0) and calls == ["step"]
    products, (csr, top, index_add) = timed[:4], timed[4:]
    assert [tuple(r.shape) for r in products] == [(3, 7), (2, 3, 3), (3, 7), (3, 7)]
    torch.testing.assert_close(csr, a[:3])
    torch.testing.assert_close(top[0], a.topk(2).values)
    once = torch.zeros(3, 5).index_add_(0, rows, a[:2])
    # timed on a copy, taken before the step's call, of the tensor it writes to: each holds one call's sum
    torch.testing.assert_close(added, once)
    torch.testing.assert_close(index_add, once)
    assert index_add.data_ptr() != added.data_ptr()
    recorded = bench_sae._StepWork()
    with recorded:
        a @ b
    (func, (left, right), kwargs), = recorded.products
    assert func.overloadpacket is torch.ops.aten.mm and right.stride == b.stride() and right.shape == b.shape
    assert right.fresh().stride() == b.stride() and not torch.equal(right.fresh(), b)  # the same layout, fresh numbers
    assert recorded.sparse == []


def test_every_sparse_operator_of_each_sae_s_step_is_in_the_work_bound():
    """The sparse operators a trainer step runs, on every route (dense and gathered decode, dense, gathered and CSR
    encoder backward, per-sample bilinear forward), are all `SPARSE_WORK`: an index operator the step gains later must
    be added there or the work bound would leave it out. Indexing ops outside the list are named."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    seen = set()
    for architecture in CLASSES:
        for d, n, batch in [(4, 8, 16), (8, 64, 4), (8, 256, 64), (16, 512, 2)]:
            step = train_step(CLASSES[architecture](d_k=d, d_v=d, n_features=n, k=4, seed=0), torch.randn(batch, 1, d, d))
            step()
            with Seen():
                step()
    indexing = {op for op in seen if any(word in op._qualified_op_name for word in
                                         ("index", "gather", "scatter", "embedding", "topk", "sort", "bincount", "cumsum"))}
    assert indexing and indexing <= set(SPARSE_WORK), indexing - set(SPARSE_WORK)


def test_the_fixed_cost_row_times_the_trainers_step_at_the_trivial_shape_and_counts_its_operators(monkeypatch):
    """`fixed_cost_row` times `train_step` at `TRIVIAL_SHAPE` and counts the ATen operators of one step, which
    RESULTS.md's P5 section renders beside each SAE."""
    from benchmarks import bench_sae

    timed = []
    monkeypatch.setattr(bench_sae, "median_seconds", lambda fn, repeats, settle: timed.append(fn) or 0.001)
    row = bench_sae.fixed_cost_row("bilinear", repeats=3)
    t = bench_sae.TRIVIAL_SHAPE
    assert len(timed) == 1 and row["step_ms"] == pytest.approx(1.0)
    assert timed[0].flops == training_step_flops("bilinear", t["batch"], t["n_features"], t["k"], t["d"], t["d"], 1)
    assert {key: row[key] for key in t} == t and row["architecture"] == "bilinear"
    counted = bench_sae._OperatorCount()
    with counted:
        torch.ones(2).add(1).sum()
    assert counted.count == 3 and row["operators"] > 100  # loss, backward, Adam and the guards: hundreds


def test_the_product_layout_row_times_each_layout_and_names_the_rules_pick(monkeypatch):
    """`product_layout_row` times `writesae.sae._times_weight_rows` in einsum's layout and weights first (the one
    that calls torch.bmm itself), and names the route `weights_first_is_faster` picks and its time over the best."""
    from unittest import mock

    from benchmarks import bench_sae

    def calls_to_bmm(fn, repeats, settle):  # "seconds" = 1 + the torch.bmm calls of one call
        with mock.patch("torch.bmm", wraps=torch.bmm) as bmm:
            fn()
        return 1.0 + bmm.call_count

    monkeypatch.setattr(bench_sae, "median_seconds", calls_to_bmm)
    row = bench_sae.product_layout_row(2, 64, 32, repeats=1)
    assert (row["einsum_ms"], row["weights_first_ms"]) == (1e3, 2e3)
    assert row["rule_picks"] == "weights_first" and row["picked_time_over_best"] == 2.0
    row = bench_sae.product_layout_row(2, 64, 8, repeats=1)
    assert row["rule_picks"] == "einsum" and row["picked_time_over_best"] == 1.0 and row["rows"] == 8


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


def test_a_results_file_names_the_cpu_it_ran_on(monkeypatch, tmp_path):
    """`benchmarks.provenance.cpu` reads the model, the data caches and the vector extensions a matrix product's
    rate depends on; the run line names them, and a file from before they were recorded keeps its old line."""
    described = provenance_module.cpu()
    if Path("/proc/cpuinfo").exists():
        assert described["model"] and set(described["vector_extensions"]) <= set(provenance_module.VECTOR_EXTENSIONS)
        assert all(level.startswith("L") for level in described["caches"])
    record = {"command": "python -m benchmarks.bench_x", "date": "today", "torch": "2", "cpu_threads": 1,
              "cpu": {"model": "Some CPU", "caches": {"L1": "48K", "L2": "2048K", "L3": "480M"},
                      "vector_extensions": ["avx2", "avx512f"]}}
    assert provenance_module.run_line(record).endswith(", CPU Some CPU (avx2, avx512f; L2 2048K, L3 480M)")
    assert provenance_module.run_line({**record, "cpu": {"model": "Plain", "caches": {}, "vector_extensions": []}}
                                      ).endswith("1 CPU thread(s), CPU Plain")
    del record["cpu"]
    assert provenance_module.run_line(record).endswith("1 CPU thread(s)")


def test_the_reference_matmul_is_the_fastest_of_its_trials(monkeypatch):
    """The step's median, then one median per fresh input pair of the reference matmul, of which the fastest."""
    from benchmarks import bench_sae

    medians = iter([1.0, 0.3, 0.2, 0.4])
    monkeypatch.setattr(bench_sae, "median_seconds", lambda fn, repeats, settle: next(medians))
    step = lambda: None
    step.flops = 2 * 10**3
    assert bench_sae.MATMUL_REFERENCE_TRIALS == 3
    assert bench_sae.step_and_matmul_seconds(step, "cpu", repeats=2) == (1.0, 0.2, 2 * 10**3)


def test_the_run_cost_takes_its_training_rates_from_the_steps_at_the_runs_own_shape():
    """P7's CPU training rate is the BilinearMatrixSAE step at the run's shape, not the largest one measured (a
    larger batch, here a decoy, would be picked by size), and a results file without that step is refused by name."""
    from benchmarks.run_cost import QWEN35_08B, RUN, run_shape_row
    d = QWEN35_08B["d_k"]
    shape = dict(d_k=d, d_v=d, n_features=RUN["n_features"], batch=RUN["batch"], k=RUN["k"])
    decoys = [dict(shape, architecture="bilinear", batch=4 * RUN["batch"]), dict(shape, architecture="matrix"),
              dict(shape, architecture="bilinear", d_k=64, d_v=64), dict(shape, architecture="bilinear", n_features=4 * RUN["n_features"])]
    run_row = dict(shape, architecture="bilinear")
    assert run_shape_row([*decoys[:2], run_row, *decoys[2:]]) is run_row
    with pytest.raises(LookupError, match=rf"no BilinearMatrixSAE step at the run's shape \({d}×{d}, n = {RUN['n_features']}, "
                                          rf"batch {RUN['batch']}"):
        run_shape_row(decoys)
    # the GPU check's file and remedy named where its rows lack the step
    with pytest.raises(LookupError, match=r"^gpu_check.json has no .*: run it on a GPU$"):
        run_shape_row([dict(run_row, k=2 * RUN["k"])], "gpu_check.json", "run it on a GPU")


def _off_unit_norm(architecture: str):
    """A small SAE whose every weight is perturbed off its initialisation: factors off unit norm, biases non-zero, so
    that a step's normalisation and each bias's gradient show, and b_enc low enough that some kept pre-activations are
    negative, so that the ReLU on them shows."""
    sae = CLASSES[architecture](d_k=6, d_v=5, n_features=40, k=4, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.mul_(torch.rand(p.shape, generator=g) + 0.5).add_(0.1 * torch.randn(p.shape, generator=g))
        sae.b_enc -= 1.5
    return sae


@pytest.mark.parametrize("architecture", sorted(CLASSES))
def test_the_plain_step_is_the_trainers_step(architecture):
    """The plain step is the same maths as the trainer's: from the same weights and batch (d_k ≠ d_v), three steps of
    each leave the same gradients (which Adam's update, near lr · sign, would hide a wrong scale of) and weights."""
    ours, plain = _off_unit_norm(architecture), _off_unit_norm(architecture)
    x = torch.randn(24, 1, 6, 5, generator=torch.Generator().manual_seed(2))
    ours_step, plain_step_ = train_step(ours, x), plain_step(plain, x)
    for _ in range(3):
        ours_step()
        plain_step_()
        for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"∂{name}: {m}")
            torch.testing.assert_close(q, p, msg=lambda m: f"{name}: {m}")


def test_the_plain_step_refuses_an_sae_it_does_not_write_out():
    with pytest.raises(ValueError, match="rank-1 TopK"):
        plain_step(CLASSES["bilinear"](d_k=4, d_v=4, n_features=8, k=2, tied=True, seed=0), torch.randn(4, 1, 4, 4))
