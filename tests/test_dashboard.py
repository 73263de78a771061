"""The feature dashboard: the numbers its HTML shows, read back with html.parser, against the library's
own computations on a tiny random model (a state SAE and a write SAE on subsets of the heads, so a
dictionary index is not its head); the refusal of an SAE whose site the model lacks; and, where
Chromium is installed, the pages in a headless browser."""

from __future__ import annotations

import math
import re
import resource
import shutil
import signal
import subprocess
import sys
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
from writesae.dashboard import build_dashboard
from writesae.dashboard_html import feature_page_name, write_site
from writesae.experiments.edits import kl_from_clean
from writesae.experiments.logit_shift import state_edit_hook

from .conftest import random_tiny_model

LAYER, HORIZON, BINS = 1, 6, 12


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
    assert half_lives == pytest.approx(expected, rel=1e-6)
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
        assert value["frequency"] == pytest.approx(int((a > 0).sum()) / a.numel(), abs=1e-12)
        active = a[a > 0]
        mean = float(active.mean()) if len(active) else 0.0
        assert value["mean_activation"] == pytest.approx(mean, rel=1e-5)
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

    contexts = _groups(tags, lambda t, at: _has_class(at, "context"), lambda t, at: _has_class(at, "tok"))
    assert contexts
    shown = [float(c["data-activation"]) for c, _ in contexts]
    assert shown == sorted(shown, reverse=True)
    assert shown[0] == pytest.approx(float(a.max()), rel=1e-6)
    for context, spans in contexts:
        w, t = int(context["data-window"]), int(context["data-position"])
        assert float(context["data-activation"]) == pytest.approx(float(a[w, t]), rel=1e-6)
        fire = [j for j, s in enumerate(spans) if _has_class(s, "fire")]
        assert len(fire) == 1
        start = t - fire[0]
        assert [float(s["data-act"]) for s in spans] == pytest.approx(a[w, start : start + len(spans)].tolist(), rel=1e-6)


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
        assert [float(r["data-alignment"]) for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)
        for r in rows:
            assert float(alignment[int(r["data-window"]), int(r["data-position"])]) == pytest.approx(float(r["data-alignment"]), abs=1e-5)


def test_value_side_is_the_read_change_through_the_gated_norm_w_o_and_unembedding(built):
    """Independently of the closed form the library uses: the gated norm's JVP by autograd, W_o on
    the whole concatenation of heads, and tokens_to_residual_directions over the frozen final scale."""
    kind, model, sae, windows, dashboard, out = built
    codes, cache, names = _codes_and_cache(model, sae, windows, kind)
    gdn = model.blocks[LAYER].linear_attn
    d = 1
    head, feature = sae.cfg.head_indices[d], _most_frequent(codes, d)
    atom = sae.atoms()[d, feature].detach()
    directions = model.tokens_to_residual_directions(torch.arange(model.cfg.d_vocab)).detach()  # [V, d_model]
    total = torch.zeros(model.cfg.d_vocab)
    firings = (codes[..., d, feature] > 0).nonzero().tolist()
    for w, t in firings:
        a = codes[w, t, d, feature]
        delta_o = a / sae.cfg.input_scale * (atom.T @ cache[names[2]][w, t, head])  # (a/s) Aᵀ q̂
        o, z = cache[names[3]][w, t, head], cache[names[4]][w, t, head]
        _, delta_y = torch.func.jvp(lambda x: gdn.norm(x, z), (o,), (delta_o.detach(),))
        y = torch.zeros(model.cfg.n_value_heads, model.cfg.d_value)
        y[head] = delta_y
        delta_r = F.linear(y.flatten(), gdn.W_o)
        total += directions @ delta_r / cache["ln_final.hook_scale"][w, t, 0]
    mean = (total / len(firings)).detach()

    tables = _groups(_tags(out / feature_page_name(head, feature)), lambda t, a: t == "table" and _has_class(a, "logits"),
                     lambda t, a: t == "tr" and _has_class(a, "logit"))
    assert [table["data-kind"] for table, _ in tables] == ["promoted", "suppressed"]
    for (table, rows), largest in zip(tables, (True, False)):
        expected = mean.topk(len(rows), largest=largest)
        assert [int(r["data-token-id"]) for r in rows] == expected.indices.tolist()
        assert [float(r["data-value"]) for r in rows] == pytest.approx(expected.values.tolist(), rel=1e-4, abs=1e-9)


def test_carried_kl_is_the_state_edit_removing_the_feature_at_its_shown_firings(built):
    """Against logit_shift's state-edit hook on the full window (the library cuts windows after the horizon)."""
    kind, model, sae, windows, dashboard, out = built
    codes, _, _ = _codes_and_cache(model, sae, windows, kind)
    d = 0
    head, feature = sae.cfg.head_indices[d], _most_frequent(codes, d)
    tags = _tags(out / feature_page_name(head, feature))
    stats = {a["data-stat"]: float(a["data-value"]) for tag, a in tags if "data-stat" in a}
    contexts = [a for tag, a in tags if _has_class(a, "context")][:2]  # ablation_firings=2
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


def _browser():
    """A headless Chromium driven by selenium, or a skip naming what is missing (both are optional: the
    ``browser`` extra and Debian's chromium and chromium-driver)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[browser]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_pages_render_in_headless_chromium_without_console_errors(built):
    """Extra, where Chromium is installed: the index sorts and filters, and a feature page draws."""
    browser = _browser()  # skips before anything imports selenium
    from selenium.webdriver.common.by import By

    kind, model, sae, windows, dashboard, out = built
    try:
        browser.get((out / "index.html").resolve().as_uri())
        rows = lambda: [r for r in browser.find_elements(By.CSS_SELECTOR, "#features tbody tr") if r.is_displayed()]
        assert len(rows()) == sae.n_dicts * sae.cfg.n_features
        browser.find_elements(By.CSS_SELECTOR, "#features th.sortable")[2].click()  # frequency, descending
        frequencies = [float(r.find_elements(By.TAG_NAME, "td")[2].get_attribute("data-value")) for r in rows()]
        assert frequencies == sorted(frequencies, reverse=True)
        head = str(sae.cfg.head_indices[1])
        browser.find_element(By.CSS_SELECTOR, f"#head-filter option[value='{head}']").click()
        assert {r.get_attribute("data-head") for r in rows()} == {head}
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]

        card = dashboard.features[0]
        browser.get((out / feature_page_name(card.head, card.feature)).resolve().as_uri())
        bars = browser.find_elements(By.CSS_SELECTOR, "svg.hist rect.bin")
        assert bars and max(b.size["height"] for b in bars) > 10
        assert browser.find_element(By.CSS_SELECTOR, ".context .tok.fire").is_displayed()
        errors += [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()


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
