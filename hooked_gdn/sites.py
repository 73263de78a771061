"""Hook-site names, built and parsed in one place, and the positions a write or state hook sees.

Names follow TransformerLens: ``blocks.{layer}.{component}.hook_{quantity}`` (docs/design.md §7). The two
matrix-valued GDN sites that SAEs read have one word each, their *kind*:

- ``"state"``: ``blocks.L.linear_attn.hook_state``, the state S_t [b, p, H_v, d_k, d_v];
- ``"write"``: ``blocks.L.linear_attn.hook_write_value``, standing for the rank-1 write k̂_t δ_tᵀ
  (δ_t from ``hook_write_value``, k̂_t from ``hook_write_key``).

The write and state hook points fire on all positions at once (parallel mode) or one at a time
(sequential mode, generation, a cached prefix). The layer tells them which sequence positions their
tensor's dim 1 holds (`tell_positions`), and a hook reads them with `hook_positions`, so one hook
function works in every mode; `edit_at_positions` makes such a hook from an edit of rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from jaxtyping import Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

KINDS = ("state", "write")
KIND_HOOKS = {"state": "hook_state", "write": "hook_write_value"}  # kind -> the hook point named by the site

# every hook point of a GDN layer, in the order of the computation (docs/design.md §7.2)
GDN_HOOKS = (
    "hook_in", "hook_q_pre_conv", "hook_k_pre_conv", "hook_v_pre_conv", "hook_q", "hook_k", "hook_v",
    "hook_gate_input", "hook_beta_logit", "hook_beta", "hook_log_decay", "hook_read_query", "hook_write_key",
    "hook_write_value", "hook_state", "hook_final_state", "hook_recurrence_out", "hook_gated_out", "hook_out",
)

# every hook point of a sparse MoE block (``blocks.L.mlp``), in the order of the computation (`hooked_gdn.mlp`);
# its output is the block's ``hook_mlp_out``, and its shared expert has the SwiGLU's own hook points
MOE_HOOKS = (
    "hook_router_logits", "hook_expert_indices", "hook_topk_weights", "hook_experts_out", "hook_shared_expert_out",
    "hook_shared_expert_gate",
)

_SITE = re.compile(r"blocks\.(\d+)\.linear_attn\.(hook_state|hook_write_value)")
_POSITIONS = "positions"  # the key in a hook point's ``ctx``


def block_name(layer: int, name: str) -> str:
    """``blocks.{layer}.{name}``: a hook point or module of one block, e.g. ``block_name(2, "hook_resid_post")``."""
    return f"blocks.{layer}.{name}"


def gdn_hook_name(layer: int, hook: str) -> str:
    """The full name of a GDN hook point, e.g. ``gdn_hook_name(4, "hook_write_value")``."""
    return block_name(layer, f"linear_attn.{hook}")


def moe_hook_name(layer: int, hook: str) -> str:
    """The full name of an MoE hook point, e.g. ``moe_hook_name(3, "hook_expert_indices")``."""
    if hook not in MOE_HOOKS:
        raise ValueError(f"{hook!r} is not an MoE hook point; they are {', '.join(MOE_HOOKS)}")
    return block_name(layer, f"mlp.{hook}")


def site_name(layer: int, kind: str) -> str:
    """The SAE site of ``kind`` ("state" or "write") in GDN layer ``layer``."""
    if kind not in KIND_HOOKS:
        raise ValueError(f"a site's kind is one of {KINDS}, got {kind!r}")
    return gdn_hook_name(layer, KIND_HOOKS[kind])


@dataclass(frozen=True)
class Site:
    layer: int
    kind: str  # "state" or "write"

    @property
    def name(self) -> str:
        return site_name(self.layer, self.kind)

    def hook_name(self, hook: str) -> str:
        """Another hook point of the same GDN layer."""
        return gdn_hook_name(self.layer, hook)


def parse_site(name: str | None, gdn_layers: Sequence[int] | None = None) -> Site:
    """The layer and kind of an SAE site name; with ``gdn_layers``, the layer must be one of them.

    A bad name raises one error that lists the valid sites (all of them when ``gdn_layers`` is given).
    """
    match = _SITE.fullmatch(name) if isinstance(name, str) else None
    if match is not None:
        site = Site(int(match[1]), "state" if match[2] == "hook_state" else "write")
        if gdn_layers is None or site.layer in gdn_layers:
            return site
    if gdn_layers is None:
        valid = "blocks.<L>.linear_attn.hook_state or blocks.<L>.linear_attn.hook_write_value, L a GDN layer"
    else:
        valid = ", ".join(site_name(layer, kind) for layer in gdn_layers for kind in KINDS)
    raise ValueError(f"{name!r} is not an SAE site; the sites are {valid}")


def act_name(name: str, layer: int | None = None, layer_type: str | None = None, gdn_layers: Sequence[int] = ()) -> str:
    """TransformerLens' ``get_act_name``, and in a GDN layer its hook points by their short name:
    ``act_name("state", 4, gdn_layers=[0, 1, 2, 4])`` is ``blocks.4.linear_attn.hook_state``; an MoE
    block's likewise (``act_name("expert_indices", 3)`` is ``blocks.3.mlp.hook_expert_indices``)."""
    if layer in gdn_layers and layer_type in (None, "linear_attn") and f"hook_{name}" in GDN_HOOKS:
        return gdn_hook_name(layer, f"hook_{name}")
    if layer is not None and layer_type in (None, "mlp") and f"hook_{name}" in MOE_HOOKS:
        return moe_hook_name(layer, f"hook_{name}")
    return get_act_name(name, layer, layer_type)


def tell_positions(positions: Int[Tensor, " p"], *hook_points) -> None:
    """Record on each hook point the sequence positions (counting any cached prefix) of its tensor's dim 1."""
    for hook_point in hook_points:
        hook_point.ctx[_POSITIONS] = positions


def hook_positions(hook) -> Int[Tensor, " p"]:
    """Inside a hook on a write or state hook point: the sequence positions of its tensor's dim 1."""
    return hook.ctx[_POSITIONS]


def edit_at_positions(edit: Callable[[Tensor, int], Tensor], positions: int | Iterable[int]):
    """A hook on a GDN write or state hook point that replaces the rows x[:, i] of the given sequence
    positions by ``edit(rows, position)`` (rows: [b, H_v, ...]) and leaves the others alone.

    It reads `hook_positions`, so it works in parallel mode (one call with every position),
    sequential mode and generation (one call per position) alike; rows it does not touch stay
    unedited, and the model carries the edited ones forward.
    """
    wanted = torch.tensor([positions] if isinstance(positions, int) else list(positions))

    def hook(x: Tensor, hook) -> Tensor | None:
        here = hook_positions(hook)
        rows = torch.isin(here, wanted).nonzero().flatten().tolist()
        if not rows:
            return None  # observe only: no recompute
        x = x.clone()
        for i in rows:
            x[:, i] = edit(x[:, i], int(here[i]))
        return x

    return hook
