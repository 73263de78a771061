"""E1: effective attention of the GDN layers, exact (ours) against TransformerLens 4.3's heuristic, on one checkpoint.

    python -m benchmarks.bench_effective_attention                  # gdn-austen, 4 held-out windows of 128 tokens
    python -m benchmarks.bench_effective_attention --model FOLDER --windows 8 --context 256

Both libraries load the same checkpoint (a transformers Qwen3.5 folder; default the shipped
gdn-austen) and read the same held-out text. Each effective attention rebuilds every GDN layer's
read o_t as Σ_j c_tj · (value at j), and is scored by its relative reconstruction error
‖ô − o‖_F / ‖o‖_F against the layer's own ``hook_recurrence_out`` (TransformerLens' against the
bridge's, ours against ours; the two reads agree, which the table also shows):

- TransformerLens 4.3 ``GatedDeltaNetBridge.compute_effective_attention``: M_tj = (q_tᵀ k_j) β_j
  Π_{s=j+1..t} α_s on v_j, with q, k as the bridge's ``hook_q``/``hook_k`` (not l2-normalised) and
  no erase term, as its docstring says;
- the same gated-linear-attention form on normalised q̂, k̂ (only the erase dropped), to separate the
  two causes;
- ours, ``hooked_gdn.effective_attention`` over the writes δ_j and over the inputs β_j v_j.

The floor is the model's own fp32 rounding: the read's distance from the plain sequential recurrence
run in fp64 on the same cached inputs (``model_vs_fp64``). Also timed, as ratios in one run:
computing all layers' patterns, ours over the inputs (a sweep over positions) and over the writes
(one batched product) / TransformerLens'. Writes ``benchmarks/results/effective_attention.json`` and ``.png`` (the
errors per layer, and one head's three patterns).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from einops import einsum

from benchmarks.provenance import provenance, run_line, write_results
from benchmarks.timing import interleaved_medians
from hooked_gdn import HookedGatedDeltaNet, gated_delta_rule_reference
from hooked_gdn.effective_attention import effective_attention
from hooked_gdn.pretrained import heldout_windows, pretrained_path
from hooked_gdn.sites import gdn_hook_name

OUT = Path(__file__).parent / "results"
RESULTS_JSON = OUT / "effective_attention.json"


def boot_bridge(folder: Path):
    """TransformerLens' bridge on the checkpoint folder, with its default (fused-kernel) GDN forward."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.generalized_components.gated_delta_net import GatedDeltaNetBridge

    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu", dtype=torch.float32)
    bridge.eval()
    mixers = {int(name.split(".")[1]): m for name, m in bridge.named_modules()
              if isinstance(m, GatedDeltaNetBridge) and name.startswith("blocks.")}
    return bridge, mixers


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


def tl_names(layer: int) -> list[str]:
    """The bridge's hook points that its effective attention and our comparison read (named as ours)."""
    return [gdn_hook_name(layer, f"hook_{n}") for n in ("q", "k", "v", "beta", "log_decay", "recurrence_out")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=pretrained_path("gdn-austen"), help="a transformers Qwen3.5 folder")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    record = provenance("bench_effective_attention", windows=args.windows, context=args.context, repeats=args.repeats)

    model = HookedGatedDeltaNet.from_pretrained(args.model, dtype=torch.float32).eval()
    bridge, mixers = boot_bridge(args.model)
    tokens = heldout_windows(model.tokenizer, args.context)[: args.windows]
    layers = list(model.cfg.gdn_layers)
    assert sorted(mixers) == layers, f"the bridge's GDN layers {sorted(mixers)} differ from ours {layers}"

    with torch.no_grad():
        _, ours = model.run_with_cache(tokens)
        _, theirs = bridge.run_with_cache(tokens, use_cache=False, names_filter=[n for layer in layers for n in tl_names(layer)])

        rows = []
        for layer in layers:
            o_ours = ours[gdn_hook_name(layer, "hook_recurrence_out")].float()
            o_tl = theirs[gdn_hook_name(layer, "hook_recurrence_out")].float()
            M = mixers[layer].compute_effective_attention(theirs, layer)  # [b, H, t, j], already β_j-weighted
            tl_read = einsum(M, theirs[gdn_hook_name(layer, "hook_v")].float(), "b h t j, b j h v -> b t h v")
            writes = effective_attention(ours, layer, "writes")
            inputs = effective_attention(ours, layer, "inputs")
            gla_normalised = einsum(writes.pattern, inputs.values, "b h t j, b j h v -> b t h v")
            fp64 = {n: ours[gdn_hook_name(layer, f"hook_{n}")].double() for n in ("read_query", "write_key", "v", "log_decay", "beta")}
            exact = gated_delta_rule_reference(fp64["read_query"], fp64["write_key"], fp64["v"], fp64["log_decay"], fp64["beta"]).out
            rows.append({
                "layer": layer,
                "reads_agree": relative_error(o_ours, o_tl),
                "transformer_lens": relative_error(tl_read, o_tl),
                "gla_normalised_qk": relative_error(gla_normalised, o_ours),
                "ours_writes": relative_error(writes.out(), o_ours),
                "ours_inputs": relative_error(inputs.out(), o_ours),
                "model_vs_fp64": relative_error(o_ours.double(), exact),
                "ours_writes_vs_fp64": relative_error(writes.out().double(), exact),
                "ours_inputs_vs_fp64": relative_error(inputs.out().double(), exact),
            })

        times = interleaved_medians({
            "inputs": lambda: [effective_attention(ours, layer, "inputs") for layer in layers],
            "writes": lambda: [effective_attention(ours, layer, "writes") for layer in layers],
            "transformer_lens": lambda: [mixers[layer].compute_effective_attention(theirs, layer) for layer in layers],
        }, args.repeats)
        t_ours, t_writes, t_tl = times["inputs"], times["writes"], times["transformer_lens"]

        # one head's patterns on the first window, as weights on v_j (ours over the inputs: c_tj β_j)
        layer, head, span = layers[len(layers) // 2], 0, min(48, args.context)
        M = mixers[layer].compute_effective_attention(theirs, layer)[0, head, :span, :span]
        inputs = effective_attention(ours, layer, "inputs", heads=head)
        exact_on_v = (inputs.pattern[0, 0] * ours[gdn_hook_name(layer, "hook_beta")][0, :, head][None])[:span, :span]
        exact_on_delta = effective_attention(ours, layer, "writes", heads=head).pattern[0, 0, :span, :span]

    checkpoint = hashlib.sha256((args.model / "model.safetensors").read_bytes()).hexdigest()[:12]
    results = {
        "provenance": record, "checkpoint": args.model.name, "model_safetensors_sha256_12": checkpoint,
        "windows": args.windows, "context": args.context, "relative_error": rows,
        "time_ratio_ours_inputs_over_transformer_lens": t_ours / t_tl,
        "time_ratio_ours_writes_over_transformer_lens": t_writes / t_tl,
        "times_s": {"ours_inputs_all_layers": t_ours, "ours_writes_all_layers": t_writes, "transformer_lens_all_layers": t_tl},
    }
    write_results(args.out / RESULTS_JSON.name, results)
    plot(rows, M, exact_on_v, exact_on_delta, layer, head, args.out / "effective_attention.png")

    print(f"checkpoint {args.model} (sha256 {checkpoint}), {args.windows} windows × {args.context} tokens")
    print("relative reconstruction error ‖ô − o‖/‖o‖ of hook_recurrence_out, per GDN layer")
    print(f"{'layer':>5} {'TL 4.3':>10} {'GLA on q̂,k̂':>12} {'ours δ':>10} {'ours βv':>10} {'model vs fp64':>14} {'reads agree':>12}")
    for r in rows:
        print(f"{r['layer']:>5} {r['transformer_lens']:>10.3g} {r['gla_normalised_qk']:>12.3g} {r['ours_writes']:>10.2g} "
              f"{r['ours_inputs']:>10.2g} {r['model_vs_fp64']:>14.2g} {r['reads_agree']:>12.2g}")
    print(f"time, all layers, / TransformerLens: ours over the inputs {t_ours / t_tl:.2f}, over the writes {t_writes / t_tl:.2f} "
          f"({t_ours * 1e3:.0f} ms, {t_writes * 1e3:.0f} ms vs {t_tl * 1e3:.0f} ms)")


def plot(rows, tl_pattern, exact_on_v, exact_on_delta, layer, head, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 4.2))
    ax = fig.add_subplot(1, 4, 1)
    keys = [("transformer_lens", "TransformerLens 4.3"), ("gla_normalised_qk", "no erase, q̂ k̂"),
            ("ours_writes", "ours, over δ"), ("ours_inputs", "ours, over βv")]
    width = 0.2
    for i, (key, label) in enumerate(keys):
        ax.bar([k + (i - 1.5) * width for k in range(len(rows))], [max(r[key], 1e-9) for r in rows], width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [f"L{r['layer']}" for r in rows])
    ax.set_ylabel("‖ô − o‖ / ‖o‖")
    ax.set_title("reconstruction error of the read")
    ax.legend(fontsize=7)
    for k, (pattern, title) in enumerate([(tl_pattern, "TransformerLens heuristic (on v)"),
                                           (exact_on_v, "exact, over the inputs (c·β, on v)"),
                                           (exact_on_delta, "exact, over the writes (on δ)")]):
        ax = fig.add_subplot(1, 4, k + 2)
        limit = float(pattern.abs().max())
        image = ax.imshow(pattern.numpy(), cmap="RdBu", vmin=-limit, vmax=limit)
        ax.set_title(f"L{layer} head {head}: {title}", fontsize=8)
        ax.set_xlabel("key position j")
        ax.set_ylabel("query position t")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


#: the relative-error columns of the E1 table: JSON key, heading
_E1_COLUMNS = (("transformer_lens", "TransformerLens 4.3 `compute_effective_attention`"),
               ("gla_normalised_qk", "its form on normalised q̂, k̂ (erase dropped)"),
               ("ours_writes", "ours, over δ_j"), ("ours_inputs", "ours, over β_j v_j"),
               ("model_vs_fp64", "the model's own fp32 read vs fp64"))


def _e(x: float) -> str:
    return f"{x:.1e}" if x < 1e-2 else f"{x:.3g}"


def results_block(results: dict | None) -> str:
    """RESULTS.md's E1 tables, from ``benchmarks/results/effective_attention.json``."""
    if results is None:
        return "Not yet run: `python -m benchmarks.bench_effective_attention`.\n"
    rows, t = results["relative_error"], results["times_s"]
    lines = [f"{run_line(results['provenance'])}, transformer_lens {results['provenance']['transformer_lens']}; the shipped "
             f"`{results['checkpoint']}`, model.safetensors sha256 `{results['model_safetensors_sha256_12']}…`, loaded by both "
             f"libraries; {results['windows']} held-out windows of {results['context']} tokens; fp32), "
             "`benchmarks/results/effective_attention.json`. Relative error ‖ô − o‖_F / ‖o‖_F per GDN layer:", "",
             "| GDN layer | " + " | ".join(h for _, h in _E1_COLUMNS) + " |", "|---" * (len(_E1_COLUMNS) + 1) + "|"]
    lines += [f"| {r['layer']} | " + " | ".join(_e(r[k]) for k, _ in _E1_COLUMNS) + " |" for r in rows]
    ms = lambda key: f"{t[key] * 1e3:.0f} ms"
    lines += ["", "| id | measure | ratio | times |", "|---|---|---|---|",
              f"| E1a | all {len(rows)} layers' patterns, ours over the inputs / TransformerLens' heuristic | "
              f"{results['time_ratio_ours_inputs_over_transformer_lens']:.2g} | {ms('ours_inputs_all_layers')} vs "
              f"{ms('transformer_lens_all_layers')} |",
              f"| E1b | all {len(rows)} layers' patterns, ours over the writes / TransformerLens' heuristic | "
              f"{results['time_ratio_ours_writes_over_transformer_lens']:.2g} | {ms('ours_writes_all_layers')} vs "
              f"{ms('transformer_lens_all_layers')} |"]
    span = lambda key: f"{_e(min(r[key] for r in rows))}–{_e(max(r[key] for r in rows))}"
    lines += ["", "Over the layers (generated from the file): TransformerLens' matrix is off by "
              f"{span('transformer_lens')}× the read's own size, its form on normalised q̂, k̂ by {span('gla_normalised_qk')}×; "
              f"ours by {span('ours_writes')} (over δ_j) and {span('ours_inputs')} (over β_j v_j), against the model's own "
              f"fp32 read's {span('model_vs_fp64')} from the fp64 recurrence; against that fp64 recurrence ours is off by "
              f"{span('ours_inputs_vs_fp64')} (inputs) and {span('ours_writes_vs_fp64')} (writes)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
