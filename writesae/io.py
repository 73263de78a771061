"""SAEs on disk: a folder with ``cfg.json`` (every `SAEConfig` field plus ``writesae_version``) and
``sae_weights.safetensors`` (parameters and buffers, e.g. the BatchTopK threshold). No pickle.

Saving writes a temporary folder beside the target and renames it into place, so a reader never
sees a half-written SAE. Loading checks the cfg's keys and every tensor's name and shape against
the cfg before it touches the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .sae import ARCHITECTURES, SAEConfig, SAEBase

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
VERSION_KEY = "writesae_version"


def save_sae(sae: SAEBase, path: str | Path) -> None:
    """Write ``sae`` to the folder ``path``, replacing an SAE folder already there (and only that)."""
    path = Path(path)
    if path.exists() and not _is_sae_folder(path):
        raise FileExistsError(f"{path} exists and is not an SAE folder (only {CFG_FILE} and {WEIGHTS_FILE}); not replacing it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(path) as tmp:
        cfg = {**asdict(sae.cfg), VERSION_KEY: __version__}
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={VERSION_KEY: __version__})


@contextmanager
def atomic_folder(path: Path):
    """Yield a temporary folder beside ``path``; if the block succeeds, swap it in for ``path``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_sae(path: str | Path, device: torch.device | str | None = None) -> SAEBase:
    """The SAE saved in the folder ``path``, of the class its cfg names, on ``device`` (default CPU)."""
    path = Path(path)
    cfg = _read_cfg(path / CFG_FILE)
    with torch.device("meta"):  # shapes only: the weights come from the file
        sae = ARCHITECTURES[cfg.architecture](cfg)
    expected = sae.state_dict()
    tensors = load_file(path / WEIGHTS_FILE, device=str(device or "cpu"))
    problems = [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    problems += [f"{name} has shape {list(tensors[name].shape)}, expected {list(t.shape)}"
                 for name, t in expected.items() if name in tensors and tensors[name].shape != t.shape]
    if problems:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match {path / CFG_FILE} ({_describe(cfg)}): " + "; ".join(problems))
    # copies in fresh storage: the file's buffers may be unaligned, which changes how kernels sum
    # and so the last bits of every output
    sae.load_state_dict({name: tensors[name].to(t.dtype, copy=True) for name, t in expected.items()}, assign=True)
    return sae


def _read_cfg(file: Path) -> SAEConfig:
    raw = json.loads(file.read_text())
    raw.pop(VERSION_KEY, None)
    known = {f.name for f in fields(SAEConfig)}
    if known - raw.keys():
        raise ValueError(f"{file}: missing keys {sorted(known - raw.keys())}")
    if raw.keys() - known:
        raise ValueError(f"{file}: unknown keys {sorted(raw.keys() - known)}")
    try:
        return SAEConfig(**raw)
    except ValueError as error:
        raise ValueError(f"{file}: {error}") from error


def _is_sae_folder(path: Path) -> bool:
    return path.is_dir() and {p.name for p in path.iterdir()} <= {CFG_FILE, WEIGHTS_FILE}


def _describe(cfg: SAEConfig) -> str:
    return (f"architecture={cfg.architecture}, n_dicts={len(cfg.head_indices)}, d_k={cfg.d_k}, d_v={cfg.d_v}, "
            f"n_features={cfg.n_features}, rank={cfg.rank}, tied={cfg.tied}, sparsity={cfg.sparsity}")
