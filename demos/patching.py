"""Activation patching over the GDN memory of the shipped model: where does a name's gender travel?

    python -m demos.patching        # about 12 s on 2 CPU cores; writes demos/results/patching/{patching.png, results.json}

Clean:     "The rain had not stopped all the morning. Elizabeth walked slowly home, and as"  (→ " she")
Corrupted: the same with " Darcy" for " Elizabeth"                                     (→ " he")

Metric: the logit difference logit(" she") − logit(" he") at the last position, normalised as
(LD_patched − LD_corrupted) / (LD_clean − LD_corrupted): 0 is the corrupted run, 1 the clean run.
Patched from the clean run into the corrupted one, per GDN layer and position over all heads: the
state S_t, the write k̂_t δ_tᵀ (both sides) and the read o_t, and each in every GDN layer at once
(the heatmap's "all" row: how much of the effect the memory carries at that position); and the
state per layer and head at every position at once. State and write patches carry forward through the recurrence. Everything
is deterministic (fp32, no sampling); results.json records the grids and the largest entries.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from demos.common import save_figure, write_json
from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.patching import (
    MEMORY_SITES,
    generic_activation_patch,
    get_act_patch_memory_every,
    get_act_patch_state,
    logit_diff_recovered,
    plot_patching_heatmap,
    position_labels,
)

CLEAN = "The rain had not stopped all the morning. Elizabeth walked slowly home, and as"
CORRUPTED = "The rain had not stopped all the morning. Darcy walked slowly home, and as"
ANSWER, WRONG = " she", " he"


def top_entries(grid: torch.Tensor, rows: list[str], cols: list[str], n: int = 3) -> list[dict]:
    order = grid.flatten().argsort(descending=True)[:n]
    return [{"row": rows[i // grid.shape[1]], "col": cols[i % grid.shape[1]], "value": round(float(grid.flatten()[i]), 4)}
            for i in order.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gdn-austen")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "patching")
    args = parser.parse_args()
    torch.manual_seed(0)

    model = HookedGatedDeltaNet.from_pretrained(args.model, dtype=torch.float32).eval()
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    metric = logit_diff_recovered(model, clean, corrupted, ANSWER, WRONG)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda name: ".linear_attn." in name)

    every = get_act_patch_memory_every(model, corrupted, clean_cache, metric)  # [3 sites, layer, pos]
    all_layers = torch.stack([generic_activation_patch(model, corrupted, clean_cache, metric, site, ("pos",))
                              for site in MEMORY_SITES])  # [3 sites, pos]: every GDN layer at once
    by_head = get_act_patch_state(model, corrupted, clean_cache, metric, ("layer", "head"))  # [layer, head]

    layers = [f"L{layer}" for layer in model.cfg.gdn_layers]
    positions = position_labels(model, clean)
    swapped = int((clean != corrupted).nonzero()[0, 1])
    fig = plot_patching_heatmap(
        torch.cat([every, all_layers[:, None]], 1), row_labels=layers + ["all"], col_labels=positions, ylabel="GDN layer",
        panel_titles=[f"{site} patched (all heads)" for site in MEMORY_SITES],
        colorbar_label="logit diff. recovered", title=f"{ANSWER!r} vs {WRONG!r} after a name swap at position {swapped}")
    args.out.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.out / "patching.png")

    heads = [f"h{h}" for h in range(by_head.shape[1])]
    results = {
        "command": "python -m demos.patching",
        "model": args.model,
        "clean": CLEAN, "corrupted": CORRUPTED, "answer": ANSWER, "wrong": WRONG,
        "swapped_position": swapped, "tokens": model.to_str_tokens(clean[0]),
        "logit_diff_clean": round(metric.clean, 4), "logit_diff_corrupted": round(metric.corrupted, 4),
        "metric": "(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted), LD = logit(answer) - logit(wrong) at the last position",
        "layers": list(model.cfg.gdn_layers),
        "grids": {site: every[i].round(decimals=4).tolist() for i, site in enumerate(MEMORY_SITES)},
        "grids_all_gdn_layers_at_once": {site: all_layers[i].round(decimals=4).tolist() for i, site in enumerate(MEMORY_SITES)},
        "state_by_layer_and_head_all_positions": by_head.round(decimals=4).tolist(),
        "top": {**{site: top_entries(every[i], layers, positions) for i, site in enumerate(MEMORY_SITES)},
                **{f"{site}_all_gdn_layers": top_entries(all_layers[i:i + 1], ["all"], positions)
                   for i, site in enumerate(MEMORY_SITES)},
                "state_by_head": top_entries(by_head, layers, heads)},
        "last_position": {site: {layer: round(float(every[i, k, -1]), 4) for k, layer in enumerate(layers)}
                          for i, site in enumerate(MEMORY_SITES)},
    }
    write_json(args.out / "results.json", results)
    print(f"logit diff {ANSWER!r} − {WRONG!r}: clean {metric.clean:.3f}, corrupted {metric.corrupted:.3f}")
    for site in results["top"]:
        print(f"largest recovery, {site}: " + ", ".join(f"{e['row']} {e['col']} {e['value']:.3f}" for e in results["top"][site]))
    print(f"wrote {args.out / 'patching.png'} and {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
