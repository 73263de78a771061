"""writesae.in_memory: samples extracted once from a store, trained on like a store, resumable, per head."""

from __future__ import annotations

import json

import pytest
import torch

from writesae import FlatSAE, load_sae
from writesae.in_memory import InMemoryActivations
from writesae.store import ActivationStore, StoreConfig
from writesae.train import TrainConfig, train

from .conftest import random_tiny_model

HEADS = [0, 2, 3]


@pytest.fixture(name="model", scope="module")
def model_fixture():
    return random_tiny_model()


@pytest.fixture(name="store", scope="module")
def store_fixture(model):
    g = torch.Generator().manual_seed(0)
    documents = [torch.randint(1, 101, (40,), generator=g) for _ in range(40)]
    return ActivationStore(model, documents, StoreConfig(layer=1, heads=HEADS, context=16, positions=4, heldout_fraction=0.2))


@pytest.fixture(name="samples", scope="module")
def samples_fixture(store):
    return InMemoryActivations.from_store(store, n_train=50, n_heldout=20, seed=3)


def test_from_store_takes_exactly_the_samples_asked_for(model, store, samples):
    assert samples.train.shape == (50, 3, store.d_k, store.d_v) and samples.heldout.shape == (20, 3, store.d_k, store.d_v)
    # the held-out samples are the store's own first ones, in order
    torch.testing.assert_close(samples.heldout, next(store.heldout_batches(20)), rtol=0, atol=0)
    # training samples are the model's states of training contexts, each taken once
    contexts = torch.stack([store.context_tokens(i) for i in range(store.n_contexts())])
    _, cache = model.run_with_cache(contexts, names_filter=store.cfg.site)
    every = cache[store.cfg.site][:, :, HEADS].flatten(0, 1).flatten(1)
    # differences taken directly: cdist's default forms ‖a‖² + ‖b‖² − 2a·b, whose cancellation left up to 1.8e-4
    # between equal states on one CPU, past the bound below
    nearest = torch.cdist(samples.train.flatten(1), every, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    assert torch.all(nearest.values < 1e-3 * every.norm(dim=1).max())  # fp32 rounding of other state_positions
    assert len(set(nearest.indices.tolist())) == 50
    with pytest.raises(ValueError, match="fewer than the 100000 asked for"):
        InMemoryActivations.from_store(store, n_train=10, n_heldout=100_000)


def test_from_store_takes_every_heldout_sample_when_none_is_given(store):
    every = InMemoryActivations.from_store(store, n_train=10, n_heldout=None)
    assert len(every.heldout) == store.n_contexts("heldout") * store.cfg.samples_per_context
    torch.testing.assert_close(every.heldout, torch.cat(list(store.heldout_batches(7))), rtol=0, atol=0)


def test_select_heads_views_the_same_samples(samples):
    part = samples.select_heads([3, 0])
    assert part.heads == [3, 0] and part.cfg.heads == [3, 0] and part.cfg.site == samples.cfg.site
    assert torch.equal(part.train, samples.train[:, [2, 0]]) and torch.equal(part.heldout, samples.heldout[:, [2, 0]])
    with pytest.raises(ValueError, match=r"heads \[1\] must be a non-empty selection of the samples' heads \[0, 2, 3\]"):
        samples.select_heads([1])


def test_the_stream_visits_every_sample_once_per_epoch(samples):
    stream = samples.select_heads(HEADS, seed=1)
    batches = torch.cat([stream.next_batch(7) for _ in range(15)])  # 105 samples: 2 epochs and 5 more
    first, second = batches[:50].flatten(1), batches[50:100].flatten(1)
    for epoch in (first, second):  # each training sample exactly once
        assert torch.equal((epoch[:, None] == samples.train.flatten(1)[None]).all(-1).sum(0), torch.ones(50, dtype=torch.long))
    assert not torch.equal(first, second)  # reshuffled
    assert list(torch.cat(list(samples.heldout_batches(8))).shape) == list(samples.heldout.shape)
    assert [len(b) for b in samples.heldout_batches(8, max_samples=12)] == [8, 4]


def test_input_scale_makes_the_mean_squared_norm_one(samples):
    s = samples.estimate_input_scale(30)
    assert (samples.train[:30] * s).pow(2).sum((-2, -1)).mean().item() == pytest.approx(1, rel=1e-5)


def test_training_resumes_to_the_identical_sae(model, samples, tmp_path):
    def run(out, steps):
        sae = FlatSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=16, k=2, heads=[0, 2], seed=0)
        cfg = TrainConfig(out_dir=str(out), steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, decay="constant",
                          eval_every=4, eval_samples=20, checkpoint_every=5, progress=False, input_scale_samples=40)
        return train(sae, samples.select_heads([0, 2]), cfg)

    whole = run(tmp_path / "whole", 10)
    run(tmp_path / "split", 5)
    resumed = run(tmp_path / "split", 10)
    assert resumed.start_step == 5
    for name, value in whole.sae.state_dict().items():
        assert torch.equal(value, resumed.sae.state_dict()[name]), name
    heldout = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["split"] == "heldout"]
    assert [r["step"] for r in heldout] == [4, 8, 10] and heldout[-1]["samples"] == 20
    assert load_sae(tmp_path / "whole" / "sae").cfg.site == samples.cfg.site
    # a state saved for other samples is refused
    state = samples.select_heads([0, 2]).state_dict()
    with pytest.raises(ValueError, match="belongs to other samples"):
        samples.select_heads([2, 3]).load_state_dict(state)


def test_bad_samples_are_refused(samples):
    with pytest.raises(ValueError, match=r"train samples must be \[n >= 1, n_heads=2"):
        InMemoryActivations(samples.train, samples.heldout, samples.cfg, [0, 2], 4)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        samples.next_batch(0)
