"""demos.compare_architectures: its head rule on the shipped census, its parameter matching, and a micro-run on a tiny model."""

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


def test_the_head_rule_on_the_shipped_census():
    census = MemoryCensus.load_json(PRETRAINED_MODELS["gdn-austen"] / CENSUS_FILE)
    # by the census table: layer 6 has fixed-decay heads 1, 3 (106, 1024 tokens) and learned heads 2, 0 (1.2, 2.8 tokens);
    # every other audible layer has at most one head below 3 tokens, and layer 0's reads are silent
    choice = demo.choose_heads(census, 64, 3)
    assert choice["layer"] == 6 and choice["heads"] == {"long-memory": [1, 3], "memoryless": [0, 2]}
    assert demo.choose_heads(census, 64, 3, layer=5)["heads"] == {"long-memory": [1, 3], "memoryless": [0]}
    with pytest.raises(ValueError, match="layer 6 has no memoryless heads"):
        demo.choose_heads(census, 64, 0.5, layer=6)
    with pytest.raises(ValueError, match="layer 3 is not in the census"):
        demo.choose_heads(census, 64, 3, layer=3)


def test_equal_parameters_picks_features_with_equal_weight_counts():
    n = demo.features_at_equal_parameters(8, k=4, d_k=64, d_v=64)
    # weights per head by docs/design.md §13: Flat 2·n·d_k·d_v; Matrix n·(d_k·d_v + d_k + d_v); Bilinear n·r·(d_k + d_v), twice untied
    weights = {"Flat": 2 * 4096, "Matrix": 4096 + 128, "Bilinear tied r1": 128, "Bilinear untied r1": 256,
               "Bilinear tied r2": 256, "Bilinear untied r2": 512}
    assert n == {"Flat": 8, "Matrix": 16, "Bilinear tied r1": 512, "Bilinear untied r1": 256, "Bilinear tied r2": 256,
                 "Bilinear untied r2": 128}
    for architecture, features in n.items():
        assert demo.weights_per_head(architecture, features, 4, 64, 64) == features * weights[architecture]
        assert abs(features * weights[architecture] - 65536) <= 0.05 * 65536
    with pytest.raises(ValueError, match="Matrix: 7 features have 812 weights per head, not within 5%"):
        demo.features_at_equal_parameters(4, k=2, d_k=12, d_v=8)  # 768 weights: Matrix's 116 per feature cannot match


def test_window_positions():
    assert demo.window_positions(256, 16) == list(range(135, 256, 8))
    with pytest.raises(ValueError, match="positions must lie in"):
        demo.window_positions(16, 9)


def test_a_micro_run_gives_every_architecture_under_both_matchings(tmp_path):
    model = random_tiny_model(HookedSAEGatedDeltaNet)
    g = torch.Generator().manual_seed(0)
    documents = [torch.randint(1, 101, (60,), generator=g) for _ in range(12)]
    choice = {"layer": 1, "heads": {"long-memory": [0, 2], "memoryless": [3]},
              "median_half_life": {"0": 40.0, "1": 5.0, "2": 90.0, "3": 0.5}, "rule": "given"}
    sizes = dict(k=2, n_features=8, budget_features=5, steps=10, batch_size=8, lr=1e-2, train_samples=32, heldout_samples=16,
                 context=16, positions=4, ce_windows=1, ce_context=6, auxk_k=4, dead_after_samples=64)
    ce_tokens = torch.randint(1, 101, (1, 6), generator=g)
    results = demo.run_comparison(model, documents, [10, 11], choice, sizes, [0, 1], ce_tokens, sites=("state",), log=lambda _: None)

    equal_parameters = demo.features_at_equal_parameters(5, 2, model.cfg.d_key, model.cfg.d_value)
    keys = [(r["group"], r["matching"], r["architecture"]) for r in results["summary"]]
    assert sorted(keys) == sorted((g, m, a) for g in demo.GROUPS for m in demo.MATCHINGS for a in demo.ARCHITECTURES)
    for row in results["summary"]:
        same = [r for r in results["runs"] if (r["group"], r["matching"], r["architecture"]) == (row["group"], row["matching"], row["architecture"])]
        assert [r["seed"] for r in same] == [0, 1] and row["heads"] == choice["heads"][row["group"]]
        assert row["n_features"] == (8 if row["matching"] == "equal L0" else equal_parameters[row["architecture"]])
        fvu = [r["heldout"]["fvu"] for r in same]
        assert row["fvu_mean"] == pytest.approx(sum(fvu) / 2) and row["fvu_spread"] == pytest.approx(statistics.stdev(fvu))
        assert all(0 < f < 10 for f in fvu)
        for r in same:
            assert len(r["heldout"]["fvu_per_head"]) == len(row["heads"]) and r["heldout"]["samples"] == 16
            assert r["curve"]["heldout_steps"] == [2, 4, 6, 8, 10] and r["heldout"]["fvu"] == r["curve"]["heldout_fvu"][-1]
            assert r["converged"] == (max(r["last_fifth_change_per_head"]) < 0.02)
            ce = r["ce"]
            assert ce["ce_loss_recovered"] == pytest.approx((ce["ce_zero_ablated"] - ce["ce_spliced"]) / (ce["ce_zero_ablated"] - ce["ce_clean"]))
            assert ce["kl_spliced"] >= 0 and row["kl_mean"] == pytest.approx(statistics.fmean(r["ce"]["kl_spliced"] for r in same))
    # references per head group: the training mean's held-out FVU by hand, and PCA-k, which can only do better
    assert [(r["site"], r["group"]) for r in results["references"]] == [("state", g) for g in demo.GROUPS]
    for reference in results["references"]:
        samples = demo.extract(model, documents, [10, 11], 1, "state", reference["heads"], sizes)
        train, heldout = samples.train.flatten(-2).double(), samples.heldout.flatten(-2).double()
        by_hand = (heldout - train.mean(0)).pow(2).sum((0, 2)) / (heldout - heldout.mean(0)).pow(2).sum((0, 2))
        assert reference["training mean"]["fvu_per_head"] == pytest.approx(by_hand.tolist(), rel=1e-5)
        assert all(p <= m + 1e-9 for p, m in zip(reference["PCA-2"]["fvu_per_head"], by_hand.tolist()))
    assert results["heldout_samples"] == 16 and results["threads"] == torch.get_num_threads()
    # one clean and one zero-ablated reference per head group, shared by its runs
    for group in demo.GROUPS:
        assert len({(r["ce"]["ce_clean"], r["ce"]["ce_zero_ablated"]) for r in results["runs"] if r["group"] == group}) == 1
    budget = results["parameter_budget_per_head"]
    assert budget == 2 * 5 * 12 * 8
    assert all(abs(r["weights_per_head"] - budget) <= 0.05 * budget for r in results["summary"] if r["matching"] == "equal parameters")

    results["provenance"] = {"command": "python -m demos.compare_architectures", "model": "tiny", "inputs": {"out": "somewhere"}}
    block = demo.readme_block(results)
    table = [line for line in block.splitlines() if line.startswith("| state |")]
    assert len(table) == len(results["summary"]) == 24
    first = results["summary"][0]
    assert f"{first['fvu_mean']:.3f} ± {first['fvu_spread']:.3f}" in table[0] and f"{first['kl_mean']:.3f} ±" in table[0]
    assert "training mean" in block and "somewhere/comparison.png" in block
    demo.plot(results, tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def test_an_interrupted_comparison_resumes_to_the_same_runs(tmp_path):
    model = random_tiny_model(HookedSAEGatedDeltaNet)
    g = torch.Generator().manual_seed(1)
    documents = [torch.randint(1, 101, (60,), generator=g) for _ in range(12)]
    choice = {"layer": 1, "heads": {"long-memory": [0], "memoryless": [3]}, "median_half_life": {}, "rule": "given"}
    sizes = dict(k=2, n_features=6, budget_features=5, steps=5, batch_size=8, lr=1e-2, train_samples=16, heldout_samples=8,
                 context=16, positions=2, ce_windows=1, ce_context=6, auxk_k=4, dead_after_samples=64)
    ce_tokens = torch.randint(1, 101, (1, 6), generator=g)
    compare = lambda **kw: demo.run_comparison(model, documents, [10, 11], choice, sizes, [0, 1], ce_tokens, sites=("write",), **kw)
    without_seconds = lambda runs: [{k: v for k, v in r.items() if k != "seconds"} for r in runs]

    uninterrupted = compare(log=lambda _: None)
    records, logged = tmp_path / "runs.jsonl.partial", []

    def stop_after_five(line):
        logged.append(line)
        if len(logged) == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        compare(log=stop_after_five, records=records)
    with records.open("a") as file:
        file.write('{"site": "write", "gro')  # the line being written when it was stopped
    trained = []
    monkey = pytest.MonkeyPatch()
    original = demo.train_run
    monkey.setattr(demo, "train_run", lambda *a, **kw: trained.append(a[1:4]) or original(*a, **kw))
    try:
        resumed = compare(log=lambda _: None, records=records)
    finally:
        monkey.undo()
    assert len(trained) == len(uninterrupted["runs"]) - 5  # only the runs the records lacked
    assert json.loads(json.dumps(without_seconds(resumed["runs"]))) == json.loads(json.dumps(without_seconds(uninterrupted["runs"])))
    with pytest.raises(ValueError, match=r"holds the runs of a comparison with other settings \(sizes\.steps: the records "
                                         r"have \d+, this run 10\); delete it"):
        demo.run_comparison(model, documents, [10, 11], choice, sizes | {"steps": 10}, [0, 1], ce_tokens, sites=("write",),
                            log=lambda _: None, records=records)


def test_bad_sizes_are_refused():
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "152"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--seeds", "1"])
    assert demo.parse_args([]).steps % 5 == 0
