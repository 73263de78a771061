"""SAEs on disk: a folder with ``cfg.json`` (every `SAEConfig` field plus ``writesae_version`` and
the weights file's SHA-256; the fields in `OPTIONAL_KEYS`, added later, may be absent) and
``sae_weights.safetensors`` (parameters and buffers, e.g. the BatchTopK threshold). No pickle.

Saving writes a temporary folder beside the target, fsyncs it and renames it into place, so a
reader never sees a half-written SAE, and files get the permissions the umask allows. Loading
refuses anything it would otherwise have to guess at: a cfg.json that is not a JSON object (or is
not a regular file of sane size), weights whose checksum, names, shapes or kinds (floating or
integer) differ from what the cfg says, and non-finite values.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from . import __version__
from .sae import ARCHITECTURES, SAEConfig, SAEBase

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
VERSION_KEY = "writesae_version"
CHECKSUM_KEY = "weights_sha256"
#: SAEConfig fields added after SAEs were first saved: a cfg.json without one gets the field's default
#: (model_fingerprint: None, an SAE that does not know the weights it was trained on)
OPTIONAL_KEYS = frozenset({"model_fingerprint"})
MAX_CFG_BYTES = 1 << 20  # a cfg.json is a few hundred bytes; a limit keeps a link to /dev/zero from hanging
#: SAEs shipped with the package, by name "MODEL/SITE" (e.g. "gdn-austen/L5-state"), each a folder here
PRETRAINED_SAES_DIR = Path(__file__).parent / "pretrained"


def pretrained_saes() -> list[str]:
    """The names of the shipped SAEs."""
    return sorted(str(cfg.parent.relative_to(PRETRAINED_SAES_DIR)) for cfg in PRETRAINED_SAES_DIR.glob(f"*/*/{CFG_FILE}"))


def resolve_sae(name_or_path: str | Path) -> Path:
    """The folder of a shipped SAE's name, or ``name_or_path`` itself. A shipped name that is also a
    different folder here is ambiguous, and refused rather than guessed."""
    path = Path(name_or_path)
    shipped = PRETRAINED_SAES_DIR / str(name_or_path)
    if str(name_or_path) in pretrained_saes():
        if path.exists() and path.resolve() != shipped.resolve():
            raise ValueError(f"{str(name_or_path)!r} names both a shipped SAE and {path.resolve()}: pass "
                             f"'./{name_or_path}' for the local one, or {shipped} for the shipped one")
        return shipped
    if not path.exists():
        raise FileNotFoundError(f"{name_or_path} is neither an SAE folder nor a shipped SAE "
                                f"(shipped: {', '.join(pretrained_saes()) or 'none'})")
    return path


def save_sae(sae: SAEBase, path: str | Path) -> None:
    """Write ``sae`` to the folder ``path``, replacing an SAE folder already there (and only that)."""
    path = Path(path)
    if path.exists() and not _is_sae_folder(path):
        raise FileExistsError(f"{path} exists and is not an SAE folder (only {CFG_FILE} and {WEIGHTS_FILE}); not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(path) as tmp:
        tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={VERSION_KEY: __version__})
        checksum = hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest()
        cfg = {**asdict(sae.cfg), VERSION_KEY: __version__, CHECKSUM_KEY: checksum}
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


@contextmanager
def atomic_folder(path: Path):
    """Yield a temporary folder beside ``path``; if the block succeeds, swap it in for ``path``.

    Before the renames the new tree gets the umask's permissions (a temporary folder is made 0700)
    and is fsynced, files and folders, so a renamed folder is complete even after a crash. A
    process killed between the two renames of a swap leaves no ``path``, the new folder as
    ``.{name}.new.*`` and the old one inside ``.{name}.old.*``: `recover_folder` puts the newest
    back.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new.", dir=path.parent))
    try:
        yield tmp
        _settle(tmp)
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            _fsync(path.parent)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
            _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def leftovers(path: Path) -> list[Path]:
    """The copies of ``path`` that an `atomic_folder` swap killed part-way left beside it."""
    return sorted(path.parent.glob(f".{path.name}.new.*")) + sorted(path.parent.glob(f".{path.name}.old.*"))


def recover_folder(path: Path, version: Callable[[Path], int | None]) -> Path | None:
    """Undo a swap killed part-way: put the newest complete copy of ``path`` in place, remove the rest.

    ``version(folder)`` ranks a complete folder (higher is newer) and is None for an incomplete one.
    Returns the leftover that replaced ``path``, or None when ``path`` was already the newest.
    """
    new = f".{path.name}.new."
    copies = [left if left.name.startswith(new) else left / path.name for left in leftovers(path)]
    ranked = [(v, c == path, c) for c in [path, *copies] if c.is_dir() and (v := version(c)) is not None]
    newest = max(ranked, key=lambda r: r[:2], default=(None, True, path))[2]
    if newest != path:
        with atomic_folder(path) as tmp:
            os.rmdir(tmp)
            os.replace(newest, tmp)
    for left in leftovers(path):
        shutil.rmtree(left)
    return None if newest == path else newest


def _settle(tree: Path) -> None:
    """Give ``tree`` the permissions the umask allows, and fsync every file and folder in it."""
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    for folder, _, files in os.walk(tree, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
            _fsync(os.path.join(folder, name))
        os.chmod(folder, 0o777 & ~umask)
        _fsync(folder)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_sae(path: str | Path, device: torch.device | str | None = None) -> SAEBase:
    """The SAE saved in the folder ``path`` (or shipped under that name, see `pretrained_saes`), of the
    class its cfg names, on ``device`` (default CPU)."""
    path = resolve_sae(path)
    cfg, checksum = _read_cfg(path / CFG_FILE)
    with torch.device("meta"):  # shapes only: the weights come from the file
        sae = ARCHITECTURES[cfg.architecture](cfg)
    expected = sae.state_dict()
    file = path / WEIGHTS_FILE
    data = _read_regular_file(file)
    if checksum is not None and hashlib.sha256(data).hexdigest() != checksum:
        raise ValueError(f"{file}: its SHA-256 differs from the one {path / CFG_FILE} recorded at saving: the file is corrupted")
    try:
        tensors = load_safetensors(data)
    except SafetensorError as error:
        raise ValueError(f"{file} is not a readable safetensors file: {error}") from error
    problems = [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    problems += [f"{name} has shape {list(tensors[name].shape)}, expected {list(t.shape)}"
                 for name, t in expected.items() if name in tensors and tensors[name].shape != t.shape]
    problems += [f"{name} has dtype {tensors[name].dtype}, expected {t.dtype}" for name, t in expected.items()
                 if name in tensors and tensors[name].dtype.is_floating_point != t.dtype.is_floating_point]
    if problems:
        raise ValueError(f"{file} does not match {path / CFG_FILE} ({_describe(cfg)}): " + "; ".join(problems))
    non_finite = [name for name, t in tensors.items() if t.dtype.is_floating_point and not torch.isfinite(t).all()]
    if non_finite:
        raise ValueError(f"{file} holds non-finite values (NaN or Inf) in {', '.join(non_finite)}")
    # copies in fresh storage: the file's buffers may be unaligned, which changes how kernels sum
    # and so the last bits of every output
    sae.load_state_dict({name: tensors[name].to(device or "cpu", t.dtype, copy=True) for name, t in expected.items()},
                        assign=True)
    return sae


def _read_regular_file(file: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of ``file``, which must be a regular file (of at most ``max_bytes``)."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing or is not a regular file")
    with file.open("rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{file} is larger than {max_bytes} bytes: not an SAE config")
    return data


def _read_cfg(file: Path) -> tuple[SAEConfig, str | None]:
    """The config in ``file`` and the weights checksum it records (None in folders saved without one)."""
    try:
        raw = json.loads(_read_regular_file(file, MAX_CFG_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object of SAE settings, got {type(raw).__name__} {str(raw)[:40]}")
    raw.pop(VERSION_KEY, None)
    checksum = raw.pop(CHECKSUM_KEY, None)
    known = {f.name for f in fields(SAEConfig)}
    if known - OPTIONAL_KEYS - raw.keys():
        raise ValueError(f"{file}: missing keys {sorted(known - OPTIONAL_KEYS - raw.keys())}")
    if raw.keys() - known:
        raise ValueError(f"{file}: unknown keys {sorted(raw.keys() - known)}")
    try:
        return SAEConfig(**raw), checksum
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: {error}") from error


def _is_sae_folder(path: Path) -> bool:
    return path.is_dir() and {p.name for p in path.iterdir()} <= {CFG_FILE, WEIGHTS_FILE}


def _describe(cfg: SAEConfig) -> str:
    return (f"architecture={cfg.architecture}, n_dicts={len(cfg.head_indices)}, d_k={cfg.d_k}, d_v={cfg.d_v}, "
            f"n_features={cfg.n_features}, rank={cfg.rank}, tied={cfg.tied}, sparsity={cfg.sparsity}")
