"""The README's experiment numbers, generated from the committed results.

    python -m demos.readme           # rewrite every generated block of README.md from demos/results/
    python -m demos.readme --check   # exit 1 and name the blocks that differ

A generated block in README.md is delimited by ``<!-- results: NAME -->`` and ``<!-- /results: NAME -->``.
Its text is ``readme_block(results)`` of the demo module ``demos/NAME.py``, applied to that demo's committed
``demos/results/NAME/results.json`` (or the module's ``RESULTS_JSON``, a path relative to the repository).
A block ``NAME/VARIANT`` renders ``demos/results/NAME/VARIANT/results.json``, a run of the same demo with
other flags, through the same ``readme_block``.
So every number in a block is traceable to one file, whose ``provenance`` names the command, seed, model and
SAE that produced it; ``tests/test_readme_numbers.py`` checks that the README and the files agree.

A block ``<!-- generated: NAME -->`` … ``<!-- /generated: NAME -->`` is the text of a function of the library
(``GENERATED``), such as the capability matrix that ``tests/test_capabilities.py`` runs cell by cell, or of a
benchmark's committed results on checkpoints other than the shipped ones (the comparison with TransformerLens'
bridge, ``benchmarks/bridge_comparison.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+(?:/[\w-]+)?) -->\n)(?P<body>.*?)(<!-- /results: (?P=name) -->)", re.S)
GENERATED_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated: (?P=name) -->)", re.S)


def _capability_table() -> str:
    from hooked_gdn.capabilities import capability_table

    return capability_table()


def _shipped_models_table() -> str:
    from hooked_gdn.pretrained import shipped_models_table

    return shipped_models_table()


def _bridge_comparison_table() -> str:
    """The comparison with TransformerLens' bridge, from the committed results of benchmarks/bridge_comparison.py
    (measured on tiny random checkpoints, not the shipped models, so it is not a ``results:`` block)."""
    from benchmarks import bridge_comparison

    return bridge_comparison.comparison_table(json.loads(bridge_comparison.RESULTS_JSON.read_text()))


def _benchmark_summary() -> str:
    from benchmarks.results_md import readme_summary

    return readme_summary()


#: generated blocks that are not results: name -> what renders them
GENERATED = {"capabilities": _capability_table, "shipped_models": _shipped_models_table,
             "bridge_comparison": _bridge_comparison_table, "benchmark_summary": _benchmark_summary}


def renderer_module(package: str, name: str, renderer: str, block: str):
    """The module ``package.name`` that renders a generated block with its function ``renderer`` (refused,
    naming ``block``, when there is no such module or function)."""
    path = ROOT / package / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{block} has no module {path}")
    module = importlib.import_module(f"{package}.{name}")
    if not hasattr(module, renderer):
        raise AttributeError(f"{path} has no {renderer}(results) for {block}")
    return module


def _demo_module(name: str):
    return renderer_module("demos", name, "readme_block", f"README block {name!r}")


def results_file(name: str, module=None) -> Path:
    if "/" in name:  # a variant: its own folder under the demo's
        return ROOT / "demos" / "results" / name / "results.json"
    module = module or _demo_module(name)
    return ROOT / getattr(module, "RESULTS_JSON", f"demos/results/{name}/results.json")


def render(name: str) -> str:
    """The block ``name``'s text, from its committed results."""
    module = _demo_module(name.split("/")[0])
    results = json.loads(results_file(name, module).read_text())
    return module.readme_block(results).rstrip("\n") + "\n"


def render_generated(name: str) -> str:
    if name not in GENERATED:
        raise KeyError(f"README block 'generated: {name}' has no renderer; the generated blocks are {sorted(GENERATED)}")
    return GENERATED[name]().rstrip("\n") + "\n"


def blocks(text: str, pattern: re.Pattern = BLOCK) -> dict[str, str]:
    """The blocks of a README text (results blocks, or ``GENERATED_BLOCK``): name -> body."""
    found: dict[str, str] = {}
    for match in pattern.finditer(text):
        if match["name"] in found:
            raise ValueError(f"README has two blocks named {match['name']!r}")
        found[match["name"]] = match["body"]
    return found


def main() -> None:
    if __spec__ is None:  # run by path (python demos/readme.py): the package is importable only as a module from the root
        sys.exit(subprocess.run([sys.executable, "-m", "demos.readme", *sys.argv[1:]], cwd=ROOT).returncode)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a block differs")
    args = parser.parse_args()
    text = README.read_text()
    stale = [name for name, body in blocks(text).items() if render(name) != body]
    stale_generated = [name for name, body in blocks(text, GENERATED_BLOCK).items() if render_generated(name) != body]
    if args.check:
        for name in stale:
            print(f"README block {name!r} differs from {results_file(name).relative_to(ROOT)}")
        for name in stale_generated:
            print(f"README block {name!r} differs from what {GENERATED[name].__name__} renders")
        sys.exit(1 if stale or stale_generated else 0)
    stale += stale_generated
    new = BLOCK.sub(lambda m: m[1] + render(m["name"]) + m[4], text)
    new = GENERATED_BLOCK.sub(lambda m: m[1] + render_generated(m["name"]) + m[4], new)
    README.write_text(new)
    print(f"rewrote {len(stale)} block(s): {', '.join(stale) or 'none changed'}")


if __name__ == "__main__":
    main()
