"""Output folders (``--out``, ``TrainConfig.out_dir``): the tool writes only what it created there.

Each output folder holds a manifest, ``writesae-outputs.json``, listing the names the tool has
created in it. Before any work, `claim_outputs` checks every name a command is about to write:
a name is the tool's to replace when the manifest lists it, or when nothing by that name exists
yet (it is then added to the manifest first). Anything else in the way, a user's own
``metrics.jsonl`` or ``checkpoint/``, is refused with its path, and nothing in the folder is
touched. Other files in the folder are never read, moved or deleted.

Every file is written through `hooked_gdn.files.atomic_file` (whole or not at all, never through a
link), and a folder the tool writes into (`output_subfolder`) must be a real folder, not a link to
one elsewhere. A command that writes a folder over several steps holds `output_lock` on it while it
does, so that a second run on the same folder is refused, naming the first, instead of racing it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hooked_gdn.files import atomic_file, exclusive_lock, refuse_link, remove_stale_temporaries

from . import __version__

MANIFEST = "writesae-outputs.json"
LOCK = ".writesae.lock"  # held (and present) only while a command writes the folder: `output_lock`


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
        with atomic_file(manifest) as f:
            f.write(json.dumps({"writesae_version": __version__, "created": sorted(owned | set(names))}, indent=2) + "\n")
    return folder


def output_subfolder(folder: str | Path, name: str) -> Path:
    """The folder ``name`` inside ``folder`` (created if needed), refused if it is a link (to a folder
    elsewhere, which writing into would change) or not a folder; stale temporaries of killed runs
    in it are removed (`hooked_gdn.files.remove_stale_temporaries`: only those)."""
    path = Path(folder) / name
    refuse_link(path)
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder; nothing was changed: move it away or "
                                 f"choose another output folder")
    path.mkdir(exist_ok=True)
    remove_stale_temporaries(path)
    return path


@contextmanager
def output_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold the lock of the output ``folder`` for the block (its `LOCK` file, which the folder's
    manifest must list: pass it to `claim_outputs`), or raise `BlockingIOError` naming the process
    that holds it. The lock is released when the block ends or the process dies, however it dies."""
    with exclusive_lock(Path(folder) / LOCK, f"the output folder {folder} ({command})") as path:
        yield path


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
