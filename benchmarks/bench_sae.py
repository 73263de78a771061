"""P5: SAE training against the machine's matrix-product rate, in one run.

    python -m benchmarks.bench_sae                 # the whole grid below, 1 thread, about 15 minutes
    python -m benchmarks.bench_sae --max-gflop 5   # a smaller grid

For `FlatSAE`, `MatrixSAE` (rank 1) and `BilinearMatrixSAE` (rank 1, untied), one head, TopK k = 32, at
Qwen3.5-0.8B's GDN head shape (d_k = d_v = 128) and at the shipped gdn-austen's (64 × 64), over
n_features ∈ {64, 1024, 16384} × batch ∈ {32, 256, 1024}: the trainer's own step
(`writesae.train.training_step`: loss, backward, Adam, unit-norm factors, finiteness guards, dead
counters) on random states, timed as the median of repeats, inside `writesae.host_memory.freed_memory_kept`
as `writesae.train.train` runs it. Each row gives states/s, the step's FLOPs
(`training_step_flops`, counted analytically) and ``matmul_fraction``: achieved FLOP/s over the FLOP/s of one
plain square ``torch.matmul`` of the same FLOPs, timed right after the step in the same run (so both
see the same load). ``overhead_ms`` = step time − that matmul's time: what the step spends beyond its
FLOPs at matrix-product speed. ``adam_ms``: the trainer's Adam step alone on the same parameters, a
memory-bound pass over every weight, gradient and moment that no FLOP count sees; ``limit_fraction`` =
(the FLOPs at the matmul rate + Adam alone) / step time: how near a step is to the work it cannot skip;
``adam_bound_fraction`` = the FLOPs' time at the matmul rate / (that + Adam alone): the highest matmul fraction the
step could reach if everything else took no time, so a step whose bound is below the goal cannot meet it on this
machine with this optimiser, however the rest is made faster. ``products_ms``: the step's dense matrix products, each
timed alone on fresh operands of its own shapes and strides (`step_work_seconds`); ``products_bound_fraction`` = the
FLOPs' time at the matmul rate / (those products + Adam alone): the same ceiling with the products at the rate this
CPU's BLAS gives their shapes (a skinny product runs well below a square one's rate) instead of the square matmul's.
``sparse_work_ms``: the step's sparse work (`SPARSE_WORK`: top-k, gathers, scatters, a CSR product), each call timed
alone on the tensors it ran on; ``work_bound_fraction`` = the FLOPs' time at the matmul rate / (the products + the
sparse work + Adam alone): the ceiling with every part of the step that its routes cannot skip at the time it takes
alone, so that only the elementwise passes, copies, reductions and the time between operators are left out of it.
Steps above ``--max-gflop`` GFLOP, or whose weights, gradients and Adam moments would pass ``--max-gib``
GiB, are skipped (listed in the results). The defaults skip none: the largest step is 556 GFLOP
(BilinearMatrixSAE at 128 × 128, 16,384 features, batch 1,024: the shape `benchmarks.run_cost` takes its CPU rate
from) and the largest state 8 GiB (FlatSAE at 128 × 128 with 16,384 features); lower them for a quicker run on a
subsampled grid.

``decode``: the two routes of `SAEBase.decode_atoms` (dense product of every code with every atom,
and gathering the k active atoms), forward and backward, timed side by side at shapes around the
crossover, against a dense gradient, with the route `writesae.sae.dense_decode_is_cheaper` picks: the
measurement behind its ``ROW_GATHER_COST_FLOPS`` and ``DENSE_DECODE_FIXED_FEATURES`` (flat) and
``FACTOR_GATHER_COST_FLOPS`` (factored).
``encoder_backward``: the same for the two routes of the bilinear encoder's backward
(`writesae.sae.bilinear_backward_is_dense`), the measurement behind ``SMALL_PRODUCT_COST``, and of a flat SAE's
dense encoder (`writesae.sae.dense_encoder_backward_is_dense`), behind ``ENCODER_ROW_GATHER_COST_FLOPS``.
``encoder_forward``:
the bilinear encoder's forward with its rows E formed in one product and in blocks of
``ENCODER_NUMBERS_PER_BLOCK`` numbers, and by every sample's products C P_ir, side by side: the measurement behind
that constant and the rule of `writesae.sae.bilinear_forward_is_per_sample`. ``sparse_product``:
a dense encoder's gathered ∂W_enc by its CSR product (`writesae.sae._rows_of_sparse_product`) against forming its
products and adding them with ``index_add_``, the route it replaced. ``gathered_sum``: a dense encoder's ∂W_enc and
a flat decode (forward and backward) reading their gathered operand whole and in blocks of columns, side by side,
with what `writesae.sae.gather_columns_per_block` picks: the measurement behind ``GATHER_BLOCKS_FROM`` and the
constants beside it. ``product_layout``: a few rows times a weight's rows, c·Wᵀ (`writesae.sae._times_weight_rows`),
in einsum's layout and as (W·cᵀ)ᵀ, with what `writesae.sae.weights_first_is_faster` picks: the measurement behind
``WEIGHTS_FIRST_ROWS`` and ``WEIGHTS_FIRST_FEATURES_PER_ROW``. ``fixed_cost``: each SAE's step at a trivial shape
(`TRIVIAL_SHAPE`), where its work is negligible, and the ATen operators it runs: what a step costs whatever its shape.
``plain_step``: at the smallest shapes, the step beside the same maths written plainly in eager PyTorch
(`plain_step`), timed in turn. ``breakdown``: where a step's time goes, its ATen calls timed where it runs them and
grouped as the work bound groups them (`operator_kind`), at the smallest shapes and at each SAE's big step farthest
from the matmul rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import time
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from benchmarks.provenance import provenance, run_line, write_results
from benchmarks.timing import MAX_WARM_UP_ROUNDS, SETTLED_PAGE_FAULTS, interleaved_medians, median_seconds
from writesae import BilinearMatrixSAE, FlatSAE, MatrixSAE
from writesae.host_memory import freed_memory_kept
from writesae.sae import (DENSE_DECODE_FIXED_FEATURES, ENCODER_NUMBERS_PER_BLOCK, ENCODER_ROW_GATHER_COST_FLOPS,
                          FACTOR_GATHER_COST_FLOPS, GATHER_BLOCK_NUMBERS, GATHER_BLOCKS_FROM, GATHER_BLOCKS_RESULT_ROWS,
                          GATHER_BLOCKS_REUSE, MIN_BLOCK_COLUMNS, PER_SAMPLE_NUMBERS_PER_BLOCK, ROW_GATHER_COST_FLOPS,
                          SMALL_PRODUCT_COST, WEIGHTS_FIRST_FEATURES_PER_ROW, WEIGHTS_FIRST_ROWS, _factor_atoms, _rows,
                          _rows_of_sparse_product, _times_weight_rows, bilinear_backward_is_dense,
                          bilinear_forward_is_per_sample, dense_decode_is_cheaper, dense_encoder_backward_is_dense,
                          gather_block_columns, gather_columns_per_block, weights_first_is_faster)
from writesae.train import TrainConfig, make_optimizer, training_step, _guard

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "sae.json"
CLASSES = {"flat": FlatSAE, "matrix": MatrixSAE, "bilinear": BilinearMatrixSAE}
HEAD_SHAPES = {"Qwen3.5-0.8B": (128, 128), "gdn-austen": (64, 64)}
N_FEATURES = (64, 1024, 16384)
BATCHES = (32, 256, 1024)
K = 32
#: issue 28's goal: a step of at least BIG_STEP_GFLOP runs at GOAL_MATMUL_FRACTION of a plain matmul's rate or more
BIG_STEP_GFLOP = 1
GOAL_MATMUL_FRACTION = 0.6
#: and a step at the smallest shapes spends at most this beyond its FLOPs' time at the matmul rate
GOAL_OVERHEAD_MS = 2


def training_step_flops(architecture: str, batch: int, n: int, k: int, d_k: int, d_v: int, rank: int = 1) -> int:
    """FLOPs of one training step per head (forward and backward), matrix products only (2 per
    multiply-add; the elementwise work, top-k, norms and Adam are not counted), as the step computes
    them. D = d_k·d_v, B = batch, and "gathered" where `writesae.sae.dense_decode_is_cheaper` picks it:

    encoder     2·B·n·D (z = W_enc·x), and backward (∂W_enc; ∂b_dec, summed over the samples) 2·B·n·D + 2·n·D
                dense or 2·B·k·D + 2·min(n, B·k)·D gathered (TopK passes a gradient to k features), as
                `writesae.sae.dense_encoder_backward_is_dense` picks; bilinear:
                2·B·n·D against its rows E_i = Σ_r U_ir P_irᵀ plus 2·n·r·D to form them, or 2·B·n·r·D for every
                sample's products C P_ir plus 2·B·n·r·d_k for their dot products with U_ir, as
                `writesae.sae.bilinear_forward_is_per_sample` picks, and backward (∂U, ∂P,
                ∂b_dec) 4·B·k·r·D + 2·min(n, B·k)·r·D gathered or, dense, 2·B·n·D + 2·n·D plus 6·n·r·D (E formed
                again; ∂U, ∂P from ∂E), as `writesae.sae.bilinear_backward_is_dense` picks
    decoder     gathered:     6·B·k·D flat, 6·B·k·r·D factored (x̂; ∂values; ∂atoms)
                dense:        6·B·n·D, plus 6·n·r·D to form the atoms when factored
    (AuxK adds nothing while no feature is dead, as in the benchmark.)
    """
    D = d_k * d_v
    r = 1 if architecture == "flat" else rank
    gathered = not dense_decode_is_cheaper(batch, n, k, d_k, d_v, None if architecture == "flat" else rank)
    if architecture == "bilinear":
        backward = (2 * batch * n * D + 2 * n * D + 6 * n * r * D if bilinear_backward_is_dense(batch, n, k, d_k, d_v, r)
                    else 4 * batch * k * r * D + 2 * min(n, batch * k) * r * D)
        forward = (2 * batch * n * r * (D + d_k) if bilinear_forward_is_per_sample(batch, d_k, d_v, r)
                   else 2 * batch * n * D + 2 * n * r * D)
        encoder = forward + backward
    else:
        backward = (2 * batch * n * D + 2 * n * D if dense_encoder_backward_is_dense(batch, n, k, d_k, d_v)
                    else 2 * batch * k * D + 2 * min(n, batch * k) * D)
        encoder = 2 * batch * n * D + backward
    decoder = 6 * batch * k * r * D if gathered else 6 * batch * n * D + (0 if architecture == "flat" else 6 * n * r * D)
    return encoder + decoder


def state_bytes(sae) -> int:
    """Weights, gradients and Adam's two moments."""
    return 4 * sum(p.numel() * p.element_size() for p in sae.parameters())


def parameter_count(architecture: str, n: int, d_k: int, d_v: int) -> int:
    D = d_k * d_v
    return {"flat": 2 * n * D, "matrix": n * D + n * (d_k + d_v), "bilinear": 2 * n * (d_k + d_v)}[architecture] + n + D


def train_step(sae, batch: torch.Tensor):
    """The trainer's step (`writesae.train.training_step`, Adam at lr 1e-4) on a fixed batch, as a
    function of no arguments; `benchmarks.gpu_check` times it too."""
    cfg = TrainConfig(batch_size=len(batch), lr=1e-4)
    optimizer = make_optimizer(sae, cfg)
    since_fired = torch.zeros(sae.n_dicts, sae.cfg.n_features, dtype=torch.long, device=batch.device)
    guard = functools.partial(_guard, 0, Path(os.devnull), None)

    def step():
        training_step(sae, optimizer, batch, since_fired, cfg, guard)

    step.flops = training_step_flops(sae.cfg.architecture, len(batch), sae.cfg.n_features, sae.cfg.k, sae.cfg.d_k,
                                     sae.cfg.d_v, sae.cfg.rank) * sae.n_dicts
    return step


def step_flops(step) -> int:
    """The FLOPs of a step made by `train_step` (`training_step_flops`, times its heads)."""
    return step.flops


def plain_step(sae, batch: torch.Tensor):
    """The trainer's step (`train_step`) for a one-head, rank-1 TopK ``sae`` at input scale 1, written plainly in eager
    PyTorch, as a function of no arguments: the centred input C = X − b_dec, z = C·Eᵀ + b_enc with the encoder's rows
    E (W_enc, or the bilinear encoder's U_i P_iᵀ formed whole), the codes of its top k, the reconstruction loss
    mean ‖C − codes·atoms‖² with every atom formed and decoded densely, its backward, Adam (`make_optimizer`'s), and
    the factors' unit norms as each class's ``normalize_factors_`` keeps them. Nothing else: no hook points, routes,
    finiteness guards, dead counters or AuxK (which adds nothing while no feature is dead). The same update to float
    rounding (tests/test_bench_sae.py): what the same maths costs without the trainer's machinery, timed beside the
    trainer's step at the smallest shapes (`plain_step_row`)."""
    architecture, k = sae.cfg.architecture, sae.cfg.k
    if sae.n_dicts != 1 or sae.cfg.rank != 1 or sae.cfg.sparsity != "topk" or sae.cfg.input_scale != 1 or sae.cfg.tied:
        raise ValueError("plain_step writes out one head of an untied rank-1 TopK SAE at input scale 1")
    x = batch.flatten(1)
    optimizer = make_optimizer(sae, TrainConfig(batch_size=len(batch), lr=1e-4))

    def step():
        centred = x - sae.b_dec.flatten()
        rows = _factor_atoms(*sae.encoder_factors)[0].flatten(1) if architecture == "bilinear" else sae.W_enc[0]
        atoms = sae.W_dec[0] if architecture == "flat" else _factor_atoms(sae.V, sae.W)[0].flatten(1)
        pre = torch.addmm(sae.b_enc[0], centred, rows.T)
        values, indices = pre.topk(k, dim=-1)
        codes = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        loss = (centred - codes @ atoms).square().sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            if architecture == "flat":  # unit rows of W_dec, each code's rows of W_enc and b_enc scaled to keep a_i W_dec,i
                norms = sae.W_dec.norm(dim=-1, keepdim=True)
                sae.W_dec /= norms
            else:
                norms = sae.V.norm(dim=-1) * sae.W.norm(dim=-1)
                for factor in (sae.V, sae.W, *((sae.U, sae.P) if architecture == "bilinear" else ())):
                    factor /= factor.norm(dim=-1, keepdim=True)
            if architecture != "bilinear":
                sae.W_enc *= norms
                sae.b_enc *= norms[..., 0]

    return step


def optimizer_step(sae):
    """The trainer's Adam step alone on ``sae``'s parameters, each given a gradient, as a function of no
    arguments (it moves the weights: time it after the training step)."""
    optimizer = make_optimizer(sae, TrainConfig(batch_size=1, lr=1e-4))
    for parameter in sae.parameters():
        parameter.grad = torch.full_like(parameter, 1e-3)
    return optimizer.step


#: fresh pairs of inputs the reference matmul is timed on, the fastest kept: a square matmul of one size ran up to a
#: quarter slower on some allocations than on others in one process (and between runs), which made the reference, and
#: so whether a row met the goal, depend on where its inputs landed
MATMUL_REFERENCE_TRIALS = 3


def square_matmul(flops: int, device, dtype=torch.float32):
    """One plain square ``torch.matmul`` of about ``flops`` FLOPs (2·m³) on fresh random inputs, as a function of no
    arguments, and its exact FLOPs."""
    m = max(1, round((flops / 2) ** (1 / 3)))
    a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))
    return (lambda: torch.matmul(a, b)), 2 * m**3


def step_and_matmul_seconds(step, device, repeats: int) -> tuple[float, float, int]:
    """Median seconds of a step made by `train_step` (its warm-up also allocates Adam's moments) and, right after
    it, of a plain square matmul of its FLOPs (the fastest median of `MATMUL_REFERENCE_TRIALS` input pairs), each
    in a run of its own calls; and the matmul's exact FLOPs. Not in turn: a matmul timed between steps ran slower,
    by up to a quarter at some shapes (a run of 6c6cb3b and one that timed a second matmul right after the first),
    which made the reference easier."""
    seconds = median_seconds(step, repeats, settle=True)
    trials = [square_matmul(step_flops(step), device) for _ in range(MATMUL_REFERENCE_TRIALS)]
    return seconds, min(median_seconds(matmul, repeats, settle=True) for matmul, _ in trials), trials[0][1]


#: the dense matrix products whose time alone gives a step's products bound (`step_work_seconds`)
MATRIX_PRODUCTS = (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm, torch.ops.aten.baddbmm)
#: a TopK step's sparse work, whose time alone is added to its products' in the work bound (`step_work_seconds`):
#: selecting the codes and scattering them out, gathering the active atoms or rows and adding their gradients back, the
#: index sorts and counts behind a CSR product, and a product with a sparse operand. Memory-bound, and beside the
#: products a FLOP count barely sees it, but a route the shapes pick (`writesae.sae.dense_decode_is_cheaper` and the
#: rules beside it) takes it where it is faster than the dense product that would replace it
SPARSE_WORK = (torch.ops.aten.topk, torch.ops.aten.scatter, torch.ops.aten.scatter_, torch.ops.aten.scatter_add,
               torch.ops.aten.scatter_add_, torch.ops.aten.gather, torch.ops.aten.index, torch.ops.aten.index_select,
               torch.ops.aten.index_add, torch.ops.aten.index_add_, torch.ops.aten._embedding_bag,
               torch.ops.aten._embedding_bag_backward, torch.ops.aten._embedding_bag_per_sample_weights_backward,
               torch.ops.aten.sort, torch.ops.aten.bincount, torch.ops.aten.cumsum)


@dataclasses.dataclass(frozen=True)
class _Operand:
    """A recorded product's tensor argument: what a fresh one needs to be laid out the same."""
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "_Operand":
        return cls(tensor.shape, tensor.stride(), tensor.dtype, tensor.device)

    def fresh(self) -> torch.Tensor:
        numbers = 1 + sum((size - 1) * step for size, step in zip(self.shape, self.stride)) if all(self.shape) else 0
        return torch.randn(numbers, dtype=self.dtype, device=self.device).as_strided(self.shape, self.stride)


#: the trainer's Adam step (`writesae.train.make_optimizer`'s fused kernel)
ADAM = (torch.ops.aten._fused_adam_,)
#: the parts of a step `operator_kind` tells apart: what the work bound times (`step_work_seconds`) and how the
#: breakdown groups a step's time (`time_by_op_kind`)
OP_KINDS = ("matrix products", "sparse work", "Adam", "other operators")


def operator_kind(func, args: tuple, kwargs: dict) -> str:
    """Which of `OP_KINDS` an ATen call is: "sparse work" (`SPARSE_WORK`, and a product with a sparse operand: a
    gathered backward's CSR product), "matrix products" (`MATRIX_PRODUCTS` on dense operands), "Adam" (`ADAM`), or
    "other operators" (elementwise work, reductions, copies, views)."""
    packet = func.overloadpacket
    if packet in SPARSE_WORK:
        return "sparse work"
    if packet in MATRIX_PRODUCTS:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        return "sparse work" if any(t.layout != torch.strided for t in tensors) else "matrix products"
    return "Adam" if packet in ADAM else "other operators"


def _unwritten(func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``func``'s arguments with a copy in place of each tensor it writes to (its schema's ``a!``)."""
    written = {a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    args = tuple(a.clone() if isinstance(a, torch.Tensor) and schema.name in written else a
                 for a, schema in zip(args, func._schema.arguments))
    return args, {name: a.clone() if isinstance(a, torch.Tensor) and name in written else a for name, a in kwargs.items()}


class _StepWork(TorchDispatchMode):
    """Records the work a step's routes cannot skip, each call as (overload, args, kwargs): its dense matrix products
    (`MATRIX_PRODUCTS` on dense operands) in ``products``, their tensors as `_Operand`, and its sparse work
    (`SPARSE_WORK`, and a product with a sparse operand: a gathered backward's CSR product) in ``sparse``, on the
    tensors it ran on (its indices must stay valid), each one it writes to copied, so that timing it again leaves the
    step's tensors as they were."""

    def __init__(self):
        super().__init__()
        self.products, self.sparse = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = operator_kind(func, args, kwargs)
        if kind == "sparse work":
            self.sparse.append((func, *_unwritten(func, args, kwargs)))
        elif kind == "matrix products":
            self.products.append((func, *tree_map_only(torch.Tensor, _Operand.of, (args, kwargs))))
        return func(*args, **kwargs)

def step_work_seconds(step, repeats: int) -> tuple[float, float]:
    """The dense matrix products one call of ``step`` runs, each timed alone (median of ``repeats``) on fresh random
    operands of its shapes, strides and dtypes, summed: the step's products at the rate this CPU's BLAS gives their own
    shapes, where the reference gives them a square matmul's; and its sparse work (`SPARSE_WORK`), each call timed
    alone on the tensors it ran on, summed."""
    with _StepWork() as recorded:
        step()
    products = 0.0
    for func, args, kwargs in recorded.products:
        args, kwargs = tree_map_only(_Operand, _Operand.fresh, (args, kwargs))
        products += median_seconds(lambda: func(*args, **kwargs), repeats, settle=True)
    with torch.no_grad():  # the step's tensors include views autograd made, which it refuses to see written to again
        sparse = sum(median_seconds(lambda: func(*args, **kwargs), repeats, settle=True)
                     for func, args, kwargs in recorded.sparse)
    return products, sparse


def grid_sae_and_batch(architecture: str, shape: str, n: int, batch: int, device: torch.device | str = "cpu"):
    """The SAE (seed 0, TopK `K`) and the random batch (seed 0, drawn on the CPU: the same numbers on every device) a
    grid step at these shapes runs on."""
    d_k, d_v = HEAD_SHAPES[shape]
    sae = CLASSES[architecture](d_k=d_k, d_v=d_v, n_features=n, k=K, seed=0, device=device)
    return sae, torch.randn(batch, 1, d_k, d_v, generator=torch.Generator().manual_seed(0)).to(device)


def at_smallest_shapes(row: dict) -> bool:
    """Whether a grid row is at the smallest shapes (the fewest features and the smallest batch), where goal 3's
    overhead is judged."""
    return row["n_features"] == min(N_FEATURES) and row["batch"] == min(BATCHES)


def step_row(architecture: str, shape: str, n: int, batch: int, repeats: int, device: torch.device | str = "cpu") -> dict:
    """A grid step's row: its time, FLOPs and matmul fraction, its overhead, Adam alone and the bounds (the module
    docstring), all measured on ``device`` (`benchmarks.gpu_check` runs the grid on a GPU)."""
    d_k, d_v = HEAD_SHAPES[shape]
    sae, x = grid_sae_and_batch(architecture, shape, n, batch, device)
    step = train_step(sae, x)
    flops = step_flops(step)
    seconds, mm_seconds, mm_flops = step_and_matmul_seconds(step, device, repeats)
    adam_seconds = median_seconds(optimizer_step(sae), repeats, settle=True)
    product_seconds, sparse_seconds = step_work_seconds(step, repeats)
    flop_seconds = mm_seconds * flops / mm_flops
    return {"architecture": architecture, "head_shape": shape, "d_k": d_k, "d_v": d_v, "n_features": n, "batch": batch,
            "k": K, "decode": "dense" if dense_decode_is_cheaper(batch, n, K, d_k, d_v, None if architecture == "flat" else 1)
            else "gathered", "step_ms": 1e3 * seconds, "states_per_s": batch / seconds, "step_gflop": flops / 1e9,
            "gflop_per_s": flops / seconds / 1e9, "matmul_gflop_per_s": mm_flops / mm_seconds / 1e9,
            "matmul_fraction": (flops / seconds) / (mm_flops / mm_seconds),
            "overhead_ms": 1e3 * (seconds - flop_seconds), "adam_ms": 1e3 * adam_seconds,
            "limit_fraction": (flop_seconds + adam_seconds) / seconds,
            "adam_bound_fraction": flop_seconds / (flop_seconds + adam_seconds), "products_ms": 1e3 * product_seconds,
            "products_bound_fraction": flop_seconds / (product_seconds + adam_seconds),
            "sparse_work_ms": 1e3 * sparse_seconds,
            "work_bound_fraction": flop_seconds / (product_seconds + sparse_seconds + adam_seconds)}


#: a shape at which a step's work is negligible (d_k = d_v = 2, n = 4, k = 2, batch 2): its time there is the step's
#: fixed cost, Python, autograd's bookkeeping and the dispatch of its operators, which no smaller shape removes
TRIVIAL_SHAPE = {"d": 2, "n_features": 4, "k": 2, "batch": 2}


class _OperatorCount(TorchDispatchMode):
    """Counts the ATen operators run inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def fixed_cost_row(architecture: str, repeats: int, device: torch.device | str = "cpu") -> dict:
    """The trainer's step at `TRIVIAL_SHAPE` (median ms) and the ATen operators one step runs there."""
    t = TRIVIAL_SHAPE
    sae = CLASSES[architecture](d_k=t["d"], d_v=t["d"], n_features=t["n_features"], k=t["k"], seed=0, device=device)
    step = train_step(sae, torch.randn(t["batch"], 1, t["d"], t["d"], generator=torch.Generator().manual_seed(0)).to(device))
    seconds = median_seconds(step, repeats, settle=True)
    with _OperatorCount() as counted:
        step()
    return {"architecture": architecture, **t, "step_ms": 1e3 * seconds, "operators": counted.count}


def plain_step_row(row: dict, repeats: int, device: torch.device | str = "cpu") -> dict:
    """The trainer's step and `plain_step` at a grid row's shapes, each on an SAE of its own from the same seed and
    the row's batch, timed in turn (`interleaved_medians`, median of ``repeats``), and each one's overhead beyond the
    row's FLOPs at its matmul rate (the row's, measured on the same device)."""
    shapes = row["architecture"], row["head_shape"], row["n_features"], row["batch"], device
    (ours, x), (plain, _) = grid_sae_and_batch(*shapes), grid_sae_and_batch(*shapes)
    times = interleaved_medians({"step": train_step(ours, x), "plain": plain_step(plain, x)}, repeats, settle=True)
    flop_ms = row["step_ms"] - row["overhead_ms"]
    return {key: row[key] for key in ("architecture", "head_shape", "d_k", "d_v", "n_features", "batch")} | {
        "step_ms": 1e3 * times["step"], "plain_ms": 1e3 * times["plain"], "step_over_plain": times["step"] / times["plain"],
        "overhead_ms": 1e3 * times["step"] - flop_ms, "plain_overhead_ms": 1e3 * times["plain"] - flop_ms}


class _OperatorTimes(TorchDispatchMode):
    """Adds up the wall time of the ATen calls run inside it by `operator_kind`, in seconds. A call is timed where
    the step runs it, after autograd, and the calls it makes in turn are inside its own time: the same calls the work
    bound records (`_StepWork`)."""

    def __init__(self):
        super().__init__()
        self.seconds = dict.fromkeys(OP_KINDS, 0.0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        start = time.perf_counter()
        out = func(*args, **kwargs)
        self.seconds[operator_kind(func, args, kwargs)] += time.perf_counter() - start
        return out


#: steps `time_by_op_kind` runs with its operators timed before the ones it records
BREAKDOWN_WARM_UP_STEPS = 3


def time_by_op_kind(architecture: str, shape: str, n: int, batch: int, repeats: int) -> dict:
    """Where one trainer step's time goes (ms per step): the time of its ATen calls of each of `OP_KINDS`
    (`_OperatorTimes`, the mean over ``repeats`` steps), and "between operators" (the step's median time, run
    without the timer, less all of those: Python, autograd's bookkeeping and dispatch)."""
    d_k, d_v = HEAD_SHAPES[shape]
    sae, x = grid_sae_and_batch(architecture, shape, n, batch)
    step = train_step(sae, x)
    seconds = median_seconds(step, repeats, settle=True)
    # the timer's own allocations unsettle the heap: steps under it fault memory in again until it settles, so it
    # warms up before the steps it records
    with _OperatorTimes():
        for _ in range(BREAKDOWN_WARM_UP_STEPS):
            step()
    with _OperatorTimes() as timed:
        for _ in range(repeats):
            step()
    ms = {kind: 1e3 * s / repeats for kind, s in timed.seconds.items()}
    ms["between operators"] = 1e3 * seconds - sum(ms.values())
    return {"architecture": architecture, "d_k": d_k, "d_v": d_v, "n_features": n, "batch": batch,
            "step_ms": 1e3 * seconds, "ms": ms}


def _route_row(architecture: str, d: int, n: int, batch: int, k: int, times: dict[str, float], rule_says_dense: bool
               ) -> dict:
    """A row of the route tables: both routes' median seconds ``times`` ("dense", "gathered"), which one the rule
    picks at these shapes, and how far the pick's time is from the faster one's."""
    chosen = "dense" if rule_says_dense else "gathered"
    return {"architecture": architecture, "d_k": d, "d_v": d, "n_features": n, "batch": batch, "k": k,
            "dense_ms": 1e3 * times["dense"], "gathered_ms": 1e3 * times["gathered"], "rule_picks": chosen,
            "faster": min(times, key=times.get), "picked_time_over_best": times[chosen] / min(times.values())}


def decode_row(architecture: str, d: int, n: int, batch: int, repeats: int, k: int = K,
               device: torch.device | str = "cpu") -> dict:
    """Forward + backward of decode_atoms by each route, on the same codes (k features a sample), against a dense
    random gradient as a training step's (a summed output's gradient is one number broadcast, which made
    ``embedding_bag``'s backward, the flat gathered route, two to three times as slow: the rows behind
    ``FACTOR_GATHER_COST_FLOPS`` were timed that way, see its comment). The codes and gradient are drawn on the CPU
    and moved to ``device``."""
    sae = CLASSES[architecture](d_k=d, d_v=d, n_features=n, k=k, seed=0, device=device)
    g = torch.Generator().manual_seed(0)
    indices = torch.rand(batch, 1, n, generator=g).topk(k, dim=-1).indices.to(device)
    values = torch.rand(batch, 1, k, generator=g).to(device).requires_grad_()
    upstream = torch.randn(batch, 1, d, d, generator=g).to(device)
    times = {}
    for route in ("dense", "gathered"):
        def run(route=route):
            for tensor in (values, *sae.parameters()):
                tensor.grad = None  # as a training step starts
            with mock.patch("writesae.sae.dense_decode_is_cheaper", lambda *shape: route == "dense"):
                sae.decode_atoms(indices, values).backward(upstream)
        times[route] = median_seconds(run, repeats, settle=True)
    return _route_row(architecture, d, n, batch, k, times,
                      dense_decode_is_cheaper(batch, n, k, d, d, None if architecture == "flat" else 1))


def encoder_backward_row(architecture: str, d: int, n: int, batch: int, repeats: int, k: int = K) -> dict:
    """Forward + backward of an encoder (rank 1) by each route of its backward, against a TopK-sparse gradient of z
    (k features per sample): for the bilinear encoder, the measurement behind `writesae.sae.SMALL_PRODUCT_COST`;
    for a flat SAE's dense encoder, the measurement behind ``ENCODER_ROW_GATHER_COST_FLOPS``
    (`writesae.sae.dense_encoder_backward_is_dense`)."""
    sae = CLASSES[architecture](d_k=d, d_v=d, n_features=n, k=k, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, d, d, generator=g)
    upstream = torch.zeros(batch, 1, n).scatter(-1, torch.rand(batch, 1, n, generator=g).topk(k, dim=-1).indices,
                                                torch.randn(batch, 1, k, generator=g))
    rule = "bilinear_backward_is_dense" if architecture == "bilinear" else "dense_encoder_backward_is_dense"
    times = {}
    for route in ("dense", "gathered"):
        def run(route=route):
            for parameter in sae.parameters():
                parameter.grad = None  # as a training step starts
            with mock.patch(f"writesae.sae.{rule}", lambda *shape: route == "dense"):
                (sae.encode_pre(x) * upstream).sum().backward()
        times[route] = median_seconds(run, repeats, settle=True)
    return _route_row(architecture, d, n, batch, k, times,
                      bilinear_backward_is_dense(batch, n, k, d, d, 1) if architecture == "bilinear"
                      else dense_encoder_backward_is_dense(batch, n, k, d, d))


def encoder_forward_row(d: int, n: int, batch: int, rank: int, repeats: int) -> dict:
    """The bilinear encoder's forward (without gradients: the same products as with them) on the same states by each
    route of `writesae.sae._bilinear_product`: its rows E formed in one product, the rows in blocks of
    `writesae.sae.ENCODER_NUMBERS_PER_BLOCK` numbers, and every sample's products C P_ir in blocks of
    `writesae.sae.PER_SAMPLE_NUMBERS_PER_BLOCK`; with the route
    `writesae.sae.bilinear_forward_is_per_sample` picks and how far its time is from the fastest."""
    sae = BilinearMatrixSAE(d_k=d, d_v=d, n_features=n, k=K, rank=rank, seed=0)
    x = torch.randn(batch, 1, d, d, generator=torch.Generator().manual_seed(0))
    times = {}
    for route, numbers, per_sample in (("one_product", n * d * d, False), ("blocks", ENCODER_NUMBERS_PER_BLOCK, False),
                                       ("per_sample", ENCODER_NUMBERS_PER_BLOCK, True)):
        def run(numbers=numbers, per_sample=per_sample):
            with (mock.patch("writesae.sae.ENCODER_NUMBERS_PER_BLOCK", numbers),
                  mock.patch("writesae.sae.bilinear_forward_is_per_sample", lambda *shape: per_sample), torch.no_grad()):
                sae.encode_pre(x)
        times[route] = median_seconds(run, repeats, settle=True)
    picked = "per_sample" if bilinear_forward_is_per_sample(batch, d, d, rank) else "blocks"
    return {"architecture": "bilinear", "d_k": d, "d_v": d, "n_features": n, "batch": batch, "rank": rank,
            "E_mib": n * d * d * 4 / 2**20, **{f"{route}_ms": 1e3 * t for route, t in times.items()},
            "blocks_over_one_product": times["blocks"] / times["one_product"], "rule_picks": picked,
            "picked_time_over_best": times[picked] / min(times["blocks"], times["per_sample"])}


def added_products(rows: torch.Tensor, values: torch.Tensor, x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """`writesae.sae._rows_of_sparse_product` by forming the products values_sj x_s and adding them with
    ``index_add_``: the route it replaced, kept here as its baseline."""
    products = values.unsqueeze(-1) * x.view(*values.shape[:-1], 1, -1)  # [B, n_dicts, m, D]
    return x.new_zeros(n_rows, x.shape[-1]).index_add_(0, rows.flatten(), products.reshape(-1, x.shape[-1]))


def sparse_product_row(d: int, n: int, batch: int, repeats: int) -> dict:
    """A dense encoder's gathered ∂W_enc by its CSR product (`writesae.sae._rows_of_sparse_product`) and by
    `added_products`, for K random features per sample of one n-feature dictionary and rows of d·d numbers."""
    g = torch.Generator().manual_seed(0)
    rows = _rows(torch.rand(batch, 1, n, generator=g).topk(K, dim=-1).indices, n)
    values, x = torch.randn(batch, 1, K, generator=g), torch.randn(batch, d * d, generator=g)
    times = {route: median_seconds(lambda product=product: product(rows, values, x, n), repeats, settle=True)
             for route, product in (("products", added_products), ("csr", _rows_of_sparse_product))}
    return {"d_k": d, "d_v": d, "n_features": n, "batch": batch, "k": K, "products_mib": batch * K * d * d * 4 / 2**20,
            "products_per_row": batch * K / n, "products_ms": 1e3 * times["products"], "csr_ms": 1e3 * times["csr"],
            "csr_over_products": times["csr"] / times["products"]}


def gathered_sum_row(use: str, d: int, n: int, batch: int, repeats: int) -> dict:
    """A gathered sum with M read whole and in blocks of columns (`writesae.sae.gather_columns_per_block`), for
    K random features per sample of one n-feature dictionary at d × d: ``use`` "dW_enc", a dense encoder's
    gathered ∂W_enc (`_rows_of_sparse_product`, M the batch's states) in one block and in the rule's blocks
    whether it picks them or not; "flat decode", a flat decoder's gathered decode forward and backward (M its
    W_dec) by ``embedding_bag`` and by `_BlockedGatheredRows` in the rule's blocks."""
    g = torch.Generator().manual_seed(0)
    indices = torch.rand(batch, 1, n, generator=g).topk(K, dim=-1).indices
    m_rows, result_rows = (batch, n) if use == "dW_enc" else (n, batch)
    blocked = gather_columns_per_block(m_rows, result_rows, batch * K, d * d, torch.device("cpu")) < d * d
    width = min(gather_block_columns(m_rows), d * d)
    if use == "dW_enc":
        rows, values, x = _rows(indices, n), torch.randn(batch, 1, K, generator=g), torch.randn(batch, d * d, generator=g)
        run = lambda: _rows_of_sparse_product(rows, values, x, n)
    else:
        sae = FlatSAE(d_k=d, d_v=d, n_features=n, k=K, seed=0)
        values = torch.rand(batch, 1, K, generator=g, requires_grad=True)
        upstream = torch.randn(batch, 1, d, d, generator=g)  # a training step's dense gradient of the decode

        def run():
            sae.W_dec.grad = values.grad = None  # as a training step starts
            sae.decode_atoms(indices, values).backward(upstream)
    times = {}
    for route in ("whole", "blocks"):
        def columns(m, result, terms, total, device, route=route):  # this sum as the route says, any other by the rule
            if (m, result) != (m_rows, result_rows):
                return gather_columns_per_block(m, result, terms, total, device)
            return total if route == "whole" else width
        with mock.patch("writesae.sae.gather_columns_per_block", columns):
            times[route] = median_seconds(run, repeats, settle=True)
    chosen = "blocks" if blocked else "whole"
    return {"use": use, "d_k": d, "d_v": d, "n_features": n, "batch": batch, "k": K, "m_mib": m_rows * d * d * 4 / 2**20,
            "reads_per_row": batch * K / m_rows, "columns_per_block": width, "whole_ms": 1e3 * times["whole"],
            "blocks_ms": 1e3 * times["blocks"], "rule_picks": chosen, "faster": min(times, key=times.get),
            "picked_time_over_best": times[chosen] / min(times.values())}


def product_layout_row(d: int, n: int, rows: int, repeats: int) -> dict:
    """``rows`` rows of d·d numbers times n weight rows, c·Wᵀ (`writesae.sae._times_weight_rows`, one head), in
    einsum's layout and weights first, (W·cᵀ)ᵀ; with what `writesae.sae.weights_first_is_faster` picks."""
    g = torch.Generator().manual_seed(0)
    left, W = torch.randn(rows, 1, d * d, generator=g), torch.randn(1, n, d * d, generator=g)
    times = {}
    for route in ("einsum", "weights_first"):
        with mock.patch("writesae.sae.weights_first_is_faster", lambda *shape, route=route: route == "weights_first"):
            times[route] = median_seconds(lambda: _times_weight_rows(left, W), repeats, settle=True)
    chosen = "weights_first" if weights_first_is_faster(rows, n, torch.device("cpu")) else "einsum"
    return {"d_k": d, "d_v": d, "n_features": n, "rows": rows, "einsum_ms": 1e3 * times["einsum"],
            "weights_first_ms": 1e3 * times["weights_first"], "einsum_over_weights_first": times["einsum"] / times["weights_first"],
            "rule_picks": chosen, "picked_time_over_best": times[chosen] / min(times.values())}


def _routes_table(rows: list[dict]) -> list[str]:
    return ["| SAE | d | n | batch | k | dense | gathered | rule picks | picked / best |", "|---|---|---|---|---|---|---|---|---|",
            *[f"| {r['architecture']} | {r['d_k']} | {r['n_features']} | {r['batch']} | {r['k']} | {r['dense_ms']:.1f} | "
              f"{r['gathered_ms']:.1f} | {r['rule_picks']} | {r['picked_time_over_best']:.2f} |" for r in rows]]


def _slow_picks_line(rows: list[dict]) -> str:
    counts = {architecture: slow_picks([r for r in rows if r["architecture"] == architecture])
              for architecture in dict.fromkeys(r["architecture"] for r in rows)}
    return f"Picks slower than the other route by more than a factor {SLOW_PICK}: " + "; ".join(
        f"{architecture} {c['slow']} of {c['rows']} (the slowest {c['slowest']:.2f} times)"
        for architecture, c in counts.items()) + "."


def grid_definitions(matmul_reference_trials: int) -> str:
    """What the grid table's columns mean (RESULTS.md's P5 section and `benchmarks.gpu_check`'s)."""
    return ("FLOPs counted analytically (`benchmarks.bench_sae.training_step_flops`); *matmul fraction*: achieved FLOP/s "
            "over a plain square `torch.matmul` of the same FLOPs timed beside it (the fastest of "
            f"{matmul_reference_trials} pairs of fresh inputs); *overhead*: step time minus that matmul's time; *Adam*: "
            "the trainer's Adam step alone on the same parameters; *limit fraction*: (the FLOPs at the matmul rate + "
            "Adam alone) / step time; *Adam bound*: the FLOPs' time at the matmul rate / (that + Adam alone), the "
            "highest matmul fraction the step could reach were everything but its products and Adam free; *products "
            "bound*: the same with the step's dense matrix products each timed alone at their own shapes and strides in "
            "place of the FLOPs' time at the matmul rate; *work bound*: the same with the step's sparse work "
            "(`benchmarks.bench_sae.SPARSE_WORK`: top-k, gathers, scatters, a CSR product; each call timed alone on the "
            "tensors it ran on) added to its products.")


def grid_lines(results: dict, fixed_cost_repeats: int) -> list[str]:
    """The grid's table, issue 28's goals judged on it (``results["summary"]``, `summary`), the step's fixed cost and,
    at the smallest shapes, the plain step beside it (medians of ``fixed_cost_repeats``): the part of RESULTS.md's P5
    section that `benchmarks.gpu_check` renders from its own run as well."""
    lines = ["| SAE | head | n | batch | decode | states/s | GFLOP/step | matmul fraction | overhead ms | Adam ms | "
             "limit fraction | Adam bound | products bound | work bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['architecture']} | {r['d_k']}×{r['d_v']} | {r['n_features']} | {r['batch']} | {r['decode']} | "
              f"{r['states_per_s']:.0f} | {r['step_gflop']:.3g} | {r['matmul_fraction']:.2f} | {r['overhead_ms']:.1f} | "
              f"{r['adam_ms']:.1f} | {r['limit_fraction']:.2f} | {r['adam_bound_fraction']:.2f} | "
              f"{r['products_bound_fraction']:.2f} | {r['work_bound_fraction']:.2f} |" for r in results["rows"]]
    s = results["summary"]
    adam, t, misses = s["smallest_adam_ms"], TRIVIAL_SHAPE, s["big_steps"] - s["big_steps_meeting_goal"]
    goal = f"Goal ≥ {GOAL_MATMUL_FRACTION} of the matmul rate on steps of ≥ {BIG_STEP_GFLOP} GFLOP: "
    lines += ["", (goal + "no step here has that many. " if not s["big_steps"] else
              f"{goal}{s['big_steps_meeting_goal']} of "
              f"{s['big_steps']} meet it (lowest {s['big_steps_lowest_fraction']:.2f}); their limit fractions lie in "
              f"{s['big_steps_limit_fraction'][0]:.2f}–{s['big_steps_limit_fraction'][1]:.2f}. "
              f"{len(s['big_steps_bound_by_adam'])} of the {misses} that miss it "
              f"cannot meet it on this machine with Adam, their Adam bound being below {GOAL_MATMUL_FRACTION}: "
              f"{'; '.join(s['big_steps_bound_by_adam']) or 'none'}. {len(s['big_steps_bound_by_products'])} of the "
              f"{misses} cannot meet it with their matrix products as they are formed, their products bound being below "
              f"{GOAL_MATMUL_FRACTION}: {'; '.join(s['big_steps_bound_by_products']) or 'none'}. "
              f"{len(s['big_steps_bound_by_work'])} of the {misses} cannot meet it with their products and sparse work "
              f"as their routes form them, their work bound being below {GOAL_MATMUL_FRACTION}: "
              f"{'; '.join(s['big_steps_bound_by_work']) or 'none'}. The big steps' matmul fractions are "
              f"{min(s['big_steps_within_work_bound']):.2f}–{max(s['big_steps_within_work_bound']):.2f} of their work "
              "bounds. ") + f"Goal ≤ {GOAL_OVERHEAD_MS} ms overhead at the "
              f"smallest shapes (n = {min(N_FEATURES)}, batch {min(BATCHES)}), of which Adam alone takes the second figure: "
              f"{', '.join(f'{a} {v:.1f} ms ({adam[a]:.1f})' for a, v in s['smallest_overhead_ms'].items())}."
              + (f" The step's fixed cost, its time at a trivial shape (d_k = d_v = {t['d']}, n = {t['n_features']}, "
                 f"k = {t['k']}, batch {t['batch']}; median of {fixed_cost_repeats}), and the operators it runs there: "
                 + ", ".join(f"{r['architecture']} {r['step_ms']:.2f} ms ({r['operators']})" for r in results["fixed_cost"])
                 + "." if results.get("fixed_cost") else "")]
    if results.get("plain_step"):
        lines += ["", f"At the smallest shapes, the trainer's step and a plain step of the same maths in eager PyTorch "
                  "(`benchmarks.bench_sae.plain_step`: every atom formed and decoded densely, no hook points, routes, "
                  f"guards or dead counters), timed in turn (medians of {fixed_cost_repeats}); each one's overhead is "
                  "its time less the row's FLOPs at the matmul rate:", "",
                  "| SAE | head | n | batch | step ms | plain step ms | step / plain | overhead ms | plain step's overhead ms |",
                  "|---|---|---|---|---|---|---|---|---|",
                  *[f"| {r['architecture']} | {r['d_k']}×{r['d_v']} | {r['n_features']} | {r['batch']} | {r['step_ms']:.2f} | "
                    f"{r['plain_ms']:.2f} | {r['step_over_plain']:.2f} | {r['overhead_ms']:.2f} | {r['plain_overhead_ms']:.2f} |"
                    for r in results["plain_step"]], "",
                  f"The plain step spends more than the goal's {GOAL_OVERHEAD_MS} ms beyond its FLOPs at "
                  f"{sum(r['plain_overhead_ms'] > GOAL_OVERHEAD_MS for r in results['plain_step'])} of these "
                  f"{len(results['plain_step'])} shapes, and the trainer's step at "
                  f"{sum(r['overhead_ms'] > GOAL_OVERHEAD_MS for r in results['plain_step'])}."]
    return lines


def decode_routes_lines(rows: list[dict], rules: dict) -> list[str]:
    """The decode routes' table, with the rule's constants ``rules`` (as `rule_constants` records them) and how often
    it picked a slow route (`slow_picks`)."""
    return ["Decode routes (forward + backward against a dense gradient, ms; `writesae.sae.dense_decode_is_cheaper` "
            f"with ROW_GATHER_COST_FLOPS = {rules['row_gather_cost_flops']} and DENSE_DECODE_FIXED_FEATURES = "
            f"{rules['dense_decode_fixed_features']} (flat) and FACTOR_GATHER_COST_FLOPS = "
            f"{rules['factor_gather_cost_flops']} (factored) picks one). {_slow_picks_line(rows)}", "",
            *_routes_table(rows)]


def results_block(results: dict | None) -> str:
    """RESULTS.md's P5 section, from ``benchmarks/results/sae.json``."""
    if results is None:
        return "Not yet run: `python -m benchmarks.bench_sae`.\n"
    p = results["provenance"]
    lines = [f"{run_line(p)}, medians of {p['repeats']} repeats after {p['warm_up']}, one head, TopK k = {p['k']}, Adam, "
             f"the trainer's step), `benchmarks/results/sae.json`. {grid_definitions(p['matmul_reference_trials'])}", "",
             *grid_lines(results, FIXED_COST_REPEATS), "",
             f"Skipped (over {p['max_gflop']} GFLOP a step or {p['max_gib']} GiB of state): "
             f"{'; '.join(results['skipped']) or 'none'}.", "",
             *decode_routes_lines(results["decode"], p), "",
             "The encoders' backward routes (encoder forward + backward against a TopK-sparse gradient, ms; for the "
             f"bilinear encoder `writesae.sae.bilinear_backward_is_dense` with SMALL_PRODUCT_COST = {p['small_product_cost']} "
             "picks one, for a flat SAE's dense encoder `writesae.sae.dense_encoder_backward_is_dense` with "
             f"ENCODER_ROW_GATHER_COST_FLOPS = {p['encoder_row_gather_cost_flops']}):", "",
             *_routes_table(results["encoder_backward"])]
    if results.get("encoder_forward"):
        lines += ["", "The bilinear encoder's forward (no gradients, ms; `writesae.sae._bilinear_product`) with its rows E formed "
                  f"in one product and in blocks of ENCODER_NUMBERS_PER_BLOCK = {p['encoder_numbers_per_block']} numbers, "
                  f"and by every sample's products C P_ir in blocks of PER_SAMPLE_NUMBERS_PER_BLOCK = "
                  f"{p['per_sample_numbers_per_block']}; `writesae.sae.bilinear_forward_is_per_sample` picks "
                  "per sample or the rows in blocks, whichever forms fewer numbers:", "",
                  "| SAE | d | n | rank | batch | E MiB | one product | blocks | per sample | blocks / one product | "
                  "rule picks | picked / best |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
                  *[f"| {r['architecture']} | {r['d_k']} | {r['n_features']} | {r['rank']} | {r['batch']} | {r['E_mib']:.0f} | "
                    f"{r['one_product_ms']:.1f} | {r['blocks_ms']:.1f} | {r['per_sample_ms']:.1f} | "
                    f"{r['blocks_over_one_product']:.2f} | {r['rule_picks'].replace('_', ' ')} | {r['picked_time_over_best']:.2f} |"
                    for r in results["encoder_forward"]]]
    if results.get("sparse_product"):
        lines += ["", "A dense encoder's gathered ∂W_enc (ms) by one CSR product (`writesae.sae._rows_of_sparse_product`) "
                  "and by forming its products and adding them (`benchmarks.bench_sae.added_products`, the route it replaced):", "",
                  "| d | n | batch | products MiB | products a row | products added | CSR | CSR / products added |",
                  "|---|---|---|---|---|---|---|---|",
                  *[f"| {r['d_k']} | {r['n_features']} | {r['batch']} | {r['products_mib']:.0f} | {r['products_per_row']:.2g} | "
                    f"{r['products_ms']:.1f} | {r['csr_ms']:.1f} | {r['csr_over_products']:.2f} |"
                    for r in results["sparse_product"]]]
    if results.get("gathered_sum"):
        lines += ["", "A gathered sum G·M (ms) reading M whole and in blocks of columns (`writesae.sae.gather_columns_per_block`: "
                  f"blocks where M has at least GATHER_BLOCKS_FROM = {p['gather_blocks_from']} numbers, each of its rows is "
                  f"read GATHER_BLOCKS_REUSE = {p['gather_blocks_reuse']} times or more, and the result has at most "
                  f"GATHER_BLOCKS_RESULT_ROWS = {p['gather_blocks_result_rows']} times M's rows; GATHER_BLOCK_NUMBERS = "
                  f"{p['gather_block_numbers']} numbers of M a block, at least MIN_BLOCK_COLUMNS = {p['min_block_columns']} "
                  "columns). *dW_enc*: a dense encoder's gathered ∂W_enc, M the batch's states; *flat decode*: a flat "
                  "decoder's gathered decode, forward and backward, M its W_dec, whole by `embedding_bag`:", "",
                  "| use | d | n | batch | M MiB | reads a row of M | columns a block | whole | blocks | rule picks | picked / best |",
                  "|---|---|---|---|---|---|---|---|---|---|---|",
                  *[f"| {r['use']} | {r['d_k']} | {r['n_features']} | {r['batch']} | {r['m_mib']:.0f} | {r['reads_per_row']:.2g} | "
                    f"{r['columns_per_block']} | {r['whole_ms']:.1f} | {r['blocks_ms']:.1f} | {r['rule_picks']} | "
                    f"{r['picked_time_over_best']:.2f} |" for r in results["gathered_sum"]]]
    if results.get("product_layout"):
        low, high = p["weights_first_rows"]
        lines += ["", "A few rows times a weight's rows, c·Wᵀ (ms; `writesae.sae._times_weight_rows`: a dense encoder's product, "
                  "the bilinear encoder's with its rows E, a dense decode's ∂codes), in einsum's layout and weights first, "
                  f"(W·cᵀ)ᵀ; `writesae.sae.weights_first_is_faster` picks weights first where {low} ≤ rows ≤ {high} and "
                  f"n ≥ {p['weights_first_features_per_row']}·rows:", "",
                  "| d | n | rows | einsum | weights first | einsum / weights first | rule picks | picked / best |",
                  "|---|---|---|---|---|---|---|---|",
                  *[f"| {r['d_k']} | {r['n_features']} | {r['rows']} | {r['einsum_ms']:.3f} | {r['weights_first_ms']:.3f} | "
                    f"{r['einsum_over_weights_first']:.2f} | {r['rule_picks'].replace('_', ' ')} | "
                    f"{r['picked_time_over_best']:.2f} |" for r in results["product_layout"]]]
    if results.get("breakdown"):
        kinds = list(results["breakdown"][0]["ms"])
        lines += ["", f"Where a step's time goes at the smallest shapes and at each SAE's step of ≥ {BIG_STEP_GFLOP} GFLOP farthest from the "
                  "matmul rate (ms per step: its ATen calls' wall time, each where the step runs it, grouped by "
                  "`benchmarks.bench_sae.operator_kind`, *sparse work* and *matrix products* being the calls the work bound "
                  "times alone; *between operators*: the step's median time less all of those):", "",
                  "| SAE | head | n | batch | step | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 5) + "|"]
        lines += [f"| {r['architecture']} | {r['d_k']}×{r['d_v']} | {r['n_features']} | {r['batch']} | {r['step_ms']:.2f} | "
                  + " | ".join(f"{r['ms'][kind]:.2f}" for kind in kinds) + " |" for r in results["breakdown"]]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> dict:
    big = [r for r in rows if r["step_gflop"] >= BIG_STEP_GFLOP]
    smallest = [r for r in rows if at_smallest_shapes(r)]
    limit = [r["limit_fraction"] for r in big]
    return {"big_steps": len(big), "big_steps_meeting_goal": sum(r["matmul_fraction"] >= GOAL_MATMUL_FRACTION for r in big),
            "big_steps_lowest_fraction": min((r["matmul_fraction"] for r in big), default=float("nan")),
            "big_steps_limit_fraction": [min(limit, default=float("nan")), max(limit, default=float("nan"))],
            "big_steps_bound_by_adam": [_step_name(r) for r in big if r["adam_bound_fraction"] < GOAL_MATMUL_FRACTION],
            "big_steps_bound_by_products": [_step_name(r) for r in big if r["products_bound_fraction"] < GOAL_MATMUL_FRACTION],
            "big_steps_bound_by_work": [_step_name(r) for r in big if r["work_bound_fraction"] < GOAL_MATMUL_FRACTION],
            "big_steps_within_work_bound": [r["matmul_fraction"] / r["work_bound_fraction"] for r in big],
            "smallest_overhead_ms": {_sae_and_head(r): r["overhead_ms"] for r in smallest},
            "smallest_adam_ms": {_sae_and_head(r): r["adam_ms"] for r in smallest}}


def _step_name(row: dict) -> str:
    return f"{_sae_and_head(row)} n={row['n_features']} batch={row['batch']}"


def _sae_and_head(row: dict) -> str:
    return f"{row['architecture']} {row['d_k']}×{row['d_v']}"


def farthest_big_steps(rows: list[dict]) -> list[tuple[str, str, int, int]]:
    """Per SAE, its big step with the lowest matmul fraction: (architecture, head shape, n, batch)."""
    lowest = {}
    for r in rows:
        if r["step_gflop"] >= BIG_STEP_GFLOP and (r["architecture"] not in lowest
                                                  or r["matmul_fraction"] < lowest[r["architecture"]]["matmul_fraction"]):
            lowest[r["architecture"]] = r
    return [(a, r["head_shape"], r["n_features"], r["batch"]) for a, r in lowest.items()]


#: flat routes timed at the shapes demos.compare_architectures trains (64 × 64, batch 128) with fewer features a sample:
#: (architecture, d, n, batch, k) around each rule's crossover (`writesae.sae.ROW_GATHER_COST_FLOPS`,
#: `writesae.sae.ENCODER_ROW_GATHER_COST_FLOPS`)
STUDY_DECODE_ROWS = [("flat", 64, n, 128, k) for k in (4, 8) for n in (2 * k, 4 * k, 8 * k)]
STUDY_ENCODER_BACKWARD_ROWS = [("flat", 64, n, 128, k) for k in (4, 8) for n in (4 * k, 8 * k, 16 * k)]
#: the most numbers a timed flat decode's dense route forms (batch × n × d_k·d_v), which keeps its table in memory
MAX_DECODE_NUMBERS = 2**31
#: decode routes side by side, (architecture, d, n, batch, k): the flat decoder across k = 8 to 64, n from 2·k (64 at
#: k = `K`) to 4,096 and both head shapes, the table the flat rule's two constants are fitted to
#: (`writesae.sae.DENSE_DECODE_FIXED_FEATURES`), up to `MAX_DECODE_NUMBERS`; the factored decoders at a few shapes
#: of the grid
FLAT_DECODE_ROWS = [("flat", d, n, batch, K) for d in (64, 128) for batch in BATCHES
                    for n in (64, 128, 256, 512, 1024, 4096) if batch * n * d * d <= MAX_DECODE_NUMBERS] + [
                   ("flat", d, n, batch, k) for d, batch in ((64, 256), (128, 64), (64, 1024)) for k in (8, 16, 64)
                   for n in (2 * k, 4 * k, 8 * k, 16 * k, 32 * k) if n <= 4096 and batch * n * d * d <= MAX_DECODE_NUMBERS]
DECODE_ROWS = FLAT_DECODE_ROWS + STUDY_DECODE_ROWS + [("bilinear", 64, n, batch, K) for n, batch in (
    (64, 256), (256, 256), (64, 1024))] + [("matrix", 128, 64, 1024, K)]
#: a rule's pick counts as slow where it takes more than this times the faster route's time
SLOW_PICK = 1.1


def slow_picks(rows: list[dict]) -> dict:
    """How often a route table's rule took a slow route (`SLOW_PICK`), and its slowest pick against the faster one."""
    return {"rows": len(rows), "slow": sum(r["picked_time_over_best"] > SLOW_PICK for r in rows),
            "slowest": max(r["picked_time_over_best"] for r in rows)}


#: the bilinear encoder's forward routes: (d, n, batch, rank), across `writesae.sae.bilinear_forward_is_per_sample`'s
#: crossover at both head shapes and rank 2, and the large dictionaries behind ``ENCODER_NUMBERS_PER_BLOCK``
ENCODER_FORWARD_ROWS = [(128, 16384, 32, 1), (128, 16384, 256, 1), (128, 1024, 1024, 1), (64, 16384, 32, 1),
                        (64, 16384, 256, 1)] + [(128, 4096, batch, 1) for batch in (16, 32, 64, 128, 256)] + [
                        (64, 4096, batch, 1) for batch in (16, 32, 64, 128)] + [
                        (128, 4096, batch, 2) for batch in (16, 32, 64)] + [(64, 4096, batch, 2) for batch in (8, 16, 32)]


#: timed calls per grid step and per route, each median taken over them
REPEATS = 5
#: a step at `TRIVIAL_SHAPE` takes about a millisecond, and one at the smallest shapes a few, where the scheduler's
#: interruptions are a larger share of a call than at the grid's larger steps: their medians are taken over more calls
FIXED_COST_REPEATS = 51
#: c·Wᵀ's layouts: (d, n, rows) at both head shapes, around `writesae.sae.weights_first_is_faster`'s window
PRODUCT_LAYOUT_ROWS = [(d, n, rows) for d in (64, 128) for n in (16, 32, 64, 128, 256, 1024, 4096)
                       for rows in (8, 16, 32, 48, 64, 128, 256)]


def measure(results: dict, args: argparse.Namespace) -> None:
    """Fill ``results``' rows, each SAE's fixed cost, the routes side by side (decode, encoder backward and forward,
    sparse product, product layout) and the time breakdown."""
    for architecture, shape, n, batch in itertools.product(CLASSES, HEAD_SHAPES, N_FEATURES, BATCHES):
        d_k, d_v = HEAD_SHAPES[shape]
        gib = 4 * 4 * parameter_count(architecture, n, d_k, d_v) / 2**30
        gflop = training_step_flops(architecture, batch, n, K, d_k, d_v) / 1e9
        if gflop > args.max_gflop or gib > args.max_gib:
            results["skipped"].append(f"{architecture} {d_k}×{d_v} n={n} batch={batch} ({gflop:.0f} GFLOP, {gib:.1f} GiB)")
            continue
        row = step_row(architecture, shape, n, batch, args.repeats)
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
    for architecture, d, n, batch, k in DECODE_ROWS:
        row = decode_row(architecture, d, n, batch, args.repeats, k)
        print(json.dumps(row), flush=True)
        results["decode"].append(row)
    for architecture, d, n, batch, *k in [("bilinear", 64, 64, 256), ("bilinear", 64, 64, 1024), ("bilinear", 64, 256, 1024),
                                      ("bilinear", 128, 64, 1024), ("bilinear", 128, 1024, 32)] + [
            ("flat", 64, n, 256) for n in (64, 128, 256, 1024)] + [("flat", 128, n, 32) for n in (128, 256, 1024)
                                                                    ] + STUDY_ENCODER_BACKWARD_ROWS:
        row = encoder_backward_row(architecture, d, n, batch, args.repeats, *k)
        print(json.dumps(row), flush=True)
        results["encoder_backward"].append(row)
    for d, n, batch, rank in ENCODER_FORWARD_ROWS:
        row = encoder_forward_row(d, n, batch, rank, args.repeats)
        print(json.dumps(row), flush=True)
        results["encoder_forward"].append(row)
    for d, n, batch in [(64, 1024, 64), (64, 1024, 256), (64, 64, 256), (64, 16384, 256), (64, 1024, 1024),
                        (64, 16384, 512), (128, 1024, 16), (128, 1024, 32), (128, 1024, 64), (128, 16384, 64),
                        (128, 1024, 256), (128, 16384, 256), (128, 1024, 1024), (128, 16384, 32)]:
        row = sparse_product_row(d, n, batch, args.repeats)
        print(json.dumps(row), flush=True)
        results["sparse_product"].append(row)
    for use, shapes in (("dW_enc", [(128, 1024, 256), (128, 1024, 512), (128, 1024, 1024), (128, 2048, 1024),
                                     (128, 4096, 1024), (128, 16384, 1024), (64, 1024, 1024), (64, 1024, 2048),
                                     (64, 1024, 4096)]),
                        ("flat decode", [(128, 1024, 32), (128, 1024, 64), (128, 1024, 256), (128, 1024, 512),
                                          (128, 1024, 1024), (128, 4096, 256), (128, 4096, 1024), (128, 16384, 32),
                                          (64, 1024, 1024), (64, 2048, 256), (64, 2048, 1024), (64, 16384, 256)])):
        for d, n, batch in shapes:
            row = gathered_sum_row(use, d, n, batch, args.repeats)
            print(json.dumps(row), flush=True)
            results["gathered_sum"].append(row)
    for row in filter(at_smallest_shapes, results["rows"]):
        plain = plain_step_row(row, FIXED_COST_REPEATS)
        print(json.dumps(plain), flush=True)
        results["plain_step"].append(plain)
    for architecture in CLASSES:
        row = fixed_cost_row(architecture, FIXED_COST_REPEATS)
        print(json.dumps(row), flush=True)
        results["fixed_cost"].append(row)
    for d, n, rows in PRODUCT_LAYOUT_ROWS:
        row = product_layout_row(d, n, rows, args.repeats)
        print(json.dumps(row), flush=True)
        results["product_layout"].append(row)
    smallest = [(r["architecture"], r["head_shape"], r["n_features"], r["batch"])
                for r in filter(at_smallest_shapes, results["rows"])]
    for architecture, shape, n, batch in smallest + farthest_big_steps(results["rows"]):
        row = time_by_op_kind(architecture, shape, n, batch, args.repeats)
        print(json.dumps(row), flush=True)
        results["breakdown"].append(row)


def rule_constants() -> dict:
    """The constants of `writesae.sae`'s route rules, as a results file records them beside the routes it timed."""
    return dict(row_gather_cost_flops=ROW_GATHER_COST_FLOPS, encoder_row_gather_cost_flops=ENCODER_ROW_GATHER_COST_FLOPS,
                dense_decode_fixed_features=DENSE_DECODE_FIXED_FEATURES, factor_gather_cost_flops=FACTOR_GATHER_COST_FLOPS,
                small_product_cost=SMALL_PRODUCT_COST, encoder_numbers_per_block=ENCODER_NUMBERS_PER_BLOCK,
                per_sample_numbers_per_block=PER_SAMPLE_NUMBERS_PER_BLOCK, gather_blocks_from=GATHER_BLOCKS_FROM,
                gather_blocks_reuse=GATHER_BLOCKS_REUSE, gather_blocks_result_rows=GATHER_BLOCKS_RESULT_ROWS,
                gather_block_numbers=GATHER_BLOCK_NUMBERS, min_block_columns=MIN_BLOCK_COLUMNS,
                weights_first_rows=WEIGHTS_FIRST_ROWS, weights_first_features_per_row=WEIGHTS_FIRST_FEATURES_PER_ROW)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--max-gflop", type=float, default=600.0, help="skip steps of more GFLOP than this")
    parser.add_argument("--max-gib", type=float, default=10.0, help="skip SAEs whose weights+grads+Adam pass this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"provenance": provenance("bench_sae", repeats=args.repeats, k=K, max_gflop=args.max_gflop,
                                        max_gib=args.max_gib, **rule_constants(),
                                        warm_up=f"warm-up calls until one faults in fewer than {SETTLED_PAGE_FAULTS} new "
                                                f"pages (at most {MAX_WARM_UP_ROUNDS})",
                                        host_memory="writesae.host_memory.freed_memory_kept, as the trainer runs",
                                        matmul_reference_trials=MATMUL_REFERENCE_TRIALS),
               "rows": [], "skipped": [], "decode": [], "encoder_backward": [], "encoder_forward": [], "sparse_product": [],
               "gathered_sum": [], "product_layout": [], "fixed_cost": [],
               "plain_step": [], "breakdown": []}
    with freed_memory_kept():  # the trainer's steps run inside it (writesae.train.train)
        measure(results, args)
    results["summary"] = summary(results["rows"])
    write_results(args.json, results)
    print(results_block(json.loads(args.json.read_text())))


if __name__ == "__main__":
    main()
