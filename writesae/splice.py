"""Attaching SAEs to a `HookedGatedDeltaNet`: splice reconstructions into the recurrence, patch features.

Named as in SAELens' ``HookedSAETransformer``: ``add_sae``, ``reset_saes``, ``saes(...)``,
``run_with_saes`` and ``run_with_cache_with_saes``. An SAE's ``cfg.site`` is one of

- ``blocks.{L}.linear_attn.hook_state``: the state S_t of GDN layer L;
- ``blocks.{L}.linear_attn.hook_write_value``: the layer's rank-1 write k̂_t δ_tᵀ, fed from
  ``hook_write_key`` and ``hook_write_value``.

The SAE becomes the submodule ``sae`` of the site's hook point, so its hook points are named
``<site>.sae.hook_sae_acts_post`` etc. and can be cached and patched like any other.

Splicing follows DESIGN §3's carry semantics. A state SAE replaces S_t by its reconstruction
(on its heads) wherever ``hook_state`` fires; a write SAE replaces the write k̂_t δ_tᵀ by its
reconstruction, applied as the state difference X̂_t − k̂_t δ_tᵀ at t. Either way later positions
follow the delta rule from the spliced state. Where it fires is ``state_positions`` (default: every
position). With ``recurrence="sequential"`` the SAE runs in the loop: each position's input is the
state (or write) that the earlier splices produced. In the default parallel mode each position's
replacement is computed from the clean run, and the differences are carried forward; with one
spliced position the two agree exactly.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import Tensor

from hooked_gdn import HookedGatedDeltaNet

from .sae import SAEBase

_SITE = re.compile(r"blocks\.(\d+)\.linear_attn\.(hook_state|hook_write_value)")


class HookedSAEGatedDeltaNet(HookedGatedDeltaNet):
    """`HookedGatedDeltaNet` that SAEs can be attached to (load it with ``from_pretrained`` as usual)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._attached: dict[str, tuple[SAEBase, list]] = {}  # site -> (sae, [(hook point, handle)])

    @property
    def acts_to_saes(self) -> dict[str, SAEBase]:
        return {site: sae for site, (sae, _) in self._attached.items()}

    def _check_sae(self, sae: SAEBase) -> tuple[int, str]:
        site = sae.cfg.site
        match = _SITE.fullmatch(site or "")
        if match is None:
            raise ValueError(
                f"cannot attach an SAE at site {site!r}: the sites are blocks.<L>.linear_attn.hook_state "
                "and blocks.<L>.linear_attn.hook_write_value of a GDN layer"
            )
        layer = int(match.group(1))
        if layer not in self.cfg.gdn_layers:
            raise ValueError(f"cannot attach an SAE at {site}: layer {layer} is not a GDN layer (GDN layers: {self.cfg.gdn_layers})")
        if (sae.cfg.d_k, sae.cfg.d_v) != (self.cfg.d_key, self.cfg.d_value):
            raise ValueError(f"SAE dims d_k={sae.cfg.d_k}, d_v={sae.cfg.d_v} do not match the model's {self.cfg.d_key}, {self.cfg.d_value}")
        bad = [h for h in sae.cfg.head_indices if not 0 <= h < self.cfg.n_value_heads]
        if bad or (sae.cfg.n_heads is not None and sae.cfg.n_heads != self.cfg.n_value_heads):
            raise ValueError(f"SAE heads {sae.cfg.head_indices} out of range: layer {layer} has {self.cfg.n_value_heads} value heads")
        if site in self._attached:
            raise ValueError(f"an SAE is already attached at {site}; reset_saes() first")
        return layer, match.group(2)

    def add_sae(self, sae: SAEBase, use_error_term: bool | None = None) -> None:
        """Attach ``sae`` at its ``cfg.site``; its reconstruction is spliced in from the next forward on."""
        layer, kind = self._check_sae(sae)
        if use_error_term is not None:
            sae.use_error_term = use_error_term
        sae.to(self.W_E.device)
        gdn = self.blocks[layer].linear_attn
        heads = torch.tensor(sae.cfg.head_indices)
        if kind == "hook_state":
            gdn.hook_state.sae = sae
            points = [(gdn.hook_state, _state_splice(sae, heads))]
        else:
            gdn.hook_write_value.sae = sae
            points = list(zip((gdn.hook_write_key, gdn.hook_write_value, gdn.hook_state), _write_splice(sae, heads)))
        # permanent, and first, so that user hooks on the site see the spliced value
        handles = [(hp, hp.add_hook(fn, is_permanent=True, prepend=True)) for hp, fn in points]
        self._attached[sae.cfg.site] = (sae, handles)
        self.setup()

    def reset_saes(self, sites: list[str] | None = None) -> None:
        """Detach the SAEs at ``sites`` (default: all)."""
        for site in list(self._attached if sites is None else sites):
            sae, handles = self._attached.pop(site)
            for hp, handle in handles:
                handle.hook.remove()
                hp.fwd_hooks.remove(handle)
            del self.hook_dict[site].sae
        self.setup()

    @contextmanager
    def saes(self, saes: list[SAEBase] = (), reset_saes_end: bool = True, use_error_term: bool | None = None):
        """Attach ``saes`` for the duration of the block."""
        added = []
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term)
                added.append(sae.cfg.site)
            yield self
        finally:
            if reset_saes_end:
                self.reset_saes(added)

    def run_with_saes(self, *model_args, saes: list[SAEBase] = (), use_error_term: bool | None = None, **model_kwargs):
        with self.saes(saes, use_error_term=use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes: list[SAEBase] = (), use_error_term: bool | None = None, **kwargs):
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_cache(*model_args, **kwargs)


def _replace_heads(full: Tensor, heads: Tensor, new: Tensor) -> Tensor:
    out = full.clone()
    out[:, :, heads] = new.to(full.dtype)
    return out


def _state_splice(sae: SAEBase, heads: Tensor):
    def splice(states: Tensor, hook) -> Tensor:  # [b, P, H, d_k, d_v]
        return _replace_heads(states, heads, sae(states[:, :, heads]))

    return splice


def _write_splice(sae: SAEBase, heads: Tensor):
    """Three hooks: remember k̂ and δ (with their positions), then add X̂ − k̂ δᵀ to the state."""
    seen: dict[str, Tensor] = {}

    def keep_key(k: Tensor, hook) -> None:
        seen["key"], seen["positions"] = k, hook.ctx["positions"]

    def keep_value(delta: Tensor, hook) -> None:
        seen["value"] = delta

    def splice(states: Tensor, hook) -> Tensor:
        rows = torch.searchsorted(seen["positions"], hook.ctx["positions"])
        k, delta = seen["key"][:, rows][:, :, heads], seen["value"][:, rows][:, :, heads]
        write = k[..., :, None] * delta[..., None, :]  # [b, P, n_heads, d_k, d_v]
        return _replace_heads(states, heads, states[:, :, heads] + sae(write) - write)

    return keep_key, keep_value, splice
