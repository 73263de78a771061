"""The committed logit-shift study (``python -m demos.logit_shift``) reports fixed- and learned-decay heads apart:
its results and its README block, against the shipped census."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from demos.logit_shift import readme_block
from hooked_gdn.census import MemoryCensus
from hooked_gdn.pretrained import CENSUS_FILE, PRETRAINED_MODELS

RESULTS = Path(__file__).parents[1] / "demos" / "results" / "logit_shift" / "results.json"


@pytest.fixture(name="results", scope="module")
def results_fixture():
    return json.loads(RESULTS.read_text())


@pytest.fixture(name="census", scope="module")
def census_fixture():
    return MemoryCensus.load_json(PRETRAINED_MODELS["gdn-austen"] / CENSUS_FILE)


def test_every_head_of_the_layer_is_studied_under_its_census_decay_kind(results, census):
    layer, heads = results["layer"], results["heads"]
    assert sorted(heads) == [h.head for h in census.heads if h.layer == layer]  # every head of the layer
    for h in heads:
        alpha = census.head(layer, h).alpha  # fixed: the decay's 10th and 90th percentiles agree
        assert results["decay"][str(h)] == ("fixed" if alpha[0] == pytest.approx(alpha[2], rel=1e-6) else "learned")
    assert set(results["decay"].values()) == {"fixed", "learned"}
    # fixed-decay heads first (so that they drew the random directions of the study on them alone)
    kinds = [results["decay"][str(h)] for h in heads]
    assert kinds == sorted(kinds)


def test_the_results_pool_each_decay_kind_apart(results):
    # no group pools across the kinds; every per-head number is there for every head
    assert set(results["r2"]) == set(results["decay"].values())
    for kind, by_direction in results["r2"].items():
        assert set(by_direction) == {"all", "atom", "random"}
    heads = {str(h) for h in results["heads"]}
    for key in ("r2_by_head", "r2_by_distance", "share_by_distance", "paper_holds_until", "mean_state_norm_at_t0",
                "directions", "half_life"):
        assert set(results[key]) == heads, key
    for h in heads:
        for e in map(str, results["epsilon_multiples_of_state_norm"]):
            for scale in ("read", "logits"):
                assert sum(results["share_by_distance"][h][e][scale]) == pytest.approx(1.0)
                assert len(results["r2_by_distance"][h][e][scale]["paper"]) == len(results["bins"])


def test_the_readme_block_names_each_heads_decay_kind(results, census):
    block = readme_block(results)
    layer, decay = results["layer"], {int(h): kind for h, kind in results["decay"].items()}
    # the pooled table: one row group per decay kind, naming exactly its heads
    groups = re.findall(r"^\| (fixed|learned) \(([\d, ]+)\) \|", block, re.M)
    assert [(kind, [int(h) for h in heads.split(", ")]) for kind, heads in groups] == [
        (kind, [h for h in results["heads"] if decay[h] == kind]) for kind in ("fixed", "learned")]
    assert len(re.findall(r"^\| (?:fixed|learned) \(|^\|  \| ", block, re.M)) == 2 * len(results["epsilon_multiples_of_state_norm"])
    # the by-distance table: every row names its head's kind as the census has it
    rows = re.findall(r"^\| (\d+) \((fixed|learned), [\d.]+\) \| (read|logits|share of read) \|", block, re.M)
    assert sorted(rows) == sorted((str(h), census.head(layer, h).decay_kind, at) for h in results["heads"]
                                  for at in ("read", "logits", "share of read"))
    # the sentence covers every head, under its kind
    sentence = block.strip().splitlines()[-1]
    assert sentence.startswith("The paper's approximation holds")
    parts = sentence.split(") in ", 1)[1].rstrip(".").split("; ")
    assert [(part.split("-decay ")[0], [int(h) for h in re.findall(r"head (\d+)", part)]) for part in parts] == [
        (kind, [h for h in results["heads"] if decay[h] == kind]) for kind in ("fixed", "learned")]
