"""L1: peak resident memory while loading a multi-shard checkpoint, streaming loader against the in-memory path.

    python -m benchmarks.bench_loading                 # bf16 and fp32 checkpoints; writes benchmarks/results/loading.json
    python -m benchmarks.bench_loading --dtypes bf16

For each dtype, transformers saves a random wide, shallow Qwen3.5 (d_vocab 50000, d_model 1024,
4 layers: 3 GDN + 1 attention, d_mlp 4096; 186 M parameters: 372 MB in bf16) in that dtype, in
100 MB shards with a ``model.safetensors.index.json``, into a temp dir. Each load path then runs in
a fresh process, loading into the checkpoint's dtype: its RSS before loading (after the imports)
and its RSS high-water mark (Linux's VmHWM, reset through /proc/self/clear_refs) give the memory
the load added, reported as a ratio to the weights' bytes on disk. Target for the streaming
loader: ≤ 1.3.

It also prints what ``device_map="auto"`` plans for Qwen3.5-35B-A3B in bf16 on 2 × 80 GiB and
4 × 24 GiB GPUs, per device: computed from the config (transformers' ``Qwen3_5MoeTextConfig``
defaults, whose docstring describes that model) on the meta device, not measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil
import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PATHS = ("streaming", "in_memory")
RESULTS_JSON = Path(__file__).parent / "results" / "loading.json"
#: the streaming loader's target: added memory over the weights' bytes
TARGET = 1.3


def write_checkpoint(folder: Path, dtype: torch.dtype) -> None:
    """A random wide, shallow Qwen3.5 saved by transformers in 100 MB shards."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=50000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen3_5ForCausalLM(config).to(dtype).save_pretrained(folder, max_shard_size="100MB")


def _high_water_mark() -> int:
    """This process's peak RSS in bytes (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def measure(path: str, folder: str, dtype: str) -> dict:
    """Run in a fresh process: load once, report RSS before and the high-water mark (bytes)."""
    from hooked_gdn import HookedGatedDeltaNet
    from hooked_gdn.loading import load_pretrained_in_memory

    before = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    start = time.perf_counter()
    if path == "streaming":
        model = HookedGatedDeltaNet.from_pretrained(folder, dtype=DTYPES[dtype])
    else:
        model = load_pretrained_in_memory(HookedGatedDeltaNet, folder, dtype=DTYPES[dtype])
    seconds = time.perf_counter() - start
    peak = _high_water_mark()
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return dict(rss_before=before, rss_peak=peak, model_bytes=model_bytes, seconds=seconds)


def planned_memory_per_device() -> dict:
    """Qwen3.5-35B-A3B's bf16 weights per device under device_map="auto": computed on the meta device."""
    from accelerate import init_empty_weights
    from transformers import Qwen3_5MoeTextConfig

    from hooked_gdn import HookedGatedDeltaNet
    from hooked_gdn.config import HookedGDNConfig
    from hooked_gdn.placement import plan_device_map

    hf = Qwen3_5MoeTextConfig()
    config = {k: getattr(hf, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok",
                                          "moe_intermediate_size", "shared_expert_intermediate_size", "linear_num_key_heads",
                                          "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                                          "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")}
    config["layer_types"] = f"{hf.layer_types.count('linear_attention')} GDN, {hf.layer_types.count('full_attention')} attention"
    with init_empty_weights():
        model = HookedGatedDeltaNet(HookedGDNConfig.from_hf_config(hf))
    sizes = {name: p.numel() * 2 for name, p in model.named_parameters()}
    result = {"config (transformers Qwen3_5MoeTextConfig defaults)": config,
              "parameters": sum(p.numel() for p in model.parameters()), "bf16 bytes": sum(sizes.values()), "plans": {}}
    for label, max_memory in {"2 x 80 GiB": {0: "80GiB", 1: "80GiB"}, "4 x 24 GiB": {i: "24GiB" for i in range(4)}}.items():
        plan = plan_device_map(model, "auto", max_memory=max_memory, dtype=torch.bfloat16)
        per_device, blocks = defaultdict(int), defaultdict(list)
        for name, size in sizes.items():
            owner = max((key for key in plan if name.startswith(f"{key}.") or name == key), key=len)
            per_device[plan[owner]] += size
        for key, device in plan.items():
            if key.startswith("blocks."):
                blocks[device].append(int(key.split(".")[1]))
        result["plans"][label] = {device: {"GiB": round(per_device[device] / 2**30, 2),
                                           "blocks": f"{min(b)}-{max(b)}" if b else "none"}
                                  for device, b in ((d, blocks[d]) for d in dict.fromkeys(plan.values()))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--out", type=Path, default=RESULTS_JSON)
    parser.add_argument("--measure", nargs=3, metavar=("PATH", "FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=2, metavar=("FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:  # the child processes
        print(json.dumps(measure(*args.measure)))
        return
    if args.write:
        write_checkpoint(Path(args.write[0]), DTYPES[args.write[1]])
        return
    from hooked_gdn.files import atomic_file

    results = {"loading": {}}
    for dtype in args.dtypes:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, __file__, "--write", tmp, dtype], check=True, capture_output=True)
            weights = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
            shards = len(list(Path(tmp).glob("*.safetensors")))
            row = {"weights_bytes": weights, "shards": shards}
            for path in PATHS:
                child = subprocess.run([sys.executable, __file__, "--measure", path, tmp, dtype],
                                       capture_output=True, text=True, check=True)
                m = json.loads(child.stdout.strip().splitlines()[-1])
                m["added_over_weights"] = round((m["rss_peak"] - m["rss_before"]) / weights, 3)
                row[path] = m
            row["in_memory_over_streaming_added"] = round(row["in_memory"]["added_over_weights"] / row["streaming"]["added_over_weights"], 2)
            results["loading"][dtype] = row
        print(f"{dtype}: {weights / 2**20:.0f} MiB in {shards} shards; memory added by loading / weights: "
              f"streaming {row['streaming']['added_over_weights']:.2f} (target <= {TARGET}), "
              f"in-memory {row['in_memory']['added_over_weights']:.2f}; "
              f"load time in-memory / streaming {row['in_memory']['seconds'] / row['streaming']['seconds']:.2f}")
    results["qwen3.5-35b-a3b_planned (computed, not measured)"] = planned_memory_per_device()
    print(json.dumps(results["qwen3.5-35b-a3b_planned (computed, not measured)"], indent=1))
    with atomic_file(args.out) as f:
        f.write(json.dumps(results, indent=2) + "\n")


def results_block(results: dict | None) -> str:
    """RESULTS.md's L1 table, from ``benchmarks/results/loading.json``."""
    if results is None:
        return "Not yet run: `python -m benchmarks.bench_loading`.\n"
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    lines = ["| id | checkpoint | streaming (`from_pretrained`) | in-memory path (`load_pretrained_in_memory`, the old "
             "`from_pretrained`) | target |", "|---|---|---|---|---|"]
    for row_id, (dtype, m) in zip(("L1a", "L1b"), results["loading"].items()):
        added = lambda path: m[path]["rss_peak"] - m[path]["rss_before"]
        lines.append(f"| {row_id} | {dtype}, {mib(m['weights_bytes'])} in {m['shards']} shards | "
                     f"**{m['streaming']['added_over_weights']:.2f}×** (+{mib(added('streaming'))}; "
                     f"{mib(m['streaming']['model_bytes'])} kept: the model) | {m['in_memory']['added_over_weights']:.2f}× "
                     f"(+{mib(added('in_memory'))}) | ≤ {TARGET} |")
    lines += ["", "Load time, in-memory / streaming: " + ", ".join(
        f"{m['in_memory']['seconds'] / m['streaming']['seconds']:.1f}× ({dtype})" for dtype, m in results["loading"].items())
        + " (generated from `benchmarks/results/loading.json`)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
