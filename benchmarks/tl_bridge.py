"""Optional peer column for benchmark P2 (caching the GDN or Mamba-2 state at every position), measured on
TransformerLens 4.3's ``TransformerBridge``.

The bridge wraps transformers' ``Qwen3_5ForCausalLM``. By default its Gated DeltaNet layers call
transformers' fused chunked kernel and never expose the recurrent state; with the opt-in
``eager_scan`` flag they run a per-token Python scan instead and fire ``hook_ssm_state`` with the
whole state trajectory. That per-token scan is what P2's peer column times.

    bridge = boot_bridge("/path/to/qwen3_5_text_folder")
    bridge.run_with_cache(tokens, names_filter=bridge_state_hook_name(bridge, 0), use_cache=False)

``use_cache=False`` (as TransformerLens advises for reading GDN internals) keeps transformers'
generation cache out: a GDN layer handed one falls back to transformers' forward, where the state
hook does not fire.

Mamba-2 (``Mamba2ForCausalLM``) goes the same way: its bridge's SSD mixers (``SSM2MixerBridge``) have the
same ``eager_scan`` switch and ``hook_ssm_state``, at ``blocks.L.mixer``.

Everything is local: the folder is one written by ``Qwen3_5ForCausalLM.save_pretrained`` (model_type
``qwen3_5_text``) or ``Mamba2ForCausalLM.save_pretrained``; nothing is fetched from the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hooked_gdn.sites import gdn_hook_name


def boot_bridge(folder: str, device: str = "cpu"):
    """Boot a TransformerBridge on the local Qwen3.5 text (or Mamba-2) checkpoint in ``folder`` (on ``device``, fp32, eval)
    and switch every Gated DeltaNet layer (or Mamba-2 mixer) to the eager scan so that ``hook_ssm_state`` fires.

    Raises ``RuntimeError`` when the installed TransformerLens has no bridge, no Gated DeltaNet
    component with an ``eager_scan`` switch, or cannot boot this folder.
    """
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json)")
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.model_bridge.generalized_components.gated_delta_net import GatedDeltaNetBridge
    except ImportError as err:
        raise RuntimeError(f"this TransformerLens has no TransformerBridge for Gated DeltaNet: {err}") from err
    if not hasattr(GatedDeltaNetBridge, "eager_scan"):
        raise RuntimeError("this TransformerLens's GatedDeltaNetBridge has no eager_scan switch")
    scanning = (GatedDeltaNetBridge,)
    try:
        from transformer_lens.model_bridge.generalized_components.ssm2_mixer import SSM2MixerBridge

        scanning += (SSM2MixerBridge,) if hasattr(SSM2MixerBridge, "eager_scan") else ()
    except ImportError:
        pass

    try:
        bridge = TransformerBridge.boot_transformers(str(path), device=device, dtype=torch.float32)
    except Exception as err:
        raise RuntimeError(f"TransformerBridge could not boot {folder}: {err!r}") from err
    bridge.eval()

    mixers = [m for m in bridge.modules() if isinstance(m, scanning)]
    if not mixers:
        raise RuntimeError(f"the bridge booted on {folder} has no Gated DeltaNet layers or Mamba-2 mixers with eager_scan")
    for mixer in mixers:
        mixer.eager_scan = True
    return bridge


def bridge_state_hook_name(bridge, layer: int) -> str:
    """Name of layer ``layer``'s state hook on the bridge; ``ValueError`` if that layer has no recurrent state.

    The hook holds the state after every position, laid out ``[batch, pos, n_value_heads, d_key,
    d_value]`` in fp32 for GDN -- the same [d_key, d_value] order as hooked_gdn's states (no transpose);
    for Mamba-2 ``[batch, pos, heads, head_dim, d_state]``, the transpose of hooked_gdn's.
    """
    for name in (gdn_hook_name(layer, "hook_ssm_state"), f"blocks.{layer}.mixer.hook_ssm_state"):  # GDN, Mamba-2
        if name in bridge.hook_dict:
            return name
    raise ValueError(f"layer {layer} has no Gated DeltaNet or Mamba-2 state hook (is it an attention layer?)")
