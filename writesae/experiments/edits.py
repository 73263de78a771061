"""What the write-site experiments share: the KL they all report, and a one-sequence input check.
Hook names, and the hook that edits chosen sequence positions in any recurrence mode
(`edit_at_positions`), come from `hooked_gdn.sites`; the check that a layer and heads exist
(`check_layer_heads`), and that an SAE fits the model (`check_sae_fits`), from `writesae.site_fit`."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


def as_list(x: int | Iterable[int]) -> list[int]:
    return [int(x)] if isinstance(x, int) else [int(i) for i in x]


def kl_from_clean(clean_logits: Float[Tensor, "*batch pos d_vocab"],
                  logits: Float[Tensor, "*batch pos d_vocab"]) -> Float[Tensor, "*batch pos"]:
    """KL(p_clean ‖ p) = Σ_v p_clean(v) (log p_clean(v) − log p(v)) per position, in nats.

    The clean model's distribution is the reference: the KL measures how much an edit moves the
    prediction away from what the model would have said (expectation under p_clean).
    """
    log_clean = F.log_softmax(clean_logits.float(), -1)
    log_edited = F.log_softmax(logits.float(), -1)
    return (log_clean.exp() * (log_clean - log_edited)).sum(-1)


def one_sequence(tokens: Int[Tensor, "1 pos"] | Int[Tensor, " pos"], what: str) -> Int[Tensor, "1 pos"]:
    """``tokens`` as [1, T]; ``what`` names the caller in the error for a batch."""
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    if tokens.shape[0] != 1:
        raise ValueError(f"{what} takes one sequence at a time, got a batch of {tokens.shape[0]}")
    return tokens


def check_positions(positions: int | Iterable[int], length: int, what: str = "position") -> list[int]:
    """``positions`` in a text of ``length`` tokens, negative ones counted from its end (−1 is the last);
    a position outside the text is refused."""
    positions = as_list(positions)
    outside = [p for p in positions if not -length <= p < length]
    if outside:
        raise ValueError(f"{what} {outside} outside the text: it has {length} tokens (positions 0 … {length - 1}, "
                         f"or −{length} … −1 from the end)")
    return [p % length for p in positions]
