"""Why the shipped state SAE diverges when spliced in the loop: the state norm per head, clean and spliced.

    python -m scripts.loop_divergence    # writes results/shipped-saes/L5-state-loop-divergence.json

Splicing a state SAE in the loop makes S_t = SAE(α_t (I − β_t k̂_t k̂_tᵀ) S_{t−1} + β_t k̂_t v_tᵀ) a
feedback system: each position's state is the SAE's reconstruction of the delta rule's update of
the previous spliced state. Where the decay α is near 1 (long-memory heads), any direction along which the SAE's
reconstruction has a gain above 1 grows geometrically. This records ‖S_t‖_F per head on the first
held-out window, clean and with `gdn-austen/L5-state` spliced in the loop.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from hooked_gdn.files import atomic_file
from hooked_gdn.pretrained import heldout_windows
from hooked_gdn.sites import site_name
from writesae import load_sae
from writesae.splice import HookedSAEGatedDeltaNet

SAE, POSITIONS = "gdn-austen/L5-state", 200


@torch.no_grad()
def state_norms(model, tokens, saes=()) -> torch.Tensor:
    """‖S_t‖_F [positions, heads] of the SAE's layer, in the loop (sequential recurrence)."""
    norms = []
    record = lambda states, hook: norms.append(states[0].flatten(-2).norm(dim=-1))
    with model.saes(list(saes)):
        model.run_with_hooks(tokens, fwd_hooks=[(site_name(5, "state"), record)], recurrence="sequential")
    return torch.cat(norms)


def main() -> None:
    model = HookedSAEGatedDeltaNet.from_pretrained("gdn-austen").eval()
    tokens = heldout_windows(model.tokenizer, 512)[:1, :POSITIONS]
    clean, spliced = state_norms(model, tokens), state_norms(model, tokens, [load_sae(SAE).eval()])
    shown = [0, 10, 20, 50, 100, 150, POSITIONS - 1]
    results = {
        "provenance": {"command": shlex.join(["python", "-m", "scripts.loop_divergence", *sys.argv[1:]]), "seed": None,
                       "model": "gdn-austen", "sae": SAE,
                       "inputs": f"the first held-out window (Persuasion 21-24), its first {POSITIONS} tokens"},
        "positions": shown,
        "clean_state_norm": {t: clean[t].tolist() for t in shown},
        "spliced_state_norm": {t: spliced[t].tolist() for t in shown},
    }
    out = Path("results/shipped-saes/L5-state-loop-divergence.json")
    with atomic_file(out, "w") as f:
        f.write(json.dumps(results, indent=2, default=float).replace("Infinity", "1e308") + "\n")
    for t in shown:
        print(t, [f"{v:.3g}" for v in clean[t].tolist()], [f"{v:.3g}" for v in spliced[t].tolist()])


if __name__ == "__main__":
    main()
