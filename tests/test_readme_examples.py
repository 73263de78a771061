"""Every ```python block of README.md runs as pasted, in order, in one fresh Python process.

A reader pastes the blocks into one session in the order they appear, so here too they share one
namespace, and a block may use what an earlier one defined. They run in a subprocess (this process
has set torch's threads and imported the test helpers), in a temporary working directory (blocks
write files) and offline (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``): every block must run on what
the package ships. A block that cannot, because it needs the hub or a GPU, is marked in the README by
the line just before its fence,

    <!-- readme-example: skip (REASON) -->

and is reported as skipped with that reason. ``<!-- readme-example: NAME -->`` only names a block
(other tests find it by its name). ```bash blocks are not run here: the commands have their own tests.

There is one test per block (its id: the README line where its code starts, and its section), all
fed by the one run: a block's test fails with its traceback, whose line numbers are README.md's, and
the blocks after a failing one fail as not reached.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
MARKER = re.compile(r"<!-- readme-example: (.+) -->")
SKIP = re.compile(r"skip \((.+)\)")
RUN_TIMEOUT_S = 600  # the blocks take about 35 s on 2 idle CPU cores


@dataclass(frozen=True)
class Block:
    line: int  # README line of the block's first line of code
    code: str
    section: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"line {self.line} ({self.section})"


def readme_python_blocks(text: str) -> list[Block]:
    """The ```python blocks of a README, in order, each with its marker's skip reason if any."""
    lines, blocks, section, i = text.splitlines(), [], "top", 0
    while i < len(lines):
        if lines[i].startswith("#"):  # a heading, shortened for test ids: "Mamba-2 (`…`)" -> "Mamba-2"
            section = re.split(r" \(|:", lines[i].lstrip("#").strip())[0]
        elif lines[i].startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise ValueError(f"README line {i + 1}: a code fence that is never closed")
            if lines[i].strip() == "```python":
                marker = MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
                label = marker.group(1) if marker else ""
                skip = SKIP.fullmatch(label)
                if label.startswith("skip") and not skip:
                    raise ValueError(f"README line {i}: write a skipped block's marker as "
                                     f"'<!-- readme-example: skip (REASON) -->', got {lines[i - 1]!r}")
                blocks.append(Block(i + 2, "\n".join(lines[i + 1:end]) + "\n", section, skip.group(1) if skip else None))
            i = end
        i += 1
    return blocks


BLOCKS = readme_python_blocks(README.read_text(encoding="utf-8"))


def run_blocks(blocks_file: str, results_file: str) -> None:
    """Run the blocks in one namespace, in order, stopping at the first failure; after each block,
    record its outcome in ``results_file`` (so a run killed by the timeout still tells how far it got)."""
    namespace: dict = {"__name__": "__main__"}
    results = []
    for block in [Block(**b) for b in json.loads(Path(blocks_file).read_text())]:
        print(f"--- README block at line {block.line} ({block.section})", flush=True)
        start = time.perf_counter()
        try:
            # padded with blank lines so that tracebacks give README.md's line numbers
            exec(compile("\n" * (block.line - 1) + block.code, str(README), "exec"), namespace)
            error = None
        except BaseException as exception:  # the traceback from the block's frame on: this runner's frame says nothing
            error = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__.tb_next))
        results.append({"line": block.line, "seconds": round(time.perf_counter() - start, 1), "error": error})
        Path(results_file).write_text(json.dumps(results))
        if error is not None:
            break


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> dict:
    """One run of every block that is not skipped; returns each block's outcome by line, and the run's output."""
    work = tmp_path_factory.mktemp("readme")
    blocks_file, results_file, output_file = work / "blocks.json", work / "results.json", work / "output.txt"
    blocks_file.write_text(json.dumps([asdict(b) for b in BLOCKS if b.skip_reason is None]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(README.parent), os.environ.get("PYTHONPATH")]))}
    cwd = work / "cwd"
    cwd.mkdir()
    start = time.perf_counter()
    with output_file.open("w") as output:
        try:
            subprocess.run([sys.executable, __file__, str(blocks_file), str(results_file)], cwd=cwd, env=env,
                           stdout=output, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
            stopped = None
        except subprocess.TimeoutExpired:
            stopped = f"the run was stopped after {RUN_TIMEOUT_S} s"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    print(f"README blocks: {time.perf_counter() - start:.0f} s; per block: "
          + ", ".join(f"line {r['line']} {r['seconds']} s" for r in results))
    return {"by_line": {r["line"]: r for r in results}, "stopped": stopped,
            "output": output_file.read_text(errors="replace")[-4000:]}


@pytest.mark.parametrize("block", [
    pytest.param(b, id=b.id, marks=[] if b.skip_reason else [pytest.mark.slow]) for b in BLOCKS])
def test_readme_block_runs_as_pasted(block, request):
    if block.skip_reason:
        pytest.skip(f"README line {block.line}: {block.skip_reason}")
    run = request.getfixturevalue("readme_run")
    result = run["by_line"].get(block.line)
    if result is None:
        failed = [line for line, r in run["by_line"].items() if r["error"] is not None]
        if failed:
            pytest.fail(f"README block at line {block.line} was not reached: the block at line {failed[0]} failed",
                        pytrace=False)
        reason = run["stopped"] or "the process died"
        pytest.fail(f"README block at line {block.line} was not reached: {reason}. The run's output ends:\n{run['output']}",
                    pytrace=False)
    if result["error"] is not None:
        pytest.fail(f"README block at line {block.line} failed:\n{result['error']}", pytrace=False)


def test_the_readme_has_python_blocks_to_run():
    assert sum(b.skip_reason is None for b in BLOCKS) >= 5, "the README's ```python blocks were not found"


if __name__ == "__main__":
    run_blocks(*sys.argv[1:])
