"""`GDNCache`: what a forward pass needs to continue a sequence instead of starting it again."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class GDNCache:
    """Per-layer state of a prefix: GDN conv inputs and recurrent states, attention keys and values, RWKV-7 token shifts.

    A forward with ``cache=`` continues from it and updates it in place, through the ``update_*``
    and ``append_kv`` methods, so generation is a loop of one-token forwards. Entries are replaced,
    never written into, so ``copy()`` (cheap) keeps a prefix reusable for several continuations.
    """

    conv_states: dict[int, Tensor] = field(default_factory=dict)  # [b, conv_dim, K − 1], last conv inputs
    recurrent_states: dict[int, Tensor] = field(default_factory=dict)  # S [b, H_v, d_k, d_v], fp32
    keys: dict[int, Tensor] = field(default_factory=dict)  # rotated keys [b, length, n_kv, d_head]
    values: dict[int, Tensor] = field(default_factory=dict)  # [b, length, n_kv, d_head]
    attention_mask: Tensor | None = None  # [b, length], 0 at padding
    shift_states: dict[str, Tensor] = field(default_factory=dict)  # RWKV-7's token shifts: the last input [b, d_model]
    # blocks 0 … L − 1 that a forward with start_at_layer=L left behind: the cache continues only from L on
    skipped_blocks_before: int = 0

    @property
    def length(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def extend_mask(self, mask: Int[Tensor, "b p"]) -> Int[Tensor, "b length"]:
        """Append the current input's mask [b, p]; returns the mask over everything so far."""
        if self.attention_mask is not None:
            if self.attention_mask.shape[0] != mask.shape[0]:
                raise ValueError(f"the cache holds a batch of {self.attention_mask.shape[0]}, the input has {mask.shape[0]}")
            mask = torch.cat([self.attention_mask, mask], 1)
        self.attention_mask = mask
        return mask

    def update_conv_state(self, layer: int, inputs: Float[Tensor, "b conv_dim p"], kernel_size: int) -> None:
        """Keep the last K − 1 conv inputs of ``inputs`` (the past ones included), as a copy, so the
        cache does not hold the whole input alive."""
        self.conv_states[layer] = inputs[..., -(kernel_size - 1):].clone()

    def update_recurrent_state(self, layer: int, state: Float[Tensor, "b H_v d_k d_v"]) -> None:
        self.recurrent_states[layer] = state

    def append_kv(
        self, layer: int, k: Float[Tensor, "b p n_kv d_head"], v: Float[Tensor, "b p n_kv d_head"]
    ) -> tuple[Float[Tensor, "b length n_kv d_head"], Float[Tensor, "b length n_kv d_head"]]:
        """Append this input's rotated keys and values; return those of everything so far."""
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], 1), torch.cat([self.values[layer], v], 1)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def copy(self) -> "GDNCache":
        return GDNCache(dict(self.conv_states), dict(self.recurrent_states), dict(self.keys), dict(self.values), self.attention_mask,
                        dict(self.shift_states), self.skipped_blocks_before)
