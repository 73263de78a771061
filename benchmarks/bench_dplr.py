"""D1–D7: the DPLR engine of RWKV-7 (`hooked_gdn.dplr`), as ratios measured in one run.

    python -m benchmarks.bench_dplr                 # T = 512 and 2048
    python -m benchmarks.bench_dplr --lengths 256

One layer's recurrence at RWKV-7 0.1B's sizes (12 heads of head size 64), batch 1, fp32, inputs shaped as
the layer makes them (w ∈ (0.545, 1), a ∈ (0, 1), unit κ̂):

- D1: the sequential reference / the chunked form, every read o_t.
- D2: the same with the state at every position formed (the reference forms them anyway).
- D3: one carried state edit at t = T − 10 / the clean chunked form.
- D4: the chunked DPLR form on Gated DeltaNet's inputs / GDN's own chunked engine (`hooked_gdn.delta_rule`):
  what the generality costs.

And the whole model, `HookedRWKV7`, at the same layer sizes (d_model 768, 12 heads of 64, channel mix 3072; 2
layers, vocabulary 256, random weights), against BlinkDL's reference forward (the ``rwkv`` package's
``RWKV_x070``, TorchScript, "cpu fp32"; it loops over positions, forming every state on the way) on the same
weights and threads:

- D5: BlinkDL's forward / ours (parallel), the logits of every position.
- D6: BlinkDL's forward / ours with every state of every layer cached (``run_with_cache`` of ``hook_state``).
- D7: our sequential recurrence (``recurrence="sequential"``) / our parallel forward.

Times are medians of interleaved repeats (`benchmarks.timing.interleaved_medians`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.provenance import provenance, run_line, write_results
from benchmarks.timing import interleaved_medians
from hooked_gdn.delta_rule import DEFAULT_CHUNK_SIZE as MODEL_CHUNK_SIZE, chunked_gated_delta_rule
from hooked_gdn.dplr import DEFAULT_CHUNK_SIZE, DPLREdits, chunked_dplr, dplr, dplr_reference

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "bench_dplr.json"
HEADS, HEAD_SIZE = 12, 64


def inputs(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = (1, T, HEADS, HEAD_SIZE)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    log_w = -0.6065 * torch.sigmoid(randn(*rows) - 1.0)
    a = torch.sigmoid(randn(*rows))
    kappa = torch.nn.functional.normalize(randn(*rows), dim=-1)
    return randn(*rows), log_w, kappa, a, randn(*rows), randn(*rows)


def rows_for(T: int, repeats: int) -> list[dict]:
    x = inputs(T)
    every = torch.arange(T)
    edit = DPLREdits(diff_positions=torch.tensor([T - 10]), state_diff=torch.randn(1, 1, HEADS, HEAD_SIZE, HEAD_SIZE))
    t = interleaved_medians({"reference": lambda: dplr_reference(*x), "chunked": lambda: chunked_dplr(*x),
                      "chunked_states": lambda: chunked_dplr(*x, state_positions=every),
                      "edited": lambda: dplr(*x, edits=edit)}, repeats)
    # GDN's inputs: w = α, κ̂ = k̂, a = α β, k̃ = β k̂
    q, k = (torch.nn.functional.normalize(y, dim=-1) for y in (x[0], x[2]))
    g, beta = x[1][..., 0], x[3][..., 0]
    gdn = (q, k, x[5], g, beta)
    as_dplr = (q, g[..., None].expand_as(k), k, (g.exp() * beta)[..., None].expand_as(k), beta[..., None] * k, x[5])
    t |= interleaved_medians({"gdn": lambda: chunked_gated_delta_rule(*gdn), "gdn_as_dplr": lambda: chunked_dplr(*as_dplr)}, repeats)
    ms = lambda name: f"{t[name] * 1e3:.0f} ms"
    return [
        {"id": "D1", "T": T, "measure": "sequential reference / chunked, every read", "ratio": t["reference"] / t["chunked"],
         "detail": f"{ms('reference')} vs {ms('chunked')}"},
        {"id": "D2", "T": T, "measure": "sequential reference / chunked, every state formed",
         "ratio": t["reference"] / t["chunked_states"], "detail": f"{ms('reference')} vs {ms('chunked_states')}"},
        {"id": "D3", "T": T, "measure": "one carried state edit at t = T − 10 / clean chunked", "ratio": t["edited"] / t["chunked"],
         "detail": f"{ms('edited')} vs {ms('chunked')}"},
        {"id": "D4", "T": T, "measure": "chunked DPLR on GDN's inputs / GDN's own chunked engine",
         "ratio": t["gdn_as_dplr"] / t["gdn"], "detail": f"{ms('gdn_as_dplr')} vs {ms('gdn')}"},
    ]


MODEL_LAYERS, MODEL_VOCAB, MODEL_WIDTH = 2, 256, HEADS * HEAD_SIZE


def model_rows_for(T: int, repeats: int) -> list[dict]:
    """D5–D7: `HookedRWKV7` against BlinkDL's forward on the same random weights (written as a BlinkDL .pth)."""
    os.environ["RWKV_V7_ON"] = "1"  # read when rwkv.model is imported: its RWKV-7 class
    from rwkv.model import RWKV

    from hooked_gdn.rwkv7 import HookedRWKV7
    from tests.rwkv7_models import random_blinkdl_state

    state = random_blinkdl_state(d_model=MODEL_WIDTH, head_size=HEAD_SIZE, n_layers=MODEL_LAYERS, d_vocab=MODEL_VOCAB,
                                 d_mlp=4 * MODEL_WIDTH, ranks=dict(w=64, a=64, v=32, g=128))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pth"
        torch.save(state, path)
        ours = HookedRWKV7.from_pretrained(path)
        theirs = RWKV(str(path.with_suffix("")), strategy="cpu fp32")
    tokens = torch.randint(0, MODEL_VOCAB, (1, T), generator=torch.Generator().manual_seed(1))
    ids = tokens[0].tolist()
    every_state = [f"blocks.{i}.linear_attn.hook_state" for i in range(MODEL_LAYERS)]
    gap = float((ours(tokens)[0] - theirs.forward(ids, None, full_output=True)[0]).abs().max())
    t = interleaved_medians({"blinkdl": lambda: theirs.forward(ids, None, full_output=True), "ours": lambda: ours(tokens),
                      "ours_states": lambda: ours.run_with_cache(tokens, names_filter=every_state),
                      "ours_sequential": lambda: ours(tokens, recurrence="sequential")}, repeats)
    ms = lambda name: f"{t[name] * 1e3:.0f} ms"
    return [
        {"id": "D5", "T": T, "measure": "BlinkDL's RWKV-7 forward / HookedRWKV7's, every position's logits",
         "ratio": t["blinkdl"] / t["ours"], "detail": f"{ms('blinkdl')} vs {ms('ours')}; logits agree to {gap:.1e}"},
        {"id": "D6", "T": T, "measure": "BlinkDL's forward / ours caching every state of every layer",
         "ratio": t["blinkdl"] / t["ours_states"], "detail": f"{ms('blinkdl')} vs {ms('ours_states')}"},
        {"id": "D7", "T": T, "measure": "our sequential recurrence / our parallel forward",
         "ratio": t["ours_sequential"] / t["ours"], "detail": f"{ms('ours_sequential')} vs {ms('ours')}"},
    ]


def results_block(results: dict | None) -> str:
    """RESULTS.md's D1–D7 table, from ``benchmarks/results/bench_dplr.json``."""
    if results is None:
        return "Not yet run: `python -m benchmarks.bench_dplr`.\n"
    p = results["provenance"]
    lines = [f"{run_line(p)}, rwkv {p['rwkv']}, {p['heads']} heads of {p['head_size']}, chunk {p['chunk_size']} (the "
             f"model's forward: its default chunk, {p['model_chunk_size']}), batch 1, fp32, medians of {p['repeats']} "
             "interleaved repeats), `benchmarks/results/bench_dplr.json`:", "",
             "| T | id | measure | ratio | times |", "|---|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['id']} | {r['measure']} | {r['ratio']:.2f} | {r['detail']} |" for r in results["rows"]]
    lines += ["", "Reading them (generated from the file: a ratio above 1 means the first-named side takes longer):", ""]
    lines += [f"- {_direction(results['rows'], row_id, above, below)}" for row_id, above, below in _READINGS]
    return "\n".join(lines) + "\n"


#: what each row's ratio says when it is above 1 and when below 1
_READINGS = (
    ("D1", "the chunked form is faster than the step-by-step reference for the reads alone",
     "the chunked form is slower than the step-by-step reference for the reads alone"),
    ("D2", "with every state formed, the chunked form is faster than the reference",
     "with every state formed, the chunked form is slower than the reference"),
    ("D3", "a carried edit costs more than a clean chunked forward", "a carried edit costs less than a clean chunked forward"),
    ("D4", "the DPLR engine is slower than GDN's own on GDN's inputs", "the DPLR engine is faster than GDN's own on GDN's inputs"),
    ("D5", "our whole forward is faster than BlinkDL's", "our whole forward is slower than BlinkDL's"),
    ("D6", "caching every state of every layer is faster than BlinkDL's forward (which keeps no state)",
     "caching every state of every layer is slower than BlinkDL's forward (which keeps no state)"),
    ("D7", "our sequential mode is slower than the parallel forward", "our sequential mode is faster than the parallel forward"),
)


def _direction(rows: list[dict], row_id: str, above: str, below: str) -> str:
    """One row id's reading over every T measured: which side of 1 its ratio lies on, and the ratios."""
    got = [(r["T"], r["ratio"]) for r in rows if r["id"] == row_id]
    figures = ", ".join(f"{ratio:.2f} at T = {T}" for T, ratio in got)
    if all(ratio > 1 for _, ratio in got):
        said = f"{above[0].upper()}{above[1:]} at every T"
    elif all(ratio < 1 for _, ratio in got):
        said = f"{below[0].upper()}{below[1:]} at every T"
    else:
        said = "; ".join(f"at T = {T}, {above if ratio > 1 else below}" for T, ratio in got)
        said = said[0].upper() + said[1:]
    return f"{said} ({row_id}: {figures})."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=RESULTS_JSON)
    args = parser.parse_args()
    record = provenance("bench_dplr", heads=HEADS, head_size=HEAD_SIZE, chunk_size=DEFAULT_CHUNK_SIZE,
                        model_chunk_size=MODEL_CHUNK_SIZE, repeats=args.repeats)
    start = time.perf_counter()
    with torch.no_grad():
        lengths = list(map(int, args.lengths.split(",")))
        rows = [row for T in lengths for row in rows_for(T, args.repeats)]
        rows += [row for T in lengths for row in model_rows_for(T, args.repeats)]
    results = {"provenance": record | {"wall_s": round(time.perf_counter() - start, 1)},
               "rows": rows}
    write_results(args.json, results)
    print(results_block(results))


if __name__ == "__main__":
    main()
