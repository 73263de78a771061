"""Installs in generation: write rank-1 directions v wᵀ into GDN heads' memories and see what the model says.

An install is a set of units (GDN layer, value head), one direction each. At each of a few consecutive prompt
positions t0 (by default the last 3) the state of each unit gets the additive edit

    ΔS_t0 = m n_t0 v wᵀ − k̂_t0 δ_t0ᵀ,    n_t0 = ‖k̂_t0 δ_t0ᵀ‖_F = ‖k̂_t0‖ ‖δ_t0‖ of the clean run,

through ``hook_state`` (unit v, w): the native write's contribution is taken out of the state and m times its
norm is put back along v wᵀ. The edit carries through the rest of the prompt and into greedy generation.
Because a GDN state is affine in the state before it (S_t = A_t S_{t−1} + β_t k̂_t v_tᵀ, with A_t = α_t (I − β_t
k̂_t k̂_tᵀ) independent of S), an additive edit propagates through its own layer exactly as M_{t0→t} ΔS_t0; this
is the edit the first-order prediction below is derived for. (An earlier version forced k̂ and δ instead, which
is another edit: at consecutive positions it drops the −α β k̂ k̂ᵀ ΔS terms that the prediction assumes.)

Aiming at a target token y. Let f = log p(y | prompt) at the last prompt position (the first generated token).
Adding ΔS_t0 to the state of one unit at t0 changes its reads by Δo_t = (M_{t0→t} ΔS_t0)ᵀ q̂_t exactly
(`logit_shift`), and f to first order by Σ_t ⟨g_t, Δo_t⟩ = ⟨J_t0, ΔS_t0⟩_F, with g_t = ∂f/∂o_t (one VJP,
`read_gradient`) and J_t0 = Σ_{t ≥ t0} M_{t0→t}ᵀ q̂_t g_tᵀ (`state_gradient`). Summed over the install positions
and over the units (first-order effects add),

    Δf ≈ Σ_units (m · vᵀ J w − c),    J = Σ_t0 n_t0 J_t0 (d_k × d_v),   c = Σ_t0 ⟨J_t0, k̂_t0 δ_t0ᵀ⟩.

Over unit v, w, vᵀ J w is largest at J's top singular pair (v, w) = (u₁, v₁), where it equals σ₁: the aimed
direction (`aimed_direction`); with one norm budget per unit, the best joint install is each unit's own aimed
direction. The aimed atom is the SAE atom of that head with the largest V_iᵀ J W_i (`aimed_atom`); frequent atoms
and random directions, not aimed, are the controls.

Installing into every head of a layer, or of every GDN layer, at once is part of the study (`install_study`'s
scopes): a single head's effect on the logits is capped by its gated RMSNorm, so one head's failure to move a
target says little about the direction written.

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
from .logit_shift import SITES, read_gradients, state_gradient
from .stats import wilson_interval

Unit = tuple[int, int]  # (GDN layer, value head)


def _native_writes(cache, unit: Unit) -> tuple[Float[Tensor, "pos d_k"], Float[Tensor, "pos d_v"]]:
    layer, head = unit
    key, value = cache[gdn_hook_name(layer, "hook_write_key")], cache[gdn_hook_name(layer, "hook_write_value")]
    return key[0, :, head].float(), value[0, :, head].float()


def _check_units(model, units: Sequence[Unit]) -> list[Unit]:
    units = [(int(layer), int(head)) for layer, head in units]
    if not units:
        raise ValueError("an install needs at least one (layer, head)")
    if len(set(units)) != len(units):
        raise ValueError(f"an install names a (layer, head) twice: {units}")
    for layer in dict.fromkeys(layer for layer, _ in units):
        check_layer_heads(model, layer, [head for unit_layer, head in units if unit_layer == layer])
    return units


def _install_positions(positions: Sequence[int] | None, T: int) -> list[int]:
    return list(range(T - 3, T)) if positions is None else check_positions(positions, T, "install position")


@torch.no_grad()
def install_directions(
    model, prompt_tokens: Int[Tensor, " pos"] | Int[Tensor, "1 pos"], units: Sequence[Unit],
    v: Float[Tensor, "n units d_k"], w: Float[Tensor, "n units d_v"], multipliers: Sequence[float],
    positions: Sequence[int] | None = None, max_new_tokens: int = 20,
) -> dict:
    """Make n installs at once, one sequence of a batch each: install i puts v[i, u] w[i, u]ᵀ at
    ``multipliers[i]`` × the native norm into unit ``units[u]`` (the additive state edit of the module
    docstring) at ``positions`` (default the last 3), for every u; then generate greedily.

    Returns ``{"continuations": [n lists of new tokens], "log_probs": [n, d_vocab] first-step
    log-probs with the install, "clean_continuation", "clean_log_probs": [d_vocab]}``.
    """
    tokens = one_sequence(prompt_tokens, "an install")
    units = _check_units(model, units)
    T, n = tokens.shape[1], v.shape[0]
    positions = _install_positions(positions, T)
    if not (w.shape[0] == len(multipliers) == n and v.shape[1] == w.shape[1] == len(units)):
        raise ValueError(f"need one v and one w per install and unit, and one multiplier per install: got v {tuple(v.shape)}, "
                         f"w {tuple(w.shape)}, {len(multipliers)} multipliers for {len(units)} units")
    layers = list(dict.fromkeys(layer for layer, _ in units))
    names = [gdn_hook_name(layer, name) for layer in layers for name in ("hook_write_key", "hook_write_value")]
    clean_logits, cache = model.run_with_cache(tokens, names_filter=names)
    installed = torch.as_tensor(multipliers, dtype=torch.float32)[:, None, None, None] * torch.einsum(
        "nuk,nuv->nukv", F.normalize(v.float(), dim=-1), F.normalize(w.float(), dim=-1))
    differences = {layer: {t: torch.zeros(n, model.cfg.n_value_heads, model.cfg.d_key, model.cfg.d_value)
                           for t in positions} for layer in layers}
    for u, unit in enumerate(units):
        k_hat, delta = _native_writes(cache, unit)
        for t in positions:
            native = k_hat[t].norm() * delta[t].norm()
            differences[unit[0]][t][:, unit[1]] = native * installed[:, u] - torch.outer(k_hat[t], delta[t])

    def add_difference(layer: int):  # S_t of every unit of ``layer`` ← S_t + ΔS_t, one install per sequence
        return edit_at_positions(lambda states, t: states + differences[layer][t].to(states), positions)

    batch = tokens.repeat(n, 1)
    hooks = [(gdn_hook_name(layer, "hook_state"), add_difference(layer)) for layer in layers]
    with model.hooks(fwd_hooks=hooks):
        edited_logits = model(batch, state_positions=positions)
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
    """Install v wᵀ at ``multiplier`` × the native norm into (layer, head) at ``positions``, then generate greedily.

    Returns ``{"continuation", "clean_continuation"}`` (new tokens only, as lists) and, per target,
    ``"included"`` (it appears in the continuation) and ``"lift"`` (first-step log-prob lift).
    """
    out = install_directions(model, prompt_tokens, [(layer, head)], v[None, None], w[None, None], [multiplier], positions,
                             max_new_tokens)
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


def install_gradients(model, prompt_tokens: Int[Tensor, " pos"] | Int[Tensor, "1 pos"], layer: int, heads: Sequence[int],
                      target: int, positions: Sequence[int] | None = None) -> dict[int, tuple[Float[Tensor, "d_k d_v"], float]]:
    """Per head of ``heads``, (J, c): J = Σ_t0 n_t0 J_t0 and c = Σ_t0 ⟨J_t0, k̂_t0 δ_t0ᵀ⟩ of the module docstring,
    so that installing v wᵀ (unit) at m × the native norms into (layer, head) changes log p(target) by
    m vᵀ J w − c to first order. One clean run and one VJP serve every head."""
    tokens = one_sequence(prompt_tokens, "an install")
    check_layer_heads(model, layer, heads)
    T = tokens.shape[1]
    positions = _install_positions(positions, T)
    names = [gdn_hook_name(layer, name) for name in (*SITES, "hook_write_value")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    read_grads = read_gradients(model, tokens, layer, T - 1, target)
    gradients = {}
    for head in heads:
        J_t0 = state_gradient(cache, layer, head, read_grads[:, head], positions)
        k_hat, delta = (x[positions] for x in _native_writes(cache, (layer, head)))
        native = k_hat.norm(dim=-1) * delta.norm(dim=-1)
        offset = torch.einsum("pkv,pk,pv->", J_t0, k_hat, delta)
        gradients[head] = (torch.einsum("p,pkv->kv", native, J_t0), float(offset))
    return gradients


def install_gradient(model, prompt_tokens: Int[Tensor, " pos"] | Int[Tensor, "1 pos"], layer: int, head: int, target: int,
                     positions: Sequence[int] | None = None) -> tuple[Float[Tensor, "d_k d_v"], float]:
    """`install_gradients` of one head."""
    return install_gradients(model, prompt_tokens, layer, [head], target, positions)[head]


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


SCOPES = {"head": "one head at a time", "layer": "every head of the study's layer at once",
          "layers": "every head of every GDN layer at once"}


def _joint_controls(controls: Sequence[Direction], heads: Sequence[int]) -> list[tuple[str, str, dict[int, Direction]]]:
    """The controls installed in every head at once: the j-th control of each kind of every head together
    (kind, label, head -> direction), for each j that every head has."""
    joint = []
    for kind in dict.fromkeys(d.kind for d in controls):
        per_head = {h: [d for d in controls if d.kind == kind and d.head == h] for h in heads}
        for j in range(min(len(found) for found in per_head.values())):
            joint.append((kind, f"{kind} {j} of each head", {h: per_head[h][j] for h in heads}))
    return joint


def install_study(
    model, prompts: Sequence[Int[Tensor, " pos"]], layer: int, heads: Sequence[int], controls: Sequence[Direction] = (),
    sae=None, multipliers: Sequence[float] = (1, 3, 10), positions: Sequence[int] | None = None,
    max_new_tokens: int = 20, rank_range: tuple[int, int] = (100, 1000), n_targets: int = 3, seed: int = 0,
    scopes: Sequence[str] = ("head", "layer"),
) -> dict:
    """Installs aimed at targets, against controls, in each of ``scopes`` (`SCOPES`), for each prompt and multiplier.

    Per prompt i, `pick_targets` draws ``n_targets`` targets by rank (seed ``seed + i``). Per target the aimed
    direction is installed (and, with ``sae``, the aimed atom): in scope "head" into each of ``heads`` alone; in
    "layer" into all of ``heads`` at once, each its own aimed direction (atom); in "layers" into every value head of
    every GDN layer at once (aimed directions only: the SAE has atoms for its own layer). Controls (frequent atoms,
    random directions: not aimed) are installed once per prompt and scored on every target: in scope "head" each in
    its own head, in "layer" the j-th control of each kind of every head together, in "layers" seeded random unit
    directions in every unit (generator seed ``seed + i``). Each (prompt, scope, unit set)'s installs run as one batch.

    Returns ``{"runs", "clean"}``: ``runs`` has one record per (prompt, scope, head, direction, m, target) with
    ``scope``, ``head`` (None unless the scope is "head"), ``units`` (how many heads were written), ``kind``,
    ``label``, ``included``, ``lift`` (measured first-step log-prob lift, nats), ``gain`` (Σ_units vᵀ J w) and
    ``predicted_lift`` (m · gain − Σ_units c, first order); ``clean`` one per (prompt, target) with ``included`` in
    the unmodified continuation.
    """
    check_layer_heads(model, layer, heads)
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise ValueError(f"unknown install scope(s) {unknown}: the scopes are {sorted(SCOPES)}")
    for direction in controls:
        direction.check_layer(layer)
    every_unit = [(L, h) for L in model.cfg.gdn_layers for h in range(model.cfg.n_value_heads)]
    runs, clean = [], []
    for i, prompt in enumerate(prompts):
        targets = pick_targets(model, prompt, rank_range, n_targets, seed + i)
        units_needed = {(layer, h) for h in heads} | (set(every_unit) if "layers" in scopes else set())
        gradients = {}
        for unit_layer in sorted({L for L, _ in units_needed}):
            layer_heads = sorted(h for L, h in units_needed if L == unit_layer)
            for y in targets:
                for h, found in install_gradients(model, prompt, unit_layer, layer_heads, y, positions).items():
                    gradients[(unit_layer, h), y] = found

        # each (unit, target)'s aimed direction and atom, found once and installed in every scope that uses them
        aimed_directions = {(unit, y): aimed_direction(J, unit[1], f"aimed at {y}", unit[0])[0]
                            for (unit, y), (J, _) in gradients.items()}
        aimed_atoms = {} if sae is None else {(unit, y): aimed_atom(sae, unit[1], gradients[unit, y][0])[0]
                                              for unit in ((layer, h) for h in heads) for y in targets}
        for found in aimed_atoms.values():
            found.check_layer(layer)  # an atom of another layer's SAE is refused

        batches = []  # (scope, head, units, [(kind, label, directions per unit, scored targets)])
        if "head" in scopes:
            for h in heads:
                unit = (layer, h)
                installs = [("aimed", f"aimed at {y}", [aimed_directions[unit, y]], [y]) for y in targets]
                if sae is not None:
                    installs += [("aimed_atom", aimed_atoms[unit, y].label, [aimed_atoms[unit, y]], [y]) for y in targets]
                installs += [(d.kind, d.label, [d], targets) for d in controls if d.head == h]
                batches.append(("head", h, [unit], installs))
        if "layer" in scopes:
            units = [(layer, h) for h in heads]
            installs = [("aimed", f"aimed at {y}", [aimed_directions[u, y] for u in units], [y]) for y in targets]
            if sae is not None:
                installs += [("aimed_atom", f"aimed atoms for {y}", [aimed_atoms[u, y] for u in units], [y]) for y in targets]
            installs += [(kind, label, [chosen[h] for h in heads], targets)
                         for kind, label, chosen in _joint_controls(controls, heads)]
            batches.append(("layer", None, units, installs))
        if "layers" in scopes:
            gen = torch.Generator().manual_seed(seed + i)
            random = [Direction(h, "random", "random", F.normalize(torch.randn(model.cfg.d_key, generator=gen), dim=0),
                                F.normalize(torch.randn(model.cfg.d_value, generator=gen), dim=0), L) for L, h in every_unit]
            installs = [("aimed", f"aimed at {y}", [aimed_directions[u, y] for u in every_unit], [y]) for y in targets]
            installs.append(("random", "random in every head", random, targets))
            batches.append(("layers", None, every_unit, installs))
        for scope, head, units, installs in batches:
            rows = [(kind, label, directions, scored, m) for kind, label, directions, scored in installs for m in multipliers]
            out = install_directions(model, prompt, units, torch.stack([torch.stack([d.v for d in r[2]]) for r in rows]),
                                     torch.stack([torch.stack([d.w for d in r[2]]) for r in rows]), [r[4] for r in rows],
                                     positions, max_new_tokens)
            lift = out["log_probs"] - out["clean_log_probs"]
            for row, (kind, label, directions, scored, m) in enumerate(rows):
                for y in scored:
                    gain = sum(float(d.v @ gradients[u, y][0] @ d.w) for u, d in zip(units, directions))
                    offset = sum(gradients[u, y][1] for u in units)
                    runs.append({"prompt": i, "scope": scope, "head": head, "units": len(units), "kind": kind,
                                 "label": label, "m": m, "target": y, "included": y in out["continuations"][row],
                                 "lift": float(lift[row, y]), "gain": gain, "predicted_lift": m * gain - offset})
        # every batch of a prompt generates the same clean continuation: the last one's
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
