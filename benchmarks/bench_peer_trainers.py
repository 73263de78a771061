"""P6: one SAE training step against the peers' trainers, on the same flattened states (a benchmark-only
environment; neither peer is a project dependency).

    /tmp/tl3/bin/python -m benchmarks.bench_peer_trainers     # where sae-lens is installed
    /tmp/h6/peers/bin/python -m benchmarks.bench_peer_trainers   # a venv with eai-sparsify (see below)

Each run times, in one process and on the same random states X [batch, d_k, d_v] flattened to
[batch, d_k·d_v], same n_features, k = 32, batch, Adam (lr 1e-4) and threads (1):

- ours: `FlatSAE`'s trainer step (`benchmarks.bench_sae.train_step`, i.e. `writesae.train.training_step`);
- SAELens' `TopKTrainingSAE` (sae-lens): ``training_forward_pass``, backward, the gradient-norm clip its
  `SAETrainer` applies, Adam;
- EleutherAI's `sparsify` (PyPI ``eai-sparsify``; the PyPI name ``sparsify`` is Neural Magic's
  end-of-life package): `SparseCoder` forward, backward, removing the gradient parallel to the
  decoder directions, Adam, unit-norm decoder, as its `Trainer` does (eager decoder on a CPU:
  ``embedding_bag``, its fused Triton kernel needs a GPU);
- ours: `BilinearMatrixSAE` (rank 1) on the same states as matrices.

All three run inside `writesae.host_memory.freed_memory_kept`, the allocator setting `writesae.train.train`
runs in (freed memory reused, not faulted in again each step), so the ratio compares the steps' own work.

The sparsify venv: ``python -m venv --system-site-packages /tmp/h6/peers && /tmp/h6/peers/bin/pip install
eai-sparsify`` (torch 2.13 and this project come from the system's site-packages).

``ratio`` = peer step time / our FlatSAE step time (goal ≥ 1: not slower on their own ground), medians of
interleaved repeats. A peer that does not import here is recorded as skipped with the reason; a run
keeps the other peers' entries already in the results file, so the two environments fill it in turn.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import torch

from benchmarks.bench_sae import train_step
from benchmarks.provenance import provenance, write_results
from benchmarks.timing import interleaved_medians
from writesae import BilinearMatrixSAE, FlatSAE
from writesae.host_memory import freed_memory_kept

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "peer_trainers.json"
SHAPES = [  # (d_k, d_v, n_features, batch)
    (64, 64, 4096, 256),
    (128, 128, 1024, 128),
]
K, LR = 32, 1e-4


def saelens_step(d_in: int, n: int, x: torch.Tensor):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=n, k=K, dtype="float32", device="cpu"))
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    dead = torch.zeros(n, dtype=torch.bool)

    def step():
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)  # as sae_lens.training.sae_trainer does
        optimizer.step()
        optimizer.zero_grad()

    return step


def sparsify_step(d_in: int, n: int, x: torch.Tensor):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=K), device="cpu")
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    dead = torch.zeros(n, dtype=torch.bool)

    def step():  # sparsify.trainer.Trainer.fit's step, with auxk_alpha's term (zero while nothing is dead)
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    return step


PEERS = {"saelens": ("sae-lens", saelens_step), "sparsify": ("eai-sparsify", sparsify_step)}


def measure(peer: str, repeats: int) -> dict:
    distribution, make_step = PEERS[peer]
    try:
        version = importlib.metadata.version(distribution)
        make_step(4, 8, torch.zeros(2, 4))  # imports it and builds a tiny one
    except Exception as error:  # not installed here, or it does not build: say so
        return {"status": "skipped", "why": f"{distribution} unavailable under {sys.executable}: "
                                             f"{type(error).__name__}: {error}"}
    record = provenance("bench_peer_trainers", python_executable=sys.executable, repeats=repeats, lr=LR,
                        optimiser="torch.optim.Adam", host_memory="writesae.host_memory.freed_memory_kept, for all three")
    rows = []
    for d_k, d_v, n, batch in SHAPES:
        states = torch.randn(batch, d_k, d_v, generator=torch.Generator().manual_seed(0))
        flat = states.flatten(1)
        steps = {"ours_flat": train_step(FlatSAE(d_k=d_k, d_v=d_v, n_features=n, k=K, seed=0), states[:, None]),
                 peer: make_step(d_k * d_v, n, flat),
                 "ours_bilinear": train_step(BilinearMatrixSAE(d_k=d_k, d_v=d_v, n_features=n, k=K, seed=0), states[:, None])}
        with freed_memory_kept():  # one allocator setting for all three: the one our trainer runs in
            seconds = interleaved_medians(steps, repeats)
        row = {"d_k": d_k, "d_v": d_v, "n_features": n, "batch": batch, "k": K,
               **{f"{name}_states_per_s": batch / s for name, s in seconds.items()},
               "ratio_peer_over_ours_flat": seconds[peer] / seconds["ours_flat"],
               "ratio_peer_over_ours_bilinear": seconds[peer] / seconds["ours_bilinear"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"status": "measured", "version": version, "rows": rows, "provenance": record}


def results_block(results: dict | None) -> str:
    """RESULTS.md's P6 section, from ``benchmarks/results/peer_trainers.json``."""
    if results is None:
        return "Not yet run: `python -m benchmarks.bench_peer_trainers` (in an environment with sae-lens or eai-sparsify).\n"
    lines = ["One training step on the same flattened states, same n_features, k, batch, Adam, 1 thread, medians of "
             "interleaved repeats (`benchmarks/results/peer_trainers.json`). *ratio*: the peer's step time over our "
             "FlatSAE's (≥ 1: we are not slower); states/s of our BilinearMatrixSAE on the same states beside it.", "",
             "| peer | d_k×d_v | n | batch | peer states/s | our FlatSAE states/s | ratio | our BilinearMatrixSAE states/s | load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for peer, entry in results["peers"].items():
        if entry["status"] != "measured":
            notes.append(f"{peer}: not measured ({entry['why']})")
            continue
        p = entry["provenance"]
        notes.append(f"{peer} {entry['version']}: `{p['command']}` under `{p['python_executable']}` on {p['date']} "
                     f"(torch {p['torch']}, {p['cpu_threads']} thread, {p['repeats']} repeats, "
                     "all three steps inside `writesae.host_memory.freed_memory_kept`)")
        lines += [f"| {peer} | {r['d_k']}×{r['d_v']} | {r['n_features']} | {r['batch']} | {r[f'{peer}_states_per_s']:.0f} | "
                  f"{r['ours_flat_states_per_s']:.0f} | {r['ratio_peer_over_ours_flat']:.2f} | "
                  f"{r['ours_bilinear_states_per_s']:.0f} | {p['load_average_before'][0]:.1f} |" for r in entry["rows"]]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(args.json.read_text()) if args.json.exists() else {"peers": {}}
    for peer in PEERS:
        entry = measure(peer, args.repeats)
        if entry["status"] == "measured" or results["peers"].get(peer, {}).get("status") != "measured":
            results["peers"][peer] = entry
    results["provenance"] = provenance("bench_peer_trainers", note="each measured peer has its own provenance")
    write_results(args.json, results)
    print(results_block(json.loads(args.json.read_text())))


if __name__ == "__main__":
    main()
