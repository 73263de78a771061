"""Installs in generation: write a rank-1 direction v wᵀ into one GDN head and see what the model says.

At each of a few consecutive prompt positions t (by default the last 3) the native write k̂_t δ_tᵀ of
(layer, head) is replaced by m ‖k̂_t δ_tᵀ‖_F · (v/‖v‖)(w/‖w‖)ᵀ, through ``hook_write_key`` (key
v/‖v‖) and ``hook_write_value`` (value m ‖k̂_t‖ ‖δ_t‖ w/‖w‖); the edit carries through the rest of the
prompt and into greedy generation. ‖k̂_t δ_tᵀ‖_F = ‖k̂_t‖ ‖δ_t‖ is taken from the clean run, so the
installed norm does not depend on the recurrence mode or on the other installs.

We report, per target token, whether it appears in the continuation and its first-step log-prob
lift: log p_edited(target | prompt) − log p_clean(target | prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .edits import edit_at_positions, gdn_hook_name, one_sequence


@torch.no_grad()
def install_in_generation(
    model, prompt_tokens: Tensor, layer: int, head: int, v: Tensor, w: Tensor, multiplier: float,
    positions: Sequence[int] | None = None, max_new_tokens: int = 20, target_tokens: Sequence[int] = (),
) -> dict:
    """Replace the write of (layer, head) at ``positions`` by v wᵀ at ``multiplier`` × the native norm, then generate greedily.

    Returns ``{"continuation", "clean_continuation"}`` (new tokens only, as lists) and, per target,
    ``"included"`` (it appears in the continuation) and ``"lift"`` (first-step log-prob lift).
    """
    tokens = one_sequence(prompt_tokens, "an install")
    T = tokens.shape[1]
    positions = list(range(T - 3, T)) if positions is None else [p % T for p in positions]
    key_site, value_site = gdn_hook_name(layer, "hook_write_key"), gdn_hook_name(layer, "hook_write_value")

    clean_logits, cache = model.run_with_cache(tokens, names_filter=[key_site, value_site])
    native_norm = cache[key_site][0, :, head].norm(dim=-1) * cache[value_site][0, :, head].norm(dim=-1)
    key = v / v.norm()
    values = {t: multiplier * native_norm[t] * w / w.norm() for t in positions}

    def set_row(rows: dict[int, Tensor]):  # write row of ``head`` at each position t ← rows[t]
        def edit(x: Tensor, t: int) -> Tensor:
            x[:, head] = rows[t].to(x)
            return x

        return edit_at_positions(edit, positions)

    hooks = [(key_site, set_row({t: key for t in positions})), (value_site, set_row(values))]

    with model.hooks(fwd_hooks=hooks):
        edited_logits = model(tokens)
        generated = model.generate(tokens, max_new_tokens, stop_at_eos=False)
    clean_generated = model.generate(tokens, max_new_tokens, stop_at_eos=False)

    continuation = generated[0, T:].tolist()
    lift = edited_logits[0, -1].float().log_softmax(-1) - clean_logits[0, -1].float().log_softmax(-1)
    targets = [int(t) for t in target_tokens]
    return {
        "continuation": continuation,
        "clean_continuation": clean_generated[0, T:].tolist(),
        "targets": targets,
        "included": [t in continuation for t in targets],
        "lift": [float(lift[t]) for t in targets],
    }


@torch.no_grad()
def pick_targets(model, prompt_tokens: Tensor, rank_range: tuple[int, int] = (100, 1000), n: int = 10, seed: int = 0) -> list[int]:
    """``n`` tokens drawn at random (seeded) among those ranked in [lo, hi) by the clean next-token distribution (rank 0: the top)."""
    tokens = one_sequence(prompt_tokens, "an install")
    lo, hi = rank_range
    by_rank = model(tokens)[0, -1].argsort(descending=True)[lo:hi]
    if len(by_rank) == 0:
        raise ValueError(f"rank range {rank_range} is empty for a vocabulary of {model.cfg.d_vocab}")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(by_rank), generator=g)[:n]
    return by_rank[chosen].tolist()


def install_study(
    model, prompts: Sequence[Tensor], layer: int, head: int, v: Tensor, w: Tensor,
    multipliers: Sequence[float] = (1.5, 3, 6), targets: Sequence[Sequence[int]] | None = None,
    positions: Sequence[int] | None = None, max_new_tokens: int = 20, rank_range: tuple[int, int] = (100, 1000),
    n_targets: int = 10, seed: int = 0,
) -> dict:
    """Install v wᵀ in each prompt at each multiplier; aggregate over prompts and their targets.

    ``targets[i]`` are prompt i's target tokens; by default ``pick_targets`` draws them by rank.
    Returns ``{m: {"inclusion_rate", "mean_lift", "n"}}``, n the number of (prompt, target) pairs.
    """
    if targets is None:
        targets = [pick_targets(model, p, rank_range, n_targets, seed) for p in prompts]
    study = {}
    for m in multipliers:
        included, lifts = [], []
        for prompt, prompt_targets in zip(prompts, targets, strict=True):
            result = install_in_generation(model, prompt, layer, head, v, w, m, positions, max_new_tokens, prompt_targets)
            included += result["included"]
            lifts += result["lift"]
        n = len(included)
        study[m] = {
            "inclusion_rate": sum(included) / n if n else float("nan"),
            "mean_lift": sum(lifts) / n if n else float("nan"),
            "n": n,
        }
    return study
