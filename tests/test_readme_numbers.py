"""Every generated block of README.md equals what ``python -m demos.readme`` renders from the committed results."""

import json
from pathlib import Path

import pytest

from demos import readme
from benchmarks.provenance import ran_idle
from demos import common
from hooked_gdn.files import file_sha256
from hooked_gdn.pretrained import pretrained_path

ROOT = Path(__file__).parents[1]

BLOCKS = readme.blocks((ROOT / "README.md").read_text())
# the experiments whose README numbers must come from committed results
EXPECTED = {"quickstart", "ablation", "substitution", "logit_shift", "install", "shipped_saes", "compare_architectures"}
#: the write-site studies, each rerun from a clean checkout on an idle machine with its wall time and threads recorded
TIMED_STUDIES = {"substitution", "install", "logit_shift", "memory_attribution", "compare_architectures", "dashboard"}


GENERATED = readme.blocks((ROOT / "README.md").read_text(), readme.GENERATED_BLOCK)


def test_the_capability_matrix_is_in_the_readme_as_the_suite_declares_it():
    assert set(GENERATED) == set(readme.GENERATED)
    for name, body in GENERATED.items():
        assert body == readme.render_generated(name), f"run: python -m demos.readme (block {name!r} is stale)"


def test_the_experiments_have_generated_blocks():
    assert EXPECTED <= set(BLOCKS), f"README.md lacks generated blocks for {sorted(EXPECTED - set(BLOCKS))}"


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_equals_its_committed_results(name):
    assert BLOCKS[name] == readme.render(name), f"run: python -m demos.readme (block {name!r} is stale)"


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_results_name_what_produced_them(name):
    provenance = json.loads(readme.results_file(name).read_text())["provenance"]
    assert {"command", "seed", "model"} <= set(provenance)
    assert provenance["command"].startswith("python ")



@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_results_come_from_the_shipped_weights(name):
    """A result made with other weights than the ones shipped (an earlier training, say) is stale: its
    figures would not reproduce. (The quickstart's clean CE once differed in the fourth digit for that.)"""
    provenance = json.loads(readme.results_file(name).read_text())["provenance"]
    folder = pretrained_path(provenance["model"])
    assert folder is not None, f"{name}: {provenance['model']!r} is not a shipped model"
    assert provenance["model_sha256"] == file_sha256(folder / "model.safetensors"), f"{name}: rerun its demo on the shipped model"


@pytest.mark.parametrize("name", sorted(TIMED_STUDIES))
def test_the_studies_were_timed_on_an_idle_machine(name):
    results = json.loads(readme.results_file(name).read_text())
    record = results["provenance"]
    seconds = sum(results["elapsed"].values()) if "elapsed" in results else results["seconds"]
    assert seconds > 0 and record["cpu_threads"] >= 1
    assert ran_idle(record["load_average_before"][0], record["load_average_after"][0], record["cpu_threads"]), \
        f"{name}: rerun {record['command']} on an idle machine"


def test_a_results_file_records_the_load_around_its_run(tmp_path, monkeypatch):
    results = {"provenance": common.provenance(0, passages=1), "seconds": 95}
    monkeypatch.setattr("os.getloadavg", lambda: (2.5, 1.0, 0.5))
    common.write_json(tmp_path / "results.json", results)
    written = json.loads((tmp_path / "results.json").read_text())
    record = written["provenance"]
    assert record["load_average_after"] == [2.5, 1.0, 0.5] and len(record["load_average_before"]) == 3
    record["load_average_before"] = [0.25, 0.0, 0.0]
    assert common.wall_time(written).startswith(f"2 min wall time at {record['cpu_threads']} CPU thread")
    assert common.wall_time(written).endswith(f"load average 0.2 at the start and 2.5 at the end on {record['cpu_count']} CPUs")


@pytest.mark.parametrize("start, end, threads, idle", [(0.3, 2.9, 2, True), (1.2, 2.0, 2, False), (0.3, 3.1, 2, False),
                                                       (0.9, 1.5, 1, True), (0.1, 2.0, 1, False)])
def test_an_idle_run_leaves_under_one_cpu_to_others_before_and_at_its_end(start, end, threads, idle):
    assert ran_idle(start, end, threads) is idle
