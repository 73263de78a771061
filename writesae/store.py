"""The activation store (docs/design.md §14): samples X ∈ R^{d_k×d_v} of one GDN layer, streamed from a corpus.

A sample is one head-stack X [n_heads, d_k, d_v] at one position of one context: the state S_t
(``kind="state"``, taken from ``hook_state`` with ``state_positions``, so only the chosen positions'
states are formed), the write k̂_t δ_tᵀ (``kind="write"``, formed here from ``hook_write_key`` and
``hook_write_value`` at the chosen positions) or, in RWKV-7, the erase (a_t ⊙ κ̂_t) e_tᵀ (``kind="erase"``,
from ``hook_erase_rate``, ``hook_erase_key`` and ``hook_erase_value``; `hooked_gdn.sites` says which hooks
make a site's key and value). Batches come in the SAE's input layout [batch, n_heads, d_k, d_v].

Corpus. Documents are tokenised once, up front, and kept in memory. Each split's documents, in
their source order, each followed by EOS, form one token stream cut into contexts of ``context``
tokens (the remainder is dropped). The split is by document, never by sample: ``heldout_documents``
(names or indices), or else a seeded choice of ``heldout_fraction`` of the documents (at least one).

Training stream. Epoch e visits every training context once, in a permutation seeded by (seed, e);
positions and the buffer's shuffles come from one seeded generator. Samples go into a buffer that
is refilled (and reshuffled as a whole) whenever it is less than half full, so each extracted sample
is yielded exactly once. `state_dict` holds the cursor, the generator and the buffer, which is all a
resumed stream needs to yield exactly the batches an uninterrupted one would.

Origins. With ``with_origin=True`` batches come with origin [batch, 2] = (context index, position)
within the split; ``context_tokens(index, split)`` gives that context's tokens back.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from hooked_gdn.sites import KINDS, parse_model_site, rank_one, rank_one_key, site_name

from .samples import Samples, input_scale

SPLITS = ("train", "heldout")
Origins = Int[Tensor, "batch 2"]  # (context index, position) within the split
# purposes of the seeded generators, so that each draws an independent stream from one seed
_HELDOUT_CHOICE, _EPOCH_ORDER, _STREAM, _HELDOUT_POSITIONS, _SCALE_ORDER = range(5)


@dataclass
class StoreConfig:
    """What to extract, and how to stream it.

    ``layer``: a GDN layer. ``kind``: "state", "write" or (RWKV-7) "erase". ``heads``: an int, a list or "all".
    ``positions`` per context: "all", "final", an int k (k distinct random positions per context)
    or a list of positions (negative ones count from the end). ``buffer_size`` and
    ``model_batch_size`` count samples and contexts. ``text_column`` names the text of a
    `datasets` source. ``dtype``: the samples' dtype.
    """

    layer: int
    kind: str = "state"
    heads: int | list[int] | str = "all"
    context: int = 256
    positions: str | int | list[int] = "all"
    heldout_fraction: float = 0.05
    heldout_documents: list[str | int] | None = None
    buffer_size: int = 4096
    model_batch_size: int = 8
    text_column: str = "text"
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("context", "buffer_size", "model_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.heads, tuple):
            self.heads = list(self.heads)
        if isinstance(self.positions, tuple):
            self.positions = list(self.positions)
        p, c = self.positions, self.context
        if isinstance(p, list):
            if not p or any(isinstance(q, bool) or not isinstance(q, int) or not -c <= q < c for q in p):
                raise ValueError(f"positions {p} must be a non-empty list of ints in [-{c}, {c})")
            if len({q % c for q in p}) != len(p):
                raise ValueError(f"positions {p} repeat a position")
        elif isinstance(p, bool) or not (p in ("all", "final") or (isinstance(p, int) and 1 <= p <= c)):
            raise ValueError(f"positions must be 'all', 'final', an int in [1, context={c}] or a list, got {p!r}")
        if self.heldout_documents is not None:
            self.heldout_documents = list(self.heldout_documents)
            if not self.heldout_documents:
                raise ValueError("heldout_documents, when given, must name at least one document")
        elif not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction!r}")
        if not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'float32', got {self.dtype!r}")

    @property
    def site(self) -> str:
        """The hook name an SAE on these samples has as its ``cfg.site`` (see `hooked_gdn.sites`)."""
        return site_name(self.layer, self.kind)

    @property
    def samples_per_context(self) -> int:
        p = self.positions
        return self.context if p == "all" else 1 if p == "final" else len(p) if isinstance(p, list) else p


class ActivationStore:
    """Samples of ``model``'s layer ``cfg.layer`` over the documents of ``source`` (see the module docstring);
    a `writesae.samples.SampleSource`.

    ``source``: a path (``str`` or ``Path``) or a list of ``Path``s, each a text file (``.txt``, or
    ``.txt.gz``) or a folder whose ``.txt``/``.txt.gz`` files, recursively and sorted, are the
    documents; a `datasets` ``Dataset`` or ``IterableDataset`` (``cfg.text_column``; an
    iterable one is read to its end, so ``.take(n)`` an endless one); a list of strings, each a
    document's text (so give a list of paths as ``Path``s: a list of strings that all name existing
    files or folders is refused, never read as text); a list of objects with ``name`` and ``text``
    (e.g. `hooked_gdn.pretrained.Document`); or a list of 1-D token sequences, one per document.
    Text needs ``model.tokenizer``. Documents are named by path, by ``name``, or else by index.
    """

    def __init__(self, model, source, cfg: StoreConfig | None = None, **config):
        if cfg is None:
            cfg = StoreConfig(**config)
        elif config:
            raise TypeError(f"pass either a StoreConfig or its keywords, not both (got {sorted(config)})")
        mcfg = model.cfg
        if cfg.layer not in mcfg.gdn_layers:
            raise ValueError(f"layer {cfg.layer} is not a GDN layer; the GDN layers are {mcfg.gdn_layers}")
        self.site = parse_model_site(cfg.site, model)  # refuses an erase site where the family has no erase of its own
        heads = list(range(mcfg.n_value_heads)) if cfg.heads == "all" else cfg.heads if isinstance(cfg.heads, list) else [cfg.heads]
        if not heads or len(set(heads)) != len(heads) or not all(isinstance(h, int) and 0 <= h < mcfg.n_value_heads for h in heads):
            raise ValueError(f"heads {cfg.heads!r} must be distinct ints in [0, {mcfg.n_value_heads}) (or 'all')")
        eos = mcfg.eos_token_id if mcfg.eos_token_id is not None else getattr(model.tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("documents are joined with EOS, but neither the model's config nor its tokenizer has one")
        self.model, self.cfg, self.heads = model, cfg, heads
        self.d_k, self.d_v, self.n_value_heads = mcfg.d_key, mcfg.d_value, mcfg.n_value_heads
        self.dtype = getattr(torch, cfg.dtype)

        self.document_names, documents = _read_documents(source, cfg.text_column)
        tokens = _tokenize(documents, self.document_names, model)
        self.heldout_document_ids = self._choose_heldout()
        held = set(self.heldout_document_ids)
        self.train_document_ids = [i for i in range(len(tokens)) if i not in held]
        if not self.train_document_ids:
            raise ValueError(f"every one of the {len(tokens)} documents is held out, so none is left to train on: the "
                             f"split is by document (a file is one), so give at least two, or fewer heldout_documents")
        self._contexts = {split: _cut(split, [tokens[i] for i in ids], eos, cfg.context)
                          for split, ids in (("train", self.train_document_ids), ("heldout", self.heldout_document_ids))}

        self._generator = _generator(cfg.seed, _STREAM)
        self._epoch = self._cursor = 0
        self._order = (None, None)  # (epoch, its permutation of the training contexts)
        self._buffer, self._origins = self._empty()
        self._kept_heldout: tuple[Tensor, Tensor, bool] | None = None  # (X, origins, whether that is all of them)

    def __str__(self) -> str:
        return "the store"

    # ------------------------------------------------------------------ corpus

    def _choose_heldout(self) -> list[int]:
        names, wanted = self.document_names, self.cfg.heldout_documents
        if wanted is None:
            count = max(1, round(self.cfg.heldout_fraction * len(names)))
            return sorted(torch.randperm(len(names), generator=_generator(self.cfg.seed, _HELDOUT_CHOICE))[:count].tolist())
        index = {name: i for i, name in enumerate(names)}
        ids = set()
        for doc in wanted:
            if isinstance(doc, int) and not isinstance(doc, bool) and 0 <= doc < len(names):
                ids.add(doc)
            elif isinstance(doc, str) and doc in index:
                ids.add(index[doc])
            else:
                raise ValueError(f"heldout_documents: {doc!r} is neither a document name nor an index below {len(names)} "
                                 f"(names look like {names[:3]})")
        return sorted(ids)

    def n_contexts(self, split: str = "train") -> int:
        return len(self._contexts[_check_split(split)])

    def context_tokens(self, index: int, split: str = "train") -> Int[Tensor, " context"]:
        """The tokens of context ``index`` of ``split`` (an origin's first entry)."""
        return self._contexts[_check_split(split)][index].long()

    # ------------------------------------------------------------------ extraction

    @property
    def _device(self) -> torch.device:
        return self.model.W_E.device

    def _empty(self) -> tuple[Tensor, Tensor]:
        """No samples, and no origins."""
        x = torch.empty(0, len(self.heads), self.d_k, self.d_v, dtype=self.dtype, device=self._device)
        return x, torch.empty(0, 2, dtype=torch.long)

    def _positions(self, n: int, generator: torch.Generator) -> Tensor:
        """Positions [n, P] for n contexts, by the position policy."""
        p, c = self.cfg.positions, self.cfg.context
        if p == "all":
            return torch.arange(c).expand(n, c)
        if p == "final":
            return torch.full((n, 1), c - 1)
        if isinstance(p, list):
            return torch.tensor(sorted(q % c for q in p)).expand(n, len(p))
        return torch.rand(n, c, generator=generator).argsort(-1)[:, :p].sort(-1).values

    @torch.no_grad()
    def _extract(self, split: str, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """X [n·P, n_heads, d_k, d_v] and origins [n·P, 2] of the contexts ``indices`` (one model batch)."""
        device = self._device
        tokens = self._contexts[split][indices].long().to(device)
        positions = self._positions(len(indices), generator)
        rows, heads = torch.arange(len(indices), device=device)[:, None], torch.tensor(self.heads, device=device)
        if self.cfg.kind == "state":
            # state_positions is shared by the batch: form the states at the union, then take each context's own
            union = positions.unique()
            _, cache = self.model.run_with_cache(tokens, names_filter=self.cfg.site, state_positions=union, stop_at_layer=self.cfg.layer + 1)
            x = cache[self.cfg.site][rows, torch.searchsorted(union, positions.contiguous()).to(device)][:, :, heads]
        else:
            names = [*self.site.key_hooks, self.site.value_hook]
            _, cache = self.model.run_with_cache(tokens, names_filter=names, stop_at_layer=self.cfg.layer + 1)
            *key_factors, value = (cache[name][rows, positions.to(device)][:, :, heads] for name in names)
            x = rank_one(rank_one_key(key_factors), value)  # k̂ δᵀ or (a ⊙ κ̂) eᵀ [n, P, n_heads, d_k, d_v]
        origins = torch.stack([indices[:, None].expand_as(positions), positions], -1)
        return x.flatten(0, 1).to(self.dtype), origins.flatten(0, 1)

    def _fixed_batches(self, split: str, order: Tensor, generator: torch.Generator, batch_size: int,
                       max_samples: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        """The samples of ``split``'s contexts in ``order``, in batches of ``batch_size`` (the last may be
        smaller), at most ``max_samples`` of them; the training stream is left alone."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        left = math.inf if max_samples is None else max_samples
        x_rest, origin_rest = self._empty()
        for indices in order.split(self.cfg.model_batch_size):
            if left <= 0:
                break
            x, origin = self._extract(split, indices, generator)
            n = int(min(len(x), left))
            left -= n
            x, origin = torch.cat([x_rest, x[:n]]), torch.cat([origin_rest, origin[:n]])
            full = len(x) - len(x) % batch_size
            for start in range(0, full, batch_size):
                yield x[start : start + batch_size], origin[start : start + batch_size]
            x_rest, origin_rest = x[full:], origin[full:]
        if len(x_rest):
            yield x_rest, origin_rest

    def heldout_batches(self, batch_size: int, max_samples: int | None = None,
                        with_origin: bool = False) -> Iterator[Samples | tuple[Samples, Origins]]:
        """The held-out samples, unshuffled and the same on every call: contexts in order, random
        positions (if any) from a fixed seed; at most ``max_samples``. Served from memory, running no
        model, when `keep_heldout` kept enough of them."""
        kept = self._kept_heldout
        if kept is not None and (kept[2] or (max_samples is not None and max_samples <= len(kept[0]))):
            if batch_size < 1:
                raise ValueError(f"batch_size must be positive, got {batch_size}")
            batches = zip(kept[0][:max_samples].split(batch_size), kept[1][:max_samples].split(batch_size))
        else:
            batches = self._heldout_extracted(batch_size, max_samples)
        for x, origin in batches:
            yield (x, origin) if with_origin else x

    def _heldout_extracted(self, batch_size: int, max_samples: int | None) -> Iterator[tuple[Samples, Origins]]:
        order = torch.arange(self.n_contexts("heldout"))
        return self._fixed_batches("heldout", order, _generator(self.cfg.seed, _HELDOUT_POSITIONS), batch_size, max_samples)

    def keep_heldout(self, max_samples: int | None = None) -> int:
        """Extract the first ``max_samples`` held-out samples (all when None) once and keep them in memory
        with their origins, so that `heldout_batches` asking for no more runs no model again; returns
        how many were kept. They are exactly the samples `heldout_batches` gives (the held-out stream is
        fixed), so results do not change; the cost is their memory, max_samples × n_heads × d_k × d_v
        values (256 MiB for 4096 samples of gdn-austen's 4 heads, 4 GiB on 16 heads of Qwen3.5-0.8B)."""
        parts = list(self._heldout_extracted(self.cfg.model_batch_size * self.cfg.samples_per_context, max_samples))
        x, origin = (torch.cat(column) for column in zip(*parts))
        self._kept_heldout = (x, origin, max_samples is None or len(x) < max_samples)
        return len(x)

    def estimate_input_scale(self, n_samples: int = 4096) -> float:
        """`writesae.samples.input_scale` on ``n_samples`` training samples, from a fixed seeded choice of
        contexts, in batches of one model forward's samples: the training stream is left where it was."""
        generator = _generator(self.cfg.seed, _SCALE_ORDER)
        order = torch.randperm(self.n_contexts("train"), generator=generator)
        per_forward = self.cfg.model_batch_size * self.cfg.samples_per_context
        return input_scale((x for x, _ in self._fixed_batches("train", order, generator, per_forward, n_samples)), self)

    # ------------------------------------------------------------------ the training stream

    def _next_train_contexts(self, n: int) -> Tensor:
        """The next n training contexts of the stream, continuing into the next epoch as needed."""
        taken = []
        while n > 0:
            if self._order[0] != self._epoch:
                order = torch.randperm(self.n_contexts("train"), generator=_generator(self.cfg.seed, _EPOCH_ORDER, self._epoch))
                self._order = (self._epoch, order)
            part = self._order[1][self._cursor : self._cursor + n]
            taken.append(part)
            n -= len(part)
            self._cursor += len(part)
            if self._cursor == len(self._order[1]):
                self._epoch, self._cursor = self._epoch + 1, 0
        return torch.cat(taken)

    def _refill(self) -> None:
        """Top the buffer up to at least ``buffer_size`` samples and shuffle all of it."""
        n = -(-(self.cfg.buffer_size - len(self._buffer)) // self.cfg.samples_per_context)
        xs, origins = [self._buffer], [self._origins]
        for indices in self._next_train_contexts(n).split(self.cfg.model_batch_size):
            x, origin = self._extract("train", indices, self._generator)
            xs.append(x)
            origins.append(origin)
        x, origin = torch.cat(xs), torch.cat(origins)
        perm = torch.randperm(len(x), generator=self._generator)
        self._buffer, self._origins = x[perm.to(x.device)], origin[perm]

    def next_batch(self, batch_size: int, with_origin: bool = False) -> Samples | tuple[Samples, Origins]:
        """The next training batch X (with its origins)."""
        if not 0 < batch_size <= self.cfg.buffer_size // 2:
            raise ValueError(f"batch_size must lie in [1, buffer_size // 2 = {self.cfg.buffer_size // 2}], got {batch_size}")
        if len(self._buffer) < self.cfg.buffer_size // 2:
            self._refill()
        x, self._buffer = self._buffer[:batch_size], self._buffer[batch_size:]
        origin, self._origins = self._origins[:batch_size], self._origins[batch_size:]
        return (x, origin) if with_origin else x

    def train_batches(self, batch_size: int, with_origin: bool = False) -> Iterator[Samples | tuple[Samples, Origins]]:
        """`next_batch` forever."""
        while True:
            yield self.next_batch(batch_size, with_origin)

    # ------------------------------------------------------------------ resuming

    def fingerprint(self) -> str:
        """What a stream state belongs to: the config, the number of documents and of contexts per split."""
        return json.dumps({"config": asdict(self.cfg), "documents": len(self.document_names),
                           "contexts": [self.n_contexts(s) for s in SPLITS]}, sort_keys=True)

    def state_dict(self) -> dict:
        """The stream's position, flat: tensors (buffer, its origins, generator state) and JSON-able values."""
        return {"epoch": self._epoch, "cursor": self._cursor, "fingerprint": self.fingerprint(),
                "generator": self._generator.get_state(), "buffer": self._buffer.cpu(), "buffer_origins": self._origins}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream from ``state``, which must come from a store of the same config and corpus."""
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(f"this store state belongs to another store:\n  saved: {state['fingerprint']}\n  this:  {self.fingerprint()}")
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        self._generator.set_state(state["generator"].clone())
        self._buffer = state["buffer"].to(self._device, self.dtype, copy=True)
        self._origins = state["buffer_origins"].long().clone()


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _generator(seed: int, *purpose: int) -> torch.Generator:
    """A CPU generator for one purpose of one seed, its stream independent of the others'."""
    mixed = np.random.SeedSequence([seed, *purpose]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) >> 1)


def _read_documents(source, text_column: str) -> tuple[list[str], list]:
    """Document names and contents (strings or token sequences) of a source (see `ActivationStore`)."""
    if isinstance(source, (str, os.PathLike)):
        source = [Path(source)]
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("the source has no documents")
        if all(isinstance(s, os.PathLike) for s in source):
            files = [f for path in map(Path, source) for f in _text_files(path)]
            return [str(f) for f in files], [_read_text(f) for f in files]
        if all(hasattr(d, "name") and hasattr(d, "text") for d in source):
            return [str(d.name) for d in source], [d.text for d in source]
        if all(isinstance(s, str) for s in source) and all(os.path.exists(s) for s in source):
            raise TypeError(f"the source is a list of strings, which are documents' text, but every one names a file "
                            f"or folder (such as {source[0]!r}): pass pathlib.Path objects to read them")
        return [str(i) for i in range(len(source))], list(source)
    from datasets import Dataset, IterableDataset  # only for this source: importing datasets is slow

    if isinstance(source, (Dataset, IterableDataset)):
        texts = [row[text_column] for row in source]
        return [str(i) for i in range(len(texts))], texts
    raise TypeError(f"unsupported source {type(source).__name__}: see ActivationStore for the kinds of source")


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no file or folder at {path}")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.gz")))
    if not found:
        raise ValueError(f"{path} holds no .txt or .txt.gz files")
    return found


def _read_text(path: Path) -> str:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def _tokenize(documents: list, names: list[str], model) -> list[Tensor]:
    """Each document's tokens as a 1-D long tensor: text through ``model.tokenizer``, token sequences checked."""
    texts = [i for i, d in enumerate(documents) if isinstance(d, str)]
    tokens: list = list(documents)
    if texts:
        if model.tokenizer is None:
            raise ValueError("text documents need model.tokenizer; give token arrays to a model without one")
        ids = model.tokenizer([documents[i] for i in texts], add_special_tokens=False)["input_ids"]
        for i, doc_ids in zip(texts, ids):
            tokens[i] = doc_ids
    vocab = model.cfg.d_vocab
    for i, t in enumerate(tokens):
        t = torch.as_tensor(t)
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"document {names[i]!r}: expected text or a 1-D integer token sequence, got {type(documents[i]).__name__} "
                             f"of shape {tuple(t.shape)} and dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
            raise ValueError(f"document {names[i]!r}: token ids must lie in [0, {vocab}), got {int(t.min())}..{int(t.max())}")
        tokens[i] = t.long()
    return tokens


def _cut(split: str, documents: list[Tensor], eos: int, context: int) -> Tensor:
    """The documents, each followed by EOS, as one stream cut into contexts [n, context] (int32)."""
    eos_token = torch.tensor([eos])
    stream = torch.cat([t for doc in documents for t in (doc, eos_token)])
    n = len(stream) // context
    if n == 0:
        raise ValueError(f"the {split} split has {len(stream)} tokens, fewer than one context of {context}")
    return stream[: n * context].view(n, context).to(torch.int32)
