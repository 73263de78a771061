"""Hook-site names, built and parsed in one place, and the positions a write or state hook sees.

Names follow TransformerLens: ``blocks.{layer}.{component}.hook_{quantity}`` (docs/design.md §7). The
matrix-valued sites that SAEs read have one word each, their *kind*:

- ``"state"``: ``blocks.L.linear_attn.hook_state``, the state S_t [b, p, H_v, d_k, d_v];
- ``"write"``: ``blocks.L.linear_attn.hook_write_value``, standing for the rank-1 write k̂_t δ_tᵀ
  (δ_t from ``hook_write_value``, k̂_t from ``hook_write_key``; RWKV-7's k̃_t v_tᵀ);
- ``"erase"``: ``blocks.L.linear_attn.hook_erase_value``, standing for the rank-1 erase (a_t ⊙ κ̂_t) e_tᵀ of
  a layer whose erase is a term of its own (RWKV-7: e_t from ``hook_erase_value``, a_t from
  ``hook_erase_rate``, κ̂_t from ``hook_erase_key``). GDN has none apart from its write (δ_t already
  holds the erase) and Mamba-2 none at all, so `parse_model_site` refuses it there.

`SITE_KEY_HOOKS` and `SITE_VALUE_HOOK` say, for the rank-1 kinds, which hook points a site's key is the
product of and which holds its value; `rank_one_key` and `rank_one` form them. Every tool that builds a
write or erase from hooks goes through these.

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

from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

KINDS = ("state", "write", "erase")
KIND_HOOKS = {"state": "hook_state", "write": "hook_write_value", "erase": "hook_erase_value"}  # kind -> the hook point named by the site
RANK_ONE_KINDS = ("write", "erase")  # the sites that are one key times one value per head and position
#: rank-1 kind -> the hook points whose elementwise product is its key ([b, p, H, d_k] each)
SITE_KEY_HOOKS = {"write": ("hook_write_key",), "erase": ("hook_erase_rate", "hook_erase_key")}
#: rank-1 kind -> the hook point holding its value ([b, p, H, d_v]); it names the site
SITE_VALUE_HOOK = {kind: KIND_HOOKS[kind] for kind in RANK_ONE_KINDS}

# every hook point of a GDN layer, in the order of the computation (docs/design.md §7.2)
GDN_HOOKS = (
    "hook_in", "hook_q_pre_conv", "hook_k_pre_conv", "hook_v_pre_conv", "hook_q", "hook_k", "hook_v",
    "hook_gate_input", "hook_beta_logit", "hook_beta", "hook_log_decay", "hook_read_query", "hook_write_key",
    "hook_write_value", "hook_state", "hook_final_state", "hook_recurrence_out", "hook_gated_out", "hook_out",
)

# the hook points of RWKV-7's time mix (`hooked_gdn.rwkv7`) that a GDN layer has not, addressed by short name likewise
RWKV7_HOOKS = ("hook_v_first", "hook_v_mix", "hook_erase_rate", "hook_erase_key", "hook_erase_value", "hook_bonus", "hook_gate")

# every hook point of a sparse MoE block (``blocks.L.mlp``), in the order of the computation (`hooked_gdn.mlp`);
# its output is the block's ``hook_mlp_out``, and its shared expert has the SwiGLU's own hook points
MOE_HOOKS = (
    "hook_router_logits", "hook_expert_indices", "hook_topk_weights", "hook_experts_out", "hook_shared_expert_out",
    "hook_shared_expert_gate",
)

_SITE = re.compile(r"blocks\.(\d+)\.linear_attn\.(hook_state|hook_write_value|hook_erase_value)")
_KIND_OF_HOOK = {hook: kind for kind, hook in KIND_HOOKS.items()}
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
    """The SAE site of ``kind`` ("state", "write" or "erase") in GDN layer ``layer``."""
    if kind not in KIND_HOOKS:
        raise ValueError(f"a site's kind is one of {KINDS}, got {kind!r}")
    return gdn_hook_name(layer, KIND_HOOKS[kind])


@dataclass(frozen=True)
class Site:
    layer: int
    kind: str  # "state", "write" or "erase"

    @property
    def name(self) -> str:
        return site_name(self.layer, self.kind)

    def hook_name(self, hook: str) -> str:
        """Another hook point of the same GDN layer."""
        return gdn_hook_name(self.layer, hook)

    @property
    def key_hooks(self) -> list[str]:
        """A rank-1 site's full hook names whose product is its key."""
        return [self.hook_name(hook) for hook in SITE_KEY_HOOKS[self.kind]]

    @property
    def value_hook(self) -> str:
        """A rank-1 site's full hook name holding its value (the site's own name)."""
        return self.hook_name(SITE_VALUE_HOOK[self.kind])


def rank_one_key(factors: Sequence[Tensor]) -> Tensor:
    """A rank-1 site's key from its `SITE_KEY_HOOKS` tensors, in that order: k̂ for a write, a ⊙ κ̂ for an erase."""
    key = factors[0]
    for factor in factors[1:]:
        key = key * factor
    return key


def rank_one(key: Float[Tensor, "*batch d_k"], value: Float[Tensor, "*batch d_v"]) -> Float[Tensor, "*batch d_k d_v"]:
    """The site's matrix key valueᵀ: k̂ δᵀ for a write, (a ⊙ κ̂) eᵀ for an erase."""
    return key[..., :, None] * value[..., None, :]


def parse_site(name: str | None, gdn_layers: Sequence[int] | None = None,
               kinds: Sequence[str] = ("state", "write")) -> Site:
    """The layer and kind of an SAE site name; with ``gdn_layers``, the layer must be one of them and the kind
    one of ``kinds`` (default: the two every family has; `site_kinds` gives a model's).

    A bad name raises one error that lists the valid sites (all of them when ``gdn_layers`` is given).
    """
    match = _SITE.fullmatch(name) if isinstance(name, str) else None
    if match is not None:
        site = Site(int(match[1]), _KIND_OF_HOOK[match[2]])
        if gdn_layers is None or (site.layer in gdn_layers and site.kind in kinds):
            return site
    if gdn_layers is None:
        valid = ("blocks.<L>.linear_attn.hook_state or blocks.<L>.linear_attn.hook_write_value (or, in RWKV-7, "
                 "blocks.<L>.linear_attn.hook_erase_value), L a GDN layer")
    else:
        valid = ", ".join(site_name(layer, kind) for layer in gdn_layers for kind in kinds)
    raise ValueError(f"{name!r} is not an SAE site; the sites are {valid}")


def site_kinds(model) -> tuple[str, ...]:
    """The kinds of site ``model``'s GDN layers have: state and write, and the erase where the memory has an
    erase term of its own (RWKV-7's `hooked_gdn.memory.DPLRMemory`)."""
    has_erase = all(hasattr(model.blocks[layer].linear_attn, "hook_erase_value") for layer in model.cfg.gdn_layers)
    return KINDS if has_erase else ("state", "write")


def parse_model_site(name: str | None, model) -> Site:
    """`parse_site` on ``model``'s GDN layers and `site_kinds`. An erase site asked of a family whose memory has no
    erase term of its own is refused with a ValueError naming the family and why."""
    site = _SITE.fullmatch(name) if isinstance(name, str) else None
    if site is not None and _KIND_OF_HOOK[site[2]] == "erase" and "erase" not in site_kinds(model):
        family = type(model).family_of(model.cfg).name
        why = ("it has no erase at all" if family == "Mamba-2" else
               "its erase is part of its write k̂_t δ_tᵀ (δ_t = β_t (v_t − S_tᵀ k̂_t) already removes the old value), "
               "so the write site covers it")
        raise ValueError(f"{name}: the erase site exists only in layers with an erase term of their own "
                         f"(RWKV-7's (a_t ⊙ κ̂_t) e_tᵀ); {model.cfg.model_name} is a {family} model, and {why}")
    return parse_site(name, model.cfg.gdn_layers, site_kinds(model))


def act_name(name: str, layer: int | None = None, layer_type: str | None = None, gdn_layers: Sequence[int] = ()) -> str:
    """TransformerLens' ``get_act_name``, and in a GDN layer its hook points by their short name:
    ``act_name("state", 4, gdn_layers=[0, 1, 2, 4])`` is ``blocks.4.linear_attn.hook_state`` (RWKV-7's own, e.g.
    ``"erase_value"``, likewise); an MoE
    block's likewise (``act_name("expert_indices", 3)`` is ``blocks.3.mlp.hook_expert_indices``)."""
    if layer in gdn_layers and layer_type in (None, "linear_attn") and f"hook_{name}" in (*GDN_HOOKS, *RWKV7_HOOKS):
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


def told_positions(hook) -> Int[Tensor, " p"] | None:
    """`hook_positions`, or None on a hook point the layer tells no positions (one that fires once per forward
    with every position of the input, e.g. RWKV-7's ``hook_erase_key``)."""
    return hook.ctx.get(_POSITIONS)


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
