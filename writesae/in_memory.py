"""Samples held in memory: extract a few thousand once, train many SAEs on them (or on some of their heads).

`InMemoryActivations` is a `writesae.samples.SampleSource`, the interface `writesae.train.train` reads
samples through, like `writesae.store.ActivationStore` (streamed from the model) and
`writesae.disk_cache.CachedActivations` (read from disk). It suits
comparisons that train many small SAEs on the same samples: the model runs once, not once per SAE.

Training stream: epoch e visits every training sample once, in a permutation drawn from one
generator seeded by ``seed``; a batch that crosses an epoch's end continues into the next. The
state (cursor, the epoch's permutation, the generator) is all a resumed stream needs to give
exactly the batches an uninterrupted one would. Held-out batches are the held-out samples in order.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import replace

import torch

from .samples import Samples
from .site_fit import model_fingerprint
from .store import ActivationStore, StoreConfig, _generator

# purposes of the seeded generators, after the store's and the disk cache's own (see writesae.store._generator):
# the training contexts and positions taken from a store, the training stream
_MEMORY_CONTEXTS, _MEMORY_STREAM = 200, 201


class InMemoryActivations:
    """Training and held-out samples X [n, n_heads, d_k, d_v] of one site, for `writesae.train.train`.

    ``cfg``: the `StoreConfig` the samples came from (the trainer reads its ``site``); ``heads``: the
    model heads along axis 1; ``n_value_heads``: the site's number of heads. ``model_name`` and
    ``model_fingerprint`` (`writesae.site_fit.model_fingerprint`) name the model the samples came
    from, when known (`from_store` records them): an SAE trained on the samples records them.
    """

    def __init__(self, train: Samples, heldout: Samples, cfg: StoreConfig, heads: list[int], n_value_heads: int,
                 seed: int = 0, *, model_name: str | None = None, model_fingerprint: str | None = None):
        for split, x in (("train", train), ("heldout", heldout)):
            if x.dim() != 4 or x.shape[1] != len(heads) or len(x) == 0:
                raise ValueError(f"{split} samples must be [n >= 1, n_heads={len(heads)}, d_k, d_v], got {tuple(x.shape)}")
        if train.shape[1:] != heldout.shape[1:]:
            raise ValueError(f"training samples {tuple(train.shape)} and held-out samples {tuple(heldout.shape)} differ in shape")
        self.train, self.heldout = train, heldout
        self.cfg, self.heads, self.n_value_heads, self.seed = cfg, list(heads), n_value_heads, seed
        self.d_k, self.d_v = train.shape[2], train.shape[3]
        self.model_name, self.model_fingerprint = model_name, model_fingerprint
        self._generator = _generator(seed, _MEMORY_STREAM)
        self._order = torch.randperm(len(train), generator=self._generator)
        self._cursor = 0
        self._sha256: str | None = None

    @classmethod
    def from_store(cls, store: ActivationStore, n_train: int, n_heldout: int | None = None, seed: int = 0
                   ) -> InMemoryActivations:
        """``n_train`` training samples of ``store`` (its training contexts in a permutation seeded by
        ``seed``, positions by its rule) and its first ``n_heldout`` held-out samples (all of them when
        None); the store's own stream is left alone. Exactly these samples are extracted, none thrown away."""
        if n_train < 1 or (n_heldout is not None and n_heldout < 1):
            raise ValueError(f"n_train and n_heldout must be positive, got {n_train} and {n_heldout}")
        generator = _generator(seed, _MEMORY_CONTEXTS)
        order = torch.randperm(store.n_contexts("train"), generator=generator)
        train = torch.cat([x for x, _ in store._fixed_batches("train", order, generator, n_train, n_train)])
        heldout = torch.cat(list(store.heldout_batches(n_heldout or 1024, n_heldout)))
        for split, x, wanted in (("training", train, n_train), ("held-out", heldout, n_heldout or 1)):
            if len(x) < wanted:
                raise ValueError(f"the {split} split gives {len(x)} samples, fewer than the {wanted} asked for")
        return cls(train, heldout, store.cfg, store.heads, store.n_value_heads, seed,
                   model_name=store.model.cfg.model_name, model_fingerprint=model_fingerprint(store.model))

    def select_heads(self, heads: list[int], seed: int | None = None) -> InMemoryActivations:
        """The same samples on the model heads ``heads`` only (views, no copy), with a fresh stream."""
        missing = [h for h in heads if h not in self.heads]
        if missing or not heads:
            raise ValueError(f"heads {heads} must be a non-empty selection of the samples' heads {self.heads}")
        rows = [self.heads.index(h) for h in heads]
        return InMemoryActivations(self.train[:, rows], self.heldout[:, rows], replace(self.cfg, heads=list(heads)),
                                   heads, self.n_value_heads, self.seed if seed is None else seed,
                                   model_name=self.model_name, model_fingerprint=self.model_fingerprint)

    def __str__(self) -> str:
        return f"the in-memory samples of {self.cfg.site} (heads {self.heads})"

    def n_samples(self, split: str = "train") -> int:
        return len(self.train if split == "train" else self.heldout)

    def next_batch(self, batch_size: int) -> Samples:
        """The next training batch X [batch_size, n_heads, d_k, d_v]."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        taken = []
        while batch_size > 0:
            part = self._order[self._cursor : self._cursor + batch_size]
            taken.append(part)
            batch_size -= len(part)
            self._cursor += len(part)
            if self._cursor == len(self._order):
                self._order, self._cursor = torch.randperm(len(self.train), generator=self._generator), 0
        return self.train[torch.cat(taken)]

    def heldout_batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[Samples]:
        """The held-out samples in order, in batches of ``batch_size`` (the last may be smaller), at most ``max_samples``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        yield from self.heldout[: max_samples].split(batch_size)

    def estimate_input_scale(self, n_samples: int = 4096) -> float:
        """s with mean ‖s·X‖²_F = 1 (over samples and heads) on the first ``n_samples`` training samples."""
        # not writesae.samples.input_scale: its (count / total) ** 0.5 and this math.sqrt differ in the last
        # bit for about one ratio in a thousand, and the shipped SAEs were trained with this one
        total = self.train[:n_samples].double().pow(2).sum().item()
        if not total > 0:
            raise ValueError(f"the training samples of {self} have zero norm: no input scale makes their mean norm 1")
        return math.sqrt(self.train[:n_samples].shape[:2].numel() / total)

    def fingerprint(self) -> str:
        """What a stream state belongs to: the site, heads, seed and the samples' SHA-256."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            for x in (self.train, self.heldout):
                digest.update(x.contiguous().cpu().numpy().tobytes())
            self._sha256 = digest.hexdigest()
        return json.dumps({"site": self.cfg.site, "heads": self.heads, "seed": self.seed, "samples_sha256": self._sha256})

    def state_dict(self) -> dict:
        """The stream's position: cursor, the epoch's permutation, the generator state."""
        return {"cursor": self._cursor, "fingerprint": self.fingerprint(), "order": self._order.clone(),
                "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream from ``state``, which must come from samples of the same site, heads, seed and values."""
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(f"this stream state belongs to other samples:\n  saved: {state['fingerprint']}\n  this:  {self.fingerprint()}")
        self._cursor, self._order = int(state["cursor"]), state["order"].long().clone()
        self._generator.set_state(state["generator"].clone())
