"""SAELens' own SAEs and transcoders attached to a hooked model, as SAELens' ``HookedSAETransformer`` attaches them.

An SAELens SAE (sae-lens 6: ``sae.cfg.metadata.hook_name``, ``encode``, ``decode``, ``use_error_term``) reads
and replaces the value of one hook point, any of the model's (the residual stream, a memory layer's gated
output, an attention layer's ``hook_z`` with SAELens' own head flattening, ...); a transcoder reads
``hook_name`` and replaces ``metadata.hook_name_out``. Its hook points are named as SAELens names them,
``<output hook>.hook_sae_input``, ``.hook_sae_acts_pre``, ``.hook_sae_acts_post``, ``.hook_sae_recons``,
``.hook_sae_error`` and ``.hook_sae_output``, so code written for ``HookedSAETransformer`` reads the same
cache. An SAE of one head (``metadata.hook_head_index``, as SAELens' training reads it: x[..., head, :]) reads and
replaces that head only, where SAELens' ``HookedSAETransformer`` would apply it to every head. With the error
term the output is the reconstruction plus (input − the reconstruction the SAE makes with its hooks off), the
error computed without a gradient, as SAELens computes it: edits of the features reach the output, and an SAE
nobody edits leaves the model's value as it was (to float rounding).

Where SAELens replaces the hook point by a wrapper, the model keeps its own hook point and the SAE runs as its
first hook: user hooks on the point itself still fire, on the SAE's output, and the model's carry semantics hold
for points inside a memory layer (an SAE there runs per firing: per position in sequential mode and in
generation). The SAE is not made a submodule of the model: its parameters stay out of the model's. With
``exclude_special_tokens`` the SAE is bypassed at those tokens' positions (`excluded_token_ids`, `_bypassed`).

writesae's own SAEs (matrix sites) attach through `writesae.splice`; this module never imports sae_lens.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_gdn.hook_points import add_hook_with_handle, position_axis
from hooked_gdn.sites import told_positions

#: the SAE's hook points that fire inside its ``encode`` and ``decode``; the error and output points are fired by
#: the splice itself (SAELens' SAE fires its own only in its ``forward``), so each attachment makes fresh ones
ATTACHMENT_HOOKS = ("hook_sae_error", "hook_sae_output")


def is_saelens_sae(sae) -> bool:
    """Whether ``sae`` is an SAELens SAE or transcoder (sae-lens 6's interface), told by its interface so that
    writesae needs no sae_lens."""
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    return (isinstance(sae, nn.Module) and isinstance(getattr(metadata, "hook_name", None), str)
            and callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None)))


def hook_names(sae) -> tuple[str, str]:
    """The hook an SAELens SAE reads and the one it replaces (the same, except for a transcoder)."""
    metadata = sae.cfg.metadata
    return metadata.hook_name, getattr(metadata, "hook_name_out", None) or metadata.hook_name


#: the tokenizer's structural special tokens, those SAELens' ``exclude_special_tokens=True`` skips (not the
#: additional special tokens a chat template adds)
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id")


def excluded_token_ids(model, exclude_special_tokens: bool | list[int]) -> Tensor | None:
    """The token ids at whose positions an SAE is bypassed: None (``exclude_special_tokens`` False), the model
    tokenizer's structural special tokens (True), or the ids given (a list), as SAELens takes them."""
    if exclude_special_tokens is False:
        return None
    if exclude_special_tokens is True:
        if model.tokenizer is None:
            raise ValueError("exclude_special_tokens=True reads the model's tokenizer, and this model has none: pass the "
                             "token ids to exclude as a list")
        ids = {getattr(model.tokenizer, name, None) for name in SPECIAL_TOKEN_ATTRIBUTES} - {None}
    else:
        ids = set(exclude_special_tokens)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TypeError(f"exclude_special_tokens takes True, False or a list of token ids, got {exclude_special_tokens!r}")
    return torch.tensor(sorted(ids), dtype=torch.long)


def attach(model, sae, use_error_term: bool | None, excluded: Tensor | None = None) -> Callable[[], None]:
    """Attach the SAELens ``sae`` to ``model`` (a `writesae.splice.HookedSAEGatedDeltaNet`) and return what detaches
    it. ``use_error_term`` None: the SAE's own; the SAE itself is not changed. ``excluded``: token ids
    (`excluded_token_ids`) at whose positions the SAE is bypassed, the hook's value kept (its error term 0), as
    SAELens' ``exclude_special_tokens`` does; the positions come from the forward's tokens
    (``model.tokens_in_flight``)."""
    read, replaced = hook_names(sae)
    for name in dict.fromkeys((read, replaced)):
        if name not in model.hook_dict:
            near = difflib.get_close_matches(name, list(model.hook_dict), n=3)
            raise KeyError(f"the SAELens SAE's hook {name!r} is not a hook point of this model"
                           + (f"; near: {', '.join(near)}" if near else ""))
    source, target = model.hook_dict[read], model.hook_dict[replaced]
    error_term = sae.use_error_term if use_error_term is None else use_error_term
    head = getattr(sae.cfg.metadata, "hook_head_index", None)  # an SAE of one head: x[..., head, :]
    if head is not None and read != replaced:
        raise NotImplementedError(f"a transcoder of one head (hook_head_index {head}) is not spliced here: its output "
                                  f"hook's head would be a guess")
    points = {name: hp for name, hp in sae.hook_dict.items() if name not in ATTACHMENT_HOOKS}
    points |= {name: HookPoint() for name in ATTACHMENT_HOOKS}
    taken = [name for name in points if name in target._modules]
    if taken:
        raise ValueError(f"{replaced} already holds {', '.join(taken)}: another SAE is attached there")
    for name, hp in points.items():
        target.add_module(name, hp)
    read_value: list[Tensor] = []  # a transcoder's input, from this forward's firing of its input hook

    def keep_input(x: Tensor, hook) -> None:
        read_value[:] = [x]

    def splice(value: Tensor, hook) -> Tensor:
        if read == replaced:
            x = value
        elif not read_value:
            raise RuntimeError(f"the transcoder's output hook {replaced} fired before its input hook {read} did "
                               "in this forward (a run that starts after it?)")
        else:
            x = read_value.pop()
        whole = value
        if head is not None:  # the SAE reads and replaces its head; the other heads pass
            if value.dim() < 3 or not -value.shape[-2] <= head < value.shape[-2]:
                raise ValueError(f"the SAELens SAE reads head {head} (hook_head_index) of {read}, whose value "
                                 f"{tuple(value.shape)} has no such head on its second-last axis")
            x = value = value[..., head, :]
        _check_width(sae, x, read)
        bypassed = None if excluded is None else _bypassed(model, hook, value, excluded)
        out = sae.decode(sae.encode(x))
        if error_term:
            with torch.no_grad():
                with _hooks_off(sae):
                    clean = sae.decode(sae.encode(x))
                error = value - clean
                error = points["hook_sae_error"](error if bypassed is None else error.masked_fill(bypassed, 0))
            out = out + error
        if bypassed is not None:
            out = torch.where(bypassed, value, out)
        out = points["hook_sae_output"](out)
        if head is None:
            return out
        whole = whole.clone()
        whole[..., head, :] = out
        return whole

    handles = [(target, add_hook_with_handle(target, splice, is_permanent=True, prepend=True))]
    if read != replaced:
        handles.append((source, add_hook_with_handle(source, keep_input, is_permanent=True)))

    def detach() -> None:
        for hp, handle in handles:
            handle.hook.remove()
            hp.fwd_hooks.remove(handle)
        for name in points:
            delattr(target, name)

    return detach


def _bypassed(model, hook, value: Tensor, excluded: Tensor) -> Tensor:
    """Where ``value`` (a firing of ``hook``) sits at an excluded token, broadcastable against it: [b, p, 1, ...].
    A point inside a memory is told its positions (per position in sequential mode and generation); elsewhere the
    value's position axis runs over this forward's input."""
    in_flight = model.tokens_in_flight
    if in_flight is None:
        raise ValueError("exclude_special_tokens needs the tokens of the forward, and this one has none (a forward "
                         "from start_at_layer: pass tokens=)")
    tokens, past_length = in_flight
    positions = told_positions(hook)
    if positions is not None:
        tokens = tokens[:, positions.to(tokens.device) - past_length]
    elif position_axis(hook) != 1 or value.dim() < 2 or value.shape[1] != tokens.shape[1]:
        raise ValueError(f"exclude_special_tokens: {hook.name}'s value {tuple(value.shape)} has no axis 1 over the "
                         f"input's {tokens.shape[1]} positions, so its tokens are not known")
    bypassed = torch.isin(tokens, excluded.to(tokens.device))
    return bypassed.reshape(*bypassed.shape, *[1] * (value.dim() - 2))


def _check_width(sae, x: Tensor, name: str) -> None:
    """An SAELens SAE reads the last axis of its hook's value (the last two, heads × d_head, for a ``hook_z`` SAE that
    flattens them): refuse a value of another width by name, before SAELens' products fail without one."""
    flattens_heads = getattr(sae, "hook_z_reshaping_mode", False)
    width = x.shape[-2] * x.shape[-1] if flattens_heads and x.dim() >= 2 else x.shape[-1]
    if width != sae.cfg.d_in:
        read = "heads × d_head" if flattens_heads else "its last axis"
        raise ValueError(f"the SAELens SAE at {name} reads d_in = {sae.cfg.d_in} numbers a position, but {name}'s "
                         f"value {tuple(x.shape)} has {width} on {read}. A writesae SAE of a memory layer's state or "
                         "write saved in SAELens' format loads as one with writesae.load_sae(folder)")


@contextmanager
def _hooks_off(sae) -> Iterator[None]:
    """The SAE's hook points replaced by identities (its reconstruction as no hook edits it), then put back."""
    kept = {name: getattr(sae, name) for name in sae.hook_dict}
    try:
        for name in kept:
            setattr(sae, name, nn.Identity())
        yield
    finally:
        for name, hp in kept.items():
            setattr(sae, name, hp)
