"""Tiny random RWKV-7 models for the tests: a BlinkDL-format state dict (what BlinkDL's ``rwkv`` package, the parity
reference, reads), saved as ``.pth`` or converted to flash-linear-attention's checkpoint format, every parameter
random (flash-linear-attention and BlinkDL initialise several to zero, which would hide paths)."""

from __future__ import annotations

from pathlib import Path

import torch

from hooked_gdn.architectures.rwkv7 import blinkdl_config, blinkdl_to_fla, save_fla_checkpoint
from hooked_gdn.rwkv7 import HookedRWKV7

#: hidden 128, head size 64 (BlinkDL's CPU path needs 64): 2 heads; 2 layers (so v_first couples them)
TINY = dict(d_model=128, head_size=64, n_layers=2, d_vocab=256, d_mlp=512, ranks=dict(w=8, a=8, v=8, g=16))


def random_blinkdl_state(d_model=128, head_size=64, n_layers=2, d_vocab=256, d_mlp=512, ranks=None, seed=0,
                         decay_bias: float = 0.0) -> dict[str, torch.Tensor]:
    """A random RWKV-7 state dict in BlinkDL's names and layouts. ``decay_bias`` shifts w_0: higher is faster
    forgetting (log w = −e^{−1/2} σ(w_0 + …)), lower keeps a longer past."""
    ranks = ranks or TINY["ranks"]
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.3: torch.randn(*shape, generator=g) * scale
    C, N = d_model, head_size
    sd = {"emb.weight": r(d_vocab, C, scale=1.0), "ln_out.weight": 1 + r(C, scale=0.1), "ln_out.bias": r(C, scale=0.1),
          "head.weight": r(d_vocab, C, scale=0.1)}
    for i in range(n_layers):
        p = f"blocks.{i}."
        for ln in ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2"):
            sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = 1 + r(C, scale=0.1), r(C, scale=0.1)
        a = p + "att."
        for c in "rwkvag":
            sd[f"{a}x_{c}"] = torch.rand(1, 1, C, generator=g)
        for q in "wav":
            if q == "v" and i == 0:
                continue
            sd[f"{a}{q}0"] = r(1, 1, C, scale=0.5) + (decay_bias if q == "w" else 0.0)
            sd[f"{a}{q}1"], sd[f"{a}{q}2"] = r(C, ranks[q]), r(ranks[q], C)
        sd[f"{a}g1"], sd[f"{a}g2"] = r(C, ranks["g"]), r(ranks["g"], C)
        sd[f"{a}k_k"], sd[f"{a}k_a"] = 1 + r(1, 1, C, scale=0.2), 1 + r(1, 1, C, scale=0.2)
        sd[f"{a}r_k"] = r(C // N, N)
        for name in ("receptance", "key", "value", "output"):
            sd[f"{a}{name}.weight"] = r(C, C, scale=C**-0.5)
        sd[f"{a}ln_x.weight"], sd[f"{a}ln_x.bias"] = 1 + r(C, scale=0.1), r(C, scale=0.1)
        f = p + "ffn."
        sd[f"{f}x_k"] = torch.rand(1, 1, C, generator=g)
        sd[f"{f}key.weight"], sd[f"{f}value.weight"] = r(d_mlp, C, scale=C**-0.5), r(C, d_mlp, scale=d_mlp**-0.5)
    return sd


def save_pth(state: dict, folder: Path, name: str = "tiny") -> Path:
    """The state dict as ``folder/name.pth``; returns the path."""
    path = Path(folder) / f"{name}.pth"
    torch.save(state, path)
    return path


def hooked_from_blinkdl(state: dict) -> HookedRWKV7:
    """A `HookedRWKV7` holding the BlinkDL state dict's weights, through our name map (nothing written to disk)."""
    from hooked_gdn.loading import hf_to_hooked_state_dict

    fla = blinkdl_to_fla(state)
    model = HookedRWKV7(blinkdl_config(fla, "tiny"))
    model.load_state_dict(hf_to_hooked_state_dict(fla, model.cfg))
    return model


def save_fla(state: dict, folder: Path) -> Path:
    """The BlinkDL state dict as a flash-linear-attention checkpoint folder (config.json + model.safetensors), written
    through our name map. The GroupNorm ε stays BlinkDL's 64e-5 (= head size 64 × fla's default norm_eps 1e-5)."""
    model = hooked_from_blinkdl(state)
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_fla_checkpoint(model, Path(folder))
    return Path(folder)
