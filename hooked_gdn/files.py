"""Files written whole or not at all: a temporary file beside the target, fsynced, then renamed over it."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path, mode: str = "w"):
    """Yield a file open for writing; when the block succeeds it replaces ``path``, with the
    permissions the umask allows. A reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes: what results record to name the exact weights that produced them."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
