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
from jaxtyping import Float, Int
from torch import Tensor

from hooked_gdn.sites import edit_at_positions, gdn_hook_name

from .edits import one_sequence
from .features import Direction


@torch.no_grad()
def install_in_generation(
    model, prompt_tokens: Int[Tensor, " pos"] | Int[Tensor, "1 pos"], layer: int, head: int, v: Float[Tensor, " d_k"],
    w: Float[Tensor, " d_v"], multiplier: float,
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
def pick_targets(model, prompt_tokens: Int[Tensor, " pos"] | Int[Tensor, "1 pos"], rank_range: tuple[int, int] = (100, 1000),
                 n: int = 10, seed: int = 0) -> list[int]:
    """``n`` tokens drawn at random (seeded) among those ranked in [lo, hi) by the clean next-token distribution (rank 0: the top)."""
    tokens = one_sequence(prompt_tokens, "an install")
    lo, hi = rank_range
    by_rank = model(tokens)[0, -1].argsort(descending=True)[lo:hi]
    if len(by_rank) == 0:
        raise ValueError(f"rank range {rank_range} is empty for a vocabulary of {model.cfg.d_vocab}")
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(by_rank), generator=g)[:n]
    return by_rank[chosen].tolist()


def _summary(runs: list[dict]) -> dict:
    """Inclusion rate and log-prob lifts over the (prompt, target) pairs of some runs."""
    included = [x for r in runs for x in r["included"]]
    lifts = torch.tensor([x for r in runs for x in r["lift"]])
    if not included:
        return {"inclusion_rate": float("nan"), "mean_lift": float("nan"), "median_lift": float("nan"),
                "frac_lift_positive": float("nan"), "n": 0}
    return {"inclusion_rate": sum(included) / len(included), "mean_lift": float(lifts.mean()),
            "median_lift": float(lifts.median()), "frac_lift_positive": float((lifts > 0).float().mean()),
            "n": len(included)}


def install_study(
    model, prompts: Sequence[Int[Tensor, " pos"]], layer: int, directions: Sequence[Direction],
    multipliers: Sequence[float] = (1.5, 3, 6), targets: Sequence[Sequence[int]] | None = None,
    positions: Sequence[int] | None = None, max_new_tokens: int = 20, rank_range: tuple[int, int] = (100, 1000),
    n_targets: int = 10, seed: int = 0,
) -> dict:
    """Install each direction (in its head) in each prompt at each multiplier, and aggregate.

    ``targets[i]`` are prompt i's target tokens; by default `pick_targets` draws ``n_targets`` by
    rank, with seed ``seed + i``. Returns:

    - ``runs``: one record per (multiplier m, direction, prompt), in that order of loops, with the
      direction's ``head``, ``kind`` and ``label`` and `install_in_generation`'s fields;
    - ``clean_inclusion_rate``: the targets' inclusion in the unmodified continuations;
    - ``by_multiplier``: ``{group: {m: {"inclusion_rate", "mean_lift", "median_lift",
      "frac_lift_positive", "n"}}}`` over the (prompt, target) pairs, for the group "all" and each
      direction kind;
    - ``continuation_changed_fraction``: ``{m: fraction of runs whose continuation differs}``;
    - ``best_direction_per_target``: ``{m: {"inclusion_rate_any_direction", "mean_best_lift", "n"}}``,
      per (prompt, target) the best over directions, chosen post hoc (an upper bound on picking the
      direction per target).
    """
    if targets is None:
        targets = [pick_targets(model, p, rank_range, n_targets, seed + i) for i, p in enumerate(prompts)]
    runs = [{"m": m, "head": d.head, "kind": d.kind, "direction": d.label, "prompt": i,
             **install_in_generation(model, prompt, layer, d.head, d.v, d.w, m, positions, max_new_tokens, targets[i])}
            for m in multipliers for d in directions for i, prompt in enumerate(prompts)]
    clean = [t in run["clean_continuation"] for run in runs[: len(prompts)] for t in run["targets"]]
    groups = ["all", *dict.fromkeys(d.kind for d in directions)]
    at = {m: [r for r in runs if r["m"] == m] for m in multipliers}
    best = {}
    for m in multipliers:
        pairs: dict[tuple[int, int], tuple[bool, float]] = {}
        for r in at[m]:
            for j, (included, lift) in enumerate(zip(r["included"], r["lift"])):
                seen, largest = pairs.get((r["prompt"], j), (False, -float("inf")))
                pairs[r["prompt"], j] = (seen or included, max(largest, lift))
        best[m] = {"inclusion_rate_any_direction": sum(a for a, _ in pairs.values()) / max(1, len(pairs)),
                   "mean_best_lift": sum(b for _, b in pairs.values()) / max(1, len(pairs)), "n": len(pairs)}
    return {
        "runs": runs,
        "clean_inclusion_rate": sum(clean) / len(clean) if clean else float("nan"),
        "by_multiplier": {g: {m: _summary([r for r in at[m] if g in ("all", r["kind"])]) for m in multipliers}
                          for g in groups},
        "continuation_changed_fraction": {m: sum(r["continuation"] != r["clean_continuation"] for r in at[m]) / len(at[m])
                                          for m in multipliers},
        "best_direction_per_target": best,
    }
