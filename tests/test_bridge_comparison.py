"""benchmarks/bridge_comparison.py: its committed results hold together, and a fresh measurement on the tiny
checkpoints agrees with them where the numbers are ours to guarantee (greedy generation equal to transformers',
a state edit carried as transformers carries it), and finds the bridge's as committed."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bridge_comparison as bc

RESULTS = json.loads(bc.RESULTS_JSON.read_text())


def test_committed_results_name_what_produced_them():
    p = RESULTS["provenance"]
    assert p["command"].startswith("python -m benchmarks.bridge_comparison")
    assert {"seed", "cpu_threads", "torch", "transformers", "transformer_lens", "wall_s", "date"} <= set(p)
    assert set(RESULTS["families"]) == set(bc.FAMILIES)
    assert RESULTS["rwkv7"]["transformers_has_rwkv7"] is False


@pytest.mark.parametrize("family", sorted(bc.FAMILIES))
def test_committed_counts_are_the_committed_tokens(family):
    """Every count is recounted from the tokens the file holds, against transformers' continuation."""
    g = RESULTS["families"][family]["generation"]
    assert g["total"] == g["n_new"] * len(g["prompt_lengths"]) == bc.N_NEW * len(bc.PROMPT_LENGTHS)
    for tool in (*bc.TOOLS, "bridge_no_kv_cache"):
        row = g[tool]
        equal = [sum(a == b for a, b in zip(mine, ref)) for mine, ref in zip(row["tokens"], g["transformers"])]
        assert row["equal"] == equal and row["equal_total"] == sum(equal) <= g["total"]
        assert all(len(c) == g["n_new"] for c in row["tokens"])
    assert g["bridge"]["equal_to_previous_token_alone"] <= g["bridge"]["of_after_the_first"] == (g["n_new"] - 1) * len(g["prompt_lengths"])


@pytest.mark.parametrize("family", sorted(bc.FAMILIES))
def test_committed_helpers_and_edits_are_well_formed(family):
    f = RESULTS["families"][family]
    for tool in bc.TOOLS:
        assert set(f["cache_helpers"][tool]) == set(bc.HELPERS)
        for row in f["cache_helpers"][tool].values():
            assert row["ran"] != ("error" in row)
    edit = f["state_edit"]
    assert edit["reference_split_vs_full_forward"] <= 1e-4 < edit["reference_change"]  # the reference is sound, the edit visible
    for row in edit["tools"].values():
        assert row["carried"] == (row["hook_fired"] and row["max_abs_diff_to_reference"] <= bc.CARRY_TOLERANCE)


@pytest.fixture(name="fresh", scope="module")
def fresh_fixture(tmp_path_factory):
    pytest.importorskip("transformer_lens.model_bridge", reason="this TransformerLens has no TransformerBridge")
    torch.set_num_threads(1)
    return {family: bc.compare(family, tmp_path_factory.mktemp(family)) for family in bc.FAMILIES}


@pytest.mark.parametrize("family", sorted(bc.FAMILIES))
def test_ours_generates_as_transformers_and_carries_state_edits(fresh, family):
    f = fresh[family]
    assert f["generation"]["hooked_gdn"]["equal_total"] == f["generation"]["total"]
    assert f["logit_max_abs_diff"]["hooked_gdn"] <= 1e-4
    ours = f["state_edit"]["tools"]["hooked_gdn"]
    assert ours["carried"] and ours["change_up_to_t"] <= 1e-4  # the edit leaves the read at t alone, as designed
    for helper in ("decompose_resid", "get_full_resid_decomposition"):
        assert f["cache_helpers"]["hooked_gdn"][helper]["check"]["max_abs_diff"] <= 1e-5, helper


@pytest.mark.parametrize("family", sorted(bc.FAMILIES))
def test_a_fresh_run_finds_what_the_file_says(fresh, family):
    """Same seed, same checkpoints: the token counts, which helpers run and which edits are carried reproduce."""
    f, committed = fresh[family], RESULTS["families"][family]
    for tool in (*bc.TOOLS, "bridge_no_kv_cache"):
        assert f["generation"][tool]["equal"] == committed["generation"][tool]["equal"], tool
    for tool in bc.TOOLS:
        assert {h: r["ran"] for h, r in f["cache_helpers"][tool].items()} == \
               {h: r["ran"] for h, r in committed["cache_helpers"][tool].items()}, tool
        assert f["state_edit"]["tools"][tool]["carried"] == committed["state_edit"]["tools"][tool]["carried"], tool


def test_the_tables_render_every_family():
    table = bc.comparison_table(RESULTS)
    assert table.count("\n") == 9 and "| greedy `generate`" in table
    block = bc.results_block(RESULTS)
    assert sum(line.startswith("| ") and "| `decompose_resid` |" in line for line in block.splitlines()) == len(bc.FAMILIES)
    assert bc.results_block(None).startswith("Not yet run")
