"""Feature dashboards: what one SAE feature on a GDN state, write or (RWKV-7) erase site fires on, reads and writes.

This module computes; `writesae.dashboard_html` renders the result as a static site. The SAE sits on
``blocks.L.linear_attn.hook_state``, ``…hook_write_value`` or ``…hook_erase_value`` (docs/design.md §12) with
one dictionary per head in ``sae.cfg.head_indices``: dictionary d belongs to model head h = heads[d]. Feature i
of dictionary d has the atom A_i = Σ_r V_ir W_irᵀ (u vᵀ at rank 1) and codes a_i ≥ 0; s is ``cfg.input_scale``,
so the feature's share of the matrix it codes is (a_i / s) A_i.

Held-out token windows [n, T] are run once, and at every position t the SAE codes each of its heads'
matrix X_t (S_t, or the write k̂_t δ_tᵀ or erase (a_t ⊙ κ̂_t) e_tᵀ through ``encode_factors``). Per feature:

- **frequency** P(a_i > 0) over the n·T positions; **mean activation** E[a_i | a_i > 0]; the
  histogram of the positive a_i (equal bins on [0, max a_i], the last one closed).
- **top activations**: the positions of largest a_i, greedily, skipping a position within
  ``left`` tokens of one already shown in the same window (a state feature stays on for many
  consecutive positions); each with the feature's a_i on the tokens around it.
- **key side**: the alignment k̂_tᵀu of every position's write key (GDN's is unit, through l2norm; RWKV-7's
  k̃_t is not) or, at an erase site, its erase key a_t ⊙ κ̂_t, with the atom's unit key factor u (V_i at
  rank 1; the top left singular vector of A_i otherwise, its sign making its largest entry positive). Both ends are shown: since u vᵀ = (−u)(−v)ᵀ, a write with
  k̂ ∥ −u contributes along the atom too, with δ ∥ −v.
- **value side**, the direct effect on the logits through the read. At a firing (t, a) the state
  holds (a/s) A_i more, so the read o_t = S_tᵀ q̂_t moves by exactly Δo = (a/s) A_iᵀ q̂_t
  (= (a/s)(q̂_tᵀu) v at rank 1). What the mixer does after the recurrence (its ``output_from_read``:
  GDN's per-head gated RMSNorm y = w ⊙ o/ρ ⊙ SiLU(z), or Mamba-2's D skip and group-wise norm, then
  W_o) is linearised at the clean reads by a JVP, giving the residual change Δr. The direct path skips every later
  layer and freezes the final RMSNorm's scale σ_t (as TransformerLens' ``apply_ln_to_stack``), so
  Δlogits = W_Uᵀ((1 + w_final) ⊙ Δr) / σ_t (`HookedGatedDeltaNet.tokens_to_residual_directions`).
  The page shows the mean of Δlogits over the feature's firings in the sample (the code a included,
  so it is the effect of an average firing), its largest (promoted) and smallest (suppressed)
  tokens. Only the norm and the frozen σ_t are approximations; the read itself is exact.
- **memory half-life** of the head: `hooked_gdn.census.memory_census` on the same windows
  (median ln ½ / g_t, with the 10th and 90th percentiles).
- **carried KL when ablated**: at each of the feature's first ``ablation_firings`` shown firings,
  S_t of head h is replaced by S_t − (a/s) A_i and the model continues from it (the edit carried to
  every later position, `writesae.experiments.edit_at_positions`); the score is
  KL(p_clean ‖ p_ablated) at t (``kl_next``) and summed over t … t + horizon − 1, cut at the window's
  end (``kl_carried``, `writesae.experiments.kl_from_clean`), averaged over those firings. For a
  write SAE this is the same as editing the write at t to k̂_t δ_tᵀ − (a/s) A_i (an erase SAE's likewise).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_gdn.census import memory_census
from hooked_gdn.sites import SITE_KEY_HOOKS, SITE_VALUE_HOOK, Site, edit_at_positions, rank_one_key

from .experiments.edits import kl_from_clean
from .sae import SAEBase
from .site_fit import check_sae_fits


@dataclass(frozen=True)
class ShownContext:
    """One top activation: ``activations[i]`` is the feature's code on ``tokens[i]``, the token at
    position ``start + i`` of window ``window``; the firing token is at ``position``."""

    window: int
    position: int
    activation: float
    start: int
    tokens: list[str]
    activations: list[float]


@dataclass(frozen=True)
class KeyMatch:
    """A position whose write key k̂ aligns with the atom's key factor u: ``alignment`` = k̂ᵀu."""

    window: int
    position: int
    token: str
    left_context: str
    alignment: float


@dataclass(frozen=True)
class LogitEffect:
    token: str
    token_id: int
    logit_change: float


@dataclass
class FeatureCard:
    """Everything one feature page shows (see the module docstring for each quantity)."""

    head: int  # the model's head
    dictionary: int  # its index in the SAE's n_dicts axis
    feature: int
    n_firings: int
    frequency: float
    mean_activation: float
    max_activation: float
    histogram_counts: list[int]
    histogram_edges: list[float]
    top_contexts: list[ShownContext]
    keys_aligned: list[KeyMatch]
    keys_opposed: list[KeyMatch]
    logits_promoted: list[LogitEffect]
    logits_suppressed: list[LogitEffect]
    kl_next: float | None = None
    kl_carried: float | None = None
    n_ablated: int = 0


@dataclass(frozen=True)
class HeadCard:
    head: int
    dictionary: int
    half_life: tuple[float, float, float]  # tokens: 10th, 50th, 90th percentile
    mean_beta: float
    n_alive: int  # features that fired in the sample


@dataclass
class Dashboard:
    model_name: str
    site: str
    architecture: str
    n_features: int
    rank: int
    n_windows: int
    window_length: int
    horizon: int
    heads: list[HeadCard]
    features: list[FeatureCard] = field(default_factory=list)

    def feature(self, head: int, feature: int) -> FeatureCard:
        for card in self.features:
            if (card.head, card.feature) == (head, feature):
                return card
        raise KeyError(f"no card for head {head}, feature {feature}")


def key_factors(sae: SAEBase) -> Float[Tensor, "n_dicts n d_k"]:
    """The unit key factor u of every atom: V_i at rank 1, else the top left singular vector of A_i
    with its largest-magnitude entry made positive."""
    if getattr(sae, "V", None) is not None and sae.cfg.rank == 1:
        return F.normalize(sae.V[:, :, 0].float(), dim=-1)
    u = torch.linalg.svd(sae.atoms().float(), full_matrices=False).U[..., 0]
    sign = u.gather(-1, u.abs().argmax(-1, keepdim=True)).sign()
    return u * sign


def atom_matrices(sae: SAEBase, dictionaries: Int[Tensor, " m"], features: Int[Tensor, " m"]) -> Float[Tensor, "m d_k d_v"]:
    """A_i of each (dictionary, feature) pair, forming only those m atoms when the decoder is factored."""
    if getattr(sae, "V", None) is not None:
        return torch.einsum("mrk,mrv->mkv", sae.V[dictionaries, features].float(), sae.W[dictionaries, features].float())
    return sae.atoms()[dictionaries, features].float()


def atom_reads(sae: SAEBase, queries: Float[Tensor, "m d_k"], dictionaries: Int[Tensor, " m"],
               features: Int[Tensor, " m"]) -> Float[Tensor, "m d_v"]:
    """A_iᵀ q̂ for each pair: what reading the atom with q̂ returns (Σ_r (q̂ᵀV_ir) W_ir when factored)."""
    if getattr(sae, "V", None) is not None:
        gains = torch.einsum("mrk,mk->mr", sae.V[dictionaries, features].float(), queries)
        return torch.einsum("mr,mrv->mv", gains, sae.W[dictionaries, features].float())
    out = [torch.einsum("mkv,mk->mv", atom_matrices(sae, d, i), q)
           for d, i, q in zip(dictionaries.split(1024), features.split(1024), queries.split(1024))]
    return torch.cat(out) if out else queries.new_zeros(0, sae.cfg.d_v)


@dataclass
class _Pass:
    """What one run over the windows collects: sparse codes, key-side extremes, value-side sums."""

    positions: Tensor  # [M] flat position window·T + t of each active code
    dictionaries: Tensor  # [M]
    features: Tensor  # [M]
    values: Tensor  # [M]
    key_top: tuple[Tensor, Tensor]  # (alignments, flat positions) [K, n_dicts, n], largest first
    key_bottom: tuple[Tensor, Tensor]  # the same for the most negative, most negative first
    direct_sum: Tensor  # [n_dicts, n, d_model]: Σ over firings of Δr / σ_t


def _key_factor_names(site: Site) -> list[str]:
    """The short names of the hooks whose product is the key side's key: the site's own key for a write or an
    erase, the write's for a state (what enters it)."""
    return [hook[len("hook_"):] for hook in SITE_KEY_HOOKS["write" if site.kind == "state" else site.kind]]


def _site_hooks(site: Site, mixer) -> dict[str, str]:
    """Short name -> hook name of what a pass reads: the key factors, the state or the site's value, the read
    query and the read with what ``output_from_read`` needs besides it."""
    value = "hook_state" if site.kind == "state" else SITE_VALUE_HOOK[site.kind]
    shorts = (*_key_factor_names(site), value[len("hook_"):], "read_query", "recurrence_out", *mixer.OUTPUT_INPUTS)
    return {short: site.hook_name(f"hook_{short}") for short in shorts}


def _merge_extremes(best: tuple[Tensor, Tensor] | None, scores: Tensor, positions: Tensor, k: int,
                    largest: bool) -> tuple[Tensor, Tensor]:
    """Keep the k largest (or smallest) scores along dim 0 and their positions."""
    flat = positions[:, None, None].expand_as(scores)
    if best is not None:
        scores, flat = torch.cat([best[0], scores]), torch.cat([best[1], flat])
    top = scores.topk(min(k, len(scores)), dim=0, largest=largest)
    return top.values, flat.gather(0, top.indices)


@torch.no_grad()
def _collect(model, sae: SAEBase, site: Site, windows: Tensor, n_keys: int, batch_size: int, progress: bool) -> _Pass:
    heads = torch.tensor(sae.cfg.head_indices)
    mixer = model.blocks[site.layer].linear_attn
    names = _site_hooks(site, mixer)
    dtype, device = sae.b_dec.dtype, sae.b_dec.device  # everything per position is computed beside the SAE
    u = key_factors(sae)
    T = windows.shape[1]
    parts = defaultdict(list)
    key_top = key_bottom = None
    direct_sum = torch.zeros(sae.n_dicts, sae.cfg.n_features, model.cfg.d_model, device=device)
    for first in tqdm(range(0, len(windows), batch_size), desc="coding held-out windows", disable=not progress):
        batch = windows[first : first + batch_size].to(model.W_E.device)
        _, cache = model.run_with_cache(batch, names_filter=[*names.values(), "ln_final.hook_scale"])
        take = lambda short: cache[names[short]][:, :, heads.to(batch.device)].float().flatten(0, 1).to(device)  # [b·T, n_dicts, …]
        k_hat, q_hat = rank_one_key([take(short) for short in _key_factor_names(site)]), take("read_query")
        if site.kind == "state":
            codes = sae.encode(take("state").to(dtype))
        else:  # the rank-1 site from its factors, never formed
            codes = sae.encode_factors(k_hat.to(dtype), take(SITE_VALUE_HOOK[site.kind][len("hook_"):]).to(dtype))
        positions = first * T + torch.arange(len(k_hat), device=device)
        row, d, i = codes.nonzero(as_tuple=True)
        a = codes[row, d, i].float()
        for key, value in (("positions", positions[row]), ("dictionaries", d), ("features", i), ("values", a)):
            parts[key].append(value.cpu())

        alignment = torch.einsum("pdk,dnk->pdn", k_hat, u)
        key_top = _merge_extremes(key_top, alignment, positions, n_keys, largest=True)
        key_bottom = _merge_extremes(key_bottom, alignment, positions, n_keys, largest=False)

        delta_o = a[:, None] / sae.cfg.input_scale * atom_reads(sae, q_hat[row, d], d, i)
        every_head = lambda short: cache[names[short]].float().flatten(0, 1)  # [b·T, H, …]: norms may mix heads
        delta_r = _direct_output_change(mixer, every_head("recurrence_out"), {s: every_head(s) for s in mixer.OUTPUT_INPUTS},
                                        row.to(batch.device), heads.to(batch.device)[d.to(batch.device)], delta_o.to(batch.device))
        sigma = cache["ln_final.hook_scale"].float().flatten(0, 1).to(device)[row]  # [m, 1]: the final norm's frozen scale
        direct_sum.index_put_((d, i), delta_r.to(device) / sigma, accumulate=True)
    cat = {key: torch.cat(value) for key, value in parts.items()}
    cpu = lambda pair: (pair[0].cpu(), pair[1].cpu())
    return _Pass(cat["positions"], cat["dictionaries"], cat["features"], cat["values"], cpu(key_top), cpu(key_bottom),
                 direct_sum.cpu())


def _direct_output_change(mixer, o: Float[Tensor, "n H d_v"], inputs: dict[str, Tensor], rows: Int[Tensor, " m"],
                          heads: Int[Tensor, " m"], delta_o: Float[Tensor, "m d_v"], chunk: int = 4096) -> Float[Tensor, "m d_model"]:
    """The mixer output's change, to first order, when the read of head ``heads[j]`` at position ``rows[j]``
    moves by ``delta_o[j]``: the JVP of the mixer's own `output_from_read` at the clean reads, in chunks of
    firings (each needs every head of its position: Mamba-2's norm mixes a group of heads)."""
    out = []
    for part in torch.arange(len(rows), device=rows.device).split(chunk):
        at = rows[part]
        tangent = torch.zeros_like(o[at])
        tangent[torch.arange(len(part), device=rows.device), heads[part]] = delta_o[part]
        given = {name: x[at] for name, x in inputs.items()}
        _, change = torch.func.jvp(lambda read: mixer.output_from_read(read, given), (o[at],), (tangent,))
        out.append(change.float())
    return torch.cat(out) if out else o.new_zeros(0, mixer.W_o.shape[0])


CLEAN_LOGITS_BYTES = 1 << 29  # the carried KL keeps every window's clean logits up to this size


@dataclass(frozen=True)
class _Firing:
    card: int  # index into the cards
    window: int
    position: int
    dictionary: int
    feature: int
    activation: float


@torch.no_grad()
def _ablation_kl(model, sae: SAEBase, site: Site, windows: Tensor, firings: list[_Firing], horizon: int,
                 batch_rows: int, progress: bool) -> tuple[Tensor, Tensor]:
    """KL at t and summed over t … t + horizon − 1 for each firing, S_t − (a/s) A_i carried forward.

    Firings at one position share a forward pass, each on its own window cut after t + horizon − 1
    (later tokens cannot change the scored logits). The clean logits of every window are computed
    once when they fit in ``CLEAN_LOGITS_BYTES``, else beside each ablated pass."""
    heads = torch.tensor(sae.cfg.head_indices)
    kl_next, kl_carried = torch.zeros(len(firings)), torch.zeros(len(firings))
    by_position = defaultdict(list)
    for j, firing in enumerate(firings):
        by_position[firing.position].append(j)
    groups = [(t, rows[k : k + batch_rows]) for t, rows in sorted(by_position.items()) for k in range(0, len(rows), batch_rows)]
    device = model.W_E.device
    clean_all = None
    if windows.numel() * model.cfg.d_vocab * 4 <= CLEAN_LOGITS_BYTES:
        clean_all = torch.cat([model(part.to(device)) for part in windows.split(batch_rows)])
    for t, rows in tqdm(groups, desc="ablating features at their firings", disable=not progress):
        chosen = [firings[j] for j in rows]
        tokens = windows[[f.window for f in chosen], : t + horizon].to(device)
        d = torch.tensor([f.dictionary for f in chosen])
        i = torch.tensor([f.feature for f in chosen])
        a = torch.tensor([f.activation for f in chosen])
        removed = atom_matrices(sae, d, i)  # [b, d_k, d_v]
        removed = removed * (a / sae.cfg.input_scale).to(removed)[:, None, None]
        model_heads = heads[d]

        def remove(states: Tensor, position: int) -> Tensor:  # [b, H_v, d_k, d_v] at t
            states[torch.arange(len(states)), model_heads] -= removed.to(states)
            return states

        clean = model(tokens) if clean_all is None else clean_all[[f.window for f in chosen], : t + horizon]
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(site.hook_name("hook_state"), edit_at_positions(remove, t))],
                                       state_positions=[t])
        kl = kl_from_clean(clean, ablated)[:, t:].cpu()
        kl_next[rows], kl_carried[rows] = kl[:, 0], kl.sum(1)
    return kl_next, kl_carried


def token_strings(model, windows: Int[Tensor, "window pos"]) -> list[list[str]]:
    """Each window's tokens as text (``⟨id⟩`` for a model without a tokenizer)."""
    if model.tokenizer is None:
        return [[f"⟨{i}⟩" for i in window.tolist()] for window in windows]
    return [model.to_str_tokens(window) for window in windows]


def _select(counts: Tensor, features_per_head: int | None) -> list[tuple[int, int]]:
    """(dictionary, feature) pairs: all, or each dictionary's ``features_per_head`` most frequent."""
    if features_per_head is None:
        return [(d, i) for d in range(counts.shape[0]) for i in range(counts.shape[1])]
    order = counts.argsort(dim=1, descending=True, stable=True)[:, :features_per_head]
    return [(d, int(i)) for d in range(counts.shape[0]) for i in order[d]]


def _shown_contexts(dense: Tensor, ranked: Tensor, T: int, tokens: list[list[str]], n: int, left: int,
                    right: int) -> list[ShownContext]:
    """Up to n firings, best first, none within ``left`` tokens of another shown in its window."""
    shown: list[ShownContext] = []
    for flat in ranked.tolist():
        window, t = divmod(flat, T)
        if any(c.window == window and abs(c.position - t) <= left for c in shown):
            continue
        start, end = max(0, t - left), min(T, t + right + 1)
        shown.append(ShownContext(window, t, float(dense[flat]), start, tokens[window][start:end],
                                  dense[window * T + start : window * T + end].tolist()))
        if len(shown) == n:
            break
    return shown


def _key_matches(extremes: tuple[Tensor, Tensor], d: int, i: int, T: int, tokens: list[list[str]]) -> list[KeyMatch]:
    matches = []
    for alignment, flat in zip(extremes[0][:, d, i].tolist(), extremes[1][:, d, i].tolist()):
        window, t = divmod(flat, T)
        matches.append(KeyMatch(window, t, tokens[window][t], "".join(tokens[window][max(0, t - 6) : t]), alignment))
    return matches


@torch.no_grad()
def build_dashboard(
    model,
    sae: SAEBase,
    windows: Int[Tensor, "window pos"],
    *,
    features_per_head: int | None = None,
    n_contexts: int = 10,
    left: int = 16,
    right: int = 4,
    n_keys: int = 10,
    n_logits: int = 10,
    bins: int = 30,
    ablation_firings: int = 4,
    horizon: int = 8,
    batch_size: int = 4,
    progress: bool = True,
) -> Dashboard:
    """The dashboard of ``sae`` on ``model`` (a `HookedGatedDeltaNet`) over held-out token windows.

    Cards for every feature, or for each head's ``features_per_head`` most frequent ones. The SAE
    is checked against the model (`check_sae_fits`) before anything runs. See the module docstring for
    what each quantity is; ``batch_size`` counts windows per forward pass.
    """
    site = check_sae_fits(sae, model)
    windows = torch.as_tensor(windows)
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.dtype.is_floating_point:
        raise ValueError(f"windows must be integer tokens [n, T] with T ≥ 2, got {windows.dtype} {tuple(windows.shape)}")
    if not all(isinstance(x, int) and x >= 1 for x in (n_contexts, n_keys, n_logits, bins, horizon, batch_size)):
        raise ValueError("n_contexts, n_keys, n_logits, bins, horizon and batch_size must be positive ints")
    if not (isinstance(ablation_firings, int) and ablation_firings >= 0 and (features_per_head is None or features_per_head >= 1)):
        raise ValueError(f"ablation_firings must be an int ≥ 0 and features_per_head None or ≥ 1, "
                         f"got {ablation_firings!r} and {features_per_head!r}")
    windows = windows.long().cpu()
    T, N = windows.shape[1], windows.numel()
    sae = sae.eval()
    collected = _collect(model, sae, site, windows, n_keys, batch_size, progress)
    census = memory_census(model, windows, state_every=max(1, T // 8), batch_size=batch_size)
    tokens = token_strings(model, windows)

    D, n = sae.n_dicts, sae.cfg.n_features
    key = collected.dictionaries * n + collected.features
    counts = torch.bincount(key, minlength=D * n).view(D, n)
    sums = torch.zeros(D * n).index_add_(0, key, collected.values).view(D, n)
    # each feature's codes, largest first, as one slice of the sorted triples
    order = collected.values.argsort(descending=True, stable=True)
    order = order[key[order].argsort(stable=True)]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.flatten().cumsum(0)])

    selected = _select(counts, features_per_head)
    mean_direct = torch.stack([collected.direct_sum[d, i] / max(int(counts[d, i]), 1) for d, i in selected])
    logits = ((1.0 + model.ln_final.w.float().cpu()) * mean_direct) @ model.W_U.float().cpu()  # [cards, d_vocab]
    vocab = _vocabulary(model)

    cards = []
    for c, (d, i) in enumerate(selected):
        mine = order[starts[d * n + i] : starts[d * n + i + 1]]
        values = collected.values[mine]
        dense = torch.zeros(N).index_put_((collected.positions[mine],), values)
        top = float(values[0]) if len(values) else 0.0
        hist = torch.histc(values, bins=bins, min=0.0, max=top) if len(values) else torch.zeros(bins)
        fired = len(values) > 0
        promoted = logits[c].topk(min(n_logits, logits.shape[1])) if fired else None
        suppressed = logits[c].topk(min(n_logits, logits.shape[1]), largest=False) if fired else None
        cards.append(FeatureCard(
            head=sae.cfg.head_indices[d], dictionary=d, feature=i, n_firings=len(values),
            frequency=len(values) / N, mean_activation=float(sums[d, i]) / max(len(values), 1), max_activation=top,
            histogram_counts=[int(x) for x in hist.tolist()],
            histogram_edges=torch.linspace(0.0, top, bins + 1).tolist(),
            top_contexts=_shown_contexts(dense, collected.positions[mine], T, tokens, n_contexts, left, right),
            keys_aligned=_key_matches(collected.key_top, d, i, T, tokens),
            keys_opposed=_key_matches(collected.key_bottom, d, i, T, tokens),
            logits_promoted=[LogitEffect(vocab(t), t, v) for v, t in zip(*map(Tensor.tolist, promoted))] if fired else [],
            logits_suppressed=[LogitEffect(vocab(t), t, v) for v, t in zip(*map(Tensor.tolist, suppressed))] if fired else [],
        ))

    firings = [_Firing(c, ctx.window, ctx.position, card.dictionary, card.feature, ctx.activation)
               for c, card in enumerate(cards) for ctx in card.top_contexts[:ablation_firings]]
    if firings:
        kl_next, kl_carried = _ablation_kl(model, sae, site, windows, firings, horizon, 4 * batch_size, progress)
        per_card = defaultdict(list)
        for j, firing in enumerate(firings):
            per_card[firing.card].append(j)
        for c, rows in per_card.items():
            cards[c].kl_next = float(kl_next[rows].mean())
            cards[c].kl_carried = float(kl_carried[rows].mean())
            cards[c].n_ablated = len(rows)

    head_cards = []
    for d, head in enumerate(sae.cfg.head_indices):
        record = census.head(site.layer, head)
        head_cards.append(HeadCard(head, d, tuple(record.half_life), record.mean_beta, int((counts[d] > 0).sum())))
    return Dashboard(model.cfg.model_name, site.name, sae.cfg.architecture, n, sae.cfg.rank, len(windows), T, horizon,
                     head_cards, cards)


def _vocabulary(model):
    """token id -> its text (``⟨id⟩`` without a tokenizer)."""
    if model.tokenizer is None:
        return lambda token: f"⟨{token}⟩"
    return lambda token: model.tokenizer.decode([token])
