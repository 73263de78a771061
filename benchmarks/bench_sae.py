"""P5: SAE training throughput and parameter memory, WriteSAE against the flat baseline, in one run.

    python -m benchmarks.bench_sae                  # d_k = d_v = 128, n_features = 4096, one head
    python -m benchmarks.bench_sae --n-features 2048 --batch 128

- training steps (Adam, TopK k=32, forward + backward + step) on random states X [batch, 1, 128, 128]:
  states/s of `BilinearMatrixSAE` (rank 1) and of `FlatSAE` at equal n_features, and their ratio;
- parameter memory of each (weights, biases and Adam's two moments), and the ratio;
- states/s streamed from the shipped model (`gdn-austen`, all heads of one GDN layer, 8 random
  positions per 128-token context) into training a `BilinearMatrixSAE` on them.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.timing import median_seconds
from hooked_gdn.sites import site_name
from writesae import BilinearMatrixSAE, FlatSAE


def train_step(sae, batch: torch.Tensor):
    """The trainer's step on ``batch`` (TopK codes, only the active atoms decoded; Adam), as a function."""
    optimiser = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step():
        values, indices = sae.encode(batch).topk(sae.cfg.k, dim=-1)
        loss = (sae.decode_sparse(indices, values) - batch).pow(2).sum((-2, -1)).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def train_step_seconds(sae, batch: torch.Tensor, repeats: int) -> float:
    return median_seconds(train_step(sae, batch), repeats)  # the warm-up call allocates Adam's moments


def step_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward and backward) as torch counts them: matrix products only
    (mm, bmm and the einsums made of them); element-wise work, top-k, gathers and Adam are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_seconds(flops: int, device, repeats: int, dtype=torch.float32) -> tuple[float, int]:
    """Median time of one plain square ``torch.matmul`` of about ``flops`` FLOPs (2·m³), and its exact FLOPs."""
    m = max(1, round((flops / 2) ** (1 / 3)))
    a, b = (torch.randn(m, m, device=device, dtype=dtype) for _ in range(2))
    return median_seconds(lambda: torch.matmul(a, b), repeats), 2 * m**3


def memory_mib(sae) -> float:
    """Parameters plus Adam's two moments, in MiB."""
    return 3 * sum(p.numel() * p.element_size() for p in sae.parameters()) / 2**20


def streaming_states_per_second(steps: int, batch: int) -> float:
    from hooked_gdn import HookedGatedDeltaNet
    from hooked_gdn.pretrained import austen_documents
    from writesae.store import ActivationStore, StoreConfig
    from writesae.train import TrainConfig, train

    model = HookedGatedDeltaNet.from_pretrained("gdn-austen").eval()
    layer = model.cfg.gdn_layers[len(model.cfg.gdn_layers) // 2]
    store = ActivationStore(model, austen_documents("train"),
                            StoreConfig(layer=layer, heads="all", context=128, positions=8, buffer_size=2048))
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=512, k=16, heads="all",
                            n_heads=model.cfg.n_value_heads, site=site_name(layer, "state"), seed=0)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train(sae, store, TrainConfig(steps=steps, batch_size=batch, out_dir=out, eval_every=0, checkpoint_every=0, progress=False))
        return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-features", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stream-steps", type=int, default=30)
    args = parser.parse_args()
    d = 128
    batch = torch.randn(args.batch, 1, d, d, generator=torch.Generator().manual_seed(0))
    kw = dict(d_k=d, d_v=d, n_features=args.n_features, k=32, seed=0)
    seconds, memory = {}, {}
    for name, cls in (("BilinearMatrixSAE", BilinearMatrixSAE), ("FlatSAE", FlatSAE)):
        sae = cls(**kw)
        seconds[name] = train_step_seconds(sae, batch, args.repeats)
        memory[name] = memory_mib(sae)
        del sae
    stream = streaming_states_per_second(args.stream_steps, args.batch)
    rate = {name: args.batch / s for name, s in seconds.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d_k = d_v = {d}, n_features = {args.n_features}, "
          f"batch {args.batch}\n")
    print("| id | measure | BilinearMatrixSAE | FlatSAE | ratio |\n|---|---|---|---|---|")
    print(f"| P5a | training states/s | {rate['BilinearMatrixSAE']:.0f} | {rate['FlatSAE']:.0f} | "
          f"{rate['BilinearMatrixSAE'] / rate['FlatSAE']:.1f}× faster |")
    print(f"| P5b | parameter + Adam memory | {memory['BilinearMatrixSAE']:.1f} MiB | {memory['FlatSAE']:.1f} MiB | "
          f"{memory['FlatSAE'] / memory['BilinearMatrixSAE']:.0f}× smaller |")
    print(f"| P5c | states/s streamed from gdn-austen into training | {stream:.0f} | | |")


if __name__ == "__main__":
    main()
