"""Files written whole or not at all: a temporary file beside the target, fsynced, then renamed over it.

The owner of every write the tools make, and of the names those writes leave while in flight:

- `atomic_file` writes a file whole or not at all, and never through a symbolic link (it refuses a
  target that is one: the tools create no links, so a link there is someone else's).
- Its temporary file is named ``.NAME.tmp-HOST-PID-XXXXXXXX`` (`temporary_prefix`): the writing
  process's host and id and a random part. `remove_stale_temporaries` removes only such files, and
  only those of a process of this host that is no longer alive; any other file, a user's
  ``.gitkeep`` or ``.ipynb_checkpoints/``, or another live run's temporary, is left alone.
- `exclusive_lock` refuses a second process the same lock file, naming the process that holds it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

_TEMPORARY = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_]*)-(?P<pid>[0-9]+)-[A-Za-z0-9_]{8}$")


def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _host() -> str:
    """This host's name as it appears in temporary names: letters, digits and underscores only."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40]


def temporary_prefix(name: str) -> str:
    """The start of the temporary names `atomic_file` gives this process's writes of ``name``;
    `tempfile.mkstemp` adds eight random characters."""
    return f".{name}.tmp-{_host()}-{os.getpid()}-"


def refuse_link(path: str | Path) -> None:
    """Raise `FileExistsError` naming ``path`` if it is a symbolic link: the tools create none, so a
    link in an output folder is someone else's, and writing through it would change a file elsewhere."""
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link (to {os.readlink(path)}), which writesae did not create; "
                              f"nothing was written through it: remove the link or choose another output folder")


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", **open_kw):
    """Yield a file open for writing; when the block succeeds it replaces ``path``, with the
    permissions the umask allows. A reader sees the old file or the whole new one, never a part.

    A ``path`` that is a symbolic link is refused before anything is written (`refuse_link`): the
    link is neither followed nor replaced. (A link planted between that check and the rename would
    be replaced, never written through: `os.replace` does not follow links.) The temporary file is
    named ``.NAME.tmp-HOST-PID-XXXXXXXX`` (`temporary_prefix`) and is removed if the block fails."""
    path = Path(path)
    refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files `atomic_file` left in ``folder`` when its process was killed, and
    return them: regular files named as its temporaries are (`temporary_prefix`) whose process, on
    this host, is no longer alive. Nothing else is touched: not a user's dotfile or folder, not a
    link, not a live process's temporary, not one written from another host."""
    removed = []
    for entry in os.scandir(folder):
        match = _TEMPORARY.match(entry.name)
        if (match and match["host"] == _host() and entry.is_file(follow_symlinks=False)
                and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))):
            os.remove(entry.path)
            removed.append(Path(entry.path))
    return removed


@contextmanager
def exclusive_lock(path: str | Path, what: str):
    """Hold an exclusive lock on the file ``path`` (an ``flock``, which the system releases when the
    process ends, however it ends) for the block, or raise `BlockingIOError` naming the process that
    holds it; ``what`` names the thing locked in that message. The lock file holds the holder's pid
    and is removed when the block ends. A link at ``path`` is refused, not followed."""
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as error:
            if error.errno == errno.ELOOP:
                refuse_link(path)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BlockingIOError(f"{what} is in use by another process (pid {holder}, lock file {path}): "
                                  f"wait for it to finish, or use another folder") from None
        try:  # the holder before us may have removed the file after we opened it: lock the one at path
            same = os.path.lexists(path) and os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        try:
            os.remove(path)  # while still holding it, so that no one locks a file about to vanish
        finally:
            os.close(fd)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB pieces (a cache shard or a checkpoint need not fit in
    memory twice): what results record to name the exact weights that produced them, and what a cache
    checks its shards against."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()
