"""Screenshots of the chaos charts as TensorBoard shows them, for the README (needs Debian's `chromium`).

Starts TensorBoard on 127.0.0.1 over a log directory (by default it first runs the quickstart into a temporary
one), opens its dashboards in headless Chromium, saves PNGs into docs/, and stops the server it started.

    python scripts/screenshot_tensorboard.py                      # quickstart logs -> docs/tensorboard_*.png
    python scripts/screenshot_tensorboard.py --logdir chaos_logs  # your own logs
"""

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = {"custom_scalars": "tensorboard_custom_scalars.png", "scalars": "tensorboard_scalars.png"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not answer at {url} within {timeout:.0f} s")


def screenshot(browser: str, url: str, png: Path, profile: str) -> None:
    subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1400,1000",
            "--virtual-time-budget=15000", url,
        ],
        check=True, capture_output=True, timeout=120,
    )


def find_browser() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt-get install chromium")
    return browser


def serve_and_shoot(server_command: list[str], port: int, ready_path: str, pages: dict[str, str], out: Path,
                    browser: str, scratch: str) -> None:
    """Start a server on 127.0.0.1:``port``, wait until ``ready_path`` answers, save each page (path → PNG name) into
    ``out``, and stop the server."""
    server = subprocess.Popen(server_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/{ready_path}")
        out.mkdir(parents=True, exist_ok=True)
        for page, name in pages.items():
            screenshot(browser, f"http://127.0.0.1:{port}/{page}", out / name, str(Path(scratch) / "chrome"))
            print(f"saved {out / name}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", help="log directory to show (default: run the quickstart into a temporary one)")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs")
    args = parser.parse_args()
    browser = find_browser()
    with tempfile.TemporaryDirectory() as scratch:
        logdir = args.logdir
        if logdir is None:
            logdir = str(Path(scratch) / "logs")
            subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--logdir", logdir], check=True)
        port = free_port()
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
                   "--port", str(port)]
        pages = {f"#{dashboard}": name for dashboard, name in DASHBOARDS.items()}
        serve_and_shoot(command, port, "data/runs", pages, Path(args.out), browser, scratch)


if __name__ == "__main__":
    main()
