"""The model and text we ship, so that everything runs on real weights offline.

``gdn-austen`` is a small Qwen3.5-architecture hybrid (GDN : attention = 3 : 1) trained on Jane
Austen's six novels by ``scripts/train_pretrained.py``; its model card is ``gdn-austen/README.md``.
The novels ship gzipped in ``austen/`` with their SOURCE note.

Documents are chapters. The held-out split is fixed and named: Persuasion, chapters 21–24. Every
other chapter (including each novel's front matter, before its first chapter) is training text.
`austen_corpus` gives both, as a corpus and the names of its held-out documents, which is what
`writesae.store.ActivationStore` takes.
"""

from __future__ import annotations

import gzip
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

PRETRAINED_DIR = Path(__file__).parent
CORPUS_DIR = PRETRAINED_DIR / "austen"

#: Short names accepted by ``from_pretrained``, mapped to folders in this package: ``gdn-austen`` (a Qwen3.5 hybrid)
#: ``mamba2-austen`` (a small Mamba-2, ``scripts/train_mamba2.py``) and ``rwkv7-austen`` (a small RWKV-7,
#: ``scripts/train_rwkv7.py``).
PRETRAINED_MODELS = {"gdn-austen": PRETRAINED_DIR / "gdn-austen", "mamba2-austen": PRETRAINED_DIR / "mamba2-austen",
                     "rwkv7-austen": PRETRAINED_DIR / "rwkv7-austen"}

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
HELDOUT_NOVEL, HELDOUT_FIRST_CHAPTER = "persuasion", 21

#: The held-out evaluation protocol of the model card: the held-out documents joined with EOS,
#: cut into non-overlapping windows of this many tokens, mean next-token cross-entropy.
HELDOUT_CONTEXT = 256

_CHAPTER_HEADING = re.compile(r"^(?:CHAPTER|Chapter) [0-9IVXLC]+\.?\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Document:
    name: str  # "<novel>/<index>", index 0 being the text before the first chapter heading
    text: str


def pretrained_path(name: str) -> Path | None:
    """The folder of a shipped model, or None when ``name`` is not one of ours."""
    return PRETRAINED_MODELS.get(name)


def _read_novel(novel: str) -> str:
    with gzip.open(CORPUS_DIR / f"{novel}.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()


def austen_documents(split: str = "train") -> list[Document]:
    """The novels as chapter documents; ``split`` is "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    docs = []
    for novel in NOVELS:
        text = _read_novel(novel)
        starts = [0] + [m.start() for m in _CHAPTER_HEADING.finditer(text)]
        for index, (lo, hi) in enumerate(zip(starts, starts[1:] + [len(text)])):
            chapter = text[lo:hi].strip()
            if not chapter:
                continue
            heldout = novel == HELDOUT_NOVEL and index >= HELDOUT_FIRST_CHAPTER
            if split == "all" or heldout == (split == "heldout"):
                docs.append(Document(f"{novel}/{index}", chapter))
    return docs


def austen_corpus() -> tuple[list[Document], list[str]]:
    """Every chapter, and the names of the held-out ones (the shipped model never saw them)."""
    return austen_documents("all"), [d.name for d in austen_documents("heldout")]


def heldout_windows(tokenizer, context: int = HELDOUT_CONTEXT) -> torch.Tensor:
    """The held-out documents tokenised, joined with EOS and cut into [n, context] windows."""
    ids: list[int] = []
    for doc in austen_documents("heldout"):
        ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // context
    return torch.tensor(ids[: n * context]).view(n, context)


#: The model card's memory census: the first 2,048 held-out tokens, in windows of 512 tokens.
CENSUS_TOKENS, CENSUS_CONTEXT = 2048, 512
CENSUS_FILE = "census.json"


def heldout_census(model):
    """The memory census of ``model`` on the model card's held-out text (`CENSUS_TOKENS` tokens)."""
    from ..census import memory_census

    text = [doc.text for doc in austen_documents("heldout")]
    return memory_census(model, text, context=CENSUS_CONTEXT, max_tokens=CENSUS_TOKENS)


def default_layer(name: str = "gdn-austen") -> int:
    """The GDN layer the quickstart and the demos study: the one with the most heads of median
    half-life ≥ 16 tokens, by the census shipped beside the model card (``census.json``)."""
    from ..census import MemoryCensus

    return MemoryCensus.load_json(PRETRAINED_MODELS[name] / CENSUS_FILE).long_memory_layer()


@torch.no_grad()
def heldout_loss(model, context: int = HELDOUT_CONTEXT, batch_size: int = 16) -> tuple[float, float]:
    """The model card's held-out figures for windows of ``context`` tokens: mean next-token
    cross-entropy (nats/token) and bits per character of the predicted text."""
    windows = heldout_windows(model.tokenizer, context)
    total = sum(model(batch, "loss", loss_per_token=True).double().sum().item() for batch in windows.split(batch_size))
    targets = windows[:, 1:]
    characters = len(model.tokenizer.decode(targets.flatten().tolist()))
    return total / targets.numel(), total / math.log(2) / characters


#: the family of each shipped model, as the README's table names it
SHIPPED_FAMILIES = {"gdn-austen": "Qwen3.5 (GDN : attention = 3 : 1)", "mamba2-austen": "Mamba-2", "rwkv7-austen": "RWKV-7"}


def shipped_models_table() -> str:
    """The shipped models side by side, from the files beside each (training_stats.json, census.json): the README's
    table, so that its figures are the committed ones."""
    import json

    from ..census import LONG_MEMORY, VERY_LONG_MEMORY, MemoryCensus

    lines = [f"| model | family | parameters | tokens seen in training | held-out bits/char | heads with median half-life "
             f"≥ {LONG_MEMORY} / ≥ {VERY_LONG_MEMORY} tokens | card |", "|---|---|---|---|---|---|---|"]
    for name, folder in PRETRAINED_MODELS.items():
        stats = json.loads((folder / "training_stats.json").read_text())
        census = MemoryCensus.load_json(folder / CENSUS_FILE)
        lines.append(f"| `{name}` | {SHIPPED_FAMILIES[name]} | {stats['parameters'] / 1e6:.2f} M | "
                     f"{stats['train_tokens_seen'] / 1e6:.2f} M | {stats['heldout_bits_per_char']:.4f} | "
                     f"{census.count(LONG_MEMORY)} / {census.count(VERY_LONG_MEMORY)} of {len(census.heads)} | "
                     f"`hooked_gdn/pretrained/{name}/README.md` |")
    return "\n".join(lines) + "\n"
