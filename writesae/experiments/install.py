"""Installs in generation: write a rank-1 direction v wᵀ into one GDN head and see what the model says.

At each of a few consecutive prompt positions t (by default the last 3) the native write k̂_t δ_tᵀ of
(layer, head) is replaced by m n_t · v wᵀ (unit v, w; n_t = ‖k̂_t δ_tᵀ‖_F = ‖k̂_t‖ ‖δ_t‖ from the clean
run, so the installed norm does not depend on the recurrence mode or on the other installs),
through ``hook_write_key`` (key v) and ``hook_write_value`` (value m n_t w); the edit carries
through the rest of the prompt and into greedy generation.

Aiming at a target token y. Let f = log p(y | prompt) at the last prompt position (the first
generated token). Adding ΔS_t0 to the state at t0 changes the reads by Δo_t = (M_{t0→t} ΔS_t0)ᵀ q̂_t
exactly (`logit_shift`), and f to first order by Σ_t ⟨g_t, Δo_t⟩ = ⟨J_t0, ΔS_t0⟩_F, with
g_t = ∂f/∂o_t (one VJP, `read_gradient`) and J_t0 = Σ_{t ≥ t0} M_{t0→t}ᵀ q̂_t g_tᵀ (`state_gradient`).
The install adds ΔS_t0 = m n_t0 v wᵀ − k̂_t0 δ_t0ᵀ at each install position, so

    Δf ≈ m · vᵀ J w − Σ_t0 ⟨J_t0, k̂_t0 δ_t0ᵀ⟩,    J = Σ_t0 n_t0 J_t0   (a d_k × d_v matrix).

Over unit v, w, vᵀ J w is largest at J's top singular pair (v, w) = (u₁, v₁), where it equals σ₁:
the aimed direction (`aimed_direction`). The aimed atom is the SAE atom of that head with the
largest V_iᵀ J W_i (`aimed_atom`); frequent atoms and random directions, not aimed, are the controls.

We report, per target, whether it appears in the continuation, its first-step log-prob lift
log p_edited(y | prompt) − log p_clean(y | prompt), and the first-order prediction of that lift.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from hooked_gdn.sites import edit_at_positions, gdn_hook_name

from ..site_fit import check_layer_heads
from .edits import check_positions, one_sequence
from .features import Direction, atom_direction
from .logit_shift import SITES, read_gradient, state_gradient
from .stats import wilson_interval


def _native_norms(cache, layer: int, head: int) -> Float[Tensor, " pos"]:
    key, value = cache[gdn_hook_name(layer, "hook_write_key")], cache[gdn_hook_name(layer, "hook_write_value")]
    return key[0, :, head].norm(dim=-1) * value[0, :, head].norm(dim=-1)


@torch.no_grad()
def install_directions(
    model, prompt_tokens: Int[Tensor, " pos"] | Int[Tensor, "1 pos"], layer: int, head: int,
    v: Float[Tensor, "n d_k"], w: Float[Tensor, "n d_v"], multipliers: Sequence[float],
    positions: Sequence[int] | None = None, max_new_tokens: int = 20,
) -> dict:
    """Install n directions at once (row i: v[i] w[i]ᵀ at ``multipliers[i]`` × the native norm), one
    sequence of a batch each, replacing the writes of (layer, head) at ``positions`` (default the last
    3), then generate greedily.

    Returns ``{"continuations": [n lists of new tokens], "log_probs": [n, d_vocab] first-step
    log-probs with the install, "clean_continuation", "clean_log_probs": [d_vocab]}``.
    """
    tokens = one_sequence(prompt_tokens, "an install")
    check_layer_heads(model, layer, [head])
    T, n = tokens.shape[1], v.shape[0]
    positions = list(range(T - 3, T)) if positions is None else check_positions(positions, T, "install position")
    if not (w.shape[0] == len(multipliers) == n):
        raise ValueError(f"need one w and one multiplier per v: got {n} v, {w.shape[0]} w and {len(multipliers)} multipliers")
    key_site, value_site = gdn_hook_name(layer, "hook_write_key"), gdn_hook_name(layer, "hook_write_value")

    clean_logits, cache = model.run_with_cache(tokens, names_filter=[key_site, value_site])
    native = _native_norms(cache, layer, head)
    keys = F.normalize(v.float(), dim=-1)
    scaled = torch.as_tensor(multipliers, dtype=torch.float32)[:, None] * F.normalize(w.float(), dim=-1)
    rows = {key_site: {t: keys for t in positions}, value_site: {t: native[t] * scaled for t in positions}}

    def set_rows(site: str):  # the write row of ``head`` at each position t ← rows[site][t], one per sequence
        def edit(x: Tensor, t: int) -> Tensor:
            x[:, head] = rows[site][t].to(x)
            return x

        return edit_at_positions(edit, positions)

    batch = tokens.repeat(n, 1)
    with model.hooks(fwd_hooks=[(key_site, set_rows(key_site)), (value_site, set_rows(value_site))]):
        edited_logits = model(batch)
        generated = model.generate(batch, max_new_tokens, stop_at_eos=False)
    clean_generated = model.generate(tokens, max_new_tokens, stop_at_eos=False)
    return {
        "continuations": generated[:, T:].tolist(),
        "log_probs": edited_logits[:, -1].float().log_softmax(-1),
        "clean_continuation": clean_generated[0, T:].tolist(),
        "clean_log_probs": clean_logits[0, -1].float().log_softmax(-1),
    }


def install_in_generation(
    model, prompt_tokens: Int[Tensor, " pos"] | Int[Tensor, "1 pos"], layer: int, head: int, v: Float[Tensor, " d_k"],
    w: Float[Tensor, " d_v"], multiplier: float,
    positions: Sequence[int] | None = None, max_new_tokens: int = 20, target_tokens: Sequence[int] = (),
) -> dict:
    """Replace the write of (layer, head) at ``positions`` by v wᵀ at ``multiplier`` × the native norm, then generate greedily.

    Returns ``{"continuation", "clean_continuation"}`` (new tokens only, as lists) and, per target,
    ``"included"`` (it appears in the continuation) and ``"lift"`` (first-step log-prob lift).
    """
    out = install_directions(model, prompt_tokens, layer, head, v[None], w[None], [multiplier], positions, max_new_tokens)
    continuation, lift = out["continuations"][0], out["log_probs"][0] - out["clean_log_probs"]
    targets = [int(t) for t in target_tokens]
    return {
        "continuation": continuation,
        "clean_continuation": out["clean_continuation"],
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


def install_gradient(model, prompt_tokens: Int[Tensor, " pos"] | Int[Tensor, "1 pos"], layer: int, head: int, target: int,
                     positions: Sequence[int] | None = None) -> tuple[Float[Tensor, "d_k d_v"], float]:
    """(J, c): J = Σ_t0 n_t0 J_t0 and c = Σ_t0 ⟨J_t0, k̂_t0 δ_t0ᵀ⟩ of the module docstring, so that
    installing v wᵀ (unit) at m × the native norms changes log p(target) by m vᵀ J w − c to first order."""
    tokens = one_sequence(prompt_tokens, "an install")
    check_layer_heads(model, layer, [head])
    T = tokens.shape[1]
    positions = list(range(T - 3, T)) if positions is None else check_positions(positions, T, "install position")
    names = [gdn_hook_name(layer, name) for name in (*SITES, "hook_write_value")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    J_t0 = state_gradient(cache, layer, head, read_gradient(model, tokens, layer, head, T - 1, target), positions)
    native = _native_norms(cache, layer, head)[positions]
    k_hat = cache[gdn_hook_name(layer, "hook_write_key")][0, positions, head].float()
    delta = cache[gdn_hook_name(layer, "hook_write_value")][0, positions, head].float()
    offset = torch.einsum("pkv,pk,pv->", J_t0, k_hat, delta)
    return torch.einsum("p,pkv->kv", native, J_t0), float(offset)


def aimed_direction(J: Float[Tensor, "d_k d_v"], head: int, label: str, layer: int | None = None) -> tuple[Direction, float]:
    """The unit v wᵀ that maximises vᵀ J w: J's top singular pair, and σ₁ = that maximum."""
    U, S, Vh = torch.linalg.svd(J.double())
    return Direction(head, "aimed", label, U[:, 0].float(), Vh[0].float(), layer), float(S[0])


def aimed_atom(sae, head: int, J: Float[Tensor, "d_k d_v"]) -> tuple[Direction, float]:
    """Among the rank-1 atoms (unit V_i W_iᵀ) of ``head``'s dictionary, the one with the largest
    V_iᵀ J W_i (an atom keeps its sign: codes are ≥ 0), and that value."""
    if sae.cfg.rank != 1 or not hasattr(sae, "V"):
        raise ValueError(f"an aimed atom is one rank-1 direction v wᵀ; this SAE is {sae.cfg.architecture} of rank {sae.cfg.rank}")
    d = sae.cfg.dictionary(head)
    V, W = (F.normalize(factor[d, :, 0].detach().float(), dim=-1) for factor in (sae.V, sae.W))
    gains = torch.einsum("nk,kv,nv->n", V, J.float(), W)
    best = int(gains.argmax())
    atom = atom_direction(sae, head, best)
    return Direction(head, "aimed_atom", atom.label, atom.v, atom.w, atom.layer), float(gains[best])


def install_study(
    model, prompts: Sequence[Int[Tensor, " pos"]], layer: int, heads: Sequence[int], controls: Sequence[Direction] = (),
    sae=None, multipliers: Sequence[float] = (1, 3, 10), positions: Sequence[int] | None = None,
    max_new_tokens: int = 20, rank_range: tuple[int, int] = (100, 1000), n_targets: int = 3, seed: int = 0,
) -> dict:
    """Installs aimed at targets, against controls, in each of ``heads`` of each prompt at each multiplier.

    Per prompt i, `pick_targets` draws ``n_targets`` targets by rank (seed ``seed + i``). Per (prompt,
    head, target) the aimed direction is installed (and, with ``sae``, the aimed atom); each
    direction of ``controls`` in a head of ``heads`` (frequent atoms, random directions: not aimed)
    is installed once per prompt and scored on every target. All of a (prompt, head)'s installs run
    as one batch.

    Returns ``{"runs", "clean"}``: ``runs`` has one record per (prompt, head, direction, m, target)
    with ``kind``, ``label``, ``included``, ``lift`` (measured first-step log-prob lift, nats),
    ``gain`` (vᵀ J w) and ``predicted_lift`` (m · gain − c, first order); ``clean`` one per (prompt,
    target) with ``included`` in the unmodified continuation.
    """
    check_layer_heads(model, layer, heads)
    for direction in controls:
        direction.check_layer(layer)
    runs, clean = [], []
    for i, prompt in enumerate(prompts):
        targets = pick_targets(model, prompt, rank_range, n_targets, seed + i)
        for head in heads:
            installs = []  # (direction, the targets it is scored on)
            gradients = {y: install_gradient(model, prompt, layer, head, y, positions) for y in targets}
            for y, (J, _) in gradients.items():
                installs.append((aimed_direction(J, head, f"aimed at {y}", layer)[0], [y]))
                if sae is not None:
                    atom = aimed_atom(sae, head, J)[0]
                    atom.check_layer(layer)
                    installs.append((atom, [y]))
            installs += [(d, targets) for d in controls if d.head == head]
            batch = [(d, scored, m) for d, scored in installs for m in multipliers]
            out = install_directions(model, prompt, layer, head, torch.stack([d.v for d, _, _ in batch]),
                                     torch.stack([d.w for d, _, _ in batch]), [m for _, _, m in batch],
                                     positions, max_new_tokens)
            lift = out["log_probs"] - out["clean_log_probs"]
            for row, (d, scored, m) in enumerate(batch):
                for y in scored:
                    J, offset = gradients[y]
                    gain = float(d.v @ J @ d.w)
                    runs.append({"prompt": i, "head": head, "kind": d.kind, "label": d.label, "m": m, "target": y,
                                 "included": y in out["continuations"][row], "lift": float(lift[row, y]),
                                 "gain": gain, "predicted_lift": m * gain - offset})
            if head == heads[0]:
                clean += [{"prompt": i, "target": y, "included": y in out["clean_continuation"]} for y in targets]
    return {"runs": runs, "clean": clean}


def summarize_installs(runs: Sequence[dict], confidence: float = 0.95) -> dict:
    """Per kind and multiplier over ``runs``: ``{kind: {m: {"inclusion_rate", "wilson", "n",
    "mean_lift", "median_lift", "mean_predicted_lift", "mean_gain"}}}`` (each (prompt, head,
    direction, target) one trial)."""
    summary: dict = {}
    for kind in dict.fromkeys(r["kind"] for r in runs):
        summary[kind] = {}
        for m in dict.fromkeys(r["m"] for r in runs):
            chosen = [r for r in runs if r["kind"] == kind and r["m"] == m]
            hits = sum(r["included"] for r in chosen)
            lifts = np.array([r["lift"] for r in chosen])
            summary[kind][m] = {"inclusion_rate": hits / len(chosen), "wilson": wilson_interval(hits, len(chosen), confidence),
                                "n": len(chosen), "mean_lift": float(lifts.mean()), "median_lift": float(np.median(lifts)),
                                "mean_predicted_lift": float(np.mean([r["predicted_lift"] for r in chosen])),
                                "mean_gain": float(np.mean([r["gain"] for r in chosen]))}
    return summary
