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
- **logit histogram**: that mean Δlogits, one number per vocabulary token, in ``bins`` equal bins
  on [its min, its max]. It plays the part of sae-dashboard's histogram of W_dec,i W_U, for an atom
  that only reaches the logits through the read: the query q̂_t at the feature's own firings reads
  (a/s) A_i, and the read goes through the mixer's output and the unembedding as above.
- **quantile groups**: the positive codes cut at their quantiles j/n (``torch.quantile``, linear
  interpolation, n = ``n_quantiles``); group j holds edge_j ≤ a < edge_{j+1}, the last also
  a = edge_n, and ``quantile_contexts`` of its firings are drawn uniformly at random (``seed``; spaced
  as the top activations are), so the page shows what weak firings look like, not only the top.
- **hover** of every token where the feature fires in a shown context: the Δlogits of that one
  firing (the value side's, not averaged), its ``n_hover_logits`` most promoted and suppressed
  tokens, and the **loss change**: the cross-entropy of the next token x_{t+1} at t with
  S_t − (a/s) A_i carried forward (the ablation below, scored at t), minus the clean one, by a real
  run. Positive: the feature helped predict the next token. It is run at the first
  ``loss_tokens`` firing tokens of each card: each shown context's outlined token first (top
  contexts, then the quantile groups'), then the others in the order shown.
- **correlated features**: by co-firing, the Jaccard index |F_i ∩ F_j| / |F_i ∪ F_j| of the sets
  of sample positions where each fires, over every feature of the SAE (any head); by atom cosine,
  ⟨A_i, A_j⟩_F / (‖A_i‖_F ‖A_j‖_F) with the other atoms of the same head (signed: the codes are
  ≥ 0). The ``n_related`` largest of each.
- **memory half-life** of the head: `hooked_gdn.census.memory_census` on the same windows
  (median ln ½ / g_t, with the 10th and 90th percentiles).
- **carried KL when ablated**: at each of the feature's first ``ablation_firings`` shown firings,
  S_t of head h is replaced by S_t − (a/s) A_i and the model continues from it (the edit carried to
  every later position, `writesae.experiments.edit_at_positions`); the score is
  KL(p_clean ‖ p_ablated) at t (``kl_next``) and summed over t … t + horizon − 1, cut at the window's
  end (``kl_carried``, `writesae.experiments.kl_from_clean`), averaged over those firings. For a
  write SAE this is the same as editing the write at t to k̂_t δ_tᵀ − (a/s) A_i (an erase SAE's likewise).
- **memory view** (write SAEs on Gated DeltaNet layers only): "what this head's memory retrieves at position t",
  `writesae.memory_attribution.memory_view`: head h's read o_t written exactly as a sum over (past write j,
  feature i) terms G_{j→t} a_ji atom_iᵀ q̂_t / s, plus each write's decoder-bias and SAE-error terms and the
  initial state's, and the same for the read's direct logit effect on the next token x_{t+1} (the output path
  linearised at the run). The page shows the ``memory_terms`` terms of writes at least ``memory_min_distance``
  positions back with the largest component along o_t (⟨term, o_t⟩ / ‖o_t‖), each with its token, and the rest of
  the read summed: the other feature terms (nearer writes, and the far ones not shown), the bias, the errors, the
  initial state; the shown terms plus the rest are ‖o_t‖ and the direct logit, exactly. **Which positions** (the
  rule ``MEMORY_RULE``): per head, the ``memory_views`` positions t of the windows (t ≥ memory_min_distance, and
  t < T − 1, so that there is a next token) whose **far read** ‖Σ_{j ≤ t − memory_min_distance} c_tj δ_j‖ is
  largest, c_tj = G_{j→t} q̂_tᵀ k̂_j being effective attention over the writes
  (`hooked_gdn.effective_attention`), so the part of o_t that old writes make, exactly; greedily, no two within
  ``left`` tokens of each other in one window. Largest, not typical: these are the reads where the memory matters
  most, as the top activations are a feature's strongest firings. **Where a write feature is retrieved**
  (``FeatureCard.retrieved_in``): every view whose read has terms of the feature at that distance, with their sum
  along o_t and their direct logit, largest first: from the same attribution, so free. Other sites (state and
  erase SAEs, Mamba-2, RWKV-7) get no view and ``MemorySection.absent_reason`` says why in one line
  (memory_attribution decomposes a GDN head's read over a write SAE's features only: see its docstring for
  what the other families would need). Cost: one more forward over the windows (the far reads) and one over the
  windows that hold a view, each view an O(T²) attribution: small beside the ablations.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_gdn.cache import GDNCache
from hooked_gdn.census import memory_census
from hooked_gdn.delta_rule import DELTA_RULE
from hooked_gdn.effective_attention import HOOKS as EFFECTIVE_ATTENTION_HOOKS, effective_attention
from hooked_gdn.model import DEFAULT_CHUNK_SIZE
from hooked_gdn.files import atomic_file
from hooked_gdn.sites import SITE_KEY_HOOKS, SITE_VALUE_HOOK, Site, edit_at_positions, gdn_hook_name, rank_one_key

from .experiments.edits import kl_from_clean
from .memory_attribution import FINAL_SCALE_HOOK, LOGIT_HOOKS, READ_HOOKS, attributable_layer, memory_view
from .sae import SAEBase
from .site_fit import check_sae_fits


@dataclass(frozen=True)
class LogitEffect:
    token: str
    token_id: int
    logit_change: float


@dataclass(frozen=True)
class TokenHover:
    """What hovering a token where the feature fires shows: the direct effect on the logits of this
    one firing through the read (its most promoted and suppressed tokens), and ``loss_change``, the
    next-token cross-entropy at this position with the feature removed from the state here minus
    without (a real ablation run; None where it was not run or the window has no next token)."""

    promoted: list[LogitEffect]
    suppressed: list[LogitEffect]
    loss_change: float | None


@dataclass(frozen=True)
class ShownContext:
    """One shown activation: ``activations[i]`` is the feature's code on ``tokens[i]``, the token at
    position ``start + i`` of window ``window``; the firing token is at ``position``. ``hovers[i]``
    is token i's `TokenHover` where the feature fires there (None where it does not)."""

    window: int
    position: int
    activation: float
    start: int
    tokens: list[str]
    activations: list[float]
    hovers: list[TokenHover | None] = field(default_factory=list)


@dataclass(frozen=True)
class QuantileGroup:
    """The firings with ``low`` ≤ a < ``high`` (the last group also a = ``high``): ``n_firings`` of
    them, and ``contexts`` sampled uniformly among them."""

    low: float
    high: float
    n_firings: int
    contexts: list[ShownContext]


@dataclass(frozen=True)
class RelatedFeature:
    """Another feature of the SAE and its ``score`` with this one (Jaccard index or atom cosine)."""

    head: int
    dictionary: int
    feature: int
    score: float


@dataclass(frozen=True)
class KeyMatch:
    """A position whose write key k̂ aligns with the atom's key factor u: ``alignment`` = k̂ᵀu."""

    window: int
    position: int
    token: str
    left_context: str
    alignment: float


@dataclass(frozen=True)
class MemoryTerm:
    """One (past write, feature) term of a memory view's read: feature ``feature`` of the write at ``position``
    (``distance`` = t − position back, code ``code``), its component along the read ⟨term, o_t⟩ / ‖o_t‖
    (``read_projection``), its norm, and its direct logit on the view's next token (None without one)."""

    position: int
    distance: int
    token: str
    left_context: str
    feature: int
    code: float
    read_projection: float
    read_norm: float
    logit: float | None


@dataclass(frozen=True)
class MemoryView:
    """What head ``head``'s memory retrieves at ``position`` of window ``window`` (`memory_view`): the shown ``terms``,
    and the rest of the read, ``rest_read_projection`` (along o_t / ‖o_t‖; keys `MEMORY_REST`), so that Σ terms +
    Σ rest = ``read_norm``; the same for ``direct_logit`` on ``logit_token`` (x_{t+1}). ``left_context``: the
    ``left`` tokens before the position; ``far_read_norm``: ‖the part of o_t that writes at least ``min_distance``
    back make‖, the rule's score."""

    head: int
    dictionary: int
    window: int
    position: int
    token: str
    left_context: str
    read_norm: float
    far_read_norm: float
    terms: list[MemoryTerm]
    rest_read_projection: dict[str, float]
    logit_token: str | None = None
    logit_token_id: int | None = None
    direct_logit: float | None = None
    rest_logit: dict[str, float] | None = None


@dataclass(frozen=True)
class FeatureRetrieval:
    """A memory view (``view``, its index in ``Dashboard.memory.views``) whose read has ``n_terms`` terms of this
    feature at least ``min_distance`` back: their sum along o_t / ‖o_t‖ and their direct logit."""

    view: int
    window: int
    position: int
    n_terms: int
    read_projection: float
    logit: float | None


@dataclass
class MemorySection:
    """The dashboard's memory views and how they were chosen (``rule``), or why there are none (``absent_reason``)."""

    rule: str
    min_distance: int
    per_head: int
    n_terms: int
    views: list[MemoryView] = field(default_factory=list)
    absent_reason: str | None = None


#: how the memory views' positions are chosen (the module docstring's rule), as the pages and the JSON say it
MEMORY_RULE = ("per head, the {per_head} positions t ({distance} ≤ t < T − 1) whose far read "
               "‖Σ_{{j ≤ t − {distance}}} c_tj δ_j‖ (effective attention over the writes: the part of the read that "
               "writes at least {distance} tokens back make) is largest, no two within {left} tokens of each other in a window")
#: the parts of a memory view's read besides its shown terms
MEMORY_REST = ("other_features", "bias", "errors", "initial")


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
    logit_histogram_counts: list[int] = field(default_factory=list)
    logit_histogram_edges: list[float] = field(default_factory=list)
    quantile_groups: list[QuantileGroup] = field(default_factory=list)
    co_firing: list[RelatedFeature] = field(default_factory=list)
    atom_cosine: list[RelatedFeature] = field(default_factory=list)
    kl_next: float | None = None
    kl_carried: float | None = None
    n_ablated: int = 0
    retrieved_in: list[FeatureRetrieval] = field(default_factory=list)


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
    memory: MemorySection | None = None

    def feature(self, head: int, feature: int) -> FeatureCard:
        for card in self.features:
            if (card.head, card.feature) == (head, feature):
                return card
        raise KeyError(f"no card for head {head}, feature {feature}")

    def export_json(self, path: str | Path) -> Path:
        """Write every number of the dashboard to ``path`` as JSON (UTF-8), in the format
        docs/dashboard_schema.json defines: ``{"schema": "writesae.dashboard", "schema_version": 2,``
        then this dataclass's fields (`dataclasses.asdict`)``}``, every float to `SIGNIFICANT_DIGITS`
        significant digits (`written`), every infinite or NaN one as null; a hover's promoted and suppressed
        tokens as [token id, Δlogit] pairs, their texts once in ``vocabulary`` (`_compact_hovers`). Written whole or not at all (`hooked_gdn.files.atomic_file`, never through a link); a
        file already at ``path`` is replaced only when it is such an export itself."""
        path = Path(path)
        if path.exists() and not path.is_symlink() and _schema_of(path) != SCHEMA_NAME:
            raise FileExistsError(f"{path} exists and is not a dashboard export ({SCHEMA_NAME}): not replacing it")
        record = _compact_hovers({"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, **_as_written(asdict(self))})
        with atomic_file(path, encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return path


#: the name and version of `Dashboard.export_json`'s format (docs/dashboard_schema.json); the version
#: goes up whenever a field changes meaning or goes away
SCHEMA_NAME, SCHEMA_VERSION = "writesae.dashboard", 2

#: the significant digits of every float the dashboard writes (the pages' data-* attributes, dashboard.json):
#: more than the measurements hold (an fp32 ablation's loss change, a sample's frequency), a fifth of the bytes
SIGNIFICANT_DIGITS = 4


def written(value: float) -> float:
    """``value`` rounded to `SIGNIFICANT_DIGITS` significant digits, as the dashboard writes it (inf and NaN kept)."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else value


def _schema_of(path: Path) -> str | None:
    """The ``schema`` field of the JSON object at ``path``, or None when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record.get("schema") if isinstance(record, dict) else None


def _compact_hovers(record: dict) -> dict:
    """The exported ``record`` with every hover's promoted and suppressed tokens as [token id, Δlogit] pairs and
    their texts once, in a ``vocabulary`` (the token id as a string -> its text) added last."""
    vocabulary = {}
    for card in record["features"]:
        for context in card["top_contexts"] + [c for group in card["quantile_groups"] for c in group["contexts"]]:
            for hover in filter(None, context["hovers"]):
                for kind in ("promoted", "suppressed"):
                    vocabulary.update((str(effect["token_id"]), effect["token"]) for effect in hover[kind])
                    hover[kind] = [[effect["token_id"], effect["logit_change"]] for effect in hover[kind]]
    return {**record, "vocabulary": dict(sorted(vocabulary.items(), key=lambda item: int(item[0])))}


def _as_written(value):
    """``value`` (nested dicts, lists and tuples) with every float `written`, infinite and NaN ones as None,
    tuples as lists."""
    if isinstance(value, dict):
        return {key: _as_written(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_written(item) for item in value]
    if isinstance(value, float):
        return written(value) if math.isfinite(value) else None
    return value


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

        direct_sum.index_put_((d, i), _direct_residuals(sae, mixer, cache, names, heads, q_hat, row, d, i, a), accumulate=True)
    cat = {key: torch.cat(value) for key, value in parts.items()}
    cpu = lambda pair: (pair[0].cpu(), pair[1].cpu())
    return _Pass(cat["positions"], cat["dictionaries"], cat["features"], cat["values"], cpu(key_top), cpu(key_bottom),
                 direct_sum.cpu())


def _direct_residuals(sae: SAEBase, mixer, cache, names: dict[str, str], heads: Int[Tensor, " n_dicts"],
                      q_hat: Float[Tensor, "n n_dicts d_k"], rows: Int[Tensor, " m"], d: Int[Tensor, " m"],
                      i: Int[Tensor, " m"], a: Float[Tensor, " m"]) -> Float[Tensor, "m d_model"]:
    """Δr / σ_t of each firing (feature i of dictionary d with code a at flat position ``rows`` of the
    cached batch): the read's exact change Δo = (a/s) A_iᵀ q̂_t through the mixer's linearised output,
    over the final norm's frozen scale (the module docstring's value side). On the SAE's device."""
    delta_o = a[:, None] / sae.cfg.input_scale * atom_reads(sae, q_hat[rows, d], d, i)
    every_head = lambda short: cache[names[short]].float().flatten(0, 1)  # [b·T, H, …]: norms may mix heads
    on = every_head("recurrence_out").device
    delta_r = _direct_output_change(mixer, every_head("recurrence_out"), {s: every_head(s) for s in mixer.OUTPUT_INPUTS},
                                    rows.to(on), heads.to(on)[d.to(on)], delta_o.to(on))
    sigma = cache["ln_final.hook_scale"].float().flatten(0, 1).to(a.device)[rows]  # [m, 1]: the final norm's frozen scale
    return delta_r.to(a.device) / sigma


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


ABLATION_CACHE_BYTES = 1 << 28  # the caches one batch of ablations (and its windows' clean run) may hold


@dataclass(frozen=True)
class _Firing:
    window: int
    position: int
    dictionary: int
    feature: int
    activation: float
    horizon: int  # positions scored from the firing on (the window is cut after them)


def _cache_rows(cache: GDNCache, rows: Int[Tensor, " m"]) -> GDNCache:
    """A `GDNCache` holding the given batch rows of ``cache`` (in that order, repeats allowed), as copies."""
    pick = lambda value: ({key: x[rows] for key, x in value.items()} if isinstance(value, dict)
                          else value[rows] if isinstance(value, Tensor) else value)  # None, or a count
    return GDNCache(**{entry.name: pick(getattr(cache, entry.name)) for entry in fields(cache)})


def _cache_bytes(cache: GDNCache) -> int:
    """The bytes of every tensor ``cache`` holds."""
    tensors = [x for entry in fields(cache) for value in [getattr(cache, entry.name)]
               for x in (value.values() if isinstance(value, dict) else [value]) if isinstance(x, Tensor)]
    return sum(x.numel() * x.element_size() for x in tensors)


@torch.no_grad()
def _ablate(model, sae: SAEBase, site: Site, windows: Tensor, firings: list[_Firing], progress: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(KL at t, KL summed over t … t + horizon − 1, loss change at t) for each firing, with
    S_t − (a/s) A_i carried forward. The loss change is the cross-entropy of the window's next token
    x_{t+1} under the ablated logits at t minus under the clean ones (NaN at a window's last position).

    Exact, and cheap: positions before t are the clean run's and later tokens cannot change the scored
    logits, so the windows are run once (as many at a time as ``ABLATION_CACHE_BYTES`` holds), clean, in segments that stop at every
    position t some firing is ablated at (a `GDNCache` continues each segment from the last). There the
    firings at t with one horizon continue from their windows' rows of that cache over t … t + horizon − 1
    only, many at once, one batch row each (the state edit is per row), beside one clean row per window, so
    the ablated and clean logits come from the same computation. Each recurrence runs in chunks no longer than
    its input (a chunk is padded to its full length)."""
    heads = torch.tensor(sae.cfg.head_indices)
    kl_next, kl_carried = torch.zeros(len(firings)), torch.zeros(len(firings))
    loss_change = torch.full((len(firings),), float("nan"))
    if not firings:
        return kl_next, kl_carried, loss_change
    device, T = model.W_E.device, windows.shape[1]
    state_hook = site.hook_name("hook_state")
    # windows per clean run and rows per continuation: each holds a cache as big as a whole window's at most
    batch_rows = max(1, ABLATION_CACHE_BYTES // max(_cache_bytes(model.prefill(windows[:1].to(device))), 1))
    by_window = defaultdict(list)
    for j, firing in enumerate(firings):
        by_window[firing.window].append(j)
    used = sorted(by_window)
    chunks = [used[k : k + batch_rows] for k in range(0, len(used), batch_rows)]
    bar = tqdm(total=len(firings), desc="ablating features at their firings", disable=not progress)
    for chunk in chunks:
        tokens = windows[chunk].to(device)
        local = {w: k for k, w in enumerate(chunk)}
        grouped = defaultdict(list)  # (t, horizon) -> firings
        for w in chunk:
            for j in by_window[w]:
                grouped[firings[j].position, firings[j].horizon].append(j)
        cache, done = None, 0  # the clean run of the chunk's windows over positions < done
        for (t, horizon), members in sorted(grouped.items()):
            if t > done:
                cache = cache or GDNCache()
                model(tokens[:, done:t], return_type=None, cache=cache, chunk_size=min(t - done, DEFAULT_CHUNK_SIZE))
                done = t
            end = min(T, t + horizon)
            for k in range(0, len(members), batch_rows):
                rows = members[k : k + batch_rows]
                chosen = [firings[j] for j in rows]
                which = [local[f.window] for f in chosen]
                clean_of = sorted(set(which))  # one clean row per window, after the ablated rows
                index = torch.tensor(which + clean_of, device=device)
                d = torch.tensor([f.dictionary for f in chosen])
                i = torch.tensor([f.feature for f in chosen])
                a = torch.tensor([f.activation for f in chosen])
                removed = atom_matrices(sae, d, i) * (a / sae.cfg.input_scale)[:, None, None]  # [m, d_k, d_v]
                removed = torch.cat([removed, removed.new_zeros(len(clean_of), *removed.shape[1:])]).to(device)
                model_heads = torch.cat([heads[d], heads.new_zeros(len(clean_of))]).to(device)

                def remove(states: Tensor, position: int) -> Tensor:  # [rows, H_v, d_k, d_v] at t
                    states[torch.arange(len(states), device=states.device), model_heads] -= removed.to(states)
                    return states

                logits = model.run_with_hooks(tokens[index, t:end], fwd_hooks=[(state_hook, edit_at_positions(remove, t))],
                                              cache=None if cache is None else _cache_rows(cache, index), state_positions=[0],
                                              chunk_size=min(end - t, DEFAULT_CHUNK_SIZE))
                ablated = logits[: len(rows)]
                clean = logits[len(rows) :][[clean_of.index(w) for w in which]]
                kl = kl_from_clean(clean, ablated).cpu()
                kl_next[rows], kl_carried[rows] = kl[:, 0], kl.sum(1)
                if t + 1 < T:
                    following = tokens[which, t + 1]
                    loss = lambda scored: F.cross_entropy(scored[:, 0].float(), following, reduction="none").cpu()
                    loss_change[rows] = loss(ablated) - loss(clean)
                bar.update(len(rows))
    bar.close()
    return kl_next, kl_carried, loss_change


@torch.no_grad()
def _firing_logit_extremes(model, sae: SAEBase, site: Site, windows: Tensor, firings: list[_Firing], directions: Tensor,
                           n: int, batch_size: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The n largest and the n smallest Δlogits (values [m, n], token ids [m, n]) of each of the given firings:
    Δr / σ_t (`_direct_residuals`) through the unembedding ``directions``, from one cached pass over the windows
    the firings lie in (their logits formed a window batch at a time)."""
    heads = torch.tensor(sae.cfg.head_indices)
    mixer = model.blocks[site.layer].linear_attn
    names = {short: name for short, name in _site_hooks(site, mixer).items()
             if short in ("read_query", "recurrence_out", *mixer.OUTPUT_INPUTS)}
    device, T = sae.b_dec.device, windows.shape[1]
    n = min(n, directions.shape[0])
    extremes = [torch.zeros(len(firings), n), torch.zeros(len(firings), n, dtype=torch.long),
                torch.zeros(len(firings), n), torch.zeros(len(firings), n, dtype=torch.long)]
    by_window = defaultdict(list)
    for j, firing in enumerate(firings):
        by_window[firing.window].append(j)
    used = sorted(by_window)
    for first in range(0, len(used), batch_size):
        part = used[first : first + batch_size]
        _, cache = model.run_with_cache(windows[part].to(model.W_E.device),
                                        names_filter=[*names.values(), "ln_final.hook_scale"])
        q_hat = cache[names["read_query"]][:, :, heads.to(model.W_E.device)].float().flatten(0, 1).to(device)
        rows = [j for w in part for j in by_window[w]]
        chosen = [firings[j] for j in rows]
        flat = torch.tensor([part.index(f.window) * T + f.position for f in chosen], device=device)
        d = torch.tensor([f.dictionary for f in chosen], device=device)
        i = torch.tensor([f.feature for f in chosen], device=device)
        a = torch.tensor([f.activation for f in chosen], device=device)
        logits = _direct_residuals(sae, mixer, cache, names, heads, q_hat, flat, d, i, a).cpu() @ directions.T
        for j, top in enumerate((logits.topk(n), logits.topk(n, largest=False))):
            extremes[2 * j][rows], extremes[2 * j + 1][rows] = top.values, top.indices
    return (extremes[0], extremes[1]), (extremes[2], extremes[3])


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


def _quantile_groups(values: Tensor, positions: Tensor, dense: Tensor, T: int, tokens: list[list[str]], n_groups: int,
                     per_group: int, left: int, right: int, generator: torch.Generator) -> list[QuantileGroup]:
    """The feature's positive codes cut at their quantiles j/n_groups (`torch.quantile`, linear
    interpolation): group j holds edge_j ≤ a < edge_{j+1} (the last also a = edge_n), and up to
    ``per_group`` of its firings are drawn uniformly at random (spaced as the top contexts are)."""
    if not len(values):
        return []
    edges = torch.quantile(values, torch.linspace(0.0, 1.0, n_groups + 1))
    group = torch.bucketize(values, edges[1:-1], right=True)
    groups = []
    for j in range(n_groups):
        members = positions[group == j]
        drawn = members[torch.randperm(len(members), generator=generator)]
        groups.append(QuantileGroup(float(edges[j]), float(edges[j + 1]), len(members),
                                    _shown_contexts(dense, drawn, T, tokens, per_group, left, right)))
    return groups


def _co_firing(positions: Tensor, keys: Tensor, counts: Tensor, members: list[Tensor], selected: list[int], N: int,
               n_related: int) -> list[list[tuple[int, float]]]:
    """For each selected feature (a flat key d·n + i, its positions ``members``), the ``n_related``
    other features with the largest Jaccard index |F_i ∩ F_j| / |F_i ∪ F_j| of their firing sets
    F = {positions where a > 0} over all the sample's positions (only those with one in common)."""
    if not selected:
        return []
    firing = torch.sparse_coo_tensor(torch.stack([keys, positions]), torch.ones(len(keys)), (len(counts), N),
                                     check_invariants=True).coalesce()
    out = []
    for chunk in torch.arange(len(selected)).split(max(1, (1 << 24) // N)):
        indicator = torch.zeros(N, len(chunk))
        for column, c in enumerate(chunk.tolist()):
            indicator[members[c], column] = 1.0
        both = torch.sparse.mm(firing, indicator).T  # [chunk, all features]: |F_i ∩ F_j|
        own = counts[[selected[c] for c in chunk.tolist()]].float()
        jaccard = both / (own[:, None] + counts.float()[None, :] - both).clamp_min(1.0)
        for row, c in enumerate(chunk.tolist()):
            jaccard[row, selected[c]] = 0.0
            top = jaccard[row].topk(min(n_related, len(counts)))
            out.append([(int(k), float(v)) for v, k in zip(top.values, top.indices) if v > 0])
    return out


def _atom_cosines(sae: SAEBase, selected: list[tuple[int, int]], n_related: int) -> list[list[tuple[int, float]]]:
    """For each selected (dictionary, feature), the ``n_related`` other atoms of its dictionary (as flat keys
    d·n + j) with the largest cosine ⟨A_i, A_j⟩_F / (‖A_i‖_F ‖A_j‖_F) (signed: codes are ≥ 0, so −A_i is
    not A_i; atoms of different heads live in different heads' states and are not compared)."""
    atoms = F.normalize(sae.atoms().detach().float().flatten(2), dim=-1)  # [n_dicts, n, d_k·d_v]
    out = []
    for d, i in selected:
        cosine = atoms[d] @ atoms[d, i]
        cosine[i] = -float("inf")
        top = cosine.topk(min(n_related, len(cosine) - 1))
        out.append([(d * len(cosine) + int(j), float(v)) for v, j in zip(top.values, top.indices)])
    return out


def _extremes(logits: Float[Tensor, "m d_vocab"], n: int, vocab) -> tuple[list[list[LogitEffect]], list[list[LogitEffect]]]:
    """Each row's n largest and n smallest entries as `LogitEffect` lists."""
    n = min(n, logits.shape[1])
    up, down = logits.topk(n), logits.topk(n, largest=False)
    return _effects(up.values, up.indices, vocab), _effects(down.values, down.indices, vocab)


def _effects(values: Float[Tensor, "m n"], ids: Int[Tensor, "m n"], vocab) -> list[list[LogitEffect]]:
    """Each row's (Δlogit, token id) pairs as a `LogitEffect` list."""
    return [[LogitEffect(vocab(t), t, v) for v, t in zip(row_values, row_ids)]
            for row_values, row_ids in zip(values.tolist(), ids.tolist())]


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
    n_quantiles: int = 5,
    quantile_contexts: int = 3,
    n_hover_logits: int = 3,
    loss_tokens: int = 8,
    n_related: int = 5,
    memory_views: int = 3,
    memory_terms: int = 10,
    memory_min_distance: int = 17,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
) -> Dashboard:
    """The dashboard of ``sae`` on ``model`` (a `HookedGatedDeltaNet`) over held-out token windows.

    Cards for every feature, or for each head's ``features_per_head`` most frequent ones. The SAE
    is checked against the model (`check_sae_fits`) before anything runs. See the module docstring for
    what each quantity is; ``batch_size`` counts windows per forward pass (the ablations size theirs by
    ``ABLATION_CACHE_BYTES``, `_ablate`), ``seed`` seeds the draws of the quantile groups' contexts. Every float
    is written (pages, JSON) to ``SIGNIFICANT_DIGITS`` significant digits. ``memory_views`` per head (0: none),
    each showing ``memory_terms`` terms of writes at least ``memory_min_distance`` back: the memory view, for a
    write SAE on a Gated DeltaNet layer (elsewhere ``Dashboard.memory`` says why there is none).
    """
    site = check_sae_fits(sae, model)
    windows = torch.as_tensor(windows)
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.dtype.is_floating_point:
        raise ValueError(f"windows must be integer tokens [n, T] with T ≥ 2, got {windows.dtype} {tuple(windows.shape)}")
    positive = dict(n_contexts=n_contexts, n_keys=n_keys, n_logits=n_logits, bins=bins, horizon=horizon, n_quantiles=n_quantiles,
                    n_hover_logits=n_hover_logits, n_related=n_related, memory_terms=memory_terms, batch_size=batch_size)
    if not all(isinstance(x, int) and x >= 1 for x in positive.values()):
        raise ValueError(f"{', '.join(positive)} must be positive ints, got {positive}")
    counts = dict(ablation_firings=ablation_firings, quantile_contexts=quantile_contexts, loss_tokens=loss_tokens,
                  memory_views=memory_views, memory_min_distance=memory_min_distance)
    if not (all(isinstance(x, int) and x >= 0 for x in counts.values()) and (features_per_head is None or features_per_head >= 1)):
        raise ValueError(f"{', '.join(counts)} must be ints ≥ 0 and features_per_head None or ≥ 1, "
                         f"got {counts} and {features_per_head!r}")
    windows = windows.long().cpu()
    T, N = windows.shape[1], windows.numel()
    sae = sae.eval()
    collected = _collect(model, sae, site, windows, n_keys, batch_size, progress)
    census = memory_census(model, windows, state_every=max(1, T // 8), batch_size=batch_size)
    tokens = token_strings(model, windows)

    D, n = sae.n_dicts, sae.cfg.n_features
    key = collected.dictionaries * n + collected.features
    counts = torch.bincount(key, minlength=D * n)
    sums = torch.zeros(D * n).index_add_(0, key, collected.values)
    # each feature's codes, largest first, as one slice of the sorted triples
    order = collected.values.argsort(descending=True, stable=True)
    order = order[key[order].argsort(stable=True)]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    mine = lambda flat_key: order[starts[flat_key] : starts[flat_key + 1]]

    selected = _select(counts.view(D, n), features_per_head)
    directions = model.tokens_to_residual_directions(torch.arange(model.cfg.d_vocab)).float().cpu()  # [d_vocab, d_model]
    mean_direct = torch.stack([collected.direct_sum[d, i] / max(int(counts[d * n + i]), 1) for d, i in selected])
    logits = mean_direct @ directions.T  # [cards, d_vocab]: the mean firing's direct effect
    vocab = _vocabulary(model)
    co_firing = _co_firing(collected.positions, key, counts, [collected.positions[mine(d * n + i)] for d, i in selected],
                           [d * n + i for d, i in selected], N, n_related)
    cosines = _atom_cosines(sae, selected, n_related)
    related = lambda pairs: [RelatedFeature(sae.cfg.head_indices[k // n], k // n, k % n, score) for k, score in pairs]

    cards = []
    for c, (d, i) in enumerate(selected):
        values = collected.values[mine(d * n + i)]
        positions = collected.positions[mine(d * n + i)]
        dense = torch.zeros(N).index_put_((positions,), values)
        top = float(values[0]) if len(values) else 0.0
        hist = torch.histc(values, bins=bins, min=0.0, max=top) if len(values) else torch.zeros(bins)
        fired = len(values) > 0
        promoted, suppressed = _extremes(logits[c : c + 1], n_logits, vocab) if fired else ([[]], [[]])
        low, high = (float(logits[c].min()), float(logits[c].max())) if fired else (0.0, 0.0)
        cards.append(FeatureCard(
            head=sae.cfg.head_indices[d], dictionary=d, feature=i, n_firings=len(values),
            frequency=len(values) / N, mean_activation=float(sums[d * n + i]) / max(len(values), 1), max_activation=top,
            histogram_counts=[int(x) for x in hist.tolist()],
            histogram_edges=torch.linspace(0.0, top, bins + 1).tolist(),
            top_contexts=_shown_contexts(dense, positions, T, tokens, n_contexts, left, right),
            keys_aligned=_key_matches(collected.key_top, d, i, T, tokens),
            keys_opposed=_key_matches(collected.key_bottom, d, i, T, tokens),
            logits_promoted=promoted[0], logits_suppressed=suppressed[0],
            logit_histogram_counts=[int(x) for x in torch.histc(logits[c], bins=bins, min=low, max=high).tolist()] if fired else [],
            logit_histogram_edges=torch.linspace(low, high, bins + 1).tolist() if fired else [],
            quantile_groups=_quantile_groups(values, positions, dense, T, tokens, n_quantiles, quantile_contexts, left, right,
                                             torch.Generator().manual_seed(seed * D * n + d * n + i)),
            co_firing=related(co_firing[c]), atom_cosine=related(cosines[c]),
        ))
    _add_ablations_and_hovers(model, sae, site, windows, cards, ablation_firings, horizon, loss_tokens, n_hover_logits,
                              directions, vocab, batch_size, progress)

    memory, retrievals = _memory_section(model, sae, windows, tokens, vocab, memory_views, memory_terms, memory_min_distance,
                                         left, batch_size, progress)
    for card in cards:
        card.retrieved_in = sorted(retrievals.get((card.dictionary, card.feature), []), key=lambda r: -abs(r.read_projection))

    head_cards = []
    for d, head in enumerate(sae.cfg.head_indices):
        record = census.head(site.layer, head)
        head_cards.append(HeadCard(head, d, tuple(record.half_life), record.mean_beta, int((counts.view(D, n)[d] > 0).sum())))
    return Dashboard(model.cfg.model_name, site.name, sae.cfg.architecture, n, sae.cfg.rank, len(windows), T, horizon,
                     head_cards, cards, memory)


def memory_unavailable(model, sae: SAEBase) -> str | None:
    """Why ``sae`` on ``model`` gets no memory view, in one line (the first sentence of memory_attribution's own
    refusal: its docstring says what the other families would need), or None where it gets one."""
    try:
        attributable_layer(model, sae)
    except (ValueError, NotImplementedError) as refusal:
        return f"No memory view: {str(refusal).split('. ')[0]} (writesae.memory_attribution)."
    return None


@torch.no_grad()
def far_read_norms(model, sae: SAEBase, windows: Int[Tensor, "window pos"], min_distance: int,
                   batch_size: int) -> Float[Tensor, "window pos n_dicts"]:
    """‖Σ_{j ≤ t − min_distance} c_tj δ_j‖ for every window, position and dictionary of the write SAE ``sae``: the
    part of head h's read o_t that the writes at least ``min_distance`` positions back make, exactly (effective
    attention over the writes, `hooked_gdn.effective_attention`)."""
    layer, heads = attributable_layer(model, sae), sae.cfg.head_indices
    names = [gdn_hook_name(layer, f"hook_{short}") for short in EFFECTIVE_ATTENTION_HOOKS["writes"]]
    T = windows.shape[1]
    far = torch.ones(T, T, dtype=torch.bool, device=model.W_E.device).tril(-min_distance)  # j ≤ t − min_distance
    norms = []
    for first in range(0, len(windows), batch_size):
        _, cache = model.run_with_cache(windows[first : first + batch_size].to(model.W_E.device), names_filter=names)
        attention = effective_attention(cache, layer, "writes", heads=heads, transition=DELTA_RULE)
        reads = torch.einsum("bhtj,bjhv->bthv", attention.pattern * far, attention.values)
        norms.append(reads.norm(dim=-1).float().cpu())
    return torch.cat(norms)


def _memory_positions(far: Float[Tensor, "window pos n_dicts"], min_distance: int, per_head: int,
                      left: int) -> list[tuple[int, int, int]]:
    """(dictionary, window, position) of each memory view: `MEMORY_RULE`, dictionary by dictionary, largest first."""
    T = far.shape[1]
    score = far.clone()
    score[:, :min_distance] = -math.inf
    score[:, T - 1 :] = -math.inf  # no next token to attribute the logit of
    chosen = []
    for d in range(far.shape[2]):
        mine: list[tuple[int, int]] = []
        for flat in score[..., d].flatten().argsort(descending=True, stable=True).tolist():
            window, t = divmod(flat, T)
            if len(mine) == per_head or not math.isfinite(score[window, t, d]):
                break
            if not any(w == window and abs(u - t) <= left for w, u in mine):
                mine.append((window, t))
        chosen += [(d, w, t) for w, t in mine]
    return chosen


@torch.no_grad()
def _memory_section(model, sae: SAEBase, windows: Tensor, tokens: list[list[str]], vocab, per_head: int, n_terms: int,
                    min_distance: int, left: int, batch_size: int, progress: bool
                    ) -> tuple[MemorySection, dict[tuple[int, int], list[FeatureRetrieval]]]:
    """The memory views (module docstring) and, per (dictionary, feature), the views whose reads draw on it."""
    section = MemorySection(MEMORY_RULE.format(per_head=per_head, distance=min_distance, left=left), min_distance,
                            per_head, n_terms)
    retrievals: dict[tuple[int, int], list[FeatureRetrieval]] = defaultdict(list)
    section.absent_reason = memory_unavailable(model, sae)
    if section.absent_reason is None and per_head == 0:
        section.absent_reason = "No memory view: none asked for (memory_views = 0)."
    if section.absent_reason is not None:
        return section, retrievals
    T, heads = windows.shape[1], sae.cfg.head_indices
    far = far_read_norms(model, sae, windows, min_distance, batch_size)
    chosen = _memory_positions(far, min_distance, per_head, left)
    if not chosen:
        section.absent_reason = (f"No memory view: no position of these {T}-token windows is {min_distance} tokens past "
                                 f"their start and has a next token.")
        return section, retrievals
    layer = attributable_layer(model, sae)
    names = [gdn_hook_name(layer, hook) for hook in READ_HOOKS + LOGIT_HOOKS] + [FINAL_SCALE_HOOK]
    by_window = defaultdict(list)
    for k, (_, w, _) in enumerate(chosen):
        by_window[w].append(k)
    views: list[MemoryView | None] = [None] * len(chosen)
    for w in tqdm(sorted(by_window), desc="memory views", disable=not progress):
        window = windows[w : w + 1].to(model.W_E.device)
        _, cache = model.run_with_cache(window, names_filter=names)
        for k in by_window[w]:
            d, _, t = chosen[k]
            # every term at that distance (the rest of the page's numbers and the features' retrievals), shown or not
            view = memory_view(model, cache, sae, window, heads[d], t, n=T * sae.cfg.n_features, min_distance=min_distance)
            terms = [MemoryTerm(x["position"], x["distance"], tokens[w][x["position"]],
                                "".join(tokens[w][max(0, x["position"] - 6) : x["position"]]), x["feature"], x["code"],
                                x["read_projection"], x["read_norm"], x["logit"]) for x in view["terms"]]
            shown = terms[:n_terms]
            rest = lambda parts, number: {"other_features": parts["features"] - sum(number(x) for x in shown),
                                          **{key: parts[key] for key in MEMORY_REST[1:]}}
            views[k] = MemoryView(heads[d], d, w, t, tokens[w][t], "".join(tokens[w][max(0, t - left) : t]), view["read_norm"],
                                  float(far[w, t, d]), shown,
                                  rest(view["parts_read_projection"], lambda x: x.read_projection),
                                  vocab(int(windows[w, t + 1])), int(windows[w, t + 1]), view["direct_logit"],
                                  rest(view["parts_logit"], lambda x: x.logit))
            by_feature = defaultdict(list)
            for x in terms:
                by_feature[x.feature].append(x)
            for feature, mine in by_feature.items():
                retrievals[d, feature].append(FeatureRetrieval(k, w, t, len(mine), sum(x.read_projection for x in mine),
                                                               sum(x.logit for x in mine)))
    section.views = views
    return section, retrievals


def shown_contexts(card: FeatureCard) -> list[ShownContext]:
    """Every context a card shows: the top ones, then each quantile group's."""
    return card.top_contexts + [context for group in card.quantile_groups for context in group.contexts]


def _add_ablations_and_hovers(model, sae: SAEBase, site: Site, windows: Tensor, cards: list[FeatureCard], ablation_firings: int,
                              horizon: int, loss_tokens: int, n_hover_logits: int, directions: Tensor, vocab, batch_size: int,
                              progress: bool) -> None:
    """The carried KL of each card (at its first ``ablation_firings`` top contexts) and the hover of every
    firing token of its contexts: the direct effect of that one firing, and its loss change for the
    first ``loss_tokens`` of them (each context's own firing token first, then the others in the
    order shown), all the ablations in one `_ablate` run."""
    ablations: list[_Firing] = []
    kl_rows: dict[int, list[int]] = defaultdict(list)  # card -> its rows of ablations for the KL
    slot: dict[tuple[int, int, int], int] = {}  # (card, window, position) -> the row giving its loss change
    hovered: list[tuple[int, _Firing]] = []  # (card, firing) of every firing token shown
    for c, card in enumerate(cards):
        for context in card.top_contexts[:ablation_firings]:
            slot[c, context.window, context.position] = len(ablations)
            kl_rows[c].append(len(ablations))
            ablations.append(_Firing(context.window, context.position, card.dictionary, card.feature, context.activation, horizon))
        firing_tokens = {}  # (window, position) -> code: each context's own firing token first
        for context in shown_contexts(card):
            firing_tokens.setdefault((context.window, context.position), context.activation)
        for context in shown_contexts(card):
            for offset, a in enumerate(context.activations):
                if a > 0:
                    firing_tokens.setdefault((context.window, context.start + offset), a)
        for rank, ((w, t), a) in enumerate(firing_tokens.items()):
            firing = _Firing(w, t, card.dictionary, card.feature, a, 1)
            hovered.append((c, firing))
            if rank < loss_tokens and (c, w, t) not in slot:
                slot[c, w, t] = len(ablations)
                ablations.append(firing)

    kl_next, kl_carried, loss_change = _ablate(model, sae, site, windows, ablations, progress)
    for c, rows in kl_rows.items():
        cards[c].kl_next, cards[c].kl_carried = float(kl_next[rows].mean()), float(kl_carried[rows].mean())
        cards[c].n_ablated = len(rows)

    hovers: dict[tuple[int, int, int], TokenHover] = {}
    up, down = _firing_logit_extremes(model, sae, site, windows, [f for _, f in hovered], directions, n_hover_logits, batch_size)
    promoted, suppressed = _effects(*up, vocab), _effects(*down, vocab)
    for (c, f), up, down in zip(hovered, promoted, suppressed):
        row = slot.get((c, f.window, f.position))
        loss = None if row is None or math.isnan(loss_change[row]) else float(loss_change[row])
        hovers[c, f.window, f.position] = TokenHover(up, down, loss)
    for c, card in enumerate(cards):
        swap = lambda context: replace(context, hovers=[hovers.get((c, context.window, context.start + offset))
                                                        for offset in range(len(context.tokens))])
        card.top_contexts = [swap(context) for context in card.top_contexts]
        card.quantile_groups = [replace(group, contexts=[swap(context) for context in group.contexts])
                                for group in card.quantile_groups]


def _vocabulary(model):
    """token id -> its text (``⟨id⟩`` without a tokenizer)."""
    if model.tokenizer is None:
        return lambda token: f"⟨{token}⟩"
    return lambda token: model.tokenizer.decode([token])
