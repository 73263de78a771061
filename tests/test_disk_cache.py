"""The on-disk activation cache (writesae.disk_cache): the samples are the model's own, shards are
atomic and checksummed, an interrupted or disk-full run resumes, and training from it resumes exactly."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import writesae.disk_cache as disk_cache
from hooked_gdn.pretrained import austen_documents
from hooked_gdn.sites import gdn_hook_name, site_name
from writesae import BilinearMatrixSAE, load_sae
from writesae.cli import main
from writesae.disk_cache import CachedActivations, read_manifest, write_cache
from writesae.store import ActivationStore, StoreConfig
from writesae.train import TrainConfig, train

from .conftest import random_tiny_model, save_tiny_checkpoint_with_tokenizer

HEADS = [0, 2]
STORE = dict(layer=1, heads=HEADS, context=16, positions=[2, 7, 15], model_batch_size=4, heldout_fraction=0.2)


@pytest.fixture(name="model", scope="module")
def model_fixture():
    return random_tiny_model()


def random_documents() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 101, (40,), generator=g) for _ in range(40)]


@pytest.fixture(name="documents", scope="module")
def documents_fixture():
    return random_documents()


def make_store(model, documents, **kw) -> ActivationStore:
    return ActivationStore(model, documents, StoreConfig(**(STORE | kw)))


def write(model, documents, folder, store_kw=None, **kw):
    kw = dict(model_name="tiny", corpus="random tokens", shard_samples=12, progress=False) | kw
    return write_cache(make_store(model, documents, **(store_kw or {})), folder, **kw)


@pytest.fixture(name="cache", scope="module")
def cache_fixture(model, documents, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    write(model, documents, folder)
    return folder


def test_shards_hold_the_models_states_and_the_manifest_describes_them(model, documents, cache):
    store = make_store(model, documents)
    manifest = read_manifest(cache)
    assert manifest["site"] == site_name(1, "state") and manifest["heads"] == HEADS and manifest["dtype"] == "float32"
    assert manifest["samples_per_shard"] == 12 and manifest["contexts_per_shard"] == 4 and manifest["positions"] == [2, 7, 15]
    heldout_names = [store.document_names[i] for i in store.heldout_document_ids]
    assert manifest["heldout_documents"] == heldout_names and manifest["documents"] == 40
    for split in ("train", "heldout"):
        shards = manifest["shards"][split]
        assert [s["index"] for s in shards] == list(range(manifest["splits"][split]["shards"]))
        assert sum(s["samples"] for s in shards) == 3 * store.n_contexts(split) == manifest["splits"][split]["samples"]
        for shard in shards:
            assert shard["file"].startswith(f"{split}/")  # the held-out split is stored apart
            assert hashlib.sha256((cache / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
        # every sample is the state the model forms at its origin, straight from run_with_cache
        last = load_file(cache / shards[-1]["file"])
        contexts, positions = last["origins"].unique_consecutive(dim=0).T
        tokens = torch.stack([store.context_tokens(int(c), split) for c in contexts.unique()])
        _, full = model.run_with_cache(tokens, names_filter=site_name(1, "state"))
        rows = torch.searchsorted(contexts.unique(), contexts.contiguous())
        expected = full[site_name(1, "state")][rows, positions][:, HEADS]
        torch.testing.assert_close(last["x"], expected, rtol=1e-5, atol=1e-6)
        assert set(positions.tolist()) == {2, 7, 15}
    assert not (cache / "manifest-parts").exists() or not list((cache / "manifest-parts").iterdir())


def test_writes_in_bfloat16_are_the_float32_samples_rounded(model, documents, cache, tmp_path):
    write(model, documents, tmp_path, store_kw=dict(kind="write", positions=2), dtype="bfloat16")
    manifest = read_manifest(tmp_path)
    assert manifest["site"] == site_name(1, "write") and manifest["dtype"] == "bfloat16"
    shard = load_file(tmp_path / manifest["shards"]["train"][0]["file"])
    assert shard["x"].dtype == torch.bfloat16
    store = make_store(model, documents, kind="write", positions=2)
    contexts, positions = shard["origins"].T
    names = [gdn_hook_name(1, hook) for hook in ("hook_write_key", "hook_write_value")]
    _, full = model.run_with_cache(torch.stack([store.context_tokens(int(c)) for c in contexts]), names_filter=names)
    rows = torch.arange(len(contexts))
    k, delta = (full[name][rows, positions][:, HEADS] for name in names)
    assert torch.equal(shard["x"], (k.unsqueeze(-1) * delta.unsqueeze(-2)).bfloat16())


class DiskFull:
    """`atomic_file` whose binary files run out of space half-way through the ``fail_at``-th shard."""

    def __init__(self, fail_at: int):
        self.fail_at, self.shards, self.real = fail_at, 0, disk_cache.atomic_file

    @contextmanager
    def __call__(self, path, mode="w"):
        with self.real(path, mode) as f:
            if "b" in mode:
                self.shards += 1
                if self.shards == self.fail_at:
                    write_bytes = f.write
                    f.write = lambda data: (write_bytes(data[: len(data) // 2]), self._full())
            yield f

    @staticmethod
    def _full():
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_mid_shard_leaves_a_cache_that_resumes_to_the_same_bytes(model, documents, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(disk_cache, "atomic_file", DiskFull(fail_at=3))
    with pytest.raises(OSError, match="No space left"):
        write(model, documents, tmp_path)
    part = json.loads((tmp_path / "manifest-parts" / "rank-0.json").read_text())
    assert [s["index"] for s in part["shards"]["train"]] == [0, 1]  # the manifest lists the shards before the failure
    assert not (tmp_path / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    with pytest.raises(ValueError, match="unfinished"):
        CachedActivations(tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(.*dtype: the cache has 'float32', this run 'bfloat16'"):
        write(model, documents, tmp_path, dtype="bfloat16")
    monkeypatch.undo()
    rewritten = []
    real = disk_cache._shard_bytes
    monkeypatch.setattr(disk_cache, "_shard_bytes", lambda store, s, split, j: rewritten.append((split, j)) or real(store, s, split, j))
    told = []
    write(model, documents, tmp_path, log=told.append)
    said = re.fullmatch(rf"writing the cache {tmp_path}: .* in (\d+) shards, .*; (\d+) shards left to write, .* free on its disk\)",
                        told[0])
    assert said and int(said[2]) == int(said[1]) - 2  # the two written before the disk filled up are not counted
    assert rewritten[0] == ("train", 2) and ("train", 0) not in rewritten  # resumed at the first missing shard
    assert read_manifest(tmp_path)["shards"] == read_manifest(cache)["shards"]  # byte for byte (the checksums) the same
    assert not list((tmp_path / "manifest-parts").iterdir())


def test_the_size_is_stated_before_writing_and_a_disk_too_small_is_refused(model, documents, cache, tmp_path, monkeypatch):
    manifest = read_manifest(cache)
    samples = sum(manifest["splits"][split]["samples"] for split in ("train", "heldout"))
    shards = sum(manifest["splits"][split]["shards"] for split in ("train", "heldout"))
    size = samples * (len(HEADS) * 12 * 8 * 4 + 2 * 8)  # x in float32 (2 heads of 12 × 8) and the origin (2 int64)
    on_disk = sum(shard["bytes"] for split in manifest["shards"].values() for shard in split)
    assert samples * disk_cache.sample_bytes(manifest) == size <= on_disk <= size + 1024 * shards  # + the headers
    usage = shutil.disk_usage(tmp_path)
    described = f"{samples:,} samples of 2 heads × 12 × 8 float32 in {shards} shards, {disk_cache._size(size)}"
    told = []
    monkeypatch.setattr(disk_cache.shutil, "disk_usage", lambda folder: usage._replace(free=size - 1))
    with pytest.raises(OSError) as error:
        write(model, documents, tmp_path, log=told.append)
    free = disk_cache._size(size - 1)
    assert told == [f"writing the cache {tmp_path}: {described} ({free} free on its disk)"]
    assert str(error.value).startswith(f"the cache {tmp_path} needs {disk_cache._size(size)} more ({described}), and its "
                                       f"disk has {free} free: ")
    assert not list((tmp_path / "train").iterdir()) and not (tmp_path / "manifest.json").exists()  # nothing written
    monkeypatch.setattr(disk_cache.shutil, "disk_usage", lambda folder: usage._replace(free=size))
    write(model, documents, tmp_path, log=None)
    assert read_manifest(tmp_path)["shards"] == manifest["shards"]


def test_a_rerun_with_other_settings_names_each_differing_field(model, documents, cache):
    with pytest.raises(ValueError) as error:
        write(model, documents, cache, store_kw=dict(positions=[1, 2, 3]))
    assert (f"{cache / 'manifest.json'} was written with other settings (positions: the cache has [2, 7, 15], this run "
            f"[1, 2, 3]; store_config.positions: the cache has [2, 7, 15], this run [1, 2, 3]): ") in str(error.value)


def test_a_corrupted_shard_is_named_and_never_read(cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    shard = copy / "train" / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the samples: still a readable safetensors file
    shard.write_bytes(bytes(data))
    reader = CachedActivations(copy, buffer_size=4096)
    reader.load_shard("train", 0)
    with pytest.raises(ValueError, match=r"shard-000001\.safetensors: its SHA-256 differs .* corrupted"):
        reader.next_batch(8)  # the first refill reads every shard


def test_a_corrupted_heldout_shard_is_named_never_read_and_written_again(model, documents, cache, tmp_path):
    """The held-out split, which decides every reported FVU, is checked against its SHA-256 as the training split is."""
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    shard = copy / "heldout" / "shard-000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the samples: still a readable safetensors file
    shard.write_bytes(bytes(data))
    reader = CachedActivations(copy, buffer_size=4096)
    reader.next_batch(8)  # the training split is intact
    with pytest.raises(ValueError, match=r"heldout/shard-000000\.safetensors: its SHA-256 differs .* corrupted"):
        next(reader.heldout_batches(8))
    write(model, documents, copy)
    assert shard.read_bytes() == (cache / "heldout" / "shard-000000.safetensors").read_bytes()
    assert sum(len(x) for x in CachedActivations(copy).heldout_batches(8)) == read_manifest(cache)["splits"]["heldout"]["samples"]


def test_the_sampler_shuffles_across_shards_yields_each_sample_once_and_resumes_exactly(cache):
    reader = CachedActivations(cache, buffer_size=48, seed=3)
    everything = torch.cat([reader.load_shard("train", i)[0] for i in range(len(reader.manifest["shards"]["train"]))])
    batches = [reader.next_batch(6) for _ in range(25)]
    # 150 of the 246 samples, before the stream wraps round: each a distinct cached sample, shards mixed
    match = (torch.cat(batches).flatten(1)[:, None] == everything.flatten(1)[None]).all(-1)
    assert match.sum(1).eq(1).all() and match.sum(0).le(1).all()
    shard = match.float().argmax(1) // 12
    assert len(set(shard[:12].tolist())) > 2  # the first two batches draw from more than two shards
    assert not torch.equal(shard, shard.sort().values)

    again = CachedActivations(cache, buffer_size=48, seed=3)
    for _ in range(5):
        again.next_batch(6)
    state = again.state_dict()
    resumed = CachedActivations(cache, buffer_size=48, seed=3)
    resumed.load_state_dict(state)
    for i in range(5, 60):  # past the end of the first epoch
        got, reference = resumed.next_batch(6), again.next_batch(6)
        assert torch.equal(got, reference) and (i >= len(batches) or torch.equal(got, batches[i]))
    with pytest.raises(ValueError, match="another cache or reader"):
        CachedActivations(cache, buffer_size=48, seed=4).load_state_dict(state)


class Interrupted(Exception):
    pass


def make_sae(model, **kw):
    kw = dict(n_features=64, k=4, seed=0) | kw
    return BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, heads=HEADS, n_heads=model.cfg.n_value_heads, **kw)


def run(model, cache, out, sae_kw=None, **kw):
    cfg = dict(out_dir=str(out), steps=12, batch_size=16, lr=1e-2, warmup_steps=2, log_every=1, eval_every=6,
               eval_samples=48, checkpoint_every=5, progress=False, input_scale_samples=48,
               dead_after_samples=32, auxk_k=4) | kw
    return train(make_sae(model, **(sae_kw or {})), CachedActivations(cache, buffer_size=48, seed=1), TrainConfig(**cfg))


def test_training_from_the_cache_learns_and_resumes_exactly(model, cache, tmp_path, monkeypatch):
    whole = run(model, cache, tmp_path / "whole", sae_kw=dict(k=8), steps=40, checkpoint_every=0, eval_every=10)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    heldout = [r for r in records if r["split"] == "heldout"]
    assert heldout[-1]["fvu"] < heldout[0]["fvu"] - 0.03 and heldout[-1]["samples"] == 48
    assert any(r.get("loss_auxk", 0) > 0 for r in records)
    assert whole.sae.cfg.input_scale == CachedActivations(cache).estimate_input_scale(48)

    reference = run(model, cache, tmp_path / "reference")
    calls, next_batch = [], CachedActivations.next_batch

    def crash_at_step_8(self, batch_size):
        calls.append(1)
        if len(calls) == 8:
            raise Interrupted
        return next_batch(self, batch_size)

    monkeypatch.setattr(CachedActivations, "next_batch", crash_at_step_8)
    with pytest.raises(Interrupted):
        run(model, cache, tmp_path / "split")
    monkeypatch.undo()
    resumed = run(model, cache, tmp_path / "split")
    assert resumed.start_step == 5
    a, b = reference.sae.state_dict(), resumed.sae.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert load_sae(tmp_path / "split" / "sae").cfg.site == site_name(1, "state")


def test_a_cache_of_another_site_or_heads_is_refused(model, cache, tmp_path):
    with pytest.raises(ValueError, match=rf"site is {site_name(1, 'write')}, but the cache at .* holds {site_name(1, 'state')}"):
        run(model, cache, tmp_path, sae_kw=dict(site=site_name(1, "write")))
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=8, k=2, heads="all", seed=0)
    with pytest.raises(ValueError, match=r"heads \[0, 1, 2, 3\]; the cache at .* gives .* heads \[0, 2\]"):
        train(sae, CachedActivations(cache), TrainConfig(out_dir=str(tmp_path), steps=1, progress=False))


def test_the_cache_and_train_commands(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    save_tiny_checkpoint_with_tokenizer(folder)
    data = tmp_path / "data"
    data.mkdir()
    text = austen_documents("heldout")[0].text
    for i in range(4):  # four documents of 4,000 characters
        (data / f"part{i}.txt").write_text(text[4000 * i : 4000 * (i + 1)])
    common = ["--model", str(folder), "--data", str(data), "--context", "32", "--positions", "2"]
    main(["cache", *common, "--layer", "1", "--heads", "1,3", "--kind", "write", "--out", str(tmp_path / "cache"),
          "--shard-samples", "64", "--storage-dtype", "bfloat16", "--no-progress"])
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["site"] == site_name(1, "write") and manifest["heads"] == [1, 3] and manifest["dtype"] == "bfloat16"
    assert str(data) in manifest["corpus"] and len(manifest["heldout_documents"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"writing the cache {tmp_path / 'cache'}: ") and " samples of 2 heads × 12 × 8 bfloat16 in " in out
    assert f"wrote {tmp_path / 'cache' / 'manifest.json'}" in out

    train_args = ["train", "--cache", str(tmp_path / "cache"), "--steps", "3", "--batch-size", "16", "--buffer-size", "64",
                  "--n-features", "16", "--k", "2", "--eval-every", "3", "--no-progress"]
    main([*train_args, "--out", str(tmp_path / "run")])
    sae = load_sae(tmp_path / "run" / "sae")
    assert sae.cfg.site == site_name(1, "write") and sae.cfg.head_indices == [1, 3] and sae.cfg.model_name == str(folder)
    for wrong, message in ((["--layer", "2"], "site is blocks.2.linear_attn.hook_write_value, but the cache at"),
                           (["--heads", "all"], r"heads \[0, 1, 2, 3\]; the cache at")):
        with pytest.raises(SystemExit) as exit:
            main([*train_args, *wrong, "--out", str(tmp_path / "wrong")])
        assert exit.value.code == 2 and re.search(message, capsys.readouterr().err)
    # a disk too small for the cache: one line, before anything is written
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(disk_cache.shutil, "disk_usage", lambda folder: usage._replace(free=1000))
    with pytest.raises(SystemExit) as exit:
        main(["cache", *common, "--layer", "1", "--out", str(tmp_path / "small"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"writesae cache: error: the cache {tmp_path / 'small'} needs ") and "its disk has 1000 bytes free" in err
    assert not list((tmp_path / "small" / "train").iterdir())


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_rerun_removes_only_its_own_dead_temporaries_and_leaves_user_files(model, documents, cache, tmp_path):
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40]
    prefix = lambda name, pid: f".{name}.tmp-{host}-{pid}-"  # noqa: E731  as atomic_file names its temporaries
    user = [tmp_path / "train" / ".gitkeep", tmp_path / "manifest-parts" / ".keep", tmp_path / "heldout" / ".notes.tmp",
            tmp_path / "manifest-parts" / "rank-notes.json"]
    for path in user:
        path.write_text("mine")
    for name in ("train", "heldout", "manifest-parts"):
        (tmp_path / name / ".ipynb_checkpoints").mkdir()
        (tmp_path / name / ".ipynb_checkpoints" / "x.json").write_text("{}")
    stale = tmp_path / "train" / (prefix("shard-000001.safetensors", _dead_pid()) + "abcd1234")
    live = tmp_path / "train" / (prefix("shard-000002.safetensors", os.getppid()) + "abcd1234")  # a live process's
    stale.write_bytes(b"half a shard")
    live.write_bytes(b"half a shard")
    (tmp_path / ".writesae.lock").write_text(f"{_dead_pid()}\n")  # left by a killed run: its flock went with it
    write(model, documents, tmp_path)
    assert all(path.read_text() == "mine" for path in user)
    assert all((tmp_path / name / ".ipynb_checkpoints" / "x.json").exists() for name in ("train", "heldout", "manifest-parts"))
    assert not stale.exists() and live.read_bytes() == b"half a shard"
    assert read_manifest(tmp_path) == read_manifest(cache) and not (tmp_path / ".writesae.lock").exists()


_FIRST_RUN = """
import sys, time
from pathlib import Path
import writesae.disk_cache as disk_cache
from tests.conftest import random_tiny_model
from tests.test_disk_cache import random_documents, write

folder, ready, go = map(Path, sys.argv[1:])
real = disk_cache._shard_bytes
def slow_shard_bytes(*args):  # the first shard waits until the test says go: the lock is held meanwhile
    ready.touch()
    while not go.exists():
        time.sleep(0.05)
    return real(*args)
disk_cache._shard_bytes = slow_shard_bytes
write(random_tiny_model(), random_documents(), folder)
"""


def test_a_second_cache_run_on_one_folder_is_refused_naming_the_first(model, documents, tmp_path, capsys):
    folder, ready, go = tmp_path / "cache", tmp_path / "ready", tmp_path / "go"
    save_tiny_checkpoint_with_tokenizer(tmp_path / "tiny")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text(austen_documents("heldout")[0].text[:4000])
    (tmp_path / "data" / "b.txt").write_text(austen_documents("heldout")[0].text[4000:8000])
    capsys.readouterr()
    repo = Path(__file__).resolve().parents[1]
    first = subprocess.Popen([sys.executable, "-c", _FIRST_RUN, str(folder), str(ready), str(go)], cwd=repo,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "the first run never started writing"
            time.sleep(0.05)
        temporaries = set(folder.rglob(".*"))
        with pytest.raises(BlockingIOError, match=rf"the output folder {re.escape(str(folder))} \(writesae cache\) is "
                                                  rf"in use by another process \(pid {first.pid}, lock file .*\.writesae\.lock\)"):
            write(model, documents, folder)
        with pytest.raises(SystemExit) as exit:  # the command: one line, exit status 2
            main(["cache", "--model", str(tmp_path / "tiny"), "--data", str(tmp_path / "data"), "--context", "32",
                  "--layer", "1", "--out", str(folder), "--no-progress"])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("writesae cache: error: the output folder")
        assert f"in use by another process (pid {first.pid}, lock file" in err
        assert set(folder.rglob(".*")) == temporaries  # the second runs touched nothing of the first's
    finally:
        go.touch()
        output = first.communicate(timeout=240)[0]
    assert first.returncode == 0, output
    assert read_manifest(folder)["complete"] and not (folder / ".writesae.lock").exists()
    write(model, documents, folder)  # and once the first is done, a rerun is welcome


def test_a_link_in_the_cache_is_refused_not_written_through(model, documents, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = tmp_path / "cache"
    write(model, documents, folder)
    shutil.rmtree(folder / "heldout")
    (folder / "heldout").symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match=f"{re.escape(str(folder / 'heldout'))} is a symbolic link"):
        write(model, documents, folder)
    assert not list(elsewhere.iterdir())
    (folder / "heldout").unlink()
    (folder / "heldout").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (folder / "heldout" / "shard-000000.safetensors").symlink_to(victim)
    with pytest.raises(FileExistsError, match="shard-000000.safetensors is a symbolic link"):
        write(model, documents, folder)
    assert victim.read_text() == "mine"


def test_a_rerun_writes_again_a_shard_whose_bytes_differ_from_its_checksum(model, documents, cache, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    shard = copy / "train" / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # the right size, other bytes
    shard.write_bytes(bytes(data))
    rewritten = []
    real = disk_cache._shard_bytes
    monkeypatch.setattr(disk_cache, "_shard_bytes", lambda store, s, split, j: rewritten.append((split, j)) or real(store, s, split, j))
    write(model, documents, copy)
    assert rewritten == [("train", 1)] and shard.read_bytes() == (cache / "train" / "shard-000001.safetensors").read_bytes()
    CachedActivations(copy, buffer_size=4096).next_batch(8)  # every shard read, and checked, without a complaint
