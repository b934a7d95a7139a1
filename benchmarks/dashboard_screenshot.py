"""A screenshot of optuna-dashboard showing a run's store, taken in headless Chromium: what a
user sees when they point the dashboard at a run folder (SQLite or PostgreSQL store alike).

    python benchmarks/dashboard_screenshot.py results/demo/ps [--out PNG]

Needs `optuna-dashboard` (pip) and a Chromium binary (`chromium`, Debian's package).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.results.store import RunStore, read_run_meta  # noqa: E402


def store_url(folder: Path) -> str:
    store = read_run_meta(folder)["store"]
    return (
        f"sqlite:///{(folder / 'store.sqlite').resolve()}" if store.startswith("sqlite:") else store
    )


def wait_for(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"optuna-dashboard did not answer at {url}") from None
            time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/assets/optuna_dashboard.png")
    parser.add_argument("--port", type=int, default=8089)
    args = parser.parse_args()
    dashboard = shutil.which("optuna-dashboard") or str(
        Path(sys.executable).parent / "optuna-dashboard"
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium binary: apt-get install chromium")
    study_id = RunStore.open(args.run).study._study_id
    server = subprocess.Popen(
        [dashboard, store_url(args.run), "--port", str(args.port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{args.port}"
        wait_for(f"{base}/api/studies")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1400,1000",
                "--virtual-time-budget=15000",
                f"--screenshot={args.out.resolve()}",
                f"{base}/dashboard/studies/{study_id}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
    finally:
        server.terminate()
        server.wait()
    print(args.out)


if __name__ == "__main__":
    main()
