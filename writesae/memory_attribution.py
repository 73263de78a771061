"""The read of a Gated DeltaNet head as a sum over (past write, write-SAE feature) terms, exactly.

Effective attention over the writes (docs/design.md §9.1, `hooked_gdn.effective_attention`) writes head h's
read at position t as

    o_t = Σ_{j≤t} G_{j→t} X_jᵀ q̂_t + G_{−1→t} S_initᵀ q̂_t,     X_j = k̂_j δ_jᵀ (the write of position j),

with G_{j→t} = Π_{s=j+1..t} α_s. A write SAE on the layer's write site reconstructs each write as
X_j = X̂_j + e_j, X̂_j = (b_dec + Σ_i a_ji atom_i) / s (s the SAE's ``input_scale``; a rank-1 atom is u_i w_iᵀ),
so the read splits exactly into

    o_t = Σ_j Σ_i  G_{j→t} a_ji atom_iᵀ q̂_t / s      feature terms: a_ji (q̃_{t←j} · u_i) w_i at rank 1,
        + Σ_j      G_{j→t} b_decᵀ q̂_t / s            the decoder bias, once per write,
        + Σ_j      G_{j→t} e_jᵀ q̂_t                  the SAE's error on each write,
        + G_{−1→t} S_initᵀ q̂_t                       the initial state (zero from a zero state),

q̃_{t←j} = G_{j→t} q̂_t being the query carried back to position j. The error e_j = X_j − X̂_j is formed from
the write and the SAE's reconstruction, not as what is left of o_t, so that the terms summing to the model's
``hook_recurrence_out`` is a check, not an identity.

**Direct logit effect.** The head's output path, y_t = w ⊙ RMSNorm(o_t) ⊙ SiLU(z_t), then W_o and the final
RMSNorm, is not linear in o_t. It is linearised *at the run*: both normalisers (the head's ρ_t =
√(mean(o_t²) + ε) and the final norm's scale σ_t, TransformerLens' ``ln_final.hook_scale``) and the gate SiLU(z_t)
are held at their values in the cached run, so a read term x maps to the logit of token v as

    ℓ_v(x) = (w ⊙ SiLU(z_t) / ρ_t ⊙ x) · W_o,hᵀ ((1 + w_f) ⊙ W_U[:, v]) / σ_t,

which is how TransformerLens' ``apply_ln_to_stack`` + ``logit_attrs`` attribute a residual stack. Under this
definition the terms' logits sum exactly to the head's direct logit effect in the run, dir_v · W_o,h y_t / σ_t;
a term's logit is its first-order effect, not what deleting it would do (the normaliser would move). In bf16 the
gated norm rounds RMSNorm(o_t) before the multiply, so the sum then holds to bf16 rounding only.

**Families.** GDN (the delta rule's transition) only. Mamba-2's write B_t (Δ_t x_t)ᵀ has GDN's hook names and
`effective_attention` decomposes its read the same way, but its output path normalises a group of heads together
and adds the D x_t skip, so its direct effect needs that path's linearisation (not written). RWKV-7's erase
(a_t ⊙ κ̂_t) e_tᵀ is a rank-1 term of its own (``EffectiveAttention.erase_pattern``), which would need a second
dictionary on the erase site (or the erases kept whole as terms), and its bonus is added after the read's GroupNorm.

`memory_attribution` computes the terms for chosen query positions of one head and sequence; `top_terms` ranks
them; `rebuilt_state` is the state rebuilt from the reconstructed writes, S_t ≈ Σ_j G_{j→t} X̂_j; `memory_view`
and `memory_view_html` are the dashboard's "what this head's memory retrieves at position t".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from hooked_gdn.delta_rule import DELTA_RULE
from hooked_gdn.effective_attention import segment_decay, effective_attention
from hooked_gdn.sites import gdn_hook_name, parse_site, rank_one

from .sae import SAEBase

#: the cached hook points the attribution reads (short names, in the SAE's layer)
READ_HOOKS = ("hook_read_query", "hook_write_key", "hook_write_value", "hook_log_decay", "hook_recurrence_out")
LOGIT_HOOKS = ("hook_gate_input", "hook_gated_out")
FINAL_SCALE_HOOK = "ln_final.hook_scale"
RANKINGS = ("read", "logit")


@dataclass
class MemoryAttribution:
    """One head's reads o_t at ``query_positions`` (q of them) of one sequence, as terms over the T positions.

    ``features``/``codes`` [T, m]: the write SAE's active features of each write (m the most active in any write;
    unused slots have code 0). Every term tensor is zero for j > t. ``decay`` [q, T] is G_{j→t}, ``initial_decay``
    [q] G_{−1→t}. Logit fields are
    None unless ``logit_tokens`` were given; their last axis follows ``logit_tokens`` [q, n_tokens].
    """

    layer: int
    head: int
    sequence: int
    query_positions: Int[Tensor, " q"]
    features: Int[Tensor, "pos m"]
    codes: Float[Tensor, "pos m"]
    decay: Float[Tensor, "q pos"]
    read: Float[Tensor, "q d_v"]
    feature_reads: Float[Tensor, "q pos m d_v"]
    bias_reads: Float[Tensor, "q pos d_v"]
    error_reads: Float[Tensor, "q pos d_v"]
    initial_read: Float[Tensor, "q d_v"]
    write_errors: Float[Tensor, "pos d_k d_v"]
    initial_decay: Float[Tensor, " q"]
    initial_state: Float[Tensor, "d_k d_v"] | None = None
    logit_tokens: Int[Tensor, "q n_tokens"] | None = None
    direct_logits: Float[Tensor, "q n_tokens"] | None = None
    feature_logits: Float[Tensor, "q pos m n_tokens"] | None = None
    bias_logits: Float[Tensor, "q pos n_tokens"] | None = None
    error_logits: Float[Tensor, "q pos n_tokens"] | None = None
    initial_logits: Float[Tensor, "q n_tokens"] | None = None

    def total_read(self) -> Float[Tensor, "q d_v"]:
        """Σ of every term: equal to ``read`` (the model's ``hook_recurrence_out``) up to fp32 rounding."""
        return self.feature_reads.sum((1, 2)) + self.bias_reads.sum(1) + self.error_reads.sum(1) + self.initial_read

    def total_logits(self) -> Float[Tensor, "q n_tokens"]:
        """Σ of every term's logit: equal to ``direct_logits`` up to fp32 rounding."""
        self._need_logits()
        return self.feature_logits.sum((1, 2)) + self.bias_logits.sum(1) + self.error_logits.sum(1) + self.initial_logits

    def distances(self) -> Int[Tensor, "q pos"]:
        """t − j for each query and past position (negative for j > t, where every term is zero)."""
        return self.query_positions[:, None] - torch.arange(self.codes.shape[0])[None, :]

    def _need_logits(self) -> None:
        if self.feature_logits is None:
            raise ValueError("this attribution has no logits: pass logit_tokens to memory_attribution")


def _check_family(model, layer: int) -> None:
    transition = getattr(model.blocks[layer].linear_attn, "transition", None)
    if transition is DELTA_RULE:
        return
    family = type(model).family_of(model.cfg).name
    raise NotImplementedError(
        f"memory_attribution supports Gated DeltaNet layers; layer {layer} of this {family} model is not one. "
        "Mamba-2 would need its output path linearised (its gated norm normalises a group of heads together and the "
        "D x_t skip is added): its read decomposes over the writes as GDN's does (hooked_gdn.effective_attention). "
        "RWKV-7 would need its erase terms (a_t ⊙ κ̂_t) e_tᵀ, a rank-1 term of their own, covered by a dictionary on "
        "the erase site or kept whole, and its bonus, added after the read's GroupNorm")


def _write_site_layer(sae: SAEBase) -> int:
    site = parse_site(sae.cfg.site)
    if site.kind != "write":
        raise ValueError(f"memory_attribution needs a write SAE (its site a GDN layer's hook_write_value); this SAE's site "
                         f"is {sae.cfg.site!r}, a {site.kind} site")
    return site.layer


def attributable_layer(model, sae: SAEBase) -> int:
    """The GDN layer whose write ``sae`` reconstructs, after refusing, with the reason, an SAE or a layer that
    `memory_attribution` cannot decompose (ValueError: not a write SAE; NotImplementedError: not a GDN layer)."""
    layer = _write_site_layer(sae)
    _check_family(model, layer)
    return layer


def _positions(positions: int | Sequence[int] | Tensor, n: int) -> Tensor:
    positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    if positions.numel() == 0 or (positions < 0).any() or (positions >= n).any():
        raise ValueError(f"query positions {positions.tolist()} must be non-empty and in 0..{n - 1}")
    return positions


@torch.no_grad()
def memory_attribution(
    model,
    cache: Mapping[str, Tensor],
    sae: SAEBase,
    head: int,
    positions: int | Sequence[int] | Tensor,
    *,
    sequence: int = 0,
    logit_tokens: int | Sequence | Tensor | None = None,
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
) -> MemoryAttribution:
    """Head ``head``'s reads at ``positions`` of batch row ``sequence``, as terms over (past write, feature) of the
    write SAE ``sae`` (its layer is the SAE's site), plus each write's bias and error terms and the initial state's.

    ``cache``: ``model.run_with_cache(tokens)`` (a default cache holds every hook point read here).
    ``logit_tokens``: tokens whose direct logit effect to attribute: an int or a list for every query, or
    [q, n_tokens] per query. ``initial_state`` [b, H_v, d_k, d_v]: the state the run started from, for a run that
    continued a prefix (as `hooked_gdn.effective_attention.effective_attention` takes it).
    """
    layer = attributable_layer(model, sae)
    dictionary = sae.cfg.dictionary(head)
    names = {hook: gdn_hook_name(layer, hook) for hook in READ_HOOKS + (LOGIT_HOOKS if logit_tokens is not None else ())}
    if logit_tokens is not None:
        names[FINAL_SCALE_HOOK] = FINAL_SCALE_HOOK
    missing = [name for name in names.values() if name not in cache]
    if missing:
        raise ValueError(f"the cache lacks {missing}: a default model.run_with_cache(tokens) caches them")
    # in fp64, so that the terms' sum is checked against the run's fp32 read, not against their own rounding
    x = {hook: cache[name][sequence].double() for hook, name in names.items()}
    T = x["hook_write_key"].shape[0]
    query_positions = _positions(positions, T)

    # the writes of every head the SAE has a dictionary for (it encodes them together), and their reconstructions
    sae_heads = torch.tensor(sae.cfg.head_indices)
    keys, values = x["hook_write_key"][:, sae_heads], x["hook_write_value"][:, sae_heads]
    codes_all = sae.encode_factors(keys.to(sae.b_dec), values.to(sae.b_dec))
    writes = rank_one(keys, values)[:, dictionary]
    write_errors = writes - sae.decode(codes_all)[:, dictionary].double()
    codes = codes_all[:, dictionary].double()  # [T, n]
    active = int((codes != 0).sum(-1).max().clamp_min(1))
    features = codes.abs().topk(active, -1).indices
    slot_codes = codes.gather(-1, features)

    # propagation: G_{j→t} from effective attention's own segment decay; the initial term from effective attention
    # (a log decay of 0 put before position 0 stands for the state before it, position −1: its column is G_{−1→t})
    log_decay = F.pad(x["hook_log_decay"][:, head], (1, 0))
    decay_from = segment_decay(log_decay[None, :, None])[0, 0][query_positions + 1]  # [q, 1 + T]
    initial_decay, decay = decay_from[:, 0], decay_from[:, 1:]
    q_hat = x["hook_read_query"][query_positions, head]  # [q, d_k]
    scale = sae.cfg.input_scale
    atom_reads = torch.einsum("nkv,qk->qnv", sae.atoms()[dictionary].double(), q_hat) / scale  # atom_iᵀ q̂_t / s
    weights = decay[:, :, None] * slot_codes[None]  # G_{j→t} a_ji [q, T, m]
    feature_reads = weights[..., None] * atom_reads[torch.arange(len(q_hat))[:, None, None], features[None]]
    bias_read = (sae.b_dec[dictionary].double().T @ q_hat.T).T / scale  # b_decᵀ q̂_t / s [q, d_v]
    bias_reads = decay[..., None] * bias_read[:, None]
    error_reads = decay[..., None] * torch.einsum("jkv,qk->qjv", write_errors, q_hat)
    init_state = None
    initial_read = q_hat.new_zeros(len(q_hat), values.shape[-1])
    if initial_state is not None:
        init_state = initial_state[sequence, head].double()
        ea = effective_attention(cache, layer, "writes", heads=[head], initial_state=initial_state)
        initial_read = ea.initial[sequence, query_positions, 0].double()

    attribution = MemoryAttribution(
        layer, head, sequence, query_positions, features, slot_codes, decay, x["hook_recurrence_out"][query_positions, head],
        feature_reads, bias_reads, error_reads, initial_read, write_errors, initial_decay, init_state)
    if logit_tokens is not None:
        _attribute_logits(model, attribution, x, logit_tokens)
    return attribution


def _logit_tokens(tokens, q: int) -> Tensor:
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() <= 1:
        return tokens.reshape(1, -1).expand(q, -1)
    if tokens.dim() != 2 or tokens.shape[0] != q:
        raise ValueError(f"logit_tokens must be a token, a list of tokens, or [q={q}, n_tokens]; got shape {tuple(tokens.shape)}")
    return tokens


def _attribute_logits(model, attribution: MemoryAttribution, x: dict, tokens) -> None:
    """Each read term's direct logit effect through the output path held at the run (see the module docstring)."""
    t, head = attribution.query_positions, attribution.head
    mixer = model.blocks[attribution.layer].linear_attn
    d_v = attribution.read.shape[-1]
    tokens = _logit_tokens(tokens, len(t))
    read = attribution.read
    gain = (mixer.norm.w.double() * F.silu(x["hook_gate_input"][t, head]) *
            torch.rsqrt(read.pow(2).mean(-1, keepdim=True) + mixer.norm.eps))  # y_t = gain ⊙ o_t [q, d_v]
    W_o = mixer.W_o[:, head * d_v:(head + 1) * d_v].double()  # [d_model, d_v]
    directions = model.tokens_to_residual_directions(tokens).double()  # [q, n, d_model]
    final_scale = x[FINAL_SCALE_HOOK][t]  # [q, 1]
    to_logits = gain[:, :, None] * torch.einsum("mv,qnm->qvn", W_o, directions) / final_scale[:, :, None]  # [q, d_v, n]
    attribution.logit_tokens = tokens
    attribution.direct_logits = torch.einsum("qnm,mv,qv->qn", directions, W_o, x["hook_gated_out"][t, head]) / final_scale
    attribution.feature_logits = torch.einsum("qjmv,qvn->qjmn", attribution.feature_reads, to_logits)
    attribution.bias_logits = torch.einsum("qjv,qvn->qjn", attribution.bias_reads, to_logits)
    attribution.error_logits = torch.einsum("qjv,qvn->qjn", attribution.error_reads, to_logits)
    attribution.initial_logits = torch.einsum("qv,qvn->qn", attribution.initial_read, to_logits)


def top_terms(attribution: MemoryAttribution, query: int = 0, n: int = 10, by: str = "read", token: int = 0,
              min_distance: int = 0) -> list[dict]:
    """The ``n`` largest feature terms of query ``query`` (an index into ``query_positions``) among writes at least
    ``min_distance`` positions back, best first.

    ``by="read"`` ranks by |⟨term, o_t⟩| / ‖o_t‖, the term's component along the read; ``by="logit"`` by the size of
    its direct logit effect on ``logit_tokens[query, token]``. Each entry: position, distance, feature, code,
    read_projection (⟨term, o_t⟩ / ‖o_t‖), read_norm (‖term‖) and, with logits, logit.
    """
    if by not in RANKINGS:
        raise ValueError(f"by must be one of {RANKINGS}, got {by!r}")
    if by == "logit":
        attribution._need_logits()
    read = attribution.read[query]
    reads = attribution.feature_reads[query]  # [T, m, d_v]
    projection = reads @ read / read.norm().clamp_min(torch.finfo(read.dtype).tiny)
    logits = None if attribution.feature_logits is None else attribution.feature_logits[query, :, :, token]
    score = (projection if by == "read" else logits).abs().clone()
    far_enough = attribution.distances()[query] >= min_distance
    score[~far_enough] = -1.0
    score[attribution.codes == 0] = -1.0
    order = score.flatten().argsort(descending=True)[:n]
    m = attribution.codes.shape[1]
    terms = []
    for flat in order.tolist():
        j, slot = divmod(flat, m)
        if score[j, slot] < 0:
            break
        term = {"position": j, "distance": int(attribution.query_positions[query]) - j,
                "feature": int(attribution.features[j, slot]), "code": float(attribution.codes[j, slot]),
                "read_projection": float(projection[j, slot]), "read_norm": float(reads[j, slot].norm())}
        if logits is not None:
            term["logit"] = float(logits[j, slot])
        terms.append(term)
    return terms


@torch.no_grad()
def rebuilt_state(attribution: MemoryAttribution, sae: SAEBase, top: int | None = None, bias: bool = True
                  ) -> tuple[Float[Tensor, "q d_k d_v"], Int[Tensor, " q"]]:
    """S_t rebuilt from the reconstructed writes, Σ_j G_{j→t} X̂_j, at each query position, and the number of
    (write, feature) atoms it uses.

    ``top``: keep only the ``top`` feature terms G_{j→t} a_ji atom_i of largest Frobenius norm (the decoder bias's
    Σ_j G_{j→t} b_dec is kept whole: one matrix; ``bias=False`` leaves it out). The SAE's errors Σ_j G_{j→t} e_j and the initial state's
    G_{−1→t} S_init are what the rebuild leaves out: `state_parts` adds them back to the state exactly.
    """
    dictionary = sae.cfg.dictionary(attribution.head)
    atoms = sae.atoms()[dictionary].double()
    weights = attribution.decay[:, :, None] * attribution.codes[None]  # [q, T, m]
    sizes = weights.abs() * sae.atom_norms()[dictionary].double()[attribution.features][None]
    keep = sizes > 0
    if top is not None:
        flat = sizes.flatten(1)
        kth = flat.topk(min(top, flat.shape[1]), -1).values[:, -1:]
        keep = keep & (flat >= kth.clamp_min(torch.finfo(flat.dtype).tiny)).view_as(sizes)
    per_feature = weights.new_zeros(weights.shape[0], atoms.shape[0])
    per_feature.scatter_add_(1, attribution.features[None].expand_as(weights).flatten(1), (weights * keep).flatten(1))
    state = torch.einsum("qn,nkv->qkv", per_feature, atoms)
    if bias:
        state = state + attribution.decay.sum(1)[:, None, None] * sae.b_dec[dictionary].double()
    state = state / sae.cfg.input_scale
    return state, keep.flatten(1).sum(1)


def state_parts(attribution: MemoryAttribution) -> tuple[Float[Tensor, "q d_k d_v"], Float[Tensor, "q d_k d_v"]]:
    """What `rebuilt_state` leaves out of S_t: the propagated SAE errors Σ_j G_{j→t} e_j and the initial state's
    G_{−1→t} S_init (zero without one); the rebuild plus both is S_t."""
    errors = torch.einsum("qj,jkv->qkv", attribution.decay, attribution.write_errors)
    initial = torch.zeros_like(errors)
    if attribution.initial_state is not None:
        initial = attribution.initial_decay[:, None, None] * attribution.initial_state
    return errors, initial


def memory_view(model, cache: Mapping[str, Tensor], sae: SAEBase, tokens: Int[Tensor, "batch pos"], head: int,
                position: int, *, sequence: int = 0, n: int = 10, logit_token: int | None = None,
                min_distance: int = 0) -> dict:
    """The dashboard's "what this head's memory retrieves at position t": the top ``n`` (past position, feature)
    terms of head ``head``'s read at ``position``, with the token at each past position, and the rest of the read
    (other features, bias, errors, initial state) summed. ``logit_token`` (default: the next token, where there is
    one): the token whose direct logit effect is attributed; terms are ranked by their component along the read."""
    row = tokens[sequence]
    if logit_token is None and position + 1 < row.shape[0]:
        logit_token = int(row[position + 1])
    attribution = memory_attribution(model, cache, sae, head, [position], sequence=sequence, logit_tokens=logit_token)
    terms = top_terms(attribution, 0, n, "read", min_distance=min_distance)
    to_str = (lambda ids: model.tokenizer.decode(ids)) if getattr(model, "tokenizer", None) is not None else str
    for term in terms:
        term["token"] = to_str([int(row[term["position"]])])
    read = attribution.read[0]
    unit = read / read.norm().clamp_min(torch.finfo(read.dtype).tiny)
    parts = {"features": attribution.feature_reads[0].sum((0, 1)), "bias": attribution.bias_reads[0].sum(0),
             "errors": attribution.error_reads[0].sum(0), "initial": attribution.initial_read[0]}
    view = {"layer": attribution.layer, "head": head, "position": position, "token": to_str([int(row[position])]),
            "read_norm": float(read.norm()), "terms": terms,
            "parts_read_projection": {k: float(v @ unit) for k, v in parts.items()}}
    if logit_token is not None:
        view["logit_token"] = to_str([logit_token])
        view["direct_logit"] = float(attribution.direct_logits[0, 0])
        view["parts_logit"] = {"features": float(attribution.feature_logits[0, ..., 0].sum()),
                               "bias": float(attribution.bias_logits[0, :, 0].sum()),
                               "errors": float(attribution.error_logits[0, :, 0].sum()),
                               "initial": float(attribution.initial_logits[0, 0])}
    return view


def memory_view_html(view: dict) -> str:
    """`memory_view` as an HTML fragment (a heading and a table), for a dashboard page."""
    has_logit = "direct_logit" in view
    head = (f"<h3>L{view['layer']} head {view['head']} at position {view['position']} "
            f"(<code>{escape(view['token'])}</code>): what its memory retrieves</h3>"
            f"<p>‖o_t‖ = {view['read_norm']:.3g}; components along o_t / ‖o_t‖: "
            + ", ".join(f"{k} {v:.3g}" for k, v in view["parts_read_projection"].items()) + "</p>")
    if has_logit:
        head += (f"<p>direct logit effect on <code>{escape(view['logit_token'])}</code>: {view['direct_logit']:.3g} = "
                 + " + ".join(f"{k} {v:.3g}" for k, v in view["parts_logit"].items()) + "</p>")
    columns = ["past position", "distance", "token", "feature", "code", "along o_t", "‖term‖"] + (["logit"] if has_logit else [])
    rows = "".join(
        "<tr>" + "".join(f"<td>{cell}</td>" for cell in (
            t["position"], t["distance"], f"<code>{escape(t['token'])}</code>", t["feature"], f"{t['code']:.3g}",
            f"{t['read_projection']:.3g}", f"{t['read_norm']:.3g}", *([f"{t['logit']:.3g}"] if has_logit else []))) + "</tr>"
        for t in view["terms"])
    return (head + "<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr></thead><tbody>"
            + rows + "</tbody></table>")
