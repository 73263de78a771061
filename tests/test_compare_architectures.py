"""demos.compare_architectures: its head rule, parameter matching, splits, exact L0, bootstrap, and micro-runs on a tiny model."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from hooked_gdn.census import MemoryCensus
from hooked_gdn.pretrained import CENSUS_FILE, PRETRAINED_MODELS
from writesae.splice import HookedSAEGatedDeltaNet

from demos import compare_architectures as demo

from .conftest import random_tiny_model

CHOICE = {"layer": 1, "heads": {"long-memory": [0, 2], "memoryless": [3]},
          "median_half_life": {"0": 40.0, "1": 5.0, "2": 90.0, "3": 0.5},
          "decay": {"0": "fixed", "1": "learned", "2": "fixed", "3": "learned"}, "rule": "given"}
SIZES = dict(k=2, n_features=8, lrs=[1e-3, 3e-3, 1e-2], lr_extensions=1, l0_curve=[1, 2, 4], parameter_k=2, budgets=[5, 10, 40],
             max_features=150, seeds=2, steps=10, batch_size=8, train_samples=32, validation_samples=16, context=16,
             positions=4, kl_windows=2, kl_context=6, bootstrap=200, dead_after_samples=64)


def tiny_setting(seed: int = 0):
    model = random_tiny_model(HookedSAEGatedDeltaNet)
    g = torch.Generator().manual_seed(seed)
    documents = [torch.randint(1, 101, (60,), generator=g) for _ in range(12)]
    return model, documents, torch.randint(1, 101, (2, 6), generator=g)


@pytest.fixture(scope="module", name="micro")
def micro_fixture():
    model, documents, kl_tokens = tiny_setting()
    results = demo.run_comparison(model, documents, [10, 11], CHOICE, SIZES, kl_tokens, sites=("state",), log=lambda _: None)
    return model, documents, json.loads(json.dumps(results))


def test_the_head_rule_on_the_shipped_census():
    census = MemoryCensus.load_json(PRETRAINED_MODELS["gdn-austen"] / CENSUS_FILE)
    # by the census table: layer 6 has fixed-decay heads 1, 3 (106, 1024 tokens) and learned heads 2, 0 (1.2, 2.8 tokens);
    # every other audible layer has at most one head below 3 tokens, and layer 0's reads are silent
    choice = demo.choose_heads(census, 64, 3)
    assert choice["layer"] == 6 and choice["heads"] == {"long-memory": [1, 3], "memoryless": [0, 2]}
    assert choice["decay"] == {"0": "learned", "1": "fixed", "2": "learned", "3": "fixed"}
    assert demo.choose_heads(census, 64, 3, layer=5)["heads"] == {"long-memory": [1, 3], "memoryless": [0]}
    with pytest.raises(ValueError, match="layer 6 has no memoryless heads"):
        demo.choose_heads(census, 64, 0.5, layer=6)
    with pytest.raises(ValueError, match="layer 3 is not in the census"):
        demo.choose_heads(census, 64, 3, layer=3)


def test_equal_parameters_picks_features_with_equal_weight_counts():
    n = demo.features_at_equal_parameters(8, k=4, d_k=64, d_v=64)
    # weights per head by docs/design.md §13: Flat 2·n·d_k·d_v; Matrix n·(d_k·d_v + d_k + d_v); Bilinear n·(d_k + d_v), twice untied
    weights = {"Flat": 2 * 4096, "Matrix": 4096 + 128, "Bilinear tied": 128, "Bilinear untied": 256}
    assert n == {"Flat": 8, "Matrix": 16, "Bilinear tied": 512, "Bilinear untied": 256}
    for architecture, features in n.items():
        assert demo.weights_per_head(architecture, features, 4, 64, 64) == features * weights[architecture]
        assert abs(features * weights[architecture] - 65536) <= 0.05 * 65536
    with pytest.raises(ValueError, match="Matrix: 7 features have 812 weights per head, not within 5%"):
        demo.features_at_equal_parameters(4, k=2, d_k=12, d_v=8)  # 768 weights: Matrix's 116 per feature cannot match


def test_window_positions():
    assert demo.window_positions(256, 16) == list(range(135, 256, 8))
    with pytest.raises(ValueError, match="positions must lie in"):
        demo.window_positions(16, 9)


def test_training_validation_and_test_samples_are_apart():
    model, documents, _ = tiny_setting()
    samples = demo.extract(model, documents, [10, 11], 1, "write", [0, 3], SIZES)
    train, validation, test = samples.fitting.train, samples.fitting.heldout, samples.test
    assert (len(train), len(validation)) == (32, 16) and train.shape[1:] == (2, model.cfg.d_key, model.cfg.d_value)
    # no validation sample is a training sample (they come from other windows), and the test windows are the held-out ones
    assert torch.cdist(validation.flatten(1), train.flatten(1)).min() > 1e-6
    assert len(samples.windows) * 4 == len(test) and samples.per_window(torch.ones(len(test))).tolist() == [4.0] * len(samples.windows)
    assert samples.select_heads([3]).test.equal(test[:, 1:])
    with pytest.raises(ValueError, match="multiple of the positions per window"):
        demo.extract(model, documents, [10, 11], 1, "write", [0], SIZES | {"validation_samples": 14})


def test_exact_l0_keeps_the_k_n_largest_codes_of_the_split():
    torch.manual_seed(0)
    sae = demo.make_sae("Bilinear untied", 12, 3, 5, 4, [0, 1], seed=0).eval()
    x = torch.randn(40, 2, 5, 4)
    error, fired = demo.exact_l0_errors(sae, x)
    with torch.no_grad():
        pre = sae.encode_pre(x).relu()  # [N, H, n]
        by_hand = torch.zeros_like(pre)
        for h in range(2):
            column = pre[:, h]
            kept = column.flatten().topk(3 * 40).indices
            by_hand[:, h] = torch.zeros(column.numel()).index_copy(0, kept, column.flatten()[kept]).view_as(column)
        expected = (x - sae.decode(by_hand)).pow(2).sum((-2, -1)).double()
    assert error == pytest.approx(expected, rel=1e-5)
    assert fired.sum(-1).tolist() == [120, 120] and not sae.training
    assert float(sae.activation.threshold.abs().sum()) == 0  # nothing calibrated


def test_the_bootstrap_of_all_windows_once_is_the_point_estimate():
    variance = torch.rand(7, 2).double() + 0.5
    error = (torch.rand(7, 2) * 0.3).tolist()
    all_once = torch.arange(7)[None]
    point = (torch.tensor(error).double().sum(0) / variance.sum(0)).mean()
    assert demo.fvu_resamples(error, variance, all_once).item() == pytest.approx(point.item())
    assert demo.verdict({"fvu_minus_flat_interval": [-0.2, -0.01]}) == "lower"
    assert demo.verdict({"fvu_minus_flat_interval": [-0.2, 0.01]}) == "level"
    assert demo.verdict({"fvu_minus_flat_interval": [0.001, 0.01]}) == "higher"


def test_the_learning_rate_is_chosen_on_validation_not_test():
    swept = [{"lr": 1e-3, "validation": {"fvu": 0.5}, "test": {"fvu": 0.9}},
             {"lr": 3e-3, "validation": {"fvu": 0.6}, "test": {"fvu": 0.4}}]
    assert demo.best_learning_rate(swept) == 1e-3


def test_the_learning_rate_grid_grows_beyond_an_edge_that_is_best():
    assert demo.next_learning_rate([1e-3, 3e-3, 1e-2], 1e-2) == 0.0333
    assert demo.next_learning_rate([3e-3, 1e-3, 1e-2], 1e-3) == 0.000333
    assert demo.next_learning_rate([1e-3, 3e-3, 1e-2], 3e-3) is None


def test_a_micro_run_has_every_phase_and_the_learning_rate_is_chosen_on_validation(micro, tmp_path):
    model, _, results = micro
    runs, summary = results["runs"], results["summary"]
    assert {r["phase"] for r in runs} == set(demo.PHASES)
    for cell in results["cells"]:
        for a in demo.ARCHITECTURES:
            swept = [r for r in runs if (r["group"], r["phase"], r["architecture"]) == (cell["group"], "learning rate", a)]
            assert sorted(r["lr"] for r in swept) == cell["lr_grid"][a] and set(SIZES["lrs"]) <= set(cell["lr_grid"][a])
            assert cell["best_lr"][a] == demo.best_learning_rate(swept)
            # the grid grew (by at most lr_extensions) only beyond an edge that was best
            added = sorted(set(cell["lr_grid"][a]) - set(SIZES["lrs"]))
            base = [r for r in swept if r["lr"] in SIZES["lrs"]]
            assert len(added) <= 1 and added == ([demo.next_learning_rate(SIZES["lrs"], demo.best_learning_rate(base))]
                                                 if demo.next_learning_rate(SIZES["lrs"], demo.best_learning_rate(base)) else [])
            others = [r for r in runs if (r["group"], r["architecture"]) == (cell["group"], a) and r["phase"] != "learning rate"]
            assert others and all(r["lr"] == cell["best_lr"][a] for r in others)
        assert cell["test_samples"] == 4 * cell["test_windows"] and cell["validation_samples"] == 16
        assert sorted(k for k in cell["references"] if k.startswith("PCA")) == ["PCA-1", "PCA-2", "PCA-4"]
    for run in runs:
        test = run["test"]
        # exact L0: k per sample per head unless a head had fewer positive codes than k·N
        assert all(l0 <= run["k"] + 1e-9 for l0 in test["l0_per_head"]) and max(test["l0_per_head"]) == pytest.approx(run["k"])
        variance = torch.tensor(next(c for c in results["cells"] if c["group"] == run["group"])["variance_per_window"]).sum(0)
        by_windows = (torch.tensor(test["error_per_window"]).sum(0) / variance).tolist()
        assert by_windows == pytest.approx(test["fvu_per_head"], rel=1e-6)
        assert run["converged"] == (max(run["last_fifth_change_per_head"]) < 0.02)
    # the L0 curve holds each k once, the headline k being the learning-rate phase's best run
    for group in demo.GROUPS:
        for a in demo.ARCHITECTURES:
            curve = [r for r in summary if (r["group"], r["curve"], r["architecture"]) == (group, "L0", a)]
            assert [r["k"] for r in curve] == SIZES["l0_curve"]
            head = next(r for r in summary if (r["group"], r["curve"], r["architecture"]) == (group, "headline", a))
            assert head["seeds"] == 2 and head["fvu"] == next(r["fvu"] for r in curve if r["k"] == SIZES["k"])
            if a != demo.BASELINE:
                flat = next(r for r in summary if (r["group"], r["curve"], r["architecture"]) == (group, "headline", "Flat"))
                assert head["fvu_minus_flat"] == pytest.approx(head["fvu"] - flat["fvu"])
                low, high = head["fvu_minus_flat_interval"]
                assert low <= head["fvu_minus_flat"] + 1e-9 and head["fvu_minus_flat"] - 1e-9 <= high
    # parameters: the 40-feature budget's bilinear SAEs exceed the cap and are listed, not trained
    assert results["not_trained"] == [{"budget": 40, "architecture": "Bilinear tied", "n_features": 384},
                                      {"budget": 40, "architecture": "Bilinear untied", "n_features": 192}]
    assert {r["n_features"] for r in runs if r["phase"] == "parameters" and r["architecture"] == "Flat"} == {5, 10, 40}
    # in-loop KL on the headline and the L0 curve only (a splice's cost in the loop grows with its features)
    assert all((r["kl"] is None) == (r["curve"] == "parameters") for r in summary)
    assert all(r["kl"] is None for r in runs if r["phase"] == "parameters")

    results["provenance"] = {"command": "python -m demos.compare_architectures", "model": "tiny", "inputs": {"out": "somewhere"}}
    block = demo.readme_block(results)
    assert block.count("| state | long-memory [0, 2] (fixed decay) |") == 4 and "memoryless [3] (learned decay)" in block
    assert "Not trained (above the feature cap of 150): Bilinear tied at the 40-feature FlatSAE's budget (384 features)" in block
    wsae = next(r for r in summary if (r["group"], r["curve"], r["architecture"]) == ("long-memory", "headline", demo.WRITESAE))
    assert f"{demo.WRITESAE} − Flat = {wsae['fvu_minus_flat']:+.3f}" in block and "somewhere/comparison.png" in block
    demo.plot(results, tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def test_a_diverged_splice_is_counted_not_averaged(micro):
    _, _, results = micro
    results = json.loads(json.dumps(results))
    run = next(r for r in results["runs"] if r["phase"] == "learning rate" and r["architecture"] == "Matrix"
               and r["lr"] == results["cells"][0]["best_lr"]["Matrix"] and r["group"] == "long-memory")
    run["kl"]["kl_spliced"][1] = None
    row = next(r for r in demo.summarize(results) if (r["group"], r["curve"], r["architecture"]) == ("long-memory", "headline", "Matrix"))
    assert row["kl"] is None and row["kl_interval"] is None and (row["kl_diverged"], row["kl_windows"]) == (1, 2)
    assert demo._kl_cell(row) == "diverged in 1 of 2 windows"


@pytest.mark.parametrize("stop_after", [3, 5])  # 3: after Flat's learning rates, before its chosen run's KL
def test_an_interrupted_comparison_resumes_to_the_same_runs(tmp_path, stop_after):
    model, documents, kl_tokens = tiny_setting(1)
    choice = CHOICE | {"heads": {"long-memory": [0], "memoryless": [3]}}
    sizes = SIZES | {"l0_curve": [2], "budgets": [5], "seeds": 1, "steps": 5}
    compare = lambda **kw: demo.run_comparison(model, documents, [10, 11], choice, sizes, kl_tokens, sites=("write",), **kw)
    without_seconds = lambda runs: [{k: v for k, v in r.items() if k != "seconds"} for r in runs]

    uninterrupted = compare(log=lambda _: None)
    records, logged = tmp_path / "runs.jsonl.partial", []

    def stop(line):
        logged.append(line)
        if len(logged) == stop_after:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        compare(log=stop, records=records)
    with records.open("a") as file:
        file.write('{"site": "write", "gro')  # the line being written when it was stopped
    before = {}
    for line in records.read_text().splitlines()[1:-1]:
        run = json.loads(line)
        before[tuple(run[k] for k in demo.RUN_KEY)] = run
    assert len(before) == 3 if stop_after == 3 else len(before) < 5  # the chosen run is recorded again with its KL
    trained = []
    monkey = pytest.MonkeyPatch()
    original = demo.train_run
    monkey.setattr(demo, "train_run", lambda *a, **kw: trained.append(a[1:4]) or original(*a, **kw))
    try:
        resumed = compare(log=lambda _: None, records=records)
    finally:
        monkey.undo()
    # only the runs the records lacked, and a recorded run that the summary needs with its KL, recorded without it
    retrained = sum(
        run["kl"] is None and resumed_run["kl"] is not None
        for key, run in before.items() for resumed_run in resumed["runs"] if tuple(resumed_run[k] for k in demo.RUN_KEY) == key)
    assert len(trained) == len(uninterrupted["runs"]) - len(before) + retrained and retrained == (stop_after == 3)
    assert json.loads(json.dumps(without_seconds(resumed["runs"]))) == json.loads(json.dumps(without_seconds(uninterrupted["runs"])))
    with pytest.raises(ValueError, match=r"holds the runs of a comparison with other settings \(sizes\.steps: the records "
                                         r"have \d+, this run 10\); delete it"):
        demo.run_comparison(model, documents, [10, 11], choice, sizes | {"steps": 10}, kl_tokens, sites=("write",),
                            log=lambda _: None, records=records)


def test_bad_arguments_are_refused():
    for argv in (["--steps", "152"], ["--lrs", "0.001,0.003"], ["--k", "6"], ["--bootstrap", "10"]):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)
    args = demo.parse_args([])
    assert args.steps % 5 == 0 and args.k in args.l0_curve and len(args.lrs) >= 3
