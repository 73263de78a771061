"""Every measured number in the README's prose comes from a committed file, and says what that file says.

The generated blocks (``<!-- results: … -->``, ``<!-- generated: … -->``) are checked against their files by
``tests/test_readme_numbers.py``. This test covers the prose around them: each number that looks like a
measurement (a decimal, a percentage, a ratio ``N×``, a duration, a size) must lie inside a quote of
``tests/readme_sources.py``, which either reads the number from a committed results file (``Sourced``),
checks the sentence's claim against one (``Claim``), or says why the number is not a measurement
(``NotMeasured``: a version, a setting, a tolerance the tests assert, a citation, arithmetic shown in the
sentence). A number added to the README without a source fails here, and so does a source that moved.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from demos import readme
from tests.readme_sources import ENTRIES, Claim, Sourced, value_at

ROOT = Path(__file__).parents[1]

#: what reads as a measurement: a decimal, scientific notation, a percentage, a ratio, a duration or a size
MEASUREMENT = re.compile(
    r"(?<![\w.§-])(?:\d[\d,]*\.\d+(?:e[-+]?\d+)?|\d+(?:\.\d+)?e[-+]?\d+|\d[\d,]*(?=\s?%)|\d[\d,]*(?:\.\d+)?(?=\s?×)"
    r"|\d[\d,]*(?:\.\d+)?(?=\s?(?:s|ms|min|minutes|h|hours|CPU-minutes|MiB|GiB|KiB|MB|GB|G|M|B)\b))"
)


def readme_prose(text: str) -> str:
    """The README's prose on one line: without generated blocks, code, inline code, link targets and comments,
    whitespace collapsed (so a quote may span a line break)."""
    text = readme.BLOCK.sub(" ", text)
    text = readme.GENERATED_BLOCK.sub(" ", text)
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    return " ".join(text.split())


PROSE = readme_prose((ROOT / "README.md").read_text())


def _spans(quote: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(re.escape(quote), PROSE)]


def test_every_quote_is_in_the_readme():
    missing = [entry.quote for entry in ENTRIES if not _spans(entry.quote)]
    assert not missing, f"README.md no longer says (edit tests/readme_sources.py): {missing}"


def test_every_measured_number_has_a_source():
    covered = [span for entry in ENTRIES for span in _spans(entry.quote)]
    unsourced = [f"{m.group()!r} in …{PROSE[max(0, m.start() - 60):m.end() + 20]}…"
                 for m in MEASUREMENT.finditer(PROSE)
                 if not any(start <= m.start() and m.end() <= end for start, end in covered)]
    assert not unsourced, "numbers without a source (add them to tests/readme_sources.py):\n" + "\n".join(unsourced)


def _as_written(number: str) -> tuple[float, int]:
    """A number as the README writes it: its value and how many decimals it shows."""
    plain = number.replace(",", "").lstrip("−-")
    decimals = len(plain.split(".")[1]) if "." in plain and "e" not in plain else 0
    value = float(plain)
    return (-value if number[:1] in "−-" else value), decimals


@pytest.mark.parametrize("entry", [e for e in ENTRIES if isinstance(e, Sourced)], ids=lambda e: e.number)
def test_sourced_numbers_say_what_their_files_say(entry: Sourced):
    assert entry.number in entry.quote, f"{entry.number!r} is not in its quote {entry.quote!r}"
    value = entry.value(ROOT)
    written, decimals = _as_written(entry.number)
    assert round(value, decimals) == pytest.approx(written, abs=1e-9), (
        f"README says {entry.number} in {entry.quote!r}; {entry.file} gives {value}")


@pytest.mark.parametrize("entry", [e for e in ENTRIES if isinstance(e, Claim)], ids=lambda e: e.quote[:40])
def test_claims_hold_in_their_files(entry: Claim):
    assert entry.holds(ROOT), f"README claims {entry.quote!r}, which {entry.file} does not bear out"


def test_a_planted_wrong_number_is_caught():
    """The check compares at the README's precision: a value off in its last written digit fails."""
    assert round(3.72724, 4) == _as_written("3.7272")[0]
    assert round(3.72734, 4) != _as_written("3.7272")[0]
    assert value_at({"a": [{"b": 2.5}]}, "a/0/b") == 2.5
