"""The activation store (writesae.store) on a tiny random model fed token arrays or a tiny tokenizer.

Expected samples are recomputed here by running the model on the recorded contexts, independently
of the store's own extraction.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.pretrained import Document
from hooked_gdn.sites import block_name
from writesae.store import ActivationStore, StoreConfig

from .conftest import random_tiny_model, tiny_hf_config

LAYER = 1
SITE = block_name(LAYER, "linear_attn")


@pytest.fixture(name="model", scope="module")
def model_fixture():
    return random_tiny_model()


def token_documents(n: int = 12, length: int = 30, seed: int = 0) -> list[torch.Tensor]:
    """Document i uses only tokens 1 + 8i .. 8 + 8i (EOS is 0), so a token tells its document."""
    g = torch.Generator().manual_seed(seed)
    return [1 + 8 * i + torch.randint(0, 8, (length,), generator=g) for i in range(n)]


def store(model, docs=None, **kw) -> ActivationStore:
    cfg = dict(layer=LAYER, context=8, positions="all", buffer_size=64, model_batch_size=4, heldout_fraction=0.25) | kw
    return ActivationStore(model, token_documents() if docs is None else docs, StoreConfig(**cfg))


def states_at(model, tokens: torch.Tensor) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=f"{SITE}.hook_state")
    return cache[f"{SITE}.hook_state"]  # [b, p, H, d_k, d_v], every position


def test_state_samples_are_the_models_states_at_their_origins(model):
    s = store(model, heads=[1, 3], positions=3)
    x, origin = s.next_batch(24, with_origin=True)
    tokens = torch.stack([s.context_tokens(c) for c in origin[:, 0].tolist()])
    expected = states_at(model, tokens)[torch.arange(24), origin[:, 1]][:, [1, 3]]
    assert x.shape == (24, 2, model.cfg.d_key, model.cfg.d_value)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-6)


def test_write_samples_are_the_key_times_the_value(model):
    s = store(model, kind="write", heads="all", positions=[0, 5, -1])
    x, origin = s.heldout_batches(16, with_origin=True).__next__()
    tokens = torch.stack([s.context_tokens(c, "heldout") for c in origin[:, 0].tolist()])
    names = [f"{SITE}.hook_write_key", f"{SITE}.hook_write_value"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    rows = torch.arange(len(x))
    k, delta = cache[names[0]][rows, origin[:, 1]], cache[names[1]][rows, origin[:, 1]]
    torch.testing.assert_close(x, torch.einsum("bhk,bhv->bhkv", k, delta), rtol=1e-5, atol=1e-6)
    assert s.cfg.site == f"{SITE}.hook_write_value"


@pytest.mark.parametrize("positions, per_context", [("all", 8), ("final", 1), (3, 3), ([2, -1], 2)])
def test_position_policies(model, positions, per_context):
    s = store(model, positions=positions)
    batches = list(s.heldout_batches(10, with_origin=True))
    assert [len(x) for x, _ in batches[:-1]] == [10] * (len(batches) - 1)  # unshuffled, fixed-size batches
    origin = torch.cat([o for _, o in batches])
    assert len(origin) == s.n_contexts("heldout") * per_context
    by_context = {}
    for c, p in origin.tolist():
        by_context.setdefault(c, []).append(p)
    assert sorted(by_context) == list(range(s.n_contexts("heldout")))
    for ps in by_context.values():
        assert len(set(ps)) == len(ps) == per_context
        if positions == "final":
            assert ps == [7]
        if isinstance(positions, list):
            assert sorted(ps) == [2, 7]
    if positions == 3:
        assert len({tuple(sorted(ps)) for ps in by_context.values()}) > 1  # random per context
    again = torch.cat([o for _, o in s.heldout_batches(10, with_origin=True)])
    assert torch.equal(origin, again)  # the held-out set is fixed
    assert sum(len(x) for x in s.heldout_batches(10, max_samples=13)) == min(13, len(origin))


def document_of(token: int) -> int:
    return (token - 1) // 8


def test_split_is_by_document(model):
    s = store(model, heldout_fraction=0.3)
    n = len(s.document_names)
    assert len(s.heldout_document_ids) == round(0.3 * n)
    assert not set(s.heldout_document_ids) & set(s.train_document_ids)
    assert sorted(s.heldout_document_ids + s.train_document_ids) == list(range(n))
    for split, ids in (("train", s.train_document_ids), ("heldout", s.heldout_document_ids)):
        seen = {document_of(t) for c in range(s.n_contexts(split)) for t in s.context_tokens(c, split).tolist() if t}
        assert seen <= set(ids)
    assert store(model, heldout_fraction=0.3).heldout_document_ids == s.heldout_document_ids  # seeded
    assert len(store(model, heldout_fraction=0.01).heldout_document_ids) == 1  # at least one


def test_explicit_heldout_documents(model):
    s = store(model, token_documents(5), heldout_documents=[3, "1"])  # an index and a name
    assert s.document_names == ["0", "1", "2", "3", "4"]
    assert s.heldout_document_ids == [1, 3] and s.train_document_ids == [0, 2, 4]
    seen = {document_of(t) for c in range(s.n_contexts("heldout")) for t in s.context_tokens(c, "heldout").tolist() if t}
    assert seen == {1, 3}
    with pytest.raises(ValueError, match="neither a document name nor an index"):
        store(model, token_documents(5), heldout_documents=["doc-9"])


TEXTS = [
    "it is a truth universally acknowledged that a single man in possession of a good fortune must be in want of a wife",
    "the family of dashwood had long been settled in sussex and their estate was large and their residence was at norland park",
    "emma woodhouse handsome clever and rich with a comfortable home and happy disposition seemed to unite some of the best blessings",
    "sir walter elliot of kellynch hall in somersetshire was a man who for his own amusement never took up any book but the baronetage",
]


@pytest.fixture(name="text_model", scope="module")
def text_model_fixture(model):
    """The tiny model with a word-level tokenizer trained on TEXTS (EOS = 0, as in the model's config)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(vocab_size=model.cfg.d_vocab, special_tokens=["<eos>", "[UNK]"]))
    text_model = HookedGatedDeltaNet.from_config(tiny_hf_config("grouped"))
    text_model.load_state_dict(model.state_dict())
    text_model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]")
    assert text_model.tokenizer.eos_token_id == text_model.cfg.eos_token_id == 0
    return text_model.eval()


def test_every_kind_of_source_gives_the_same_contexts(text_model, tmp_path):
    from datasets import Dataset, IterableDataset

    folder = tmp_path / "corpus"
    (folder / "c").mkdir(parents=True)
    (folder / "a.txt").write_text(TEXTS[0])
    with gzip.open(folder / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(TEXTS[1])
    (folder / "c" / "x.txt").write_text(TEXTS[2])
    (folder / "d.txt").write_text(TEXTS[3])
    (folder / "notes.md").write_text("not a document")
    tokens = [text_model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    rows = [{"text": t} for t in TEXTS]
    held = {"folder": [str(folder / "b.txt.gz")], "documents": ["doc-1"]}  # by name
    sources = {
        "folder": folder,
        "documents": [Document(f"doc-{i}", t) for i, t in enumerate(TEXTS)],
        "dataset": Dataset.from_list(rows),
        "iterable dataset": IterableDataset.from_generator(lambda: iter(rows)),
        "token arrays": [torch.tensor(t) for t in tokens],
        "token lists": tokens,
    }
    reference = store(text_model, TEXTS, heldout_documents=[1])
    # independently: the documents, EOS after each, cut into contexts of 8
    for split, docs in (("train", [0, 2, 3]), ("heldout", [1])):
        stream = torch.tensor([t for i in docs for t in tokens[i] + [0]])
        n = len(stream) // 8
        assert n == reference.n_contexts(split) > 0
        assert torch.equal(torch.stack([reference.context_tokens(c, split) for c in range(n)]), stream[: 8 * n].view(n, 8))
    for name, source in sources.items():
        s = store(text_model, source, heldout_documents=held.get(name, [1]))
        for split in ("train", "heldout"):
            assert s.n_contexts(split) == reference.n_contexts(split), name
            for c in range(s.n_contexts(split)):
                assert torch.equal(s.context_tokens(c, split), reference.context_tokens(c, split)), name
    assert store(text_model, folder, heldout_documents=[1]).document_names == [
        str(folder / n) for n in ("a.txt", "b.txt.gz", "c/x.txt", "d.txt")]


def test_text_needs_a_tokenizer(model):
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="tokenizer"):
        store(model, TEXTS)


def test_buffer_shuffles_and_yields_each_extracted_sample_once(model):
    s = store(model, positions="all", buffer_size=32)  # one refill = 4 contexts of 8 positions
    first, second = s.next_batch(16, with_origin=True)[1], s.next_batch(16, with_origin=True)[1]
    origins = torch.cat([first, second]).tolist()
    contexts = sorted({c for c, _ in origins})
    assert len(contexts) == 4
    assert sorted(map(tuple, origins)) == [(c, p) for c in contexts for p in range(8)]  # each exactly once
    in_extraction_order = [[c, p] for c in dict.fromkeys(c for c, _ in origins) for p in range(8)]
    assert origins != in_extraction_order  # shuffled: extraction gives each context's positions in a row
    third = s.next_batch(16, with_origin=True)[1]
    assert not {c for c, _ in third.tolist()} & set(contexts)  # the next refill extracted new contexts


def test_training_stream_goes_epoch_by_epoch(model):
    s = store(model, positions="final", buffer_size=8)
    n = s.n_contexts("train")
    yielded = torch.cat([s.next_batch(4, with_origin=True)[1][:, 0] for _ in range(5 * n // 8)])
    extracted = torch.cat([yielded, s.state_dict()["buffer_origins"][:, 0]])  # yielded + still buffered
    counts = torch.bincount(extracted, minlength=n)
    assert counts.min() >= 2 and counts.max() - counts.min() <= 1  # q or q + 1 visits each after q epochs
    fresh = store(model, positions="final", buffer_size=8)
    epoch0, epoch1 = fresh._next_train_contexts(n), fresh._next_train_contexts(n)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(n))
    assert not torch.equal(epoch0, epoch1)  # reshuffled each epoch


def test_state_dict_continues_the_identical_stream(model, tmp_path):
    s = store(model, positions=2, buffer_size=16, seed=3)
    for _ in range(3):
        s.next_batch(8)
    state = s.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, tmp_path / "store.safetensors")  # saveable without pickle
    meta = json.loads(json.dumps({k: v for k, v in state.items() if k not in tensors}))
    expected = [s.next_batch(8, with_origin=True) for _ in range(2 * s.n_contexts("train"))]  # refills and epochs

    resumed = store(model, positions=2, buffer_size=16, seed=3)
    resumed.load_state_dict({**meta, **load_file(tmp_path / "store.safetensors")})
    for x, origin in expected:
        y, o = resumed.next_batch(8, with_origin=True)
        assert torch.equal(x, y) and torch.equal(origin, o)
    with pytest.raises(ValueError, match="another store"):
        store(model, positions=2, buffer_size=16, seed=4).load_state_dict(state)


def test_estimate_input_scale(model):
    s = store(model, positions="final")
    n = s.n_contexts("train")
    scale = s.estimate_input_scale(10_000)  # more than there are: every training sample
    tokens = torch.stack([s.context_tokens(c) for c in range(n)])
    states = states_at(model, tokens)[:, -1].double()  # [n, H, d_k, d_v]
    assert (scale**2 * states.pow(2).sum((-2, -1)).mean()).item() == pytest.approx(1.0, rel=1e-5)
    untouched = store(model, positions="final")
    assert torch.equal(s.next_batch(8), untouched.next_batch(8))  # estimating leaves the stream alone


@pytest.mark.parametrize("kept", [5, 12, None])
def test_kept_heldout_samples_are_the_extracted_ones_and_run_no_model(model, kept, monkeypatch):
    s = store(model, positions=3, heldout_fraction=0.5)
    asked = [(7, None), (4, 5), (16, 12), (3, 1)]
    expected = [list(s.heldout_batches(b, n, with_origin=True)) for b, n in asked]
    total = sum(len(x) for x, _ in expected[0])
    assert s.keep_heldout(kept) == min(total, kept or total)
    extractions = []
    monkeypatch.setattr(s, "_extract", lambda *args: extractions.append(args) or ActivationStore._extract(s, *args))
    for (batch_size, n), batches in zip(asked, expected):
        got = list(s.heldout_batches(batch_size, n, with_origin=True))
        assert [len(x) for x, _ in got] == [len(x) for x, _ in batches]
        for (x, origin), (x_expected, origin_expected) in zip(got, batches):
            assert torch.equal(x, x_expected) and torch.equal(origin, origin_expected)
        served_from_memory = kept is None or (n is not None and n <= kept)
        assert (not extractions) == served_from_memory, (kept, n)
        extractions.clear()
