"""Look at a GDN layer's matrix memory on the shipped model: python -m hooked_gdn.demo

Caches hook_state of one GDN layer at a few positions of a sentence (state_positions, so only
those states are formed) and prints, per head, the state's Frobenius norm and its top singular
values: how much the memory holds, and how many directions it spreads over.
"""

from __future__ import annotations

import argparse

import torch

from .model import HookedGatedDeltaNet
from .pretrained import PRETRAINED_MODELS, default_layer
from .sites import site_name

DEFAULT_TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."


def describe_states(model: HookedGatedDeltaNet, text: str, layer: int, positions: list[int], top: int = 3) -> str:
    site = site_name(layer, "state")
    tokens = model.to_str_tokens(text)
    n = len(tokens)
    chosen = sorted({p % n for p in positions})  # the model takes increasing, distinct positions only
    _, cache = model.run_with_cache(text, names_filter=site, state_positions=chosen)
    states = cache[site][0].float()  # [P, H_v, d_k, d_v]
    singular = torch.linalg.svdvals(states)  # [P, H_v, min(d_k, d_v)]
    norms = states.flatten(-2).norm(dim=-1)
    lines = [f"{model.cfg.model_name}: {site}, {n} tokens, S_t is {tuple(states.shape[-2:])} per head", ""]
    header = "pos  token            head   ‖S‖_F   " + "  ".join(f"σ{i + 1:<5}" for i in range(top)) + "  σ1²/‖S‖²"
    lines += [header, "-" * len(header)]
    for row, p in enumerate(chosen):
        for h in range(states.shape[1]):
            label = f"{p:<4} {tokens[p]!r:<16}" if h == 0 else " " * 21
            sv = "  ".join(f"{s:6.3f}" for s in singular[row, h, :top].tolist())
            share = (singular[row, h, 0] ** 2 / norms[row, h] ** 2).item()
            lines.append(f"{label} {h:>4}  {norms[row, h].item():7.3f}   {sv}  {share:8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gdn-austen", help="a shipped model's name, a checkpoint folder or a hub id owner/name")
    parser.add_argument("--layer", type=int, help="a GDN layer (default for a shipped model: the one with the most "
                        "long-memory heads, by its census, as everywhere else; required for other models)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the text to run (default: the first sentence of Pride and Prejudice)")
    parser.add_argument("--positions", type=int, nargs="+", default=[1, 8, 16, -1],
                        help="token positions to show, negative ones counting from the end (default: 1 8 16 -1)")
    args = parser.parse_args(argv)
    if args.layer is None and args.model not in PRETRAINED_MODELS:
        parser.error(f"--layer is required for {args.model!r}: only the shipped models ({', '.join(PRETRAINED_MODELS)}) "
                     "come with the census that picks the default")
    model = HookedGatedDeltaNet.from_pretrained(args.model)
    gdn_layers = model.cfg.gdn_layers
    layer = default_layer(args.model) if args.layer is None else args.layer
    if layer not in gdn_layers:
        parser.error(f"layer {layer} is not a GDN layer; the GDN layers are {gdn_layers}")
    with torch.no_grad():
        print(describe_states(model, args.text, layer, args.positions))


if __name__ == "__main__":
    main()
