"""Write ablation (docs/design.md §15): delete or scale the write k̂_t δ_tᵀ of chosen heads at chosen positions."""

from __future__ import annotations

from typing import Iterable

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_gdn.sites import edit_at_positions, gdn_hook_name

from ..site_fit import check_layer_heads
from .edits import as_list, check_positions, kl_from_clean


@torch.no_grad()
def write_ablation(model, tokens: Int[Tensor, "batch pos"], layer: int, heads: int | Iterable[int],
                   positions: int | Iterable[int], scale: float = 0.0) -> dict:
    """Replace the write k̂_t δ_tᵀ by k̂_t (scale·δ_t)ᵀ on ``heads`` at every t in ``positions``
    (same positions in every sequence; scale 0 deletes the write) through a ``hook_write_value``
    edit, and let the recurrence carry it forward from the edited state.

    Returns a dict of tensors (b sequences, p positions):

    - ``clean_logits``, ``logits`` [b, p, d_vocab]: without and with the edit;
    - ``loss_change`` [b, p − 1]: edited minus clean next-token loss, entry t being the loss of
      predicting token t + 1 from the logits at t; ``mean_loss_change`` [p − 1] its mean over sequences;
    - ``kl`` [b, p]: KL(p_clean ‖ p_ablated) of the next-token distributions at each position
      (see `kl_from_clean`); ``mean_kl`` [p] its mean over sequences.
    """
    heads = as_list(heads)
    check_layer_heads(model, layer, heads)
    positions = check_positions(positions, tokens.shape[-1])

    def scale_delta(delta_rows: Tensor, position: int) -> Tensor:  # δ rows: [b, H_v, d_v]
        delta_rows[:, heads] *= scale
        return delta_rows

    hook = edit_at_positions(scale_delta, positions)
    clean = model(tokens)
    edited = model.run_with_hooks(tokens, fwd_hooks=[(gdn_hook_name(layer, "hook_write_value"), hook)])
    loss_change = model.loss_fn(edited, tokens, per_token=True) - model.loss_fn(clean, tokens, per_token=True)
    kl = kl_from_clean(clean, edited)
    return {
        "clean_logits": clean, "logits": edited,
        "loss_change": loss_change, "mean_loss_change": loss_change.mean(0),
        "kl": kl, "mean_kl": kl.mean(0),
    }
