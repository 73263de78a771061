"""Activation patching over the GDN memory, in TransformerLens' conventions (its ``patching.py``).

A patched run takes the corrupted input and replaces an activation, at chosen GDN layers, sequence
positions and heads, by its value in the clean run (read from ``clean_cache``); ``patching_metric``
maps its logits to a number. `generic_activation_patch` runs one patched run per index of a grid
(``index_axis_names`` among "layer", "pos", "head"; an axis left out is patched whole) and returns a
tensor shaped like the grid, ready for `plot_patching_heatmap`. Thin wrappers name the sites:

- ``"state"``: S_t (``hook_state``);
- ``"write"``, ``"write_key"``, ``"write_value"``: the write k̂_t δ_tᵀ, both sides or one
  (patching k̂ alone keeps the δ the corrupted run computed, and the reverse);
- ``"read"``: o_t = S_tᵀ q̂_t (``hook_recurrence_out``);
- any other GDN hook point with a position and a head axis by its short name (``"read_query"``,
  ``"v"``, ``"beta"``, ``"log_decay"``, ``"gated_out"``, …).

Layers are the GDN layers (``model.cfg.gdn_layers``, or a subset given as ``layers``); the grid's
layer axis follows that list. State and write patches carry forward, as every edit of those hook
points does (docs/design.md §8): later positions follow the delta rule from the patched state. A state
patched at one position runs in the default parallel mode; a state patched at several positions
runs one position at a time (``recurrence="sequential"``), so that each holds exactly its clean
value (in parallel mode each position's clean − corrupted difference would be added and carried,
and the differences would sum). `run_with_patches` applies any list of `Patch`es in one run; the
SAE-feature version is `writesae.patching`.

`logit_diff_recovered` builds the usual metric: the logit difference between two answers, normalised
to 0 for the corrupted run and 1 for the clean one. `plot_patching_heatmap` draws a grid, and
`position_labels` names its positions by their tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .cache import GDNCache
from .files import atomic_file
from .model import HookedGatedDeltaNet
from .sites import GDN_HOOKS, SITE_KEY_HOOKS, SITE_VALUE_HOOK, gdn_hook_name

PatchingMetric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""] | float]

AXES = ("layer", "pos", "head")
_NAMED = {
    "state": ("hook_state",),
    "write": (*SITE_KEY_HOOKS["write"], SITE_VALUE_HOOK["write"]),  # the write site's key and value
    "write_key": ("hook_write_key",),
    "write_value": ("hook_write_value",),
    "read": ("hook_recurrence_out",),
}
_NOT_PER_HEAD = ("hook_in", "hook_out", "hook_final_state")  # no position or no head axis
ACTIVATIONS = tuple(_NAMED) + tuple(h[len("hook_"):] for h in GDN_HOOKS if h not in _NOT_PER_HEAD and h[5:] not in _NAMED)


def activation_hooks(activation_name: str) -> tuple[str, ...]:
    """The GDN hook points (``hook_…``) that patching ``activation_name`` replaces."""
    if activation_name in _NAMED:
        return _NAMED[activation_name]
    if activation_name in ACTIVATIONS:
        return (f"hook_{activation_name}",)
    raise ValueError(f"cannot patch {activation_name!r}: the activations are {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class Patch:
    """Replace hook point ``name``'s activation by ``clean`` (its value at every position of the clean
    run, [batch, pos, ...]) at sequence ``positions`` (dim 1), indices ``heads`` of dim 2 and, for
    SAE codes, ``features`` of dim 3; None means all of them.

    Where the hook point's dim 1 holds other positions than 0…p−1 (``hook_state`` fires at
    ``state_positions``), the positions are read from ``positions_from``'s ``ctx`` (default: the hook
    point itself, as `hooked_gdn.sites.hook_positions` does).
    """

    name: str
    clean: Float[Tensor, "batch pos ..."]
    positions: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    features: tuple[int, ...] | None = None
    positions_from: str | None = None

    @property
    def fires_with_state(self) -> bool:
        """Whether the patched hook fires where ``hook_state`` fires (states, and SAE codes at a state site)."""
        return (self.positions_from or self.name).endswith("hook_state")


def _axis_mask(n: int, chosen: Sequence[int] | None, device) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[list(chosen) if chosen is not None else slice(None)] = True
    return mask


def _patch_hook(patch: Patch, model: HookedGatedDeltaNet, offset: int = 0) -> Callable:
    """The hook that applies ``patch``; ``offset``: the positions before the input (a cached prefix's), for a hook
    point that does not tell its positions."""
    positions_hook = model.hook_dict[patch.positions_from] if patch.positions_from else None

    def hook(x: Tensor, hook) -> Tensor | None:
        here = (hook if positions_hook is None else positions_hook).ctx.get("positions")  # the write/state hook points tell theirs
        here = torch.arange(offset, offset + x.shape[1]) if here is None else here
        here = here.to(x.device)
        at = torch.ones_like(here, dtype=torch.bool) if patch.positions is None else torch.isin(here, torch.tensor(patch.positions, device=x.device))
        if not bool(at.any()):
            return None  # nothing to patch in this firing: observe only, no recompute
        mask = at[:, None] & _axis_mask(x.shape[2], patch.heads, x.device)[None]
        if patch.features is not None:
            mask = mask[..., None] & _axis_mask(x.shape[3], patch.features, x.device)
        mask = mask.reshape(1, *mask.shape, *[1] * (x.dim() - 1 - mask.dim()))
        clean = patch.clean[:, here.to(patch.clean.device)].to(x.device, x.dtype)
        return torch.where(mask, clean, x)

    return hook


def as_tokens(model: HookedGatedDeltaNet, tokens: str | Tensor) -> Int[Tensor, "batch pos"]:
    if isinstance(tokens, str):
        return model.to_tokens(tokens)
    if not isinstance(tokens, Tensor):
        raise TypeError(f"corrupted_tokens must be a string or a token tensor, got {type(tokens).__name__}")
    return tokens[None] if tokens.dim() == 1 else tokens


def check_patch(patch: Patch, tokens: Tensor) -> None:
    b, T = tokens.shape
    if patch.clean.dim() < 3 or patch.clean.shape[1] != T:
        got = tuple(patch.clean.shape)
        raise ValueError(
            f"the clean {patch.name} has shape {got}, the corrupted input {T} positions: patching pairs the "
            f"clean and corrupted runs position by position, so both prompts must have the same number of "
            f"tokens (and the clean cache must hold every position: no state_positions)")
    if patch.clean.shape[0] not in (1, b):
        raise ValueError(f"the clean {patch.name} has a batch of {patch.clean.shape[0]}, the corrupted input {b}")
    for axis, chosen, n in (("positions", patch.positions, T), ("heads", patch.heads, patch.clean.shape[2]),
                            ("features", patch.features, patch.clean.shape[3] if patch.clean.dim() > 3 else 0)):
        if chosen is not None and any(not 0 <= i < n for i in chosen):
            raise ValueError(f"{axis} {list(chosen)} out of range for {patch.name} (size {n})")


def run_with_patches(
    model: HookedGatedDeltaNet, corrupted_tokens: str | Int[Tensor, "batch pos"], patches: Sequence[Patch],
    from_residual: tuple[int, Tensor] | None = None, from_prefix: tuple[int, GDNCache, Tensor] | None = None,
    **forward_kwargs
) -> Float[Tensor, "batch pos d_vocab"]:
    """The corrupted run with every patch applied at once; returns its logits.

    Chooses ``state_positions`` (the patched states' positions, so no other state is formed) and,
    when a state or an SAE code at a state site is patched at several positions, the sequential
    recurrence; ``forward_kwargs`` override these. Where the patches leave part of the corrupted run alone, the
    run skips it (`CorruptedRun`), the two alone or together: ``from_residual`` = (L, the corrupted run's residual
    stream entering block L), for patches at block L or later, starts the run there (``start_at_layer``);
    ``from_prefix`` = (t, the corrupted run's cache after its first t positions, which the run consumes, and its
    logits), for patches at position t or later, runs only positions t, … from that cache, the logits before t
    being the corrupted run's (causality).
    """
    tokens = as_tokens(model, corrupted_tokens)
    for patch in patches:
        for name in (patch.name, patch.positions_from):
            if name is not None and name not in model.hook_dict:
                raise ValueError(f"the model has no hook point {name!r}")
        check_patch(patch, tokens)
    offset = 0 if from_prefix is None else from_prefix[0]
    if offset and any(p.positions is None or min(p.positions) < offset for p in patches):
        raise ValueError(f"from_prefix skips positions before {offset}, where a patch lies")
    with_state = [p for p in patches if p.fires_with_state]
    if with_state:
        if all(p.positions is not None for p in with_state):
            forward_kwargs.setdefault("state_positions", sorted({t - offset for p in with_state for t in p.positions}))
        if any((tokens.shape[1] if p.positions is None else len(p.positions)) > 1 for p in with_state):
            forward_kwargs.setdefault("recurrence", "sequential")
    hooks = [(p.name, _patch_hook(p, model, offset)) for p in patches]
    if from_residual is not None:
        forward_kwargs |= {"start_at_layer": from_residual[0]}
    if from_prefix is not None:
        forward_kwargs |= {"cache": from_prefix[1]}
    logits = model.run_with_hooks((tokens if from_residual is None else from_residual[1])[:, offset:], fwd_hooks=hooks,
                                  **forward_kwargs)
    return logits if from_prefix is None else torch.cat([from_prefix[2][:, :offset].to(logits.dtype), logits], 1)


class CorruptedRun:
    """What a grid's patched runs would compute as the corrupted run does, so that each can skip it: the blocks
    before its earliest patched layer (the residual stream entering it, formed once: ``from_residual``) and the
    positions before its earliest patched position (causality: a copy of the corrupted run's cache after them,
    advanced as a grid goes through positions in order, `patch_grid`'s ``outermost``, and restarted where an
    earlier one is asked for, and its logits there: ``from_prefix``). Formed under the hooks active when it is
    made."""

    def __init__(self, model: HookedGatedDeltaNet, tokens: Int[Tensor, "batch pos"], layers: Sequence[int]):
        self.model, self.tokens = model, tokens
        self.logits, self.residuals = corrupted_residuals(model, tokens, layers)
        self._length, self._cache = 0, GDNCache()

    def skip(self, layer: int, position: int) -> dict:
        """`run_with_patches`' keywords for a run whose patches lie at ``layer`` or later and ``position`` or later:
        the blocks before ``layer`` (where a forward can start there) and the positions before ``position``."""
        skip = {"from_residual": (layer, self.residuals[layer])} if layer in self.residuals else {}
        return skip | ({"from_prefix": (position, self.prefix_cache(position), self.logits)} if position else {})

    def prefix_cache(self, position: int) -> GDNCache:
        """A copy of the corrupted run's cache after its first ``position`` positions (``from_prefix``'s)."""
        if position < self._length:
            self._length, self._cache = 0, GDNCache()
        if position > self._length:
            with torch.no_grad():
                self.model(self.tokens[:, self._length:position], None, cache=self._cache)
            self._length = position
        return self._cache.copy()


def corrupted_residuals(model: HookedGatedDeltaNet, tokens: Int[Tensor, "batch pos"],
                        layers: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
    """The corrupted run's logits, and its residual stream entering each of ``layers`` after the first block at
    which a forward can start (`HookedGatedDeltaNet.can_start_at`; none on RWKV-7): what `run_with_patches` starts
    a patched run from (``from_residual``), so that a grid's runs skip the blocks before their earliest patched
    layer, which they would compute as the corrupted run does."""
    starts = sorted({layer for layer in layers if layer > 0 and model.can_start_at(layer)})
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[f"blocks.{layer}.hook_resid_pre" for layer in starts])
    return logits, {layer: cache[f"blocks.{layer}.hook_resid_pre"] for layer in starts}


def _gdn_layers(model: HookedGatedDeltaNet, layers: Sequence[int] | None) -> list[int]:
    gdn = list(model.cfg.gdn_layers)
    layers = gdn if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if layer not in gdn]
    if not layers:
        raise ValueError(f"no layers to patch; this model's GDN layers are {gdn}")
    if bad:
        raise ValueError(f"layers {bad} are not Gated DeltaNet layers; this model's GDN layers are {gdn}")
    return layers


def _clean_activation(clean_cache: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in clean_cache:
        hint = (" States are cached only when named: model.run_with_cache(clean_tokens, "
                "names_filter=lambda name: name.endswith('hook_state'))") if name.endswith("hook_state") else ""
        raise ValueError(f"the clean cache has no {name}.{hint}")
    return clean_cache[name]


def _metric_value(value) -> float:
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(f"patching_metric must return a scalar, got shape {tuple(value.shape)}")
    return float(value)


def patch_grid(
    axes: Mapping[str, Sequence[int]],
    index_axis_names: Sequence[str],
    run: Callable[[dict[str, list[int]]], Tensor],
    patching_metric: PatchingMetric,
    show_progress: bool = True,
    outermost: str | None = None,
) -> Float[Tensor, "..."]:
    """One patched run per index of the grid over ``index_axis_names``; returns the metric in its shape.

    ``axes`` gives each axis's values; ``run(selection)`` gets, for every axis, the values patched
    in this run (one for an indexed axis, all of them for an axis left out) and returns logits. The runs go
    through ``outermost``'s values in order, the other axes inside it (where it is indexed; else in the grid's
    order).
    """
    names = list(index_axis_names)
    if len(set(names)) != len(names) or any(name not in axes for name in names):
        raise ValueError(f"index_axis_names {names} must be distinct names among {list(axes)}")
    shape = [len(axes[name]) for name in names]
    result = torch.zeros(shape)
    order = sorted(range(len(names)), key=lambda i: names[i] != outermost)  # stable: the others keep their order
    indices = [tuple(ordered[order.index(i)] for i in range(len(names)))
               for ordered in itertools.product(*(range(shape[i]) for i in order))]
    for index in tqdm(indices, disable=not show_progress):
        selection = {axis: list(values) for axis, values in axes.items()}
        selection.update({name: [axes[name][i]] for name, i in zip(names, index)})
        with torch.no_grad():
            result[index] = _metric_value(patching_metric(run(selection)))
    return result


def generic_activation_patch(
    model: HookedGatedDeltaNet,
    corrupted_tokens: str | Int[Tensor, "batch pos"],
    clean_cache: Mapping[str, Tensor],
    patching_metric: PatchingMetric,
    activation_name: str,
    index_axis_names: Sequence[str] = AXES,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    show_progress: bool = True,
    skip_unpatched_blocks: bool = True,
) -> Float[Tensor, "..."]:
    """Patch ``activation_name`` (see the module docstring) from the clean run into the corrupted
    one, one run per index of ``index_axis_names`` (a subset of "layer", "pos", "head", in the
    result's axis order); returns ``patching_metric`` of each run, shaped like the grid.

    ``layers`` (GDN layers), ``positions`` and ``heads`` restrict the grid and what a left-out axis
    patches (default: all). ``clean_cache`` holds the activation at every position of the clean run
    (for states, name them: ``model.run_with_cache(clean_tokens, names_filter=...)``). With
    ``skip_unpatched_blocks`` (default) each run skips what the corrupted run computes (`CorruptedRun`, formed
    under the hooks active then): the blocks before its earliest patched layer and the positions before its
    earliest patched position. Hooks there then fire for the grid, not in each run, so a
    metric that reads them rather than the logits needs ``skip_unpatched_blocks=False``.
    """
    tokens = as_tokens(model, corrupted_tokens)
    hooks = activation_hooks(activation_name)
    layers = _gdn_layers(model, layers)
    clean = {(layer, hook): _clean_activation(clean_cache, gdn_hook_name(layer, hook)) for layer in layers for hook in hooks}
    n_heads = next(iter(clean.values())).shape[2]
    axes = {
        "layer": layers,
        "pos": list(range(tokens.shape[1])) if positions is None else [int(t) for t in positions],
        "head": list(range(n_heads)) if heads is None else [int(h) for h in heads],
    }

    corrupted = CorruptedRun(model, tokens, layers) if skip_unpatched_blocks else None

    def run(selection: dict[str, list[int]]) -> Tensor:
        patches = [Patch(gdn_hook_name(layer, hook), clean[layer, hook], tuple(selection["pos"]), tuple(selection["head"]))
                   for layer in selection["layer"] for hook in hooks]
        skip = {} if corrupted is None else corrupted.skip(min(selection["layer"]), min(selection["pos"]))
        return run_with_patches(model, tokens, patches, **skip)

    # validate once, before the grid: lengths, ranges, hook names
    for layer in layers:
        for hook in hooks:
            check_patch(Patch(gdn_hook_name(layer, hook), clean[layer, hook], tuple(axes["pos"]), tuple(axes["head"])), tokens)
    return patch_grid(axes, index_axis_names, run, patching_metric, show_progress, outermost="pos")


def get_act_patch_state(
    model: HookedGatedDeltaNet, corrupted_tokens, clean_cache, patching_metric, index_axis_names=AXES, **kwargs
) -> Float[Tensor, "..."]:
    """Patch the state S_t; default grid [layer, pos, head]. Carried forward from each patched position."""
    return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, "state", index_axis_names, **kwargs)


def get_act_patch_write(
    model: HookedGatedDeltaNet, corrupted_tokens, clean_cache, patching_metric, index_axis_names=AXES, side: str = "both",
    **kwargs,
) -> Float[Tensor, "..."]:
    """Patch the write k̂_t δ_tᵀ: ``side`` "both", "key" (k̂) or "value" (δ); default grid [layer, pos, head]."""
    sides = {"both": "write", "key": "write_key", "value": "write_value"}
    if side not in sides:
        raise ValueError(f"side must be one of {list(sides)}, got {side!r}")
    return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, sides[side], index_axis_names, **kwargs)


def get_act_patch_read(
    model: HookedGatedDeltaNet, corrupted_tokens, clean_cache, patching_metric, index_axis_names=AXES, **kwargs
) -> Float[Tensor, "..."]:
    """Patch the read o_t = S_tᵀ q̂_t (``hook_recurrence_out``); default grid [layer, pos, head]."""
    return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, "read", index_axis_names, **kwargs)


MEMORY_SITES = ("state", "write", "read")


def get_act_patch_memory_every(
    model: HookedGatedDeltaNet, corrupted_tokens, clean_cache, patching_metric, **kwargs
) -> Float[Tensor, "3 layer pos"]:
    """The state, the write (both sides) and the read, each patched per GDN layer and position over
    all heads: [3, layer, pos] in the order of ``MEMORY_SITES`` (as TransformerLens' ``get_act_patch_block_every``)."""
    return torch.stack([
        generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, site, ("layer", "pos"), **kwargs)
        for site in MEMORY_SITES
    ])


@dataclass(frozen=True)
class LogitDiffRecovered:
    """A patching metric: the logit difference LD = logit(``answer``) − logit(``wrong``) at the last
    position (mean over the batch), normalised as (LD − ``corrupted``) / (``clean`` − ``corrupted``),
    so the corrupted run scores 0 and the clean run 1. Build it with `logit_diff_recovered`."""

    answer: int
    wrong: int
    clean: float  # LD of the clean run
    corrupted: float  # LD of the corrupted run

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, ""]:
        return (logit_diff(logits, self.answer, self.wrong) - self.corrupted) / (self.clean - self.corrupted)


def logit_diff(logits: Float[Tensor, "batch pos d_vocab"], answer: int, wrong: int) -> Float[Tensor, ""]:
    """logit(``answer``) − logit(``wrong``) at the last position, mean over the batch."""
    return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()


def logit_diff_recovered(
    model: HookedGatedDeltaNet, clean_tokens: str | Int[Tensor, "batch pos"], corrupted_tokens: str | Int[Tensor, "batch pos"],
    answer: str | int, wrong: str | int,
) -> LogitDiffRecovered:
    """The normalised logit-difference metric of `LogitDiffRecovered` for this pair of prompts, the
    clean run's answer and the corrupted run's (each a string of one token, or a token id). Refused
    when the two runs' logit differences are equal: there is nothing to recover."""
    answer, wrong = (model.to_single_token(t) if isinstance(t, str) else int(t) for t in (answer, wrong))
    with torch.no_grad():
        clean, corrupted = (float(logit_diff(model(as_tokens(model, tokens)), answer, wrong))
                            for tokens in (clean_tokens, corrupted_tokens))
    if abs(clean - corrupted) < 1e-3:
        raise ValueError(f"the corruption does not change the logit difference (clean {clean:.4f}, corrupted "
                         f"{corrupted:.4f}): nothing to patch")
    return LogitDiffRecovered(answer, wrong, clean, corrupted)


def position_labels(model: HookedGatedDeltaNet, tokens: str | Int[Tensor, "batch pos"]) -> list[str]:
    """Column labels for a heatmap over positions: ``"t:'token'"`` for each token of the first prompt."""
    return [f"{t}:{s!r}" for t, s in enumerate(model.to_str_tokens(as_tokens(model, tokens)[0]))]


def plot_patching_heatmap(
    values: Float[Tensor, "rows cols"] | Float[Tensor, "panels rows cols"],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    panel_titles: Sequence[str] | None = None,
    title: str | None = None,
    xlabel: str = "position",
    ylabel: str = "layer",
    colorbar_label: str = "metric",
    path: str | Path | None = None,
):
    """A heatmap of a patching result (one panel per entry of a 3-D result's first axis), diverging
    around 0 on one colour scale; saved to ``path`` when given. Returns the matplotlib figure, drawn
    without pyplot so that the caller's backend is left as it is (a notebook shows the returned figure)."""
    from matplotlib.figure import Figure

    values = torch.as_tensor(values).detach().float().cpu()
    panels = values[None] if values.dim() == 2 else values
    if panels.dim() != 3:
        raise ValueError(f"a heatmap needs a 2-D or 3-D result, got shape {tuple(values.shape)}")
    n, rows, cols = panels.shape
    limit = max(float(panels.abs().max()), 1e-12)
    fig = Figure(figsize=(max(4.0, 0.45 * cols + 2), (0.35 * rows + 1.2) * n))
    axs = fig.subplots(n, 1, squeeze=False)
    for i, ax in enumerate(axs[:, 0]):
        image = ax.imshow(panels[i].numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_yticks(range(rows), list(row_labels) if row_labels is not None else range(rows))
        if i == n - 1:  # the panels share their columns: label them once, under the last
            ax.set_xticks(range(cols), list(col_labels) if col_labels is not None else range(cols),
                          rotation=90 if col_labels is not None else 0)
        else:
            ax.set_xticks(range(cols), [])
        ax.set_ylabel(ylabel)
        if panel_titles is not None:
            ax.set_title(panel_titles[i])
        fig.colorbar(image, ax=ax, label=colorbar_label)
    axs[-1, 0].set_xlabel(xlabel)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png", dpi=100, bbox_inches="tight")
    return fig
