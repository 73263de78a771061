"""Train and save the shipped ``gdn-austen`` model: a BPE tokenizer and a small Qwen3.5 hybrid.

    python -m scripts.train_pretrained --threads 1

Reproduces ``hooked_gdn/pretrained/gdn-austen`` (config.json, model.safetensors, tokenizer files,
README.md model card with its memory census) from the bundled novels. It uses transformers'
``Qwen3_5ForCausalLM`` so the shipped weights are exactly what transformers would train;
``HookedGatedDeltaNet`` loads them through the ordinary checkpoint path. The cosine schedule is laid
over ``--steps``; ``--minutes`` only stops a run early (it then resumes from its checkpoint).

Decay initialisation spans timescales, because transformers' default (A ~ U(0.01, 16), dt_bias = 1,
so g ≈ -1.3 A) starts almost every head below a one-token half-life and training never moves them
(shared/notes/memory-pilot.md). With g_t = -A · softplus(a_t + dt_bias) and half-life ln ½ / g:

- learned heads: A ~ U(1, 16) and dt ~ log-uniform[1e-3, 1e-1] through dt_bias = softplus⁻¹(dt), as
  Mamba-2 and flash-linear-attention do; A_log, dt_bias, norm weights and biases get no weight decay
  (decay pulls A_log and dt_bias to 0, i.e. g → -0.69, a one-token half-life);
- fixed-decay heads (``--fixed-heads``, the same value heads in every GDN layer): a constant decay
  (A = 1, in_proj_a row zero, all three frozen) whose half-lives are log-spaced over
  ``--fixed-half-lives`` across layers, a RetNet-style spectrum. They only fix *how long* the state
  remembers; what is written (k, v, β) and read (q) is learned as everywhere else.

The weights are saved in fp16, not bf16: bf16's 8-bit mantissa costs 0.0009 nats/token of held-out
loss, more than this version's margin over the first one; fp16's 11 bits cost nothing at 4 decimals,
and the weights are far inside fp16's range (the card reports both).

The run checkpoints to ``--checkpoint`` every ``--checkpoint-every`` steps (one file, replaced
atomically: model, optimiser, schedule, the batch sampler's generator) and resumes from it bit-exactly.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3_5ForCausalLM, Qwen3_5TextConfig

from hooked_gdn.files import atomic_file
from hooked_gdn.pretrained import (
    CENSUS_FILE, HELDOUT_CONTEXT, PRETRAINED_MODELS, austen_documents, heldout_census, heldout_loss, heldout_windows,
)

EOS = "<|endoftext|>"


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((d.text for d in austen_documents("train")), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None)


def model_config(vocab_size: int, eos_id: int) -> Qwen3_5TextConfig:
    return Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=8,  # layers 3 and 7 are attention: GDN : attention = 3 : 1
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def gdn_mixers(model: Qwen3_5ForCausalLM) -> list[torch.nn.Module]:
    return [layer.linear_attn for layer in model.model.layers if hasattr(layer, "linear_attn")]


def softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def fixed_half_lives(n_layers: int, n_heads: int, lo: float, hi: float) -> torch.Tensor:
    """[n_layers, n_heads] half-lives log-spaced over [lo, hi]; head slot s of layer l takes entry
    s·n_layers + l, so every layer gets one from each part of the range."""
    spectrum = torch.logspace(math.log10(lo), math.log10(hi), n_layers * n_heads, dtype=torch.float64)
    return spectrum.view(n_heads, n_layers).T


def timescale_init_(model: Qwen3_5ForCausalLM, generator: torch.Generator, fixed_heads: list[int],
                    half_life_range: tuple[float, float]) -> list[torch.Tensor]:
    """Initialise every GDN layer's decay (see the module docstring) and freeze the fixed heads'.

    Returns the gradient hooks' handles (kept so the masks stay registered)."""
    mixers = gdn_mixers(model)
    half_lives = fixed_half_lives(len(mixers), len(fixed_heads), *half_life_range)
    handles = []
    with torch.no_grad():
        for mixer, layer_half_lives in zip(mixers, half_lives):
            n = mixer.A_log.numel()
            A = torch.empty(n, dtype=torch.float64).uniform_(1, 16, generator=generator)
            dt = torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e-1), generator=generator).exp()
            fixed = torch.tensor(fixed_heads, dtype=torch.long)
            A[fixed] = 1.0
            dt[fixed] = math.log(2) / layer_half_lives  # softplus(dt_bias) · A = ln 2 / half-life
            mixer.A_log.copy_(A.log())
            mixer.dt_bias.copy_(softplus_inverse(dt))
            mixer.in_proj_a.weight[fixed] = 0.0
            learned = torch.ones(n, dtype=torch.bool)
            learned[fixed] = False
            for param, mask in ((mixer.A_log, learned), (mixer.dt_bias, learned), (mixer.in_proj_a.weight, learned[:, None])):
                handles.append(param.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype)))
    return handles


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on A_log, dt_bias, norm weights or biases."""
    no_decay = lambda name, p: p.ndim < 2 or name.endswith(("A_log", "dt_bias")) or "norm" in name
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
    ]


@dataclass(frozen=True)
class TrainSettings:
    context: int = 512
    batch: int = 8
    steps: int = 1400
    lr: float = 3e-3
    weight_decay: float = 0.1
    seed: int = 0
    fixed_heads: tuple[int, ...] = (1, 3)
    fixed_half_lives: tuple[float, float] = (16.0, 1024.0)


def build_model(config: Qwen3_5TextConfig, settings: TrainSettings) -> Qwen3_5ForCausalLM:
    torch.manual_seed(settings.seed)
    model = Qwen3_5ForCausalLM(config)
    generator = torch.Generator().manual_seed(settings.seed)
    timescale_init_(model, generator, list(settings.fixed_heads), settings.fixed_half_lives)
    return model


def transformers_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits


def train(model: Qwen3_5ForCausalLM, stream: torch.Tensor, settings: TrainSettings, checkpoint: Path,
          checkpoint_every: int = 100, minutes: float = math.inf, on_step=None, logits_of=transformers_logits,
          groups=parameter_groups) -> int:
    """Train ``model`` on random windows of ``stream`` until ``settings.steps`` (or ``minutes``);
    resume from ``checkpoint`` if it exists. Returns the step reached. ``logits_of(model, tokens)`` runs the
    model (a transformers model by default); ``groups(model, weight_decay)`` gives the optimiser's groups."""
    optimizer = torch.optim.AdamW(groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95))
    warmup = max(1, settings.steps // 30)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, settings.steps) / settings.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    sampler = torch.Generator().manual_seed(settings.seed)
    step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        if state["settings"] != asdict(settings):
            raise ValueError(f"{checkpoint} was written with settings {state['settings']}, not {asdict(settings)}; "
                             "resume with the same settings or remove it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.set_state(state["sampler"])
        step = state["step"]
        print(f"resuming from {checkpoint} at step {step}", flush=True)
    start = time.time()
    model.train()
    while step < settings.steps and time.time() - start < minutes * 60:
        offsets = torch.randint(0, len(stream) - settings.context - 1, (settings.batch,), generator=sampler)
        batch = torch.stack([stream[o : o + settings.context + 1] for o in offsets.tolist()])
        logits = logits_of(model, batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        if on_step is not None:
            on_step(step, loss.item())
        if step % checkpoint_every == 0 or step == settings.steps:
            save_checkpoint(checkpoint, {
                "settings": asdict(settings), "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "sampler": sampler.get_state(),
            })
    return step


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_file(path, "wb") as f:
        torch.save(state, f)


def small_model_arguments(description: str, out: Path, checkpoint_every: int) -> argparse.ArgumentParser:
    """The command line of the small shipped models' scripts (mamba2-austen, rwkv7-austen): mamba2-austen's
    schedule (400 steps of 8 windows of 256 tokens, lr 3e-3, seed 0, one thread) by default, the checkpoint in
    runs/<model>-train/."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--checkpoint", type=Path, default=Path("runs") / f"{out.name}-train" / "checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--minutes", type=float, default=math.inf, help="stop early (resume later from the checkpoint)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--card-only", action="store_true", help="only rewrite README.md (and its census) from the saved model")
    return p


def ship_folder(out: Path, write_weights, tokenizer, stats: dict, samples: list) -> None:
    """A shipped model's folder, written whole then moved into place: ``write_weights(folder)`` (its config and
    weights), the tokenizer, training_stats.json and samples.json, every file readable by anyone."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out.parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would ship an unreadable folder
    write_weights(Path(tmp))
    tokenizer.save_pretrained(tmp)
    Path(tmp, "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    Path(tmp, "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    for file in Path(tmp).iterdir():  # safetensors writes 0600: ship files anyone can read
        file.chmod(0o644)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def token_stream(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    ids: list[int] = []
    for doc in austen_documents("train"):
        ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


@torch.no_grad()
def transformers_heldout_loss(model: Qwen3_5ForCausalLM, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(chunk).logits.float()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


RESULTS = Path(__file__).parents[1] / "results"
PREVIOUS_CENSUS = RESULTS / "census" / "gdn-austen-v1" / "census.json"
PREVIOUS_HELDOUT = RESULTS / "heldout" / "gdn-austen-v1.json"  # scripts/heldout_loss.py on the first version
SECOND_CYCLE = RESULTS / "heldout" / "gdn-austen-second-cycle.json"
CARD_CONTEXTS = (256, 512, 1024)


def model_census(model, folder: Path):
    """The card's memory census of ``model``, written into its ``folder`` (census.json, half_lives.png)."""
    census = heldout_census(model)
    census.save_json(folder / CENSUS_FILE)
    census.plot_half_lives(folder / "half_lives.png")
    return census


def write_model_card(folder: Path) -> None:
    """README.md beside the weights, from the figures the training run saved and a fresh census."""
    from hooked_gdn import HookedGatedDeltaNet
    from hooked_gdn.census import LONG_MEMORY, VERY_LONG_MEMORY, MemoryCensus

    stats = json.loads((folder / "training_stats.json").read_text())
    samples = json.loads((folder / "samples.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    settings = stats["settings"]
    model = HookedGatedDeltaNet.from_pretrained(folder).eval()
    census = model_census(model, folder)
    previous = MemoryCensus.load_json(PREVIOUS_CENSUS) if PREVIOUS_CENSUS.exists() else None
    by_context = {c: heldout_loss(model, c)[1] for c in CARD_CONTEXTS}
    bf16_loss, bf16_bpc = heldout_loss(copy.deepcopy(model).to(torch.bfloat16).float())
    previous_by_context = json.loads(PREVIOUS_HELDOUT.read_text())["by_context"] if PREVIOUS_HELDOUT.exists() else {}
    ranked = lambda c: sum(r.effective_rank >= 4 for r in c.heads)
    layer_kinds = ", ".join("GDN" if t == "linear_attention" else "attention" for t in config["layer_types"])
    lines = [
        "# gdn-austen",
        "",
        "A small Qwen3.5-architecture hybrid (Gated DeltaNet : gated attention = 3 : 1) trained from scratch on",
        "Jane Austen's six novels, shipped so that `hooked_gdn` and `writesae` run on real weights offline.",
        "Reproduce it with `python -m scripts.train_pretrained` (a BPE tokenizer and the model, both on the same text;",
        "seed, settings and the document split are in the script and in `training_stats.json`).",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {stats['parameters'] / 1e6:.2f} M (weights stored in fp16) |",
        f"| layers | {len(config['layer_types'])}: {layer_kinds} |",
        f"| d_model / d_mlp | {config['hidden_size']} / {config['intermediate_size']} |",
        f"| GDN heads | H_k = {config['linear_num_key_heads']}, H_v = {config['linear_num_value_heads']}, "
        f"d_k = {config['linear_key_head_dim']}, d_v = {config['linear_value_head_dim']} |",
        f"| attention heads | {config['num_attention_heads']} query, {config['num_key_value_heads']} KV, d_head = {config['head_dim']} |",
        f"| vocabulary | {config['vocab_size']} byte-level BPE tokens, `<|endoftext|>` = EOS |",
        f"| training | {stats['steps']} steps × {settings['batch']} windows of {settings['context']} tokens "
        f"({stats['train_tokens_seen'] / 1e6:.1f} M tokens seen), AdamW lr {settings['lr']}, seed {settings['seed']}, on CPU |",
        f"| **held-out loss** | **{stats['heldout_loss']:.4f}** nats/token |",
        f"| **held-out bits per character** | **{stats['heldout_bits_per_char']:.4f}** |",
        f"| GDN heads with median half-life ≥ {LONG_MEMORY} / ≥ {VERY_LONG_MEMORY} tokens | {census.count(LONG_MEMORY)} / "
        f"{census.count(VERY_LONG_MEMORY)} of {len(census.heads)} |",
        f"| GDN heads with state effective rank ≥ 4 | {ranked(census)} of {len(census.heads)} |",
        f"| default layer (most heads with half-life ≥ {LONG_MEMORY}) | {census.long_memory_layer()} |",
        "",
        "Held-out text: Persuasion, chapters 21-24 (never trained on), as chapter documents joined with EOS,",
        f"cut into non-overlapping windows of {stats['context']} tokens ({stats['heldout_tokens']} tokens,",
        f"{stats['heldout_characters']} characters); mean next-token cross-entropy, in fp32.",
        f"The weights ship in fp16: rounded to bf16 instead they would score {bf16_loss:.4f} nats/token",
        f"({bf16_bpc:.4f} bits/char).",
        "",
        "Held-out bits per character by window length (each window starts from an empty memory;",
        "`scripts/heldout_loss.py`):",
        "",
        "| window (tokens) | " + " | ".join(str(c) for c in CARD_CONTEXTS) + " |",
        "|---|" + "---|" * len(CARD_CONTEXTS),
        "| this version | " + " | ".join(f"{by_context[c]:.4f}" for c in CARD_CONTEXTS) + " |",
    ]
    if previous_by_context:
        before = {c: previous_by_context[str(c)]["bits_per_char"] for c in CARD_CONTEXTS}
        lines.append("| the first version | " + " | ".join(f"{before[c]:.4f}" for c in CARD_CONTEXTS) + " |")
        lines += ["", "Change against the first version (negative is better): "
                  + ", ".join(f"{by_context[c] - before[c]:+.4f} at {c}" for c in CARD_CONTEXTS) + " bits/char."]
    lines += [
        "",
        "## Decay initialisation (changed in this version)",
        "",
        "The first `gdn-austen` used transformers' initialisation (A ~ U(0.01, 16), dt_bias = 1, so",
        "g ≈ −1.3·A) and decayed every parameter; almost all of its GDN heads forgot within one token.",
        "This version (see the docstring of `scripts/train_pretrained.py`):",
        "",
        f"- value heads {', '.join(map(str, settings['fixed_heads']))} of every GDN layer keep a **fixed** decay "
        f"(A = 1, in_proj_a row 0, both frozen) with half-lives log-spaced over {settings['fixed_half_lives'][0]:g}–"
        f"{settings['fixed_half_lives'][1]:g} tokens across layers; their keys, values, β and queries are learned;",
        "- the other heads **learn** their decay from A ~ U(1, 16) and dt log-uniform in [1e-3, 1e-1] (dt_bias = softplus⁻¹(dt));",
        "- A_log, dt_bias, norm weights and biases get no weight decay; windows of 512 tokens.",
        "",
    ]
    if SECOND_CYCLE.exists():  # a variant that was run and not shipped
        variant = json.loads(SECOND_CYCLE.read_text())
        after = variant["heldout_nats_per_token"]
        lines += [
            "A variant was run and not shipped: a second cosine cycle of 300 steps at a tenth of the peak learning rate,",
            "resumed from this model's last checkpoint, raised the held-out loss to "
            + " and ".join(f"{v:.4f} at step {k}" for k, v in after.items() if not k.startswith("1400"))
            + f" nats/token: more passes over the 1 M training tokens overfit (`{SECOND_CYCLE.relative_to(RESULTS.parent)}`).",
            "",
        ]
    lines += [
        "## Memory census",
        "",
        f"`writesae census` on the first {census.n_tokens} held-out tokens in windows of {census.context} "
        "(`census.json`, `half_lives.png` beside this card):",
        "",
        f"- this version: {census.summary()};",
    ]
    if previous is not None:
        lines.append(f"- the first version: {previous.summary()};")
    learned = [r for r in census.heads if r.head not in settings["fixed_heads"]]
    longest = max(learned, key=lambda r: r.half_life[1])
    quiet = [r for r in census.heads if r.read_rms_over_sqrt_eps < 0.1]
    lines += [
        f"- learned-decay heads with median half-life ≥ {LONG_MEMORY}: {sum(r.half_life[1] >= LONG_MEMORY for r in learned)} "
        f"of {len(learned)} "
        f"(the longest, layer {longest.layer} head {longest.head}: median {longest.half_life[1]:.3g}, "
        f"90th percentile {longest.half_life[2]:.3g} tokens); the other long memories are the fixed-decay heads';",
        f"- reads far below the gated norm's √ε (‖o‖rms/√ε < 0.1), so ε rather than the read sets the output scale: "
        + (", ".join(f"layer {r.layer} head {r.head}" for r in quiet) if quiet else "none") + ".",
    ]
    lines += ["", "![median half-life per GDN head](half_lives.png)", "", census.table(), "", "## Greedy continuations", ""]
    lines += [f"- {text!r}" for _, text in samples]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainSettings()
    p.add_argument("--out", type=Path, default=PRETRAINED_MODELS["gdn-austen"])
    p.add_argument("--checkpoint", type=Path, default=Path("runs/gdn-austen-train/checkpoint.pt"))
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--context", type=int, default=defaults.context)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--minutes", type=float, default=math.inf, help="stop early (resume later from the checkpoint)")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--fixed-heads", type=int, nargs="*", default=list(defaults.fixed_heads))
    p.add_argument("--fixed-half-lives", type=float, nargs=2, default=list(defaults.fixed_half_lives))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--card-only", action="store_true", help="only rewrite README.md (and its census) from the saved model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.card_only:
        write_model_card(args.out)
        return
    settings = TrainSettings(context=args.context, batch=args.batch, steps=args.steps, lr=args.lr, seed=args.seed,
                             fixed_heads=tuple(args.fixed_heads), fixed_half_lives=tuple(args.fixed_half_lives))

    tokenizer = train_tokenizer(args.vocab)
    stream = token_stream(tokenizer)
    windows = heldout_windows(tokenizer)
    model = build_model(model_config(len(tokenizer), tokenizer.eos_token_id), settings)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters, {len(stream)} training tokens, {windows.numel()} held-out tokens")

    start = time.time()
    def report(step: int, loss: float) -> None:
        if step % 50 == 0:
            print(f"step {step} loss {loss:.3f} {time.time() - start:.0f}s", flush=True)
        if step % 500 == 0:
            print(f"  held-out loss {transformers_heldout_loss(model, windows):.4f}", flush=True)
            model.train()
    step = train(model, stream, settings, args.checkpoint, args.checkpoint_every, args.minutes, report)
    if step < settings.steps:
        print(f"stopped at step {step} of {settings.steps}; rerun the same command to resume")
        return

    model = model.to(torch.float16).float()  # the shipped (fp16) weights; the card is measured on them
    loss = transformers_heldout_loss(model, windows)
    n_chars = len(tokenizer.decode(windows[:, 1:].flatten().tolist()))
    bpc = loss * windows[:, 1:].numel() / math.log(2) / n_chars
    samples = []
    for prompt in ("It is a truth universally acknowledged", "Anne Elliot", "\"My dear Emma,\" said"):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        samples.append((prompt, tokenizer.decode(out[0])))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=args.out.parent)  # written whole, then moved into place
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would ship an unreadable folder
    model.to(torch.float16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    stats = {
        "heldout_loss": round(loss, 4),
        "heldout_bits_per_char": round(bpc, 4),
        "heldout_tokens": windows.numel(),
        "heldout_characters": n_chars,
        "context": HELDOUT_CONTEXT,
        "steps": step,
        "train_tokens_seen": step * settings.batch * settings.context,
        "parameters": n_params,
        "settings": asdict(settings),
    }
    Path(tmp, "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    Path(tmp, "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    for file in Path(tmp).iterdir():  # safetensors writes 0600: ship files anyone can read
        file.chmod(0o644)
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(json.dumps(stats, indent=2))
    for prompt, text in samples:
        print(repr(text))
    write_model_card(args.out)


if __name__ == "__main__":
    main()
