"""Screenshots of the documentation site, for the README (needs Debian's `chromium` and the `docs` extra).

Builds the site strictly into a temporary folder (or takes a built one), serves it on 127.0.0.1 with Python's
http.server, opens three pages in headless Chromium, saves PNGs into docs/screenshots/, and stops the server.

    python scripts/screenshot_docs.py                 # mkdocs build --strict, then docs/screenshots/*.png
    python scripts/screenshot_docs.py --site site     # an already built site
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshot_tensorboard import find_browser, free_port, serve_and_shoot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# page path on the site -> PNG name: the landing page, a guide, the API reference
PAGES = {
    "": "docs_home.png",
    "guides/measure/": "docs_guide_measure.png",
    "api/": "docs_api.png",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", help="a built site to serve (default: build one with `mkdocs build --strict`)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"), help="folder for the PNGs")
    args = parser.parse_args()
    browser = find_browser()
    with tempfile.TemporaryDirectory() as scratch:
        site = args.site
        if site is None:
            site = str(Path(scratch) / "site")
            subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", site], cwd=ROOT,
                           check=True)
        port = free_port()
        command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", site]
        serve_and_shoot(command, port, "index.html", PAGES, Path(args.out), browser, scratch)


if __name__ == "__main__":
    main()
