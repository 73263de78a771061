"""Two ranks on CPU (gloo, spawned here): distributed extraction writes the one-rank cache, training
with a global batch B over 2 ranks ends with the SAE one rank trains with batch B, checkpoints come
from rank 0 and resume, and ranks that disagree are refused."""

from __future__ import annotations

import json
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from writesae import BilinearMatrixSAE, distributed, load_sae
from writesae.cli import main
from writesae.disk_cache import CachedActivations, read_manifest, write_cache
from writesae.store import ActivationStore, StoreConfig
from writesae.train import TrainConfig, train

from .conftest import random_tiny_model

HEADS = [0, 2]
STORE = dict(layer=1, heads=HEADS, context=16, positions=3, model_batch_size=4, heldout_fraction=0.2)
SPARSITIES = ("topk", "batchtopk")


def documents():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 101, (40,), generator=g) for _ in range(40)]


def make_store(model, **kw) -> ActivationStore:
    return ActivationStore(model, documents(), StoreConfig(**(STORE | kw)))


def run(model, cache, out, sparsity, **kw):
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, heads=HEADS, n_heads=model.cfg.n_value_heads,
                            n_features=32, k=3, sparsity=sparsity, seed=0)
    # a short dead window, so AuxK and the dead counters act from the first steps
    cfg = dict(out_dir=str(out), steps=12, batch_size=16, lr=1e-2, warmup_steps=2, log_every=1, eval_every=6,
               eval_samples=48, checkpoint_every=5, progress=False, input_scale_samples=48, dead_after_samples=16,
               auxk_k=4) | kw
    return train(sae, CachedActivations(cache, buffer_size=48, seed=1), TrainConfig(**cfg))


class Interrupted(Exception):
    pass


def cli_train(cache, out) -> None:
    main(["train", "--cache", str(cache), "--steps", "4", "--batch-size", "16", "--buffer-size", "48", "--n-features", "16",
          "--k", "2", "--eval-every", "2", "--checkpoint-every", "2", "--out", str(out), "--no-progress"])


def worker(rank: int, world: int, tmp, port: int) -> None:
    """Each rank's part: write a cache, train (whole, and interrupted then resumed), disagree on purpose,
    and last the train command (which leaves the process group)."""
    # what torchrun sets, for init_from_env
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert distributed.init_from_env(None) is None and distributed.rank_and_world() == (rank, world)
    torch.set_num_threads(1)
    try:
        model = random_tiny_model()
        write_cache(make_store(model), tmp / "cache-2", model_name="tiny", corpus="random tokens", shard_samples=12, progress=False)
        for sparsity in SPARSITIES:
            run(model, tmp / "cache-2", tmp / f"{sparsity}-2", sparsity)
        next_batch, calls = CachedActivations.next_batch, []

        def crash_at_step_8(self, batch_size):
            calls.append(1)
            if len(calls) == 8:
                raise Interrupted
            return next_batch(self, batch_size)

        CachedActivations.next_batch = crash_at_step_8
        try:
            run(model, tmp / "cache-2", tmp / "split-2", "topk")
        except Interrupted:
            pass
        CachedActivations.next_batch = next_batch
        resumed = run(model, tmp / "cache-2", tmp / "split-2", "topk")
        (tmp / f"resumed-from-{rank}").write_text(str(resumed.start_step))
        for name, attempt in [("mismatch", lambda: write_cache(make_store(model), tmp / "other", model_name="tiny", corpus="random tokens",
                                                               shard_samples=12, dtype=("float32", "bfloat16")[rank], progress=False)),
                              ("streaming", lambda: train(BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=8, k=2,
                                                                            heads=HEADS, n_heads=model.cfg.n_value_heads),
                                                          make_store(model), TrainConfig(out_dir=str(tmp / "streaming"), progress=False)))]:
            try:
                attempt()
                message = "nothing raised"
            except ValueError as error:
                message = str(error)
            (tmp / f"{name}-{rank}.txt").write_text(message)
        cli_train(tmp / "cache-2", tmp / "cli-2")
    except BaseException:
        (tmp / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        distributed.close()


@pytest.fixture(name="two_ranks", scope="module")
def two_ranks_fixture(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(worker, args=(2, tmp, port), nprocs=2, join=True)
    except Exception as error:
        errors = "\n".join(p.read_text() for p in sorted(tmp.glob("error-*.txt")))
        raise AssertionError(f"a rank failed:\n{errors or error}") from error
    return tmp


def test_ranks_write_the_cache_one_rank_writes(two_ranks, tmp_path):
    model = random_tiny_model()
    write_cache(make_store(model), tmp_path, model_name="tiny", corpus="random tokens", shard_samples=12, progress=False)
    one, two = read_manifest(tmp_path), read_manifest(two_ranks / "cache-2")
    assert len(two["shards"]["train"]) == 21 and two["shards"] == one["shards"]  # the same files, checksums included
    assert not list((two_ranks / "cache-2" / "manifest-parts").iterdir())


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_two_ranks_with_global_batch_b_train_the_sae_one_rank_trains_with_b(two_ranks, tmp_path, sparsity):
    model = random_tiny_model()
    one = run(model, two_ranks / "cache-2", tmp_path, sparsity).sae
    two = load_sae(two_ranks / f"{sparsity}-2" / "checkpoint" / "sae")  # the last step's, input scale not folded
    assert two.cfg == one.cfg
    one, two = one.state_dict(), two.state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    records = lambda out: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ours, theirs = records(tmp_path), records(two_ranks / f"{sparsity}-2")
    assert [r["step"] for r in theirs] == [r["step"] for r in ours]  # written once, by rank 0
    assert any(r.get("loss_auxk", 0) > 0 for r in theirs)
    for a, b in zip(ours, theirs):
        for key in ("loss", "loss_reconstruction", "loss_auxk", "l0", "dead_fraction"):
            assert (key in b) == (key in a), (a["step"], key)  # a rule without AuxK records no loss_auxk
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_distributed_training_resumes_to_the_uninterrupted_result(two_ranks):
    assert [(two_ranks / f"resumed-from-{rank}").read_text() for rank in range(2)] == ["5", "5"]
    whole = load_sae(two_ranks / "topk-2" / "sae").state_dict()
    resumed = load_sae(two_ranks / "split-2" / "sae").state_dict()
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_ranks_that_disagree_and_streaming_on_two_ranks_are_refused(two_ranks):
    for rank in range(2):
        assert "the ranks disagree on the cache settings (dtype: rank 0 has 'float32', rank 1 'bfloat16')" in \
            (two_ranks / f"mismatch-{rank}.txt").read_text()
        assert "reads its samples from a cache" in (two_ranks / f"streaming-{rank}.txt").read_text()


def test_the_train_command_on_two_ranks_matches_one_rank(two_ranks, tmp_path):
    cli_train(two_ranks / "cache-2", tmp_path)
    one, two = load_sae(tmp_path / "sae").state_dict(), load_sae(two_ranks / "cli-2" / "sae").state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    steps = lambda out: [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps(two_ranks / "cli-2") == steps(tmp_path) == [2, 4, 4]  # held-out at 2 and 4, the last step logged
