"""What training reads samples through (docs/design.md §14): the `SampleSource` protocol, and the input scale.

A sample is one head-stack X [n_heads, d_k, d_v] of one site at one position of one context;
batches come in the SAE's input layout `Samples` [batch, n_heads, d_k, d_v]. Three sources
implement the protocol, each with its own way of getting the samples and the same stream contract:

- `writesae.store.ActivationStore`: extracted from the model as the stream goes;
- `writesae.disk_cache.CachedActivations`: read from an on-disk cache the store wrote;
- `writesae.in_memory.InMemoryActivations`: extracted once from a store and held in memory.

`input_scale` owns the input-scale formula; the store's and the cache's `estimate_input_scale`
choose which training samples it is computed on. The in-memory source computes the same s on its
first samples with `math.sqrt` in place of ``** 0.5``, which can differ in the last bit (see there).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from .store import StoreConfig

Samples = Float[Tensor, "batch n_heads d_k d_v"]


@runtime_checkable
class SampleSource(Protocol):
    """Training and held-out samples of one site, as `writesae.train.train` reads them.

    ``cfg.site``: the site's hook name, which the SAE's ``cfg.site`` must equal (``cfg`` is the
    `StoreConfig` the samples come from). ``heads``: the model heads along a batch's axis 1;
    ``n_value_heads``: how many heads the site has; ``d_k`` × ``d_v``: each head's matrix.
    ``str(source)`` names the source in messages.
    """

    cfg: StoreConfig
    heads: list[int]
    n_value_heads: int
    d_k: int
    d_v: int

    def next_batch(self, batch_size: int) -> Samples:
        """The next ``batch_size`` samples of the training stream, which is seeded: a source made with
        the same arguments yields the same batches."""

    def heldout_batches(self, batch_size: int, max_samples: int | None = None) -> Iterator[Samples]:
        """The held-out samples (at most ``max_samples``) in batches of ``batch_size``, the last possibly
        smaller; the same on every call, and the training stream is left alone."""

    def estimate_input_scale(self, n_samples: int = 4096) -> float:
        """`input_scale` on a fixed choice of ``n_samples`` training samples; the training stream is left alone."""

    def fingerprint(self) -> str:
        """What a stream state belongs to: `load_state_dict` refuses a state of another fingerprint."""

    def state_dict(self) -> dict:
        """The training stream's position, flat: tensors and JSON-able values (a checkpoint stores them apart)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue the training stream from ``state``, so that it yields exactly the batches the stream
        that saved it would have."""


def input_scale(batches: Iterable[Samples], source: object) -> float:
    """s with mean ‖s·X‖²_F = 1 over the samples and heads of ``batches``; a ValueError naming
    ``source`` when they have zero norm. Sums of squares are taken per batch in float64 and added
    in batch order, so a source's choice of batches fixes the result to the last bit."""
    total, count = 0.0, 0
    for x in batches:
        total += x.double().pow(2).sum().item()
        count += x.shape[0] * x.shape[1]
    if not total > 0:
        raise ValueError(f"the training samples of {source} have zero norm (sum of squares {total}): "
                         f"no input scale makes their mean norm 1")
    return (count / total) ** 0.5
