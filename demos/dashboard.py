"""The feature dashboard of an SAE (by default the shipped ``gdn-austen/L5-state``), and the README's
screenshot of one feature page.

    python -m demos.dashboard     # site in demo-out/dashboard/, screenshot demos/results/dashboard/feature.png

Builds the same site as ``writesae dashboard SAE --out demo-out/dashboard`` (the shipped model's
held-out chapters, 32 windows of 128 tokens, every feature), then photographs one feature page with
headless Chromium: among the features that fire on at least 1% of positions, the one whose ablation
moves the prediction most (largest carried KL). ``--sae quickstart-out/sae`` uses the quickstart's
SAE instead (trained first when it does not exist). Needs ``chromium`` on the PATH for the screenshot.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

from demos.common import demo_parser, heldout_passages, load_model_and_sae
from writesae.dashboard import build_dashboard
from writesae.dashboard_html import feature_page_name, write_site

SCREENSHOT = Path("demos/results/dashboard/feature.png")
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
    model, sae = load_model_and_sae(args.sae)
    windows = heldout_passages(model, args.passages, args.context)  # the held-out contexts `writesae dashboard` reads
    dashboard = build_dashboard(model, sae, windows)
    index = write_site(dashboard, args.out)
    frequent = [card for card in dashboard.features if card.frequency >= MIN_FREQUENCY and card.kl_carried is not None]
    shown = max(frequent, key=lambda card: (card.kl_carried, -card.head, -card.feature))
    screenshot(args.out / feature_page_name(shown.head, shown.feature), args.screenshot)
    print(f"wrote {index}; head {shown.head}, feature {shown.feature} (frequency {shown.frequency:.3f}, "
          f"carried KL {shown.kl_carried:.4f}) photographed into {args.screenshot}")


if __name__ == "__main__":
    main()
