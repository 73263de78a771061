"""Output folders (``--out``, ``TrainConfig.out_dir``): the tool writes only what it created there.

Each output folder holds a manifest, ``writesae-outputs.json``, listing the names the tool has
created in it. Before any work, `claim_outputs` checks every name a command is about to write:
a name is the tool's to replace when the manifest lists it, or when nothing by that name exists
yet (it is then added to the manifest first). Anything else in the way, a user's own
``metrics.jsonl`` or ``checkpoint/``, is refused with its path, and nothing in the folder is
touched. Other files in the folder are never read, moved or deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from . import __version__

MANIFEST = "writesae-outputs.json"


def claim_outputs(folder: str | Path, names: Iterable[str]) -> Path:
    """Make sure the tool may write ``names`` in ``folder`` (created if needed), and record them as its own."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise NotADirectoryError(f"the output folder {folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST
    owned = _owned(manifest)
    names = list(names)
    foreign = [folder / name for name in names if name not in owned and os.path.lexists(folder / name)]
    if foreign:
        raise FileExistsError(f"{foreign[0]} exists and was not created by writesae (it is not listed in {manifest}); "
                              f"nothing was changed: move it away or choose another output folder")
    if not owned.issuperset(names):
        tmp = manifest.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps({"writesae_version": __version__, "created": sorted(owned | set(names))}, indent=2) + "\n")
        os.replace(tmp, manifest)
    return folder


def _owned(manifest: Path) -> set[str]:
    """The names the manifest lists; none when there is no manifest yet."""
    if not os.path.lexists(manifest):
        return set()
    try:
        created = json.loads(manifest.read_text())["created"] if manifest.is_file() else None
    except (ValueError, KeyError, TypeError):
        created = None
    if not isinstance(created, list) or not all(isinstance(name, str) for name in created):
        raise FileExistsError(f"{manifest} exists and is not a writesae manifest; nothing was changed: "
                              f"choose another output folder")
    return set(created)
