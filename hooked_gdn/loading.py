"""Loading checkpoints of every supported family (transformers format: config.json + safetensors) into `HookedGatedDeltaNet`.

`load_pretrained` builds the model on the meta device and streams the (sharded) safetensors into it
one tensor at a time, through each family's per-key placements (`hooked_gdn.architectures`);
`load_pretrained_in_memory` is the plain path it is tested and benchmarked against.

A checkpoint is checked before anything is built or any tensor data is read (`_open`), from
config.json and the safetensors headers:

- every shard file stays inside the checkpoint folder (`_shard_path`; links followed);
- every size field of the config (`HookedModelConfig.sizes`) is an integer > 0 (counts >= 0), at most
  the largest dimension of any tensor in the checkpoint (``n_layers`` aside: it must equal the number of
  layers the checkpoint holds weights for). That is the bound: each size the model uses is at most some
  weight's dimension, so nothing sized by the config outgrows the checkpoint;
- every tensor that fills a weight is stored in a floating-point dtype (an integer or bool tensor is
  not cast);
- the model built on the meta device (nothing allocated) gets every weight exactly once, each of the
  config's shape.

While streaming, each tensor is checked to be finite as it is read (no second pass over the files).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from .architectures import ARCHITECTURES, BY_KEY, NOT_SUPPORTED, architecture_for
from .config import HookedModelConfig
from .placement import check_available, dispatch, main_device, plan_device_map
from .pretrained import PRETRAINED_MODELS, pretrained_path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's map from tensor to file
_MAP_WINDOW_BYTES = 64 * 2**20  # bytes read through one memory map before its file is reopened


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A shipped short name, a local folder, or a hub id ``owner/name`` (downloaded; needs the internet).

    A shipped name that is also a path here is ambiguous, and refused rather than guessed. Only an
    ``owner/name`` is sent to the hub: hub ids without an owner ("gpt2") exist, but they are legacy
    ones and none is a GDN model, so a bare name that is neither shipped nor a folder here (a typo
    such as "gdn-austn") is refused with the shipped names and the checkpoint folders here, instead
    of failing on the network. A hub id that cannot be downloaded is refused saying why.
    """
    name = str(name_or_path)
    shipped = pretrained_path(name)
    path = Path(name_or_path)
    if shipped is not None:
        if path.exists() and path.resolve() != shipped.resolve():
            raise ValueError(f"{name!r} names both the shipped model and {path.resolve()}: pass "
                             f"'./{name}' for the local one, or {shipped} for the shipped one")
        return shipped
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{name} is not a checkpoint folder")
    if not _is_hub_id(name):
        raise FileNotFoundError(f"no such folder or shipped name: {name!r}{_did_you_mean(name)}; {_known_checkpoints()}; "
                                f"a hub id has the form owner/name")
    owner, rest = name.split("/")
    if Path(owner).is_dir():  # a path with a typo in its last part, not a hub id: refused here, not on the network
        inside = sorted(p.name for p in Path(owner).iterdir() if p.is_dir())
        close = difflib.get_close_matches(rest, inside, n=1)
        hint = f" (did you mean '{owner}/{close[0]}'?)" if close else ""
        raise FileNotFoundError(f"no such folder or shipped name: {name!r}: {owner}/ is a folder here and holds no "
                                f"{rest!r}{hint}; {_known_checkpoints()} (for the hub model {name}, run from a folder "
                                f"without {owner}/)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except LocalEntryNotFoundError as error:
        why = "the hub could not be reached (offline?), and the local hub cache does not hold the model"
        raise FileNotFoundError(f"{name!r} is not a folder here, and {_hub_failure(why)}") from error
    except RepositoryNotFoundError as error:  # also a gated or private model this machine may not read
        why = "the hub has no such model that this machine may read (a gated or private one needs a login: hf auth login)"
        raise FileNotFoundError(f"{name!r} is not a folder here, and {_hub_failure(why)}") from error
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"{name!r} is not a folder here, and {_hub_failure(first_line)}") from error


def _is_hub_id(name: str) -> bool:
    """``owner/name`` in the characters the hub allows."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/")) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_failure(why: str) -> str:
    return f"it could not be downloaded from the Hugging Face hub: {why}; {_known_checkpoints()}"


def _local_checkpoint_folders() -> list[str]:
    """The folders in the working directory that hold a checkpoint (a config.json)."""
    return sorted(p.name for p in Path.cwd().iterdir() if os.path.isfile(p / "config.json"))  # False where unreadable


def _known_checkpoints() -> str:
    local = _local_checkpoint_folders()
    return (f"shipped names: {', '.join(PRETRAINED_MODELS)}; checkpoint folders in {Path.cwd()}: "
            f"{', '.join(local) if local else 'none'}")


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, [*PRETRAINED_MODELS, *_local_checkpoint_folders()], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def hf_to_hooked_state_dict(hf_state: dict[str, torch.Tensor], cfg: HookedModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict from a transformers one of ``cfg``'s family, in memory (through the family's
    placements; keys outside the text model are dropped). A weight left unfilled is refused by name."""
    from .model import HookedGatedDeltaNet

    with init_empty_weights():
        shapes = {k: v.shape for k, v in HookedGatedDeltaNet(cfg).state_dict().items()}
    family, ours, filled = BY_KEY[cfg.architecture], {}, {}
    placements = {key: family.placements(key, cfg, tensor.shape) for key, tensor in hf_state.items()}
    embedding = next((hf_state[k] for k, found in placements.items() if [p.target for p in found] == ["W_E"]), None)
    for key, tensor in hf_state.items():
        if placements[key]:
            _check_finite(key, tensor, "state dict")
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
        raise ValueError(f"the state dict lacks weights for {_some(missing)}")
    return ours


def _check_finite(key: str, tensor: torch.Tensor, name_or_path) -> None:
    """Refuse a checkpoint tensor with a NaN or an infinity: one reduction over it, values unchanged (its
    minimum and maximum, through which a NaN propagates and in which an infinity shows; ~45x faster than
    ``isfinite(t).all()`` in fp16 on the CPU)."""
    if not tensor.numel():
        return
    checked = tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else tensor.float()
    low, high = torch.aminmax(checked)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise ValueError(f"checkpoint {name_or_path}: tensor {key!r} holds NaN or infinite values")


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read into memory."""
    state = {}
    for path in SafetensorsCheckpoint.open(folder).names:
        state.update(load_file(path))  # a readable safetensors file: SafetensorsCheckpoint.open has parsed its header
    return state


@dataclass(frozen=True)
class SafetensorsCheckpoint:
    """A checkpoint's safetensors files and each tensor's shape, from their headers (no tensor data
    is read): the files ``model.safetensors.index.json`` lists when there is one, else every
    ``*.safetensors`` file of the folder. Every file must lie inside the folder (`_shard_path`), and a file
    whose header cannot be read (truncated, not safetensors) is refused by name."""

    names: dict[Path, list[str]]  # file -> the tensors it holds
    shapes: dict[str, torch.Size]
    dtypes: dict[str, str]  # safetensors' names: "F32", "BF16", "I32", "BOOL", …

    @classmethod
    def open(cls, folder: Path) -> "SafetensorsCheckpoint":
        index = folder / _INDEX_FILE
        if index.exists():
            try:
                listed = json.loads(index.read_text())["weight_map"]
                entries = {key: str(name) for key, name in listed.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{index} is not a safetensors index ({type(error).__name__}: {error})") from None
            files = sorted({_shard_path(folder, name, f"{index}: tensor {key!r}") for key, name in entries.items()})
            absent = [f.name for f in files if not f.exists()]
            if absent:
                raise FileNotFoundError(f"{index} lists shards that are not in {folder}: {absent}")
        else:
            files = sorted(_shard_path(folder, f.name, str(folder)) for f in folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors weights in {folder}")
        names, shapes, dtypes = {}, {}, {}
        for path in files:
            try:
                with safe_open(path, "pt") as f:
                    names[path] = list(f.keys())
                    for name in names[path]:
                        if name in shapes:
                            raise ValueError(f"tensor {name!r} is in two files of {folder}")
                        found = f.get_slice(name)
                        shapes[name], dtypes[name] = torch.Size(found.get_shape()), found.get_dtype()
            except (SafetensorError, OSError) as error:  # truncated, not safetensors, unreadable
                why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {why}") from None
        if index.exists() and set(listed) - set(shapes):
            raise ValueError(f"{index} lists tensors that its shards do not hold: {_some(sorted(set(listed) - set(shapes)))}")
        return cls(names, shapes, dtypes)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read into memory."""
        path = next(path for path, names in self.names.items() if name in names)
        with safe_open(path, "pt") as f:
            return f.get_tensor(name).clone()

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in turn, memory-mapped: its bytes are read when it is used, so copy it and drop it.

        Pages read through a memory map stay in the resident set until the map is closed, so each
        file is reopened after every ``_MAP_WINDOW_BYTES``: the stream holds at most that much plus
        one tensor beyond what the caller keeps.
        """
        for path, names in self.names.items():
            start = 0
            while start < len(names):
                with safe_open(path, "pt") as f:
                    window = 0
                    while start < len(names) and window < _MAP_WINDOW_BYTES:
                        tensor = f.get_tensor(names[start])
                        window += tensor.nbytes
                        yield names[start], tensor
                        del tensor
                        start += 1


def _shard_path(folder: Path, name: str, entry: str) -> Path:
    """``folder / name``, refused (naming ``entry``) unless it stays inside the checkpoint folder: ``name``
    relative and without "..", and the file it reaches, links followed, inside the folder. In the hub's
    cache a snapshot's files are links to its repository's ``blobs/``, which is allowed for a snapshot folder."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise ValueError(f"{entry}: shard path {name!r} leaves the checkpoint folder {folder}")
    path, real, home = folder / name, (folder / name).resolve(), folder.resolve()
    inside = [home] + ([home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [])
    if not any(real.is_relative_to(root) for root in inside):
        raise ValueError(f"{entry}: shard path {name!r} leads to {real}, outside the checkpoint folder {folder}")
    return path


def _some(names: list[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f" … ({len(names)} in all)" if len(names) > shown else "")


def _open(cls, name_or_path):
    """The folder, config, tokenizer, checkpoint, per-tensor placements and the model of ``cls`` to load
    into (in eval mode, its parameters on the meta device), checked against each other (the module's
    docstring says how) before any tensor data is read."""
    folder = resolve_checkpoint(name_or_path)
    checkpoint = SafetensorsCheckpoint.open(folder)
    cfg = HookedModelConfig.from_hf_config(read_config(folder), model_name=str(name_or_path))
    _check_sizes(cfg, checkpoint, name_or_path)
    has_tokenizer = any((folder / f).exists() for f in _TOKENIZER_FILES)
    family = BY_KEY[cfg.architecture]
    # a family transformers does not register: its config.json tells AutoTokenizer nothing (and it warns that it cannot)
    own_config = {"config": PretrainedConfig()} if family.read_config is not None else {}
    tokenizer = _tokenizer(folder, own_config, name_or_path) if has_tokenizer else None
    placements, unexpected = {}, []
    for key in checkpoint.shapes:
        try:
            placements[key] = family.placements(key, cfg, checkpoint.shapes[key])
        except ValueError:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"checkpoint {name_or_path} holds tensors that a {family.name} model of its config does not "
                         f"have: {_some(unexpected)}")
    not_float = [f"{key} ({checkpoint.dtypes[key]})" for key, found in placements.items()
                 if found and not _is_float(checkpoint.dtypes[key])]
    if not_float:
        raise ValueError(f"checkpoint {name_or_path} stores weights in a dtype that is not floating point: "
                         f"{_some(not_float)}")
    layers = {int(m[1]) for found in placements.values() for p in found if (m := _BLOCK.match(p.target))}
    if layers != set(range(cfg.n_layers)):
        absent = [str(i) for i in range(cfg.n_layers) if i not in layers]
        raise ValueError(f"checkpoint {name_or_path}: its config has {_field(cfg, 'n_layers')}={cfg.n_layers}, but the "
                         f"checkpoint holds weights for {len(layers)} layers (none for layers {_some(absent)})")
    heads = [key for key, found in placements.items() if any(p.target == "lm_head" for p in found)]
    embeddings = [key for key, found in placements.items() if any(p.target == "W_E" for p in found)]
    if cfg.tie_word_embeddings and heads:
        if embeddings and not torch.equal(checkpoint.read(heads[0]), checkpoint.read(embeddings[0])):
            # transformers keeps both weights when they differ (with a warning), so the head is separate
            warnings.warn(f"{name_or_path}: config.json sets tie_word_embeddings, but the checkpoint's lm_head.weight "
                          "differs from its embedding; using the separate head, as transformers does")
            cfg.tie_word_embeddings = False
        else:
            placements.update({key: [] for key in heads})
    # parameters on the meta device (nothing allocated, whatever the sizes); buffers (the rotary frequencies,
    # at most a weight's dimension by _check_sizes) are built for real, on the CPU as the in-memory path builds them
    with init_empty_weights(include_buffers=False):
        model = cls(cfg, tokenizer).eval()  # loaded to be studied, as transformers' from_pretrained gives it
    _check_placements(model, checkpoint, placements, name_or_path)
    return folder, cfg, tokenizer, checkpoint, placements, model


def _tokenizer(folder: Path, kwargs: dict, name_or_path):
    """The checkpoint's tokenizer, or None with a warning where transformers cannot load it: the weights are what the
    model needs, and one whose tokenizer is custom code (RWKV-7's "world" tokenizer, which transformers runs only with
    ``trust_remote_code``, never run here) still works on token ids."""
    try:
        # trust_remote_code=False: left unset, transformers asks on a terminal whether to run the folder's code
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except (ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"{name_or_path}: its tokenizer could not be loaded ({first}); the model is loaded without one: "
                      "pass token ids, or set model.tokenizer", stacklevel=5)
        return None


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def read_config(folder: Path):
    """The checkpoint's config: transformers' (AutoConfig), or, for a family transformers does not register
    (RWKV-7), the family's own reading of config.json (`hooked_gdn.architectures.Architecture.read_config`)."""
    path = folder / "config.json"
    try:
        given = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON config ({error})") from None
    family = ARCHITECTURES.get(given.get("model_type")) if isinstance(given, dict) else None
    if isinstance(given, dict) and given.get("model_type") in NOT_SUPPORTED:  # before transformers' own (multi-line) refusal
        architecture_for(SimpleNamespace(model_type=given["model_type"]))
    if family is not None and family.read_config is not None:
        return family.read_config(given)
    try:
        return AutoConfig.from_pretrained(folder)
    except StrictDataclassError as error:  # transformers' field types, e.g. vocab_size: 1e10
        raise ValueError(f"{path}: {' '.join(str(error).split())}") from None


def _is_float(dtype: str) -> bool:
    """Whether a safetensors dtype name ("F32", "BF16", "F8_E4M3", "I32", "BOOL", …) is a floating-point one."""
    return dtype.startswith("F") or dtype == "BF16"


def _field(cfg: HookedModelConfig, field: str) -> str:
    """A size field, with the transformers config's name for it where the family gives one."""
    theirs = BY_KEY[cfg.architecture].config_names.get(field)
    return f"{field} ({theirs})" if theirs else field


def _check_sizes(cfg: HookedModelConfig, checkpoint: SafetensorsCheckpoint, name_or_path) -> None:
    """The bound on a config's sizes, before anything is computed from them: each at most the largest
    dimension of any tensor in the checkpoint (``n_layers`` is checked against the layers it holds)."""
    largest = max((d for shape in checkpoint.shapes.values() for d in shape), default=0)
    too_large = [f"{_field(cfg, field)}={value}" for field, value in cfg.sizes().items()
                 if field != "n_layers" and value > largest]
    if too_large:
        raise ValueError(f"checkpoint {name_or_path}: config sizes larger than any dimension of its tensors "
                         f"(the largest is {largest}): {_some(too_large)}")


def _check_placements(model: nn.Module, checkpoint: SafetensorsCheckpoint, placements: dict, name_or_path) -> None:
    """Every parameter and persistent buffer of ``model`` filled exactly once, each from a tensor of the right shape."""
    ours = model.state_dict()
    filled = dict.fromkeys(ours, 0)
    for key, found in placements.items():
        for p in found:
            if p.target not in ours:
                raise ValueError(f"checkpoint {name_or_path}: tensor {key!r} goes to {p.target!r}, which this model lacks")
            theirs, part = torch.empty(checkpoint.shapes[key], device="meta")[p.source], ours[p.target][p.index]
            if theirs.shape != part.shape:
                raise ValueError(f"checkpoint {name_or_path}: tensor {key!r} gives {p.target} a part of shape "
                                 f"{tuple(theirs.shape)}, where the config needs {tuple(part.shape)}")
            filled[p.target] += part.numel()
    missing = [name for name, tensor in ours.items() if filled[name] < tensor.numel()]
    if missing:
        raise ValueError(f"checkpoint {name_or_path} lacks weights for {_some(missing)}")
    twice = [name for name, tensor in ours.items() if filled[name] > tensor.numel()]
    if twice:
        raise ValueError(f"checkpoint {name_or_path} gives weights more than once for {_some(twice)}")


def _device_of(name: str, plan: dict[str, str], default: str) -> str:
    owners = [key for key in plan if name == key or name.startswith(f"{key}.")]
    return plan[max(owners, key=len)] if owners else default


def load_pretrained(cls, name_or_path, device=None, dtype=None, device_map=None, max_memory=None):
    """Build the model on the meta device, then stream the checkpoint into it one tensor at a time,
    each straight into ``dtype`` on its device: the peak is the model plus about one map window
    (`SafetensorsCheckpoint.stream`), not twice the model. With ``device_map``, the blocks go
    where `hooked_gdn.placement` plans and accelerate's hooks move activations between devices."""
    if device is not None and device_map is not None:
        raise ValueError("give device or device_map, not both")
    if max_memory is not None and device_map is None:
        raise ValueError("max_memory goes with device_map='auto'")
    if str(name_or_path).endswith(".pth"):  # a BlinkDL state dict (RWKV-7 only)
        if device_map is not None:
            raise ValueError("a .pth state dict loads onto one device: give device, not device_map")
        from .architectures.rwkv7 import load_blinkdl

        return load_blinkdl(cls, Path(name_or_path), device=device, dtype=dtype)
    _, _, _, checkpoint, placements, model = _open(cls, name_or_path)  # parameters on the meta device
    dtype = dtype or torch.float32
    plan = {} if device_map is None else plan_device_map(model, device_map, max_memory, dtype)
    check_available(plan)
    default = str(torch.device(device or "cpu")) if device_map is None else main_device(model, plan)
    with torch.no_grad():
        for key, tensor in checkpoint.stream():
            if placements[key]:
                _check_finite(key, tensor, name_or_path)
            for p in placements[key]:
                target_device = _device_of(p.target, plan, default)
                part = p.take(tensor).to(target_device, dtype, copy=True)  # a copy: the mapped bytes are let go
                if isinstance(p.index, tuple) and not p.index:  # the whole weight
                    set_module_tensor_to_device(model, p.target, target_device, value=part, dtype=dtype, clear_cache=False)
                    continue
                # one part of a weight that several checkpoint tensors fill (fused projections, experts one by one)
                if model.get_parameter(p.target).is_meta:
                    empty = torch.empty(model.get_parameter(p.target).shape, dtype=dtype, device=target_device)
                    set_module_tensor_to_device(model, p.target, target_device, value=empty, dtype=dtype, clear_cache=False)
                model.get_parameter(p.target)[p.index] = part
            del tensor
        for name, buffer in model.named_buffers():
            set_module_tensor_to_device(model, name, _device_of(name, plan, default), value=buffer, dtype=dtype, clear_cache=False)
    model.cfg.dtype = dtype
    return model if device_map is None else dispatch(model, plan)


def load_pretrained_in_memory(cls, name_or_path, device=None, dtype=None):
    """The plain path that `load_pretrained` is tested and benchmarked against: every tensor read
    into memory, then copied into a materialised model (about twice the weights at its peak)."""
    folder, cfg, tokenizer, *_ = _open(cls, name_or_path)
    dtype = dtype or torch.float32
    model = cls(cfg, tokenizer).eval()  # loaded to be studied, as transformers' from_pretrained gives it
    state = hf_to_hooked_state_dict(read_safetensors(folder), cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model.cfg.dtype = dtype
    return model.to(device=device, dtype=dtype)
