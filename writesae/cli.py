"""The ``writesae`` command: ``train``, ``eval`` and ``quickstart`` (the same as the Python API).

    writesae quickstart                                   # the main job, a few minutes on 2 CPU cores
    writesae train --layer 4 --steps 2000 --out runs/l4   # an SAE on the bundled novels
    writesae eval runs/l4/sae --contexts 16

Without ``--data`` the bundled Austen novels are used, with the shipped model's held-out chapters
(Persuasion 21–24) as the held-out documents.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gdn-austen", help="shipped short name, local folder or hub id")
    p.add_argument("--data", nargs="+", help="text files or folders (default: the bundled novels)")
    p.add_argument("--context", type=int, default=128, help="tokens per context")
    p.add_argument("--positions", default="8", help="'all', 'final' or k random positions per context")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the model's dtype")
    p.add_argument("--seed", type=int, default=0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="writesae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    quick = commands.add_parser("quickstart", help="train and inspect a WriteSAE on the shipped model (the main job)")
    quick.add_argument("--layer", type=int, help="GDN layer (default: the middle one)")
    quick.add_argument("--heads", default="all", help="'all' or comma-separated head indices")
    quick.add_argument("--n-features", type=int, default=256)
    quick.add_argument("--k", type=int, default=8)
    quick.add_argument("--steps", type=int, default=400)
    quick.add_argument("--batch-size", type=int, default=128)
    quick.add_argument("--lr", type=float, default=2e-3)
    quick.add_argument("--out", type=Path, default=Path("quickstart-out"))
    quick.add_argument("--seed", type=int, default=0)

    tr = commands.add_parser("train", help="train an SAE on a GDN layer's states or writes")
    _add_store_args(tr)
    tr.add_argument("--layer", type=int, required=True)
    tr.add_argument("--heads", default="all", help="'all' or comma-separated head indices")
    tr.add_argument("--kind", choices=["state", "write"], default="state", help="the site: the state S_t or the write k̂_t δ_tᵀ")
    tr.add_argument("--architecture", choices=["bilinear", "matrix", "flat"], default="bilinear")
    tr.add_argument("--tied", action="store_true", help="bilinear encoder tied to the decoder (U = V, P = W)")
    tr.add_argument("--n-features", type=int, default=512)
    tr.add_argument("--rank", type=int, default=1)
    tr.add_argument("--sparsity", choices=["topk", "batchtopk", "relu", "jumprelu"], default="topk")
    tr.add_argument("--k", type=int, default=16)
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch-size", type=int, default=256)
    tr.add_argument("--lr", type=float, default=4e-4)
    tr.add_argument("--eval-every", type=int, default=500)
    tr.add_argument("--checkpoint-every", type=int, default=500)
    tr.add_argument("--out", type=Path, default=Path("runs/sae"))
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--wandb", metavar="PROJECT", help="also log to this wandb project")

    census = commands.add_parser("census", help="how long each GDN head remembers: decay half-lives, β, state rank")
    census.add_argument("--model", default="gdn-austen", help="shipped short name, local folder or hub id")
    census.add_argument("--tokens", type=int, default=2048, help="tokens of text to measure on")
    census.add_argument("--context", type=int, default=512, help="tokens per window (each starts from a zero state)")
    census.add_argument("--state-every", type=int, default=1, help="form states at every n-th position only")
    census.add_argument("--out", type=Path, default=Path("census-out"), help="folder for census.json and half_lives.png")
    census.add_argument("--device", default=None)
    census.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="the model's dtype")

    ev = commands.add_parser("eval", help="held-out reconstruction and downstream metrics of a saved SAE")
    ev.add_argument("sae", type=Path, help="an SAE folder (cfg.json + sae_weights.safetensors)")
    _add_store_args(ev)
    ev.add_argument("--samples", type=int, default=4096, help="held-out states for the reconstruction metrics")
    ev.add_argument("--contexts", type=int, default=8, help="held-out contexts for the downstream metrics")
    ev.add_argument("--mode", choices=["loop", "single"], default="loop")
    ev.add_argument("--json", type=Path, help="also write the metrics here")
    return parser


def _heads(text: str):
    return "all" if text == "all" else [int(h) for h in text.split(",")]


def _positions(text: str):
    return text if text in ("all", "final") else int(text)


def _store(model, args, layer: int, heads, kind: str):
    from hooked_gdn.pretrained import austen_corpus

    from .store import ActivationStore, StoreConfig

    texts, heldout = austen_corpus() if not args.data else (args.data, None)
    cfg = StoreConfig(layer=layer, kind=kind, heads=heads, context=args.context, positions=_positions(args.positions),
                      heldout_documents=heldout, seed=args.seed)
    return ActivationStore(model, texts, cfg)


def _load_model(args):
    from .splice import HookedSAEGatedDeltaNet

    return HookedSAEGatedDeltaNet.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype)).eval()


def cmd_train(args) -> None:
    from hooked_gdn.sites import site_name

    from .sae import ARCHITECTURES
    from .train import TrainConfig, train

    model = _load_model(args)
    heads = _heads(args.heads)
    sae = ARCHITECTURES[args.architecture](
        d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=args.n_features, rank=args.rank, sparsity=args.sparsity,
        k=args.k, site=site_name(args.layer, args.kind), heads=heads, tied=args.tied, model_name=args.model,
        seed=args.seed, device=args.device,
    )
    store = _store(model, args, args.layer, heads, args.kind)
    result = train(sae, store, TrainConfig(
        out_dir=str(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress, wandb_project=args.wandb, seed=args.seed,
    ))
    print(f"saved {result.out_dir / 'sae'}")


def cmd_eval(args) -> None:
    from .evals import downstream_metrics, reconstruction_metrics
    from .io import load_sae

    model = _load_model(args)
    sae = load_sae(args.sae, device=args.device).eval()
    layer = int(sae.cfg.site.split(".")[1])
    kind = "state" if sae.cfg.site.endswith("hook_state") else "write"
    store = _store(model, args, layer, sae.cfg.heads, kind)
    recon = reconstruction_metrics(sae, store.heldout_batches(256, args.samples))
    tokens = torch.stack([store.context_tokens(i, "heldout") for i in range(args.contexts)])
    downstream = downstream_metrics(model, sae, tokens, mode=args.mode)
    print("head   FVU    L0     dead   dense")
    for h, head in enumerate(sae.cfg.head_indices):
        print(f"{head:>4}   {recon['fvu'][h]:.3f}  {recon['l0'][h]:5.1f}  {recon['dead_fraction'][h]:.3f}  {recon['dense_fraction'][h]:.3f}")
    print(json.dumps(downstream, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"reconstruction": recon, "downstream": downstream}, indent=2) + "\n")


def cmd_quickstart(args) -> None:
    from .quickstart import format_report, run_quickstart

    summary = run_quickstart(args.out, layer=args.layer, heads=_heads(args.heads), n_features=args.n_features, k=args.k,
                             steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(format_report(summary))
    print(f"\nwrote {args.out}/: sae/, {', '.join(summary['plots'])}, summary.json")


def cmd_census(args) -> None:
    from hooked_gdn import HookedGatedDeltaNet
    from hooked_gdn.census import memory_census
    from hooked_gdn.pretrained import austen_documents

    from .outputs import claim_outputs

    claim_outputs(args.out, ["census.json", "half_lives.png"])
    model = HookedGatedDeltaNet.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype)).eval()
    text = [doc.text for doc in austen_documents("heldout")]
    census = memory_census(model, text, context=args.context, max_tokens=args.tokens, state_every=args.state_every)
    print(census.table())
    print(census.summary())
    census.save_json(args.out / "census.json")
    census.plot_half_lives(args.out / "half_lives.png")
    print(f"wrote {args.out}/: census.json, half_lives.png")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    {"train": cmd_train, "eval": cmd_eval, "quickstart": cmd_quickstart, "census": cmd_census}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
