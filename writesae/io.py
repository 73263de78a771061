"""SAEs on disk: a folder with ``cfg.json`` (every `SAEConfig` field plus ``writesae_version`` and
the weights file's SHA-256; the fields in `OPTIONAL_KEYS`, added later, may be absent) and
``sae_weights.safetensors`` (parameters and buffers, e.g. the BatchTopK threshold). No pickle.

Saving writes a temporary folder beside the target, fsyncs it and renames it into place, so a
reader never sees a half-written SAE, and files get the permissions the umask allows. Loading
refuses anything it would otherwise have to guess at: a cfg.json that is not a JSON object (or is
not a regular file of sane size), weights whose checksum, names, shapes or kinds (floating or
integer) differ from what the cfg says, and non-finite values.

SAELens' folder format (``save_sae(sae, path, format="saelens")``; `load_sae` reads either format,
telling them apart by the cfg's keys) holds the same two file names with SAELens' schema (its
``SAEConfig.to_dict``, version 6): ``cfg.json`` with ``architecture``, ``d_in``, ``d_sae``,
``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``reshape_activations``, ``metadata`` (``hook_name`` …) and, for "topk", ``k`` and
``rescale_acts_by_decoder_norm``; ``sae_weights.safetensors`` with ``W_enc`` [d_in, d_sae],
``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in] and, for "jumprelu", ``threshold``
[d_sae]. Such an SAE encodes x ∈ R^d_in as σ((x − b_dec) W_enc + b_enc) and decodes f as
f W_dec + b_dec. One dictionary of ours maps onto it with d_in = d_k·d_v, X flattened row-major
(x[i·d_v + j] = X[i, j], torch's ``flatten``):

| ours (one head)                               | SAELens                                          |
|-----------------------------------------------|--------------------------------------------------|
| encoder rows: W_enc,i, or vec(Σ_r U_ir P_irᵀ) | ``W_enc`` = their transpose, [d_in, d_sae]       |
| vec(atom_i): W_dec,i, or vec(Σ_r V_ir W_irᵀ)  | rows of ``W_dec``                                |
| b_enc; vec(b_dec)                             | ``b_enc``; ``b_dec`` (apply_b_dec_to_input true) |
| sparsity "topk", k                            | "topk", ``k``, rescale_acts_by_decoder_norm false |
| "relu"                                        | "standard"                                       |
| "jumprelu", θ = exp(log_threshold)            | "jumprelu", ``threshold`` = θ                    |
| "batchtopk" in eval mode, threshold t         | "jumprelu", θ = the float just below t (z > θ ⟺ z ≥ t), or "standard" when t = 0 |
| site; the head; model_name                    | metadata ``hook_name``; ``hook_head_index``; ``model_name`` |
| input_scale s                                 | folded: W_enc·s, W_dec/s, b_dec/s                |

What is exact, for each architecture and head layout:

- Every architecture, one dictionary. The decoder is exact because SAELens' decoder is linear in the
  codes, f W_dec = Σ_i f_i vec(atom_i), whatever an atom's inner form: a MatrixSAE's rank-r Σ_r V_ir W_irᵀ or
  a bilinear u wᵀ, formed as our forward forms it, is one row. The encoder is exact because every encoder
  of ours is linear in X before the sparsity rule: the bilinear z_i = Σ_r U_irᵀ (X − b_dec) P_ir + b_enc,i
  = ⟨Σ_r U_ir P_irᵀ, X − b_dec⟩_F + b_enc,i is a dense row (tied: U = V, P = W). What no dense row holds
  (a nonlinear encoder, an attention-style read) does not exist among our SAEs.
- Several heads' dictionaries (n_dicts > 1). ``head=h`` exports head h's one dictionary (its own
  thresholds), exactly. Without it, one SAELens SAE over the site's heads flattened together
  (x = vec of [H, d_k, d_v], as SAELens flattens a hook with a head axis and no ``hook_head_index``),
  each head's dictionary a diagonal block of ``W_enc`` and ``W_dec`` (d_in = H·d_k·d_v, d_sae = H·n),
  is exact for per-feature rules (ReLU, JumpReLU thresholds, BatchTopK's eval thresholds) when the SAE
  has a dictionary for every head of its site, in order; its numbers differ from ours only in the
  summation order of the zero blocks. Refused, saying why: top-k (SAELens keeps the k largest of all
  H·n codes together, ours k per head: other codes), and dictionaries of only some heads (SAELens
  would reconstruct the other heads as b_dec). ``load_sae`` splits such a folder back into the
  per-head FlatSAE (metadata.writesae.heads), refusing weights that are not block-diagonal.

``metadata["writesae"]`` keeps what SAELens has no field for (d_k, d_v, the site's head count, the
heads, the model fingerprint, the original architecture and sparsity) and the weights' SHA-256, so
that our SAE comes back as the FlatSAE it exported.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor

from . import __version__
from .sae import ARCHITECTURES, BilinearMatrixSAE, FlatSAE, SAEConfig, SAEBase, _factor_atoms
from .sparsity import BatchTopK

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
VERSION_KEY = "writesae_version"
CHECKSUM_KEY = "weights_sha256"
#: SAEConfig fields added after SAEs were first saved: a cfg.json without one gets the field's default
#: (model_fingerprint: None, an SAE that does not know the weights it was trained on)
OPTIONAL_KEYS = frozenset({"model_fingerprint"})
MAX_CFG_BYTES = 1 << 20  # a cfg.json is a few hundred bytes; a limit keeps a link to /dev/zero from hanging
#: SAEs shipped with the package, by name "MODEL/SITE" (e.g. "gdn-austen/L5-state"), each a folder here
PRETRAINED_SAES_DIR = Path(__file__).parent / "pretrained"
#: the folder formats `save_sae` writes and `load_sae` reads (module docstring)
FORMATS = ("writesae", "saelens")
#: SAELens' architecture for each of our sparsity rules (BatchTopK: the eval-mode threshold, see `save_sae`)
SAELENS_ARCHITECTURE = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
#: the SAELens version whose cfg.json layout we write, as SAELens reads it from metadata["sae_lens_version"]
#: (an older or absent one makes SAELens convert the cfg from its pre-6.0 layout)
SAELENS_SCHEMA_VERSION = "6.0.0"


def pretrained_saes() -> list[str]:
    """The names of the shipped SAEs."""
    return sorted(str(cfg.parent.relative_to(PRETRAINED_SAES_DIR)) for cfg in PRETRAINED_SAES_DIR.glob(f"*/*/{CFG_FILE}"))


def resolve_sae(name_or_path: str | Path) -> Path:
    """The folder of a shipped SAE's name, or ``name_or_path`` itself. A shipped name that is also a
    different folder here is ambiguous, and refused rather than guessed."""
    path = Path(name_or_path)
    shipped = PRETRAINED_SAES_DIR / str(name_or_path)
    if str(name_or_path) in pretrained_saes():
        if path.exists() and path.resolve() != shipped.resolve():
            raise ValueError(f"{str(name_or_path)!r} names both a shipped SAE and {path.resolve()}: pass "
                             f"'./{name_or_path}' for the local one, or {shipped} for the shipped one")
        return shipped
    if not path.exists():
        raise FileNotFoundError(f"{name_or_path} is neither an SAE folder nor a shipped SAE "
                                f"(shipped: {', '.join(pretrained_saes()) or 'none'})")
    return path


def save_sae(sae: SAEBase, path: str | Path, format: str = "writesae", head: int | None = None) -> None:
    """Write ``sae`` to the folder ``path``, replacing an SAE folder already there (and only that).

    ``format="saelens"`` writes the folder SAELens' ``SAE.load_from_disk`` reads (module docstring),
    for an SAE of one dictionary, in eval-mode semantics (a BatchTopK SAE exports its calibrated
    threshold). With input_scale 1 the SAELens SAE computes our reconstruction from the same
    numbers (the bilinear encoder and factored atoms are formed as our own forward forms them),
    so they agree but for the kernels' summation order; a scale s ≠ 1 is folded in (W_enc·s,
    W_dec/s, b_dec/s), which rounds each weight once more. An SAE of several heads' dictionaries
    exports model head ``head``'s (exactly as an SAE of that head alone would; one folder per head), or
    without ``head`` all of them as one block-diagonal SAELens SAE where that is exact (module
    docstring). Refused, saying why: several dictionaries where no one SAELens SAE computes them
    (top-k, or dictionaries of only some heads), and a BatchTopK SAE in training mode (its codes
    depend on the batch).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {list(FORMATS)}")
    if head is not None and format != "saelens":
        raise ValueError("head picks the dictionary an SAELens folder holds; a writesae folder holds them all")
    path = Path(path)
    if path.exists() and not _is_sae_folder(path):
        raise FileExistsError(f"{path} exists and is not an SAE folder (only {CFG_FILE} and {WEIGHTS_FILE}); not replacing it")
    if format == "saelens":
        tensors, cfg = saelens_tensors_and_cfg(sae, head)
    else:
        tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
        cfg = {**asdict(sae.cfg), VERSION_KEY: __version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(path) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={VERSION_KEY: __version__})
        checksum = hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest()
        (cfg["metadata"]["writesae"] if format == "saelens" else cfg)[CHECKSUM_KEY] = checksum
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


@torch.no_grad()
def saelens_tensors_and_cfg(sae: SAEBase, head: int | None = None) -> tuple[dict[str, Tensor], dict]:
    """The tensors and cfg.json of ``sae`` as an SAELens SAE (see `save_sae`; module docstring): model head
    ``head``'s dictionary, or (None) every dictionary, block-diagonal over the site's heads flattened together."""
    cfg = sae.cfg
    if head is None and sae.n_dicts != 1:
        _require_whole_site(sae)
    dicts = list(range(sae.n_dicts)) if head is None else [cfg.dictionary(head)]
    if isinstance(sae.activation, BatchTopK) and sae.training:
        raise ValueError("a BatchTopK SAE in training mode keeps the k·B largest codes of its batch, which no SAELens "
                         "SAE computes; its eval mode is a threshold SAELens' jumprelu has: call sae.eval() first")
    n = cfg.n_features
    # the encoder as our forward forms it: the dense W_enc, or the bilinear Σ_r U_ir P_irᵀ; rows flattened row-major
    encoder = _factor_atoms(*sae.encoder_factors) if isinstance(sae, BilinearMatrixSAE) else sae.W_enc
    atoms = sae.atoms()
    # one dictionary's block per head: feature i of head h reads and writes only head h's d_k·d_v entries
    W_enc = torch.block_diag(*(encoder[d].reshape(n, -1).T for d in dicts))
    W_dec = torch.block_diag(*(atoms[d].reshape(n, -1) for d in dicts))
    b_dec = sae.b_dec[dicts].flatten()
    s = cfg.input_scale
    if s != 1:  # folded as fold_input_scale_ folds it; with s = 1 the numbers stay ours, untouched
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
    tensors = {"W_enc": W_enc, "b_enc": sae.b_enc[dicts].flatten(), "W_dec": W_dec, "b_dec": b_dec}
    architecture, extra = SAELENS_ARCHITECTURE[cfg.sparsity], {}
    if cfg.sparsity == "topk":
        extra = {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    elif cfg.sparsity == "jumprelu":
        tensors["threshold"] = sae.activation.log_threshold[dicts].exp().flatten()  # as our forward computes θ
    elif cfg.sparsity == "batchtopk":
        # ours keeps ReLU(z)·[z ≥ t], SAELens' jumprelu ReLU(z)·[z > relu(θ)]: equal for θ the float
        # just below t > 0; t = 0 keeps every positive code, which is plain ReLU (and θ = 0 in a jumprelu)
        threshold = sae.activation.threshold[dicts]
        if (threshold > 0).any():
            below = torch.nextafter(threshold, threshold.new_tensor(-math.inf))
            tensors["threshold"] = torch.where(threshold > 0, below, 0).repeat_interleave(n)
        else:
            architecture = "standard"
    heads = [cfg.head_indices[d] for d in dicts]
    metadata = {"sae_lens_version": SAELENS_SCHEMA_VERSION, "hook_name": cfg.site,
                "hook_head_index": heads[0] if len(heads) == 1 else None, "model_name": cfg.model_name,
                "writesae": {VERSION_KEY: __version__, "architecture": cfg.architecture, "sparsity": cfg.sparsity,
                             "d_k": cfg.d_k, "d_v": cfg.d_v, "n_heads": cfg.n_heads, "heads": heads,
                             "model_fingerprint": cfg.model_fingerprint}}
    saelens_cfg = {"architecture": architecture, "d_in": len(heads) * cfg.d_k * cfg.d_v, "d_sae": len(heads) * n,
                   "dtype": cfg.dtype, "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                   "reshape_activations": "none", "metadata": metadata, **extra}
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}, saelens_cfg


def _require_whole_site(sae: SAEBase) -> None:
    """Refuse, saying why, an SAE of several dictionaries that no one SAELens SAE computes: SAELens flattens a
    site's heads together ([H·d_k·d_v]) and keeps one set of codes, which is exact for per-feature rules (ReLU,
    thresholds) on dictionaries of every head, in order, but not for top-k (SAELens' keeps the k largest codes
    of all heads together, ours k per head) nor for dictionaries of some heads only."""
    cfg, several = sae.cfg, f"this {type(sae).__name__} has {sae.n_dicts} dictionaries (heads {sae.cfg.head_indices})"
    per_head = "pass head=h to export one head's dictionary, exactly (one folder per head)"
    if cfg.sparsity == "topk":
        raise ValueError(f"an SAELens SAE of several heads keeps the k largest codes of all of them together, and "
                         f"{several}, each keeping its own k: not the same codes; {per_head}")
    if cfg.head_indices != list(range(cfg.n_heads or 0)):
        raise ValueError(f"an SAELens SAE reads every head of its site flattened together (hook_head_index None), and "
                         f"{several} of the site's {cfg.n_heads}: it would decode the others as b_dec; {per_head}")


@contextmanager
def atomic_folder(path: Path):
    """Yield a temporary folder beside ``path``; if the block succeeds, swap it in for ``path``.

    Before the renames the new tree gets the umask's permissions (a temporary folder is made 0700)
    and is fsynced, files and folders, so a renamed folder is complete even after a crash. A
    process killed between the two renames of a swap leaves no ``path``, the new folder as
    ``.{name}.new.*`` and the old one inside ``.{name}.old.*``: `recover_folder` puts the newest
    back.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new.", dir=path.parent))
    try:
        yield tmp
        _settle(tmp)
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            _fsync(path.parent)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
            _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def leftovers(path: Path) -> list[Path]:
    """The copies of ``path`` that an `atomic_folder` swap killed part-way left beside it."""
    return sorted(path.parent.glob(f".{path.name}.new.*")) + sorted(path.parent.glob(f".{path.name}.old.*"))


def recover_folder(path: Path, version: Callable[[Path], int | None]) -> Path | None:
    """Undo a swap killed part-way: put the newest complete copy of ``path`` in place, remove the rest.

    ``version(folder)`` ranks a complete folder (higher is newer) and is None for an incomplete one.
    Returns the leftover that replaced ``path``, or None when ``path`` was already the newest.
    """
    new = f".{path.name}.new."
    copies = [left if left.name.startswith(new) else left / path.name for left in leftovers(path)]
    ranked = [(v, c == path, c) for c in [path, *copies] if c.is_dir() and (v := version(c)) is not None]
    newest = max(ranked, key=lambda r: r[:2], default=(None, True, path))[2]
    if newest != path:
        with atomic_folder(path) as tmp:
            os.rmdir(tmp)
            os.replace(newest, tmp)
    for left in leftovers(path):
        shutil.rmtree(left)
    return None if newest == path else newest


def _settle(tree: Path) -> None:
    """Give ``tree`` the permissions the umask allows, and fsync every file and folder in it."""
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    for folder, _, files in os.walk(tree, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
            _fsync(os.path.join(folder, name))
        os.chmod(folder, 0o777 & ~umask)
        _fsync(folder)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_sae(path: str | Path, device: torch.device | str | None = None) -> SAEBase:
    """The SAE saved in the folder ``path`` (or shipped under that name, see `pretrained_saes`), of the
    class its cfg names, on ``device`` (default CPU). A folder in SAELens' format loads as a `FlatSAE`
    (see `load_saelens`)."""
    path = resolve_sae(path)
    if path.is_dir() and not os.path.lexists(path / CFG_FILE):
        raise FileNotFoundError(f"{path} is not an SAE folder: it has no {CFG_FILE}; an SAE folder, in writesae's or "
                                f"SAELens' format, holds {CFG_FILE} and {WEIGHTS_FILE} (this one holds "
                                f"{sorted(p.name for p in path.iterdir()) or 'nothing'})")
    raw = _read_json_object(path / CFG_FILE)
    if _is_saelens_cfg(raw):
        return load_saelens(path, raw, device)
    cfg, checksum = _read_cfg(path / CFG_FILE, raw)
    with torch.device("meta"):  # shapes only: the weights come from the file
        sae = ARCHITECTURES[cfg.architecture](cfg)
    expected = sae.state_dict()
    tensors = _read_weights(path, checksum, expected, _describe(cfg))
    # copies in fresh storage: the file's buffers may be unaligned, which changes how kernels sum
    # and so the last bits of every output
    sae.load_state_dict({name: tensors[name].to(device or "cpu", t.dtype, copy=True) for name, t in expected.items()},
                        assign=True)
    return sae


#: our sparsity rule for each SAELens architecture a FlatSAE computes
SPARSITY_OF_SAELENS = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}


def load_saelens(path: Path, raw: dict, device: torch.device | str | None = None) -> FlatSAE:
    """The SAELens SAE in the folder ``path``, whose cfg.json holds ``raw``, as a FlatSAE of one
    dictionary: W_enc,i = column i of SAELens' ``W_enc``, W_dec,i = row i of ``W_dec``, b_dec =
    ``b_dec`` as a d_k × d_v matrix (row-major), θ = ``threshold`` through log θ (module docstring).

    d_k × d_v is what ``metadata["writesae"]`` records (an SAE we exported), else 1 × d_in: a vector
    SAE reads X = xᵀ. The site is ``metadata["hook_name"]`` (or a pre-6.0 cfg's top-level one), the
    head ``hook_head_index`` (else 0). A folder of several heads' dictionaries, exported block-diagonal
    by `save_sae` (``metadata["writesae"]["heads"]``), loads as one FlatSAE of those heads. Tensors are
    cast to the cfg's dtype, as SAELens' loader casts them. Refused, saying why, where no FlatSAE
    computes the same function: another architecture, activation normalisation, a topk SAE that
    rescales codes by decoder norms that are not all 1, apply_b_dec_to_input false with b_dec ≠ 0
    (our encoder always subtracts b_dec), a jumprelu threshold ≤ 0 (ours is exp(log θ) > 0), and
    several heads' weights that are not block-diagonal. A jumprelu θ comes back as exp(log θ), which
    can differ from θ in the last bit: then only a pre-activation that close to θ gates differently.
    """
    file = path / CFG_FILE
    architecture = raw.get("architecture", "standard")  # SAELens' default for a cfg without one
    if architecture not in SPARSITY_OF_SAELENS:
        raise ValueError(f"{file}: SAELens architecture {architecture!r} has no FlatSAE that computes it; loadable: "
                         f"{', '.join(SPARSITY_OF_SAELENS)}")
    activation_fn = raw.get("activation_fn", raw.get("activation_fn_str", "relu"))
    refusals = []
    if architecture == "standard" and activation_fn != "relu":
        refusals.append(f"activation_fn {activation_fn!r} (a pre-6.0 cfg): a FlatSAE of sparsity relu computes ReLU")
    if raw.get("normalize_activations") not in (None, "none"):
        refusals.append(f"normalize_activations {raw['normalize_activations']!r} rescales inputs by a norm or factor "
                        "a FlatSAE does not hold: fold it into the weights in SAELens first")
    if raw.get("reshape_activations", "none") not in ("none", "hook_z"):
        refusals.append(f"reshape_activations {raw['reshape_activations']!r} is not one SAELens documents")
    d_in, d_sae = raw["d_in"], raw["d_sae"]
    for name, value in (("d_in", d_in), ("d_sae", d_sae)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            refusals.append(f"{name} must be a positive int, got {value!r}")
    if refusals:
        raise ValueError(f"{file}: cannot load this SAELens SAE as a FlatSAE: " + "; ".join(refusals))
    metadata = raw["metadata"] if isinstance(raw.get("metadata"), dict) else raw  # pre-6.0: settings at the top level
    ours = metadata.get("writesae") if isinstance(metadata.get("writesae"), dict) else {}
    head = metadata.get("hook_head_index")
    # several heads' dictionaries exported block-diagonal (save_sae), else the one head SAELens names
    heads = ours.get("heads") if isinstance(ours.get("heads"), list) and len(ours["heads"]) > 1 else \
        head if isinstance(head, int) else 0
    n_dicts = len(heads) if isinstance(heads, list) else 1
    if d_sae % n_dicts:
        raise ValueError(f"{file}: d_sae = {d_sae} is not {n_dicts} dictionaries (metadata.writesae's heads {heads}) "
                         f"of one size")
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    settings = {"k": k} if architecture == "topk" else {}
    try:
        cfg = SAEConfig(architecture="flat", d_k=ours.get("d_k", 1), d_v=ours.get("d_v", d_in), n_features=d_sae // n_dicts,
                        sparsity=SPARSITY_OF_SAELENS[architecture], site=metadata.get("hook_name", metadata.get("hook_point")),
                        heads=heads, n_heads=ours.get("n_heads"),
                        model_name=metadata.get("model_name"), dtype=str(raw.get("dtype", "float32")).removeprefix("torch."),
                        model_fingerprint=ours.get("model_fingerprint"), **settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: {error}") from error
    if n_dicts * cfg.d_k * cfg.d_v != d_in:
        raise ValueError(f"{file}: metadata.writesae's {n_dicts} heads × d_k × d_v = {n_dicts} × {cfg.d_k} × {cfg.d_v} "
                         f"is not d_in = {d_in}")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    expected = {name: torch.empty(shape, dtype=cfg.torch_dtype, device="meta") for name, shape in shapes.items()}
    tensors = _read_weights(path, ours.get(CHECKSUM_KEY), expected, f"SAELens {architecture}, d_in={d_in}, d_sae={d_sae}")
    tensors = {name: t.to(cfg.torch_dtype) for name, t in tensors.items()}
    if not raw.get("apply_b_dec_to_input", True) and tensors["b_dec"].any():
        refusals.append("apply_b_dec_to_input is false and b_dec is not 0: SAELens encodes x, a FlatSAE x − b_dec, "
                        "and moving b_dec W_enc into b_enc would round differently")
    if raw.get("rescale_acts_by_decoder_norm") and not (tensors["W_dec"].norm(dim=-1) == 1).all():
        refusals.append("rescale_acts_by_decoder_norm is true and some decoder rows are not of norm 1: SAELens picks "
                        "the top k of z·‖W_dec,i‖, a FlatSAE of z; SAELens' fold_W_dec_norm() makes them 1")
    if architecture == "jumprelu" and not (tensors["threshold"] > 0).all():
        refusals.append("a jumprelu threshold is <= 0 (SAELens then gates at 0), and a FlatSAE's threshold is "
                        "exp(log θ) > 0")
    W_enc, W_dec = (_diagonal_blocks(w, n_dicts) for w in (tensors["W_enc"].T, tensors["W_dec"]))
    if W_enc is None or W_dec is None:
        refusals.append(f"W_enc or W_dec is not block-diagonal over the {n_dicts} heads {heads}: some feature reads or "
                        "writes another head's entries, which no per-head dictionary does")
    if refusals:
        raise ValueError(f"{file}: cannot load this SAELens SAE as a FlatSAE: " + "; ".join(refusals))
    with torch.device("meta"):
        sae = FlatSAE(cfg)
    state = {"W_enc": W_enc, "b_enc": tensors["b_enc"].reshape(n_dicts, -1), "W_dec": W_dec,
             "b_dec": tensors["b_dec"].reshape(n_dicts, cfg.d_k, cfg.d_v)}
    if architecture == "jumprelu":
        state["activation.log_threshold"] = tensors["threshold"].log().reshape(n_dicts, -1)
    # copies in fresh storage, contiguous in our layout (as `load_sae` explains)
    sae.load_state_dict({name: t.to(device or "cpu", copy=True).contiguous() for name, t in state.items()}, assign=True)
    return sae


def _diagonal_blocks(matrix: Tensor, n_dicts: int) -> Tensor | None:
    """The diagonal blocks [n_dicts, n, d] of a block-diagonal [n_dicts·n, n_dicts·d] matrix (rows: features,
    columns: input entries), or None if an entry off the diagonal blocks is not 0."""
    rows, columns = matrix.shape
    blocks = matrix.reshape(n_dicts, rows // n_dicts, n_dicts, columns // n_dicts)
    diagonal = torch.eye(n_dicts, dtype=torch.bool)[:, None, :, None].expand_as(blocks)
    if blocks[~diagonal].any():
        return None
    return torch.stack([blocks[h, :, h] for h in range(n_dicts)])


def _read_weights(path: Path, checksum: str | None, expected: dict[str, Tensor], described: str) -> dict[str, Tensor]:
    """The tensors of ``path``'s weights file, checked against ``checksum`` (if not None) and against
    ``expected``'s names, shapes and kinds (floating or integer), and checked to be finite."""
    file = path / WEIGHTS_FILE
    data = _read_regular_file(file)
    if checksum is not None and hashlib.sha256(data).hexdigest() != checksum:
        raise ValueError(f"{file}: its SHA-256 differs from the one {path / CFG_FILE} recorded at saving: the file is corrupted")
    try:
        tensors = load_safetensors(data)
    except SafetensorError as error:
        raise ValueError(f"{file} is not a readable safetensors file: {error}") from error
    problems = [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    problems += [f"{name} has shape {list(tensors[name].shape)}, expected {list(t.shape)}"
                 for name, t in expected.items() if name in tensors and tensors[name].shape != t.shape]
    problems += [f"{name} has dtype {tensors[name].dtype}, expected {t.dtype}" for name, t in expected.items()
                 if name in tensors and tensors[name].dtype.is_floating_point != t.dtype.is_floating_point]
    if problems:
        raise ValueError(f"{file} does not match {path / CFG_FILE} ({described}): " + "; ".join(problems))
    non_finite = [name for name, t in tensors.items() if t.dtype.is_floating_point and not torch.isfinite(t).all()]
    if non_finite:
        raise ValueError(f"{file} holds non-finite values (NaN or Inf) in {', '.join(non_finite)}")
    return tensors


def _read_regular_file(file: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of ``file``, which must be a regular file (of at most ``max_bytes``)."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing or is not a regular file")
    with file.open("rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{file} is larger than {max_bytes} bytes: not an SAE config")
    return data


def _read_json_object(file: Path) -> dict:
    """The JSON object in the cfg file ``file``."""
    try:
        raw = json.loads(_read_regular_file(file, MAX_CFG_BYTES))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object of SAE settings, got {type(raw).__name__} {str(raw)[:40]}")
    return raw


def _is_saelens_cfg(raw: dict) -> bool:
    return {"d_in", "d_sae"} <= raw.keys() and "d_k" not in raw


def _read_cfg(file: Path, raw: dict) -> tuple[SAEConfig, str | None]:
    """The config ``raw`` read from ``file`` and the weights checksum it records (None in folders saved
    without one)."""
    raw = dict(raw)
    raw.pop(VERSION_KEY, None)
    checksum = raw.pop(CHECKSUM_KEY, None)
    known = {f.name for f in fields(SAEConfig)}
    if not raw.keys() & known:
        raise ValueError(f"{file} is neither writesae's SAE config (keys {sorted(known - OPTIONAL_KEYS)}) nor "
                         f"SAELens' (keys d_in, d_sae, architecture, ...); it has keys {sorted(raw)[:10]}")
    if known - OPTIONAL_KEYS - raw.keys():
        raise ValueError(f"{file}: missing keys {sorted(known - OPTIONAL_KEYS - raw.keys())}")
    if raw.keys() - known:
        raise ValueError(f"{file}: unknown keys {sorted(raw.keys() - known)}")
    try:
        return SAEConfig(**raw), checksum
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: {error}") from error


def _is_sae_folder(path: Path) -> bool:
    return path.is_dir() and {p.name for p in path.iterdir()} <= {CFG_FILE, WEIGHTS_FILE}


def _describe(cfg: SAEConfig) -> str:
    return (f"architecture={cfg.architecture}, n_dicts={len(cfg.head_indices)}, d_k={cfg.d_k}, d_v={cfg.d_v}, "
            f"n_features={cfg.n_features}, rank={cfg.rank}, tied={cfg.tied}, sparsity={cfg.sparsity}")
