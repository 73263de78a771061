"""Train and save the shipped ``gdn-austen`` model: a BPE tokenizer and a small Qwen3.5 hybrid.

    python scripts/train_pretrained.py --minutes 60 --threads 1

Reproduces ``hooked_gdn/pretrained/gdn-austen`` (config.json, model.safetensors, tokenizer files,
README.md model card) from the bundled novels. It uses transformers' ``Qwen3_5ForCausalLM`` so the
shipped weights are exactly what transformers would train; ``HookedGatedDeltaNet`` loads them
through the ordinary checkpoint path. Training stops after ``--steps`` or ``--minutes``, whichever
comes first; the cosine schedule is laid over ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3_5ForCausalLM, Qwen3_5TextConfig

from hooked_gdn.pretrained import HELDOUT_CONTEXT, PRETRAINED_MODELS, austen_documents, heldout_windows

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


def token_stream(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    ids: list[int] = []
    for doc in austen_documents("train"):
        ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


@torch.no_grad()
def heldout_loss(model: Qwen3_5ForCausalLM, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(chunk).logits.float()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def write_model_card(folder: Path) -> None:
    """README.md beside the weights, from the figures the training run saved."""
    stats = json.loads((folder / "training_stats.json").read_text())
    samples = json.loads((folder / "samples.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    layer_kinds = ", ".join("GDN" if t == "linear_attention" else "attention" for t in config["layer_types"])
    lines = [
        "# gdn-austen",
        "",
        "A small Qwen3.5-architecture hybrid (Gated DeltaNet : gated attention = 3 : 1) trained from scratch on",
        "Jane Austen's six novels, shipped so that `hooked_gdn` and `writesae` run on real weights offline.",
        "Reproduce it with `python scripts/train_pretrained.py` (a BPE tokenizer and the model, both on the same text).",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {stats['parameters'] / 1e6:.2f} M (weights stored in bf16) |",
        f"| layers | {len(config['layer_types'])}: {layer_kinds} |",
        f"| d_model / d_mlp | {config['hidden_size']} / {config['intermediate_size']} |",
        f"| GDN heads | H_k = {config['linear_num_key_heads']}, H_v = {config['linear_num_value_heads']}, "
        f"d_k = {config['linear_key_head_dim']}, d_v = {config['linear_value_head_dim']} |",
        f"| attention heads | {config['num_attention_heads']} query, {config['num_key_value_heads']} KV, d_head = {config['head_dim']} |",
        f"| vocabulary | {config['vocab_size']} byte-level BPE tokens, `<|endoftext|>` = EOS |",
        f"| training | {stats['steps']} steps, {stats['train_tokens_seen'] / 1e6:.1f} M tokens seen, {stats['minutes']} min on CPU |",
        f"| **held-out loss** | **{stats['heldout_loss']:.4f}** nats/token |",
        f"| **held-out bits per character** | **{stats['heldout_bits_per_char']:.4f}** |",
        "",
        "Held-out text: Persuasion, chapters 21-24 (never trained on), as chapter documents joined with EOS,",
        f"cut into non-overlapping windows of {stats['context']} tokens ({stats['heldout_tokens']} tokens,",
        f"{stats['heldout_characters']} characters); mean next-token cross-entropy with the bf16 weights computed in fp32.",
        "",
        "Greedy continuations:",
        "",
    ]
    lines += [f"- {text!r}" for _, text in samples]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=PRETRAINED_MODELS["gdn-austen"])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--card-only", action="store_true", help="only rewrite README.md from the saved figures")
    args = p.parse_args()
    if args.card_only:
        write_model_card(args.out)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tokenizer = train_tokenizer(args.vocab)
    stream = token_stream(tokenizer)
    windows = heldout_windows(tokenizer)
    config = model_config(len(tokenizer), tokenizer.eos_token_id)
    model = Qwen3_5ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f} M parameters, {len(stream)} training tokens, {windows.numel()} held-out tokens")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 30)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    start, step = time.time(), 0
    while step < args.steps and time.time() - start < args.minutes * 60:
        offsets = torch.randint(0, len(stream) - args.context - 1, (args.batch,))
        batch = torch.stack([stream[o : o + args.context + 1] for o in offsets.tolist()])
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} {time.time() - start:.0f}s", flush=True)
        if step % 500 == 0:
            print(f"  held-out loss {heldout_loss(model, windows):.4f}", flush=True)

    model = model.to(torch.bfloat16).float()  # the shipped (bf16) weights; the card is measured on them
    loss = heldout_loss(model, windows)
    n_chars = len(tokenizer.decode(windows[:, 1:].flatten().tolist()))
    bpc = loss * windows[:, 1:].numel() / math.log(2) / n_chars
    samples = []
    for prompt in ("It is a truth universally acknowledged", "Anne Elliot", "\"My dear Emma,\" said"):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        samples.append((prompt, tokenizer.decode(out[0])))

    tmp = tempfile.mkdtemp(dir=args.out.parent)  # written whole, then moved into place
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would ship an unreadable folder
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    stats = {
        "heldout_loss": round(loss, 4),
        "heldout_bits_per_char": round(bpc, 4),
        "heldout_tokens": windows.numel(),
        "heldout_characters": n_chars,
        "context": HELDOUT_CONTEXT,
        "steps": step,
        "train_tokens_seen": step * args.batch * args.context,
        "parameters": n_params,
        "minutes": round((time.time() - start) / 60, 1),
    }
    Path(tmp, "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    Path(tmp, "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    write_model_card(Path(tmp))
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(json.dumps(stats, indent=2))
    for prompt, text in samples:
        print(repr(text))


if __name__ == "__main__":
    main()
