"""P7: what a real run costs — COMPUTED from measured rates and FLOP counts, not measured end to end.

    python -m benchmarks.run_cost

The run: extract the states S_t of one GDN layer of Qwen3.5-0.8B (every head) for 100 M tokens, at 8
positions per 1024-token context, and train one 16,384-feature `BilinearMatrixSAE` (rank 1, TopK k = 32,
batch 1024, one epoch) per head on them; on one H200-class GPU and on this CPU.

Every time is FLOPs / an achieved FLOP/s, the achieved rates taken from our own measured results files:

- extraction: forward FLOPs per token (`forward_flops_per_token`: 2 × the weights run per token, plus
  the chunked recurrence and causal attention) up to and including the layer (worst case, the last GDN
  layer: every layer but the LM head), at the FLOP/s our forward achieved on the same model sizes — the
  4-layer Qwen3.5-0.8B-sized model of `benchmarks.bench_engine` (P1, our time): on the H200 from
  ``benchmarks/results/gpu_check.json`` (fp32, batch 1, T = 2048), on this CPU from
  ``benchmarks/results/bench_engine.json`` (T = 512). Batch 1 is a low rate: a batched run is faster.
- training: `benchmarks.bench_sae.training_step_flops` per sample, at the achieved rate of our measured
  BilinearMatrixSAE step at the run's shape (`run_shape_row`: 128 × 128, 16,384 features, batch 1,024): on the H200
  its ``gflop_per_s`` (gpu_check.json, fp32 without TF32; `benchmarks.gpu_check.sae_rows`), on this CPU the same
  (``benchmarks/results/sae.json``, 1 thread).

Assumed, not measured: Qwen3.5-0.8B's layer layout (`QWEN35_08B`) and the H200's datasheet peaks
(`H200`), given to show what fraction of peak the measured rates are and what TF32/bf16 would give if
that fraction held.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.bench_sae import training_step_flops
from benchmarks.gpu_check import sae_rows, source_digest
from benchmarks.provenance import provenance, write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_JSON = RESULTS / "run_cost.json"

# assumed: Qwen3.5-0.8B's text model (the sizes benchmarks.bench_engine uses; 24 layers, 3 GDN : 1 attention)
QWEN35_08B = dict(d_model=1024, d_mlp=3584, gdn_heads=16, d_k=128, d_v=128, attention_heads=8, kv_heads=2,
                  attention_head_dim=256, gdn_layers=18, attention_layers=6, vocab=248320)
# assumed: NVIDIA H200 SXM datasheet peaks (dense)
H200 = dict(fp32_flops=67e12, tf32_flops=494.7e12, bf16_flops=989.4e12, hbm_bytes_per_s=4.8e12)
RUN = dict(tokens=100_000_000, context=1024, positions_per_context=8, n_features=16384, k=32, batch=1024, rank=1)
CHUNK = 64  # the chunked delta rule's chunk


def forward_flops_per_token(gdn_layers: int, attention_layers: int, context: int, vocab: int, m=QWEN35_08B) -> float:
    """2 FLOPs per weight used per token, plus the GDN chunked recurrence and causal attention over ``context``
    (vocab: the LM head's rows, 0 without it)."""
    d, hk, hv = m["d_model"], m["gdn_heads"] * m["d_k"], m["gdn_heads"] * m["d_v"]
    mlp = 3 * d * m["d_mlp"]
    gdn = d * (2 * hk + 2 * hv + 2 * m["gdn_heads"]) + hv * d  # q, k, v, gate z, a, b in; out
    attn_q = m["attention_heads"] * m["attention_head_dim"]
    attention = d * (2 * attn_q + 2 * m["kv_heads"] * m["attention_head_dim"]) + attn_q * d  # q (with gate), k, v; o
    weights = gdn_layers * (gdn + mlp) + attention_layers * (attention + mlp) + vocab * d
    # per head and token: the state update and read (≈ 4·d_k·d_v) and the intra-chunk products (≈ 2·C·(d_k + d_v))
    recurrence = gdn_layers * m["gdn_heads"] * (4 * m["d_k"] * m["d_v"] + 2 * CHUNK * (m["d_k"] + m["d_v"]))
    attend = attention_layers * m["attention_heads"] * 2 * context * m["attention_head_dim"]  # QKᵀ and AV, causal half
    return 2 * weights + recurrence + attend


def _ms(detail: str) -> float:
    """Our time from a P1 row's detail, 'OURS ms vs THEIRS ms'."""
    return float(re.match(r"\s*([\d.]+) ms vs", detail)[1]) / 1e3


def _p1_rate(rows: list[dict], T: int, setup_layers: int, vocab: int) -> dict:
    row = next(r for r in rows if r["id"] == "P1" and f"(T={T})" in r["measure"])
    flops = T * forward_flops_per_token(setup_layers - setup_layers // 4, setup_layers // 4, T, vocab)
    return {"row": row["measure"], "seconds": _ms(row["detail"]), "flops": flops, "flops_per_s": flops / _ms(row["detail"])}


def run_shape_row(rows: list[dict], source: str = "benchmarks/results/sae.json",
                  remedy: str = "rerun `python -m benchmarks.bench_sae` with its default --max-gflop and --max-gib, "
                                "which measure it") -> dict:
    """The BilinearMatrixSAE step of ``source``'s rows (`benchmarks.bench_sae.step_row`'s) at the run's shape (`RUN`, at
    Qwen3.5-0.8B's head shape), or an error naming what is missing and ``remedy``: a rate measured at another batch
    or dictionary size is not the run's (a small batch takes another route through the bilinear encoder)."""
    m = QWEN35_08B
    for r in rows:
        if (r["architecture"], r["d_k"], r["d_v"], r["n_features"], r["batch"], r["k"]) == (
                "bilinear", m["d_k"], m["d_v"], RUN["n_features"], RUN["batch"], RUN["k"]):
            return r
    raise LookupError(f"{source} has no BilinearMatrixSAE step at the run's shape ({m['d_k']}×{m['d_v']}, "
                      f"n = {RUN['n_features']}, batch {RUN['batch']}, k = {RUN['k']}): {remedy}")


def compute() -> dict:
    gpu = json.loads((RESULTS / "gpu_check.json").read_text())
    cpu_engine = json.loads((RESULTS / "bench_engine.json").read_text())
    sae = json.loads((RESULTS / "sae.json").read_text())
    m = QWEN35_08B
    contexts = RUN["tokens"] / RUN["context"]
    samples_per_head = contexts * RUN["positions_per_context"]
    state_bytes = samples_per_head * m["gdn_heads"] * m["d_k"] * m["d_v"] * 4  # fp32
    extract_flops = RUN["tokens"] * forward_flops_per_token(m["gdn_layers"], m["attention_layers"], RUN["context"], 0)
    per_sample = training_step_flops("bilinear", RUN["batch"], RUN["n_features"], RUN["k"], m["d_k"], m["d_v"], RUN["rank"]) / RUN["batch"]
    train_flops = per_sample * samples_per_head * m["gdn_heads"]

    gpu_forward = _p1_rate(gpu["engine"]["gdn"]["by_length"]["2048"]["rows"], 2048, gpu["engine"]["gdn"]["setup"]["layers"], 4096)
    gpu_sae = run_shape_row(sae_rows(gpu["sae"]), source="benchmarks/results/gpu_check.json",
                            remedy="run `python -m benchmarks.gpu_check` on a GPU")
    gpu_train_rate = gpu_sae["gflop_per_s"] * 1e9
    cpu_forward = _p1_rate(cpu_engine["rows"], 512, cpu_engine["provenance"]["layers"], 4096)
    cpu_sae = run_shape_row(sae["rows"])
    # training on the GPU from the states/s gpu_check measured (the step as it was at that run's sources; the
    # FLOP count is today's, so a rate in FLOP/s would carry a changed step's count onto the old measurement)
    gpu_hours = {"extraction": extract_flops / gpu_forward["flops_per_s"] / 3600,
                 "training": samples_per_head * m["gdn_heads"] / gpu_sae["states_per_s"] / 3600}
    cpu_hours = {"extraction": extract_flops / cpu_forward["flops_per_s"] / 3600,
                 "training": train_flops / (cpu_sae["gflop_per_s"] * 1e9) / 3600}
    return {
        "kind": "computed (from measured rates and analytic FLOP counts; not a measured run)",
        "assumed": {"model": QWEN35_08B, "h200_peaks": H200, "run": RUN},
        "counts": {"contexts": contexts, "samples_per_head": samples_per_head, "heads": m["gdn_heads"],
                   "state_bytes_fp32": state_bytes, "extraction_flops": extract_flops,
                   "forward_flops_per_token": extract_flops / RUN["tokens"], "training_flops_per_sample": per_sample,
                   "training_flops": train_flops},
        "gpu": {"measured_inputs": {
                    "forward": {"file": "benchmarks/results/gpu_check.json", **gpu_forward,
                                "fraction_of_fp32_peak": gpu_forward["flops_per_s"] / H200["fp32_flops"]},
                    "sae_step": {"file": "benchmarks/results/gpu_check.json", "row": {k: gpu_sae[k] for k in (
                        "architecture", "d_k", "n_features", "batch", "states_per_s", "matmul_fraction", "matmul_gflop_per_s")},
                        "achieved_flops_per_s": gpu_train_rate,
                        "fraction_of_fp32_peak": gpu_train_rate / H200["fp32_flops"]},
                    "device": gpu["provenance"]["device"], "date": gpu["provenance"]["date"]},
                "hours": gpu_hours, "total_hours": sum(gpu_hours.values()),
                "training_hours_at_the_measured_fraction_of_matmul": train_flops / gpu_train_rate / 3600,
                "measured_sources_are_this_checkouts": gpu["provenance"].get("source_sha256") == source_digest(),
                "measured_commit": gpu["provenance"].get("git_commit"),
                "state_write_seconds_at_hbm_bandwidth": state_bytes / H200["hbm_bytes_per_s"],
                "if_tf32_at_the_same_fraction_hours": {
                    "extraction": extract_flops / (gpu_forward["flops_per_s"] / H200["fp32_flops"] * H200["tf32_flops"]) / 3600,
                    "training": gpu_hours["training"] * H200["fp32_flops"] / H200["tf32_flops"]}},
        "cpu": {"measured_inputs": {
                    "forward": {"file": "benchmarks/results/bench_engine.json", "threads": cpu_engine["provenance"]["cpu_threads"],
                                **cpu_forward},
                    "sae_step": {"file": "benchmarks/results/sae.json", "threads": sae["provenance"]["cpu_threads"],
                                 "row": {k: cpu_sae[k] for k in ("architecture", "d_k", "n_features", "batch",
                                                                   "gflop_per_s", "matmul_fraction")}}},
                "hours": cpu_hours, "total_hours": sum(cpu_hours.values())},
    }


def results_block(results: dict | None) -> str:
    """RESULTS.md's P7 section, from ``benchmarks/results/run_cost.json``."""
    if results is None:
        return "Not yet computed: `python -m benchmarks.run_cost`.\n"
    c, g, u, run = results["counts"], results["gpu"], results["cpu"], results["assumed"]["run"]
    gi, ui = g["measured_inputs"], u["measured_inputs"]
    return "\n".join([
        f"**Computed, not measured** (`{results['provenance']['command']}`, `benchmarks/results/run_cost.json`): "
        f"states of one GDN layer of Qwen3.5-0.8B (16 heads of 128 × 128) for {run['tokens'] / 1e6:.0f} M tokens at "
        f"{run['positions_per_context']} positions per {run['context']}-token context ({c['samples_per_head'] / 1e3:.0f} k "
        f"states per head, {c['state_bytes_fp32'] / 1e9:.0f} GB in fp32), and a {run['n_features']}-feature "
        f"BilinearMatrixSAE per head trained one epoch on them (batch {run['batch']}, k = {run['k']}).", "",
        "| | extraction | SAE training (16 heads) | total |", "|---|---|---|---|",
        f"| FLOPs | {c['extraction_flops']:.2e} | {c['training_flops']:.2e} | |",
        f"| one H200 (fp32, rates measured by gpu_check) | {g['hours']['extraction']:.2f} h | {g['hours']['training']:.2f} h | "
        f"{g['total_hours']:.2f} h |",
        f"| one H200, TF32 at the same fraction of peak | {g['if_tf32_at_the_same_fraction_hours']['extraction']:.2f} h | "
        f"{g['if_tf32_at_the_same_fraction_hours']['training']:.2f} h | |",
        f"| this CPU ({ui['forward']['threads']} threads extraction, {ui['sae_step']['threads']} thread training) | "
        f"{u['hours']['extraction']:.0f} h | {u['hours']['training']:.0f} h | {u['total_hours']:.0f} h |", "",
        f"Rates used: H200 forward {gi['forward']['flops_per_s'] / 1e12:.1f} TFLOP/s ({gi['forward']['fraction_of_fp32_peak']:.2f} "
        f"of the assumed {results['assumed']['h200_peaks']['fp32_flops'] / 1e12:.0f} TFLOP/s fp32 peak; batch 1, {gi['forward']['row']}), "
        f"SAE step {gi['sae_step']['row']['states_per_s']:.0f} states/s as measured (at commit "
        f"{(g['measured_commit'] or '?')[:12]}, "
        + ("the sources of this checkout" if g["measured_sources_are_this_checkouts"] else
           "whose sources differ from this checkout's: the step measured is not today's")
        + f"; {gi['sae_step']['achieved_flops_per_s'] / 1e12:.1f} TFLOP/s, {gi['sae_step']['row']['matmul_fraction']:.2f} of "
        f"the matmul rate measured beside it, at which today's FLOP count would take "
        f"{g['training_hours_at_the_measured_fraction_of_matmul']:.2f} h); writing the states at the assumed "
        f"{results['assumed']['h200_peaks']['hbm_bytes_per_s'] / 1e12:.1f} TB/s takes {g['state_write_seconds_at_hbm_bandwidth']:.2f} s "
        f"(storing them off the GPU is not counted). CPU: forward {ui['forward']['flops_per_s'] / 1e9:.1f} GFLOP/s, SAE step "
        f"{ui['sae_step']['row']['gflop_per_s']:.1f} GFLOP/s (BilinearMatrixSAE 128×128, n = {ui['sae_step']['row']['n_features']}, "
        f"batch {ui['sae_step']['row']['batch']}, the run's shape).",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = parser.parse_args()
    results = {"provenance": provenance("run_cost", inputs=["benchmarks/results/gpu_check.json",
                                                          "benchmarks/results/bench_engine.json",
                                                          "benchmarks/results/sae.json"]), **compute()}
    write_results(args.json, results)
    print(results_block(json.loads(args.json.read_text())))


if __name__ == "__main__":
    main()
