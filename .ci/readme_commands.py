"""Run what the README tells a new user to run, exactly as written: its install lines, then its two commands.

The README's first ```bash block under "## Install" and the first under "## The two commands" become
one bash script (``set -euxo pipefail``), run in the repository root, so that a fresh environment is
built by the README's own lines and the main job and the tests run in it. CI runs this (``.ci/run``);
so can anyone: ``python .ci/readme_commands.py`` (``--print`` shows the script instead).

``PIP_RETRIES=0``: CI reaches PyPI only, so the PyTorch CPU index that the install line adds is
unreachable there; without retries pip gives it up at once and takes the same CPU build from the
machine's local wheel.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Install", "## The two commands")


def bash_block(readme: str, heading: str) -> str:
    """The first ```bash block after ``heading`` (a line of its own) and before the next ``## `` heading."""
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    if match is None:
        raise SystemExit(f"README.md has no {heading!r} section")
    block = re.search(r"^```bash\n(.*?)^```", match.group(1), re.M | re.S)
    if block is None:
        raise SystemExit(f"README.md's {heading!r} section has no ```bash block")
    return block.group(1)


def readme_script(readme: str) -> str:
    return "set -euxo pipefail\n" + "".join(f"# {heading}\n{bash_block(readme, heading)}" for heading in SECTIONS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the script instead of running it")
    args = parser.parse_args()
    script = readme_script((ROOT / "README.md").read_text(encoding="utf-8"))
    if args.print:
        print(script, end="")
        return 0
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=os.environ | {"PIP_RETRIES": "0"}).returncode


if __name__ == "__main__":
    sys.exit(main())
