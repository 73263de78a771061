"""An SAE's features on text, by model head: its codes at the site, its most frequent features,
and the rank-1 directions the experiments install (an atom's factors, or a random control).

An SAE's dictionaries follow ``sae.cfg.head_indices``: dictionary d belongs to model head
``head_indices[d]`` (`SAEConfig.dictionary` maps back). Everything here takes and returns model heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from hooked_gdn.sites import parse_site, rank_one_key

from ..site_fit import check_sae_fits


@torch.no_grad()
def site_codes(model, sae, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos n_dicts n"]:
    """The SAE's codes at every position of its site: of the state S_t, or of the write k̂_t δ_tᵀ or the erase
    (a_t ⊙ κ̂_t) e_tᵀ (through ``encode_factors``, without forming it)."""
    site = check_sae_fits(sae, model)
    heads, dtype = sae.cfg.head_indices, sae.b_dec.dtype
    if site.kind == "state":
        _, cache = model.run_with_cache(tokens, names_filter=site.name)
        return sae.encode(cache[site.name][:, :, heads].to(dtype))
    _, cache = model.run_with_cache(tokens, names_filter=[*site.key_hooks, site.value_hook])
    key = rank_one_key([cache[name][:, :, heads] for name in site.key_hooks])
    return sae.encode_factors(key.to(dtype), cache[site.value_hook][:, :, heads].to(dtype))


@torch.no_grad()
def frequent_features(model, sae, tokens: Int[Tensor, "batch pos"], n: int,
                      heads: Sequence[int] | None = None) -> dict[int, list[tuple[int, float]]]:
    """Per model head (default: all the SAE's), the ``n`` features active (code > 0) at the most
    (sequence, position) pairs of ``tokens``, most frequent first, with that fraction of pairs."""
    # one sequence per forward: a state site holds d_k × d_v numbers per head and position
    active = sum((site_codes(model, sae, sequence[None])[0] > 0).float().sum(0) for sequence in tokens)
    frequency = active / (tokens.shape[0] * tokens.shape[1])  # [n_dicts, n]
    chosen = {}
    for head in sae.cfg.head_indices if heads is None else heads:
        per_feature = frequency[sae.cfg.dictionary(head)]
        chosen[head] = [(int(i), float(per_feature[i])) for i in per_feature.argsort(descending=True)[:n]]
    return chosen


@dataclass(frozen=True)
class Direction:
    """A rank-1 direction v wᵀ (unit v [d_k], unit w [d_v]) in one model head's state; an SAE atom
    records the GDN ``layer`` of its SAE's site (an experiment at another layer refuses it)."""

    head: int
    kind: str  # "atom" (an SAE feature's factors), "random" (a control), "aimed" (chosen for a target)
    label: str  # e.g. "feature 12", "random 0"
    v: Tensor
    w: Tensor
    layer: int | None = None

    def check_layer(self, layer: int) -> None:
        if self.layer is not None and self.layer != layer:
            raise ValueError(f"{self.label} of head {self.head} belongs to GDN layer {self.layer} (its SAE's site), "
                             f"not to layer {layer}")


def atom_direction(sae, head: int, feature: int) -> Direction:
    """The factors (V_i, W_i) of a rank-1 feature of model head ``head``, at unit norm."""
    if sae.cfg.rank != 1 or not hasattr(sae, "V"):
        raise ValueError(f"a rank-1 factored atom is one direction v wᵀ; this SAE is {sae.cfg.architecture} of rank {sae.cfg.rank}")
    d = sae.cfg.dictionary(head)
    v, w = (F.normalize(factor[d, feature, 0].detach().float(), dim=0) for factor in (sae.V, sae.W))
    layer = None if sae.cfg.site is None else parse_site(sae.cfg.site).layer
    return Direction(head, "atom", f"feature {feature}", v, w, layer)


def atom_and_random_directions(sae, features: dict[int, Sequence[int]], n_random: int,
                               generator: torch.Generator) -> list[Direction]:
    """Per model head, in order: the atoms of ``features[head]``, then ``n_random`` random unit
    directions (v, w ~ N(0, I), normalised; drawn from ``generator``) as a control."""
    directions = []
    for head, chosen in features.items():
        directions += [atom_direction(sae, head, feature) for feature in chosen]
        for j in range(n_random):
            v, w = torch.randn(sae.cfg.d_k, generator=generator), torch.randn(sae.cfg.d_v, generator=generator)
            directions.append(Direction(head, "random", f"random {j}", v / v.norm(), w / w.norm()))
    return directions
