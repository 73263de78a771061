"""The dashboard's pages in headless Chromium, driven by selenium: the index sorts and filters, a feature
page draws its histograms, hovering a token shows its tooltip with the numbers the page carries, a feature
page's link to a memory view lands on it, and no page logs a JavaScript error. Skipped, with the reason,
where selenium, Chromium or chromedriver is missing (the ``browser`` extra; Debian's ``chromium`` and ``chromium-driver``)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from writesae.dashboard_html import feature_page_name, memory_page_name

from .test_dashboard import built_fixture, page_vocabulary  # noqa: F401  (the `built` fixture: a dashboard of a tiny model, its site)


def _browser():
    """A headless Chromium driven by selenium, or a skip naming what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[browser]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Chromium and chromedriver on the PATH (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(name="browser", scope="module")
def browser_fixture():
    browser = _browser()
    yield browser
    browser.quit()


def _numbers(text: str) -> list[float]:
    """The signed numbers (+0.0123, -1.5e-05) written in a tooltip line."""
    return [float(x) for x in re.findall(r"(?<!\S)[+-][0-9.]+(?:e[+-]?[0-9]+)?", text)]


def _errors(browser) -> list[dict]:
    """The console's errors since the last call (reading the log empties it)."""
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_index_sorts_and_filters_without_console_errors(built, browser):
    from selenium.webdriver.common.by import By

    kind, model, sae, windows, dashboard, out = built
    browser.get((out / "index.html").resolve().as_uri())
    rows = lambda: [r for r in browser.find_elements(By.CSS_SELECTOR, "#features tbody tr") if r.is_displayed()]
    assert len(rows()) == sae.n_dicts * sae.cfg.n_features
    browser.find_elements(By.CSS_SELECTOR, "#features th.sortable")[2].click()  # frequency, descending
    frequencies = [float(r.find_elements(By.TAG_NAME, "td")[2].get_attribute("data-value")) for r in rows()]
    assert frequencies == sorted(frequencies, reverse=True)
    head = str(sae.cfg.head_indices[1])
    browser.find_element(By.CSS_SELECTOR, f"#head-filter option[value='{head}']").click()
    assert {r.get_attribute("data-head") for r in rows()} == {head}
    assert _errors(browser) == []


def test_a_feature_page_draws_and_its_token_tooltip_shows_the_hover_numbers(built, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    kind, model, sae, windows, dashboard, out = built
    card = max(dashboard.features, key=lambda c: c.n_firings)
    browser.get((out / feature_page_name(card.head, card.feature)).resolve().as_uri())
    for chart in ("svg.hist rect.bin", "svg.logit-hist rect.logit-bin"):
        bars = browser.find_elements(By.CSS_SELECTOR, chart)
        assert bars and max(b.size["height"] for b in bars) > 10, chart
    assert browser.find_element(By.CSS_SELECTOR, ".context .tok.fire").is_displayed()
    tooltip = browser.find_element(By.ID, "tooltip")
    assert not tooltip.is_displayed()

    vocabulary = page_vocabulary(out / feature_page_name(card.head, card.feature))
    token = next(span for span in browser.find_elements(By.CSS_SELECTOR, ".context[data-section='top'] .tok[data-promoted]")
                 if span.get_attribute("data-loss") != "NaN")  # one whose loss change was computed
    ActionChains(browser).move_to_element(token).perform()
    WebDriverWait(browser, 5).until(lambda _: tooltip.is_displayed())
    lines = dict(line.split(" ", 1) if not line.startswith("loss") else ("loss", line) for line in tooltip.text.split("\n"))
    assert list(lines) == ["activation", "loss", "promoted", "suppressed"]
    assert float(lines["activation"]) == pytest.approx(float(token.get_attribute("data-act")), rel=5e-3)
    assert lines["loss"].endswith(" nats")
    assert _numbers(lines["loss"]) == pytest.approx([float(token.get_attribute("data-loss"))], rel=5e-3)
    for kind in ("promoted", "suppressed"):
        effects = json.loads(token.get_attribute(f"data-{kind}"))  # [token id, Δlogit] pairs
        assert all(vocabulary[str(entry[0])] in lines[kind] for entry in effects)
        assert _numbers(lines[kind]) == pytest.approx([entry[1] for entry in effects], rel=5e-3)
    below = tooltip.location["y"] >= token.location["y"] + token.size["height"] - 1
    assert below  # placed under the hovered token

    quiet = browser.find_elements(By.CSS_SELECTOR, ".context[data-section='top'] .tok:not([data-promoted])")
    if quiet:  # a token where the feature is silent: its activation only
        ActionChains(browser).move_to_element(quiet[0]).perform()
        WebDriverWait(browser, 5).until(lambda _: "loss change" not in tooltip.text)
        assert tooltip.text.startswith("activation")
    ActionChains(browser).move_by_offset(0, 0).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    WebDriverWait(browser, 5).until(lambda _: not tooltip.is_displayed())
    assert _errors(browser) == []


def test_a_feature_pages_retrieval_link_opens_its_memory_view(built, browser):
    """A write SAE's feature page links the memory views that retrieve it; the link lands on that view of the
    head's memory page, whose table shows; a state SAE's index says in one line why there is none."""
    from selenium.webdriver.common.by import By

    kind, model, sae, windows, dashboard, out = built
    browser.get((out / "index.html").resolve().as_uri())
    note = browser.find_element(By.ID, "memory-note")
    if kind == "state":
        assert note.is_displayed() and note.text.startswith("No memory view") and "write SAE" in note.text
        assert browser.find_elements(By.CSS_SELECTOR, "a.memory-link") == []
        return
    card = max(dashboard.features, key=lambda c: len(c.retrieved_in))
    assert card.retrieved_in
    browser.get((out / feature_page_name(card.head, card.feature)).resolve().as_uri())
    link = browser.find_element(By.CSS_SELECTOR, "tr.retrieval a")
    link.click()
    view = card.retrieved_in[0].view
    assert browser.current_url.endswith(f"{memory_page_name(card.head).split('/')[1]}#view-{view}")
    shown = browser.find_element(By.ID, f"view-{view}")
    rows = shown.find_elements(By.CSS_SELECTOR, "tr.memory-term")
    assert shown.is_displayed() and rows and all(row.is_displayed() for row in rows)
    assert len(shown.find_elements(By.CSS_SELECTOR, "tr.memory-rest")) == 4
    assert _errors(browser) == []
