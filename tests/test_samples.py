"""writesae.samples: every sample source is a `SampleSource`, and `input_scale` is the one input-scale formula."""

from __future__ import annotations

import pytest
import torch

from writesae.disk_cache import CachedActivations, write_cache
from writesae.in_memory import InMemoryActivations
from writesae.samples import SampleSource, input_scale
from writesae.store import ActivationStore, StoreConfig

from .conftest import random_tiny_model


@pytest.fixture(name="store", scope="module")
def store_fixture():
    g = torch.Generator().manual_seed(0)
    documents = [torch.randint(1, 101, (40,), generator=g) for _ in range(20)]
    return ActivationStore(random_tiny_model(), documents, StoreConfig(layer=1, heads=[0, 2], context=16, positions=3,
                                                                       model_batch_size=4, heldout_fraction=0.2))


@pytest.fixture(name="cache", scope="module")
def cache_fixture(store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    write_cache(store, folder, model_name="tiny", corpus="random tokens", shard_samples=9, progress=False, log=None)
    return CachedActivations(folder)


def test_every_source_is_a_sample_source(store, cache):
    memory = InMemoryActivations.from_store(store, n_train=12, n_heldout=6)
    for source in (store, cache, memory, memory.select_heads([2])):
        assert isinstance(source, SampleSource), type(source).__name__
        assert source.cfg.site == store.cfg.site and (source.d_k, source.d_v, source.n_value_heads) == (12, 8, 4)
        assert source.load_state_dict(source.state_dict()) is None and isinstance(source.fingerprint(), str)
    assert not isinstance(store.cfg, SampleSource)


def test_the_cache_estimates_the_input_scale_on_its_first_samples_shard_by_shard(cache):
    shards = [cache.load_shard("train", j)[0] for j in range(3)]  # 9 samples each
    assert cache.estimate_input_scale(20) == input_scale([shards[0], shards[1], shards[2][:2]], cache)


def test_input_scale_makes_the_mean_squared_norm_over_samples_and_heads_one():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 3, 4, 2, generator=g), 7 * torch.randn(2, 3, 4, 2, generator=g)]
    s = input_scale(batches, "these samples")
    assert (s * torch.cat(batches).double()).pow(2).sum((-2, -1)).mean().item() == pytest.approx(1, rel=1e-12)
    with pytest.raises(ValueError, match="training samples of these samples have zero norm"):
        input_scale([torch.zeros(4, 3, 4, 2)], "these samples")
