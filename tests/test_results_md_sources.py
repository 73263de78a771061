"""benchmarks/RESULTS.md's prose copies no measured number: every figure is in a generated section.

The generated sections (``<!-- results: NAME -->``) are rendered from ``benchmarks/results/*.json`` and checked
against those files by ``tests/test_benchmark_results.py``. The prose around them explains and names rows (D1,
P2b); a number that reads as a measurement there (``tests/test_readme_sources.py``'s MEASUREMENT: a decimal, a
percentage, a ratio ``N×``, a duration, a size) goes stale when a benchmark is rerun, so each one must lie inside a
quote registered below, which says why it is no measurement (a version, a setting, a target, an assumption of a
computed estimate, a figure pinned to a commit). A hand-copied result fails here: generate it instead (the
benchmark module's ``results_block``) or name its row.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.results_md import RESULTS_MD
from tests.readme_sources import NotMeasured
from tests.test_readme_sources import MEASUREMENT, readme_prose

NOT_MEASURED = [
    NotMeasured("against TransformerLens 4.3's heuristic", "a version"),
    NotMeasured("TransformerLens 4.3's own per-token scan", "a version"),
    NotMeasured("## TransformerLens 4.3 bridge beside hooked_gdn", "a version"),
    NotMeasured("A ≥ 10× gap needs", "P2a's target (bench_engine's rows)"),
    NotMeasured("in 100 MB shards", "the benchmark's shard size (a setting)"),
    NotMeasured("1024-token context, 10M tokens of corpus", "the computed estimate's corpus (a setting)"),
    NotMeasured("on a machine with 64 GB of free RAM", "a hypothetical machine of the computed estimate"),
    NotMeasured("at RWKV-7 0.1B's sizes", "a model's name"),
    NotMeasured("against transformers 5.17, and the fault is 5.17's.", "versions"),
    NotMeasured("transformers 5.17's", "a version"),
    NotMeasured("5.25's (", "a version"),
    NotMeasured("against 5.25 to their fp32", "a version"),
]


def unregistered(prose: str, registry: list[NotMeasured]) -> list[str]:
    """Each number in ``prose`` that reads as a measurement and lies in no registered quote, with its context."""
    covered = [(m.start(), m.end()) for entry in registry for m in re.finditer(re.escape(entry.quote), prose)]
    return [f"{m.group()!r} in …{prose[max(0, m.start() - 60):m.end() + 20]}…" for m in MEASUREMENT.finditer(prose)
            if not any(start <= m.start() and m.end() <= end for start, end in covered)]


PROSE = readme_prose(RESULTS_MD.read_text())


def test_every_quote_is_in_results_md():
    missing = [entry.quote for entry in NOT_MEASURED if entry.quote not in PROSE]
    assert not missing, f"benchmarks/RESULTS.md no longer says (edit {Path(__file__).name}): {missing}"


def test_no_measured_number_is_copied_into_the_prose():
    found = unregistered(PROSE, NOT_MEASURED)
    assert not found, ("numbers in benchmarks/RESULTS.md's prose (generate them in the section's results_block, "
                       "name the row instead, or register a setting here):\n" + "\n".join(found))


def test_a_copied_number_is_caught():
    """A copy such as 'about 6× faster' or '(D2, 0.85)' in the prose fails; the same figure inside a generated
    section does not count."""
    planted = "The chunked form is about 6× faster (D1); with every state formed it is slower (D2, 0.85)."
    assert [m.split()[0] for m in unregistered(planted, NOT_MEASURED)] == ["'6'", "'0.85'"]
    block = "<!-- results: bench_dplr -->\n| 512 | D2 | 0.85 |\n<!-- /results: bench_dplr -->\n"
    assert unregistered(readme_prose(block), NOT_MEASURED) == []


def test_generated_readings_follow_the_ratios():
    """The sentences moved into the generated sections say what the ratios say, whichever side of 1 they fall."""
    from benchmarks import bench_dplr, bench_engine

    rows = lambda *ratios: [{"id": "D2", "T": T, "ratio": r} for T, r in zip((512, 2048), ratios)]
    faster, slower = "the chunked form is faster", "the chunked form is slower"
    assert bench_dplr._direction(rows(7.15, 4.87), "D2", faster, slower).startswith("The chunked form is faster at every T")
    assert bench_dplr._direction(rows(0.85, 0.9), "D2", faster, slower).startswith("The chunked form is slower at every T")
    assert bench_dplr._direction(rows(0.85, 1.5), "D2", faster, slower) == (
        "At T = 512, the chunked form is slower; at T = 2048, the chunked form is faster (D2: 0.85 at T = 512, "
        "1.50 at T = 2048).")
    assert bench_engine._meets(1.05, "≤ 1.05") and not bench_engine._meets(1.06, "≤ 1.05")
    assert bench_engine._meets(10.0, "≥ 10") and not bench_engine._meets(9.99, "≥ 10")
