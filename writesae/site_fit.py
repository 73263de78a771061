"""Whether an SAE fits where it is asked to read, checked in one place for every tool.

An SAE fits a model (`check_sae_fits(sae, model)`: attaching, the dashboard, the experiments, the
commands) when its site is one of the model's GDN sites, its d_k × d_v is the model's head shape, and
its heads are heads of that layer; an SAE made with heads="all" learns the layer's head count here.
It fits a sample source (`check_sae_fits(sae, source=...)`: training) on the same terms, the source's
one site standing for the model's, and it must read exactly the source's heads.
`check_layer_heads` is the part that needs no SAE: a GDN layer of the model and heads of it.

An SAE also records the model it was trained on: ``cfg.model_name`` and ``cfg.model_fingerprint``,
`model_fingerprint` of the model's weights, set when it is checked against the samples it trains on
(if they come from a model). Checked against a model whose fingerprint differs, the SAE fits but
was trained on other weights: `check_sae_fits` warns (`OtherModelWarning`, naming both models), or
refuses (`OtherModelError`) when asked to, as the ``writesae`` commands do unless given
``--allow-other-model``. An SAE saved before fingerprints were recorded has none, and is used
without a word.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable

import torch

from hooked_gdn.sites import Site, parse_model_site, parse_site

from .sae import SAEBase

#: values read from each weight tensor by `model_fingerprint`, evenly spaced over it
FINGERPRINT_SAMPLES = 256
_FINGERPRINT_FORMAT = b"writesae model fingerprint v1\n"


class OtherModelWarning(UserWarning):
    """An SAE is used with a model whose weights are not those it was trained on."""


class OtherModelError(ValueError):
    """`check_sae_fits` with ``other_model="refuse"``: the SAE was trained on another model's weights."""


def model_fingerprint(model) -> str:
    """A SHA-256 hex digest that tells ``model``'s weights from other weights, cheaply.

    It hashes, for each parameter in name order (those of SAEs attached to the model left out), its
    name, its shape and `FINGERPRINT_SAMPLES` of its values, evenly spaced over the flattened tensor
    (all of them in a smaller one), rounded to bfloat16. So it costs a few hundred values per
    tensor, not a pass over the weights; it is the same for the same weights loaded twice, on any
    device and in float32 or bfloat16 (or float16 from a float16 checkpoint); and it differs for
    another training run, another seed, a fine-tune, or weights of other shapes. An edit of a few
    weights between the sampled ones goes unseen: it is a check against using the wrong model, not
    a checksum.
    """
    digest = hashlib.sha256(_FINGERPRINT_FORMAT)
    saes = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, SAEBase))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            if name.startswith(saes):
                continue
            flat = p.detach().reshape(-1)
            step = max(1, -(-flat.numel() // FINGERPRINT_SAMPLES))  # ceil: at most FINGERPRINT_SAMPLES values
            sample = flat[::step].to("cpu", torch.bfloat16).contiguous()
            digest.update(f"{name} {list(p.shape)}\n".encode())
            digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def check_sae_fits(sae: SAEBase, model=None, *, source=None, other_model: str = "warn") -> Site:
    """The SAE's site on ``model``, or on the sample ``source`` (a store, a cache, samples in memory:
    anything with ``cfg.site``, ``heads``, ``n_value_heads``, ``d_k`` and ``d_v``), with the SAE told
    the site's head count; a ValueError naming what does not fit otherwise. Pass one of the two.

    The SAE's recorded model is compared with ``model``, or with the source's (its ``model``, or
    its ``model_fingerprint``): weights other than the recorded ones give an `OtherModelWarning`,
    or with ``other_model="refuse"`` an `OtherModelError`. An SAE that records no fingerprint gets
    the source's (and its model's name, if it has none): training records them so."""
    if (model is None) == (source is None):
        raise TypeError("check_sae_fits takes a model or a sample source, one of the two")
    if other_model not in ("warn", "refuse"):
        raise ValueError(f"other_model must be 'warn' or 'refuse', got {other_model!r}")
    if source is None:
        where, n_heads, shape = model.cfg.model_name, model.cfg.n_value_heads, (model.cfg.d_key, model.cfg.d_value)
        try:
            site = parse_model_site(sae.cfg.site, model)
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
    _check_same_model(sae, model if source is None else getattr(source, "model", None), source, other_model)
    return site


def reads_a_vector(sae: SAEBase, model) -> bool:
    """Whether ``sae`` is a vector SAE at one of ``model``'s hook points that is not a memory site: d_k = 1 (X = xᵀ,
    as `writesae.io.load_sae` reads an SAELens SAE of a vector activation) and ``cfg.site`` any other hook point,
    the residual stream say. Such an SAE splices at its hook as SAELens splices one (`writesae.splice`); the
    tools that read a memory site (training from a store, dashboards, experiments) take `check_sae_fits`'s sites."""
    if sae.cfg.d_k != 1 or sae.cfg.site not in model.hook_dict:
        return False
    try:
        parse_model_site(sae.cfg.site, model)
    except ValueError:
        return True
    return False


def check_vector_sae_fits(sae: SAEBase, model) -> str:
    """The hook a vector SAE (`reads_a_vector`) reads, once it is one dictionary (heads 0, as a vector SAE's one
    dictionary is; its head count learnt as 1), with the recorded model compared as `check_sae_fits` compares it."""
    if sae.cfg.heads != "all" and sae.cfg.head_indices != [0]:
        raise ValueError(f"the SAE at {sae.cfg.site} reads heads {sae.cfg.head_indices}: a vector SAE is one dictionary "
                         "over the hook's last axis, applied to every head of a per-head point (SAELens' hook_head_index "
                         "is kept by SAELens' own SAE object, which add_sae splices one head at a time)")
    try:
        sae.learn_n_heads_(1)
    except ValueError as error:
        raise ValueError(f"{error} ({sae.cfg.site} is a vector: one dictionary)") from error
    _check_same_model(sae, model, None, "warn")
    return sae.cfg.site


def _check_same_model(sae: SAEBase, model, source, other_model: str) -> None:
    """Compare the SAE's recorded model with ``model`` (or the ``source``'s recorded fingerprint, when
    it has no model); record it in an SAE trained on ``source`` that has none."""
    if model is not None:
        name = model.cfg.model_name
        fingerprint = model_fingerprint(model) if sae.cfg.model_fingerprint is not None or source is not None else None
    else:  # a source without its model, e.g. a cache (None if it does not record one)
        name, fingerprint = getattr(source, "model_name", None), getattr(source, "model_fingerprint", None)
    if fingerprint is None:
        return
    recorded = sae.cfg.model_fingerprint
    if recorded is None:
        if source is not None:  # training: the SAE learns the weights it is trained on
            sae.cfg.model_fingerprint = fingerprint
            sae.cfg.model_name = sae.cfg.model_name or name
        return
    if recorded != fingerprint:
        message = (f"the SAE was trained on {sae.cfg.model_name or 'an unnamed model'} (weights fingerprint "
                   f"{recorded[:12]}), not on {name or 'this model'} (weights fingerprint {fingerprint[:12]}): its "
                   f"features were learnt on other weights")
        if other_model == "refuse":
            raise OtherModelError(message)
        warnings.warn(message, OtherModelWarning, stacklevel=3)


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
