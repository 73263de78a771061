"""What every demo shares: the shipped model, the shipped SAE, held-out passages, atomic outputs.

Each demo runs on `gdn-austen` with the shipped SAE ``--sae gdn-austen/L5-state`` (any shipped name,
see ``writesae.io.pretrained_saes()``, or an SAE folder; ``quickstart-out/sae`` is trained by
``writesae quickstart`` first, in about 2.5 minutes, when it does not exist yet), on held-out
passages (Persuasion 21–24, unseen by model and SAE), and writes a results JSON and plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path

import torch

from benchmarks.provenance import load_average
from hooked_gdn.files import atomic_file, file_sha256
from hooked_gdn.pretrained import heldout_windows
from hooked_gdn.sites import parse_site
from writesae import load_sae
from writesae.quickstart import run_quickstart
from writesae.splice import HookedSAEGatedDeltaNet


#: the load averages when the demo that imported this module started, before its own work added to them: its
#: results file says whether its wall time was taken on an idle machine (`benchmarks.provenance.ran_idle`)
LOAD_AT_START = load_average()

DEFAULT_SAE = "gdn-austen/L5-state"
QUICKSTART_SAE = Path("quickstart-out/sae")


def demo_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", default=DEFAULT_SAE, help="a shipped SAE's name or an SAE folder, on a GDN layer's states")
    parser.add_argument("--passages", type=int, default=8, help="held-out passages")
    parser.add_argument("--context", type=int, default=64, help="tokens per passage")
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_model_and_sae(sae: str | Path):
    """The shipped model (with SAE splicing) and the SAE ``sae`` (a shipped name or a folder);
    ``quickstart-out/sae`` is trained by the quickstart if absent."""
    if Path(sae) == QUICKSTART_SAE and not (QUICKSTART_SAE / "cfg.json").exists():
        print(f"{sae} does not exist: training it with the quickstart first")
        run_quickstart(QUICKSTART_SAE.parent)
    model = HookedSAEGatedDeltaNet.from_pretrained("gdn-austen").eval()
    return model, load_sae(sae).eval()


def heldout_passages(model, n: int, context: int) -> torch.Tensor:
    """The first ``n`` held-out windows [n, context] (Persuasion 21–24, joined with EOS), as the model card's."""
    return heldout_windows(model.tokenizer, context)[:n]


def sae_layer(sae) -> int:
    return parse_site(sae.cfg.site).layer


def memory_groups(layer: int, heads, model_name: str = "gdn-austen") -> dict:
    """``heads`` of GDN ``layer`` split by the shipped census (median half-life ≥ 16 tokens: "long",
    else "short"), with each head's median half-life in tokens and whether its decay is fixed or learned
    (``HeadCensus.decay_kind``)."""
    from hooked_gdn.census import LONG_MEMORY, MemoryCensus
    from hooked_gdn.pretrained import CENSUS_FILE, PRETRAINED_MODELS

    census = MemoryCensus.load_json(PRETRAINED_MODELS[model_name] / CENSUS_FILE)
    half_life = {h: census.head(layer, h).half_life[1] for h in heads}
    return {"long": [h for h in heads if half_life[h] >= LONG_MEMORY],
            "short": [h for h in heads if half_life[h] < LONG_MEMORY],
            "half_life": half_life, "min_half_life": LONG_MEMORY,
            "decay": {h: census.head(layer, h).decay_kind for h in heads}}



def decay_kinds(layer: int, heads, model_name: str = "gdn-austen") -> dict:
    """``heads`` of GDN ``layer`` by the shipped census's decay kind (each of ``DECAY_KINDS``, from
    ``HeadCensus.decay_kind``), with each head's median half-life in tokens."""
    from hooked_gdn.census import DECAY_KINDS

    groups = memory_groups(layer, heads, model_name)
    return {kind: [h for h in heads if groups["decay"][h] == kind] for kind in DECAY_KINDS} \
        | {"half_life": groups["half_life"]}


def write_json(path: Path, results: dict) -> None:
    """Write a results file whole or not at all; one with a ``provenance`` records the load average at its end."""
    if isinstance(results.get("provenance"), dict):
        results["provenance"]["load_average_after"] = load_average()
    with atomic_file(path) as f:
        f.write(json.dumps(results, indent=2, default=float) + "\n")


def command_line() -> str:
    """The command as run: ``python -m demos.NAME ARGS`` for a demo run as a module (as the README runs them),
    ``python PROGRAM ARGS`` otherwise."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None and spec.name != "__main__" else sys.argv[:1]
    return shlex.join(["python", *program, *sys.argv[1:]])


_SCRIPT_COMMAND = re.compile(r"^python (demos|scripts|benchmarks)/(\w+)\.py(?= |$)")


def run_now(command: str) -> str:
    """A recorded command as it is run today. Results recorded before ``demos``, ``scripts`` and ``benchmarks``
    became packages name their script by path (``python demos/quickstart.py --steps 600``); that program is run
    now as a module (``python -m demos.quickstart --steps 600``), with the same arguments. The results files keep
    what they recorded; the README shows the command that works."""
    return _SCRIPT_COMMAND.sub(r"python -m \1.\2", command)


def provenance(seed: int, model: str = "gdn-austen", sae: str | None = None, **inputs) -> dict:
    """What produced a result: the command line as run, the seed, the CPU threads torch used (and the machine's
    CPUs and load average when the program started), the model and
    SAE (names and the SHA-256 of their weights) and the inputs (passages, context, ...). Every demo's
    results.json carries it."""
    from hooked_gdn.pretrained import pretrained_path

    record = {"command": command_line(), "seed": seed, "model": model,
              "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average_before": LOAD_AT_START}
    model_folder = pretrained_path(model)
    if model_folder is not None:
        record["model_sha256"] = file_sha256(model_folder / "model.safetensors")
    if sae is not None:
        from writesae.io import resolve_sae, WEIGHTS_FILE

        record["sae"] = str(sae)
        record["sae_sha256"] = file_sha256(resolve_sae(sae) / WEIGHTS_FILE)
    record["inputs"] = inputs
    return record


def wall_time(results: dict) -> str:
    """"N min (or s) wall time at T CPU threads, load average A at the start and B at the end", from a results
    file's ``seconds`` and provenance (files from before the load was recorded omit it)."""
    return took(results["seconds"]) + run_conditions(results["provenance"])


def took(seconds: float) -> str:
    return f"{round(seconds)} s wall time" if seconds < 90 else f"{round(seconds / 60)} min wall time"


def run_conditions(record: dict) -> str:
    """" at T CPU threads, load average A at the start and B at the end" from a demo's provenance."""
    threads = record.get("cpu_threads")
    said = f" at {threads} CPU thread{'s' if threads != 1 else ''}" if threads else ""
    if "load_average_after" in record:
        said += (f", load average {record['load_average_before'][0]:.1f} at the start and "
                 f"{record['load_average_after'][0]:.1f} at the end on {record['cpu_count']} CPUs")
    return said


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
