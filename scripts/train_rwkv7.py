"""Train and save the shipped ``rwkv7-austen`` model: a small RWKV-7 on the bundled novels.

    python -m scripts.train_rwkv7 --threads 1

Reproduces ``hooked_gdn/pretrained/rwkv7-austen`` (config.json and model.safetensors in
flash-linear-attention's format, weights in bf16, the tokenizer, README.md model card with its memory census).
Same text, tokenizer, split, held-out protocol and token budget as ``mamba2-austen`` (400 steps of 8 windows
of 256 tokens, AdamW lr 3e-3, weight decay 0.1, seed 0): the tokenizer is gdn-austen's, loaded from its
folder. transformers has no RWKV-7 and flash-linear-attention needs triton, so the model trained is
`hooked_gdn.rwkv7.HookedRWKV7` itself (its chunked recurrence is differentiable), initialised as BlinkDL
initialises RWKV-7 (`hooked_gdn.rwkv7.init_rwkv7_weights`); it is saved in the fla format and loads back
through the ordinary checkpoint path. Weight decay falls on the projections, the channel mix and the
embeddings only (as BlinkDL's trainer: not on the token-shift mixes, the low-rank maps, r_k or the norms).
The loop, its checkpoint/resume and the schedule are ``scripts/train_pretrained.py``'s. An interrupted run
resumes from its checkpoint when the same command is run again.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from hooked_gdn.architectures.rwkv7 import save_fla_checkpoint
from hooked_gdn.census import LONG_MEMORY, VERY_LONG_MEMORY
from hooked_gdn.pretrained import HELDOUT_CONTEXT, PRETRAINED_MODELS, heldout_loss, heldout_windows
from hooked_gdn.rwkv7 import HookedRWKV7, HookedRWKV7Config
from scripts.train_pretrained import (CARD_CONTEXTS, TrainSettings, model_census, ship_folder, small_model_arguments,
                                     token_stream, train)

OUT = PRETRAINED_MODELS["rwkv7-austen"]
TOKENIZER_SOURCE = PRETRAINED_MODELS["gdn-austen"]
#: the parameters weight decay falls on (BlinkDL's trainer decays the matrices of its linear layers only)
DECAYED = ("W_E", "lm_head", "W_r", "W_k", "W_v", "W_o", "up_proj", "down_proj")


def model_config(vocab_size: int, eos_id: int) -> HookedRWKV7Config:
    return HookedRWKV7Config(
        d_model=256, n_layers=4, d_vocab=vocab_size, n_key_heads=4, n_value_heads=4, d_key=64, d_value=64, d_mlp=1024,
        d_decay_lora=32, d_a_lora=32, d_v_lora=32, d_gate_lora=64, eps=1e-5, group_norm_eps=64e-5,
        tie_word_embeddings=False, eos_token_id=eos_id, pad_token_id=eos_id, model_name="rwkv7-austen",
    )


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    named = list(model.named_parameters())
    decayed = lambda name: name.split(".")[-1] in DECAYED
    return [{"params": [p for n, p in named if decayed(n)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decayed(n)], "weight_decay": 0.0}]


def hooked_logits(model: HookedRWKV7, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens)


def write_model_card(folder: Path) -> None:
    """README.md beside the weights, from the figures the training run saved and a fresh memory census."""
    stats = json.loads((folder / "training_stats.json").read_text())
    samples = json.loads((folder / "samples.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    settings = stats["settings"]
    model = HookedRWKV7.from_pretrained(folder).eval()
    census = model_census(model, folder)
    by_context = {c: heldout_loss(model, c)[1] for c in CARD_CONTEXTS}
    others = {name: json.loads((PRETRAINED_MODELS[name] / "training_stats.json").read_text())
              for name in ("gdn-austen", "mamba2-austen")}
    lines = [
        "# rwkv7-austen",
        "",
        "A small RWKV-7 trained from scratch on Jane Austen's six novels, shipped so that `HookedRWKV7` and",
        "`writesae` run on real RWKV-7 weights offline. Same tokenizer, split, held-out chapters and token budget as",
        "`mamba2-austen`. Reproduce it with `python -m scripts.train_rwkv7 --threads 1`. Stored in",
        "flash-linear-attention's format (`model_type: rwkv7`), which `HookedRWKV7.from_pretrained` reads without",
        "flash-linear-attention.",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {stats['parameters'] / 1e6:.2f} M (weights stored in bf16, embeddings untied) |",
        f"| layers | {config['num_hidden_layers']} RWKV-7 blocks, d_model {config['hidden_size']}, channel mix "
        f"{config['intermediate_size']} |",
        f"| heads per layer | {config['num_heads']} heads of {config['head_dim']} (state {config['head_dim']} × "
        f"{config['head_dim']}); low-rank maps decay/rate/value/gate {config['decay_low_rank_dim']}/"
        f"{config['a_low_rank_dim']}/{config['v_low_rank_dim']}/{config['gate_low_rank_dim']} |",
        f"| vocabulary | {config['vocab_size']} byte-level BPE tokens (gdn-austen's tokenizer), `<|endoftext|>` = EOS |",
        f"| training | {stats['steps']} steps × {settings['batch']} windows of {settings['context']} tokens "
        f"({stats['train_tokens_seen'] / 1e6:.2f} M tokens seen), AdamW lr {settings['lr']}, seed {settings['seed']}, "
        f"{stats['threads']} CPU thread(s), {stats['train_minutes']:.1f} minutes |",
        f"| **held-out loss** | **{stats['heldout_loss']:.4f}** nats/token |",
        f"| **held-out bits per character** | **{stats['heldout_bits_per_char']:.4f}** (gdn-austen "
        f"{others['gdn-austen']['heldout_bits_per_char']:.4f}, mamba2-austen {others['mamba2-austen']['heldout_bits_per_char']:.4f}; "
        "their training_stats.json) |",
        f"| heads with median half-life ≥ {LONG_MEMORY} / ≥ {VERY_LONG_MEMORY} tokens | {census.count(LONG_MEMORY)} / "
        f"{census.count(VERY_LONG_MEMORY)} of {len(census.heads)} (a head's half-life: the median over its channels) |",
        f"| layer with the most long-memory heads | {census.long_memory_layer()} |",
        "",
        "gdn-austen saw 5.7 M tokens (1400 steps of 8 × 512) and is a 3 : 1 GDN : attention hybrid; mamba2-austen saw",
        "the same 0.82 M tokens as this model. Held-out text: Persuasion, chapters 21-24 (never trained on), as chapter",
        f"documents joined with EOS, cut into non-overlapping windows of {stats['context']} tokens ({stats['heldout_tokens']} "
        f"tokens, {stats['heldout_characters']} characters); mean next-token cross-entropy with the bf16 weights in fp32.",
        "",
        "Held-out bits per character by window length (each window starts from an empty state):",
        "",
        "| window (tokens) | " + " | ".join(str(c) for c in CARD_CONTEXTS) + " |",
        "|---|" + "---|" * len(CARD_CONTEXTS),
        "| bits/char | " + " | ".join(f"{by_context[c]:.4f}" for c in CARD_CONTEXTS) + " |",
        "",
        "## Memory census",
        "",
        f"`heldout_census(HookedRWKV7.from_pretrained(\"rwkv7-austen\"))` (`hooked_gdn.pretrained`) on the first "
        f"{census.n_tokens} held-out tokens in windows of {census.context} (`census.json`, `half_lives.png` beside "
        f"this card): {census.summary()}.",
        "RWKV-7's decay is per channel: each head's half-life is the median over its channels and positions of",
        "ln ½ / log w_t; the β column is the mean in-context rate a_t, the erase's strength.",
        "",
        "![median half-life per head](half_lives.png)",
        "",
        census.table(),
        "",
        "## Greedy continuations",
        "",
    ]
    lines += [f"- {text!r}" for _, text in samples]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = small_model_arguments(__doc__, OUT, checkpoint_every=25)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.card_only:
        write_model_card(args.out)
        return
    settings = TrainSettings(context=args.context, batch=args.batch, steps=args.steps, lr=args.lr, seed=args.seed, fixed_heads=())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER_SOURCE)
    torch.manual_seed(settings.seed)
    model = HookedRWKV7(model_config(len(tokenizer), tokenizer.eos_token_id), tokenizer)
    model.init_weights()
    stream = token_stream(tokenizer)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {len(stream)} training tokens")
    start = time.time()

    def report(step: int, loss: float) -> None:
        if step % 10 == 0:
            print(f"step {step} loss {loss:.3f} {time.time() - start:.0f}s", flush=True)

    step = train(model, stream, settings, args.checkpoint, args.checkpoint_every, args.minutes, report,
                 logits_of=hooked_logits, groups=parameter_groups)
    minutes = (time.time() - start) / 60
    if step < settings.steps:
        print(f"stopped at step {step} of {settings.steps}; rerun the same command to resume")
        return
    ship(model, tokenizer, settings, step, args.out, args.threads, minutes)


def ship(model: HookedRWKV7, tokenizer, settings: TrainSettings, step: int, out: Path, threads: int, minutes: float) -> None:
    """Measure the bf16 weights on the held-out windows, save them with their figures, write the card."""
    n_params = sum(p.numel() for p in model.parameters())
    model = model.to(torch.bfloat16).float().eval()  # the shipped (bf16) weights; the card is measured on them
    loss, bits_per_char = heldout_loss(model)
    windows = heldout_windows(tokenizer)
    samples = []
    for prompt in ("It is a truth universally acknowledged", "Anne Elliot", "\"My dear Emma,\" said"):
        samples.append((prompt, model.generate(prompt, max_new_tokens=40)))
    stats = {
        "heldout_loss": round(loss, 4),
        "heldout_bits_per_char": round(bits_per_char, 4),
        "heldout_tokens": windows.numel(),
        "heldout_characters": len(tokenizer.decode(windows[:, 1:].flatten().tolist())),
        "context": HELDOUT_CONTEXT,
        "steps": step,
        "train_tokens_seen": step * settings.batch * settings.context,
        "parameters": n_params,
        "threads": threads,
        "train_minutes": round(minutes, 1),  # this session's part, when the run resumed from a checkpoint
        "settings": asdict(settings),
    }
    ship_folder(out, lambda folder: save_fla_checkpoint(model, folder, dtype=torch.bfloat16), tokenizer, stats, samples)
    print(json.dumps(stats, indent=2))
    for _, text in samples:
        print(repr(text))
    write_model_card(out)


if __name__ == "__main__":
    main()
