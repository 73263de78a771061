"""The dashboard's memory views (writesae.dashboard, `MemorySection`): what a GDN head's memory retrieves at chosen
positions, from `writesae.memory_attribution.memory_view`.

Checked against what the dashboard did not compute: the model's own read (``hook_recurrence_out``) and
TransformerLens' ``logit_attrs`` for the direct logit (the shown terms plus the rest of the read add up to both);
the model's cached states for the far read that chooses the positions (S_t = G_{t−D→t} S_{t−D} + the writes after
t − D, so the part of o_t from writes ≥ D back is (G_{t−D→t} S_{t−D})ᵀ q̂_t); the terms and each feature's retrieval
by hand from the SAE's codes and atoms. The pages read back with html.parser, the JSON against its schema, and the
one-line reason a state SAE (or a Mamba-2 or RWKV-7 layer) gets no view.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from hooked_gdn.sites import gdn_hook_name, site_name
from writesae import BilinearMatrixSAE
from writesae.cli import main as cli_main
from writesae.dashboard import MEMORY_REST, build_dashboard, memory_unavailable
from writesae.dashboard_html import feature_page_name, memory_page_name, write_site

from .conftest import save_tiny_checkpoint_with_tokenizer
from .test_cli import text_folder
from .test_dashboard import LAYER, SAES, SCHEMA, WRITTEN, _groups, _has_class, _slow_decay_model, _tags
from .test_memory_attribution import tl_direct_logits

DISTANCE, VIEWS, TERMS, LEFT = 9, 6, 4, 5  # LEFT: the contexts' spacing, which the views' spacing reuses
TOLERANCE = 1e-5


@pytest.fixture(name="memory", scope="module")
def memory_fixture(tmp_path_factory):
    """(model, sae, windows, dashboard, site folder) of the write SAE (heads 2 and 0) on the slow-decay tiny model."""
    model, sae = _slow_decay_model(), SAES["write"]()
    windows = torch.randint(0, model.cfg.d_vocab, (4, 32), generator=torch.Generator().manual_seed(7))
    dashboard = build_dashboard(model, sae, windows, n_contexts=3, left=LEFT, right=2, n_keys=3, n_logits=3,
                                ablation_firings=1, loss_tokens=1, memory_views=VIEWS, memory_terms=TERMS,
                                memory_min_distance=DISTANCE, batch_size=2, progress=False)
    out = tmp_path_factory.mktemp("dashboard-memory")
    write_site(dashboard, out, progress=False)
    return model, sae, windows, dashboard, out


def _run(model, windows):
    """A default cache of the windows (every hook but the states) and the layer's states [n, T, H, d_k, d_v]."""
    with torch.no_grad():
        _, cache = model.run_with_cache(windows)
        _, states = model.run_with_cache(windows, names_filter=gdn_hook_name(LAYER, "hook_state"))
    return cache, states[gdn_hook_name(LAYER, "hook_state")]


def _far_reads_from_states(cache, states, heads) -> torch.Tensor:
    """‖(G_{t−D→t} S_{t−D})ᵀ q̂_t‖ [n, T, n_dicts] from the model's cached states (nan for t < D)."""
    get = lambda hook: cache[gdn_hook_name(LAYER, hook)][:, :, heads].double()
    q_hat, g = get("hook_read_query"), get("hook_log_decay")  # [n, T, h, d_k], [n, T, h]
    n, T = g.shape[:2]
    far = torch.full((n, T, len(heads)), math.nan, dtype=torch.float64)
    gamma = g.cumsum(1)
    for t in range(DISTANCE, T):
        decay = (gamma[:, t] - gamma[:, t - DISTANCE]).exp()  # Π_{s=t−D+1..t} α_s
        old = states[:, t - DISTANCE][:, heads].double() * decay[..., None, None]  # [n, h, d_k, d_v]
        far[:, t] = torch.einsum("nhkv,nhk->nhv", old, q_hat[:, t]).norm(dim=-1)
    return far


def _terms_by_hand(model, sae, cache, w: int, d: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (j, i) term's component along o_t of head heads[d] at window w, position t, from the SAE's codes and
    atoms: G_{j→t} a_ji (atom_iᵀ q̂_t) / s · ô_t, as (projections [T, n] (zero where a_ji = 0 or j > t), codes [T, n],
    ô_t)."""
    heads, head = sae.cfg.head_indices, sae.cfg.head_indices[d]
    get = lambda hook: cache[gdn_hook_name(LAYER, hook)][w]
    with torch.no_grad():
        codes = sae.encode_factors(get("hook_write_key")[:, heads], get("hook_write_value")[:, heads])[:, d].double()
    g = get("hook_log_decay")[:, head].double()
    gamma = g.cumsum(0)
    decay = (gamma[t] - gamma).exp() * (torch.arange(len(g)) <= t)  # G_{j→t}
    o = get("hook_recurrence_out")[t, head].double()
    unit = o / o.norm()
    along = sae.atoms()[d].detach().double().transpose(1, 2) @ get("hook_read_query")[t, head].double() @ unit  # [n]
    return decay[:, None] * codes * along[None] / sae.cfg.input_scale, codes, unit


def test_terms_and_rest_add_up_to_the_models_read_and_its_direct_logit(memory):
    """Σ shown terms + Σ rest = ‖hook_recurrence_out‖ and = TransformerLens' direct logit of the head on the next
    token, at every view; the bias is zero here (the FlatSAE's b_dec starts at 0) but the errors are not."""
    model, sae, windows, dashboard, _ = memory
    cache, _ = _run(model, windows)
    views = dashboard.memory.views
    assert dashboard.memory.absent_reason is None
    # TransformerLens' logit_attrs is fp32: its rounding is relative to the logits' scale, not to a small one's size
    logit_scale = TOLERANCE * max(abs(view.direct_logit) for view in views)
    assert [v.head for v in views] == [h for h in sae.cfg.head_indices for _ in range(VIEWS)]
    for view in views:
        w, t, head = view.window, view.position, view.head
        o = cache[gdn_hook_name(LAYER, "hook_recurrence_out")][w, t, head].double()
        assert len(view.terms) == TERMS and set(view.rest_read_projection) == set(MEMORY_REST)
        total = sum(x.read_projection for x in view.terms) + sum(view.rest_read_projection.values())
        assert view.read_norm == pytest.approx(float(o.norm()), rel=1e-6)
        assert total == pytest.approx(float(o.norm()), rel=TOLERANCE)
        tl = float(tl_direct_logits(model, cache, LAYER, head, windows.roll(-1, 1))[w, t])
        assert view.logit_token_id == int(windows[w, t + 1])
        assert view.direct_logit == pytest.approx(tl, rel=TOLERANCE, abs=logit_scale)
        assert sum(x.logit for x in view.terms) + sum(view.rest_logit.values()) == pytest.approx(tl, rel=TOLERANCE, abs=logit_scale)
        # the SAE's errors are a real part of the read, so a view that dropped them would not add up
        assert abs(view.rest_read_projection["errors"]) > 1e-3 * view.read_norm


def test_terms_are_the_largest_along_the_read_among_writes_far_enough_back(memory):
    model, sae, windows, dashboard, _ = memory
    cache, _ = _run(model, windows)
    for view in dashboard.memory.views:
        projections, codes, _ = _terms_by_hand(model, sae, cache, view.window, view.dictionary, view.position)
        far = (torch.arange(len(codes)) <= view.position - DISTANCE)[:, None] & (codes != 0)
        order = projections.abs().masked_fill(~far, -1).flatten().argsort(descending=True)[:TERMS]
        n = codes.shape[1]
        assert [(x.position, x.feature) for x in view.terms] == [divmod(int(k), n) for k in order]
        assert [x.read_projection for x in view.terms] == pytest.approx(projections.flatten()[order].tolist(), rel=1e-6)
        assert [x.code for x in view.terms] == pytest.approx(codes.flatten()[order].tolist(), rel=1e-6)
        assert all(x.distance == view.position - x.position >= DISTANCE for x in view.terms)
        # the far feature terms not shown and the near ones make up the rest's other_features
        others = float(projections.sum()) - sum(x.read_projection for x in view.terms)
        assert view.rest_read_projection["other_features"] == pytest.approx(others, rel=1e-6)
        assert view.token == f"⟨{int(windows[view.window, view.position])}⟩"  # the site's token texts
        assert [x.token for x in view.terms] == [f"⟨{int(windows[view.window, x.position])}⟩" for x in view.terms]


def test_positions_are_those_with_the_largest_far_read_from_the_cached_states(memory):
    """The rule: per head, the greedy largest far reads (t ≥ D, a next token), spaced by ``left``; the far read
    from the model's states, not from effective attention."""
    model, sae, windows, dashboard, _ = memory
    cache, states = _run(model, windows)
    far = _far_reads_from_states(cache, states, sae.cfg.head_indices)
    T = windows.shape[1]
    for d, head in enumerate(sae.cfg.head_indices):
        score = far[..., d].clone()
        score[:, T - 1] = math.nan
        expected = []
        for flat in score.nan_to_num(-1.0).flatten().argsort(descending=True).tolist():
            w, t = divmod(flat, T)
            if len(expected) < VIEWS and not any(v == w and abs(u - t) <= LEFT for v, u in expected):
                expected.append((w, t))
        views = [v for v in dashboard.memory.views if v.head == head]
        assert [(v.window, v.position) for v in views] == expected
        assert len({w for w, _ in expected}) < VIEWS  # some window holds two views: the spacing is exercised
        assert [v.far_read_norm for v in views] == pytest.approx([float(far[w, t, d]) for w, t in expected], rel=1e-5)


def test_each_feature_lists_the_views_that_retrieve_it(memory):
    """retrieved_in: for each view, the sum along o_t of the feature's terms ≥ D back, by hand, and the views that
    have none of them absent."""
    model, sae, windows, dashboard, _ = memory
    cache, _ = _run(model, windows)
    expected = defaultdict(dict)  # (dictionary, feature) -> {view: (n_terms, Σ along o_t)}
    for k, view in enumerate(dashboard.memory.views):
        projections, codes, _ = _terms_by_hand(model, sae, cache, view.window, view.dictionary, view.position)
        far = (torch.arange(len(codes)) <= view.position - DISTANCE)[:, None] & (codes != 0)
        for i in far.any(0).nonzero().flatten().tolist():
            expected[view.dictionary, i][k] = (int(far[:, i].sum()), float((projections * far)[:, i].sum()))
    seen = 0
    for card in dashboard.features:
        mine = expected[card.dictionary, card.feature]
        assert {r.view: r.n_terms for r in card.retrieved_in} == {k: n for k, (n, _) in mine.items()}
        for r in card.retrieved_in:
            view = dashboard.memory.views[r.view]
            assert (r.window, r.position) == (view.window, view.position) and view.head == card.head
            assert r.read_projection == pytest.approx(mine[r.view][1], rel=1e-6, abs=1e-12)
        sizes = [abs(r.read_projection) for r in card.retrieved_in]
        assert sizes == sorted(sizes, reverse=True)
        seen += len(card.retrieved_in)
    assert seen > len(dashboard.memory.views)  # most views draw on several features


def test_pages_show_the_views_and_link_them_both_ways(memory):
    model, sae, windows, dashboard, out = memory
    index = _tags(out / "index.html")
    links = [a["href"] for tag, a in index if tag == "a" and _has_class(a, "memory-link")]
    assert links == [memory_page_name(h) for h in sae.cfg.head_indices]
    (note,) = [a for tag, a in index if a.get("id") == "memory-note"]
    assert note["data-absent"] == "0"
    for head in sae.cfg.head_indices:
        tags = _tags(out / memory_page_name(head))
        shown = _groups(tags, lambda t, a: _has_class(a, "memory-view"), lambda t, a: t == "tr" and "data-read-projection" in a)
        views = [(k, v) for k, v in enumerate(dashboard.memory.views) if v.head == head]
        assert [int(a["data-view"]) for a, _ in shown] == [k for k, _ in views]
        for (attrs, rows), (k, view) in zip(shown, views):
            assert attrs["id"] == f"view-{k}"
            assert (int(attrs["data-window"]), int(attrs["data-position"])) == (view.window, view.position)
            assert float(attrs["data-read-norm"]) == pytest.approx(view.read_norm, rel=WRITTEN)
            terms = [r for r in rows if _has_class(r, "memory-term")]
            rest = [r for r in rows if _has_class(r, "memory-rest")]
            (total,) = [r for r in rows if _has_class(r, "memory-total")]
            assert [(int(r["data-position"]), int(r["data-feature"])) for r in terms] == [(x.position, x.feature) for x in view.terms]
            assert [float(r["data-read-projection"]) for r in terms] == pytest.approx(
                [x.read_projection for x in view.terms], rel=WRITTEN)
            assert [float(r["data-logit"]) for r in terms] == pytest.approx([x.logit for x in view.terms], rel=WRITTEN)
            assert [r["data-part"] for r in rest] == list(MEMORY_REST)
            assert [float(r["data-read-projection"]) for r in rest] == pytest.approx(
                [view.rest_read_projection[p] for p in MEMORY_REST], rel=WRITTEN, abs=1e-12)
            assert float(total["data-logit"]) == pytest.approx(view.direct_logit, rel=WRITTEN)
    # a feature page links each view that retrieves it, to an anchor its head's memory page has
    card = max(dashboard.features, key=lambda c: len(c.retrieved_in))
    tags = _tags(out / feature_page_name(card.head, card.feature))
    rows = [a for tag, a in tags if tag == "tr" and _has_class(a, "retrieval")]
    assert [int(r["data-view"]) for r in rows] == [r.view for r in card.retrieved_in]
    hrefs = [a["href"] for tag, a in tags if tag == "a" and "#view-" in a.get("href", "")]
    anchors = {a.get("id") for _, a in _tags(out / memory_page_name(card.head))}
    assert hrefs == [f"{Path(memory_page_name(card.head)).name}#view-{r.view}" for r in card.retrieved_in]
    assert all(href.split("#")[1] in anchors for href in hrefs)


def test_the_json_export_holds_the_views_and_follows_its_schema(memory, tmp_path):
    jsonschema = pytest.importorskip("jsonschema", reason="validating against docs/dashboard_schema.json needs jsonschema")
    dashboard, out = memory[3], memory[4]
    record = json.loads((out / "dashboard.json").read_text(encoding="utf-8"))
    jsonschema.validate(record, json.loads(SCHEMA.read_text(encoding="utf-8")))
    section = record["memory"]
    assert (section["min_distance"], section["per_head"], section["n_terms"]) == (DISTANCE, VIEWS, TERMS)
    assert len(section["views"]) == len(dashboard.memory.views) and section["absent_reason"] is None
    for exported, view in zip(section["views"], dashboard.memory.views):
        assert exported["read_norm"] == pytest.approx(view.read_norm, rel=WRITTEN)
        assert [t["feature"] for t in exported["terms"]] == [x.feature for x in view.terms]
    assert sum(len(card["retrieved_in"]) for card in record["features"]) == sum(len(c.retrieved_in) for c in dashboard.features)


def test_a_state_sae_has_no_view_and_says_why_in_one_line(tmp_path):
    jsonschema = pytest.importorskip("jsonschema", reason="validating against docs/dashboard_schema.json needs jsonschema")
    model, sae = _slow_decay_model(), SAES["state"]()
    windows = torch.randint(0, model.cfg.d_vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    dashboard = build_dashboard(model, sae, windows, features_per_head=1, n_contexts=2, ablation_firings=0, loss_tokens=0,
                                batch_size=2, progress=False)
    reason = dashboard.memory.absent_reason
    assert dashboard.memory.views == [] and all(card.retrieved_in == [] for card in dashboard.features)
    assert reason.startswith("No memory view: memory_attribution needs a write SAE") and "a state site" in reason
    assert "\n" not in reason
    write_site(dashboard, tmp_path, progress=False)
    (note,) = [a for tag, a in _tags(tmp_path / "index.html") if a.get("id") == "memory-note"]
    assert note["data-absent"] == "1" and "needs a write SAE" in (tmp_path / "index.html").read_text(encoding="utf-8")
    assert not list((tmp_path / "features").glob("*_memory.html"))
    assert not [a for _, a in _tags(tmp_path / "index.html") if _has_class(a, "memory-link")]
    record = json.loads((tmp_path / "dashboard.json").read_text(encoding="utf-8"))
    jsonschema.validate(record, json.loads(SCHEMA.read_text(encoding="utf-8")))
    assert record["memory"]["views"] == [] and record["memory"]["absent_reason"] == reason


def test_other_families_and_no_views_asked_for_say_why():
    from hooked_gdn import HookedGatedDeltaNet

    for name, layer_index in (("mamba2-austen", 0), ("rwkv7-austen", 0)):
        model = HookedGatedDeltaNet.from_pretrained(name).eval()
        layer = model.cfg.gdn_layers[layer_index]
        sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=4, k=1, site=site_name(layer, "write"),
                                heads=[0], n_heads=model.cfg.n_value_heads)
        reason = memory_unavailable(model, sae)
        assert reason.startswith("No memory view: memory_attribution supports Gated DeltaNet layers") and "\n" not in reason
    model, sae = _slow_decay_model(), SAES["write"]()
    assert memory_unavailable(model, sae) is None
    windows = torch.randint(0, model.cfg.d_vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    options = dict(features_per_head=1, n_contexts=2, ablation_firings=0, loss_tokens=0, batch_size=2, progress=False)
    none = build_dashboard(model, sae, windows, memory_views=0, **options)
    assert none.memory.views == [] and "none asked for" in none.memory.absent_reason
    too_short = build_dashboard(model, sae, windows, memory_min_distance=30, **options)
    assert too_short.memory.views == [] and "24-token windows" in too_short.memory.absent_reason
    with pytest.raises(ValueError, match="memory_terms"):
        build_dashboard(model, sae, windows, memory_terms=0, **options)
    with pytest.raises(ValueError, match="memory_views"):
        build_dashboard(model, sae, windows, memory_views=-1, **options)


def test_the_command_passes_its_memory_flags(tmp_path):
    """On a tiny random checkpoint with a tokenizer (so the command reads text), a write SAE of its layer 1."""
    torch.manual_seed(0)
    model_folder = save_tiny_checkpoint_with_tokenizer(tmp_path / "model")
    SAES["write"]().save(tmp_path / "sae")
    text_folder(tmp_path / "corpus")
    out = tmp_path / "site"
    cli_main(["dashboard", str(tmp_path / "sae"), "--model", str(model_folder), "--data", str(tmp_path / "corpus"),
              "--context", "32", "--contexts", "2", "--features-per-head", "1", "--ablation-firings", "0", "--loss-tokens",
              "0", "--memory-views", "2", "--memory-terms", "3", "--memory-min-distance", "5", "--out", str(out),
              "--no-progress", "--allow-other-model"])
    section = json.loads((out / "dashboard.json").read_text(encoding="utf-8"))["memory"]
    assert (section["per_head"], section["n_terms"], section["min_distance"]) == (2, 3, 5)
    assert len(section["views"]) == 2 * len(SAES["write"]().cfg.head_indices)
    assert all(len(v["terms"]) <= 3 and all(t["distance"] >= 5 for t in v["terms"]) for v in section["views"])
    assert all((out / memory_page_name(h)).is_file() for h in SAES["write"]().cfg.head_indices)
