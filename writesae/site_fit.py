"""Whether an SAE fits where it is asked to read, checked in one place for every tool.

An SAE fits a model (`check_sae_fits(sae, model)`: attaching, the dashboard, the experiments, the
commands) when its site is one of the model's GDN sites, its d_k × d_v is the model's head shape, and
its heads are heads of that layer; an SAE made with heads="all" learns the layer's head count here.
It fits a sample source (`check_sae_fits(sae, source=...)`: training) on the same terms, the source's
one site standing for the model's, and it must read exactly the source's heads.
`check_layer_heads` is the part that needs no SAE: a GDN layer of the model and heads of it.
"""

from __future__ import annotations

from collections.abc import Iterable

from hooked_gdn.sites import Site, parse_site

from .sae import SAEBase


def check_sae_fits(sae: SAEBase, model=None, *, source=None) -> Site:
    """The SAE's site on ``model``, or on the sample ``source`` (a store, a cache, samples in memory:
    anything with ``cfg.site``, ``heads``, ``n_value_heads``, ``d_k`` and ``d_v``), with the SAE told
    the site's head count; a ValueError naming what does not fit otherwise. Pass one of the two."""
    if (model is None) == (source is None):
        raise TypeError("check_sae_fits takes a model or a sample source, one of the two")
    if source is None:
        where, n_heads, shape = model.cfg.model_name, model.cfg.n_value_heads, (model.cfg.d_key, model.cfg.d_value)
        try:
            site = parse_site(sae.cfg.site, model.cfg.gdn_layers)
        except ValueError as error:
            raise ValueError(f"the SAE's site does not exist on {where}: {error}") from error
    else:
        where, n_heads, shape = str(source), source.n_value_heads, (source.d_k, source.d_v)
        if sae.cfg.site != source.cfg.site:
            raise ValueError(f"the SAE's site is {sae.cfg.site}, but {source} holds {source.cfg.site}")
        site = parse_site(source.cfg.site)
    if (sae.cfg.d_k, sae.cfg.d_v) != shape:
        raise ValueError(f"the SAE reads d_k={sae.cfg.d_k}, d_v={sae.cfg.d_v}; {where} gives d_k={shape[0]}, d_v={shape[1]}")
    if sae.cfg.heads != "all":  # before learn_n_heads_, which would keep a count that these heads do not fit
        _refuse_missing_heads(sae.cfg.head_indices, site.layer, n_heads, "the SAE's ")
    try:
        sae.learn_n_heads_(n_heads)
    except ValueError as error:  # a head count the SAE was made for, other than the site's
        raise ValueError(f"{error} ({site.name} of {where})") from error
    if source is not None and sae.cfg.head_indices != list(source.heads):
        raise ValueError(f"the SAE reads heads {sae.cfg.head_indices}; {source} gives samples of heads {list(source.heads)}")
    return site


def check_layer_heads(model, layer: int, heads: Iterable[int] = ()) -> None:
    """Refuse a layer that is not a GDN layer of ``model``, or a head outside its H_v value heads."""
    gdn_layers = list(model.cfg.gdn_layers)
    if layer not in gdn_layers:
        raise ValueError(f"layer {layer} is not a GDN layer of this model; its GDN layers are {gdn_layers}")
    _refuse_missing_heads(heads, layer, model.cfg.n_value_heads)


def _refuse_missing_heads(heads: Iterable[int], layer: int, n_heads: int, whose: str = "") -> None:
    outside = [h for h in heads if not 0 <= h < n_heads]
    if outside:
        raise ValueError(f"{whose}head(s) {outside} do not exist in GDN layer {layer}: its value heads are 0 … {n_heads - 1}")
