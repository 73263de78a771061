"""An on-disk activation cache: extract a GDN layer's samples once, train many SAEs from them.

Layout of a cache folder::

    manifest.json                       what is in it (below), written when the last shard is done
    train/shard-000000.safetensors      x [n, n_heads, d_k, d_v] (float32 or bfloat16), origins [n, 2]
    heldout/shard-000000.safetensors    the held-out split, stored apart
    manifest-parts/rank-0.json          per-rank progress while writing (removed when complete)
    .writesae.lock                      held while a run writes the folder (removed when it ends)

The samples are exactly those of `writesae.store.ActivationStore` (same corpus, split by document,
contexts, kind, heads and position rule); origins are (context index, position) within the split.
The manifest records the model, site, heads, positions rule, dtype, corpus and split (document
counts, the held-out documents, a SHA-256 of each split's token contexts), the samples per shard
and, per shard, its file, sample count and SHA-256.

Shard j of a split holds the split's contexts [j·c, (j+1)·c), c = ``contexts_per_shard``, with
random positions (if any) from a generator seeded by (seed, split, j): a shard's bytes depend on
nothing else, so an interrupted run redoes only missing shards and any number of ranks write the
same files. Under torchrun rank r writes the shards j ≡ r (mod W); each shard is written to a
temporary name, fsynced and renamed, and then the rank's part of the manifest is replaced
atomically, so a kill or a full disk mid-shard loses that shard only. When every rank is done,
rank 0 merges the parts into ``manifest.json``; ranks whose settings differ are refused before
anything is written, and so is a rerun whose settings differ from the cache's.

One run at a time writes a folder: rank 0 holds its lock (`writesae.outputs.output_lock`) from
before anything is touched until the run ends, and a second run is refused, naming the first's pid.
A rerun removes only the temporaries `hooked_gdn.files.atomic_file` named for processes of this host
that are no longer running; anything else in the folders (a ``.gitkeep``, ``.ipynb_checkpoints/``)
is left alone, and a link where a shard or one of the folders goes is refused, never written through.

`CachedActivations` reads a complete cache as a `writesae.samples.SampleSource`, the interface
the trainer reads samples through. Every shard is checked against its SHA-256 when read; a
corrupted one is refused, named, never used as data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm

from hooked_gdn.files import atomic_file, file_sha256

from . import distributed
from .differences import differences
from .outputs import LOCK, claim_outputs, output_lock, output_subfolder
from .samples import Samples, input_scale
from .site_fit import model_fingerprint
from .store import SPLITS, ActivationStore, StoreConfig, _generator

FORMAT = "writesae-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS = "manifest-parts"
STORAGE_DTYPES = ("float32", "bfloat16")
OUTPUTS = (MANIFEST, *SPLITS, PARTS, LOCK)  # what a cache folder holds (the lock only while a run writes it)
# seed purposes, after the store's own (writesae.store): positions of cache shards, the cache sampler
_SHARD_POSITIONS, _CACHE_EPOCH_ORDER, _CACHE_STREAM = 100, 101, 102


def shard_file(split: str, index: int) -> str:
    """A shard's path inside the cache folder."""
    return f"{split}/shard-{index:06d}.safetensors"


# ---------------------------------------------------------------------- writing


def cache_settings(store: ActivationStore, model_name: str, corpus: str, shard_samples: int, dtype: str) -> dict:
    """Everything that decides a cache's bytes: the manifest without its shard list."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"the cache's dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if isinstance(shard_samples, bool) or not isinstance(shard_samples, int) or shard_samples < 1:
        raise ValueError(f"shard_samples must be a positive int, got {shard_samples!r}")
    cfg, per_context = store.cfg, store.cfg.samples_per_context
    contexts_per_shard = max(1, shard_samples // per_context)
    splits = {}
    for split in SPLITS:
        contexts = store._contexts[split]
        splits[split] = {"contexts": len(contexts), "samples": len(contexts) * per_context,
                         "shards": math.ceil(len(contexts) / contexts_per_shard),
                         "tokens_sha256": hashlib.sha256(contexts.numpy().tobytes()).hexdigest()}
    settings = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": model_name,
        "model_fingerprint": model_fingerprint(store.model), "site": cfg.site,
        "layer": cfg.layer, "kind": cfg.kind, "heads": store.heads, "n_value_heads": store.model.cfg.n_value_heads,
        "d_k": store.d_k, "d_v": store.d_v, "positions": cfg.positions, "context": cfg.context, "dtype": dtype,
        "corpus": corpus, "documents": len(store.document_names),
        "heldout_documents": [store.document_names[i] for i in store.heldout_document_ids],
        "samples_per_context": per_context, "contexts_per_shard": contexts_per_shard,
        "samples_per_shard": contexts_per_shard * per_context, "splits": splits,
        # the store's own settings, to rebuild its StoreConfig (buffer_size is the reader's choice)
        "store_config": {k: v for k, v in asdict(cfg).items() if k != "buffer_size"},
    }
    return json.loads(json.dumps(settings))  # as a manifest reads back, so that the two compare equal


def write_cache(store: ActivationStore, folder: str | Path, *, model_name: str, corpus: str,
                shard_samples: int = 4096, dtype: str = "float32", progress: bool = True,
                log: Callable[[str], None] | None = print) -> Path:
    """Extract ``store``'s training and held-out samples into the cache ``folder`` (the module
    docstring), or finish a cache an interrupted call left. Returns the manifest's path.

    ``model_name`` and ``corpus`` describe the source in the manifest; ``shard_samples`` is rounded
    down to whole contexts (at least one); ``dtype`` is the storage dtype, "float32" or "bfloat16".
    Before writing, ``log`` (rank 0's; None for silence) is told the size of the cache and what is
    left to write, and an `OSError` refuses to start when the folder's disk has less free space than that.
    Under torchrun every rank calls it with the same arguments.
    """
    folder = Path(folder)
    settings = cache_settings(store, model_name, corpus, shard_samples, dtype)
    distributed.check_same_on_every_rank(settings, "cache settings")
    rank, world = distributed.rank_and_world()
    with ExitStack() as held:
        refused = None
        if rank == 0:  # one run at a time: a second is refused before it touches anything
            try:
                claim_outputs(folder, OUTPUTS)
                held.enter_context(output_lock(folder, "writesae cache"))
                for name in [*SPLITS, PARTS]:  # real folders; only killed runs' temporaries of ours are removed
                    output_subfolder(folder, name)
            except OSError as error:
                refused = error
        message = distributed.gather_objects(None if refused is None else str(refused))[0]
        if refused is not None:
            raise refused
        if message:  # every rank stops with rank 0
            raise OSError(message)
        return _write_cache_locked(store, folder, settings, rank, world, progress, log)


def _write_cache_locked(store, folder: Path, settings: dict, rank: int, world: int, progress: bool, log) -> Path:
    """`write_cache` once rank 0 holds the folder's lock (released when it returns or raises)."""
    done = _done_shards(folder, settings)
    distributed.barrier()  # every rank has read the old parts before any rank replaces its own
    missing = [(split, j) for split in SPLITS for j in range(settings["splits"][split]["shards"]) if (split, j) not in done]
    shortage = _plan_disk(folder, settings, missing, log) if rank == 0 else None
    shortage = distributed.gather_objects(shortage)[0]  # rank 0's finding: every rank stops, or none does
    if shortage:
        raise OSError(shortage)

    mine = {(split, j): entry for (split, j), entry in done.items() if j % world == rank}
    todo = [(split, j) for split, j in missing if j % world == rank]
    part = folder / PARTS / f"rank-{rank}.json"
    # first the done shards this rank now owns: it may be replacing a part that listed other ranks' shards
    _write_json(part, {**settings, "shards": _by_split(mine)})
    for split, j in tqdm(todo, desc=f"cache shards (rank {rank})", disable=not progress or not todo):
        data = _shard_bytes(store, settings, split, j)
        with atomic_file(folder / shard_file(split, j), "wb") as f:
            f.write(data)
        mine[split, j] = {"index": j, "file": shard_file(split, j), "bytes": len(data),
                          "samples": _shard_samples(settings, split, j), "sha256": hashlib.sha256(data).hexdigest()}
        _write_json(part, {**settings, "shards": _by_split(mine)})
    distributed.barrier()
    if rank == 0:
        _merge_parts(folder, settings, world)
    distributed.barrier()
    return folder / MANIFEST


def _shard_contexts(settings: dict, split: str, index: int) -> Tensor:
    per_shard, n = settings["contexts_per_shard"], settings["splits"][split]["contexts"]
    return torch.arange(index * per_shard, min((index + 1) * per_shard, n))


def _shard_samples(settings: dict, split: str, index: int) -> int:
    return _shard_contexts(settings, split, index).numel() * settings["samples_per_context"]


def sample_bytes(settings: dict) -> int:
    """The bytes one sample takes in a shard of a cache of these settings: x (heads × d_k × d_v in the
    storage dtype) and its origin (two int64); each shard adds a header of a few hundred bytes."""
    itemsize = torch.empty(0, dtype=getattr(torch, settings["dtype"])).element_size()
    return len(settings["heads"]) * settings["d_k"] * settings["d_v"] * itemsize + 2 * 8


def _plan_disk(folder: Path, settings: dict, missing: list[tuple[str, int]], log) -> str | None:
    """Tell ``log`` what the cache will take on disk; why the disk is too small for what is left to write, or None."""
    per_sample = sample_bytes(settings)
    total_samples = sum(settings["splits"][split]["samples"] for split in SPLITS)
    total_shards = sum(settings["splits"][split]["shards"] for split in SPLITS)
    needed = sum(_shard_samples(settings, split, j) for split, j in missing) * per_sample
    free = shutil.disk_usage(folder).free
    shape = f"{len(settings['heads'])} heads × {settings['d_k']} × {settings['d_v']} {settings['dtype']}"
    size = f"{total_samples:,} samples of {shape} in {total_shards} shards, {_size(total_samples * per_sample)}"
    if log is not None:
        left = "" if len(missing) == total_shards else f"; {len(missing)} shards left to write, {_size(needed)}"
        log(f"writing the cache {folder}: {size}{left} ({_size(free)} free on its disk)")
    if needed > free:
        return (f"the cache {folder} needs {_size(needed)} more ({size}), and its disk has {_size(free)} free: "
                f"free some space, write it elsewhere, or store it in bfloat16 (half the size) or with fewer "
                f"positions per context")
    return None


def _size(n_bytes: int) -> str:
    """Bytes in binary units, as df -h and du -h count them: 4.1 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"


def _shard_bytes(store: ActivationStore, settings: dict, split: str, index: int) -> bytes:
    """The safetensors bytes of one shard: its contexts' samples, positions seeded by (split, index)."""
    generator = _generator(store.cfg.seed, _SHARD_POSITIONS, SPLITS.index(split), index)
    xs, origins = [], []
    for indices in _shard_contexts(settings, split, index).split(store.cfg.model_batch_size):
        x, origin = store._extract(split, indices, generator)
        xs.append(x.to("cpu", getattr(torch, settings["dtype"])))
        origins.append(origin)
    tensors = {"x": torch.cat(xs).contiguous(), "origins": torch.cat(origins).contiguous()}
    return save_safetensors(tensors)  # no metadata: safetensors writes it in hash order, and a shard's bytes must repeat


def _write_json(path: Path, obj: dict) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps(obj, indent=1) + "\n")


def _by_split(entries: dict) -> dict[str, list[dict]]:
    return {split: [entries[key] for key in sorted(entries) if key[0] == split] for split in SPLITS}


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable cache manifest: {error}") from error
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not a writesae activation-cache manifest")
    return obj


def _parts(folder: Path) -> list[Path]:
    """The ranks' parts of the manifest in the folder, ``rank-R.json``, in order; nothing else there."""
    parts = folder / PARTS
    if not parts.is_dir():
        return []
    return sorted(path for path in parts.iterdir() if re.fullmatch(r"rank-[0-9]+\.json", path.name))


def _done_shards(folder: Path, settings: dict) -> dict[tuple[str, int], dict]:
    """The shards already written (listed in the manifest or a rank's part, their file of the recorded
    size and SHA-256 present); a manifest or part of other settings is refused."""
    done = {}
    for path in [folder / MANIFEST, *_parts(folder)]:
        if not path.exists():
            continue
        recorded = _read_json(path)
        recorded_settings = {k: v for k, v in recorded.items() if k not in ("shards", "complete")}
        if "model_fingerprint" not in recorded_settings:  # a cache begun before fingerprints were recorded
            recorded_settings["model_fingerprint"] = settings["model_fingerprint"]
        differing = differences(recorded_settings, settings, "the cache has", "this run")
        if differing:
            raise ValueError(f"{path} was written with other settings ({'; '.join(differing)}): "
                             f"finish it with the same arguments, or write the new cache to another folder")
        for split in SPLITS:
            for entry in recorded["shards"][split]:
                file = folder / entry["file"]
                if file.is_file() and file.stat().st_size == entry["bytes"] and file_sha256(file) == entry["sha256"]:
                    done[split, entry["index"]] = entry  # a shard of the right size but other bytes is written again
    return done


def _merge_parts(folder: Path, settings: dict, world: int) -> None:
    """Rank 0, after every rank is done: check every shard is listed, write the manifest, drop the parts."""
    done = _done_shards(folder, settings)
    missing = [shard_file(split, j) for split in SPLITS for j in range(settings["splits"][split]["shards"])
               if (split, j) not in done]
    if missing:
        raise ValueError(f"the cache at {folder} lacks {len(missing)} shards after all {world} ranks finished "
                         f"(first {missing[0]}): a rank's part of the manifest is missing")
    _write_json(folder / MANIFEST, {**settings, "shards": _by_split(done), "complete": True})
    for part in _parts(folder):  # the ranks' parts only: a user's file beside them stays
        part.unlink()


# ---------------------------------------------------------------------- reading


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a complete cache; an unfinished or foreign one is refused, saying what to do."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        parts = _parts(folder)
        if parts:
            raise ValueError(f"the cache at {folder} is unfinished (no {MANIFEST}, only per-rank parts): "
                             f"rerun writesae cache with the same arguments to finish it")
        raise FileNotFoundError(f"{folder} is not an activation cache: it has no {MANIFEST}")
    manifest = _read_json(path)
    if manifest.get("format_version") != FORMAT_VERSION or not manifest.get("complete"):
        raise ValueError(f"{path}: format version {manifest.get('format_version')} (this writesae reads "
                         f"{FORMAT_VERSION}) or not complete")
    return manifest


class CachedActivations:
    """A complete cache's samples, for `writesae.train.train` in place of an `ActivationStore`; a
    `writesae.samples.SampleSource`.

    Training stream: epoch e visits the training shards in a permutation seeded by (seed, e); their
    samples go into a buffer that is refilled with whole shards whenever it is less than half full,
    and reshuffled as a whole by one seeded generator, so each sample is yielded once per epoch.
    `state_dict` holds the epoch, the cursor, the generator and the buffer's (shard, row) pairs (not
    its samples: they are read back from the shards), which is all a resumed stream needs to give
    exactly the batches an uninterrupted one would. Held-out batches are the held-out shards in order.
    """

    def __init__(self, folder: str | Path, buffer_size: int = 4096, seed: int = 0):
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive int, got {buffer_size!r}")
        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        self.cfg = StoreConfig(**m["store_config"], buffer_size=buffer_size)
        self.heads, self.n_value_heads, self.d_k, self.d_v = m["heads"], m["n_value_heads"], m["d_k"], m["d_v"]
        # the model the samples came from, which an SAE trained on them records (no fingerprint in older caches)
        self.model_name, self.model_fingerprint = m["model"], m.get("model_fingerprint")
        self.dtype = getattr(torch, m["dtype"])
        self.buffer_size, self.seed = buffer_size, seed
        self._shards = {split: m["shards"][split] for split in SPLITS}
        self._generator = _generator(seed, _CACHE_STREAM)
        self._epoch = self._cursor = 0
        self._order = (None, None)  # (epoch, its permutation of the training shards)
        self._buffer = torch.empty(0, len(self.heads), self.d_k, self.d_v, dtype=self.dtype)
        self._where = torch.empty(0, 2, dtype=torch.long)  # (shard, row) of each buffered sample

    def __str__(self) -> str:
        return f"the cache at {self.folder}"

    def n_samples(self, split: str = "train") -> int:
        return sum(entry["samples"] for entry in self._shards[split])

    def load_shard(self, split: str, index: int) -> tuple[Samples, Tensor]:
        """Shard ``index`` of ``split``: samples x and origins (context, position), checked against its SHA-256."""
        entry = self._shards[split][index]
        file = self.folder / entry["file"]
        try:
            data = file.read_bytes()
        except OSError as error:
            raise ValueError(f"{file}: cannot read this shard of {self} ({error})") from error
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(f"{file}: its SHA-256 differs from the one in {self.folder / MANIFEST}: the shard is "
                             f"corrupted and was not read (delete it and rerun writesae cache with the same arguments)")
        try:
            tensors = load_safetensors(data)
        except SafetensorError as error:
            raise ValueError(f"{file} is not a readable safetensors file: {error}") from error
        x = tensors.get("x")
        expected = (entry["samples"], len(self.heads), self.d_k, self.d_v)
        if x is None or tuple(x.shape) != expected or x.dtype != self.dtype:
            raise ValueError(f"{file}: expected x of shape {list(expected)} and dtype {self.dtype}, got "
                             f"{None if x is None else (list(x.shape), x.dtype)}")
        return x, tensors["origins"]

    # ------------------------------------------------------------------ fixed passes

    def _samples_in_order(self, split: str) -> Iterator[Samples]:
        for index in range(len(self._shards[split])):
            yield self.load_shard(split, index)[0]

    def heldout_batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[Samples]:
        """The held-out samples in shard order, in batches of ``batch_size`` (the last may be
        smaller), at most ``max_samples`` of them; the same on every call."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        left, rest = math.inf if max_samples is None else max_samples, self._buffer[:0]
        for x in self._samples_in_order("heldout"):
            if left <= 0:
                break
            x = torch.cat([rest, x[: int(min(len(x), left))]])
            left -= len(x) - len(rest)
            full = len(x) - len(x) % batch_size
            yield from x[:full].split(batch_size)
            rest = x[full:]
        if len(rest):
            yield rest

    def estimate_input_scale(self, n_samples: int = 4096) -> float:
        """`writesae.samples.input_scale` on the first ``n_samples`` training samples in shard order, a
        shard at a time: the training stream is left where it was."""
        return input_scale(self._first_samples("train", n_samples), self)

    def _first_samples(self, split: str, n_samples: int) -> Iterator[Samples]:
        """The first ``n_samples`` samples of ``split`` in shard order, a shard (or the part still wanted) at a time."""
        taken = 0
        for x in self._samples_in_order(split):
            x = x[: n_samples - taken]
            yield x
            taken += len(x)
            if taken >= n_samples:
                break

    # ------------------------------------------------------------------ the training stream

    def _next_shard(self) -> int:
        if self._order[0] != self._epoch:
            order = torch.randperm(len(self._shards["train"]), generator=_generator(self.seed, _CACHE_EPOCH_ORDER, self._epoch))
            self._order = (self._epoch, order)
        index = int(self._order[1][self._cursor])
        self._cursor += 1
        if self._cursor == len(self._order[1]):
            self._epoch, self._cursor = self._epoch + 1, 0
        return index

    def _refill(self) -> None:
        """Top the buffer up with whole shards to at least ``buffer_size`` samples, and shuffle all of it."""
        xs, where = [self._buffer], [self._where]
        while sum(map(len, xs)) < self.buffer_size:
            index = self._next_shard()
            x = self.load_shard("train", index)[0]
            xs.append(x)
            where.append(torch.stack([torch.full((len(x),), index), torch.arange(len(x))], -1))
        x, where = torch.cat(xs), torch.cat(where)
        perm = torch.randperm(len(x), generator=self._generator)
        self._buffer, self._where = x[perm], where[perm]

    def next_batch(self, batch_size: int) -> Samples:
        """The next training batch X [batch_size, n_heads, d_k, d_v], in the cache's dtype."""
        if not 0 < batch_size <= self.buffer_size // 2:
            raise ValueError(f"batch_size must lie in [1, buffer_size // 2 = {self.buffer_size // 2}], got {batch_size}")
        if len(self._buffer) < self.buffer_size // 2:
            self._refill()
        x, self._buffer, self._where = self._buffer[:batch_size], self._buffer[batch_size:], self._where[batch_size:]
        return x

    # ------------------------------------------------------------------ resuming

    def fingerprint(self) -> str:
        """What a stream's state belongs to: the cache's shards, the buffer size and the seed."""
        shards = hashlib.sha256(json.dumps(self.manifest["shards"], sort_keys=True).encode()).hexdigest()
        return json.dumps({"site": self.cfg.site, "shards_sha256": shards, "buffer_size": self.buffer_size, "seed": self.seed})

    def state_dict(self) -> dict:
        """The stream's position, flat: tensors (generator state, buffered (shard, row) pairs) and JSON-able values."""
        return {"epoch": self._epoch, "cursor": self._cursor, "fingerprint": self.fingerprint(),
                "generator": self._generator.get_state(), "buffer_where": self._where.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream from ``state``, which must come from a reader of the same cache and settings."""
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(f"this stream state belongs to another cache or reader:\n  saved: {state['fingerprint']}\n"
                             f"  this:  {self.fingerprint()}")
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        self._order = (None, None)
        self._generator.set_state(state["generator"].clone())
        where = state["buffer_where"].long().clone()
        self._buffer = self._buffer.new_empty(len(where), *self._buffer.shape[1:])
        for index in where[:, 0].unique().tolist():
            rows = where[:, 0] == index
            self._buffer[rows] = self.load_shard("train", index)[0][where[rows, 1]]
        self._where = where
