"""The memory explained by past write features: each read of layer 5 split exactly over (past write, feature).

    python -m demos.memory_attribution    # writes demos/results/memory_attribution/{results.json, memory_attribution.png}

For every head of the write SAE's layer (``--sae``, default the shipped ``gdn-austen/L5-write``), at
``--queries`` seeded positions t ≥ ``--min-position`` of each of ``--passages`` held-out windows of ``--context``
tokens, `writesae.memory_attribution.memory_attribution` writes the read o_t as Σ_j Σ_i feature terms + each write's
decoder-bias and error terms (exact: the terms sum to ``hook_recurrence_out``; the run's maximum relative
mismatch is recorded), and likewise the head's direct logit effect on the next token, through the output path held
at the run's normalisers and gate.

**Far part.** "At distances > ``--min-distance``": the part of the read from writes made more than that many tokens
before t, o_t^far = Σ_{j < t − d} (feature + bias + error terms). For it, pooled over queries:

- the share of the whole read it is: Σ_t ‖o_t^far‖ / Σ_t ‖o_t‖;
- what its ``--top`` feature terms carry, ranked by |⟨term, o_t^far⟩|: 1 − Σ_t ‖o_t^far − Σ_top‖ / Σ_t ‖o_t^far‖
  (the fraction of its norm carried; 0 when the top terms are no better than nothing), with the per-query median;
  and the shares of ⟨·, o_t^far⟩ / ‖o_t^far‖² held by all its feature terms, the bias terms and the errors
  (they sum to 1);
- the same for its direct logit effect ℓ^far on the next token, top terms ranked by |ℓ|:
  1 − Σ_t |ℓ^far − ℓ_top| / Σ_t |ℓ^far|, and the shares Σ_t ℓ_part / Σ_t ℓ^far;
- the number of far feature terms per query (what the top ones are chosen from).

The whole read (every distance) is reported beside it. **State rebuilt from reconstructed writes**:
S_t ≈ Σ_j G_{j→t} X̂_j with every (write, feature) atom (and without the decoder bias's Σ_j G_{j→t} b_dec), and with only the ``--state-atoms`` largest
(by ‖G a atom‖_F; the bias Σ_j G_{j→t} b_dec kept whole), against the state SAE (``--state-sae``, its codes' L0
stated) and PCA-k fitted on states of ``--pca-windows`` training windows (``--pca-k``), by FVU on the held-out
states at the query positions (Σ‖S − Ŝ‖² / Σ‖S − S̄‖², S̄ their mean, as `writesae.evals`).

Heads are split by the shipped census into long-memory (median half-life ≥ 16 tokens; fixed decays in the shipped
model) and the learned short ones, reported apart.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

import torch

from demos.common import (demo_parser, heldout_passages, load_model_and_sae, memory_groups, provenance, pyplot, sae_layer,
                          save_figure, wall_time, write_json)
from hooked_gdn.files import file_sha256
from hooked_gdn.pretrained import austen_documents
from hooked_gdn.sites import gdn_hook_name, site_name
from writesae import load_sae
from writesae.baselines import PCABaseline
from writesae.io import WEIGHTS_FILE, resolve_sae
from writesae.memory_attribution import (FINAL_SCALE_HOOK, LOGIT_HOOKS, READ_HOOKS, memory_attribution, rebuilt_state,
                                         state_parts)


def query_positions(rng: random.Random, context: int, n: int, first: int) -> list[int]:
    """``n`` sorted positions in first … context − 2 (each has a next token)."""
    return sorted(rng.sample(range(first, context - 1), n))


def training_windows(tokenizer, n: int, context: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``context`` tokens from seeded training chapters (joined with EOS), for fitting PCA."""
    chapters = austen_documents("train")
    random.Random(seed).shuffle(chapters)
    ids: list[int] = []
    for doc in chapters:
        ids += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= n * context:
            break
    return torch.tensor(ids[: n * context]).view(n, context)


class FVU:
    """Σ‖X − X̂‖² / Σ‖X − X̄‖² over the samples added (X̄ their mean), as `writesae.evals.reconstruction_metrics`."""

    def __init__(self):
        self.sq_error = self.sq = 0.0
        self.total, self.n = 0.0, 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = x.double().flatten(1), x_hat.double().flatten(1)
        self.sq_error += float((x - x_hat).pow(2).sum())
        self.sq += float(x.pow(2).sum())
        self.total = self.total + x.sum(0)
        self.n += x.shape[0]

    def value(self) -> float:
        return self.sq_error / (self.sq - float(self.total.pow(2).sum()) / self.n)


def far_metrics(a, min_distance: int, top: int) -> list[dict]:
    """Per query: the far and whole reads, what their top feature terms carry, and the parts' shares."""
    far = (a.distances() > min_distance).double()  # [q, T]
    rows = []
    for part, mask in (("far", far), ("whole", (a.distances() >= 0).double())):
        features = a.feature_reads * mask[..., None, None]
        read = features.sum((1, 2)) + (a.bias_reads * mask[..., None]).sum(1) + (a.error_reads * mask[..., None]).sum(1)
        if part == "whole":
            read = read + a.initial_read
        logit_features = a.feature_logits[..., 0] * mask[..., None]
        bias_logit = (a.bias_logits[..., 0] * mask).sum(1)
        error_logit = (a.error_logits[..., 0] * mask).sum(1)
        logit = logit_features.sum((1, 2)) + bias_logit + error_logit + (a.initial_logits[:, 0] if part == "whole" else 0)
        active = (a.codes != 0)[None] & (mask[..., None] > 0)  # [q, T, m]
        for q in range(read.shape[0]):
            terms = features[q][active[q]]  # [n_terms, d_v]
            n_terms = terms.shape[0]
            r = read[q]
            top_read = terms[(terms @ r).abs().topk(min(top, n_terms)).indices].sum(0) if n_terms else torch.zeros_like(r)
            term_logits = logit_features[q][active[q]]
            top_logit = term_logits[term_logits.abs().topk(min(top, n_terms)).indices].sum() if n_terms else 0.0
            sq = float(r @ r)
            rows.append({
                "part": part, "n_terms": n_terms, "read_norm": float(r.norm()),
                "residual_norm": float((r - top_read).norm()), "whole_norm": float(a.read[q].norm()),
                "along_whole": float(r @ a.read[q]),
                "shares": {"features": float(features[q].sum((0, 1)) @ r) / sq if sq else 0.0,
                           "bias": float((a.bias_reads[q] * mask[q, :, None]).sum(0) @ r) / sq if sq else 0.0,
                           "errors": float((a.error_reads[q] * mask[q, :, None]).sum(0) @ r) / sq if sq else 0.0},
                "logit": float(logit[q]), "logit_residual": float(logit[q] - top_logit),
                "logit_parts": {"features": float(logit_features[q].sum()), "bias": float(bias_logit[q]),
                                "errors": float(error_logit[q])},
                "total_read_error": float((a.total_read()[q] - a.read[q]).norm() / a.read[q].norm()),
                "total_logit_abs_error": float((a.total_logits()[q, 0] - a.direct_logits[q, 0]).abs()),
                "direct_logit": float(a.direct_logits[q, 0]),
            })
    return rows


def summarise(rows: list[dict]) -> dict:
    median = lambda xs: float(torch.tensor(xs, dtype=torch.float64).median()) if xs else None
    out = {}
    for part in ("far", "whole"):
        rs = [r for r in rows if r["part"] == part]
        norm = sum(r["read_norm"] for r in rs)
        logit = sum(abs(r["logit"]) for r in rs)
        sq = sum(r["read_norm"] ** 2 for r in rs)
        out[part] = {
            "queries": len(rs),
            "share_of_whole_read_norm": norm / sum(r["whole_norm"] for r in rs),
            "top_carried_read_norm": 1 - sum(r["residual_norm"] for r in rs) / norm,
            "top_carried_read_norm_median": median([1 - r["residual_norm"] / r["read_norm"] for r in rs if r["read_norm"] > 0]),
            "read_shares_pooled": {k: sum(r["shares"][k] * r["read_norm"] ** 2 for r in rs) / sq
                                   for k in ("features", "bias", "errors")},
            "top_carried_logit": 1 - sum(abs(r["logit_residual"]) for r in rs) / logit,
            "top_carried_logit_median": median([1 - abs(r["logit_residual"]) / abs(r["logit"]) for r in rs if r["logit"] != 0]),
            "logit_shares_pooled": {k: sum(r["logit_parts"][k] for r in rs) / sum(r["logit"] for r in rs)
                                    for k in ("features", "bias", "errors")},
            "mean_abs_logit": logit / len(rs),
            "feature_terms_per_query_median": median([r["n_terms"] for r in rs]),
        }
    # the terms against the run: max ‖Σ terms − o_t‖ / ‖o_t‖, and max |Σ − ℓ| / max |ℓ| over queries
    out["relative_error_of_the_sum"] = {
        "read": max(r["total_read_error"] for r in rows),
        "logit": max(r["total_logit_abs_error"] for r in rows) / max(abs(r["direct_logit"]) for r in rows)}
    return out


def main() -> None:
    parser = demo_parser(__doc__, "demos/results/memory_attribution")
    parser.set_defaults(sae="gdn-austen/L5-write", passages=32, context=512)
    parser.add_argument("--queries", type=int, default=16, help="query positions per passage")
    parser.add_argument("--min-position", type=int, default=64, help="first query position")
    parser.add_argument("--min-distance", type=int, default=16, help="the far part: writes more than this many tokens back")
    parser.add_argument("--top", type=int, default=10, help="feature terms kept")
    parser.add_argument("--state-sae", default="gdn-austen/L5-state")
    parser.add_argument("--state-atoms", type=int, nargs="+", default=[16, 64, 256], help="atoms kept in the rebuilt state")
    parser.add_argument("--pca-windows", type=int, default=24, help="training windows whose states fit PCA")
    parser.add_argument("--pca-positions", type=int, default=32, help="random positions per training window")
    parser.add_argument("--pca-k", type=int, nargs="+", default=[16, 64, 256])
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(args.seed)
    model, sae = load_model_and_sae(args.sae)
    state_sae = load_sae(args.state_sae).eval()
    layer = sae_layer(sae)
    heads = sae.cfg.head_indices
    groups = memory_groups(layer, heads)
    tokens = heldout_passages(model, args.passages, args.context)
    state_site = site_name(layer, "state")
    names = [gdn_hook_name(layer, h) for h in READ_HOOKS + LOGIT_HOOKS] + [FINAL_SCALE_HOOK, state_site]

    with torch.no_grad():
        # PCA on training-split states at random positions (as the shipped SAEs were trained)
        rng = random.Random(args.seed)
        fit = []
        for window in training_windows(model.tokenizer, args.pca_windows, args.context, args.seed):
            positions = sorted(rng.sample(range(args.context), args.pca_positions))
            _, cache = model.run_with_cache(window[None], names_filter=[state_site], state_positions=positions)
            fit.append(cache[state_site][0][:, heads])
        fit = torch.cat(fit)  # [n, heads, d_k, d_v]
        pcas = {k: PCABaseline.fit(fit, k, seed=args.seed) for k in args.pca_k if k <= fit.shape[0]}

        rows = defaultdict(list)
        fvu = defaultdict(lambda: defaultdict(FVU))
        atoms_used = defaultdict(lambda: defaultdict(list))
        for p, window in enumerate(tokens):
            positions = query_positions(rng, args.context, args.queries, args.min_position)
            _, cache = model.run_with_cache(window[None], names_filter=names, state_positions=positions)
            states = cache[state_site][0]  # [q, H, d_k, d_v]
            state_codes = state_sae.encode(states[:, state_sae.cfg.head_indices])
            state_recon = state_sae.decode(state_codes)
            next_tokens = window[[t + 1 for t in positions]][:, None]
            for head in heads:
                a = memory_attribution(model, cache, sae, head, positions, logit_tokens=next_tokens)
                rows[head] += far_metrics(a, args.min_distance, args.top)
                s = states[:, head]
                errors, initial = state_parts(a)
                rebuilt, n_atoms = rebuilt_state(a, sae)
                mismatch = float((rebuilt + errors + initial - s).norm() / s.norm())
                if not mismatch < 1e-4:
                    raise RuntimeError(f"passage {p}, head {head}, positions {positions}: the rebuilt state, the SAE errors "
                                       f"and the initial state miss the cached state by {mismatch:.3g} (relative)")
                fvu[head]["rebuilt, every atom"].add(s, rebuilt)
                atoms_used[head]["rebuilt, every atom"] += n_atoms.tolist()
                fvu[head]["rebuilt, every atom, no bias"].add(s, rebuilt_state(a, sae, bias=False)[0])
                atoms_used[head]["rebuilt, every atom, no bias"] += n_atoms.tolist()
                for m in args.state_atoms:
                    part, n_atoms = rebuilt_state(a, sae, top=m)
                    fvu[head][f"rebuilt, top {m} atoms"].add(s, part)
                    atoms_used[head][f"rebuilt, top {m} atoms"] += n_atoms.tolist()
                d = state_sae.cfg.dictionary(head)
                fvu[head]["state SAE"].add(s, state_recon[:, d])
                atoms_used[head]["state SAE"] += (state_codes[:, d] != 0).sum(-1).tolist()
                for k, pca in pcas.items():
                    fvu[head][f"PCA-{k}"].add(s, pca(states[:, heads])[:, heads.index(head)])
                    atoms_used[head][f"PCA-{k}"] += [k] * len(positions)
            print(f"passage {p + 1}/{len(tokens)} ({time.time() - start:.0f}s)", flush=True)

    per_head = {head: {"attribution": summarise(rows[head]),
                       "state_fvu": {name: acc.value() for name, acc in fvu[head].items()},
                       "state_atoms_mean": {name: sum(v) / len(v) for name, v in atoms_used[head].items()}}
                for head in heads}
    by_group = {group: summarise([r for h in groups[group] for r in rows[h]]) for group in ("long", "short") if groups[group]}
    results = {
        "provenance": provenance(args.seed, sae=args.sae, passages=args.passages, context=args.context,
                                 queries_per_passage=args.queries, min_position=args.min_position,
                                 min_distance=args.min_distance, top=args.top, state_sae=args.state_sae,
                                 state_sae_sha256=file_sha256(resolve_sae(args.state_sae) / WEIGHTS_FILE),
                                 state_atoms=args.state_atoms, pca_windows=args.pca_windows,
                                 pca_positions=args.pca_positions, pca_k=args.pca_k, pca_samples=fit.shape[0]),
        "layer": layer, "heads": groups, "passages": tokens.shape[0], "context": tokens.shape[1],
        "queries_per_head": len(rows[heads[0]]) // 2, "min_distance": args.min_distance, "top": args.top,
        "by_group": by_group, "per_head": per_head, "seconds": round(time.time() - start),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", results)
    plot(results, args.out / "memory_attribution.png")
    print(readme_block(results))
    print(f"wrote {args.out}/results.json, memory_attribution.png in {time.time() - start:.0f}s")


def plot(results: dict, path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    heads = list(results["per_head"])
    half = {int(h): v for h, v in results["heads"]["half_life"].items()}
    labels = [f"head {h}\n({half[int(h)]:.0f} tok)" for h in heads]
    for i, (key, name) in enumerate((("top_carried_read_norm", "far read norm"), ("top_carried_logit", "far direct logit"),
                                     ("share_of_whole_read_norm", "far share of ‖o_t‖"))):
        left.bar([x + 0.27 * i for x in range(len(heads))],
                 [results["per_head"][h]["attribution"]["far"][key] for h in heads], 0.27, label=name)
    left.set_xticks([x + 0.27 for x in range(len(heads))], labels)
    left.axhline(0, color="k", lw=0.5)
    left.set_title(f"top-{results['top']} feature terms, writes > {results['min_distance']} tokens back")
    left.legend(fontsize=8)
    names = list(results["per_head"][heads[0]]["state_fvu"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        right.bar([x + width * i for x in range(len(heads))], [results["per_head"][h]["state_fvu"][name] for h in heads],
                  width, label=name)
    right.set_xticks([x + 0.4 - width / 2 for x in range(len(heads))], labels)
    right.set_ylabel("held-out state FVU")
    right.set_yscale("log")
    right.legend(fontsize=7)
    save_figure(fig, path)


def readme_block(results: dict) -> str:
    """The README's paragraph on this study; every number from ``results``."""
    g, top, d = results["by_group"], results["top"], results["min_distance"]
    heads = results["heads"]
    half = {int(h): v for h, v in heads["half_life"].items()}
    describe = lambda group: ", ".join(f"{h} ({half[h]:.0f})" for h in heads[group])
    pct = lambda x: f"{100 * x:.0f}%"
    lines = [f"`python -m demos.memory_attribution` ({wall_time(results)}; {results['passages']} held-out windows of "
             f"{results['context']} tokens, {results['queries_per_head']} query positions per head; layer {results['layer']}, "
             f"write SAE {results['provenance']['sae']}). Long-memory heads (median half-life in tokens): "
             f"{describe('long')}; learned short heads: {describe('short')}."]
    for group, name in (("long", "long-memory"), ("short", "learned short")):
        if group not in g:
            continue
        far, whole = g[group]["far"], g[group]["whole"]
        lines.append(
            f"On the {name} heads the part of the read from writes more than {d} tokens back is "
            f"{pct(far['share_of_whole_read_norm'])} of ‖o_t‖ (summed over queries); its top {top} (write, feature) terms, "
            f"of a median {far['feature_terms_per_query_median']:.0f}, carry {pct(far['top_carried_read_norm'])} of its norm "
            f"(1 − Σ‖rest‖/Σ‖far read‖; median per query {pct(far['top_carried_read_norm_median'])}) and "
            f"{pct(far['top_carried_logit'])} of its direct logit effect on the next token; along the far read, "
            f"features / decoder bias / SAE errors hold {far['read_shares_pooled']['features']:.2f} / "
            f"{far['read_shares_pooled']['bias']:.2f} / {far['read_shares_pooled']['errors']:.2f}. Over the whole read "
            f"the top {top} carry {pct(whole['top_carried_read_norm'])} of the norm and {pct(whole['top_carried_logit'])} "
            f"of the direct logit effect.")
    rows = ["| head | " + " | ".join(results["per_head"][next(iter(results["per_head"]))]["state_fvu"]) + " |",
            "|---|" + "---|" * len(results["per_head"][next(iter(results["per_head"]))]["state_fvu"])]
    for h, r in results["per_head"].items():
        rows.append(f"| {h} | " + " | ".join(f"{fvu:.3f} ({r['state_atoms_mean'][name]:.0f})"
                                           for name, fvu in r["state_fvu"].items()) + " |")
    lines += ["", "Held-out state FVU (mean atoms used per state):", "", *rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
