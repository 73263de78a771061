"""The feature dashboard: the numbers its HTML shows, read back with html.parser, against the library's
own computations on a tiny random model (a state SAE and a write SAE on subsets of the heads, so a
dictionary index is not its head), and the JSON export against its schema; the refusal of an SAE whose
site the model lacks. The pages in headless Chromium: tests/test_dashboard_browser.py."""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hooked_gdn.census import memory_census
from hooked_gdn.sites import gdn_hook_name, site_name
from writesae import BilinearMatrixSAE, FlatSAE
from writesae.cli import main as cli_main
from writesae.dashboard import SIGNIFICANT_DIGITS, build_dashboard
from writesae.dashboard_html import feature_page_name, write_site
from writesae.experiments.edits import kl_from_clean
from writesae.experiments.logit_shift import state_edit_hook

from .conftest import random_tiny_model

LAYER, HORIZON, BINS = 1, 6, 12
#: the relative rounding of a number as the site writes it (to SIGNIFICANT_DIGITS significant digits)
WRITTEN = 0.5 * 10.0 ** (1 - SIGNIFICANT_DIGITS)


def _slow_decay_model():
    """The tiny random model with layer 1's decays slowed (half-lives of tens of tokens), so that an
    ablation's effect is carried over many positions."""
    model = random_tiny_model()
    with torch.no_grad():
        model.blocks[LAYER].linear_attn.A_log.fill_(math.log(0.02))
    return model


def _with_encoder_bias(sae, bias: float = 0.2):
    """A positive b_enc makes the codes, and so the ablations, large: against a random model's tiny
    native effects the fp32 rounding of the chunked recurrence would otherwise be a percent of a KL."""
    with torch.no_grad():
        sae.b_enc.fill_(bias)
    return sae


SAES = {
    # a WriteSAE on the state, heads 3 and 1, with an input scale to undo
    "state": lambda: _with_encoder_bias(BilinearMatrixSAE(d_k=12, d_v=8, n_features=8, k=2, site=site_name(LAYER, "state"),
                                                          heads=[3, 1], n_heads=4, input_scale=2.0, seed=1)),
    # a flat SAE on the write, heads 2 and 0: general atoms (SVD key factor, dense reads)
    "write": lambda: _with_encoder_bias(FlatSAE(d_k=12, d_v=8, n_features=6, k=2, site=site_name(LAYER, "write"),
                                                heads=[2, 0], n_heads=4, input_scale=0.5, seed=2)),
}


class _Tags(HTMLParser):
    """Every start tag in document order, as (tag, attributes)."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _contexts(tags, section: str) -> list[tuple[dict, list[dict]]]:
    """The shown contexts of one section ("top", or a quantile group's number) with their token spans."""
    contexts = _groups(tags, lambda t, a: _has_class(a, "context"), lambda t, a: _has_class(a, "tok"))
    return [(context, spans) for context, spans in contexts if context["data-section"] == section]


def _tags(path: Path) -> list[tuple[str, dict]]:
    return _Tags(path.read_text(encoding="utf-8")).tags


def _has_class(attrs: dict, name: str) -> bool:
    return name in (attrs.get("class") or "").split()


def _groups(tags, opens, member) -> list[tuple[dict, list[dict]]]:
    """Each tag matching ``opens`` with the ``member`` tags that follow it until the next opener."""
    groups = []
    for tag, attrs in tags:
        if opens(tag, attrs):
            groups.append((attrs, []))
        elif groups and member(tag, attrs):
            groups[-1][1].append(attrs)
    return groups


@pytest.fixture(name="built", scope="module", params=sorted(SAES))
def built_fixture(request, tmp_path_factory):
    """(kind, model, sae, windows, dashboard, site folder)."""
    model, sae = _slow_decay_model(), SAES[request.param]()
    windows = torch.randint(0, model.cfg.d_vocab, (5, 20), generator=torch.Generator().manual_seed(3))
    dashboard = build_dashboard(model, sae, windows, bins=BINS, horizon=HORIZON, n_contexts=4, left=5, right=2,
                                n_keys=5, n_logits=5, ablation_firings=2, batch_size=2, progress=False)
    out = tmp_path_factory.mktemp(f"dashboard-{request.param}")
    write_site(dashboard, out, progress=False)
    return request.param, model, sae, windows, dashboard, out


def _codes_and_cache(model, sae, windows, kind):
    """The SAE's codes [n, T, n_dicts, n] at every position, and a cache of the layer's read side."""
    names = [gdn_hook_name(LAYER, f"hook_{n}") for n in
             ("write_key", "write_value", "read_query", "recurrence_out", "gate_input", "state")]
    _, cache = model.run_with_cache(windows, names_filter=names + ["ln_final.hook_scale"])
    heads = sae.cfg.head_indices
    with torch.no_grad():
        if kind == "state":
            codes = sae.encode(cache[names[5]][:, :, heads])
        else:
            codes = sae.encode_factors(cache[names[0]][:, :, heads], cache[names[1]][:, :, heads])
    return codes, cache, names


def _most_frequent(codes: torch.Tensor, d: int) -> int:
    return int((codes[..., d, :] > 0).sum((0, 1)).argmax())


def test_index_shows_the_sae_heads_with_their_census_half_life(built):
    kind, model, sae, windows, dashboard, out = built
    rows = [attrs for tag, attrs in _tags(out / "index.html") if tag == "tr" and _has_class(attrs, "head")]
    assert [int(r["data-head"]) for r in rows] == sae.cfg.head_indices
    census = memory_census(model, windows)  # state_every does not enter the half-life
    half_lives = [float(a["data-value"]) for tag, a in _tags(out / "index.html") if a.get("data-key") == "half_life"]
    expected = [census.head(LAYER, h).half_life[1] for h in sae.cfg.head_indices]
    assert half_lives == pytest.approx(expected, rel=WRITTEN)
    assert min(expected) > 10  # the slowed decays: half-lives of tens of tokens


def test_index_frequency_and_mean_activation_match_the_codes(built):
    kind, model, sae, windows, dashboard, out = built
    codes, _, _ = _codes_and_cache(model, sae, windows, kind)
    rows = _groups(_tags(out / "index.html"), lambda t, a: t == "tr" and "data-feature" in a,
                   lambda t, a: t == "td" and "data-key" in a)
    assert len(rows) == sae.n_dicts * sae.cfg.n_features
    for row, cells in rows:
        head, feature = int(row["data-head"]), int(row["data-feature"])
        a = codes[..., sae.cfg.head_indices.index(head), feature]
        value = {c["data-key"]: float(c["data-value"]) for c in cells}
        assert value["frequency"] == pytest.approx(int((a > 0).sum()) / a.numel(), rel=WRITTEN, abs=1e-12)
        active = a[a > 0]
        mean = float(active.mean()) if len(active) else 0.0
        assert value["mean_activation"] == pytest.approx(mean, rel=WRITTEN + 1e-5)
        link = [attrs for tag, attrs in _tags(out / "index.html") if tag == "a" and attrs.get("href") == feature_page_name(head, feature)]
        assert link and (out / feature_page_name(head, feature)).is_file()


def test_histogram_and_top_contexts_match_the_codes(built):
    kind, model, sae, windows, dashboard, out = built
    codes, _, _ = _codes_and_cache(model, sae, windows, kind)
    d = 1
    head, feature = sae.cfg.head_indices[d], _most_frequent(codes, d)
    a = codes[..., d, feature]  # [n, T]
    tags = _tags(out / feature_page_name(head, feature))

    active = a[a > 0].numpy()
    expected, _ = np.histogram(active, bins=BINS, range=(0, active.max()))
    counts = [int(attrs["data-count"]) for tag, attrs in tags if tag == "rect" and _has_class(attrs, "bin")]
    assert counts == expected.tolist()

    contexts = _contexts(tags, "top")
    assert contexts
    shown = [float(c["data-activation"]) for c, _ in contexts]
    assert shown == sorted(shown, reverse=True)
    assert shown[0] == pytest.approx(float(a.max()), rel=WRITTEN)
    for context, spans in contexts:
        w, t = int(context["data-window"]), int(context["data-position"])
        assert float(context["data-activation"]) == pytest.approx(float(a[w, t]), rel=WRITTEN)
        fire = [j for j, s in enumerate(spans) if _has_class(s, "fire")]
        assert len(fire) == 1
        start = t - fire[0]
        assert [float(s["data-act"]) for s in spans] == pytest.approx(a[w, start : start + len(spans)].tolist(), rel=WRITTEN)


def _key_factor(sae, d: int, feature: int) -> torch.Tensor:
    atom = sae.atoms()[d, feature].detach()
    if isinstance(sae, BilinearMatrixSAE):
        return F.normalize(sae.V[d, feature, 0].detach(), dim=0)
    u = torch.linalg.svd(atom).U[:, 0]
    return u * u[u.abs().argmax()].sign()


def test_key_side_is_the_write_keys_alignment_with_the_atoms_key_factor(built):
    kind, model, sae, windows, dashboard, out = built
    codes, cache, names = _codes_and_cache(model, sae, windows, kind)
    d = 0
    head, feature = sae.cfg.head_indices[d], _most_frequent(codes, d)
    alignment = cache[names[0]][:, :, head] @ _key_factor(sae, d, feature)  # [n, T]
    tables = _groups(_tags(out / feature_page_name(head, feature)), lambda t, a: t == "table" and _has_class(a, "keys"),
                     lambda t, a: t == "tr" and _has_class(a, "key"))
    assert [table["data-kind"] for table, _ in tables] == ["aligned", "opposed"]
    for (table, rows), largest in zip(tables, (True, False)):
        expected = alignment.flatten().topk(len(rows), largest=largest).values
        assert [float(r["data-alignment"]) for r in rows] == pytest.approx(expected.tolist(), rel=WRITTEN, abs=1e-5)
        for r in rows:
            assert float(alignment[int(r["data-window"]), int(r["data-position"])]) == pytest.approx(float(r["data-alignment"]), rel=WRITTEN, abs=1e-5)


def _firing_direct_logits(model, sae, codes, cache, names, d: int, feature: int, w: int, t: int) -> torch.Tensor:
    """Δlogits [V] of one firing through the read: (a/s) Aᵀ q̂, the gated norm's JVP by autograd, W_o on the
    whole concatenation of heads, and tokens_to_residual_directions over the frozen final scale."""
    gdn = model.blocks[LAYER].linear_attn
    head = sae.cfg.head_indices[d]
    atom = sae.atoms()[d, feature].detach()
    directions = model.tokens_to_residual_directions(torch.arange(model.cfg.d_vocab)).detach()  # [V, d_model]
    a = codes[w, t, d, feature]
    delta_o = a / sae.cfg.input_scale * (atom.T @ cache[names[2]][w, t, head])  # (a/s) Aᵀ q̂
    o, z = cache[names[3]][w, t, head], cache[names[4]][w, t, head]
    _, delta_y = torch.func.jvp(lambda x: gdn.norm(x, z), (o,), (delta_o.detach(),))
    y = torch.zeros(model.cfg.n_value_heads, model.cfg.d_value)
    y[head] = delta_y
    delta_r = F.linear(y.flatten(), gdn.W_o)
    return (directions @ delta_r / cache["ln_final.hook_scale"][w, t, 0]).detach()


def _mean_direct_logits(model, sae, codes, cache, names, d: int, feature: int) -> torch.Tensor:
    """The mean over the feature's firings of `_firing_direct_logits`."""
    firings = (codes[..., d, feature] > 0).nonzero().tolist()
    total = sum(_firing_direct_logits(model, sae, codes, cache, names, d, feature, w, t) for w, t in firings)
    return total / len(firings)


def test_value_side_is_the_read_change_through_the_gated_norm_w_o_and_unembedding(built):
    """Independently of the closed form the library uses: the gated norm's JVP by autograd, W_o on
    the whole concatenation of heads, and tokens_to_residual_directions over the frozen final scale."""
    kind, model, sae, windows, dashboard, out = built
    codes, cache, names = _codes_and_cache(model, sae, windows, kind)
    d = 1
    head, feature = sae.cfg.head_indices[d], _most_frequent(codes, d)
    mean = _mean_direct_logits(model, sae, codes, cache, names, d, feature)

    tables = _groups(_tags(out / feature_page_name(head, feature)), lambda t, a: t == "table" and _has_class(a, "logits"),
                     lambda t, a: t == "tr" and _has_class(a, "logit"))
    assert [table["data-kind"] for table, _ in tables] == ["promoted", "suppressed"]
    for (table, rows), largest in zip(tables, (True, False)):
        expected = mean.topk(len(rows), largest=largest)
        assert [int(r["data-token-id"]) for r in rows] == expected.indices.tolist()
        assert [float(r["data-value"]) for r in rows] == pytest.approx(expected.values.tolist(), rel=WRITTEN + 1e-4, abs=1e-9)


def test_carried_kl_is_the_state_edit_removing_the_feature_at_its_shown_firings(built):
    """Against logit_shift's state-edit hook on the full window (the library cuts windows after the horizon)."""
    kind, model, sae, windows, dashboard, out = built
    codes, _, _ = _codes_and_cache(model, sae, windows, kind)
    d = 0
    head, feature = sae.cfg.head_indices[d], _most_frequent(codes, d)
    tags = _tags(out / feature_page_name(head, feature))
    stats = {a["data-stat"]: float(a["data-value"]) for tag, a in tags if "data-stat" in a}
    contexts = [context for context, _ in _contexts(tags, "top")][:2]  # ablation_firings=2
    atom = sae.atoms()[d, feature].detach()
    u, sigma, vh = torch.linalg.svd(atom)  # as rank-1 terms, for the rank-1 edit hook
    kl_next, kl_carried = [], []
    for context in contexts:
        w, t, act = int(context["data-window"]), int(context["data-position"]), float(context["data-activation"])
        tokens = windows[w : w + 1]
        clean = model(tokens)
        hooks = [(site_name(LAYER, "state"), state_edit_hook(head, t, sigma[r] * u[:, r], vh[r], -act / sae.cfg.input_scale))
                 for r in range(len(sigma))]
        kl = kl_from_clean(clean, model.run_with_hooks(tokens, fwd_hooks=hooks, state_positions=[t]))[0]
        kl_next.append(float(kl[t].detach()))
        kl_carried.append(float(kl[t : t + HORIZON].sum().detach()))
    # 1%: the tiny model's reads sit near the gated norm's ε, where fp32 rounding of the recurrence
    # (a cut window, another chunking) moves a small KL by up to a few 0.1%; a wrong scale, sign
    # convention, head or position moves it by far more
    assert stats["kl_next"] == pytest.approx(np.mean(kl_next), rel=1e-2)
    assert stats["kl_carried"] == pytest.approx(np.mean(kl_carried), rel=1e-2)
    assert stats["kl_carried"] > 1.5 * stats["kl_next"]  # with slow decays the edit keeps acting after t


def _ablated_loss_change(model, sae, windows, d: int, feature: int, w: int, t: int, act: float) -> float:
    """CE of x_{t+1} at t with (a/s) A removed from the head's S_t (logit_shift's state-edit hook, one rank-1
    term per singular value, on the full window) minus the clean CE."""
    atom = sae.atoms()[d, feature].detach()
    u, sigma, vh = torch.linalg.svd(atom)
    tokens = windows[w : w + 1]
    hooks = [(site_name(LAYER, "state"), state_edit_hook(sae.cfg.head_indices[d], t, sigma[r] * u[:, r], vh[r],
                                                         -act / sae.cfg.input_scale)) for r in range(len(sigma))]
    with torch.no_grad():
        clean = model(tokens)[0, t]
        ablated = model.run_with_hooks(tokens, fwd_hooks=hooks, state_positions=[t])[0, t]
    target = windows[w, t + 1]
    return float(F.cross_entropy(ablated[None], target[None]) - F.cross_entropy(clean[None], target[None]))


def _ablated_one_at_a_time(model, sae, layer: int, windows, f) -> list[float]:
    """What the batched ablations replace: firing ``f``'s ablation alone, on its whole window from position 0, with
    logit_shift's state-edit hook (one rank-1 term per singular value of the atom): [KL at t, KL over the horizon,
    the next token's loss change (nan at the last position)]."""
    u, sigma, vh = torch.linalg.svd(sae.atoms().detach()[f.dictionary, f.feature])
    hooks = [(site_name(layer, "state"), state_edit_hook(sae.cfg.head_indices[f.dictionary], f.position, sigma[r] * u[:, r],
                                                         vh[r], -f.activation / sae.cfg.input_scale)) for r in range(len(sigma))]
    tokens = windows[f.window : f.window + 1]
    with torch.no_grad():
        clean = model(tokens)[0]
        ablated = model.run_with_hooks(tokens, fwd_hooks=hooks, state_positions=[f.position])[0]
    kl = kl_from_clean(clean, ablated)[f.position : f.position + f.horizon]
    target = windows[f.window, f.position + 1 : f.position + 2]
    loss = (float(F.cross_entropy(ablated[f.position][None], target) - F.cross_entropy(clean[f.position][None], target))
            if len(target) else float("nan"))
    return [float(kl[0]), float(kl.sum()), loss]


@pytest.mark.parametrize("kind", sorted(SAES))
@pytest.mark.parametrize("cache_bytes", [1 << 28, 1], ids=["one-batch", "one-row-per-batch"])
def test_batched_ablations_equal_one_at_a_time_ablations_of_the_whole_window(kind, cache_bytes, monkeypatch):
    """The fast path (clean prefix cached once per window, many (feature, token) ablations as the rows of one
    continuation over t … t + horizon − 1) against what it replaces: each ablation alone, on the whole window
    from position 0, with logit_shift's state-edit hook (one rank-1 term per singular value) and the clean run
    beside it. Firings at t = 0 and at the last position, repeated positions with other features, horizons
    cut at the window's end; with ``cache_bytes`` = 1 every batch holds one row and one window."""
    from writesae import dashboard as module

    monkeypatch.setattr(module, "ABLATION_CACHE_BYTES", cache_bytes)
    model, sae = _slow_decay_model(), SAES[kind]()
    windows = torch.randint(0, model.cfg.d_vocab, (3, 20), generator=torch.Generator().manual_seed(4))
    T, n = windows.shape[1], sae.cfg.n_features
    site = module.check_sae_fits(sae, model)
    firings = [module._Firing(w, t, d, i, a, h) for w, t, d, i, a, h in [
        (0, 0, 0, 1, 0.7, 1), (1, 0, 1, 2, 0.4, HORIZON), (2, 7, 0, 3, 0.9, 1), (0, 7, 1, 0, 1.3, 1), (0, 7, 0, 0, 0.5, 1),
        (1, 7, 0, n - 1, 0.8, HORIZON), (2, 12, 1, 4, 1.1, HORIZON), (2, T - 3, 0, 5, 0.6, HORIZON), (1, T - 1, 1, 1, 0.9, 1),
        (2, 12, 1, 4, 1.1, 1)]]
    kl_next, kl_carried, loss_change = module._ablate(model, sae, site, windows, firings, progress=False)
    for j, f in enumerate(firings):
        got = [float(kl_next[j]), float(kl_carried[j]), float(loss_change[j])]
        # fp32: a KL is a sum of differences of log-probabilities of ~5, each rounded at ~5e-7
        torch.testing.assert_close(torch.tensor(got), torch.tensor(_ablated_one_at_a_time(model, sae, LAYER, windows, f)),
                                   rtol=1e-3, atol=1e-5, equal_nan=True, msg=lambda m: f"firing {f}: {m}")
    assert float(kl_carried.max()) > 1e-3 and float(loss_change.nan_to_num().abs().max()) > 1e-3  # real effects


@pytest.mark.parametrize("name", ["mamba2-austen", "rwkv7-austen"])
def test_batched_ablations_equal_one_at_a_time_ones_on_the_shipped_mamba2_and_rwkv7(name):
    """The same check on the other families' caches (Mamba-2's conv states, RWKV-7's token shifts and DPLR
    state), at the first memory layer, so that the continuation runs through every later layer's cache."""
    from hooked_gdn import HookedGatedDeltaNet
    from writesae import dashboard as module

    model = HookedGatedDeltaNet.from_pretrained(name).eval()
    layer, H = model.cfg.gdn_layers[0], model.cfg.n_value_heads
    sae = BilinearMatrixSAE(d_k=model.cfg.d_key, d_v=model.cfg.d_value, n_features=4, k=1, site=site_name(layer, "state"),
                            heads=[0, H - 1], n_heads=H, seed=1)
    windows = torch.randint(2, model.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(5))
    firings = [module._Firing(w, t, d, i, a, h) for w, t, d, i, a, h in [
        (0, 0, 0, 1, 30.0, 4), (1, 5, 1, 2, 40.0, 1), (0, 5, 0, 3, 50.0, 4), (1, 5, 0, 3, 50.0, 4), (1, 9, 0, 0, 30.0, 1),
        (0, 9, 1, 2, 30.0, 1), (0, 15, 1, 1, 30.0, 1)]]  # two windows in one batch at (5, 4) and (9, 1)
    kl_next, kl_carried, loss_change = module._ablate(model, sae, module.check_sae_fits(sae, model), windows, firings,
                                                      progress=False)
    for j, f in enumerate(firings):
        torch.testing.assert_close(torch.tensor([float(kl_next[j]), float(kl_carried[j]), float(loss_change[j])]),
                                   torch.tensor(_ablated_one_at_a_time(model, sae, layer, windows, f)), rtol=1e-3,
                                   atol=1e-5, equal_nan=True, msg=lambda m: f"{name}, firing {f}: {m}")
    assert float(kl_carried.max()) > 1e-3  # a real effect


def page_vocabulary(page: Path) -> dict[str, str]:
    """The page's token id -> text map of its hovers (the tiny model has no tokenizer: ⟨id⟩)."""
    text = page.read_text(encoding="utf-8")
    (data,) = re.findall(r'<script type="application/json" id="vocabulary">(.*?)</script>', text)
    return json.loads(data)


def _page_of_most_frequent(built, d: int):
    kind, model, sae, windows, dashboard, out = built
    codes, cache, names = _codes_and_cache(model, sae, windows, kind)
    feature = _most_frequent(codes, d)
    return codes, cache, names, feature, _tags(out / feature_page_name(sae.cfg.head_indices[d], feature))


def test_quantile_groups_are_the_codes_quantiles_with_contexts_drawn_from_each(built):
    kind, model, sae, windows, dashboard, out = built
    d = 1
    codes, _, _, feature, tags = _page_of_most_frequent(built, d)
    a = codes[..., d, feature]
    active = a[a > 0]
    edges = torch.quantile(active, torch.linspace(0, 1, 6))  # build_dashboard's default: 5 groups
    bands = [attrs for tag, attrs in tags if _has_class(attrs, "band")]
    assert len(bands) == 5
    assert [float(b["data-low"]) for b in bands] == pytest.approx(edges[:-1].tolist(), rel=WRITTEN)
    assert [float(b["data-high"]) for b in bands] == pytest.approx(edges[1:].tolist(), rel=WRITTEN)
    expected_counts = [int(((active >= lo) & ((active < hi) if j < 4 else (active <= hi))).sum())
                       for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    assert [int(b["data-count"]) for b in bands] == expected_counts and sum(expected_counts) == len(active)
    drawn = 0
    for j, band in enumerate(bands):
        contexts = _contexts(tags, str(j))
        assert len(contexts) == min(3, expected_counts[j]) or expected_counts[j] > 3  # spacing may drop some
        for context, spans in contexts:
            w, t, act = int(context["data-window"]), int(context["data-position"]), float(context["data-activation"])
            assert act == pytest.approx(float(a[w, t]), rel=WRITTEN)
            # in its band: the code itself (the page's act is it to SIGNIFICANT_DIGITS, the edges are torch's)
            assert float(edges[j]) * (1 - 1e-6) <= float(a[w, t]) <= float(edges[j + 1]) * (1 + 1e-6)
            drawn += 1
    assert drawn >= 5  # every group shows at least one


def test_logit_histogram_is_the_mean_direct_effect_over_the_vocabulary(built):
    kind, model, sae, windows, dashboard, out = built
    d = 1
    codes, cache, names, feature, tags = _page_of_most_frequent(built, d)
    mean = _mean_direct_logits(model, sae, codes, cache, names, d, feature).numpy()
    bins = [attrs for tag, attrs in tags if tag == "rect" and _has_class(attrs, "logit-bin")]
    assert len(bins) == BINS
    edges = [float(b["data-lo"]) for b in bins] + [float(bins[-1]["data-hi"])]
    assert edges == pytest.approx(np.linspace(mean.min(), mean.max(), BINS + 1).tolist(), rel=WRITTEN + 1e-4, abs=1e-7)
    counts = np.array([int(b["data-count"]) for b in bins])
    exact_edges = np.linspace(mean.min(), mean.max(), BINS + 1)  # the page's, before rounding (checked above)
    expected, _ = np.histogram(mean, bins=exact_edges)
    near_an_edge = int((np.abs(mean[:, None] - exact_edges[None, 1:-1]) < 1e-5 * np.abs(mean).max()).sum())
    assert counts.sum() == model.cfg.d_vocab and np.abs(counts - expected).sum() <= 2 * near_an_edge


def test_hover_shows_each_firings_own_logit_effect_and_its_ablated_loss_change(built):
    """Every token where the feature fires carries that firing's promoted and suppressed tokens (by hand
    from the weights) and, at the first loss_tokens of them, the loss change of an independent ablation run."""
    kind, model, sae, windows, dashboard, out = built
    T = windows.shape[1]
    for d in range(sae.n_dicts):
        codes, cache, names, feature, tags = _page_of_most_frequent(built, d)
        vocabulary = page_vocabulary(out / feature_page_name(sae.cfg.head_indices[d], feature))
        a = codes[..., d, feature]
        sections = ["top"] + [str(j) for j in range(5)]
        contexts = [c for section in sections for c in _contexts(tags, section)]
        losses, outlined = {}, []
        for context, spans in contexts:
            fire = [j for j, span in enumerate(spans) if _has_class(span, "fire")][0]
            w, start = int(context["data-window"]), int(context["data-position"]) - fire
            outlined.append((w, int(context["data-position"])))
            for offset, span in enumerate(spans):
                t = start + offset
                assert ("data-promoted" in span) == bool(a[w, t] > 0)
                if "data-promoted" not in span:
                    continue
                expected = _firing_direct_logits(model, sae, codes, cache, names, d, feature, w, t)
                for key, largest in (("data-promoted", True), ("data-suppressed", False)):
                    shown = json.loads(span[key])
                    top = expected.topk(3, largest=largest)
                    assert [entry[0] for entry in shown] == top.indices.tolist()  # [token id, Δlogit] pairs
                    # fp32 rounding relative to the firing's largest effect (weak firings' effects are ~1e-5)
                    assert [entry[1] for entry in shown] == pytest.approx(top.values.tolist(), rel=WRITTEN + 1e-4,
                                                                          abs=1e-4 * float(expected.abs().max()))
                    assert [vocabulary[str(entry[0])] for entry in shown] == [f"⟨{i}⟩" for i in top.indices.tolist()]
                if span["data-loss"] != "NaN":
                    losses[w, t] = float(span["data-loss"])
        assert 0 < len(losses) <= 8  # loss_tokens' default
        assert all(key in losses for key in outlined[:4] if key[1] + 1 < T)  # the top contexts' own tokens first
        for (w, t), shown in losses.items():
            assert shown == pytest.approx(_ablated_loss_change(model, sae, windows, d, feature, w, t, float(a[w, t])),
                                          rel=1e-2, abs=1e-6)
        assert max(abs(x) for x in losses.values()) > 1e-4  # a real effect, not rounding


def test_correlated_features_are_the_jaccard_of_firing_sets_and_the_atom_cosine(built):
    kind, model, sae, windows, dashboard, out = built
    codes, _, _ = _codes_and_cache(model, sae, windows, kind)
    n = sae.cfg.n_features
    fires = (codes > 0).flatten(0, 1).flatten(1).float()  # [positions, n_dicts·n]
    both = fires.T @ fires
    jaccard = both / (fires.sum(0)[:, None] + fires.sum(0)[None, :] - both).clamp_min(1)
    for d in range(sae.n_dicts):
        atoms = sae.atoms()[d].detach().flatten(1)
        for feature in range(n):
            tags = _tags(out / feature_page_name(sae.cfg.head_indices[d], feature))
            tables = dict((table["data-kind"], rows) for table, rows in _groups(
                tags, lambda t, a: t == "table" and _has_class(a, "related"), lambda t, a: t == "tr" and _has_class(a, "related")))
            me = d * n + feature
            others = jaccard[me].clone()
            others[me] = 0
            expected = others.topk(5).values
            co = tables.get("co_firing", [])
            assert [float(r["data-score"]) for r in co] == pytest.approx(expected[expected > 0].tolist(), rel=WRITTEN)
            for r in co:
                key = sae.cfg.head_indices.index(int(r["data-head"])) * n + int(r["data-feature"])
                assert float(r["data-score"]) == pytest.approx(float(jaccard[me, key]), rel=WRITTEN)
            cosine = F.cosine_similarity(atoms[feature][None], atoms, dim=1)
            cosine[feature] = -2
            rows = tables["atom_cosine"]
            assert [float(r["data-score"]) for r in rows] == pytest.approx(cosine.topk(5).values.tolist(), rel=WRITTEN, abs=1e-6)
            for r in rows:
                assert int(r["data-head"]) == sae.cfg.head_indices[d]
                assert float(r["data-score"]) == pytest.approx(float(cosine[int(r["data-feature"])]), rel=WRITTEN, abs=1e-6)


@pytest.mark.parametrize("kind", sorted(SAES))
def test_atom_cosine_is_scale_free_when_atoms_have_unequal_norms(kind):
    """The SAEs above start with unit atoms, where a bare inner product would pass for the cosine."""
    from writesae.dashboard import _atom_cosines

    sae = SAES[kind]()
    with torch.no_grad():
        decoder = sae.V if kind == "state" else sae.W_dec
        decoder.mul_(torch.linspace(0.2, 3.0, decoder.shape[1]).view(1, -1, *[1] * (decoder.dim() - 2)))
    n = sae.cfg.n_features
    selected = [(d, i) for d in range(sae.n_dicts) for i in range(n)]
    for (d, i), related in zip(selected, _atom_cosines(sae, selected, 3)):
        atoms = sae.atoms()[d].detach().flatten(1)
        cosine = F.cosine_similarity(atoms[i][None], atoms, dim=1)
        cosine[i] = -2
        top = cosine.topk(3)
        assert [key for key, _ in related] == (d * n + top.indices).tolist()
        assert [score for _, score in related] == pytest.approx(top.values.tolist(), abs=1e-6)


SCHEMA = Path(__file__).parent.parent / "docs" / "dashboard_schema.json"


def test_the_json_export_follows_its_schema_and_holds_the_pages_numbers(built, tmp_path):
    jsonschema = pytest.importorskip("jsonschema", reason="validating against docs/dashboard_schema.json needs jsonschema")
    kind, model, sae, windows, dashboard, out = built
    codes, _, _ = _codes_and_cache(model, sae, windows, kind)
    path = dashboard.export_json(tmp_path / "dashboard.json")
    record = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.validate(record, json.loads(SCHEMA.read_text(encoding="utf-8")))
    assert (record["schema"], record["schema_version"]) == ("writesae.dashboard", 2)
    hovers = [h for card in record["features"] for c in card["top_contexts"] + [c for g in card["quantile_groups"] for c in g["contexts"]]
              for h in c["hovers"] if h is not None]
    named = {str(token) for h in hovers for token, _ in h["promoted"] + h["suppressed"]}  # [token id, Δlogit] pairs
    assert hovers and named == set(record["vocabulary"]) and all(record["vocabulary"][t] == f"⟨{t}⟩" for t in named)
    assert path.read_bytes() == (out / "dashboard.json").read_bytes()  # the site's copy
    assert len(record["features"]) == sae.n_dicts * sae.cfg.n_features
    for card in record["features"]:
        a = codes[..., card["dictionary"], card["feature"]]
        assert card["frequency"] == pytest.approx(int((a > 0).sum()) / a.numel(), rel=WRITTEN, abs=1e-12)
        for context in card["top_contexts"] + [c for g in card["quantile_groups"] for c in g["contexts"]]:
            w, start = context["window"], context["start"]
            assert context["activations"] == pytest.approx(a[w, start : start + len(context["tokens"])].tolist(), rel=WRITTEN)
            assert [h is not None for h in context["hovers"]] == [x > 0 for x in context["activations"]]
        page = _tags(out / feature_page_name(card["head"], card["feature"]))
        shown = [float(s["data-loss"]) for c, spans in _contexts(page, "top") for s in spans if "data-loss" in s]
        exported = [h["loss_change"] for c in card["top_contexts"] for h in c["hovers"] if h is not None]
        assert shown == pytest.approx([math.nan if x is None else x for x in exported], nan_ok=True)


def test_every_number_written_has_the_dashboards_significant_digits(built):
    """The pages' data-* numbers and every float of dashboard.json carry SIGNIFICANT_DIGITS significant digits
    (the sizes of the site are dominated by them), and no more: each reads back as itself rounded so."""
    out = built[5]

    def floats(value):
        if isinstance(value, dict):
            return [x for item in value.values() for x in floats(item)]
        if isinstance(value, list):
            return [x for item in value for x in floats(item)]
        return [value] if isinstance(value, float) else []

    exported = floats(json.loads((out / "dashboard.json").read_text(encoding="utf-8")))
    attributes = [float(v) for path in [out / "index.html", *sorted((out / "features").iterdir())] for _, attrs in _tags(path)
                  for key, v in attrs.items() if key.startswith("data-") and re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?", v or "")]
    hovers = [float(x) for path in sorted((out / "features").iterdir()) for _, attrs in _tags(path) if "data-promoted" in attrs
              for key in ("data-promoted", "data-suppressed") for _, x in json.loads(attrs[key])]
    for numbers in (exported, attributes, hovers):
        assert len([x for x in numbers if x != 0]) > 20
        assert all(x == float(f"{x:.{SIGNIFICANT_DIGITS}g}") for x in numbers)


def test_the_json_export_writes_null_for_infinity_and_replaces_only_its_own_files(built, tmp_path):
    dashboard = built[4]
    endless = replace(dashboard, heads=[replace(dashboard.heads[0], half_life=(1.0, math.inf, math.inf)), *dashboard.heads[1:]])
    path = endless.export_json(tmp_path / "out.json")
    assert json.loads(path.read_text())["heads"][0]["half_life"] == [1.0, None, None]
    dashboard.export_json(path)  # an export is replaced
    assert json.loads(path.read_text())["heads"][0]["half_life"] == pytest.approx(list(dashboard.heads[0].half_life), rel=WRITTEN)
    mine = tmp_path / "mine.json"
    mine.write_text('{"schema": "something else"}')
    with pytest.raises(FileExistsError, match="not a dashboard export"):
        dashboard.export_json(mine)
    assert mine.read_text() == '{"schema": "something else"}'
    victim = tmp_path / "victim.json"
    victim.write_text("mine")
    (tmp_path / "link.json").symlink_to(victim)
    with pytest.raises(FileExistsError, match="symbolic link"):
        dashboard.export_json(tmp_path / "link.json")
    assert victim.read_text() == "mine"


def test_an_sae_on_a_site_the_model_lacks_is_refused_before_any_forward_pass(tmp_path):
    model = random_tiny_model()
    forwards = []
    model.add_hook("hook_embed", lambda x, hook: forwards.append(1))
    attention_layer = model.cfg.attention_layers[0]
    sae = BilinearMatrixSAE(d_k=12, d_v=8, n_features=4, k=1, heads=0, n_heads=4,
                            site=site_name(attention_layer, "state"))
    with pytest.raises(ValueError, match=f"does not exist on .*{site_name(attention_layer, 'state')}"):
        build_dashboard(model, sae, torch.zeros(1, 4, dtype=torch.long), progress=False)
    assert forwards == []


def test_the_command_refuses_such_an_sae_before_writing_anything(tmp_path, tiny_checkpoint, capsys):
    sae = BilinearMatrixSAE(d_k=12, d_v=8, n_features=4, k=1, heads=0, n_heads=4, site="blocks.3.linear_attn.hook_write_value")
    sae.save(tmp_path / "sae")
    with pytest.raises(SystemExit) as exit:
        cli_main(["dashboard", str(tmp_path / "sae"), "--model", str(tiny_checkpoint()), "--out", str(tmp_path / "site")])
    assert exit.value.code == 2
    assert "blocks.3.linear_attn.hook_write_value" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()


def test_the_site_does_not_replace_files_it_did_not_create(built, tmp_path):
    dashboard = built[4]
    (tmp_path / "index.html").write_text("mine")
    with pytest.raises(FileExistsError, match="index.html"):
        write_site(dashboard, tmp_path, progress=False)
    assert (tmp_path / "index.html").read_text() == "mine"


def _site_files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_link_planted_in_the_site_is_refused_never_written_through(built, tmp_path):
    dashboard, site = built[4], tmp_path / "site"
    shutil.copytree(built[5], site)
    before = _site_files(site)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    card = dashboard.features[0]
    page = site / feature_page_name(card.head, card.feature)
    page.unlink()
    page.symlink_to(victim)
    with pytest.raises(FileExistsError, match=f"{re.escape(str(page))} is a symbolic link"):
        write_site(dashboard, site, progress=False)
    assert victim.read_text() == "mine" and page.is_symlink()  # neither followed nor replaced
    assert _site_files(site) == before | {str(page.relative_to(site)): b"mine"}  # no other page rewritten
    elsewhere = tmp_path / "elsewhere"  # nor through a features/ that is a link to a folder elsewhere
    (site / "features").rename(elsewhere)
    (site / "features").symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match=f"{re.escape(str(site / 'features'))} is a symbolic link"):
        write_site(dashboard, site, progress=False)
    assert victim.read_text() == "mine" and not any(path.name.startswith(".") for path in elsewhere.iterdir())


_HOLD_THE_LOCK = """
import sys
from writesae.outputs import output_lock
with output_lock(sys.argv[1], "writesae dashboard"):
    print("locked", flush=True)
    sys.stdin.read()  # until killed
"""


def test_a_second_run_on_the_site_is_refused_and_a_killed_runs_lock_is_not_in_the_way(built, tmp_path):
    dashboard, site = built[4], tmp_path / "site"
    shutil.copytree(built[5], site)
    before = _site_files(site)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, str(site)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(BlockingIOError, match=rf"{re.escape(str(site))} \(writesae dashboard\) is in use by "
                                                  rf"another process \(pid {holder.pid}, lock file"):
            write_site(dashboard, site, progress=False)
        assert _site_files(site) == before | {".writesae.lock": f"{holder.pid}\n".encode()}
    finally:
        holder.kill()  # SIGKILL: its lock file stays, naming a dead process, and its flock goes with it
        holder.wait()
    assert (site / ".writesae.lock").exists()
    write_site(dashboard, site, progress=False)
    assert _site_files(site) == before


def test_a_write_that_fails_half_way_leaves_every_page_whole(built, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes writes fail part-way, as a full disk does: each page is
    then the old one or absent, never a truncated one, and no temporary is left."""
    dashboard, site = built[4], tmp_path / "site"
    shutil.copytree(built[5], site)
    before = _site_files(site)
    for path in site.rglob("*.html"):
        path.write_bytes(path.read_bytes() + b"<!-- old -->")  # so that a replaced page shows
    old = _site_files(site)
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, limits[1]))  # every page is larger than this
    try:
        with pytest.raises(OSError):
            write_site(dashboard, site, progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert _site_files(site) == old and min(len(page) for name, page in before.items() if name.endswith(".html")) > 2000
    assert not [path for path in site.rglob(".*") if path.name != ".writesae.lock"] and not (site / ".writesae.lock").exists()
    write_site(dashboard, site, progress=False)
    assert _site_files(site) == before


@pytest.mark.parametrize("family", ["gdn", "mamba2"])
def test_direct_effect_is_the_mixers_own_derivative_by_central_differences(family):
    """The value side's Δr: checked against the real forward, with the read moved by ±ε Δo at one head
    and position (Mamba-2's norm mixes the heads of a group, and adds its D skip before the norm)."""
    from hooked_gdn.mamba2 import HookedMamba2
    from writesae.dashboard import _direct_output_change

    model = random_tiny_model() if family == "gdn" else HookedMamba2.from_pretrained("mamba2-austen")
    layer = model.cfg.gdn_layers[-1]
    mixer = model.blocks[layer].linear_attn
    name = lambda short: f"blocks.{layer}.linear_attn.hook_{short}"
    tokens = torch.randint(1, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[name("recurrence_out"), *map(name, mixer.OUTPUT_INPUTS)])
    o = cache[name("recurrence_out")][0].float()
    rows, heads = torch.tensor([3, 7, 7]), torch.tensor([0, 1, model.cfg.n_value_heads - 1])
    delta = torch.randn(3, model.cfg.d_value, generator=torch.Generator().manual_seed(1)) * o.abs().mean()
    ours = _direct_output_change(mixer, o, {s: cache[name(s)][0] for s in mixer.OUTPUT_INPUTS}, rows, heads, delta)

    def mixer_out(row: int, head: int, shift: torch.Tensor) -> torch.Tensor:
        def move(read, hook):
            read = read.clone()
            read[0, row, head] += shift.to(read.dtype)
            return read
        seen = {}
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(name("recurrence_out"), move),
                                                    (name("out"), lambda x, hook: seen.__setitem__("out", x[0, row].float()))])
        return seen["out"]

    eps = 1e-2
    for j in range(3):
        expected = (mixer_out(rows[j], heads[j], eps * delta[j]) - mixer_out(rows[j], heads[j], -eps * delta[j])) / (2 * eps)
        assert (ours[j] - expected).norm() <= 1e-3 * expected.norm(), (family, j)


def test_control_characters_from_the_corpus_never_reach_a_page_raw():
    from writesae import dashboard_html

    shown = dashboard_html._show("a\x00b\x07c\x1b\x7f\x85<d>\n\t")
    assert shown == "a␀b␇c␛␡&lt;U+0085&gt;&lt;d&gt;⏎→"
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in shown)
    assert dashboard_html.escape('x"\x00') == "x&quot;␀" and dashboard_html.escape('"', quote=False) == '"'
