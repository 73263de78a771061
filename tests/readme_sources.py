"""Where each measured number in README.md's prose comes from (checked by ``tests/test_readme_sources.py``).

A ``quote`` is text as the README's prose reads with whitespace collapsed and inline code removed (the
check says which quote it cannot find). ``Sourced`` reads one number from a committed JSON file (``key`` is
a ``/``-separated path, or ``transform`` computes it); ``Claim`` checks what a sentence says against a file;
``NotMeasured`` says why a number is no measurement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hooked_gdn.census import LONG_MEMORY, VERY_LONG_MEMORY, HeadCensus


ROOT = Path(__file__).parents[1]


def value_at(data: Any, key: str) -> Any:
    """``data``'s entry at a ``/``-separated path of dict keys and list indices."""
    for part in key.split("/"):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _load(root: Path, file: str) -> Any:
    return json.loads((root / file).read_text())


@dataclass(frozen=True)
class Sourced:
    quote: str
    number: str  # as written in the quote
    file: str
    key: str | None = None
    transform: Callable[[Any], float] | None = None

    def value(self, root: Path) -> float:
        data = _load(root, self.file)
        return self.transform(data) if self.transform else value_at(data, self.key)


@dataclass(frozen=True)
class Claim:
    quote: str
    file: str
    predicate: Callable[[Any], bool]

    def holds(self, root: Path) -> bool:
        return self.predicate(_load(root, self.file))


@dataclass(frozen=True)
class NotMeasured:
    quote: str
    why: str


GDN_STATS = "hooked_gdn/pretrained/gdn-austen/training_stats.json"
GDN_CENSUS = "hooked_gdn/pretrained/gdn-austen/census.json"
GDN_V1_CENSUS = "results/census/gdn-austen-v1/census.json"
GDN_HELDOUT = "results/heldout/gdn-austen.json"
GDN_V1_HELDOUT = "results/heldout/gdn-austen-v1.json"
SECOND_CYCLE = "results/heldout/gdn-austen-second-cycle.json"
MAMBA2_STATS = "hooked_gdn/pretrained/mamba2-austen/training_stats.json"
MAMBA2_CENSUS = "hooked_gdn/pretrained/mamba2-austen/census.json"
RWKV7_STATS = "hooked_gdn/pretrained/rwkv7-austen/training_stats.json"
LOADING = "benchmarks/results/loading.json"
PLANNED_35B = "qwen3.5-35b-a3b_planned (computed, not measured)"
COMPARE = "demos/results/compare_architectures/results.json"
MiB, GiB = 2**20, 2**30
PLAN_2x80 = "cuda:0 31.7 GiB (embedding, head, blocks 0–18); cuda:1 32.9 GiB (blocks 19–39)"
PLAN_4x24 = "16.0 GiB (embedding, head, 0–8); 17.2 GiB (9–19);"
QUOTE_WINDOWS = "(1.4405 / 1.4435 against 1.4426 / 1.4556;"


def _median_half_lives(census: dict, heads=None) -> list[float]:
    return [h["half_life"][1] for h in census["heads"] if heads is None or heads(h)]


def _count_long(threshold: float):
    return lambda census: sum(m >= threshold for m in _median_half_lives(census))


def _count_rank(census: dict) -> int:
    return sum(h["effective_rank"] >= 4 for h in census["heads"])


def _learned(census: dict) -> list[float]:
    return _median_half_lives(census, lambda h: not HeadCensus(**h).decay_is_fixed)


def _half_life(layer: int, head: int):
    return lambda census: _median_half_lives(census, lambda h: (h["layer"], h["head"]) == (layer, head))[0]


def _minutes(seconds: float) -> float:
    return seconds / 60


ENTRIES = [
    # ---- install and versions
    NotMeasured("2.13.0 is the version CI tests; any torch ≥ 2.4 should work", "versions"),
    NotMeasured("this package works with 3.3 up to 4.x", "a version range"),
    NotMeasured("transformer-lens 3.9.0 with sae-lens 6.54.12 when this was written", "versions"),
    NotMeasured("(tested against sae-lens 6.54 where it is installed", "a version"),
    NotMeasured("within the 3 minutes the main job is allowed", "the main job's time budget (the developers' guide)"),
    # ---- the quickstart
    Sourced("half-lives 73 and 701 tokens", "73", GDN_CENSUS, transform=_half_life(5, 1)),
    Sourced("half-lives 73 and 701 tokens", "701", GDN_CENSUS, transform=_half_life(5, 3)),
    Sourced("whose denominator CE_zero − CE_clean is only 0.1 nats", "0.1", "demos/results/quickstart/results.json",
            transform=lambda r: r["summary"]["downstream_in_the_loop"]["ce_zero_ablated"]
            - r["summary"]["downstream_in_the_loop"]["ce_clean"]),
    # ---- gdn-austen
    Sourced("A 7.1 M-parameter Qwen3.5-architecture hybrid", "7.1", GDN_STATS, transform=lambda s: s["parameters"] / 1e6),
    Sourced("8 windows of 512 tokens, 5.7 M tokens", "5.7", GDN_STATS, transform=lambda s: s["train_tokens_seen"] / 1e6),
    Sourced("loss 3.7272 nats/token, 1.4474 bits per character", "3.7272", GDN_STATS, "heldout_loss"),
    Sourced("loss 3.7272 nats/token, 1.4474 bits per character", "1.4474", GDN_STATS, "heldout_bits_per_char"),
    Sourced("level with the first version (1.4476)", "1.4476", GDN_V1_HELDOUT, "by_context/256/bits_per_char"),
    Sourced(QUOTE_WINDOWS, "1.4405", GDN_HELDOUT, "by_context/512/bits_per_char"),
    Sourced(QUOTE_WINDOWS, "1.4435", GDN_HELDOUT, "by_context/1024/bits_per_char"),
    Sourced(QUOTE_WINDOWS, "1.4426", GDN_V1_HELDOUT, "by_context/512/bits_per_char"),
    Sourced(QUOTE_WINDOWS, "1.4556", GDN_V1_HELDOUT, "by_context/1024/bits_per_char"),
    Sourced("made it worse (1.4609;", "1.4609", SECOND_CYCLE, "heldout_bits_per_char/1700 (bf16 weights)"),
    Sourced("more passes over 1.0 M training tokens", "1.0", SECOND_CYCLE,
            transform=lambda s: int(s["inputs"].split("(")[1].split(" tokens")[0].replace(",", "")) / 1e6),
    NotMeasured("dt log-uniform in [1e-3, 1e-1]", "initialisation ranges (settings)"),
    Sourced(f"**11 of 24 heads have a median half-life ≥ {LONG_MEMORY} tokens", "11", GDN_CENSUS, transform=_count_long(LONG_MEMORY)),
    Sourced(f"≥ {LONG_MEMORY} tokens, 8 ≥ {VERY_LONG_MEMORY}", "8", GDN_CENSUS, transform=_count_long(VERY_LONG_MEMORY)),
    Sourced("and 16 hold states of effective rank ≥ 4", "16", GDN_CENSUS, transform=_count_rank),
    Claim("(the first version: 0, 0 and 2)", GDN_V1_CENSUS,
          lambda c: (_count_long(LONG_MEMORY)(c), _count_long(VERY_LONG_MEMORY)(c), _count_rank(c)) == (0, 0, 2)),
    Sourced("have medians of 0.5–8.6 tokens", "0.5", GDN_CENSUS, transform=lambda c: min(_learned(c))),
    Sourced("have medians of 0.5–8.6 tokens", "8.6", GDN_CENSUS, transform=lambda c: max(_learned(c))),
    # ---- the shipped models, Mamba-2 and RWKV-7
    Sourced("also on the same 0.82 M-token budget", "0.82", MAMBA2_STATS, transform=lambda s: s["train_tokens_seen"] / 1e6),
    Claim("also on the same 0.82 M-token budget", RWKV7_STATS,
          lambda s: s["train_tokens_seen"] == _load(ROOT, MAMBA2_STATS)["train_tokens_seen"]),
    NotMeasured("where one token's states are 18 MiB", "arithmetic from Qwen3.5-0.8B's published config: 18 GDN layers × 16 heads × 128 × 128 × 4 bytes"),
    NotMeasured("one token's states over all GDN layers of Qwen3.5-0.8B are 18 MiB", "the same arithmetic"),
    NotMeasured("logits ≤ 1e-4", "the tolerance the parity tests assert"),
    NotMeasured("GDN output norm ε = 1e-5", "a setting of the architecture"),
    NotMeasured("of BlinkDL's 0.8.32", "a version"),
    NotMeasured("(0.8.32, a test dependency", "a version"),
    NotMeasured("logits within 1e-4 and our states", "the tolerance the parity tests assert"),
    Sourced("is a 3.84 M-parameter Mamba-2", "3.84", MAMBA2_STATS, transform=lambda s: s["parameters"] / 1e6),
    NotMeasured("d_state 64, 2 B/C groups", "a setting (not a time: the pattern reads '2 B' as a size)"),
    Sourced("400-step schedule (0.82 M tokens seen)", "0.82", MAMBA2_STATS, transform=lambda s: s["train_tokens_seen"] / 1e6),
    Sourced("held-out **4.32 nats/token, 1.68 bits/char**", "4.32", MAMBA2_STATS, "heldout_loss"),
    Sourced("held-out **4.32 nats/token, 1.68 bits/char**", "1.68", MAMBA2_STATS, "heldout_bits_per_char"),
    Sourced("(gdn-austen: 1.45)", "1.45", GDN_STATS, "heldout_bits_per_char"),
    Sourced(f"{28} of 48 heads have a median half-life ≥ {LONG_MEMORY} tokens", "28", MAMBA2_CENSUS, transform=_count_long(LONG_MEMORY)),
    Sourced(f"and 15 ≥ {VERY_LONG_MEMORY}", "15", MAMBA2_CENSUS, transform=_count_long(VERY_LONG_MEMORY)),
    Sourced("15 hold states of effective rank ≥ 4", "15", MAMBA2_CENSUS, transform=_count_rank),
    NotMeasured("∈ (0.545, 1)", "a bound of the formula: exp(−e^{−1/2})"),
    Sourced("on the same 0.82 M-token budget as , in 8.4 CPU-minutes on one thread", "0.82", RWKV7_STATS,
            transform=lambda s: s["train_tokens_seen"] / 1e6),
    Sourced("on the same 0.82 M-token budget as , in 8.4 CPU-minutes on one thread", "8.4", RWKV7_STATS, "train_minutes"),
    Claim("in 8.4 CPU-minutes on one thread", RWKV7_STATS, lambda s: s["threads"] == 1),
    NotMeasured("TransformerLens 4.3's", "a version"),
    # ---- using it
    NotMeasured("an optional mask of 0s and 1s", "a mask's values"),
    NotMeasured("reopened every 64 MiB", "a setting of the loader"),
    Sourced("Loading a 347 MiB bf16 checkpoint", "347", LOADING, transform=lambda r: r["loading"]["bf16"]["weights_bytes"] / MiB),
    Sourced("adds **1.19× the weights' size**", "1.19", LOADING, "loading/bf16/streaming/added_over_weights"),
    Sourced("and a 693 MiB fp32 one 1.22×", "693", LOADING, transform=lambda r: r["loading"]["fp32"]["weights_bytes"] / MiB),
    Sourced("and a 693 MiB fp32 one 1.22×", "1.22", LOADING, "loading/fp32/streaming/added_over_weights"),
    Sourced("path it replaced: 3.05× and 2.01×", "3.05", LOADING, "loading/bf16/in_memory/added_over_weights"),
    Sourced("path it replaced: 3.05× and 2.01×", "2.01", LOADING, "loading/fp32/in_memory/added_over_weights"),
    Sourced("34.66 B parameters, 64.6 GiB in bf16", "34.66", LOADING, transform=lambda r: r[PLANNED_35B]["parameters"] / 1e9),
    Sourced("34.66 B parameters, 64.6 GiB in bf16", "64.6", LOADING, transform=lambda r: r[PLANNED_35B]["bf16 bytes"] / GiB),
    Sourced(PLAN_2x80, "31.7", LOADING, f"{PLANNED_35B}/plans/2 x 80 GiB/cuda:0/GiB"),
    Sourced(PLAN_2x80, "32.9", LOADING, f"{PLANNED_35B}/plans/2 x 80 GiB/cuda:1/GiB"),
    NotMeasured("| 2 × 80 GiB |", "the GPUs of the plan (an input)"),
    NotMeasured("| 4 × 24 GiB |", "the GPUs of the plan (an input)"),
    Sourced(PLAN_4x24, "16.0", LOADING, f"{PLANNED_35B}/plans/4 x 24 GiB/cuda:0/GiB"),
    Sourced(PLAN_4x24, "17.2", LOADING, f"{PLANNED_35B}/plans/4 x 24 GiB/cuda:1/GiB"),
    Sourced(PLAN_4x24 + " 17.2 GiB (20–30)", "17.2", LOADING, f"{PLANNED_35B}/plans/4 x 24 GiB/cuda:2/GiB"),
    Sourced(PLAN_4x24 + " 17.2 GiB (20–30); 14.1 GiB (31–39)", "14.1", LOADING, f"{PLANNED_35B}/plans/4 x 24 GiB/cuda:3/GiB"),
    NotMeasured("30 × H_v·d_k·d_v fp32 = 60 MiB, and the attention KV cache, 10 layers × 2 × 2 KV heads × 256 × 2 bytes = "
                "20 KiB a token (640 MiB at 32k tokens)", "arithmetic shown in the sentence"),
    NotMeasured("temperature=1.0", "a default argument"),
    NotMeasured("freq_penalty=0.0", "a default argument"),
    NotMeasured("A seeded 5% of the files", "a setting"),
    # ---- Qwen3.5-0.8B, estimated from its published shapes (the sentence says so)
    NotMeasured("The model's weights are 1.6 GB in bf16 (3.2 GB in fp32", "arithmetic: 0.8 B parameters × 2 or 4 bytes"),
    NotMeasured("16 × 128 × 128 fp32 = 1 MiB, so the default 4096-sample buffer holds 4 GiB", "arithmetic shown in the sentence"),
    NotMeasured("has 134 M parameters (0.5 GiB, 1.6 GiB with Adam), where a of the same width would need 8.6 G (35 GiB)",
                "arithmetic: 16 heads × 16,384 features × (2 × 128 + 2 × 128) and × 2 × 128²; bytes × 4 (× 3 with Adam)"),
    NotMeasured("fits comfortably on one 80 GB GPU", "a GPU's size"),
    NotMeasured("of layer 5's states, is 4.1 GiB in float32", "the command's own arithmetic, shown in the sentence"),
    # ---- SAEs, training, the shipped SAEs
    Sourced("(70 and 68 minutes, both at once", "70", "writesae/pretrained/gdn-austen/L5-state/eval.json",
            transform=lambda e: _minutes(e["seconds"])),
    Sourced("(70 and 68 minutes, both at once", "68", "writesae/pretrained/gdn-austen/L5-write/eval.json",
            transform=lambda e: _minutes(e["seconds"])),
    Sourced("(held-out FVU moves by < 2% over the last fifth of training)", "2", COMPARE, transform=lambda r: 100 * r["converged_below"]),
    # ---- the write-site experiments
    NotMeasured("The paper reports a 92.4% win rate for its atom", "a citation"),
    NotMeasured("(KL_delete above 10 × the head's largest identity-edit KL)", "the study's threshold (a setting)"),
    NotMeasured("Tested to sum to the read within 1e-5 relative", "the tolerance the tests assert"),
    NotMeasured("the paper's \"33% → 100%\"", "a citation"),
    NotMeasured("(default 32 × 128 tokens)", "a default"),
]
