"""Patching SAE feature activations from a clean run into a corrupted one, in `hooked_gdn.patching`'s conventions.

An SAE spliced at a GDN site (`writesae.splice`) has its codes a_t at ``<site>.sae.hook_sae_acts_post``
[batch, pos, n_dicts, n_features], one dictionary per head. Patching feature i of head h at position
t replaces a_t[h, i] by its clean value; the SAE's reconstruction, and with it the state (or the
write) at t, changes by exactly (a_clean − a_corrupted)·atom_i, and the change carries forward
through the recurrence like any state edit. With ``use_error_term=True`` (the default) the SAE
adds back its error, so an unpatched run is exactly the model's run and only the patched features
move it. The grid's axes are "pos", "head" (the model's value heads, among the SAE's) and
"feature"; an axis left out is patched whole, and several positions run the recurrence one
position at a time, so each holds exactly its clean code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

from jaxtyping import Float, Int
from torch import Tensor

from hooked_gdn.patching import Patch, PatchingMetric, as_tokens, check_patch, patch_grid, run_with_patches
from hooked_gdn.sites import gdn_hook_name

from .sae import SAEBase
from .site_fit import check_sae_fits
from .splice import HookedSAEGatedDeltaNet

FEATURE_AXES = ("pos", "head", "feature")


def sae_acts_name(sae: SAEBase) -> str:
    """The hook point of ``sae``'s codes once spliced: ``<site>.sae.hook_sae_acts_post``."""
    return f"{sae.cfg.site}.sae.hook_sae_acts_post"


def get_act_patch_sae_features(
    model: HookedSAEGatedDeltaNet,
    corrupted_tokens: str | Int[Tensor, "batch pos"],
    clean_cache: Mapping[str, Tensor],
    patching_metric: PatchingMetric,
    sae: SAEBase,
    features: Sequence[int] | None = None,
    index_axis_names: Sequence[str] = FEATURE_AXES,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    use_error_term: bool = True,
    show_progress: bool = True,
) -> Float[Tensor, "..."]:
    """Patch ``sae``'s feature activations from the clean run, one run per index of
    ``index_axis_names`` (among "pos", "head", "feature"); returns ``patching_metric`` shaped like the grid.

    ``features`` (default all: choose a few), ``positions`` and ``heads`` (the model's value heads,
    default the SAE's) restrict the grid and what a left-out axis patches. ``sae`` is attached for
    the runs (with ``use_error_term``) unless it is already. ``clean_cache`` holds its codes at
    every position of the clean run, e.g. from ``model.run_with_cache_with_saes(clean_tokens,
    saes=[sae], use_error_term=True, names_filter=sae_acts_name(sae))``.
    """
    site = check_sae_fits(sae, model)  # refuses an SAE that does not fit this model, before any run
    attached = model.acts_to_saes.get(sae.cfg.site)
    if attached is not None and attached is not sae:
        raise ValueError(f"another SAE is attached at {sae.cfg.site}; reset_saes() first")
    tokens = as_tokens(model, corrupted_tokens)
    name = sae_acts_name(sae)
    if name not in clean_cache:
        raise ValueError(f"the clean cache has no {name}: cache it with model.run_with_cache_with_saes(clean_tokens, "
                         f"saes=[sae], use_error_term=True, names_filter={name!r})")
    clean = clean_cache[name]
    dict_of_head = {h: i for i, h in enumerate(sae.cfg.head_indices)}
    heads = list(dict_of_head) if heads is None else [int(h) for h in heads]
    missing = [h for h in heads if h not in dict_of_head]
    if missing:
        raise ValueError(f"heads {missing} have no dictionary in this SAE (its heads: {sae.cfg.head_indices})")
    axes = {
        "pos": list(range(tokens.shape[1])) if positions is None else [int(t) for t in positions],
        "head": heads,
        "feature": list(range(sae.cfg.n_features)) if features is None else [int(i) for i in features],
    }
    state_hook = gdn_hook_name(site.layer, "hook_state")  # both kinds of SAE fire where hook_state fires

    def patch(selection: dict[str, list[int]]) -> Patch:
        return Patch(name, clean, tuple(selection["pos"]), tuple(dict_of_head[h] for h in selection["head"]),
                     tuple(selection["feature"]), positions_from=state_hook)

    check_patch(patch(axes), tokens)
    with model.saes([sae], use_error_term=use_error_term) if attached is None else nullcontext():
        return patch_grid(axes, index_axis_names, lambda selection: run_with_patches(model, tokens, [patch(selection)]),
                          patching_metric, show_progress)
