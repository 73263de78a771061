"""Issue 16: the on-disk activation cache against streaming, on the shipped model, in one run.

    python -m benchmarks.bench_cache                        # gdn-austen, layer 5, all 4 heads, states
    python -m benchmarks.bench_cache --contexts 128 --steps 40

Samples are states of all heads of GDN layer 5 at 8 random positions per 128-token context of the
training novels (the first ``--contexts`` contexts' worth of documents of 1024 tokens, 10% of them
held out). Every process uses one thread, so that 1 and 2 ranks compare on equal terms.

- C1: cache write (extract, serialise, SHA-256, fsync, rename; fp32 and bf16) against the store's
  streaming extraction into its shuffled buffer, in samples/s;
- C2: training a WriteSAE from the cache against streaming from the model, in samples/s;
- C3: the same training from the cache on 2 ranks (gloo, spawned here) against 1 rank, same
  global batch, in samples/s;
- C4 (computed, not measured): cache size and time for Qwen3.5-0.8B.

Writes ``benchmarks/results/cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchmarks.provenance import provenance, run_line, write_results
from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.pretrained import austen_documents
from writesae import BilinearMatrixSAE, distributed
from writesae.disk_cache import CachedActivations, write_cache
from writesae.store import ActivationStore, StoreConfig
from writesae.train import TrainConfig, train

LAYER, CONTEXT, POSITIONS, DOCUMENT_TOKENS = 5, 128, 8, 1024

RESULTS_JSON = Path(__file__).parent / "results" / "cache.json"


def documents(model, contexts: int) -> list[torch.Tensor]:
    """The training novels' first tokens, cut into documents of 1024 tokens, enough for ``contexts`` contexts."""
    text = "\n\n".join(doc.text for doc in austen_documents("train"))
    tokens = torch.tensor(model.tokenizer(text[: 8 * CONTEXT * contexts * 2])["input_ids"])
    n = contexts * CONTEXT * 10 // 9 // DOCUMENT_TOKENS + 1
    return list(tokens[: n * DOCUMENT_TOKENS].split(DOCUMENT_TOKENS))


def make_store(model, docs) -> ActivationStore:
    return ActivationStore(model, docs, StoreConfig(layer=LAYER, heads="all", context=CONTEXT, positions=POSITIONS,
                                                    heldout_fraction=0.1, buffer_size=1024, model_batch_size=8))


def make_sae(d_k: int, d_v: int) -> BilinearMatrixSAE:
    return BilinearMatrixSAE(d_k=d_k, d_v=d_v, n_features=256, k=8, heads="all", seed=0)


def train_seconds(sae, samples, out: Path, steps: int, batch: int, input_scale: float) -> float:
    sae.cfg.input_scale = input_scale  # the same s for every run, so none spends time estimating it
    cfg = TrainConfig(out_dir=str(out), steps=steps, batch_size=batch, lr=1e-3, warmup_steps=5, eval_every=0,
                      checkpoint_every=0, input_scale_samples=None, progress=False, log_every=0)
    start = time.perf_counter()
    train(sae, samples, cfg)
    return time.perf_counter() - start


def rank_worker(rank: int, world: int, port: int, cache: str, out: str, steps: int, batch: int, input_scale: float,
                d_k: int, d_v: int, result: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.init_from_env(None)
    try:
        seconds = train_seconds(make_sae(d_k, d_v), CachedActivations(cache, buffer_size=1024), Path(out), steps, batch, input_scale)
        if rank == 0:
            Path(result).write_text(json.dumps(seconds))
    finally:
        distributed.close()


def qwen_estimate() -> dict:
    """C4: Qwen3.5-0.8B, layer 9, 16 heads of d_k = d_v = 128, 8 positions per 1024-token context, 10M tokens."""
    samples = 10_000_000 // 1024 * 8
    bytes_fp32 = 16 * 128 * 128 * 4
    # forward of the first 10 of 24 layers: ~21M non-embedding parameters per layer, 2 FLOP per parameter and token
    flops = 2 * 10 * 21e6 * 10_000_000
    gib = lambda b: samples * b / 2**30
    return {
        "samples": samples, "bytes_per_sample_fp32": bytes_fp32, "cache_gib_fp32": gib(bytes_fp32), "cache_gib_bf16": gib(bytes_fp32 / 2),
        "extraction_pflop": flops / 1e15, "extraction_s_at_200_tflops": flops / 200e12,
        "write_s_fp32_at_2_gbps": samples * bytes_fp32 / 2e9, "sha256_s_fp32_at_1_5_gbps": samples * bytes_fp32 / 1.5e9,
        "epochs_in_20k_steps_of_1024": 20_000 * 1024 / samples,
        "reread_hours_fp32_at_2_gbps": 20_000 * 1024 * bytes_fp32 / 2e9 / 3600,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=256, help="training contexts (of 128 tokens) in the corpus")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS_JSON)
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = provenance("bench_cache", threads_per_process=1)
    model = HookedGatedDeltaNet.from_pretrained("gdn-austen").eval()
    docs = documents(model, args.contexts)
    d_k, d_v = model.cfg.d_key, model.cfg.d_value
    results: dict = {"provenance": record, "setup": {"model": "gdn-austen", "layer": LAYER, "heads": model.cfg.n_value_heads, "context": CONTEXT,
                               "positions": POSITIONS, "threads_per_process": 1, "steps": args.steps, "batch": args.batch,
                               "bytes_per_sample_fp32": model.cfg.n_value_heads * d_k * d_v * 4}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # C1: streaming extraction, then the cache written in fp32 and bf16
        store = make_store(model, docs)
        n_train = store.n_contexts("train") * POSITIONS
        start = time.perf_counter()
        for _ in range(n_train // 256):
            store.next_batch(256)
        streaming = (n_train // 256) * 256 / (time.perf_counter() - start)
        written = {}
        for dtype in ("float32", "bfloat16"):
            store = make_store(model, docs)
            start = time.perf_counter()
            write_cache(store, tmp / dtype, model_name="gdn-austen", corpus="the training novels' first tokens",
                        shard_samples=1024, dtype=dtype, progress=False)
            written[dtype] = (n_train + store.n_contexts("heldout") * POSITIONS) / (time.perf_counter() - start)
        results["C1"] = {"streaming_samples_per_s": streaming, **{f"cache_write_{d}_samples_per_s": v for d, v in written.items()},
                         **{f"ratio_{d}": v / streaming for d, v in written.items()},
                         "cache_mib_fp32": sum(f.stat().st_size for f in (tmp / "float32").rglob("*.safetensors")) / 2**20}

        # C2: training, streaming against the cache (fp32), the same SAE, steps and batch
        scale = CachedActivations(tmp / "float32").estimate_input_scale(1024)
        streamed = train_seconds(make_sae(d_k, d_v), make_store(model, docs), tmp / "run-stream", args.steps, args.batch, scale)
        cached = train_seconds(make_sae(d_k, d_v), CachedActivations(tmp / "float32", buffer_size=1024), tmp / "run-cache",
                               args.steps, args.batch, scale)
        samples = args.steps * args.batch
        results["C2"] = {"streaming_samples_per_s": samples / streamed, "cache_samples_per_s": samples / cached,
                         "ratio": streamed / cached}

        # C3: 2 ranks against 1, from the cache (train() timed inside rank 0, after the processes started)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = tmp / "two-ranks.json"
        mp.spawn(rank_worker, nprocs=2, args=(2, port, str(tmp / "float32"), str(tmp / "run-2"), args.steps, args.batch,
                                              scale, d_k, d_v, str(result)))
        two = json.loads(result.read_text())
        results["C3"] = {"one_rank_samples_per_s": samples / cached, "two_ranks_samples_per_s": samples / two, "ratio": cached / two}
    results["C4_computed"] = qwen_estimate()
    write_results(args.out, results)
    print(results_block(results))


def results_block(results: dict | None) -> str:
    """RESULTS.md's C1–C4 tables, from ``benchmarks/results/cache.json``."""
    if results is None:
        return "Not yet run: `python -m benchmarks.bench_cache`.\n"
    setup, c1, c2, c3, c4 = (results[k] for k in ("setup", "C1", "C2", "C3", "C4_computed"))
    rate = lambda x: f"{x:.0f}"
    threads = f"{setup['threads_per_process']} thread per process"
    lines = [f"{run_line(results['provenance'], threads)}), "
             f"`benchmarks/results/cache.json`: `{setup['model']}`, GDN layer {setup['layer']}, all {setup['heads']} heads, "
             f"states at {setup['positions']} random positions per {setup['context']}-token context; {setup['steps']} steps "
             f"of batch {setup['batch']}; {setup['bytes_per_sample_fp32'] // 1024} KiB per sample, {c1['cache_mib_fp32']:.0f} "
             "MiB of fp32 shards.", "",
             "| id | measure | ratio | figures |", "|---|---|---|---|",
             f"| C1a | cache write (fp32: extract, serialise, SHA-256, fsync, rename) / streaming extraction, samples/s | "
             f"{c1['ratio_float32']:.2f} | {rate(c1['cache_write_float32_samples_per_s'])} vs {rate(c1['streaming_samples_per_s'])} samples/s |",
             f"| C1b | cache write in bf16 / streaming extraction | {c1['ratio_bfloat16']:.2f} | "
             f"{rate(c1['cache_write_bfloat16_samples_per_s'])} vs {rate(c1['streaming_samples_per_s'])} samples/s |",
             f"| C2 | training a WriteSAE from the cache / streaming from the model, samples/s | {c2['ratio']:.1f} | "
             f"{rate(c2['cache_samples_per_s'])} vs {rate(c2['streaming_samples_per_s'])} samples/s |",
             f"| C3 | 2 ranks (gloo) / 1 rank, training from the cache, same global batch | {c3['ratio']:.2f} | "
             f"{rate(c3['two_ranks_samples_per_s'])} vs {rate(c3['one_rank_samples_per_s'])} samples/s |", "",
             "C4 (computed, not measured, by `qwen_estimate`: its docstring and comments give the assumptions):", "",
             "| quantity | value | from |", "|---|---|---|",
             f"| samples | {c4['samples']:,} | 10M / 1024 contexts × 8 positions |",
             f"| bytes per sample | {c4['bytes_per_sample_fp32'] / 2**20:g} MiB fp32, {c4['bytes_per_sample_fp32'] / 2**21:g} MiB bf16 "
             "| 16 × 128 × 128 × 4 (or 2) |",
             f"| cache size | {c4['cache_gib_fp32']:.1f} GiB fp32, {c4['cache_gib_bf16']:.1f} GiB bf16 | samples × bytes |",
             f"| extraction compute | {c4['extraction_pflop']:.1f} PFLOP, ≈ {c4['extraction_s_at_200_tflops']:.0f} s at 200 TFLOP/s "
             "| 2 FLOP × ~21M non-embedding parameters per layer × 10 layers × 10M tokens |",
             f"| writing the shards | ≈ {c4['write_s_fp32_at_2_gbps']:.0f} s fp32 at 2 GB/s | one NVMe drive |",
             f"| hashing (SHA-256) | ≈ {c4['sha256_s_fp32_at_1_5_gbps']:.0f} s fp32 at 1.5 GB/s | one core, in line with the writes |",
             f"| one rank, one GPU, end to end | ≈ {_end_to_end_min(c4, 1):.0f} min fp32, ≈ {_end_to_end_min(c4, 2):.0f} min bf16 | "
             "the three above in sequence (the writer does not overlap them) |", "",
             f"Reading it back: 20,000 steps of 1024 samples are {c4['epochs_in_20k_steps_of_1024']:.0f} passes over the cache, "
             f"{c4['cache_gib_fp32'] * c4['epochs_in_20k_steps_of_1024'] / 1024:.0f} TiB of reads in fp32 "
             f"({c4['cache_gib_bf16'] * c4['epochs_in_20k_steps_of_1024'] / 1024:.0f} TiB bf16): about "
             f"{c4['reread_hours_fp32_at_2_gbps']:.0f} h at 2 GB/s if the cache does not fit in the page cache."]
    return "\n".join(lines) + "\n"


def _end_to_end_min(c4: dict, shrink: int) -> float:
    """C4's extraction, writing and hashing in sequence, in minutes; bf16 (``shrink`` 2) writes and hashes half the bytes."""
    return (c4["extraction_s_at_200_tflops"] + (c4["write_s_fp32_at_2_gbps"] + c4["sha256_s_fp32_at_1_5_gbps"]) / shrink) / 60


if __name__ == "__main__":
    main()
