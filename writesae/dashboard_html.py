"""The feature dashboard as a static site: ``index.html``, ``features/head{h}_feature{i}.html`` and, for a write SAE
on a Gated DeltaNet layer, each head's memory views in ``features/head{h}_memory.html``.

Every page is one self-contained file (inline CSS, the index's sorting and search and the feature
pages' token tooltips as inline JavaScript, the histograms as inline SVG): open ``index.html`` in a
browser, no server or network needed. Numbers are shown rounded and carried in ``data-*`` attributes
to `writesae.dashboard.SIGNIFICANT_DIGITS` significant digits, as in ``dashboard.json``, which is what the
tests read back. A firing token's promoted and suppressed tokens are [token id, Δlogit] pairs; each page
holds the texts of the ids it uses once, in ``<script type="application/json" id="vocabulary">``. The quantities are defined in
`writesae.dashboard`; ``dashboard.json`` beside the pages holds them all (`Dashboard.export_json`).
"""

from __future__ import annotations

import json
import math
import re
from html import escape as _html_escape
from pathlib import Path

from tqdm.auto import tqdm

from hooked_gdn.files import atomic_file, refuse_link

from .dashboard import (MEMORY_REST, Dashboard, FeatureCard, KeyMatch, LogitEffect, MemoryView, QuantileGroup, RelatedFeature,
                        ShownContext, TokenHover, shown_contexts, written)
from .outputs import LOCK, claim_outputs, output_lock, output_subfolder

JSON_NAME = "dashboard.json"  # the site's copy of the feature data (`Dashboard.export_json`)
OUTPUTS = ("index.html", "features", JSON_NAME, LOCK)  # what `write_site` creates in its folder (the lock only while writing)

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 16px 24px; color: #1d2430; background: #fbfbfd; }
h1 { font-size: 22px; margin: 4px 0; } h2 { font-size: 16px; margin: 18px 0 6px; }
a { color: #1f5fbf; text-decoration: none; } a:hover { text-decoration: underline; }
.meta { color: #5b6576; margin: 2px 0 10px; }
table { border-collapse: collapse; } th, td { padding: 3px 8px; text-align: left; }
th { background: #eef1f6; font-weight: 600; } tr:nth-child(even) td { background: #f5f7fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.stats { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0; }
.stat { background: #fff; border: 1px solid #dde2ea; border-radius: 6px; padding: 6px 10px; min-width: 110px; }
.stat .label { color: #5b6576; font-size: 12px; } .stat .value { font-size: 17px; font-weight: 600; }
.grid { display: grid; grid-template-columns: minmax(380px, 1fr) minmax(480px, 1.5fr); gap: 20px; align-items: start; }
.panel { background: #fff; border: 1px solid #dde2ea; border-radius: 6px; padding: 8px 12px; margin-bottom: 14px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.pair table { width: 100%; table-layout: fixed; } .pair th, .pair td { padding: 2px 4px; overflow: hidden; }
.pair td.mono { text-overflow: ellipsis; }
.context { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 13px; padding: 4px 0;
           border-bottom: 1px solid #eef1f6; white-space: pre-wrap; word-break: break-word; }
.context .act { display: inline-block; width: 56px; color: #5b6576; }
.tok { border-radius: 2px; } .tok.fire { outline: 2px solid #c0392b; font-weight: 700; }
.bar { display: inline-block; height: 9px; vertical-align: middle; border-radius: 2px; }
.bar.up { background: #2e7d32; } .bar.down { background: #c62828; } .bar.key { background: #6a4fb3; }
.mono { font-family: ui-monospace, Menlo, monospace; white-space: pre; }
.muted { color: #8a93a3; }
#controls { display: flex; gap: 10px; margin: 6px 0 10px; }
#search { width: 320px; padding: 4px 8px; }
th.sortable { cursor: pointer; user-select: none; } th.sortable::after { content: " ↕"; color: #9aa3b2; }
th.asc::after { content: " ↑"; color: #1d2430; } th.desc::after { content: " ↓"; color: #1d2430; }
svg text { font: 11px system-ui, sans-serif; fill: #5b6576; }
.tok[data-act] { cursor: default; }
#tooltip { position: absolute; display: none; z-index: 10; max-width: 460px; background: #1d2430; color: #fbfbfd;
           font: 12px/1.4 ui-monospace, Menlo, monospace; padding: 6px 9px; border-radius: 5px; pointer-events: none;
           white-space: pre-wrap; }
#tooltip b { color: #f0b45a; font-weight: 600; }
.band { margin-top: 8px; } .band h3 { font-size: 13px; margin: 6px 0 2px; color: #3a4454; }
details { margin-top: 10px; color: #3a4454; }
.memory-view { margin-bottom: 18px; } .memory-view h2 { margin-top: 8px; }
tr.memory-rest td { color: #3a4454; font-style: italic; } tr.memory-total td { font-weight: 600; border-top: 1px solid #9aa3b2; }
"""

# Sorting (click a header; numbers by data-value) and filtering (search box, head menu) of the index.
_INDEX_JS = """
(function () {
  const table = document.getElementById("features");
  const body = table.tBodies[0];
  const search = document.getElementById("search");
  const head = document.getElementById("head-filter");
  const cellValue = (row, column) => {
    const cell = row.cells[column];
    const v = cell.getAttribute("data-value");
    return v === null ? cell.textContent.trim().toLowerCase() : parseFloat(v);
  };
  table.querySelectorAll("th.sortable").forEach((th, _) => {
    th.addEventListener("click", () => {
      const column = th.cellIndex;
      const descending = !th.classList.contains("desc");
      table.querySelectorAll("th.sortable").forEach((other) => other.classList.remove("asc", "desc"));
      th.classList.add(descending ? "desc" : "asc");
      const rows = Array.from(body.rows);
      rows.sort((a, b) => {
        const x = cellValue(a, column), y = cellValue(b, column);
        const bad = (v) => typeof v === "number" && isNaN(v);
        if (bad(x) || bad(y)) return bad(x) - bad(y);
        return (x < y ? -1 : x > y ? 1 : 0) * (descending ? -1 : 1);
      });
      rows.forEach((row) => body.appendChild(row));
    });
  });
  const filter = () => {
    const words = search.value.toLowerCase().split(/\\s+/).filter(Boolean);
    let shown = 0;
    Array.from(body.rows).forEach((row) => {
      const text = row.getAttribute("data-search");
      const ok = (head.value === "all" || row.getAttribute("data-head") === head.value)
        && words.every((w) => text.includes(w));
      row.style.display = ok ? "" : "none";
      shown += ok;
    });
    document.getElementById("shown").textContent = shown;
  };
  search.addEventListener("input", filter);
  head.addEventListener("change", filter);
  filter();
})();
"""


# The feature pages' token tooltip: built with textContent from the hovered token's data-* attributes
# (never innerHTML, so token text cannot inject markup).
_TOOLTIP_JS = """
(function () {
  const tip = document.getElementById("tooltip");
  const vocabulary = JSON.parse(document.getElementById("vocabulary").textContent);
  const signed = (x) => (x >= 0 ? "+" : "") + x.toPrecision(3);
  const line = (label, text) => {
    const row = document.createElement("div");
    const name = document.createElement("b");
    name.textContent = label + " ";
    row.append(name, document.createTextNode(text));
    return row;
  };
  document.querySelectorAll(".tok[data-act]").forEach((span) => {
    span.addEventListener("mouseenter", () => {
      const act = parseFloat(span.dataset.act);
      const rows = [line("activation", act.toPrecision(3))];
      if (span.dataset.promoted !== undefined) {
        const loss = parseFloat(span.dataset.loss);
        rows.push(line("loss change, removed here", isNaN(loss) ? "not computed" : signed(loss) + " nats"));
        for (const kind of ["promoted", "suppressed"]) {
          const effects = JSON.parse(span.dataset[kind]);
          rows.push(line(kind, effects.map(([id, value]) => vocabulary[id] + " " + signed(value)).join("  ")));
        }
      }
      tip.replaceChildren(...rows);
      const box = span.getBoundingClientRect();
      tip.style.left = (window.scrollX + box.left) + "px";
      tip.style.top = (window.scrollY + box.bottom + 4) + "px";
      tip.style.display = "block";
    });
    span.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  });
})();
"""


def feature_page_name(head: int, feature: int) -> str:
    """The feature page's path inside the site folder."""
    return f"features/head{head}_feature{feature}.html"


def memory_page_name(head: int) -> str:
    """The path inside the site folder of head ``head``'s memory views (beside the feature pages)."""
    return f"features/head{head}_memory.html"


def check_site_folder(out: str | Path) -> Path:
    """Refuse, before any work, an output folder `write_site` may not write: a file of one of its names
    that the tool did not create (`claim_outputs`), a ``features`` that is a link or not a folder, or
    a link inside ``features/``. Returns the folder, created if needed."""
    out = claim_outputs(out, OUTPUTS)
    features = output_subfolder(out, "features")
    for entry in sorted(features.iterdir()):
        refuse_link(entry)
    return out


def write_site(dashboard: Dashboard, out: str | Path, progress: bool = True) -> Path:
    """Write the site into ``out`` (created if needed; only files the tool created are replaced) and
    return the index's path.

    Every page is written whole or not at all (`hooked_gdn.files.atomic_file`), never through a
    link: a symbolic link inside ``features/`` (or a ``features`` that is one) is refused with its path
    before any page is written, and left as it is, neither followed nor replaced. The folder is
    locked while the pages are written (`writesae.outputs.output_lock`): a second run writing the
    same folder at the same time is refused, naming the first."""
    out = check_site_folder(out)
    with output_lock(out, "writesae dashboard"):
        out = check_site_folder(out)  # again, now that no other run can change it
        for card in tqdm(dashboard.features, desc="writing feature pages", disable=not progress):
            with atomic_file(out / feature_page_name(card.head, card.feature), encoding="utf-8") as f:
                f.write(feature_page(dashboard, card))
        for head in _memory_heads(dashboard):
            with atomic_file(out / memory_page_name(head), encoding="utf-8") as f:
                f.write(memory_page(dashboard, head))
        dashboard.export_json(out / JSON_NAME)
        index = out / "index.html"
        with atomic_file(index, encoding="utf-8") as f:
            f.write(index_page(dashboard))
    return index


# ---------------------------------------------------------------------------------------------- pages


def _page(title: str, body: str, script: str = "") -> str:
    script = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><style>{_CSS}</style></head>\n<body>\n{body}\n{script}</body></html>\n')


def _sae_line(d: Dashboard) -> str:
    return (f"{escape(d.model_name)} · <span class=mono>{escape(d.site)}</span> · {escape(d.architecture)} SAE, "
            f"{d.n_features} features per head, rank {d.rank} · {d.n_windows} held-out windows × {d.window_length} tokens")


def _memory_heads(d: Dashboard) -> list[int]:
    """The heads that have memory views, in the SAE's order."""
    having = {view.head for view in d.memory.views} if d.memory is not None else set()
    return [h.head for h in d.heads if h.head in having]


def _memory_note(d: Dashboard) -> str:
    """One line: how the memory views were chosen, or why there are none."""
    if d.memory is None:
        return '<p class="muted" id="memory-note">No memory view: this dashboard was built without one.</p>'
    if d.memory.absent_reason is not None:
        return f'<p class="muted" id="memory-note" data-absent="1">{escape(d.memory.absent_reason)}</p>'
    return (f'<p class="muted" id="memory-note" data-absent="0">Memory views (what each head\'s memory retrieves at a '
            f'position, as terms over past writes and this SAE\'s features): {escape(d.memory.rule)}.</p>')


def index_page(d: Dashboard) -> str:
    memory_heads = _memory_heads(d)
    memory_cell = lambda head: (f'<td><a class="memory-link" href="{memory_page_name(head)}">memory views</a></td>'
                                if head in memory_heads else '<td class="muted">–</td>')
    heads = "".join(
        f'<tr class="head" data-head="{h.head}"><td class=num>{h.head}</td><td class=num>{h.dictionary}</td>'
        f"{_num_cell(h.half_life[1], _tokens(h.half_life[1]), 'half_life')}"
        f"<td class=num>{_tokens(h.half_life[0])} – {_tokens(h.half_life[2])}</td>"
        f"{_num_cell(h.mean_beta, f'{h.mean_beta:.2f}', 'mean_beta')}{_num_cell(h.n_alive, str(h.n_alive), 'alive')}"
        f"{memory_cell(h.head)}</tr>"
        for h in d.heads)
    rows = "".join(_index_row(card) for card in d.features)
    options = "".join(f'<option value="{h.head}">head {h.head}</option>' for h in d.heads)
    body = f"""
<h1>Feature dashboard</h1>
<p class="meta">{_sae_line(d)}</p>
<h2>Heads</h2>
<table id="heads"><thead><tr><th class=num>head</th><th class=num>dictionary</th>
<th class=num>half-life p50 (tokens)</th><th class=num>p10 – p90</th><th class=num>mean β</th>
<th class=num>features that fired</th><th>memory</th></tr></thead><tbody>{heads}</tbody></table>
{_memory_note(d)}
<h2>Features</h2>
<div id="controls"><input id="search" type="search" placeholder="search: feature number or token text">
<select id="head-filter"><option value="all">all heads</option>{options}</select>
<span class="muted"><span id="shown">{len(d.features)}</span> of {len(d.features)} shown · click a column to sort</span></div>
<table id="features"><thead><tr>
<th class="sortable num">head</th><th class="sortable num">feature</th><th class="sortable num">frequency</th>
<th class="sortable num">mean activation</th><th class="sortable num">max activation</th>
<th class="sortable num">carried KL (Σ {d.horizon} positions)</th><th class=sortable>top promoted token</th>
<th class=sortable>best-aligned key token</th></tr></thead>
<tbody>{rows}</tbody></table>
<details><summary>What the columns mean</summary>{_definitions(d)}</details>
<p class="muted">Every number of every card: <a href="{JSON_NAME}">{JSON_NAME}</a> (format: writesae's docs/dashboard_schema.json).</p>"""
    return _page(f"Feature dashboard · {d.site}", body, _INDEX_JS)


def _index_row(card: FeatureCard) -> str:
    promoted = card.logits_promoted[0].token if card.logits_promoted else ""
    key = card.keys_aligned[0].token if card.keys_aligned else ""
    search = f"{card.feature} {promoted} {key} " + " ".join(e.token for e in card.logits_promoted[:5])
    link = f'<a href="{feature_page_name(card.head, card.feature)}">{card.feature}</a>'
    return (f'<tr data-head="{card.head}" data-feature="{card.feature}" data-search="{escape(search.lower())}">'
            f"{_num_cell(card.head, str(card.head), 'head')}<td class=num data-key=feature data-value={card.feature}>{link}</td>"
            f"{_num_cell(card.frequency, f'{100 * card.frequency:.2f}%', 'frequency')}"
            f"{_num_cell(card.mean_activation, _g(card.mean_activation), 'mean_activation')}"
            f"{_num_cell(card.max_activation, _g(card.max_activation), 'max_activation')}"
            f"{_num_cell(card.kl_carried, _g(card.kl_carried), 'kl_carried')}"
            f"<td class=mono>{_show(promoted)}</td><td class=mono>{_show(key)}</td></tr>")


def feature_page(d: Dashboard, card: FeatureCard) -> str:
    head = next(h for h in d.heads if h.head == card.head)
    p10, p50, p90 = (_tokens(x) for x in head.half_life)
    stats = "".join(_stat(*s) for s in (
        ("frequency", card.frequency, f"{100 * card.frequency:.3g}%",
         f"{card.n_firings} of {d.n_windows * d.window_length} positions"),
        ("mean_activation", card.mean_activation, _g(card.mean_activation), "mean code where it fires"),
        ("max_activation", card.max_activation, _g(card.max_activation), "largest code in the sample"),
        ("kl_carried", card.kl_carried, _g(card.kl_carried),
         f"Σ KL over t … t+{d.horizon - 1}, ablated, {card.n_ablated} firings"),
        ("kl_next", card.kl_next, _g(card.kl_next), "KL at the firing position"),
        ("half_life", head.half_life[1], f"{p50} tokens", f"head {head.head}'s memory, p10–p90 {p10}–{p90}"),
    ))
    never = '<p class="muted">never fired in the sample</p>'
    contexts = "".join(_context(c, card.max_activation, "top") for c in card.top_contexts) or never
    bands = "".join(_band(j, group, j == len(card.quantile_groups) - 1, card.max_activation)
                    for j, group in enumerate(card.quantile_groups)) or never
    values = (_logit_table("promoted", "promoted", card.logits_promoted)
              + _logit_table("suppressed", "suppressed", card.logits_suppressed))
    keys = _key_table("most aligned", "aligned", card.keys_aligned) + _key_table("most opposed", "opposed", card.keys_opposed)
    related = (_related_table("co-firing", "co_firing", "Jaccard", card.co_firing, d)
               + _related_table("atom cosine", "atom_cosine", "cos", card.atom_cosine, d))
    body = f"""
<p><a href="../index.html">← all features</a></p>
<h1>Head {card.head} · feature {card.feature}</h1>
<p class="meta">{_sae_line(d)} · dictionary {card.dictionary} of the SAE</p>
<div class="stats">{stats}</div>
<div class="grid"><div>
<div class="panel"><h2>Activation histogram</h2>{_histogram(card.histogram_counts, card.histogram_edges, "hist", "bin",
                                                                 "activation (positions where it fires)", "#e07b00")}</div>
<div class="panel"><h2>Value side: direct effect on the logits through the read</h2>
<div class="pair">{values}</div>
{_histogram(card.logit_histogram_counts, card.logit_histogram_edges, "logit-hist", "logit-bin",
            "mean Δlogit of a firing, over the vocabulary", "#3b6fb6")}</div>
<div class="panel"><h2>Correlated features</h2><div class="pair">{related}</div></div>
{_retrievals(d, card)}
<div class="panel"><h2>Key side: write keys k̂ along the atom's key factor u</h2>
<div class="pair">{keys}</div></div>
</div><div>
<div class="panel"><h2>Top activations (held-out text)</h2>
<p class="muted">hover a token: its activation; where the feature fires, the tokens this firing promotes and
suppresses through the read, and the loss change when the feature is removed there</p>{contexts}</div>
<div class="panel"><h2>Activation quantile groups</h2>{bands}</div>
</div></div>
<div id="tooltip" role="tooltip"></div>
{_vocabulary(card)}
<details><summary>How these are computed</summary>{_definitions(d)}</details>"""
    return _page(f"head {card.head} · feature {card.feature}", body, _TOOLTIP_JS)


def memory_page(d: Dashboard, head: int) -> str:
    """Head ``head``'s memory views: at each chosen position, the top (past write, feature) terms of its read and
    the rest of the read, for the read (along o_t) and its direct logit on the next token."""
    views = [(k, view) for k, view in enumerate(d.memory.views) if view.head == head]
    body = f"""
<p><a href="../index.html">← all features</a></p>
<h1>Head {head} · what its memory retrieves</h1>
<p class="meta">{_sae_line(d)}</p>
{_memory_note(d)}
{"".join(_memory_view(k, view, d) for k, view in views)}
<details><summary>How these are computed</summary>{_definitions(d)}</details>"""
    return _page(f"head {head} · memory", body)


def _memory_view(k: int, view: MemoryView, d: Dashboard) -> str:
    """One view: its position in context, a table of its shown terms, the rest of the read by part, and the total."""
    pages = {(card.head, card.feature) for card in d.features}
    feature = lambda i: (f'<a href="{Path(feature_page_name(view.head, i)).name}">{i}</a>' if (view.head, i) in pages else str(i))
    scale = max([abs(x.read_projection) for x in view.terms] + [abs(v) for v in view.rest_read_projection.values()]) or 1.0
    along = lambda value: (f'<td class=num>{value:+.3g}</td><td>{_bar("up" if value >= 0 else "down", value / scale)}</td>')
    logit = lambda value: f"<td class=num>{_g(value)}</td>"
    rows = "".join(
        f'<tr class="memory-term" data-position="{x.position}" data-distance="{x.distance}" data-feature="{x.feature}" '
        f'data-code="{_full(x.code)}" data-read-projection="{_full(x.read_projection)}" data-read-norm="{_full(x.read_norm)}" '
        f'data-logit="{_full(x.logit)}"><td class=num>{x.position}</td><td class=num>{x.distance}</td>'
        f'<td class=mono><span class="muted">{_show(x.left_context[-14:])}</span>{_show(x.token)}</td>'
        f"<td class=num>{feature(x.feature)}</td><td class=num>{_g(x.code)}</td>{along(x.read_projection)}"
        f"<td class=num>{_g(x.read_norm)}</td>{logit(x.logit)}</tr>"
        for x in view.terms)
    rest_logit = view.rest_logit or {}
    rows += "".join(
        f'<tr class="memory-rest" data-part="{part}" data-read-projection="{_full(view.rest_read_projection[part])}" '
        f'data-logit="{_full(rest_logit.get(part))}"><td colspan=5>{_REST_LABELS[part]}</td>'
        f"{along(view.rest_read_projection[part])}<td></td>{logit(rest_logit.get(part))}</tr>"
        for part in MEMORY_REST)
    rows += (f'<tr class="memory-total" data-read-projection="{_full(view.read_norm)}" data-logit="{_full(view.direct_logit)}">'
             f'<td colspan=5>the read: ‖o_t‖ and its direct logit</td><td class=num>{_g(view.read_norm)}</td><td></td><td></td>'
             f"{logit(view.direct_logit)}</tr>")
    next_token = "" if view.logit_token is None else f" → next token <span class=mono>{_show(view.logit_token)}</span>"
    return (f'<div class="panel memory-view" id="view-{k}" data-view="{k}" data-head="{view.head}" data-window="{view.window}" '
            f'data-position="{view.position}" data-read-norm="{_full(view.read_norm)}" data-far-read-norm="{_full(view.far_read_norm)}" '
            f'data-direct-logit="{_full(view.direct_logit)}" data-logit-token-id="{_full(view.logit_token_id)}">'
            f"<h2>window {view.window}, position {view.position}</h2>"
            f'<div class="context"><span class="muted">{_show(view.left_context)}</span>'
            f'<span class="tok fire">{_show(view.token)}</span>{next_token}</div>'
            f'<p class="muted">‖o_t‖ = {_g(view.read_norm)}; the part from writes ≥ {d.memory.min_distance} tokens back: '
            f"‖·‖ = {_g(view.far_read_norm)}; direct logit of the next token through this head: {_g(view.direct_logit)}</p>"
            f'<table class="memory"><thead><tr><th class=num>past position</th><th class=num>distance</th><th>token</th>'
            f"<th class=num>feature</th><th class=num>code</th><th class=num>along o_t</th><th></th><th class=num>‖term‖</th>"
            f"<th class=num>direct logit</th></tr></thead><tbody>{rows}</tbody></table></div>")


_REST_LABELS = {"other_features": "other feature terms (nearer writes, and far ones not shown)",
                "bias": "the decoder bias, once per write", "errors": "the SAE's error on each write",
                "initial": "the initial state"}


def _retrievals(d: Dashboard, card: FeatureCard) -> str:
    """The panel of memory views whose reads draw on this feature's past writes (none without memory views)."""
    if d.memory is None or not d.memory.views:
        return ""
    page = Path(memory_page_name(card.head)).name
    rows = "".join(
        f'<tr class="retrieval" data-view="{r.view}" data-window="{r.window}" data-position="{r.position}" '
        f'data-n-terms="{r.n_terms}" data-read-projection="{_full(r.read_projection)}" data-logit="{_full(r.logit)}">'
        f'<td><a href="{page}#view-{r.view}">window {r.window}, position {r.position}</a></td><td class=num>{r.n_terms}</td>'
        f"<td class=num>{r.read_projection:+.3g}</td><td class=num>{_g(r.logit)}</td></tr>"
        for r in card.retrieved_in)
    table = (f'<table class="retrievals"><thead><tr><th>memory view</th><th class=num>terms</th><th class=num>along o_t</th>'
             f"<th class=num>direct logit</th></tr></thead><tbody>{rows}</tbody></table>" if rows
             else '<p class="muted">none of this head\'s memory views reads it</p>')
    return (f'<div class="panel"><h2>Where this write feature is retrieved</h2><p class="muted">the memory views of head '
            f"{card.head} whose read has terms of this feature ≥ {d.memory.min_distance} tokens back: their sum along "
            f"o_t / ‖o_t‖ and their direct logit on the next token</p>{table}</div>")


# ---------------------------------------------------------------------------------------------- parts


_STAT_LABELS = {"frequency": "frequency", "mean_activation": "mean activation", "max_activation": "max activation",
                "kl_carried": "carried KL when ablated", "kl_next": "KL at the firing", "half_life": "head half-life"}


def _stat(key: str, value: float | None, shown: str, note: str) -> str:
    return (f'<div class="stat" data-stat="{key}" data-value="{_full(value)}"><div class="label">{_STAT_LABELS[key]}</div>'
            f'<div class="value">{escape(shown)}</div><div class="label">{escape(note)}</div></div>')


def _histogram(counts: list[int], edges: list[float], svg_class: str, bin_class: str, label: str, colour: str,
               width: int = 400, height: int = 150) -> str:
    """An inline SVG bar chart of a histogram (``edges`` one longer than ``counts``)."""
    if not any(counts):
        return '<p class="muted">never fired in the sample</p>'
    top, pad, bottom = max(counts), 28, 18
    bar = (width - pad) / len(counts)
    rects = []
    for j, count in enumerate(counts):
        h = (height - bottom - 10) * count / top
        rects.append(f'<rect class="{bin_class}" data-count="{count}" data-lo="{_full(edges[j])}" data-hi="{_full(edges[j + 1])}" '
                     f'x="{pad + j * bar:.1f}" y="{height - bottom - h:.1f}" width="{max(bar - 1, 1):.1f}" height="{h:.1f}" '
                     f'fill="{colour}"><title>{_g(edges[j])} – {_g(edges[j + 1])}: {count}</title></rect>')
    return (f'<svg class="{svg_class}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(label)}">{"".join(rects)}'
            f'<line x1="{pad}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" stroke="#9aa3b2"/>'
            f'<text x="{pad}" y="{height - 4}">{_g(edges[0])}</text>'
            f'<text x="{width}" y="{height - 4}" text-anchor="end">{_g(edges[-1])}</text>'
            f'<text x="{pad - 4}" y="14" text-anchor="end">{top}</text>'
            f'<text x="{(width + pad) / 2}" y="{height - 4}" text-anchor="middle">{escape(label)}</text></svg>')


def _band(j: int, group: QuantileGroup, last: bool, max_activation: float) -> str:
    """Quantile group j: its edges (the last group closed above), size and drawn contexts."""
    contexts = "".join(_context(c, max_activation, str(j)) for c in group.contexts) or '<p class="muted">no firings</p>'
    return (f'<div class="band" data-group="{j}" data-low="{_full(group.low)}" data-high="{_full(group.high)}" '
            f'data-count="{group.n_firings}"><h3>quantile group {j + 1}: {_g(group.low)} ≤ a {"≤" if last else "<"} '
            f'{_g(group.high)} · {group.n_firings} firings, {len(group.contexts)} drawn at random</h3>{contexts}</div>')


def _related_table(title: str, kind: str, number: str, related: list[RelatedFeature], d: Dashboard) -> str:
    if not related:
        return f'<p class="muted">{escape(title)}: none</p>'
    pages = {(card.head, card.feature) for card in d.features}
    name = lambda r: (f'<a href="../{feature_page_name(r.head, r.feature)}">head {r.head} · {r.feature}</a>'
                      if (r.head, r.feature) in pages else f"head {r.head} · {r.feature}")
    rows = "".join(
        f'<tr class="related" data-head="{r.head}" data-feature="{r.feature}" data-score="{_full(r.score)}">'
        f'<td>{name(r)}</td><td class=num>{r.score:.3f}</td><td>{_bar("key", r.score)}</td></tr>'
        for r in related)
    return _table("related", kind, title, number, rows)


def _context(c: ShownContext, max_activation: float, section: str) -> str:
    """A shown context, its tokens shaded by the code; ``section`` ("top" or the quantile group's number) says where it is."""
    spans = []
    hovers = c.hovers or [None] * len(c.tokens)
    for offset, (token, act, hover) in enumerate(zip(c.tokens, c.activations, hovers)):
        fire = " fire" if c.start + offset == c.position else ""
        alpha = 0.0 if max_activation <= 0 else min(1.0, act / max_activation)
        shade = f' style="background:rgba(255,140,0,{alpha:.3f})"' if act > 0 else ""  # silent tokens: no shade
        spans.append(f'<span class="tok{fire}" data-act="{_full(act)}"{_hover_attributes(hover)}{shade}>{_show(token)}</span>')
    return (f'<div class="context" data-section="{section}" data-window="{c.window}" data-position="{c.position}" data-activation="{_full(c.activation)}">'
            f'<span class="act">{_g(c.activation)}</span>{"".join(spans)}</div>')


def _hover_attributes(hover: TokenHover | None) -> str:
    """A firing token's tooltip data: the loss change (NaN where not computed) and its promoted and
    suppressed tokens as JSON lists of [token id, Δlogit] (their texts: `_vocabulary`)."""
    if hover is None:
        return ""
    effects = lambda kind: escape(json.dumps([[e.token_id, written(e.logit_change)] for e in kind], separators=(",", ":")))
    return (f' data-loss="{_full(hover.loss_change)}" data-promoted="{effects(hover.promoted)}"'
            f' data-suppressed="{effects(hover.suppressed)}"')


_COLUMNS = '<colgroup><col><col style="width: 64px"><col style="width: 44px"></colgroup>'  # token, number, bar


def _key_table(title: str, kind: str, matches: list[KeyMatch]) -> str:
    scale = max((abs(m.alignment) for m in matches), default=1.0) or 1.0
    rows = "".join(
        f'<tr class="key" data-window="{m.window}" data-position="{m.position}" data-alignment="{_full(m.alignment)}">'
        f'<td class=mono><span class="muted">{_show(m.left_context[-14:])}</span>{_show(m.token)}</td>'
        f'<td class=num>{m.alignment:+.3f}</td><td>{_bar("key", m.alignment / scale)}</td></tr>'
        for m in matches)
    return _table("keys", kind, title, "k̂ᵀu", rows)


def _logit_table(title: str, kind: str, effects: list[LogitEffect]) -> str:
    if not effects:
        return '<p class="muted">no firings to average over</p>'
    scale = max(abs(e.logit_change) for e in effects) or 1.0
    colour = "up" if kind == "promoted" else "down"
    rows = "".join(
        f'<tr class="logit" data-token-id="{e.token_id}" data-value="{_full(e.logit_change)}">'
        f'<td class=mono>{_show(e.token)}</td><td class=num>{e.logit_change:+.3g}</td>'
        f'<td>{_bar(colour, e.logit_change / scale)}</td></tr>'
        for e in effects)
    return _table("logits", kind, title, "Δlogit", rows)


def _table(cls: str, kind: str, title: str, number: str, rows: str) -> str:
    """A token | number | bar table."""
    return (f'<table class="{cls}" data-kind="{kind}">{_COLUMNS}<thead><tr><th>{escape(title)}</th>'
            f'<th class=num>{number}</th><th></th></tr></thead><tbody>{rows}</tbody></table>')


def _bar(colour: str, fraction: float) -> str:
    return f'<span class="bar {colour}" style="width: {36 * abs(fraction):.0f}px"></span>'


def _definitions(d: Dashboard) -> str:
    items = [
        "<b>frequency</b>: the fraction of held-out positions where the feature's code a > 0; <b>mean activation</b>: the mean a where a > 0.",
        "<b>key side</b>: k̂ᵀu of each position's write key k̂ (unit) with the atom's unit key factor u (the atom is u vᵀ); "
        "both signs count, since u vᵀ = (−u)(−v)ᵀ.",
        "<b>value side</b>: at each firing the state holds (a/s)·u vᵀ more, so the read moves by Δo = (a/s)(q̂ᵀu) v exactly; "
        "the gated RMSNorm is linearised at the clean read, then W_o (this head's columns), then the unembedding with the final "
        "norm's scale frozen (direct path, later layers skipped); Δlogit is the mean over the feature's firings.",
        f"<b>carried KL</b>: at its top firings, (a/s)·u vᵀ is removed from the state of the head and the model continues from it; "
        f"KL(clean ‖ ablated) summed over the firing position and the next {d.horizon - 1}, averaged over the firings.",
        "<b>half-life</b>: the head's median decay half-life ln ½ / g over the sample (memory census).",
        "<b>logit histogram</b>: the mean Δlogit above, one value per vocabulary token, binned: how many tokens a "
        "typical firing moves, and by how much, through the read alone.",
        "<b>quantile groups</b>: the positive codes cut at their quantiles (torch.quantile, linear interpolation); "
        "group j holds the firings with edge_j ≤ a < edge_(j+1) (the last also a = its top edge), with contexts drawn "
        "uniformly at random from it (seeded).",
        "<b>hover</b> on a token where the feature fires: that one firing's Δlogit (as the value side, not averaged), "
        "its most promoted and suppressed tokens, and the loss change: the cross-entropy of the next token at that "
        "position when (a/s)·A is removed from the head's state there and the model continues from it, minus the "
        "clean cross-entropy (a real ablation run; positive: the feature helped predict the next token). It is run at "
        "up to a set number of firing tokens per feature, each context's outlined token first.",
        "<b>correlated features</b>: co-firing is the Jaccard index |F_i ∩ F_j| / |F_i ∪ F_j| of the sets of held-out "
        "positions where each fires, over every feature of the SAE (any head); atom cosine is ⟨A_i, A_j⟩ / (‖A_i‖ ‖A_j‖) "
        "(Frobenius) with the other atoms of the same head, signed.",
        "<b>memory views</b> (a write SAE on a Gated DeltaNet layer): head h's read o_t written exactly as a sum over "
        "(past write j, feature i) terms G_(j→t) a_ji atom_iᵀ q̂_t / s, plus each write's decoder-bias and SAE-error terms "
        "and the initial state's (writesae.memory_attribution); each term's size is its component along o_t, "
        "⟨term, o_t⟩ / ‖o_t‖, so the terms and the rest add up to ‖o_t‖; the direct logit is the next token's, through "
        "the head's gated norm, W_o and the unembedding held at the run (their sum is the head's direct logit exactly).",
    ]
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _vocabulary(card: FeatureCard) -> str:
    """The visible text of every token id the page's hovers name, once, as JSON in a script element (``<`` escaped,
    so no token can close it)."""
    texts = {effect.token_id: _visible(effect.token) for context in shown_contexts(card)
             for hover in context.hovers if hover is not None for effect in hover.promoted + hover.suppressed}
    data = json.dumps({str(k): v for k, v in sorted(texts.items())}, ensure_ascii=False, separators=(",", ":"))
    data = data.replace("<", "\\u003c")
    return f'<script type="application/json" id="vocabulary">{data}</script>'


def _num_cell(value: float | None, shown: str, key: str) -> str:
    return f'<td class=num data-key="{key}" data-value="{_full(value)}">{escape(shown)}</td>'


def _full(value: float | None) -> str:
    """A number for data-* attributes: an int as it is, a float `written` (to the dashboard's significant digits);
    NaN for a missing one (sorts last)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NaN"
    return str(value) if isinstance(value, int) else repr(written(float(value)))


def _g(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _tokens(half_life: float) -> str:
    return "∞" if math.isinf(half_life) else f"{half_life:.3g}" if half_life < 1000 else f"{half_life:.0f}"


#: control characters other than tab, newline and carriage return: never written raw into a page
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _visible_control(match: re.Match) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # its Unicode control picture: NUL as ␀, BEL as ␇
    return "␡" if code == 0x7F else f"<U+{code:04X}>"  # escaped afterwards, so shown as text


def escape(text: str, quote: bool = True) -> str:
    """``html.escape``, with control characters (NUL, BEL, …, which corpora do hold) shown visibly
    instead of written raw into the page."""
    return _html_escape(_CONTROL.sub(_visible_control, str(text)), quote)


def _visible(token: str) -> str:
    """A token as visible text, not yet escaped: newlines as ⏎, tabs as →, other control characters as in `escape`."""
    return _CONTROL.sub(_visible_control, token.replace("\n", "⏎").replace("\t", "→"))


def _show(token: str) -> str:
    """A token as visible text (`_visible`), escaped for HTML."""
    return escape(_visible(token))
