"""benchmarks/RESULTS.md's generated sections, rendered from the committed results.

    python -m benchmarks.results_md           # rewrite every generated section of benchmarks/RESULTS.md
    python -m benchmarks.results_md --check   # exit 1 and name the sections that differ

A generated section is delimited by ``<!-- results: NAME -->`` and ``<!-- /results: NAME -->`` (the markers
of the README's blocks, demos/readme.py). Its text is ``results_block(results)`` of `benchmarks.NAME`,
applied to ``benchmarks/results/NAME.json`` (the module's ``RESULTS_JSON``), or to None while that file
does not exist (the benchmark has not been run: the section says so). Every number in a section is
thereby traceable to one file, whose ``provenance`` names the command, machine and versions;
``tests/test_benchmark_results.py`` checks that RESULTS.md and the files agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from demos.readme import BLOCK, blocks, renderer_module

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"


def _module(name: str):
    return renderer_module("benchmarks", name, "results_block", f"RESULTS.md section {name!r}")


def results_file(name: str, module=None) -> Path:
    module = module or _module(name)
    return Path(getattr(module, "RESULTS_JSON", HERE / "results" / f"{name}.json"))


def render(name: str) -> str:
    """Section ``name``'s text, from its committed results (or from None where there are none yet)."""
    module = _module(name)
    path = results_file(name, module)
    results = json.loads(path.read_text()) if path.exists() else None
    return module.results_block(results).rstrip("\n") + "\n"


def sections(text: str) -> dict[str, str]:
    """The generated sections of a RESULTS.md text: name -> body (the README's block syntax)."""
    return blocks(text)


def rewrite(text: str) -> str:
    return BLOCK.sub(lambda m: m[1] + render(m["name"]) + m[4], text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a section differs")
    args = parser.parse_args()
    text = RESULTS_MD.read_text()
    stale = [name for name, body in sections(text).items() if render(name) != body]
    if args.check:
        for name in stale:
            print(f"RESULTS.md section {name!r} differs from {results_file(name).relative_to(HERE.parent)}")
        sys.exit(1 if stale else 0)
    RESULTS_MD.write_text(rewrite(text))
    print(f"rewrote {len(stale)} section(s): {', '.join(stale) or 'none changed'}")


if __name__ == "__main__":
    main()
