"""Render a run's report in headless Chromium and save a screenshot, to check the page draws its
plots without a network. Makes a small local run first when no run folder is given.

    python benchmarks/report_render.py [RUN_FOLDER] [--out results/bench/report.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)


def small_run(tmp: Path) -> Path:
    from evomerge.cli import main
    from tests.family import make_family

    models = make_family(tmp / "models", "llama", n_finetunes=2, seed=0)
    config = {
        "models": {"base": str(models["base"]), "a": str(models["ft0"]), "b": str(models["ft1"])},
        "base_model": "base",
        "search_space": "search_spaces/ps_dare_ties.yaml",
        "objectives": [
            {"name": "nll", "metric": "nll", "direction": "minimize"},
            {"name": "spread", "metric": "logit_std"},
        ],
        "optimizer": {"name": "nsga2", "options": {"population_size": 8}},
        "budget": 40,
        "pool": "local",
        "device": "cpu",
        "fitness": {"function": "tests.fitness_fns:score"},
    }
    (tmp / "run.yaml").write_text(yaml.safe_dump(config))
    run = tmp / "run"
    if main(["run", str(tmp / "run.yaml"), "--out", str(run), "--quiet"]) != 0:
        raise SystemExit("the small run failed")
    main(["export", str(run), "--pareto", "--to", str(run / "exports"), "--quiet"])
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "report.png")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    from evomerge.results.report import write_report

    with tempfile.TemporaryDirectory() as tmp_name:
        run = args.run or small_run(Path(tmp_name))
        page = write_report(run)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1200,2400",
                "--virtual-time-budget=8000",
                f"--screenshot={args.out.resolve()}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(f"screenshot: {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
