"""torch.distributed for the cache and the trainer, launched with ``torchrun``.

Outside torchrun (no ``WORLD_SIZE`` in the environment, or 1) every helper here is the one-process
identity, so callers need no second code path. Under torchrun, `init_from_env` joins the process
group: NCCL when the device is a GPU (each rank on ``cuda:LOCAL_RANK``), gloo on CPU.

Data-parallel training shares one global batch of B samples: every rank draws the same batch from
the same seeded sampler and keeps its own B/W rows (`rank_rows`). The losses are means over
samples, so the mean of the ranks' gradients (`average_gradients`) is the gradient on the whole
batch; statistics of the whole batch (dead features, AuxK's residual energy, BatchTopK's
threshold) are reduced across ranks where they are computed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from .differences import differences


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_lead() -> bool:
    """Rank 0, the one that writes shared files (checkpoints, manifests, metrics)."""
    return rank_and_world()[0] == 0


def init_from_env(device: str | None) -> str | None:
    """Join the process group torchrun describes in the environment, if it describes one of more than
    one rank, and return the device this rank should use (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    on_gpu = device is not None and str(device).startswith("cuda")
    if on_gpu:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (JSON-able), in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def check_same_on_every_rank(settings: dict, what: str) -> None:
    """Refuse to go on when any rank's ``settings`` differ from rank 0's, naming the ranks and keys."""
    everyone = gather_objects(json.loads(json.dumps(settings)))
    differing = [(rank, differences(everyone[0], s, "rank 0 has", f"rank {rank}")) for rank, s in enumerate(everyone)]
    differing = [(rank, found) for rank, found in differing if found]
    if differing:
        rank, found = differing[0]
        raise ValueError(f"the ranks disagree on the {what} ({'; '.join(found)}): every rank must be started with the same arguments")


def rank_rows(batch: Tensor) -> Tensor:
    """This rank's contiguous B/W rows of a global batch of B (B must divide evenly)."""
    rank, world = rank_and_world()
    if world == 1:
        return batch
    if len(batch) % world:
        raise ValueError(f"a global batch of {len(batch)} samples does not split evenly over {world} ranks")
    share = len(batch) // world
    return batch[rank * share : (rank + 1) * share]


def sum_over_ranks(t: Tensor) -> Tensor:
    """Σ over ranks of ``t`` (a new tensor, outside autograd)."""
    t = t.detach().clone()
    if rank_and_world()[1] > 1:
        dist.all_reduce(t)
    return t


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank."""
    return bool(sum_over_ranks(torch.tensor(int(flag))).item())


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks, in one flat all-reduce."""
    world = rank_and_world()[1]
    if world == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def gather_rows(t: Tensor) -> Tensor:
    """The ranks' ``t`` (same shape on every rank) concatenated along a new first dimension, in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)
