"""The feature dashboard of an SAE (by default the shipped ``gdn-austen/L5-state``), and the README's
screenshot of one feature page.

    python -m demos.dashboard     # site in demo-out/dashboard/; demos/results/dashboard/{feature.png, results.json}

Builds the same site as ``writesae dashboard SAE --out demo-out/dashboard`` (the shipped model's
held-out chapters, 32 windows of 128 tokens, every feature), then photographs one feature page with
headless Chromium: among the features that fire on at least 1% of positions, the one whose ablation
moves the prediction most (largest carried KL). results.json records that feature's numbers (its
quantile groups, correlated features and the hover of its top context's firing token among them), the
site's size and the wall time, with provenance. ``--sae quickstart-out/sae`` uses the quickstart's
SAE instead (trained first when it does not exist). Needs ``chromium`` on the PATH for the screenshot.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

from demos.common import (demo_parser, heldout_passages, load_model_and_sae, memory_groups, provenance, sae_layer,
                          wall_time, write_json)
from writesae.dashboard import build_dashboard
from writesae.dashboard_html import feature_page_name, write_site

SCREENSHOT = Path("demos/results/dashboard/feature.png")
RESULTS = Path("demos/results/dashboard/results.json")
MIN_FREQUENCY = 0.01


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1000) -> None:
    """A PNG of ``page`` as headless Chromium draws it at ``width`` × ``height`` pixels."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("the screenshot needs Chromium (e.g. apt-get install chromium); the site itself is written")
    png.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
                    f"--screenshot={png.resolve()}", page.resolve().as_uri()], check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = demo_parser(__doc__, "demo-out/dashboard")
    parser.set_defaults(passages=32, context=128)
    parser.add_argument("--screenshot", type=Path, default=SCREENSHOT)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    model, sae = load_model_and_sae(args.sae)
    windows = heldout_passages(model, args.passages, args.context)  # the held-out contexts `writesae dashboard` reads
    dashboard = build_dashboard(model, sae, windows, seed=args.seed)
    index = write_site(dashboard, args.out)
    seconds = round(time.time() - start)
    frequent = [card for card in dashboard.features if card.frequency >= MIN_FREQUENCY and card.kl_carried is not None]
    shown = max(frequent, key=lambda card: (card.kl_carried, -card.head, -card.feature))
    screenshot(args.out / feature_page_name(shown.head, shown.feature), args.screenshot)
    first = shown.top_contexts[0]
    outlined = first.position - first.start
    site_bytes = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    write_json(RESULTS, {
        "provenance": provenance(args.seed, sae=args.sae, passages=args.passages, context=args.context),
        "settings": "build_dashboard's defaults (docs: writesae/dashboard.py)",
        "n_cards": len(dashboard.features),
        "site_megabytes": round(site_bytes / 1e6, 1),
        "json_megabytes": round((args.out / "dashboard.json").stat().st_size / 1e6, 1),
        "shown": {
            "head": shown.head, "feature": shown.feature, "frequency": shown.frequency, "kl_next": shown.kl_next,
            "kl_carried": shown.kl_carried, "n_ablated": shown.n_ablated, "horizon": dashboard.horizon,
            "half_life": next(card.half_life[1] for card in dashboard.heads if card.head == shown.head),
            "decay": memory_groups(sae_layer(sae), [shown.head])["decay"][shown.head],
            "promoted": [asdict(effect) for effect in shown.logits_promoted[:3]],
            "quantile_edges": [group.low for group in shown.quantile_groups] + [shown.quantile_groups[-1].high],
            "quantile_counts": [group.n_firings for group in shown.quantile_groups],
            "co_firing_jaccard": [asdict(related) for related in shown.co_firing],
            "atom_cosine": [asdict(related) for related in shown.atom_cosine],
            "top_context_token": {"text": first.tokens[outlined], "activation": first.activation,
                                  "hover": asdict(first.hovers[outlined])},
        },
        "seconds": seconds,
    })
    print(f"wrote {index}; head {shown.head}, feature {shown.feature} (frequency {shown.frequency:.3f}, "
          f"carried KL {shown.kl_carried:.4f}) photographed into {args.screenshot}")


def readme_block(results: dict) -> str:
    """The README's paragraph on the demo's run; every number from ``results``."""
    s, hover = results["shown"], results["shown"]["top_context_token"]["hover"]
    top, jaccard, cosine = s["promoted"][0], s["co_firing_jaccard"][0], s["atom_cosine"][0]
    return (
        f"Made by `python -m demos.dashboard` (the shipped `{results['provenance']['sae']}`, {results['n_cards']} features "
        f"on {results['provenance']['inputs']['passages']} held-out windows of {results['provenance']['inputs']['context']} "
        f"tokens; {wall_time(results)}; `--sae quickstart-out/sae` for the quickstart's): the site in `demo-out/dashboard/` "
        f"({results['site_megabytes']:.0f} MB, of which `dashboard.json` is {results['json_megabytes']:.0f} MB; every number "
        f"written to 4 significant digits), and this screenshot, taken by headless Chromium, of the page of the feature "
        f"with the largest carried KL among those firing on at least {100 * MIN_FREQUENCY:.0f}% of positions: head "
        f"{s['head']}'s feature {s['feature']}. Its read promotes `{top['token']}` ({top['logit_change']:+.3f} on the "
        f"logits); removing it at its top {s['n_ablated']} firings costs {s['kl_carried']:.2f} nats of KL over "
        f"{s['horizon']} positions; head {s['head']} has a {s['decay']} decay with a {s['half_life']:.3g}-token median "
        f"half-life. Its quantile groups split its firings at codes "
        f"{' / '.join(f'{edge:.2g}' for edge in s['quantile_edges'])}; it co-fires most with head {jaccard['head']}'s "
        f"feature {jaccard['feature']} (Jaccard {jaccard['score']:.2f}), and its atom is closest to head "
        f"{cosine['head']}'s feature {cosine['feature']} (cosine {cosine['score']:.2f}). Removing it at the outlined "
        f"token of its top context changes the next token's loss by {hover['loss_change']:+.3f} nats.\n")


if __name__ == "__main__":
    main()
