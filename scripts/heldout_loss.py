"""Held-out loss of a model by window length, on the model card's text (Persuasion chapters 21–24).

    python -m scripts.heldout_loss gdn-austen --contexts 256 512 1024 --json results/heldout/gdn-austen.json

The card's protocol cuts the held-out chapters, joined with EOS, into non-overlapping windows of
``context`` tokens; each window starts from an empty memory, so longer windows reward a model
that remembers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hooked_gdn import HookedGatedDeltaNet
from hooked_gdn.pretrained import heldout_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="shipped short name or local folder")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    model = HookedGatedDeltaNet.from_pretrained(args.model).eval()
    figures = {}
    for context in args.contexts:
        nats, bpc = heldout_loss(model, context)
        figures[str(context)] = {"nats_per_token": round(nats, 4), "bits_per_char": round(bpc, 4)}
        print(f"context {context}: {nats:.4f} nats/token, {bpc:.4f} bits/char")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": " ".join(["python -m scripts.heldout_loss", *sys.argv[1:]]), "model": args.model, "by_context": figures}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
