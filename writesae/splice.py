"""Attaching SAEs to a `HookedGatedDeltaNet`: splice reconstructions into the recurrence, patch features.

Named as in SAELens' ``HookedSAETransformer``: ``add_sae``, ``reset_saes``, ``saes(...)``,
``run_with_saes`` and ``run_with_cache_with_saes``. An SAE's ``cfg.site`` is a site of
`hooked_gdn.sites`: the state S_t of a GDN layer ("state", ``hook_state``), its rank-1 write
k̂_t δ_tᵀ ("write", ``hook_write_value``, fed from ``hook_write_key`` and ``hook_write_value``), or in
RWKV-7 its rank-1 erase (a_t ⊙ κ̂_t) e_tᵀ ("erase", ``hook_erase_value``, fed from ``hook_erase_rate``,
``hook_erase_key`` and ``hook_erase_value``). An SAE with heads="all" learns the layer's number of heads
when attached.

The SAE becomes the submodule ``sae`` of the site's hook point, so its hook points are named
``<site>.sae.hook_sae_acts_post`` etc. and can be cached and patched like any other.

Splicing (docs/design.md §12) follows §8's carry semantics. A state SAE replaces S_t by its reconstruction
(on its heads) wherever ``hook_state`` fires; a write SAE replaces the write k̂_t δ_tᵀ by its
reconstruction, applied as the state difference X̂_t − k̂_t δ_tᵀ at t, and an erase SAE likewise adds
X̂_t − (a_t ⊙ κ̂_t) e_tᵀ. Either way later positions follow the recurrence from the spliced state (their
δ or e read it). Where it fires is ``state_positions`` (default: every
position). With ``recurrence="sequential"`` the SAE runs in the loop: each position's input is the
state (or write) that the earlier splices produced. In the default parallel mode each position's
replacement is computed from the clean run, and the differences are carried forward; with one
spliced position the two agree exactly.

`zero_ablation_hooks` zero the site on an SAE's heads through the same splice, so a zero ablation
acts exactly where splicing the SAE would: the state set to 0, or the write deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.hook_points import add_hook_with_handle
from hooked_gdn.sites import Site, hook_positions, rank_one, rank_one_key, told_positions

from . import saelens_splice
from .sae import SAEBase
from .site_fit import check_sae_fits, check_vector_sae_fits, reads_a_vector

Reconstruct = Callable[[Float[Tensor, "batch P n_heads d_k d_v"]], Float[Tensor, "batch P n_heads d_k d_v"]]


@dataclass
class _Attachment:
    """An attached SAE, the hook points it reads and replaces (the first names it in ``acts_to_saes``), and what
    detaches it (for a writesae SAE, also restoring its own ``use_error_term``)."""

    sae: object  # a writesae SAE, or an SAELens SAE or transcoder (`writesae.saelens_splice`)
    hook_names: tuple[str, ...]
    detach: Callable[[], None]
    skips_tokens: bool = False  # an SAELens SAE bypassed at some tokens: forward then keeps its tokens in flight


class HookedSAEGatedDeltaNet(HookedGatedDeltaNet):
    """`HookedGatedDeltaNet` that SAEs can be attached to (load it with ``from_pretrained`` as usual)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._attached: dict[str, _Attachment] = {}
        #: (the tokens [b, p] of the forward running, the length of the cache it continues) while an attached SAELens
        #: SAE skips special tokens (`writesae.saelens_splice`), else None
        self.tokens_in_flight: tuple[Tensor, int] | None = None

    @property
    def acts_to_saes(self) -> dict:
        """{the hook each attached SAE reads: the SAE}, writesae's and SAELens' alike."""
        return {site: attachment.sae for site, attachment in self._attached.items()}

    def add_sae(self, sae, use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False) -> None:
        """Attach ``sae`` where it reads; its reconstruction is spliced in from the next forward on.

        A writesae SAE attaches at its ``cfg.site`` (a memory layer's state, write or erase). An SAELens SAE or
        transcoder attaches at its ``cfg.metadata.hook_name`` (any hook point) as SAELens'
        ``HookedSAETransformer`` attaches it (`writesae.saelens_splice`), and is named by that hook here; with
        ``exclude_special_tokens`` (True: the tokenizer's BOS, EOS, PAD and SEP; or a list of ids) it is bypassed
        at those tokens' positions, as there. ``use_error_term`` (None: the SAE's own setting) holds while the SAE
        is attached; detaching a writesae SAE restores its own setting, as SAELens does, so a later splice is never
        silently exact."""
        if saelens_splice.is_saelens_sae(sae):
            names = saelens_splice.hook_names(sae)
            self._refuse_taken(names)
            excluded = saelens_splice.excluded_token_ids(self, exclude_special_tokens)
            detach = saelens_splice.attach(self, sae, use_error_term, excluded)
            self._record(_Attachment(sae, names, detach, skips_tokens=excluded is not None))
            return
        if not isinstance(sae, SAEBase):
            raise TypeError(f"add_sae takes a writesae SAE or an SAELens SAE (sae-lens 6), not {type(sae).__name__}")
        if exclude_special_tokens is not False:
            raise ValueError("exclude_special_tokens is for SAELens SAEs; a writesae SAE acts where its site's "
                             "state_positions say")
        if reads_a_vector(sae, self):  # an SAELens SAE of a vector activation, as load_sae reads it
            name = check_vector_sae_fits(sae, self)
            points = [(self.hook_dict[name], _vector_splice(sae))]
        else:
            site = check_sae_fits(sae, self)
            name = site.name
            points = _splice_points(self, site, sae.cfg.head_indices, sae)
        self._refuse_taken((name,))
        own_use_error_term = sae.use_error_term
        if use_error_term is not None:
            sae.use_error_term = use_error_term
        sae.to(self.W_E.device)
        hook_point = self.hook_dict[name]
        hook_point.sae = sae
        # permanent, and first, so that user hooks on the site see the spliced value
        handles = [(hp, add_hook_with_handle(hp, fn, is_permanent=True, prepend=True)) for hp, fn in points]

        def detach() -> None:
            for hp, handle in handles:
                handle.hook.remove()
                hp.fwd_hooks.remove(handle)
            sae.use_error_term = own_use_error_term
            del hook_point.sae

        self._record(_Attachment(sae, (name,), detach))

    def _refuse_taken(self, names: tuple[str, ...]) -> None:
        taken = {name for attachment in self._attached.values() for name in attachment.hook_names}
        clash = [name for name in names if name in taken]
        if clash:
            raise ValueError(f"an SAE is already attached at {clash[0]}; reset_saes() first")

    def _record(self, attachment: _Attachment) -> None:
        self._attached[attachment.hook_names[0]] = attachment
        self.setup()

    def reset_saes(self, sites: str | list[str] | None = None) -> None:
        """Detach the SAEs at ``sites`` (default: all; an SAELens SAE's is its hook_name), restoring each writesae
        SAE's own ``use_error_term``."""
        for site in [sites] if isinstance(sites, str) else list(self._attached if sites is None else sites):
            self._attached.pop(site).detach()
        self.setup()

    def forward(self, input, return_type: str | None = "logits", attention_mask: Tensor | None = None, **kwargs):
        """`HookedGatedDeltaNet.forward`; while an attached SAELens SAE skips special tokens, with the forward's
        tokens in flight (``tokens_in_flight``) for it to find them."""
        if not any(attachment.skips_tokens for attachment in self._attached.values()):
            return super().forward(input, return_type, attention_mask, **kwargs)
        input_is_tokens = kwargs.get("start_at_layer") is None
        tokens = input if input_is_tokens else kwargs.get("tokens")
        if tokens is not None:  # tokenized as forward tokenizes it; forward refuses what this cannot read
            try:
                tokens, mask = self._tokens_and_mask(tokens, attention_mask, kwargs.get("prepend_bos"),
                                                     kwargs.get("padding_side"))
            except (TypeError, ValueError):
                tokens = None
            else:
                if input_is_tokens:  # forward reads these tokens and their mask, which it would make again from strings
                    input, attention_mask = tokens, mask
        cache = kwargs.get("cache")
        self.tokens_in_flight = None if tokens is None else (tokens, 0 if cache is None else cache.length)
        try:
            return super().forward(input, return_type, attention_mask, **kwargs)
        finally:
            self.tokens_in_flight = None

    @contextmanager
    def saes(self, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None,
             exclude_special_tokens: bool | list[int] = False):
        """Attach ``saes`` (a list, or one SAE) for the duration of the block."""
        added = []
        try:
            for sae in [saes] if isinstance(saes, torch.nn.Module) else saes:
                self.add_sae(sae, use_error_term, exclude_special_tokens)
                added.append(next(reversed(self._attached)))  # the name add_sae recorded it under
            yield self
        finally:
            if reset_saes_end:
                self.reset_saes(added)

    def run_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None,
                      exclude_special_tokens: bool | list[int] = False, **model_kwargs):
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                                 **kwargs):
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                                 **kwargs):
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_hooks(*model_args, **kwargs)


class HookedSAEMamba2(HookedSAEGatedDeltaNet):
    """`HookedSAEGatedDeltaNet` restricted to Mamba-2, as `hooked_gdn.mamba2.HookedMamba2` is: SAEs attach at the
    same sites, its SSD state h_t (d_state × head_dim per head) and its write B_t (Δ_t x_t)ᵀ."""

    FAMILIES = ("mamba2",)


def load_model(name_or_path: str | Path, device=None, dtype=None) -> HookedSAEGatedDeltaNet:
    """A checkpoint of any supported family, SAEs attachable (a family it does not support is refused,
    naming the supported ones): what the ``writesae`` commands load their ``--model`` with."""
    return HookedSAEGatedDeltaNet.from_pretrained(name_or_path, device=device, dtype=dtype)


def zero_ablation_hooks(model: HookedGatedDeltaNet, sae: SAEBase) -> list[tuple[str, Callable]]:
    """``fwd_hooks`` that zero ``sae``'s site on its heads wherever splicing ``sae`` would act (where
    ``hook_state`` fires): the state set to 0, or the write (erase) deleted (its X̂ − k̂ δᵀ is −k̂ δᵀ)."""
    site = check_sae_fits(sae, model)
    return [(hp.name, fn) for hp, fn in _splice_points(model, site, sae.cfg.head_indices, torch.zeros_like)]


def _splice_points(model: HookedGatedDeltaNet, site: Site, heads: list[int], reconstruct: Reconstruct) -> list[tuple]:
    """(hook point, hook) pairs that replace the site on ``heads`` by ``reconstruct`` of it."""
    heads = torch.tensor(heads)
    if site.kind == "state":
        return [(model.hook_dict[site.name], _state_splice(reconstruct, heads))]
    points = [model.hook_dict[name] for name in (*site.key_hooks, site.value_hook, site.hook_name("hook_state"))]
    return list(zip(points, _rank_one_splice(reconstruct, heads, len(site.key_hooks))))


def _vector_splice(sae: SAEBase):
    """A hook that replaces a vector activation [..., d] by ``sae``'s output, read as the one-dictionary 1 × d
    matrix X = xᵀ a vector SAE reads (`writesae.site_fit.reads_a_vector`); a value [..., heads, d_head] whose heads
    together are d (an attention layer's hook_z), with its heads flattened, as SAELens' hook_z SAEs read it."""

    def splice(x: Tensor, hook) -> Tensor:
        lead = x.shape[:-1] if x.shape[-1] == sae.cfg.d_v else x.shape[:-2]
        if x.shape[-1] != sae.cfg.d_v and (x.dim() < 3 or x.shape[-2] * x.shape[-1] != sae.cfg.d_v):
            raise ValueError(f"the SAE at {hook.name} reads vectors of {sae.cfg.d_v}, but its value {tuple(x.shape)} "
                             f"has {x.shape[-1]} on its last axis (and not {sae.cfg.d_v} on its last two)")
        return sae(x.reshape(*lead, 1, 1, sae.cfg.d_v)).reshape(x.shape)

    return splice


def _replace_heads(full: Tensor, heads: Tensor, new: Tensor) -> Tensor:
    out = full.clone()
    out[:, :, heads] = new.to(full.dtype)
    return out


def _state_splice(reconstruct: Reconstruct, heads: Tensor):
    def splice(states: Tensor, hook) -> Tensor:  # [b, P, H, d_k, d_v]
        return _replace_heads(states, heads, reconstruct(states[:, :, heads]))

    return splice


def _rank_one_splice(reconstruct: Reconstruct, heads: Tensor, n_key_factors: int):
    """Hooks on the site's key factors, its value and ``hook_state``: remember each with the positions it holds,
    then add X̂ − key valueᵀ to the state.

    A write key is told its positions, as the value is; an erase key or rate is not: it fires once per forward
    with every position of the input, before any value, so its rows run on from the first position the value
    hook is shown in that forward (the cached prefix's length)."""
    seen: dict = {"factors": [None] * n_key_factors}

    def keep_factor(i: int):
        def keep(factor: Tensor, hook) -> None:
            seen["factors"][i] = (factor, told_positions(hook))

        return keep

    def keep_value(value: Tensor, hook) -> None:
        seen["value"], seen["positions"] = value, hook_positions(hook)
        for i, (factor, positions) in enumerate(seen["factors"]):
            if positions is None:
                seen["factors"][i] = (factor, seen["positions"][0] + torch.arange(factor.shape[1]))

    def splice(states: Tensor, hook) -> Tensor:
        here = hook_positions(hook)
        pick = lambda x, positions: x[:, torch.searchsorted(positions, here)][:, :, heads]
        x = rank_one(rank_one_key([pick(*factor) for factor in seen["factors"]]), pick(seen["value"], seen["positions"]))
        return _replace_heads(states, heads, states[:, :, heads] + reconstruct(x) - x)  # x: [b, P, n_heads, d_k, d_v]

    return (*(keep_factor(i) for i in range(n_key_factors)), keep_value, splice)
