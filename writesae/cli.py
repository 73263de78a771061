"""The ``writesae`` command, the same as the Python API: its commands are the ``cmd_*`` functions, and
`DESCRIPTION` is what ``writesae --help`` says about all of them (plain text: it is read in a terminal).

Bad input ends with ``writesae <command>: error: ...`` and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from hooked_gdn.files import atomic_file
from hooked_gdn.pretrained import CENSUS_CONTEXT, CENSUS_FILE, CENSUS_TOKENS, PRETRAINED_MODELS, default_layer
from hooked_gdn.sites import KINDS

from . import __version__, distributed
from .quickstart import QuickstartConfig
from .sae import ARCHITECTURES
from .sparsity import SPARSITIES

DESCRIPTION = """\
Train, evaluate and inspect sparse autoencoders (SAEs) on the matrix memory of Gated DeltaNet
layers (and Mamba-2's and RWKV-7's): a layer's state S_t, its rank-1 write k̂_t δ_tᵀ, or RWKV-7's
rank-1 erase (a_t ⊙ κ̂_t) e_tᵀ.

examples:
  writesae quickstart                                  the main job, on the shipped model gdn-austen
  writesae train --layer 5 --steps 2000 --out runs/l5  an SAE on the bundled novels
  writesae eval runs/l5/sae --contexts 16 --out runs/l5
                                                       held-out metrics: a table, and runs/l5/eval.json
  writesae dashboard runs/l5/sae --out runs/l5/dash    then open runs/l5/dash/index.html
  writesae cache --layer 5 --out cache/l5              extract a layer's samples once ...
  writesae train --cache cache/l5 --out runs/l5-c      ... and train many SAEs from them
  writesae census                                      how long each GDN head of a model remembers

"writesae COMMAND --help" lists a command's options, with their defaults.

Text: without --data the bundled Austen novels are used, with the shipped model's held-out chapters
(Persuasion 21-24) held out. --data takes text files (.gz ones are decompressed) and folders
(their .txt and .txt.gz files, recursively); each file is one document, and a seeded 5% of them
(at least one) is held out, the same for train and eval.

Output folders: --out may be a new or existing folder. The tool writes there only the names it
lists in writesae-outputs.json, and stops before any work when a file of the same name that it did
not create is in the way.

Several processes: under "torchrun --nproc_per_node N -m writesae.cli", cache splits its shards
over the ranks and train --cache is data-parallel.

Bad input ends with "writesae COMMAND: error: ..." and exit status 2; train exits with status 1
when the SAE it saved looks diverged.
"""

EVAL_FILE = "eval.json"  # what eval writes in its --out


class _CommandHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless it has none to show (None, or False for a switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _TopHelpFormatter(argparse.RawDescriptionHelpFormatter, _CommandHelpFormatter):
    """`DESCRIPTION` as written: its examples are laid out by hand."""


def _positive_int(text: str) -> int:
    """An argparse type: counts of steps, samples, contexts, features … must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    """An argparse type: a count that may be 0 (0 turns the thing counted off)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {value}")
    return value


def _dashboard_defaults() -> dict:
    """`build_dashboard`'s keyword defaults: the command's are the library's."""
    import inspect

    from .dashboard import build_dashboard

    return {name: p.default for name, p in inspect.signature(build_dashboard).parameters.items() if p.default is not p.empty}


def _check_device(text: str | None) -> None:
    """--device names a torch device this machine has (checked once parsed, before anything runs: an
    argparse type would also check the values a later --device overrides)."""
    if text is None:
        return
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"argument --device: {text!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"argument --device: {text!r}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"argument --device: {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"argument --device: {text!r}: MPS is not available on this machine (use --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"argument --device: {text!r}: only cpu, cuda and mps devices are supported")


KIND_HELP = "the site: the state S_t, the write k̂_t δ_tᵀ, or (RWKV-7) the erase (a_t ⊙ κ̂_t) e_tᵀ"
MODEL_HELP = "a shipped model's name (gdn-austen), a checkpoint folder, or a Hugging Face hub id owner/name"
DEVICE_HELP = "torch device to run on, e.g. cuda (default: cpu; under torchrun, cuda means each rank's cuda:LOCAL_RANK)"
DTYPE_HELP = "the model's dtype (its recurrence runs in float32 whatever this is)"
SAE_HELP = "an SAE folder (cfg.json + sae_weights.safetensors), or a shipped SAE's name (gdn-austen/L5-state)"
OTHER_MODEL_HELP = ("use the SAE with --model even when its weights are not those the SAE was trained on "
                    "(a warning instead of the refusal)")
PROGRESS_HELP = "no progress bar"
STORE_SEED_HELP = "random seed: the held-out choice of --data documents and the random positions"


def _add_store_args(p: argparse.ArgumentParser, seed_help: str) -> None:
    p.add_argument("--model", default="gdn-austen", help=MODEL_HELP)
    p.add_argument("--data", nargs="+", type=Path, help="text files (.txt, .gz) or folders of them (default: the bundled novels)")
    p.add_argument("--context", type=_positive_int, default=128, help="tokens per context")
    p.add_argument("--positions", default="8", help="'all', 'final', or k: that many random positions per context")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--seed", type=int, default=0, help=seed_help)


def _command(commands, name: str, help: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, description=help, formatter_class=_CommandHelpFormatter)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="writesae", description=DESCRIPTION, formatter_class=_TopHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    quick = _command(commands, "quickstart", "the main job: train a WriteSAE on the shipped model's states and report "
                     "on held-out text (per-head FVU, CE loss recovered, top-activating contexts)")
    defaults = QuickstartConfig()  # the flags' defaults are the config's: one owner
    quick.add_argument("--model", default=defaults.model, choices=list(PRETRAINED_MODELS), help="the shipped model to study")
    quick.add_argument("--layer", type=int, help="GDN layer (default: the one with the most long-memory heads by the "
                       f"model card's census: {_default_layers()})")
    quick.add_argument("--heads", default=defaults.heads, help="'all' or comma-separated head indices")
    quick.add_argument("--n-features", type=_positive_int, default=defaults.n_features, help="features per head")
    quick.add_argument("--k", type=_positive_int, default=defaults.k, help="features active per sample and head, TopK")
    quick.add_argument("--steps", type=_positive_int, default=defaults.steps, help="training steps")
    quick.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size, help="samples per training step")
    quick.add_argument("--lr", type=float, default=defaults.lr, help="Adam's learning rate after warmup")
    quick.add_argument("--context", type=_positive_int, default=defaults.context, help="tokens per training context")
    quick.add_argument("--positions", type=_positive_int, default=defaults.positions,
                       help="training states taken per context (random, distinct positions)")
    quick.add_argument("--heldout-samples", type=_positive_int, default=defaults.heldout_samples,
                       help="held-out states, extracted once and used by every evaluation")
    quick.add_argument("--eval-contexts", type=_positive_int, default=defaults.eval_contexts,
                       help="held-out contexts for the CE with the SAE in the loop")
    quick.add_argument("--out", type=Path, default=Path("quickstart-out"), help="folder for the SAE, the plots and summary.json")
    quick.add_argument("--seed", type=int, default=defaults.seed, help="random seed: positions, shuffling, the SAE's initialisation")

    cache = _command(commands, "cache", "extract a GDN layer's states or writes once, into sharded safetensors files "
                     "(states its size on disk first, and refuses when the disk is too small)")
    _add_store_args(cache, STORE_SEED_HELP)
    cache.set_defaults(buffer_size=1)  # the store's training buffer is never filled here
    cache.add_argument("--layer", type=int, required=True, help="GDN layer")
    cache.add_argument("--heads", default="all", help="'all' or comma-separated head indices")
    cache.add_argument("--kind", choices=list(KINDS), default="state", help=KIND_HELP)
    cache.add_argument("--out", type=Path, required=True, help="the cache folder (a rerun finishes an interrupted one)")
    cache.add_argument("--shard-samples", type=_positive_int, default=4096, help="samples per shard (whole contexts)")
    cache.add_argument("--storage-dtype", choices=["float32", "bfloat16"], default="float32", help="the samples' dtype on disk")
    cache.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)

    tr = _command(commands, "train", "train an SAE on a GDN layer's states or writes")
    _add_store_args(tr, f"{STORE_SEED_HELP}, the shuffling and the SAE's initialisation")
    tr.add_argument("--buffer-size", type=_positive_int, default=4096, help="training samples in the shuffled buffer")
    tr.add_argument("--cache", type=Path, help="train from this cache (writesae cache) instead of streaming from the model; "
                    "the site, heads and corpus are the cache's")
    tr.add_argument("--layer", type=int, help="GDN layer (required without --cache)")
    tr.add_argument("--heads", help="'all' or comma-separated head indices (default: all, or the cache's)")
    tr.add_argument("--kind", choices=list(KINDS), help=f"{KIND_HELP} (default: state, or the cache's)")
    tr.add_argument("--architecture", choices=list(ARCHITECTURES), default="bilinear",
                    help="; ".join(f"{name}: {cls.summary}" for name, cls in ARCHITECTURES.items()))
    tr.add_argument("--tied", action="store_true", help="bilinear encoder tied to the decoder (U = V, P = W)")
    tr.add_argument("--n-features", type=_positive_int, default=512, help="features per head")
    tr.add_argument("--rank", type=_positive_int, default=1, help="rank of each atom, for bilinear and matrix")
    tr.add_argument("--sparsity", choices=list(SPARSITIES), default="topk", help="the activation rule")
    tr.add_argument("--k", type=_positive_int, default=16, help="features active per sample and head, for "
                    + " and ".join(name for name, rule in SPARSITIES.items() if rule.uses_k))
    tr.add_argument("--steps", type=_positive_int, default=2000, help="training steps")
    tr.add_argument("--batch-size", type=_positive_int, default=256, help="samples per training step")
    tr.add_argument("--lr", type=float, default=4e-4, help="Adam's learning rate after warmup")
    tr.add_argument("--eval-every", type=int, default=500, help="steps between held-out evaluations, and one at the end (0: none)")
    tr.add_argument("--checkpoint-every", type=int, default=500,
                    help="steps between checkpoints, and one at the end; a rerun resumes from the last (0: none)")
    tr.add_argument("--out", type=Path, default=Path("runs/sae"), help="folder for sae/, checkpoint/ and metrics.jsonl")
    tr.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    tr.add_argument("--wandb", metavar="PROJECT", help="also log to this wandb project")

    census = _command(commands, "census", "how long each GDN head remembers: decay half-lives, β, state rank")
    census.add_argument("--model", default="gdn-austen", help=MODEL_HELP)
    census.add_argument("--tokens", type=_positive_int, default=CENSUS_TOKENS, help="held-out tokens to measure on (the model card's: %(default)s)")
    census.add_argument("--context", type=_positive_int, default=CENSUS_CONTEXT, help="tokens per window, each starting from a zero state")
    census.add_argument("--state-every", type=_positive_int, default=1, help="form states at every n-th position only")
    census.add_argument("--out", type=Path, default=Path("census-out"), help="folder for census.json and half_lives.png")
    census.add_argument("--device", help=DEVICE_HELP)
    census.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)

    ev = _command(commands, "eval", f"held-out reconstruction and downstream metrics of a saved SAE: printed as a "
                  f"table, and written to {EVAL_FILE} in --out")
    ev.add_argument("sae", type=Path, help=SAE_HELP)
    _add_store_args(ev, f"{STORE_SEED_HELP} (train's, to evaluate on the documents it held out)")
    ev.set_defaults(buffer_size=1)  # the store's training buffer is never filled here
    ev.add_argument("--samples", type=_positive_int, default=4096, help="held-out samples for the reconstruction metrics")
    ev.add_argument("--contexts", type=_positive_int, default=8, help="held-out contexts for the downstream metrics")
    ev.add_argument("--mode", choices=["loop", "single"], default="loop",
                    help="loop: the SAE spliced in at every position, in the loop; single: at one random position per "
                         "context, the rest carried")
    ev.add_argument("--out", type=Path, default=Path("eval-out"), help=f"folder for {EVAL_FILE}")
    ev.add_argument("--allow-other-model", action="store_true", help=OTHER_MODEL_HELP)

    dash = _command(commands, "dashboard", "a static HTML site of an SAE's features: where they fire, the keys they "
                    "read, their effect on the logits, their ablation KL")
    dash.add_argument("sae", type=Path, help=SAE_HELP)
    dash.add_argument("--model", default="gdn-austen", help=MODEL_HELP)
    dash.add_argument("--out", type=Path, default=Path("dashboard-out"), help="folder for index.html and features/")
    dash.add_argument("--data", nargs="+", type=Path, help="text files (.txt, .gz) or folders of them; their held-out "
                      "documents are read (default: the shipped model's held-out chapters)")
    dash.add_argument("--contexts", type=_positive_int, default=32, help="held-out windows to read")
    dash.add_argument("--context", type=_positive_int, default=128, help="tokens per window")
    dash.add_argument("--features-per-head", type=_positive_int, help="pages for each head's N most frequent features (default: all)")
    dash.add_argument("--top", type=_positive_int, default=10, help="top activations shown per feature")
    dash.add_argument("--ablation-firings", type=int, default=4, help="top firings ablated per feature for the carried KL (0: none)")
    dash.add_argument("--horizon", type=_positive_int, default=8, help="positions the carried KL sums over")
    library = _dashboard_defaults()
    dash.add_argument("--loss-tokens", type=_count, default=library["loss_tokens"],
                      help="firing tokens per feature whose hover gets the loss change of a real ablation run (0: none, "
                           "the ablations skipped)")
    dash.add_argument("--quantiles", type=_positive_int, default=library["n_quantiles"],
                      help="activation quantile groups per feature")
    dash.add_argument("--quantile-contexts", type=_count, default=library["quantile_contexts"],
                      help="contexts drawn at random from each quantile group")
    dash.add_argument("--memory-views", type=_count, default=library["memory_views"],
                      help="write SAEs on Gated DeltaNet layers: positions per head shown as what the head's memory "
                           "retrieves there, those whose read from writes ≥ --memory-min-distance back is largest (0: none)")
    dash.add_argument("--memory-terms", type=_positive_int, default=library["memory_terms"],
                      help="(past write, feature) terms shown per memory view")
    dash.add_argument("--memory-min-distance", type=_count, default=library["memory_min_distance"],
                      help="tokens back a write must be for its terms to be shown in a memory view")
    dash.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward pass")
    dash.add_argument("--device", help=DEVICE_HELP)
    dash.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    dash.add_argument("--seed", type=int, default=0, help="the held-out choice of --data documents")
    dash.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    dash.add_argument("--allow-other-model", action="store_true", help=OTHER_MODEL_HELP)
    dash.set_defaults(positions="final", buffer_size=1)  # the store only cuts the windows here
    return parser


def _default_layers() -> str:
    """Each shipped model's default layer, for the help; a model whose card ships no census yet has none (the
    help must not fail on it: every command builds this parser)."""
    return ", ".join(f"{name} {default_layer(name)}" if (folder / CENSUS_FILE).exists() else f"{name}: none yet, give --layer"
                     for name, folder in PRETRAINED_MODELS.items())


def _heads(text: str):
    return "all" if text == "all" else [int(h) for h in text.split(",")]


def _positions(text: str):
    return text if text in ("all", "final") else int(text)


def _store(model, args, layer: int, heads, kind: str):
    from hooked_gdn.pretrained import austen_corpus

    from .store import ActivationStore, StoreConfig

    texts, heldout = austen_corpus() if not args.data else (args.data, None)  # Paths: files to read, never text
    cfg = StoreConfig(layer=layer, kind=kind, heads=heads, context=args.context, positions=_positions(args.positions),
                      buffer_size=args.buffer_size, heldout_documents=heldout, seed=args.seed)
    return ActivationStore(model, texts, cfg)


def _load_model(args):
    from .splice import load_model

    return load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))


def cmd_train(args) -> None:
    from hooked_gdn.sites import site_name

    from .disk_cache import CachedActivations
    from .train import TrainConfig, claim_out_dir, train

    train_cfg = TrainConfig(
        out_dir=str(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress, wandb_project=args.wandb, seed=args.seed,
    )
    if distributed.is_lead():
        claim_out_dir(train_cfg)  # refuse a file in the way now, not after loading the model and the corpus
    if args.cache:  # the SAE reads the cache's site and heads unless told otherwise (then train checks they match)
        store = CachedActivations(args.cache, buffer_size=args.buffer_size, seed=args.seed)
        m = store.manifest
        layer, kind, heads = m["layer"] if args.layer is None else args.layer, args.kind or m["kind"], m["heads"]
        d_k, d_v, model_name = m["d_k"], m["d_v"], m["model"]
    elif args.layer is None:
        raise ValueError("--layer is required (or --cache DIR, to train from a cache)")
    else:
        model = _load_model(args)
        layer, kind, heads = args.layer, args.kind or "state", "all"
        d_k, d_v, model_name = model.cfg.d_key, model.cfg.d_value, args.model
    heads = _heads(args.heads) if args.heads else heads
    sae = ARCHITECTURES[args.architecture](
        d_k=d_k, d_v=d_v, n_features=args.n_features, rank=args.rank, sparsity=args.sparsity,
        k=args.k, site=site_name(layer, kind), heads=heads, tied=args.tied, model_name=model_name,
        seed=args.seed, device=args.device,
    )
    if not args.cache:
        store = _store(model, args, layer, heads, kind)
    result = train(sae, store, train_cfg)
    if distributed.is_lead():
        print(f"saved {result.out_dir / 'sae'}")
    if result.diverged:
        raise SystemExit(f"writesae train: the saved SAE looks diverged: {result.diverged}")


def cmd_cache(args) -> None:
    from .disk_cache import OUTPUTS, write_cache
    from .outputs import claim_outputs

    if distributed.is_lead():
        claim_outputs(args.out, OUTPUTS)  # refuse a file in the way now, not after loading the model and the corpus
    model = _load_model(args)
    store = _store(model, args, args.layer, _heads(args.heads), args.kind)
    corpus = ", ".join(map(str, args.data)) if args.data else f"{args.model}'s bundled novels (its held-out chapters held out)"
    manifest = write_cache(store, args.out, model_name=args.model, corpus=corpus, shard_samples=args.shard_samples,
                           dtype=args.storage_dtype, progress=not args.no_progress)
    if distributed.is_lead():
        splits = json.loads(manifest.read_text())["splits"]
        print(f"wrote {manifest}: {splits['train']['samples']} training and {splits['heldout']['samples']} held-out samples "
              f"in {splits['train']['shards']} + {splits['heldout']['shards']} shards")


def _sae_and_model(args):
    """The SAE and the model of an eval or a dashboard, and the SAE's site, checked to fit before
    anything is computed or written; a misfit names the SAE's config file. An SAE trained on other
    weights than --model's is refused, unless --allow-other-model (then a warning)."""
    from .io import CFG_FILE, load_sae
    from .site_fit import OtherModelError, OtherModelWarning, check_sae_fits

    sae = load_sae(args.sae, device=args.device).eval()
    model = _load_model(args)
    try:
        site = check_sae_fits(sae, model, other_model="warn" if args.allow_other_model else "refuse")
    except OtherModelError as error:
        raise ValueError(f"{args.sae}: {error} (--allow-other-model to use it anyway)") from error
    except ValueError as error:
        raise ValueError(f"{args.sae / CFG_FILE}: {error}") from error
    # warned once: the tools that check the SAE again stay quiet (main's catch_warnings scopes the filter)
    warnings.filterwarnings("ignore", category=OtherModelWarning)
    return sae, model, site


def cmd_eval(args) -> None:
    from .evals import downstream_metrics, metrics_table, reconstruction_metrics, worse_than_the_mean
    from .outputs import claim_outputs

    sae, model, site = _sae_and_model(args)
    claim_outputs(args.out, [EVAL_FILE])  # once the inputs fit, and before the corpus is read and the metrics computed
    store = _store(model, args, site.layer, sae.cfg.heads, site.kind)
    if args.contexts > store.n_contexts("heldout"):
        raise ValueError(f"--contexts {args.contexts}: the held-out documents give only {store.n_contexts('heldout')} "
                         f"contexts of --context {args.context} tokens")
    recon = reconstruction_metrics(sae, store.heldout_batches(256, args.samples))
    tokens = torch.stack([store.context_tokens(i, "heldout") for i in range(args.contexts)])
    downstream = downstream_metrics(model, sae, tokens, mode=args.mode)
    heads = sae.cfg.head_indices
    print(f"{args.sae} on {args.model}: {sae.cfg.site}, {args.contexts} held-out contexts of {args.context} tokens\n")
    print(metrics_table(recon, downstream, heads, args.mode))
    worse = worse_than_the_mean(recon["fvu"], heads)
    if worse:
        warnings.warn(worse, RuntimeWarning)
    with atomic_file(args.out / EVAL_FILE) as f:
        json.dump({"sae": str(args.sae), "model": args.model, "site": sae.cfg.site, "heads": heads, "mode": args.mode,
                   "contexts": args.contexts, "context": args.context, "reconstruction": recon, "downstream": downstream},
                  f, indent=2)
        f.write("\n")
    print(f"\nwrote {args.out / EVAL_FILE}")


def cmd_quickstart(args) -> None:
    from .quickstart import format_report, run_quickstart

    summary = run_quickstart(args.out, QuickstartConfig(
        model=args.model, layer=args.layer, heads=_heads(args.heads), n_features=args.n_features, k=args.k, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, context=args.context, positions=args.positions,
        heldout_samples=args.heldout_samples, eval_contexts=args.eval_contexts, seed=args.seed))
    print(format_report(summary))
    print(f"\nwrote {args.out}/: sae/, {', '.join(summary['plots'])}, summary.json")


def cmd_census(args) -> None:
    from hooked_gdn.census import memory_census
    from hooked_gdn.pretrained import austen_documents

    from .outputs import claim_outputs

    claim_outputs(args.out, ["census.json", "half_lives.png"])
    model = _load_model(args)
    text = [doc.text for doc in austen_documents("heldout")]
    census = memory_census(model, text, context=args.context, max_tokens=args.tokens, state_every=args.state_every)
    print(census.table())
    print(census.summary())
    census.save_json(args.out / "census.json")
    census.plot_half_lives(args.out / "half_lives.png")
    print(f"wrote {args.out}/: census.json, half_lives.png")


def cmd_dashboard(args) -> None:
    from .dashboard import build_dashboard
    from .dashboard_html import check_site_folder, write_site

    sae, model, site = _sae_and_model(args)
    check_site_folder(args.out)  # a file or link in the way is refused now, not after the dashboard is computed
    store = _store(model, args, site.layer, sae.cfg.head_indices, site.kind)
    n = min(args.contexts, store.n_contexts("heldout"))
    windows = torch.stack([store.context_tokens(i, "heldout") for i in range(n)])
    dashboard = build_dashboard(model, sae, windows, features_per_head=args.features_per_head, n_contexts=args.top,
                                ablation_firings=args.ablation_firings, horizon=args.horizon, loss_tokens=args.loss_tokens,
                                n_quantiles=args.quantiles, quantile_contexts=args.quantile_contexts,
                                memory_views=args.memory_views, memory_terms=args.memory_terms,
                                memory_min_distance=args.memory_min_distance, batch_size=args.batch_size,
                                progress=not args.no_progress)
    index = write_site(dashboard, args.out, progress=not args.no_progress)
    print(f"wrote {index} and {len(dashboard.features)} feature pages in {args.out / 'features'}: open {index} in a browser")


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    command = {"train": cmd_train, "eval": cmd_eval, "quickstart": cmd_quickstart, "census": cmd_census,
               "dashboard": cmd_dashboard, "cache": cmd_cache}[args.command]

    def show_warning(message, *_) -> None:  # as the errors are shown: one line, naming the command
        print(f"writesae {args.command}: warning: {message}", file=sys.stderr)

    made = _folders_to_make(args.out)  # a failed command leaves no --out of its own making behind
    done = False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            _check_device(getattr(args, "device", None))
            if args.command in ("cache", "train"):  # under torchrun: join the process group, one device per rank
                args.device = distributed.init_from_env(args.device)
            command(args)
        done = True
    except KNOWN_ERRORS as error:  # bad input, a full disk …: its message names it; one line, no traceback
        parser.exit(2, f"writesae {args.command}: error: {_one_line(error)}\n")
    finally:
        if not done and distributed.is_lead():
            _remove_unused(made)
        distributed.close()


#: the errors `main` reports in one line with exit status 2 (a SafetensorError is how safetensors reports
#: an I/O failure such as a full disk)
KNOWN_ERRORS = (ValueError, OSError, FloatingPointError, SafetensorError)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _folders_to_make(out: Path | None) -> list[Path]:
    """The folders ``out`` and its missing parents that a command would create, innermost first."""
    missing = []
    while out is not None and not os.path.lexists(out) and out != out.parent:
        missing.append(out)
        out = out.parent
    return missing


def _remove_unused(made: list[Path]) -> None:
    """Remove the folders a failed command created, innermost first, while they hold nothing but the
    manifest it wrote; anything else in them (written by the command or by anyone) is kept."""
    from .outputs import MANIFEST

    for folder in made:
        try:
            if (folder / MANIFEST).is_file() and [p.name for p in folder.iterdir()] == [MANIFEST]:
                (folder / MANIFEST).unlink()
            folder.rmdir()  # only an empty one
        except OSError:
            return


if __name__ == "__main__":
    main(sys.argv[1:])
