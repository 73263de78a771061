"""Loading checkpoints of the supported GDN families (transformers format: config.json + safetensors) into `HookedGatedDeltaNet`."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from .architectures import BY_KEY
from .architectures.base import TEXT_PREFIXES
from .config import HookedGDNConfig
from .pretrained import pretrained_path

_EMBEDDING_KEYS = tuple(f"{p}embed_tokens.weight" for p in TEXT_PREFIXES)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A shipped short name, a local folder, or a hub id (downloaded; needs the internet).

    A shipped name that is also a path here is ambiguous, and refused rather than guessed.
    """
    shipped = pretrained_path(str(name_or_path))
    path = Path(name_or_path)
    if shipped is not None:
        if path.exists() and path.resolve() != shipped.resolve():
            raise ValueError(f"{str(name_or_path)!r} names both the shipped model and {path.resolve()}: pass "
                             f"'./{name_or_path}' for the local one, or {shipped} for the shipped one")
        return shipped
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path} is not a checkpoint folder")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def hf_to_hooked_state_dict(hf_state: dict[str, torch.Tensor], cfg: HookedGDNConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a transformers one of ``cfg``'s family, in memory (through the family's
    placements; keys outside the text model are dropped). A weight left unfilled is refused by name."""
    from .model import HookedGatedDeltaNet

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HookedGatedDeltaNet(cfg).state_dict().items()}
    family, ours, filled = BY_KEY[cfg.architecture], {}, {}
    placements = {key: family.placements(key, cfg, tensor.shape) for key, tensor in hf_state.items()}
    embedding = next((hf_state[k] for k, found in placements.items() if [p.target for p in found] == ["W_E"]), None)
    for key, tensor in hf_state.items():
        for p in placements[key]:
            if p.target == "lm_head" and cfg.tie_word_embeddings:
                if embedding is not None and not torch.equal(tensor, embedding):
                    raise ValueError("tie_word_embeddings is set, but lm_head.weight differs from the embedding: "
                                     "set tie_word_embeddings=False to use the separate head")
                continue
            if p.target not in shapes:
                raise ValueError(f"checkpoint tensor {key!r} goes to {p.target!r}, which this model lacks")
            part = p.take(tensor)
            ours.setdefault(p.target, tensor.new_empty(shapes[p.target]))[p.index] = part
            filled[p.target] = filled.get(p.target, 0) + part.numel()
    missing = [name for name, shape in shapes.items() if filled.get(name, 0) < shape.numel()]
    if missing:
        raise ValueError(f"the checkpoint lacks weights for {missing[:5]}{' …' if len(missing) > 5 else ''}")
    return ours


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_pretrained(cls, name_or_path, device=None, dtype=None):
    folder = resolve_checkpoint(name_or_path)
    cfg = HookedGDNConfig.from_hf_config(AutoConfig.from_pretrained(folder), model_name=str(name_or_path))
    has_tokenizer = any((folder / f).exists() for f in _TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    weights = read_safetensors(folder)
    head, embedding = weights.get("lm_head.weight"), next((weights[k] for k in _EMBEDDING_KEYS if k in weights), None)
    if cfg.tie_word_embeddings and head is not None and embedding is not None and not torch.equal(head, embedding):
        # transformers keeps both weights when they differ (with a warning), so the head is separate
        warnings.warn(f"{name_or_path}: config.json sets tie_word_embeddings, but the checkpoint's lm_head.weight differs "
                      "from its embedding; using the separate head, as transformers does")
        cfg.tie_word_embeddings = False
    model = cls(cfg, tokenizer)
    state = hf_to_hooked_state_dict(weights, cfg)
    dtype = dtype or torch.float32
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model.cfg.dtype = dtype
    return model.to(device=device, dtype=dtype)
