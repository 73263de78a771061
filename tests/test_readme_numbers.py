"""Every generated block of README.md equals what ``demos/readme.py`` renders from the committed results."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("demos_readme", ROOT / "demos" / "readme.py")
readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme)

BLOCKS = readme.blocks((ROOT / "README.md").read_text())
# the experiments whose README numbers must come from committed results
EXPECTED = {"ablation", "substitution", "logit_shift", "install", "shipped_saes", "compare_architectures",
            "compare_architectures/longer"}


def test_the_experiments_have_generated_blocks():
    assert EXPECTED <= set(BLOCKS), f"README.md lacks generated blocks for {sorted(EXPECTED - set(BLOCKS))}"


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_equals_its_committed_results(name):
    assert BLOCKS[name] == readme.render(name), f"run: python demos/readme.py (block {name!r} is stale)"


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_results_name_what_produced_them(name):
    provenance = json.loads(readme.results_file(name).read_text())["provenance"]
    assert {"command", "seed", "model"} <= set(provenance)
    assert provenance["command"].startswith("python ")

