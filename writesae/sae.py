"""Sparse autoencoders on a matrix site (docs/design.md §13): `FlatSAE`, `MatrixSAE`, `BilinearMatrixSAE`.

An SAE reads X ∈ R^{d_k×d_v} (one head's state S_t, or its write k̂ δᵀ) for each of n_dicts heads,
with an independent dictionary per head: inputs are [*batch, n_dicts, d_k, d_v], codes a are
[*batch, n_dicts, n], and every parameter has a leading n_dicts axis (dropped in the formulas):

| class               | pre-activation z_i                          | X̂ − b_dec                 |
|---------------------|---------------------------------------------|---------------------------|
| `FlatSAE`           | W_enc,i · vec(X − b_dec) + b_enc,i          | Σ_i a_i W_dec,i           |
| `MatrixSAE`         | W_enc,i · vec(X − b_dec) + b_enc,i          | Σ_i a_i Σ_r V_ir W_irᵀ    |
| `BilinearMatrixSAE` | Σ_r U_irᵀ (X − b_dec) P_ir + b_enc,i        | Σ_i a_i Σ_r V_ir W_irᵀ    |

The tied WriteSAE has U = V and P = W. Codes are a = sparsity(z), see `writesae.sparsity`.

``cfg.input_scale`` s: the weights act on X·s (s makes mean ‖X‖²_F = 1 in training), while every
method takes and returns the raw scale: X is multiplied by s on the way in, X̂ divided by s on the
way out. ``fold_input_scale_`` moves s into the weights.

Hook points, as in SAELens: ``hook_sae_input`` (X), ``hook_sae_acts_pre`` (z), ``hook_sae_acts_post``
(a), ``hook_sae_recons`` (X̂), ``hook_sae_error`` (X − X̂, only with ``use_error_term``) and
``hook_sae_output``. They are TransformerLens ``HookPoint``s when TransformerLens is importable, so a
host ``HookedRootModule`` registers them; otherwise plain identity modules, on which ordinary torch
forward hooks (``register_forward_hook``) still work. The core never needs TransformerLens.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from .sparsity import SPARSITIES, Codes, JumpReLU, make_sparsity, under_torch_func

# shapes of the public API: X (a head's d_k × d_v matrix per dictionary), the codes (from
# `writesae.sparsity`), and the factors of X = k δᵀ
Matrices = Float[Tensor, "*batch n_dicts d_k d_v"]
Keys = Float[Tensor, "*batch n_dicts d_k"]
Values = Float[Tensor, "*batch n_dicts d_v"]


@dataclass
class SAEConfig:
    """Everything that fixes an SAE's shapes and semantics; saved as ``cfg.json``.

    ``heads``: an int for one head's dictionary; a list of ints, or "all", for independent per-head
    dictionaries trained as one batched module. ``n_heads``, the site's number of heads, may be left
    None: an SAE learns it from the model when attached or trained (`SAEBase.learn_n_heads_`). ``input_scale``: see the
    module docstring. ``l1_coefficient`` weighs the ReLU SAE's L1 penalty in training; the
    ``jumprelu_*`` fields are the JumpReLU bandwidth ε and the initial θ. ``model_name`` and
    ``model_fingerprint`` record the model the SAE was trained on, its name and
    `writesae.site_fit.model_fingerprint` of its weights (set by training; None in SAEs saved before
    it was recorded): `writesae.site_fit.check_sae_fits` warns when the SAE is used with another model.
    """

    architecture: str
    d_k: int
    d_v: int
    n_features: int
    rank: int = 1
    sparsity: str = "topk"
    k: int = 32
    site: str | None = None
    heads: int | list[int] | str = 0
    n_heads: int | None = None
    tied: bool = False
    input_scale: float = 1.0
    l1_coefficient: float = 1.0
    jumprelu_bandwidth: float = 1e-3
    jumprelu_initial_threshold: float = 1e-3
    model_name: str | None = None
    dtype: str = "float32"
    model_fingerprint: str | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {sorted(ARCHITECTURES)}")
        if self.sparsity not in SPARSITIES:
            raise ValueError(f"unknown sparsity {self.sparsity!r}; expected one of {list(SPARSITIES)}")
        for name in ("d_k", "d_v", "n_features", "rank", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.architecture == "flat" and self.rank != 1:
            raise ValueError(f"rank applies to the factored architectures; a flat SAE has no rank (got rank={self.rank})")
        if self.tied and self.architecture != "bilinear":
            raise ValueError(f"tied=True needs the bilinear architecture (U = V, P = W), not {self.architecture!r}")
        if SPARSITIES[self.sparsity].uses_k and self.k > self.n_features:
            raise ValueError(f"k={self.k} exceeds n_features={self.n_features}")
        for name in ("input_scale", "jumprelu_bandwidth", "jumprelu_initial_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not (isinstance(self.l1_coefficient, (int, float)) and math.isfinite(self.l1_coefficient)
                and self.l1_coefficient >= 0):
            raise ValueError(f"l1_coefficient must be a finite number >= 0, got {self.l1_coefficient!r}")
        for name in ("site", "model_name", "model_fingerprint"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise ValueError(f"{name} must be a string or None, got {getattr(self, name)!r}")
        if not isinstance(self.tied, bool):
            raise ValueError(f"tied must be a bool, got {self.tied!r}")
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        if not (isinstance(getattr(torch, str(self.dtype), None), torch.dtype) and self.torch_dtype.is_floating_point):
            raise ValueError(f"dtype must name a torch floating dtype such as 'float32', got {self.dtype!r}")
        self._check_heads()

    def _check_heads(self) -> None:
        n = self.n_heads
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n_heads must be a positive int or None, got {n!r}")
        if isinstance(self.heads, str):
            if self.heads != "all":
                raise ValueError(f"heads must be an int, a list of ints or 'all', got {self.heads!r}")
            return
        if isinstance(self.heads, tuple):
            self.heads = list(self.heads)
        heads = self.heads if isinstance(self.heads, list) else [self.heads]
        if not heads or any(isinstance(h, bool) or not isinstance(h, int) for h in heads):
            raise ValueError(f"heads must be an int, a non-empty list of ints or 'all', got {self.heads!r}")
        if len(set(heads)) != len(heads):
            raise ValueError(f"heads {self.heads} repeat a head")
        out_of_range = [h for h in heads if h < 0 or (n is not None and h >= n)]
        if out_of_range:
            limit = "" if n is None else f" < n_heads={n}"
            raise ValueError(f"heads {out_of_range} out of range: heads must be >= 0{limit}")

    @property
    def head_indices(self) -> list[int]:
        """The heads, one dictionary each, in the order of the input's n_dicts axis."""
        if self.heads == "all":
            if self.n_heads is None:
                raise ValueError("heads='all' does not know the site's number of heads yet: attach the SAE to a "
                                 "model or train it (or pass n_heads)")
            return list(range(self.n_heads))
        return list(self.heads) if isinstance(self.heads, list) else [self.heads]

    def dictionary(self, head: int) -> int:
        """The index on the n_dicts axis of model head ``head``'s dictionary."""
        heads = self.head_indices
        if head not in heads:
            raise ValueError(f"head {head} has no dictionary in this SAE; its heads are {heads}")
        return heads.index(head)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def _hook_point() -> nn.Module:
    """A TransformerLens HookPoint if TransformerLens imports, else an identity module."""
    try:
        from transformer_lens.hook_points import HookPoint
    except ImportError:
        return nn.Identity()
    return HookPoint()


def hook_point_is_hooked(point: nn.Module) -> bool:
    """Whether calling ``point`` would run anything besides its identity: a hook of its own (TransformerLens'
    ``add_hook`` registers torch module hooks) or a global module hook. The checks torch's ``Module.__call__``
    makes before it skips to ``forward``; the trainer forms X̂ only where a hook could see or edit it."""
    from torch.nn.modules import module

    return bool(point._forward_hooks or point._forward_pre_hooks or point._backward_hooks or point._backward_pre_hooks
                or module._global_forward_hooks or module._global_forward_pre_hooks or module._global_backward_hooks
                or module._global_backward_pre_hooks)


def _unit_randn(*shape: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    return F.normalize(torch.randn(shape, generator=generator, dtype=dtype), dim=-1)


def _unit_(factor: Tensor) -> Tensor:
    """Scale each last-axis vector of ``factor`` to unit norm, in place; return the old norms."""
    norms = factor.norm(dim=-1)
    factor /= norms.clamp_min(torch.finfo(factor.dtype).tiny).unsqueeze(-1)
    return norms


def _rows(indices: Tensor, n_features: int) -> Tensor:
    """Feature indices [..., n_dicts, m] as rows of a per-head parameter flattened over (head, feature)."""
    return indices + n_features * torch.arange(indices.shape[-2], device=indices.device).unsqueeze(-1)


def _pick(param: Tensor, indices: Tensor) -> Tensor:
    """param[h, indices[..., h, j]] for a per-head parameter [n_dicts, n, ...]: [..., n_dicts, m, ...]
    (`_gather_rows` of its rows flattened over head and feature)."""
    return _gather_rows(param.flatten(0, 1), _rows(indices, param.shape[1]))


def _gather_rows(flat: Tensor, rows: Tensor) -> Tensor:
    """flat[rows] [*rows.shape, ...] for rows of a parameter flattened over (head, feature). One ``index_select``:
    a contiguous copy per row, where advanced indexing with a head index beside it takes a slower general path (same
    numbers)."""
    return flat.index_select(0, rows.flatten()).unflatten(0, rows.shape)


# What gathering one number costs, in FLOPs of a dense matrix product (a gather streams memory while a matrix
# product reuses what it loads), for each gathered route against its dense one; each fitted to the two routes timed
# side by side on one CPU thread against a training step's gradient (the "decode" and "encoder backward" rows of
# benchmarks/results/sae.json).
#
# A flat decoder's gathered decode (whole rows of d_k·d_v numbers, `embedding_bag`) against its dense products, which
# also cost as if the dictionary had DENSE_DECODE_FIXED_FEATURES more features: each of their three products writes
# or reads every number of the [B, d_k·d_v] reconstruction or its gradient however few features it sums over, and
# at a few features a product runs far below the matmul rate. The rule then crosses over at
# n = k·(G + 2)/2 − DENSE_DECODE_FIXED_FEATURES: later, in multiples of k, the larger k is, as mostly in the flat
# decode rows (k = 4 to 64, n = 2·k to 4,096, 64 × 64 and 128 × 128, batch 32 to 1,024), whose crossovers fall below
# n = 2·k at k = 4 and between 2·k and 16·k at larger k. Both constants from a grid search on those rows, the middle
# of the pairs that tie at the fewest slow picks; G alone, with no fixed term, puts every crossover at one multiple
# of k.
ROW_GATHER_COST_FLOPS = 18
DENSE_DECODE_FIXED_FEATURES = 40
# A dense encoder's gathered backward (∂W_enc by a CSR product, ∂b_dec over the kept pairs): crossed over near
# n = 8·k at 64 × 64 for k = 4, 8 and 32, and below n = 4·k at 128 × 128, batch 32 (there it picks the dense
# route, 1.1 times the gathered one's time, at n = 128).
ENCODER_ROW_GATHER_COST_FLOPS = 14
# Factored atoms' and the bilinear encoder's factors (rows of d_k or d_v numbers, `index_select`), fitted to decode
# routes timed against a summed output's gradient (one number broadcast): flat dictionaries then crossed over near
# n = 17·k, and this value put the rule there. Against the training step's gradient the factored rows of that table
# pick the faster route, or came within 7% of it in an earlier run, so it stays, which keeps the numbers of every
# BilinearMatrixSAE trained before.
FACTOR_GATHER_COST_FLOPS = 32


def dense_decode_is_cheaper(n_samples: int, n_features: int, m: int, d_k: int, d_v: int, rank: int | None) -> bool:
    """Whether Σ_j values_j atom_{indices_j} over n_samples samples (per head) costs less as a dense
    product of all n_features codes with all atoms than by gathering the m atoms each sample uses;
    ``rank`` None for a flat decoder (W_dec rows), else the rank of factored atoms Σ_r V_r W_rᵀ.

    dense:    2·n·d_k·d_v·(n_samples + rank)      (forming the n atoms, factored only, then the product; a flat
              decoder's n counts DENSE_DECODE_FIXED_FEATURES more)
    gathered: n_samples·m·(G·g + 2·rank·d_k·d_v)   (g numbers gathered per atom: d_k·d_v flat, G =
              ROW_GATHER_COST_FLOPS, and rank·(d_k + d_v) factored, G = FACTOR_GATHER_COST_FLOPS; a flat
              decoder's product is rank 1)

    The one place that chooses for `SAEBase.decode_atoms`; the encoders' backward passes have their own
    (`dense_encoder_backward_is_dense`, `bilinear_backward_is_dense`)."""
    if rank is None:
        return _dense_rows_are_cheaper(n_samples, n_features + DENSE_DECODE_FIXED_FEATURES, m, d_k * d_v,
                                       ROW_GATHER_COST_FLOPS)
    atom = d_k * d_v
    dense = 2 * n_features * atom * (n_samples + rank)
    gathered = n_samples * m * (FACTOR_GATHER_COST_FLOPS * rank * (d_k + d_v) + 2 * rank * atom)
    return dense < gathered


def dense_encoder_backward_is_dense(n_samples: int, n_features: int, m: int, d_k: int, d_v: int) -> bool:
    """Whether a dense encoder's backward (`_DenseEncoder`) costs less through the dense products with every row
    of W_enc than by gathering the m rows each sample's gradient reaches: the trade of a flat decode
    (`_dense_rows_are_cheaper`; ∂b_dec adds 2·n·d_k·d_v to either route), at a cost of its own,
    G = ENCODER_ROW_GATHER_COST_FLOPS."""
    return _dense_rows_are_cheaper(n_samples, n_features, m, d_k * d_v, ENCODER_ROW_GATHER_COST_FLOPS)


def _dense_rows_are_cheaper(n_samples: int, n_features: int, m: int, row: int, gather_cost_flops: int) -> bool:
    """Whether n_samples products with all n_features rows of ``row`` numbers (2·n_samples·n·row FLOPs) cost less
    than gathering the m rows each sample uses, at ``gather_cost_flops`` G a number, and adding them
    (n_samples·m·(G·row + 2·row)): the flat rules of `dense_decode_is_cheaper` and
    `dense_encoder_backward_is_dense`."""
    return 2 * n_features * row * n_samples < n_samples * m * (gather_cost_flops * row + 2 * row)


# What a FLOP of the bilinear encoder's gathered backward costs against one of a large dense product: it
# runs as one [d_k, d_v] × [d_v, m·r] product per sample, at about half the rate. From its routes timed
# side by side on one CPU thread (the "encoder backward" rows of benchmarks/results/sae.json).
SMALL_PRODUCT_COST = 2


def bilinear_backward_is_dense(n_samples: int, n_features: int, m: int, d_k: int, d_v: int, rank: int) -> bool:
    """Whether the bilinear encoder's backward (`_BilinearEncoder`) costs less through the dense ∂E than by
    gathering the m features each sample's gradient reaches:

    dense:    2·n_samples·n·d_k·d_v + 2·n·d_k·d_v + 6·n·rank·d_k·d_v   (∂E; ∂b_dec; E formed again, ∂U and ∂P
              from ∂E)
    gathered: n_samples·m·(G·rank·(d_k + d_v) + C·6·rank·d_k·d_v)   (U and P gathered, G =
              FACTOR_GATHER_COST_FLOPS; ∂U, ∂P, ∂b_dec, C = SMALL_PRODUCT_COST)
    (a trainer's input needs no gradient of its own; where it does, each route adds a product like its ∂b_dec's)"""
    atom = d_k * d_v
    dense = 2 * n_samples * n_features * atom + 2 * n_features * atom + 6 * n_features * rank * atom
    gathered = n_samples * m * (FACTOR_GATHER_COST_FLOPS * rank * (d_k + d_v) + SMALL_PRODUCT_COST * 6 * rank * atom)
    return dense < gathered


def _gradient_support(grad: Tensor, d_k: int, d_v: int, rank: int | None) -> tuple[Tensor, Tensor] | None:
    """The features a sparse code's gradient ``grad`` [..., n_dicts, n] reaches, for an encoder's backward:
    None where the dense products cost less (a dense encoder's rows, rank None: `dense_encoder_backward_is_dense`;
    the bilinear encoder's factors: `bilinear_backward_is_dense`), else (indices, values) [B, n_dicts, m],
    each sample's m largest |g| (m the most non-zeros any sample has), which hold every non-zero one (and
    zeros where a sample has fewer). A backward that autograd records (``create_graph=True``, for a derivative of
    the gradient) takes the dense products, which autograd can differentiate again (a CSR product it cannot), and so
    does an empty batch (``embedding_bag`` refuses its bags)."""
    if torch.is_grad_enabled() or not grad.numel():
        return None
    flat_grad = grad.reshape(-1, *grad.shape[-2:])
    n = grad.shape[-1]
    magnitudes = flat_grad.abs()
    # non-zeros a sample, counted as the sum of |g|'s signs (|g| is needed for the top-k anyway): counting g != 0 as
    # booleans took 1.5 to 4 times as long in one-thread timings at n = 16,384, batch 1,024 (exact in fp32 below
    # 2**24 features). A NaN makes the count NaN: then every feature is taken.
    most = magnitudes.sign().sum(-1).max().item()
    m = n if math.isnan(most) else max(int(most), 1)  # one zero where none is non-zero
    shape = (flat_grad.shape[0], n, m, d_k, d_v)
    if dense_encoder_backward_is_dense(*shape) if rank is None else bilinear_backward_is_dense(*shape, rank):
        return None
    indices = magnitudes.topk(m, dim=-1, sorted=False).indices
    return indices, flat_grad.gather(-1, indices)


# A few samples' rows times a weight's rows, z = c·Wᵀ per head (c [rows, D]; W [n, D] as stored: the dense encoders'
# product, the bilinear encoder's with its rows E_i, and a dense decode's ∂codes = g·atomsᵀ), ran faster on this
# CPU's BLAS written (W·cᵀ)ᵀ, the weights as the product's rows, where WEIGHTS_FIRST_ROWS[0] ≤ rows ≤
# WEIGHTS_FIRST_ROWS[1] and n ≥ WEIGHTS_FIRST_FEATURES_PER_ROW·rows: up to 3 to 4 times as fast in two runs, where
# one edge shape of the window (64 rows, 4,096 features) came out an eighth slower in one. Elsewhere it was up to 4
# times as slow (fewer features than twice the rows, or more rows), or mixed (8 rows: faster against many features,
# slower against few). Timed side by side, one thread, d_k·d_v = 4,096 and 16,384: the "product layout" rows of
# benchmarks/results/sae.json. The two add the same terms in their own orders: the same numbers to float rounding,
# not bit for bit. Timed on the CPU only: elsewhere the product keeps einsum's layout.
WEIGHTS_FIRST_ROWS = (16, 64)
WEIGHTS_FIRST_FEATURES_PER_ROW = 2


def weights_first_is_faster(rows: int, n_features: int, device: torch.device) -> bool:
    """Whether `_times_weight_rows` forms c·Wᵀ as (W·cᵀ)ᵀ for ``rows`` rows of c and W's ``n_features`` rows."""
    low, high = WEIGHTS_FIRST_ROWS
    return device.type == "cpu" and low <= rows <= high and n_features >= WEIGHTS_FIRST_FEATURES_PER_ROW * rows


def _times_weight_rows(left: Tensor, W: Tensor) -> Tensor:
    """``left`` [..., n_dicts, D] times each head's rows W [n_dicts, n, D]: [..., n_dicts, n] (einsum
    "...hd,hnd->...hn"), formed as (W·leftᵀ)ᵀ where `weights_first_is_faster`."""
    n_dicts, n, D = W.shape
    if not weights_first_is_faster(math.prod(left.shape[:-2]), n, W.device):
        return torch.einsum("...hd,hnd->...hn", left, W)
    rows = left.reshape(-1, n_dicts, D)
    return torch.bmm(W, rows.permute(1, 2, 0)).permute(2, 0, 1).reshape(*left.shape[:-1], n).contiguous()


class _DenseDecode(torch.autograd.Function):
    """Σ_i a_i atom_i over every feature: codes [..., n_dicts, n] times atoms [n_dicts, n, D] (einsum
    "...hn,hnd->...hd"), whose backward forms ∂codes = g·atomsᵀ by `_times_weight_rows` (autograd's backward of the
    einsum keeps einsum's layout, the slower one where `weights_first_is_faster`) and ∂atoms =
    Σ_samples a gᵀ as autograd's does. It works under torch.func's transforms as the einsum did (grad, vmap, and
    jvp: the product rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(codes: Tensor, atoms: Tensor) -> Tensor:
        return torch.einsum("...hn,hnd->...hd", codes, atoms)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(ctx, codes_tangent: Tensor | None, atoms_tangent: Tensor | None) -> Tensor:
        codes, atoms = ctx.saved_tensors
        terms = [_DenseDecode.forward(*pair) for pair in ((codes_tangent, atoms), (codes, atoms_tangent))
                 if pair[0] is not None and pair[1] is not None]
        return sum(terms[1:], terms[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        codes, atoms = ctx.saved_tensors
        need_codes, need_atoms = ctx.needs_input_grad
        return (_times_weight_rows(grad, atoms) if need_codes else None,
                torch.einsum("...hn,...hd->hnd", codes, grad) if need_atoms else None)


def _centred(x: Tensor, scale: float, offset: Tensor) -> Tensor:
    """X·s − b_dec from X, s and ``offset`` = b_dec: one pass over the batch (an add with a multiplier), where scaling
    and then subtracting take two. Every encoder starts from it, and the trainer's residual s(X − X̂) is it less
    Σ_i a_i atom_i."""
    return torch.add(offset.neg(), x, alpha=scale)


def _encoder_function_applies(*inputs: Tensor) -> bool:
    """Whether an encoder computes through its autograd Function (`_DenseEncoder`, `_BilinearEncoder`): where autograd
    records a gradient for one of its ``inputs``, and not under torch.func (`under_torch_func`), where plain operators
    do (and without gradients, where the Function's backward is not needed)."""
    return torch.is_grad_enabled() and not under_torch_func() and any(t.requires_grad for t in inputs)


def _dense_pre(W_enc: Tensor, x: Tensor, scale: float, offset: Tensor) -> tuple[Tensor, Tensor]:
    """W_enc,i · vec(X·s − b_dec) [..., n_dicts, n] (b_enc not included) from X, s and ``offset`` = b_dec, and the
    centred input X·s − b_dec it read (`_centred`). Through `_DenseEncoder`, whose backward uses only the features
    that receive a gradient, where `_encoder_function_applies`."""
    if _encoder_function_applies(x, offset, W_enc):
        return _DenseEncoder.apply(x, offset, W_enc, scale)
    centred = _centred(x, scale, offset)
    return _times_weight_rows(centred.flatten(-2), W_enc), centred


def _summed_over_samples(grad: Tensor) -> Tensor:
    """Σ over every leading axis of a gradient [..., n_dicts, n] (a code's, or a flattened input's): [n_dicts, n]."""
    return grad.reshape(-1, *grad.shape[-2:]).sum(0)


def _sum_over_every_feature(n_features: int, values: Tensor) -> bool:
    """Whether b_dec's gradient Σ_i (Σ_samples g_i) E_i is cheaper over all n features than over the kept
    (sample, feature) pairs ``values`` [B, n_dicts, m] of a gathered backward: the same work per term, so
    whichever has fewer terms (a small dictionary at a large batch sums every feature once)."""
    return n_features <= values.shape[0] * values.shape[-1]


def _keep_centred(ctx, centred: Tensor, x: Tensor, b: Tensor, scale: float) -> None:
    """An encoder's forward returns the centred input c = x·s − b beside z, for the trainer's residual, which
    starts from it (one pass over the batch fewer than forming X·s again). c carries a gradient only where x needs
    one (then ∂x = s·∂c, ∂b = −Σ_samples ∂c: `_centred_grads`); elsewhere it is returned without one, and b's part
    of its gradient is the caller's to add (−Σ_samples ∂c: the trainer gives b as `writesae.train._SquaredResidual`'s
    offset), which saves a pass that would negate the residual's gradient."""
    ctx.shapes = x.shape, b.shape, scale
    if not ctx.needs_input_grad[0]:
        ctx.mark_non_differentiable(centred)
    ctx.set_materialize_grads(False)  # else autograd fills a batch of zeros as c's unused gradient


def _centred_for_backward(ctx, centred: Tensor, b: Tensor) -> Tensor:
    """The centred input c = x·s − b for an encoder's backward. Where autograd records the backward (create_graph, for
    a derivative of the gradient) and x needs no gradient, the returned c carries no record (`_keep_centred`), so
    this gives c + (b.detach() − b): the same numbers, with a record that reaches b. Where x needs one, c's record
    goes through the encoder's own backward to x and b."""
    if torch.is_grad_enabled() and not ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
        return centred + (b.detach() - b)
    return centred


def _centred_grads(ctx, grad_centred: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(∂x, ∂b) from the centred output's gradient (`_keep_centred`); None where there is none."""
    if grad_centred is None:
        return None, None
    (x_shape, b_shape, scale), (need_x, need_b) = ctx.shapes, ctx.needs_input_grad[:2]
    grad_b = -_summed_over_samples(grad_centred.flatten(-2)).view(b_shape) if need_b else None
    return (grad_centred * scale).view(x_shape) if need_x else None, grad_b


def _added(total: Tensor | None, term: Tensor) -> Tensor:
    """``term`` added to a gradient that may not exist yet (None)."""
    return term if total is None else total + term


class _DenseEncoder(torch.autograd.Function):
    """z = W_enc · (x·s − b) per head, x [..., n_dicts, d_k, d_v] (X), b [n_dicts, d_k, d_v] (b_dec), W_enc
    [n_dicts, n, D], s a number (the input scale); and the centred input c = x·s − b it read (`_keep_centred`).

    b's gradient is −Σ_samples ∂(x·s − b), and Σ_samples Σ_i g_i W_enc,i needs no per-sample ∂x: the backward
    forms ∂x only where x itself needs a gradient (a trainer's input does not), which saves a product as
    large as the forward's and two passes over the batch; it sums over the kept pairs or over every
    feature, whichever has fewer terms (`_sum_over_every_feature`). A sparse code passes a gradient to the few
    features it kept (TopK: at most k per sample), so where `dense_encoder_backward_is_dense` says gathering those
    m features' rows beats the dense products, the backward gathers:
    Σ_j g_j W_enc,j (``embedding_bag``, one bag per head for b, one per sample for x) and ∂W_enc,j += g_j x."""

    @staticmethod
    def forward(ctx, x: Tensor, b: Tensor, W_enc: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        centred = _centred(x, scale, b)
        _keep_centred(ctx, centred, x, b, scale)
        ctx.save_for_backward(centred, b, W_enc)
        return _times_weight_rows(centred.flatten(-2), W_enc), centred

    @staticmethod
    def backward(ctx, grad: Tensor | None, grad_centred: Tensor | None):
        centred, W_enc = _centred_for_backward(ctx, *ctx.saved_tensors[:2]), ctx.saved_tensors[2]
        (x_shape, b_shape, scale), (need_x, need_b, need_W, _) = ctx.shapes, ctx.needs_input_grad
        n_dicts, n, D = W_enc.shape
        centred = centred.flatten(-2)
        grad_x, grad_b = _centred_grads(ctx, grad_centred)
        grad_W = None
        if grad is None:
            return grad_x, grad_b, grad_W, None
        support = _gradient_support(grad, *x_shape[-2:], None)
        if need_b and (support is None or _sum_over_every_feature(n, support[1])):
            grad_b = _added(grad_b, -torch.einsum("hn,hnd->hd", _summed_over_samples(grad), W_enc).view(b_shape))
        if support is None:
            if need_x:
                grad_x = _added(grad_x, torch.einsum("...hn,hnd->...hd", grad, W_enc).view(x_shape) * scale)
            if need_W:
                grad_W = torch.einsum("...hn,...hd->hnd", grad, centred)
            return grad_x, grad_b, grad_W, None
        indices, values = support
        rows = _rows(indices, n)  # [B, n_dicts, m]
        if need_x:
            grad_x = _added(grad_x, F.embedding_bag(rows.flatten(0, -2), W_enc.flatten(0, 1), mode="sum",
                                                    per_sample_weights=values.flatten(0, -2)).view(x_shape) * scale)
        if need_b and not _sum_over_every_feature(n, values):  # over the kept pairs
            per_head = rows.transpose(0, 1).flatten(1), values.transpose(0, 1).flatten(1)  # [n_dicts, B·m]: a bag each
            grad_b = _added(grad_b, -F.embedding_bag(per_head[0], W_enc.flatten(0, 1), per_sample_weights=per_head[1],
                                                     mode="sum").view(b_shape))
        if need_W:
            grad_W = _rows_of_sparse_product(rows, values, centred.reshape(-1, D), n_dicts * n).view(n_dicts, n, D)
        return grad_x, grad_b, grad_W, None


# Where a gathered sum, a CSR product G·M each of whose rows adds several rows of M, reads M a block of columns
# at a time: M of at least GATHER_BLOCKS_FROM numbers (this CPU's 32 MiB cache), each of its rows read
# GATHER_BLOCKS_REUSE times or more on average, into at most GATHER_BLOCKS_RESULT_ROWS times as many rows as M
# has. A block of GATHER_BLOCK_NUMBERS numbers of M (at least MIN_BLOCK_COLUMNS columns) then stays in the cache
# while every row that needs it reads it. Timed on one CPU thread of this machine (the "gathered sum" rows of
# benchmarks/results/sae.json): 1.25 to 2.2 times as fast wherever the rule blocks (a dense encoder's ∂W_enc at
# a large batch, a flat decode at 128 × 128 with 1,024 features at batch 256 and more), and slower in blocks, up
# to 3.3 times, where each row of M is read a few times or fewer (a large dictionary at a small batch) or where the
# result has many times M's rows (a large dictionary's ∂W_enc: the result's blocks leave the cache in turn).
# Elsewhere the two were within 7%, except ∂W_enc at 64 × 64, batch 1,024 (M of 16 MiB), whose order moved
# between runs (blocks 1.25 times as fast in the committed one, even in another).
GATHER_BLOCKS_FROM = 2**23
GATHER_BLOCKS_REUSE = 8
GATHER_BLOCKS_RESULT_ROWS = 2
GATHER_BLOCK_NUMBERS = 2**20
MIN_BLOCK_COLUMNS = 512


def gather_columns_per_block(m_rows: int, result_rows: int, n_terms: int, columns: int, device: torch.device) -> int:
    """Columns of M per block of `_csr_product` (G·M for M [m_rows, columns], G [result_rows, m_rows] with
    ``n_terms`` stored terms, on ``device``): ``columns`` (one block) unless `GATHER_BLOCKS_FROM` says to block,
    then `gather_block_columns`. The one place that chooses, for a dense encoder's ∂W_enc and for a flat
    decoder's gathered decode (`FlatSAE`), which blocks it with `_BlockedGatheredRows` and otherwise takes
    ``embedding_bag``. Off the CPU, one block: the measurement is a CPU cache's."""
    if (device.type == "cpu" and m_rows * columns >= GATHER_BLOCKS_FROM and n_terms >= GATHER_BLOCKS_REUSE * m_rows
            and result_rows <= GATHER_BLOCKS_RESULT_ROWS * m_rows):
        return min(gather_block_columns(m_rows), columns)
    return columns


def gather_block_columns(m_rows: int) -> int:
    """Columns in a block of `GATHER_BLOCK_NUMBERS` numbers of an M of ``m_rows`` rows: a whole multiple of 64, and
    at least `MIN_BLOCK_COLUMNS`."""
    return max(GATHER_BLOCK_NUMBERS // m_rows // 64, MIN_BLOCK_COLUMNS // 64) * 64


def _csr(crow: Tensor, columns: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix; callers sort its columns within each row (torch's invariant, not checked here)."""
    with warnings.catch_warnings():  # torch warns that CSR is in beta
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, columns, values, shape, check_invariants=False)


#: the dtypes torch's CSR products take on the CPU (its MKL kernels); others are computed in float32
CSR_DTYPES = (torch.float32, torch.float64)


def _column_blocks(G: Tensor, M: Tensor) -> list[slice]:
    """The blocks of columns of M [n, D] in which a product with the CSR G [len(G), n] reads it
    (`gather_columns_per_block`)."""
    width = gather_columns_per_block(len(M), len(G), G.values().numel(), M.shape[-1], M.device)
    return [slice(start, start + width) for start in range(0, M.shape[-1], width)]


def _csr_product(G: Tensor, M: Tensor) -> Tensor:
    """G·M [len(G), D] for a CSR G and M [n, D]: each row of the result sums its terms in stored order, written
    straight into the result, one of `_column_blocks` at a time (in float32 for a dtype outside `CSR_DTYPES`,
    rounded to M's once at the end)."""
    if M.dtype not in CSR_DTYPES:
        return _csr_product(G.to(torch.float32), M.float()).to(M.dtype)
    result = M.new_empty(G.shape[0], M.shape[-1])
    for columns in _column_blocks(G, M):
        block = result[:, columns]
        torch.addmm(block, G, M[:, columns], beta=0, out=block)  # beta = 0: the result is never read
    return result


def _rows_of_sparse_product(rows: Tensor, values: Tensor, x: Tensor, n_rows: int) -> Tensor:
    """G x [n_rows, D] for the sparse G [n_rows, B·n_dicts] with G[rows_sj, s] = values_sj (rows, values
    [B, n_dicts, m], s a (sample, head) pair and x its [B·n_dicts, D] rows): a dense encoder's ∂W_enc and a
    flat decoder's ∂W_dec. One CSR product over every row (`_csr_product`), each row summing its samples in
    order. It forms none of the products values_sj x_s (gigabytes at a training batch: 8.6 GB at batch 4096,
    k = 32, 128 × 128); forming and ``index_add_``-ing them gives the same numbers on this CPU and was slower at
    every shape timed (the "sparse product" rows of benchmarks/results/sae.json)."""
    m = rows.shape[-1]
    flat = rows.flatten()
    order = flat.argsort(stable=True)  # row-major; within a row, samples in order
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=x.device)
    crow[1:] = flat.bincount(minlength=n_rows).cumsum(0)
    columns = torch.arange(x.shape[0], device=x.device).repeat_interleave(m)[order]
    return _csr_product(_csr(crow, columns, values.flatten()[order], (n_rows, x.shape[0])), x)


class _BlockedGatheredRows(torch.autograd.Function):
    """Σ_j values_sj W[rows_sj] [S, D] for rows, values [S, m] and W [n, D], by `_csr_product` in blocks of
    columns: a flat decoder's gathered decode where `gather_columns_per_block` blocks it (``embedding_bag``, which
    reads every gathered row from memory, elsewhere). Backward: ∂W by `_rows_of_sparse_product`, and ∂values_sj =
    ⟨W[rows_sj], ∂out_s⟩ summed over the blocks (``torch.sparse.sampled_addmm``), neither forming the gather."""

    @staticmethod
    def forward(ctx, rows: Tensor, values: Tensor, W: Tensor) -> Tensor:
        S, m = rows.shape
        columns, order = rows.sort(-1)  # CSR's column order within a row
        G = _csr(torch.arange(0, S * m + 1, m, device=W.device), columns.flatten(), values.gather(-1, order).flatten(),
                 (S, len(W)))
        ctx.save_for_backward(rows, values, W, order)
        ctx.G = G
        return _csr_product(G, W)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, values, W, order = ctx.saved_tensors
        grad_values = grad_W = None
        if torch.is_grad_enabled():  # recorded (create_graph): the gathered rows, which autograd can differentiate again
            gathered = _gather_rows(W, rows)
            if ctx.needs_input_grad[1]:
                grad_values = torch.einsum("sd,smd->sm", grad, gathered)
            if ctx.needs_input_grad[2]:
                grad_W = W.new_zeros(W.shape).index_add(0, rows.flatten(), (values[..., None] * grad[:, None]).flatten(0, 1))
            return None, grad_values, grad_W
        if ctx.needs_input_grad[1]:  # over the forward's blocks of W
            in_csr_order = sum(torch.sparse.sampled_addmm(ctx.G, grad[:, columns], W[:, columns].T, beta=0).values()
                               for columns in _column_blocks(ctx.G, W))
            grad_values = torch.empty_like(values).scatter_(-1, order, in_csr_order.view(values.shape))
        if ctx.needs_input_grad[2]:
            grad_W = _rows_of_sparse_product(rows.unsqueeze(1), values.unsqueeze(1), grad, len(W))
        return None, grad_values, grad_W


def _rescale_dense_codes_(sae: FlatSAE | MatrixSAE, c: Tensor) -> None:
    """Multiply every code a_i of a dense-encoder SAE by c_i [n_dicts, n]: z_i scales by c_i through
    W_enc,i and b_enc,i, and a JumpReLU θ_i with it. Exact for ReLU and JumpReLU; TopK and BatchTopK
    compare features (and samples), so their selection can change."""
    sae.W_enc *= c.unsqueeze(-1)
    sae.b_enc *= c
    if isinstance(sae.activation, JumpReLU):
        sae.activation.log_threshold += c.log()


def _factor_atoms(V: Tensor, W: Tensor) -> Tensor:
    """Σ_r V_ir W_irᵀ [n_dicts, n, d_k, d_v]."""
    return torch.einsum("hnrk,hnrv->hnkv", V, W)


def _factor_atom_norms(V: Tensor, W: Tensor) -> Tensor:
    """‖Σ_r V_ir W_irᵀ‖_F [n_dicts, n], from Gram matrices: ‖·‖² = Σ_rs (V_rᵀV_s)(W_rᵀW_s)."""
    gram = torch.einsum("hnrk,hnsk->hnrs", V, V) * torch.einsum("hnrv,hnsv->hnrs", W, W)
    return gram.sum((-2, -1)).clamp_min(0).sqrt()


# How many numbers of the bilinear encoder's rows E_i = Σ_r U_ir P_irᵀ its forward forms at a time (32 MiB in
# fp32). Timed on one CPU thread (the "encoder forward" rows of benchmarks/results/sae.json): forming all n·d_k·d_v
# at once is slower wherever they are many (1 GiB for 16,384 features at 128 × 128: 421 ms against 315 in blocks
# at batch 32, when that batch took this route), and no block size was faster at every shape; blocks this large
# were at most about a tenth slower than one product at any shape timed. They also bound the forward's memory.
ENCODER_NUMBERS_PER_BLOCK = 2**23
# A block's features are a multiple of this: the product then runs whole tiles, and on this CPU the blocks give
# exactly the numbers of one product (scripts.compare_with_commit finds no tensor changed).
FEATURES_PER_BLOCK_MULTIPLE = 64


# The same for its per-sample products C P_ir (`bilinear_forward_is_per_sample`), 16 MiB in fp32: timed on one CPU
# thread against 2**18 to 2**23 numbers, this was the fastest or within a few percent of it at both head shapes,
# and up to a quarter faster than ENCODER_NUMBERS_PER_BLOCK at 64 × 64 (each product's result is read straight back
# for its dot with U_ir, and a smaller block stays nearer the core).
PER_SAMPLE_NUMBERS_PER_BLOCK = 2**22


def _features_per_block(n_dicts: int, feature_numbers: int, budget: int) -> int:
    """Features per block of `_bilinear_product`, forming ``feature_numbers`` numbers a feature and head: as many as
    fit ``budget`` numbers over every head, a multiple of `FEATURES_PER_BLOCK_MULTIPLE` (and at least one such
    multiple)."""
    fitting = budget // (n_dicts * feature_numbers)
    return max(fitting // FEATURES_PER_BLOCK_MULTIPLE, 1) * FEATURES_PER_BLOCK_MULTIPLE


def bilinear_forward_is_per_sample(n_samples: int, d_k: int, d_v: int, rank: int) -> bool:
    """Whether the bilinear encoder's forward (`_bilinear_product`) forms every sample's products C P_ir
    (n_samples·rank·d_k numbers a feature, from one product per head with a short inner dimension, d_v) rather than
    the rows E_i = Σ_r U_ir P_irᵀ (d_k·d_v numbers a feature, then one large product with every sample): where the
    first are no more numbers (and there is a sample). A rank-r row is written at memory speed, so the numbers
    formed decide: timed side by side on one CPU thread (the "encoder forward" rows of
    benchmarks/results/sae.json, both head shapes, ranks 1 and 2, batch 8 to 256), this picked the faster route at
    most shapes and one within a fifth of it at the others, all near the crossover."""
    return 0 < n_samples * rank * d_k <= d_k * d_v


def _bilinear_product(centred: Tensor, U: Tensor, P: Tensor) -> Tensor:
    """⟨C, E_i⟩_F = Σ_r U_irᵀ C P_ir [..., n_dicts, n] for C = ``centred`` [..., n_dicts, d_k, d_v], a block of
    `_features_per_block` features at a time (each block's numbers formed, used and dropped), by the route
    `bilinear_forward_is_per_sample` picks for the number of samples: every sample's products C P_ir, or one product
    with the rows E_i = Σ_r U_ir P_irᵀ (the same numbers whatever the batch)."""
    n_dicts, n, rank, d_k = U.shape
    d_v = P.shape[-1]
    lead = centred.shape[:-3]
    samples = centred.reshape(-1, n_dicts, d_k, d_v)
    if bilinear_forward_is_per_sample(len(samples), d_k, d_v, rank):
        # [n_dicts, d_v, B·d_k]: every sample's Cᵀ side by side, so that each head's block is one product
        columns = samples.permute(1, 3, 0, 2).reshape(n_dicts, d_v, -1)
        features = _features_per_block(n_dicts, rank * columns.shape[-1], PER_SAMPLE_NUMBERS_PER_BLOCK)
        blocks = [torch.einsum("hfrbk,hfrk->hfrb",
                               torch.bmm(P[:, i:i + features].flatten(1, 2), columns)
                               .view(n_dicts, -1, rank, len(samples), d_k), U[:, i:i + features]).sum(2)
                  for i in range(0, n, features)]
        return torch.cat(blocks, 1).permute(2, 0, 1).reshape(*lead, n_dicts, n)
    flat = centred.flatten(-2)
    features = _features_per_block(n_dicts, flat.shape[-1], ENCODER_NUMBERS_PER_BLOCK)
    blocks = [_times_weight_rows(flat, _factor_atoms(U[:, i:i + features], P[:, i:i + features]).flatten(-2))
              for i in range(0, n, features)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, -1)


def _bilinear_pre(U: Tensor, P: Tensor, x: Tensor, scale: float, offset: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_r U_irᵀ (X·s − b_dec) P_ir [..., n_dicts, n] (b_enc not included) from X, s and ``offset`` = b_dec, and the
    centred input X·s − b_dec it read (`_centred`). Through `_BilinearEncoder`, whose backward reaches the factors of
    only the features that receive a gradient, where `_encoder_function_applies`."""
    if _encoder_function_applies(x, offset, U, P):
        return _BilinearEncoder.apply(x, offset, U, P, scale)
    centred = _centred(x, scale, offset)
    return _bilinear_product(centred, U, P), centred


class _BilinearEncoder(torch.autograd.Function):
    """z_i = Σ_r U_irᵀ (x·s − b) P_ir per head, x [..., n_dicts, d_k, d_v] (X), b [n_dicts, d_k, d_v] (b_dec),
    U [n_dicts, n, r, d_k], P [n_dicts, n, r, d_v], s a number (the input scale); and the centred input
    c = x·s − b it read (`_keep_centred`).

    The forward takes ⟨c, E_i⟩ for the encoder matrices E_i = Σ_r U_ir P_irᵀ by `_bilinear_product`'s route (the
    rows E_i, or at a small batch every sample's products c P_ir, a block of features at a time) and keeps neither's
    numbers: the backward does not depend on the route. A sparse code passes a gradient to m ≤ k features
    per sample, so where `_gradient_support` says gathering beats the dense products, the backward takes each
    kept (sample, feature) pair's factors and goes straight to them, with no [n, d_k, d_v] ∂E:
    ∂U_ir += g c P_ir, ∂P_ir += g cᵀ U_ir, ∂b = −Σ g Σ_r U_ir P_irᵀ over the pairs (3 products of
    2·B·m·r·d_k·d_v FLOPs). Elsewhere (`bilinear_backward_is_dense`) it forms E again and takes
    ∂E = Σ_b g_b c_b, ∂U = ∂E P, ∂P = ∂Eᵀ U, ∂b = −(Σ_b g_b) E. As in `_DenseEncoder`, b needs only the sum
    over samples, and a per-sample ∂x is formed only where x itself needs a gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, b: Tensor, U: Tensor, P: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        centred = _centred(x, scale, b)
        _keep_centred(ctx, centred, x, b, scale)
        ctx.save_for_backward(centred, b, U, P)
        return _bilinear_product(centred, U, P), centred

    @staticmethod
    def backward(ctx, grad: Tensor | None, grad_centred: Tensor | None):
        centred, (U, P) = _centred_for_backward(ctx, *ctx.saved_tensors[:2]), ctx.saved_tensors[2:]
        (x_shape, b_shape, scale), (need_x, need_b, need_U, need_P, _) = ctx.shapes, ctx.needs_input_grad
        n_dicts, n, rank, d_k = U.shape
        d_v = P.shape[-1]
        flat_c = centred.reshape(-1, n_dicts, d_k, d_v)
        grad_x, grad_b = _centred_grads(ctx, grad_centred)
        grad_U = grad_P = None
        if grad is None:
            return grad_x, grad_b, grad_U, grad_P, None
        support = _gradient_support(grad, d_k, d_v, rank)
        if support is None:
            E = _factor_atoms(U, P) if need_x or need_b else None
            if need_x:
                grad_x = _added(grad_x, torch.einsum("...hn,hnkv->...hkv", grad, E).view(x_shape) * scale)
            if need_b:
                grad_b = _added(grad_b, -torch.einsum("hn,hnkv->hkv", _summed_over_samples(grad), E).view(b_shape))
            if need_U or need_P:
                grad_E = torch.einsum("bhn,bhkv->hnkv", grad.reshape(-1, n_dicts, n), flat_c)
                grad_U = torch.einsum("hnkv,hnrv->hnrk", grad_E, P) if need_U else None
                grad_P = torch.einsum("hnkv,hnrk->hnrv", grad_E, U) if need_P else None
            return grad_x, grad_b, grad_U, grad_P, None
        indices, values = support
        rows = _rows(indices, n).flatten()
        U_kept, P_kept = _pick(U, indices), _pick(P, indices)  # [B, n_dicts, m, r, d_k | d_v]
        if need_x:
            grad_x = _added(grad_x, torch.einsum("bhm,bhmrk,bhmrv->bhkv", values, U_kept, P_kept).view(x_shape) * scale)
        if need_b and _sum_over_every_feature(n, values):
            grad_b = _added(grad_b, -torch.einsum("hn,hnrk,hnrv->hkv", _summed_over_samples(grad), U, P).view(b_shape))
        elif need_b:
            grad_b = _added(grad_b, -torch.einsum("bhm,bhmrk,bhmrv->hkv", values, U_kept, P_kept).view(b_shape))
        weights = values[..., None, None]
        if need_U:
            contributions = torch.einsum("bhkv,bhmrv->bhmrk", flat_c, P_kept) * weights
            grad_U = U.new_zeros(n_dicts * n, rank * d_k).index_add_(0, rows, contributions.reshape(-1, rank * d_k))
            grad_U = grad_U.view(U.shape)
        if need_P:
            contributions = torch.einsum("bhkv,bhmrk->bhmrv", flat_c, U_kept) * weights
            grad_P = P.new_zeros(n_dicts * n, rank * d_v).index_add_(0, rows, contributions.reshape(-1, rank * d_v))
            grad_P = grad_P.view(P.shape)
        return grad_x, grad_b, grad_U, grad_P, None


def _factor_decode_sparse(V: Tensor, W: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """Σ_j values_j Σ_r V_{i_j r} W_{i_j r}ᵀ, gathering only the m given atoms' factors (`_GatheredFactorProduct`;
    one einsum under torch.func: `under_torch_func`)."""
    V_kept, W_kept = _pick(V, indices), _pick(W, indices)
    if under_torch_func():
        return torch.einsum("...m,...mrk,...mrv->...kv", values, V_kept, W_kept)
    return _GatheredFactorProduct.apply(values, V_kept, W_kept)


class _GatheredFactorProduct(torch.autograd.Function):
    """Y = Σ_j a_j Σ_r v_jr w_jrᵀ per sample and head from gathered factors: a [..., n_dicts, m], v [..., n_dicts, m,
    r, d_k], w [..., n_dicts, m, r, d_v]. One [d_k, m·r] × [m·r, d_v] product per sample with the codes folded into
    v (A = a·v), and in the backward two more, ∂A = w ∂Yᵀ and ∂w = A ∂Y, with ∂a_j = Σ_rk v_jrk ∂A_jrk and
    ∂v = a·∂A: one pass each over the gathered factors, where einsum's chain for the same sum copies and
    multiplies them in its own layouts several times over (the factored decode ran about 1.15 times as fast at
    64 × 64 and batch 1,024 on one CPU thread)."""

    @staticmethod
    def forward(ctx, values: Tensor, V: Tensor, W: Tensor) -> Tensor:
        m, rank, d_k = V.shape[-3:]
        weighted = (V * values[..., None, None]).view(-1, m * rank, d_k)
        ctx.save_for_backward(values, V, weighted, W)
        W_rows = W.reshape(*weighted.shape[:2], W.shape[-1])
        return torch.bmm(weighted.transpose(1, 2), W_rows).view(*values.shape[:-1], d_k, W.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, V, weighted, W = ctx.saved_tensors
        need_values, need_V, need_W = ctx.needs_input_grad
        # Where autograd records this backward (create_graph, for a derivative of the gradient), the codes-folded
        # factors are formed again from the inputs, since the forward's came without a record that reaches them.
        recorded = torch.is_grad_enabled()
        if recorded:
            weighted = (V * values[..., None, None]).view(weighted.shape)
        W_rows = W.reshape(*weighted.shape[:2], W.shape[-1])
        grad = grad.reshape(-1, *grad.shape[-2:])
        grad_values = grad_V = grad_W = None
        if need_values or need_V:
            grad_weighted = torch.bmm(W_rows, grad.transpose(1, 2)).view(V.shape)
            if need_values:
                grad_values = (grad_weighted * V).sum((-2, -1))
            if need_V:  # in place, unless recorded: the record keeps grad_weighted for ∂values
                grad_V = grad_weighted * values[..., None, None] if recorded else grad_weighted.mul_(values[..., None, None])
        if need_W:
            grad_W = torch.bmm(weighted, grad).view(W.shape)
        return grad_values, grad_V, grad_W


class SAEBase(nn.Module):
    """The shared surface; subclasses define the encoder and decoder (see the module docstring).

    Build as ``Cls(cfg)`` or ``Cls(d_k=..., d_v=..., n_features=..., ...)`` with `SAEConfig`'s
    keywords (the architecture is the class's); ``seed`` seeds the initialisation and ``device``
    places it. Factors start as random unit vectors, encoders as the decoder's transpose, biases
    and b_dec at zero. An SAE with heads="all" and no ``n_heads`` has no parameters until it learns
    the head count (`learn_n_heads_`, which attaching and training call).
    """

    architecture: str
    summary: str  # what the architecture is, in a few words (``writesae train --help`` lists them)

    def __init__(self, cfg: SAEConfig | None = None, *, seed: int | None = None,
                 device: torch.device | str | None = None, **config):
        super().__init__()
        if cfg is None:
            cfg = SAEConfig(architecture=self.architecture, **config)
        elif config:
            raise TypeError(f"pass either an SAEConfig or its keywords, not both (got {sorted(config)})")
        if cfg.architecture != self.architecture:
            raise ValueError(f"{type(self).__name__} needs architecture={self.architecture!r}, got {cfg.architecture!r}")
        self.cfg = replace(cfg)  # a copy: fold_input_scale_ and learn_n_heads_ edit it
        self.use_error_term = False
        self.hook_sae_input = _hook_point()
        self.hook_sae_acts_pre = _hook_point()
        self.hook_sae_acts_post = _hook_point()
        self.hook_sae_recons = _hook_point()
        self.hook_sae_error = _hook_point()
        self.hook_sae_output = _hook_point()
        self._seed, self._device = seed, device
        self._built = False
        if cfg.heads != "all" or cfg.n_heads is not None:
            self._build()

    def _build(self) -> None:
        """The dictionaries' parameters, once the number of heads is known."""
        cfg = self.cfg
        self.activation = make_sparsity(cfg)
        self.b_dec = nn.Parameter(torch.zeros(self.n_dicts, cfg.d_k, cfg.d_v))
        self.b_enc = nn.Parameter(torch.zeros(self.n_dicts, cfg.n_features))
        generator = None if self._seed is None else torch.Generator().manual_seed(self._seed)
        # drawn and normalised in at least fp32 (fp64 for an fp64 SAE), so unit norms hold to its precision
        self._init_weights(generator, torch.promote_types(cfg.torch_dtype, torch.float32))
        self.to(device=self._device, dtype=cfg.torch_dtype)
        self._built = True

    @property
    def n_dicts(self) -> int:
        """The number of dictionaries: one per head in ``cfg.heads``."""
        return len(self.cfg.head_indices)

    def learn_n_heads_(self, n_heads: int) -> SAEBase:
        """Tell the SAE its site's number of heads, as attaching and training do. A heads="all" SAE
        made without it gets its parameters now, initialised as the constructor would have; a known
        count must agree."""
        if self.cfg.n_heads is not None:
            if self.cfg.n_heads != n_heads:
                raise ValueError(f"the SAE was made for a site of {self.cfg.n_heads} heads; this site has {n_heads}")
            return self
        self.cfg.n_heads = n_heads
        self.cfg._check_heads()
        if not self._built:
            self._build()
        return self

    # --- what each architecture defines ------------------------------------------------------

    def _init_weights(self, generator: torch.Generator | None, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def _pre(self, x: Tensor, scale: float, offset: Tensor) -> tuple[Tensor, Tensor]:
        """z from X·s − b_dec [..., n_dicts, d_k, d_v] (b_enc included), given X, s and ``offset`` = b_dec, and
        the centred input X·s − b_dec (`_keep_centred`): the encoders subtract, so that b_dec's gradient is one sum
        over the samples."""
        raise NotImplementedError

    def atoms(self) -> Float[Tensor, "n_dicts n d_k d_v"]:
        """The decoder atoms as matrices."""
        raise NotImplementedError

    def atom_norms(self) -> Float[Tensor, "n_dicts n"]:
        """‖atom_i‖_F."""
        raise NotImplementedError

    def decode_atoms(self, indices: Int[Tensor, "*batch n_dicts m"],
                     values: Float[Tensor, "*batch n_dicts m"]) -> Matrices:
        """Σ_j values_j atom_{indices_j} (repeated indices add up): no b_dec, and in the weights' units
        (the input scale s is not undone). Gathers only those m atoms per sample and head, or, where
        `dense_decode_is_cheaper` says so for these shapes, multiplies the dense code by all the atoms."""
        rank = None if isinstance(self, FlatSAE) else self.cfg.rank
        m = indices.shape[-1]
        if m == 0 or dense_decode_is_cheaper(indices[..., 0, 0].numel(), self.cfg.n_features, m, self.cfg.d_k, self.cfg.d_v,
                                             rank):  # no atom at all: the dense route's zeros
            codes = values.new_zeros(*values.shape[:-1], self.cfg.n_features).scatter_add(-1, indices, values)
            return self._decode_dense(codes)
        return self._decode_gathered(indices, values)

    def _decode_gathered(self, indices: Tensor, values: Tensor) -> Tensor:
        """`decode_atoms` by gathering the m atoms' weights."""
        raise NotImplementedError

    def _fold_scale_(self, s: float) -> None:
        """Make the weights act on X instead of X·s; the base class moves b_dec."""
        raise NotImplementedError

    def normalize_factors_(self) -> SAEBase:
        """Put every factor at unit norm; each class's docstring says what else it moves."""
        raise NotImplementedError

    def _pre_factors(self, k: Tensor, delta: Tensor) -> Tensor:
        """z for X·s = k δᵀ, k already scaled. A dense encoder reads n·d_k·d_v weights per sample
        whichever way it contracts, and contracting k first would make an [..., n, d_v]
        intermediate, n/d_k times larger than X: so the dense encoders form X here."""
        return self._pre(k.unsqueeze(-1) * delta.unsqueeze(-2), 1.0, self.b_dec)[0]

    # --- the public surface --------------------------------------------------------------------

    def encode_pre(self, x: Matrices) -> Codes:
        """Pre-activations z of X."""
        return self._pre_and_centred(x)[0]

    def _pre_and_centred(self, x: Matrices) -> tuple[Codes, Matrices]:
        """`encode_pre` of X and the X·s − b_dec it encoded, which carries a gradient only where X needs one
        (`_keep_centred`): the trainer's residual starts from it."""
        pre, centred = self._pre(self.hook_sae_input(self._check_input(x)), self.cfg.input_scale, self.b_dec)
        return self.hook_sae_acts_pre(pre), centred

    def encode(self, x: Matrices) -> Codes:
        """Codes a of X."""
        pre = self.encode_pre(x)
        return self.hook_sae_acts_post(self.activation(pre))

    def encode_pre_factors(self, k: Keys, delta: Values) -> Codes:
        """Pre-activations of X = k δᵀ."""
        self._check_factors(k, delta)
        return self.hook_sae_acts_pre(self._pre_factors(k * self.cfg.input_scale, delta))

    def encode_factors(self, k: Keys, delta: Values) -> Codes:
        """Codes of X = k δᵀ, equal to ``encode(k δᵀ)`` (hook_sae_input does not fire: there is no X)."""
        return self.hook_sae_acts_post(self.activation(self.encode_pre_factors(k, delta)))

    def decode(self, codes: Codes) -> Matrices:
        """X̂ = (b_dec + Σ_i a_i atom_i) / s.

        Dense: it forms all n atoms (n·d_k·d_v per call, like a flat decoder) and has a gradient for
        every code, active or not; `decode_sparse` is the cheap route for sparse codes.
        """
        n_dicts, n = self.n_dicts, self.cfg.n_features
        if codes.dim() < 2 or tuple(codes.shape[-2:]) != (n_dicts, n):
            raise ValueError(f"expected codes of shape [..., n_dicts={n_dicts}, n_features={n}], got {tuple(codes.shape)}")
        return self.recons_from_atoms(self._decode_dense(codes))

    def decode_sparse(self, indices: Int[Tensor, "*batch n_dicts m"], values: Float[Tensor, "*batch n_dicts m"]
                      ) -> Matrices:
        """`decode` of the code with ``values`` at ``indices`` and zeros elsewhere (repeated indices
        add up), by `decode_atoms`: gathering only those m atoms where that is the cheaper way."""
        if indices.shape != values.shape or indices.dim() < 2 or indices.shape[-2] != self.n_dicts:
            raise ValueError(f"expected indices and values of one shape [..., n_dicts={self.n_dicts}, m], "
                             f"got {tuple(indices.shape)} and {tuple(values.shape)}")
        return self.recons_from_atoms(self.decode_atoms(indices, values))

    def recons_from_atoms(self, summed: Float[Tensor, "*batch n_dicts d_k d_v"]) -> Matrices:
        """X̂ = (b_dec + summed) / s from summed = Σ_i a_i atom_i (`decode_atoms`' units), through hook_sae_recons."""
        return self.hook_sae_recons((summed + self.b_dec) / self.cfg.input_scale)

    def forward(self, x: Matrices) -> Matrices:
        """X̂, or with ``use_error_term`` X̂ + (X − X̂_clean).detach(), X̂_clean being X̂ with no hooks
        run (a second, gradient-free pass): the output then equals X until a hook edits something,
        and an edit of the codes changes it by exactly its change of X̂."""
        recons = self.decode(self.encode(x))
        if not self.use_error_term:
            return self.hook_sae_output(recons)
        with torch.no_grad():
            s = self.cfg.input_scale
            clean = self._decode(self.activation(self._pre(x, s, self.b_dec)[0])) / s
            error = self.hook_sae_error(x - clean)
        return self.hook_sae_output(recons + error)

    def _decode(self, codes: Tensor) -> Tensor:
        return self._decode_dense(codes) + self.b_dec

    def _decode_dense(self, codes: Tensor) -> Tensor:
        """Σ_i a_i atom_i over every feature (no b_dec, weights' units), through `_DenseDecode`."""
        atoms = self.atoms()
        return _DenseDecode.apply(codes, atoms.flatten(-2)).unflatten(-1, atoms.shape[-2:])

    def l1_penalty(self, codes: Codes) -> Float[Tensor, "*batch n_dicts"]:
        """Σ_i a_i ‖atom_i‖_F: the L1 penalty weighted by atom norm (ReLU training)."""
        return (codes * self.atom_norms()).sum(-1)

    def n_weight_parameters(self) -> int:
        """Weights of docs/design.md §13's table (no biases, no thresholds), times n_dicts."""
        return sum(p.numel() for name, p in self.named_parameters(recurse=False) if name not in ("b_enc", "b_dec"))

    @torch.no_grad()
    def fold_input_scale_(self) -> SAEBase:
        """Fold s = cfg.input_scale into the weights and set it to 1; codes and outputs are unchanged.

        The encoder's input-side weights are multiplied by s, the decoder's value-side factor (or
        W_dec) and b_dec divided by s.
        """
        s = self.cfg.input_scale
        if s != 1:
            self._fold_scale_(s)
            self.b_dec /= s
            self.cfg.input_scale = 1.0
        return self

    def save(self, path: str | Path) -> None:
        from .io import save_sae

        save_sae(self, path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> SAEBase:
        from .io import load_sae

        sae = load_sae(path, device=device)
        if not isinstance(sae, cls):
            raise ValueError(f"{path} holds a {type(sae).__name__}, not a {cls.__name__}")
        return sae

    def _check_input(self, x: Tensor) -> Tensor:
        expected = (self.n_dicts, self.cfg.d_k, self.cfg.d_v)
        if x.dim() < 3 or tuple(x.shape[-3:]) != expected:
            raise ValueError(f"expected X of shape [..., n_dicts={expected[0]}, d_k={expected[1]}, d_v={expected[2]}], "
                             f"got {tuple(x.shape)}")
        return x

    def _check_factors(self, k: Tensor, delta: Tensor) -> None:
        n_dicts, d_k, d_v = self.n_dicts, self.cfg.d_k, self.cfg.d_v
        if (k.dim() < 2 or tuple(k.shape[-2:]) != (n_dicts, d_k) or delta.dim() != k.dim()
                or tuple(delta.shape[-2:]) != (n_dicts, d_v) or k.shape[:-1] != delta.shape[:-1]):
            raise ValueError(f"expected k [..., n_dicts={n_dicts}, d_k={d_k}] and delta [..., n_dicts={n_dicts}, d_v={d_v}] "
                             f"with the same leading shape, got {tuple(k.shape)} and {tuple(delta.shape)}")

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"heads={c.heads}, d_k={c.d_k}, d_v={c.d_v}, n_features={c.n_features}, rank={c.rank}, "
                f"sparsity={c.sparsity}, k={c.k}, tied={c.tied}")


class FlatSAE(SAEBase):
    """The baseline: vec(X) as a d_k·d_v vector. Parameters W_enc, W_dec [n_dicts, n, d_k·d_v]."""

    architecture = "flat"
    summary = "a plain SAE on the flattened d_k × d_v matrix"

    def _init_weights(self, generator, dtype):
        h, n, d = self.n_dicts, self.cfg.n_features, self.cfg.d_k * self.cfg.d_v
        self.W_dec = nn.Parameter(_unit_randn(h, n, d, generator=generator, dtype=dtype))
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())

    def _pre(self, x, scale, offset):
        pre, centred = _dense_pre(self.W_enc, x, scale, offset)
        return pre + self.b_enc, centred

    def atoms(self):
        return self.W_dec.unflatten(-1, (self.cfg.d_k, self.cfg.d_v))

    def atom_norms(self):
        return self.W_dec.norm(dim=-1)

    def _decode_gathered(self, indices, values):
        # embedding_bag sums the weighted rows without materialising the [..., m, d_k·d_v] gather
        # (a third of the time of gather-then-contract, forward and backward); past the cache, in blocks of columns
        # (`gather_columns_per_block`) where the CSR products take the dtype and each sample has no more terms than W
        # has rows (more, possible only with repeats, and torch's sampled product behind ∂values refuses the pattern)
        rows, values, W = _rows(indices, self.cfg.n_features).flatten(0, -2), values.flatten(0, -2), self.W_dec.flatten(0, 1)
        if under_torch_func():
            flat = torch.einsum("sm,smd->sd", values, _gather_rows(W, rows))
        elif (W.dtype in CSR_DTYPES and rows.shape[-1] <= len(W)
                and gather_columns_per_block(len(W), len(rows), rows.numel(), W.shape[-1], W.device) < W.shape[-1]):
            flat = _BlockedGatheredRows.apply(rows, values, W)
        else:
            flat = F.embedding_bag(rows, W, per_sample_weights=values, mode="sum")
        return flat.view(*indices.shape[:-1], self.cfg.d_k, self.cfg.d_v)

    def _fold_scale_(self, s):
        self.W_enc *= s
        self.W_dec /= s

    @torch.no_grad()
    def normalize_factors_(self):
        """W_dec,i → unit norm; each code a_i grows by the old ‖W_dec,i‖ (W_enc,i, b_enc,i and a
        JumpReLU θ_i scale with it), so a_i W_dec,i is unchanged: exactly for ReLU and JumpReLU."""
        _rescale_dense_codes_(self, _unit_(self.W_dec))
        return self


class _FactoredDecoderSAE(SAEBase):
    """Decoder atoms Σ_r V_ir W_irᵀ from V [n_dicts, n, r, d_k] and W [n_dicts, n, r, d_v]."""

    def _init_decoder(self, generator, dtype):
        h, n, r = self.n_dicts, self.cfg.n_features, self.cfg.rank
        self.V = nn.Parameter(_unit_randn(h, n, r, self.cfg.d_k, generator=generator, dtype=dtype))
        self.W = nn.Parameter(_unit_randn(h, n, r, self.cfg.d_v, generator=generator, dtype=dtype))

    def atoms(self):
        return _factor_atoms(self.V, self.W)

    def atom_norms(self):
        return _factor_atom_norms(self.V, self.W)

    def _decode_gathered(self, indices, values):
        return _factor_decode_sparse(self.V, self.W, indices, values)


class MatrixSAE(_FactoredDecoderSAE):
    """Dense encoder W_enc [n_dicts, n, d_k·d_v]; rank-r decoder atoms Σ_r V_ir W_irᵀ,
    V [n_dicts, n, r, d_k], W [n_dicts, n, r, d_v]."""

    architecture = "matrix"
    summary = "rank-r atoms, linear encoder"

    def _init_weights(self, generator, dtype):
        self._init_decoder(generator, dtype)
        self.W_enc = nn.Parameter(self.atoms().detach().flatten(-2).clone())

    def _pre(self, x, scale, offset):
        pre, centred = _dense_pre(self.W_enc, x, scale, offset)
        return pre + self.b_enc, centred

    def _fold_scale_(self, s):
        self.W_enc *= s
        self.W /= s

    @torch.no_grad()
    def normalize_factors_(self):
        """V_ir, W_ir → unit norm; each code a_i grows by c_i = ‖atom_i‖_F before / after (W_enc,i,
        b_enc,i and a JumpReLU θ_i scale with it), so ‖a_i atom_i‖_F is kept. At rank 1 (or whenever
        a feature's components share one scale ‖V_ir‖‖W_ir‖) a_i atom_i is unchanged: exactly so
        for ReLU and JumpReLU. At rank > 1 the components' relative weights become equal."""
        before = self.atom_norms()
        _unit_(self.V)
        _unit_(self.W)
        after = self.atom_norms()
        _rescale_dense_codes_(self, before / after.clamp_min(torch.finfo(after.dtype).tiny))
        return self


class BilinearMatrixSAE(_FactoredDecoderSAE):
    """The WriteSAE: encoder z_i = Σ_r U_irᵀ (X − b_dec) P_ir + b_enc,i with U [n_dicts, n, r, d_k],
    P [n_dicts, n, r, d_v]; decoder atoms Σ_r V_ir W_irᵀ. Tied: U = V and P = W (no U, P stored)."""

    architecture = "bilinear"
    summary = "WriteSAE, rank-r atoms with a bilinear encoder"

    def _init_weights(self, generator, dtype):
        self._init_decoder(generator, dtype)
        if not self.cfg.tied:
            self.U = nn.Parameter(self.V.detach().clone())
            self.P = nn.Parameter(self.W.detach().clone())

    @property
    def encoder_factors(self) -> tuple[Tensor, Tensor]:
        """(U, P), which are (V, W) when tied."""
        return (self.V, self.W) if self.cfg.tied else (self.U, self.P)

    def _pre(self, x, scale, offset):
        pre, centred = _bilinear_pre(*self.encoder_factors, x, scale, offset)
        return pre + self.b_enc, centred

    def _pre_factors(self, k, delta):
        """z_i = Σ_r (U_irᵀ k)(δᵀ P_ir) + (b_enc,i − Σ_r U_irᵀ b_dec P_ir): O(n·r·(d_k + d_v)) per
        sample; the bracket, a per-feature constant, is `_pre` of −b_dec."""
        U, P = self.encoder_factors
        per_rank = torch.einsum("...hk,hnrk->...hnr", k, U) * torch.einsum("...hv,hnrv->...hnr", delta, P)
        return per_rank.sum(-1) + self._pre(torch.zeros_like(self.b_dec), 1.0, self.b_dec)[0]

    def _fold_scale_(self, s):
        if self.cfg.tied:
            raise ValueError(f"cannot fold input_scale={s} into a tied BilinearMatrixSAE: its encoder would need "
                             "U = V scaled by s and its decoder V scaled by 1/s, which breaks the tie; keep input_scale "
                             "(every method applies it) or train untied")
        self.U *= s
        self.W /= s

    @torch.no_grad()
    def normalize_factors_(self):
        """V_ir, W_ir (and U_ir, P_ir when untied) → unit norm: a projection onto the unit-norm
        constraint, with no compensation (U and P are themselves held at unit norm, so nothing is
        left to absorb a scale). Outputs change unless the factors already had unit norm; run after
        each optimiser step, the change is that of a projected gradient step."""
        for factor in (self.V, self.W) if self.cfg.tied else (self.V, self.W, self.U, self.P):
            _unit_(factor)
        return self


ARCHITECTURES: dict[str, type[SAEBase]] = {cls.architecture: cls for cls in (BilinearMatrixSAE, MatrixSAE, FlatSAE)}
"""Every SAE class by its ``cfg.architecture`` (what ``writesae train --architecture`` offers, in this order)."""
