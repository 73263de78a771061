"""A TransformerLens `HookPoint` that checks what hooks return and reports which rows they edited, and
`AliasHookPoint`, another name (in another layout) for a hook point's value.

Also the one place where the TransformerLens versions we support (3.x and 4.x) differ for us:
`add_hook_with_handle`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor
from transformer_lens.hook_points import HookPoint, LensHandle


class CheckedHookPoint(HookPoint):
    """A `HookPoint` whose hooks must return a tensor of the input's shape and kind (or None).

    ``fire_and_diff`` is for sites whose edits are carried through the recurrence: it also reports
    which rows (all dims but the trailing ``feature_dims``) the hooks changed, comparing against a
    copy so that in-place edits count too. Without hooks it costs nothing and reports None.

    ``aliases`` (made by `alias`) fire right after this point's own hooks, each on the value in its layout;
    what they return is this point's value, so their edits are this point's edits (carried where this
    point's are).
    """

    def __init__(self, position_axis: int | None = 1):
        super().__init__()
        self.aliases: list[AliasHookPoint] = []
        #: the axis of the value that runs over the input's positions, one entry each (what ``run_with_cache``'s
        #: ``pos_slice`` slices): 1, after the batch, except where the layout says otherwise; None where no axis
        #: does (a final state; a padded conv output)
        self.position_axis = position_axis

    def alias(self, to_alias: Callable[[Tensor], Tensor] | None = None,
              from_alias: Callable[[Tensor], Tensor] | None = None, position_axis: int | None = 1) -> AliasHookPoint:
        """A new hook point that sees this one's value as ``to_alias(value)`` (a view, e.g. a transpose, so that
        in-place edits reach the value) and gives an edit back as ``from_alias(edited)``; identity by default.
        Register it as a submodule under the name it is to have."""
        alias = AliasHookPoint(to_alias, from_alias, position_axis)
        self.aliases.append(alias)
        return alias

    def with_aliases(self) -> tuple[CheckedHookPoint, ...]:
        """This point and its aliases."""
        return (self, *self.aliases)

    def is_hooked(self) -> bool:
        """Whether this point or one of its aliases has a hook, forward or backward."""
        return any(hp._has_hooks() for hp in self.with_aliases())

    def _has_hooks(self) -> bool:
        return bool(self.fwd_hooks or self.bwd_hooks)

    def backward_hooked_names(self) -> list[str]:
        """The names of this point and its aliases that have a backward hook."""
        return [hp.name for hp in self.with_aliases() if hp.bwd_hooks]

    def __call__(self, x: Tensor) -> Tensor:
        if not self.is_hooked():
            return x
        y = self._run_hooks(x) if self._has_hooks() else x
        for alias in self.aliases:
            if alias._has_hooks():
                alias.ctx.update(self.ctx)  # the positions the layer told this point (`hooked_gdn.sites.hook_positions`)
                y = fire_in_layout(alias, y, alias.to_alias, alias.from_alias)
        return y

    def _run_hooks(self, x: Tensor) -> Tensor:
        y = super().__call__(x)
        if not isinstance(y, Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"a hook on {self.name} returned {got}; it must return None or a tensor of shape {tuple(x.shape)}")
        if x.dtype.is_floating_point and not y.dtype.is_floating_point:  # a cast would silently round or binarise
            raise TypeError(f"a hook on {self.name} returned a tensor of dtype {y.dtype}; it must return a floating "
                            f"tensor (it is cast to {x.dtype})")
        if not x.dtype.is_floating_point and y.dtype.is_floating_point:  # integer sites (expert indices): no rounding
            raise TypeError(f"a hook on {self.name} returned a tensor of dtype {y.dtype}; it must return an integer tensor")
        return y.to(x.dtype)

    def fire_and_diff(
        self, x: Tensor, feature_dims: int, recompute: Callable[[], Tensor] | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Run the hooks on ``x``; return (result, bool mask of edited rows or None, the unedited x).

        Edits count whether returned or made in place. Without ``recompute``, ``x`` is copied
        before the hooks run, to compare against. With it (for tensors too large to copy, like the
        states), an untouched ``x`` is recognised by its version counter, and the original of an
        in-place edit is recomputed. Without hooks this costs nothing.
        """
        if not self.is_hooked():
            return x, None, x
        snapshot = x.clone() if recompute is None else None
        version = x._version
        y = self(x)
        if snapshot is not None:
            original = snapshot
        elif x._version == version:
            original = x
        else:
            original = recompute()
        if y is original:
            return y, None, original
        edited = (y != original).flatten(start_dim=y.dim() - feature_dims).any(-1)
        return y, (edited if bool(edited.any()) else None), original


def _same(x: Tensor) -> Tensor:
    return x


def position_axis(hook_point: HookPoint) -> int | None:
    """The axis of ``hook_point``'s value with one entry per input position (`CheckedHookPoint.position_axis`); 1
    for a plain TransformerLens point (an SAE's), whose values are [batch, pos, ...]."""
    return getattr(hook_point, "position_axis", 1)


class AliasHookPoint(CheckedHookPoint):
    """Another name for a `CheckedHookPoint`'s value, in a layout of its own (`CheckedHookPoint.alias`): it holds
    no tensor and fires only inside its target's firing, so caching, hooking and editing it are those of the
    target seen through ``to_alias``/``from_alias``."""

    def __init__(self, to_alias: Callable[[Tensor], Tensor] | None = None, from_alias: Callable[[Tensor], Tensor] | None = None,
                 position_axis: int | None = 1):
        super().__init__(position_axis)
        self.to_alias, self.from_alias = to_alias or _same, from_alias or _same


def fire_in_layout(hook_point: CheckedHookPoint, x: Tensor, to_layout: Callable[[Tensor], Tensor],
                   from_layout: Callable[[Tensor], Tensor]) -> Tensor:
    """Fire ``hook_point`` on ``to_layout(x)`` and return ``x`` as its hooks left it: ``from_layout`` of what they
    returned or edited in place, or ``x`` itself when they changed nothing (or there are none)."""
    if not hook_point.is_hooked():
        return x
    seen = to_layout(x)
    version = seen._version
    y = hook_point(seen)
    return x if y is seen and seen._version == version else from_layout(y)


def any_hooked(*hook_points: CheckedHookPoint) -> bool:
    return any(hp.is_hooked() for hp in hook_points)


def add_hook_with_handle(
    hook_point: HookPoint, hook: Callable, dir: Literal["fwd", "bwd"] = "fwd", is_permanent: bool = False,
    level: int | None = None, prepend: bool = False,
) -> LensHandle:
    """``hook_point.add_hook(...)``, returning the new hook's `LensHandle` under TransformerLens 3.x and 4.x.

    TransformerLens 4 returns the handle; 3.x returns None, having put the handle first (``prepend``)
    or last in the hook point's ``fwd_hooks`` or ``bwd_hooks``, where it is taken from. Remove the hook
    as TransformerLens does: ``handle.hook.remove()`` and drop the handle from that list.
    """
    handle = hook_point.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)
    if handle is None:  # TransformerLens 3.x
        handles = hook_point.fwd_hooks if dir == "fwd" else hook_point.bwd_hooks
        handle = handles[0] if prepend else handles[-1]
    return handle
