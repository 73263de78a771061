"""P1–P4: the recurrence engine's speed and memory, as ratios measured in one run.

    python -m benchmarks.bench_engine --threads 1,2   # all, Qwen3.5-0.8B GDN head sizes, 4 layers; P2 at 1 and 2 threads
    python -m benchmarks.bench_engine --only P3 --layers 2

Model: H_v = 16, d_k = d_v = 128, d_model = 1024, d_mlp = 3584 (Qwen3.5-0.8B's sizes) with few
layers (3 GDN : 1 attention by default), random weights, fp32, batch 1.

- P1: forward with no hooks / transformers' Qwen3_5ForCausalLM forward (same weights).   target ≤ 1.05
- P2: caching hook_state of one layer at all T = 512 positions:
      per-token scan (our sequential mode) / ours                                      target ≥ 10
      (ours − clean forward) / the time to write that many bytes (P2b)                 target ≤ 1.5
      TransformerLens 4.3's bridge with eager_scan (its per-token scan) / ours          peer, ≥ 2
  The same P2 rows for Mamba-2 (a random ``Mamba2ForCausalLM`` loaded by both libraries, 4 layers,
  `benchmarks.gpu_check`'s builder), at mamba2-370m's layer sizes (d_model 1024, 32 heads of 64, d_state 128)
  and at a tiny size (d_model 128, 8 heads of 32, d_state 32) where per-call overheads weigh most;
  the peer column is TransformerLens' ``SSM2MixerBridge`` with ``eager_scan`` (issue 28: goal ≥ 2).
- P3: peak memory above the loaded model, caching P = 8 of T = 2048 states / no hooks.    target ≤ 1.2
- P4: one carried write edit at a late position / a clean forward.                       target ≤ 1.5

P2 runs once per ``--threads`` count (rows say which); P1, P3, P4 at the first. Times are medians of
interleaved repeats; the machine's load average is recorded before and after. P3 runs each case in a
fresh process and reads the kernel's peak-RSS counter (VmHWM, reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

from benchmarks.provenance import load_average, provenance, run_line, write_results
from benchmarks.timing import interleaved_medians
from benchmarks.tl_bridge import boot_bridge, bridge_state_hook_name
from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.loading import hf_to_hooked_state_dict
from hooked_gdn.sites import site_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "bench_engine.json"


def bench_config(layers: int, **sizes) -> Qwen3_5TextConfig:
    """Qwen3.5-0.8B's sizes with ``layers`` layers; ``sizes`` overrides any (a smaller model to test a script)."""
    return Qwen3_5TextConfig(**dict(
        vocab_size=4096, hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    ) | sizes)


def models(layers: int, **sizes):
    torch.manual_seed(0)
    hf = Qwen3_5ForCausalLM(bench_config(layers, **sizes)).eval()
    ours = HookedGatedDeltaNet.from_config(hf.config).eval()
    ours.load_state_dict(hf_to_hooked_state_dict(hf.state_dict(), ours.cfg))
    return hf, ours


def p1(hf, ours, repeats: int, T: int = 512) -> list[tuple]:
    tokens = torch.randint(0, 4096, (1, T), device=ours.W_E.device)
    t = interleaved_medians({"ours": lambda: ours(tokens), "transformers": lambda: hf(tokens).logits}, repeats)
    return [("P1", f"forward, no hooks / transformers (T={T})", t["ours"] / t["transformers"], "≤ 1.05",
             f"{t['ours'] * 1e3:.0f} ms vs {t['transformers'] * 1e3:.0f} ms")]


def p2(hf, ours, repeats: int, T: int = 512) -> list[tuple]:
    """On the model's device (a GPU too: the bytes are then written by a device copy)."""
    device = ours.W_E.device
    tokens = torch.randint(0, 4096, (1, T), device=device)
    layer = ours.cfg.gdn_layers[0]
    site = site_name(layer, "state")
    shape = (1, T, ours.cfg.n_value_heads, ours.cfg.d_key, ours.cfg.d_value)
    source = torch.randn(shape, device=device)
    fns = {
        "clean": lambda: ours(tokens),
        "cached": lambda: ours.run_with_cache(tokens, names_filter=site),
        "write bytes": lambda: torch.empty(shape, device=device).copy_(source),
    }
    t = interleaved_medians(fns, repeats)
    scans = {"scan": lambda: ours.run_with_cache(tokens, names_filter=site, recurrence="sequential")}
    with tempfile.TemporaryDirectory() as folder:
        try:  # TransformerLens 4.3's per-token eager scan, on the same weights, if its bridge boots them
            hf.save_pretrained(folder)
            bridge = boot_bridge(folder, device=str(device))
            name = bridge_state_hook_name(bridge, layer)
            scans["TransformerLens"] = lambda: bridge.run_with_cache(tokens, names_filter=name, use_cache=False)
        except (RuntimeError, ValueError) as err:
            print(f"P2: no TransformerLens column ({err})")
        scan = interleaved_medians(scans, max(1, repeats // 3))
    gib = source.numel() * 4 / 2**30
    rows = [
        ("P2a", f"per-token scan (our sequential mode) / ours, all T={T} states of one layer", scan["scan"] / t["cached"],
         "≥ 10", f"{scan['scan'] * 1e3:.0f} ms vs {t['cached'] * 1e3:.0f} ms"),
        ("P2b", "(ours − clean forward) / writing the same bytes", (t["cached"] - t["clean"]) / t["write bytes"], "≤ 1.5",
         f"{(t['cached'] - t['clean']) * 1e3:.0f} ms vs {t['write bytes'] * 1e3:.0f} ms for {gib:.2f} GiB"),
    ]
    if "TransformerLens" in scan:
        rows.append(("P2c", "TransformerLens 4.3 bridge, eager_scan state cache / ours", scan["TransformerLens"] / t["cached"],
                     "≥ 2", f"{scan['TransformerLens'] * 1e3:.0f} ms vs {t['cached'] * 1e3:.0f} ms"))
    return rows


# run by ``python -c`` in the repository root, which is then first on the child's path
P3_CHILD = """
import torch
from benchmarks.bench_engine import models
from hooked_gdn.sites import site_name
_, model = models({layers})
tokens = torch.randint(0, 4096, (1, 2048))
site = site_name(model.cfg.gdn_layers[0], "state")
def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
with torch.no_grad():
    model(tokens[:, :64])  # load lazily initialised kernels before measuring
    base = rss_kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    if {cache}:
        model.run_with_cache(tokens, names_filter=site, state_positions=list(range(0, 2048, 256)))
    else:
        model(tokens)
    print(rss_kib("VmHWM") - base)
"""


def p3(layers: int) -> list[tuple]:
    peaks = {}
    for case in (False, True):
        code = P3_CHILD.format(layers=layers, cache=case)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        peaks[case] = int(out.stdout.strip().splitlines()[-1])
    return [("P3", "peak memory, 8 of T=2048 states cached / no hooks", peaks[True] / peaks[False], "≤ 1.2",
             f"{peaks[True] / 1024:.0f} MiB vs {peaks[False] / 1024:.0f} MiB above the loaded model")]


def p4(ours, repeats: int) -> list[tuple]:
    T = 512
    tokens = torch.randint(0, 4096, (1, T))
    site = site_name(ours.cfg.gdn_layers[-1], "write")

    def delete_late_write(x, hook):
        x = x.clone()
        x[:, T - 10, 3] = 0
        return x

    fns = {"clean": lambda: ours(tokens), "edited": lambda: ours.run_with_hooks(tokens, fwd_hooks=[(site, delete_late_write)])}
    t = interleaved_medians(fns, repeats)
    return [("P4", "one carried write edit at t = T−10 / clean forward", t["edited"] / t["clean"], "≤ 1.5",
             f"{t['edited'] * 1e3:.0f} ms vs {t['clean'] * 1e3:.0f} ms")]


MAMBA2_SIZES = {"mamba2-370m layer": {}, "tiny": "SMALL_MAMBA2"}  # gpu_check's sizes: its defaults, its --small ones


def mamba2_p2(repeats: int, layers: int, T: int = 512) -> list[tuple]:
    """P2's rows for Mamba-2 at each of MAMBA2_SIZES, ids marked "·M2", measures naming the size."""
    from benchmarks import gpu_check

    rows = []
    for label, sizes in MAMBA2_SIZES.items():
        hf, ours = gpu_check._mamba2_models(layers, **(getattr(gpu_check, sizes) if isinstance(sizes, str) else sizes))
        rows += [(f"{rid}·M2", f"Mamba-2 ({label} sizes): {what}", *rest) for rid, what, *rest in p2(hf, ours, repeats, T)]
        del hf, ours
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="P1,P2,P2M2,P3,P4", help="any of P1, P2 (GDN), P2M2 (Mamba-2), P3, P4")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma-separated CPU thread counts to run P2 at (P1, P3, P4 run at the first)")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON,
                        help=f"where the rows and their provenance go (default {RESULTS_JSON.relative_to(ROOT)})")
    args = parser.parse_args()
    wanted = args.only.split(",")
    thread_counts = [int(n) for n in args.threads.split(",")]
    record = provenance("bench_engine", cpu_threads=thread_counts, layers=args.layers, repeats=args.repeats)
    start = time.perf_counter()
    rows = []  # (threads, id, measure, ratio, target, detail)
    with torch.no_grad():
        for i, threads in enumerate(thread_counts):
            torch.set_num_threads(threads)
            at = lambda new: [(threads, *row) for row in new]
            if {"P1", "P2", "P4"} & set(wanted):
                hf, ours = models(args.layers)
                if "P1" in wanted and i == 0:
                    rows += at(p1(hf, ours, args.repeats))
                if "P2" in wanted:
                    rows += at(p2(hf, ours, args.repeats))
                if "P4" in wanted and i == 0:
                    rows += at(p4(ours, args.repeats))
                del hf, ours
            if "P2M2" in wanted:
                rows += at(mamba2_p2(args.repeats, args.layers))
        torch.set_num_threads(thread_counts[0])
    if "P3" in wanted:
        rows += [(thread_counts[0], *row) for row in p3(args.layers)]
    print(f"torch {torch.__version__}, {args.layers} layers, fp32, batch 1, "
          f"load average {record['load_average_before']} -> {load_average()}\n")
    print("| threads | id | measure | ratio | target | times |\n|---|---|---|---|---|---|")
    for threads, rid, what, ratio, target, detail in rows:
        print(f"| {threads} | {rid} | {what} | {ratio:.2f} | {target} | {detail} |")
    results = {"provenance": record | {"wall_s": round(time.perf_counter() - start, 1)},
               "rows": [dict(zip(("threads", "id", "measure", "ratio", "target", "detail"), r)) for r in rows]}
    write_results(args.json, results)


def results_block(results: dict | None) -> str:
    """RESULTS.md's P1–P4 table, from ``benchmarks/results/bench_engine.json``."""
    if results is None:
        return "Not yet run: `python -m benchmarks.bench_engine`.\n"
    p = results["provenance"]
    threads = p["cpu_threads"] if isinstance(p["cpu_threads"], list) else [p["cpu_threads"]]
    lines = [f"{run_line(p, threads='/'.join(map(str, threads)) + ' CPU threads')}, transformers {p['transformers']}, "
             f"{p['layers']} layers, medians of {p['repeats']} interleaved repeats), `benchmarks/results/bench_engine.json`:", "",
             "| threads | id | measure | ratio | target | times |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.get('threads', threads[0])} | {r['id']} | {r['measure']} | {r['ratio']:.2f} | {r['target']} | {r['detail']} |"
              for r in results["rows"]]
    met = [r for r in results["rows"] if _meets(r["ratio"], r["target"])]
    missed = [r for r in results["rows"] if r not in met]
    name = lambda r: r["id"] + (f" ({r['measure'].split('(')[1].split(')')[0]})" if "·" in r["id"] else "")
    lines += ["", f"Targets met: {', '.join(map(name, met)) or 'none'}; missed: {', '.join(map(name, missed)) or 'none'} "
                  "(generated from the file)."]
    return "\n".join(lines) + "\n"


def _meets(ratio: float, target: str) -> bool:
    """Whether a ratio meets a target written as ``≤ x`` or ``≥ x``, at the table's two decimals."""
    bound, value = target.split()
    return round(ratio, 2) <= float(value) if bound == "≤" else round(ratio, 2) >= float(value)


if __name__ == "__main__":
    main()
