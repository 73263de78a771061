"""Every generated block of README.md equals what ``python -m demos.readme`` renders from the committed results."""

import json
from pathlib import Path

import pytest

from demos import readme
from hooked_gdn.files import file_sha256
from hooked_gdn.pretrained import pretrained_path

ROOT = Path(__file__).parents[1]

BLOCKS = readme.blocks((ROOT / "README.md").read_text())
# the experiments whose README numbers must come from committed results
EXPECTED = {"quickstart", "ablation", "substitution", "logit_shift", "install", "shipped_saes", "compare_architectures"}


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
