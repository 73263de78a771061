"""Write ablation (DESIGN §5): delete or scale the write k̂_t δ_tᵀ of chosen heads at chosen positions.

Also the edit helpers the substitution test shares: `gdn_hook_name`, `edit_at_positions` (a hook
that edits the rows of chosen sequence positions, in any recurrence mode) and `kl_from_clean`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


def gdn_hook_name(layer: int, name: str) -> str:
    """The full name of a GDN hook point, e.g. ``blocks.4.linear_attn.hook_write_value``."""
    return f"blocks.{layer}.linear_attn.{name}"


def _as_list(x: int | Iterable[int]) -> list[int]:
    return [int(x)] if isinstance(x, int) else [int(i) for i in x]


def edit_at_positions(edit: Callable[[Tensor, int], Tensor], positions: int | Iterable[int]):
    """A hook on a GDN write/state hook point that replaces the rows x[:, i] of the given sequence
    positions by ``edit(rows, position)`` (rows: [b, H_v, ...]) and leaves the others alone.

    It finds where it is through ``hook.ctx["positions"]``, so it works in parallel mode (one call
    with every position) and sequential mode (one call per position) alike; rows it does not touch
    stay unedited, and the model carries the edited ones forward.
    """
    wanted = torch.tensor(_as_list(positions))

    def hook(x: Tensor, hook) -> Tensor | None:
        here = hook.ctx["positions"]
        rows = torch.isin(here, wanted).nonzero().flatten().tolist()
        if not rows:
            return None  # observe only: no recompute
        x = x.clone()
        for i in rows:
            x[:, i] = edit(x[:, i], int(here[i]))
        return x

    return hook


def kl_from_clean(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(p_clean ‖ p) = Σ_v p_clean(v) (log p_clean(v) − log p(v)) per position [..., p], in nats.

    The clean model's distribution is the reference: the KL measures how much an edit moves the
    prediction away from what the model would have said (expectation under p_clean).
    """
    log_clean = F.log_softmax(clean_logits.float(), -1)
    log_edited = F.log_softmax(logits.float(), -1)
    return (log_clean.exp() * (log_clean - log_edited)).sum(-1)


@torch.no_grad()
def write_ablation(model, tokens: Tensor, layer: int, heads: int | Iterable[int], positions: int | Iterable[int],
                   scale: float = 0.0) -> dict:
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
    heads = _as_list(heads)

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
