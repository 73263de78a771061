"""docs/design.md is the design the code cites: every "docs/design.md §N" in the repository's Python and
Markdown files names a section the page has, the page's own "§N" cross-references resolve, and no file
cites the design notes that used to live outside the repository."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
DESIGN_PAGE = ROOT / "docs" / "design.md"

HEADING = re.compile(r"^#{2,4} §(\d+(?:\.\d+)*)(?=\s)", re.MULTILINE)
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
# "docs/design.md §2", "docs/design.md §8.4", "docs/design.md §2, §6" or "docs/design.md §2 and §6"
CITATION = re.compile(r"docs/design\.md((?:(?:\s*,\s*|\s+and\s+|\s+or\s+|\s+)§\d+(?:\.\d+)*)+)")
# the old outside file, by its file name (upper-case, .md) or as an upper-case name followed by a section sign
OUTSIDE = re.compile(r"\bDESIGN(?:\.md\b|\s*§)")
SKIPPED_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", "node_modules"}


def repository_files() -> list[Path]:
    """The repository's .py and .md files: tracked or untracked but not ignored (git), else a walk that
    skips hidden, virtual-environment and build folders."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.py", "*.md"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.splitlines()
        return sorted(ROOT / name for name in listed if (ROOT / name).is_file())
    except (OSError, subprocess.CalledProcessError):
        return sorted(
            path for path in ROOT.rglob("*")
            if path.suffix in (".py", ".md") and path.is_file()
            and not any(part in SKIPPED_DIRS or part.startswith(".") or part.endswith(".egg-info")
                        for part in path.relative_to(ROOT).parts[:-1])
        )


def sections() -> list[str]:
    return HEADING.findall(DESIGN_PAGE.read_text(encoding="utf-8"))


def citations(text: str) -> list[tuple[int, str]]:
    """(line, section) of every "docs/design.md §N" in ``text``."""
    found = []
    for match in CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found += [(line, section) for section in SECTION.findall(match.group(1))]
    return found


def test_the_design_page_has_numbered_sections_each_once():
    numbered = sections()
    assert len(numbered) >= 10, f"docs/design.md has only {numbered} as numbered sections (## §N Title)"
    repeated = sorted({s for s in numbered if numbered.count(s) > 1})
    assert not repeated, f"docs/design.md numbers more than one section {repeated}"


def test_every_citation_of_the_design_page_names_one_of_its_sections():
    known = set(sections())
    files = repository_files()
    assert DESIGN_PAGE in files and Path(__file__).resolve() in {f.resolve() for f in files}
    cited, missing = 0, []
    for path in files:
        for line, section in citations(path.read_text(encoding="utf-8")):
            cited += 1
            if section not in known:
                missing.append(f"{path.relative_to(ROOT)}:{line} cites docs/design.md §{section}")
    assert cited >= 20, f"only {cited} citations of docs/design.md found: is the scan looking at the repository?"
    assert not missing, "citations of sections docs/design.md does not have:\n" + "\n".join(missing)


def test_the_design_pages_own_references_resolve():
    known = set(sections())
    text = DESIGN_PAGE.read_text(encoding="utf-8")
    missing = [f"docs/design.md:{text.count(chr(10), 0, m.start()) + 1} refers to §{m.group(1)}"
               for m in SECTION.finditer(text) if m.group(1) not in known]
    assert not missing, "\n".join(missing)


def test_nothing_cites_the_design_notes_outside_the_repository():
    outside = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
               for path in repository_files()
               for text in [path.read_text(encoding="utf-8")]
               for m in OUTSIDE.finditer(text)]
    assert not outside, "cite docs/design.md §N instead of the design notes outside the repository:\n" + "\n".join(outside)
