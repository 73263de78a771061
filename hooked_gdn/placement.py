"""Placing a model's blocks on several devices: the plan (which block where) and accelerate's dispatch.

A device map is ``{block_index: device}`` or ``"auto"``, which is transformers' ``device_map="auto"``:
accelerate's `get_balanced_memory` and `infer_auto_device_map`, blocks never split, within
``max_memory``. Blocks that fit on no accelerator go to "cpu", which accelerate runs as CPU
offload (weights in CPU memory, brought to the first accelerator for each forward).

The plan is the module-level map accelerate's `dispatch_model` takes. The embedding, unembedding
and final norm go together on one device, its main device (block 0's for a given map), because
`dispatch_model` puts the root module's own tensors there; the root's outputs (logits, loss) come back on the input's device. accelerate's
hooks move each block's inputs (residual stream, `ForwardContext`, rotary angles) to the block's
device. `hooked_gdn.loading` loads each weight straight onto its planned device.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import get_balanced_memory
from torch import nn

DeviceMap = Mapping[int, "str | int | torch.device"]


def _accelerator_type() -> str:
    return torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cuda"


def device_name(device: str | int | torch.device) -> str:
    """A device as accelerate's maps write it: "cpu", "cuda:1"; an int is an accelerator index, as in torch."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"a device is a string, an int or a torch.device, got {device!r}")
    if isinstance(device, int):
        return f"{_accelerator_type()}:{device}"
    try:
        return str(torch.device(device))
    except RuntimeError as error:
        raise ValueError(f"{device!r} is not a device: {error}") from None


def available_devices() -> list[str]:
    """The devices this machine can place blocks on."""
    if not torch.accelerator.is_available():
        return ["cpu"]
    return [f"{_accelerator_type()}:{i}" for i in range(torch.accelerator.device_count())] + ["cpu"]


def _given_blocks(device_map: DeviceMap, n_layers: int) -> list[str]:
    keys = list(device_map)
    if any(isinstance(k, bool) or not isinstance(k, int) for k in keys):
        raise TypeError(f"device_map keys are block indices (ints), got {keys}")
    unknown = sorted(set(keys) - set(range(n_layers)))
    if unknown:
        raise ValueError(f"device_map names blocks {unknown}, but the model has blocks 0 … {n_layers - 1}")
    missing = sorted(set(range(n_layers)) - set(keys))
    if missing:
        raise ValueError(f"device_map gives no device for blocks {missing}: give one for each of the {n_layers} blocks")
    return [device_name(device_map[i]) for i in range(n_layers)]


def _auto(model: nn.Module, max_memory, dtype) -> tuple[list[str], str]:
    """Each block's device and the root's, as accelerate places them."""
    no_split = sorted({type(block).__name__ for block in model.blocks})
    # as transformers' device_map="auto": the budgets balanced over the accelerators, then filled in order
    balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    accelerate_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)

    def device_of(name: str) -> str:
        # accelerate names the largest module that fits whole: "blocks.3", "blocks", or "" for the model
        owner = max((key for key in accelerate_map if key == "" or name == key or name.startswith(f"{key}.")), key=len)
        if accelerate_map[owner] == "disk":
            raise ValueError(f"the model does not fit in max_memory={max_memory}: accelerate would put {name} on "
                             "disk, which is not supported here; give more memory")
        return device_name(accelerate_map[owner])

    return [device_of(f"blocks.{i}") for i in range(len(model.blocks))], device_of(_root_tensors(model)[0])


def _root_tensors(model: nn.Module) -> list[str]:
    """The names of what runs in the root's own forward: its parameters (the embedding, the unembedding)
    and its children with weights other than the blocks (the final norm)."""
    children = [name for name, child in model.named_children() if name != "blocks" and any(True for _ in child.parameters())]
    return [name for name, _ in model.named_parameters(recurse=False)] + children


def plan_device_map(model: nn.Module, device_map: DeviceMap | str, max_memory=None, dtype=None) -> dict[str, str]:
    """The module-level map for `dispatch_model`: each block where ``device_map`` says, and the
    root's tensors and other modules (embedding, unembedding, final norm) together on one device:
    block 0's for a given map, the one accelerate gives the embedding for "auto".

    Only the model's structure and sizes are read, so it may be on the meta device: the plan of a
    model too large for this machine can be computed (and checked) without loading it.
    ``max_memory`` ({0: "70GiB", 1: "70GiB", "cpu": "100GiB"}, accelerate's form) goes with "auto".
    """
    n_layers = len(model.blocks)
    if isinstance(device_map, str):
        if device_map != "auto":
            raise ValueError(f"device_map is 'auto' or {{block_index: device}}, got {device_map!r}")
        blocks, main = _auto(model, max_memory, dtype)
    elif isinstance(device_map, Mapping):
        if max_memory is not None:
            raise ValueError("max_memory goes with device_map='auto'; a given map already says where each block goes")
        blocks = _given_blocks(device_map, n_layers)
        main = blocks[0]
    else:
        raise TypeError(f"device_map is 'auto' or a dict {{block_index: device}}, got {type(device_map).__name__}")
    return {name: main for name in _root_tensors(model)} | {f"blocks.{i}": device for i, device in enumerate(blocks)}


def main_device(model: nn.Module, plan: Mapping[str, str]) -> str:
    """Where the root's own tensors and computations go: accelerate's main device."""
    return plan[_root_tensors(model)[0]]


def check_available(plan: Mapping[str, str]) -> None:
    """Refuse a plan that names a device this machine does not have (meta included: it holds no weights)."""
    here = available_devices()
    absent = sorted({device for device in plan.values() if device not in here and f"{device}:0" not in here})
    if absent:
        where = {device: [name for name, d in plan.items() if d == device] for device in absent}
        raise ValueError(f"device_map places {where} on devices this machine does not have; available: {here}")


def dispatch(model: nn.Module, plan: Mapping[str, str]) -> nn.Module:
    """Attach accelerate's hooks that move each block's inputs to its device (the weights are
    already there); ``model.hf_device_map`` records the plan, as in transformers."""
    # force_hooks: a map onto one device runs the same path as one onto several
    with warnings.catch_warnings():
        # the root's own tensors (W_E, lm_head) are keys as accelerate's infer_auto_device_map writes
        # them, but check_device_map warns that they are not modules
        warnings.filterwarnings("ignore", "The following device_map keys do not match any submodules")
        dispatch_model(model, dict(plan), main_device=main_device(model, plan), force_hooks=True)
    model.hf_device_map = dict(plan)
    return model
