"""Soak: does the manager's cost per evaluation stay flat over a long run?

Every optimizer runs 5,000 evaluations with a fitness that scores at once (the genome's
distance to a point), so all the time measured is the manager's own: decode the genome, commit
the result to the run store, ask and tell the optimizer, checkpoint after every tell. Two
spaces: 16 genes (TIES weight and density per expert over four layer groups) and 2,024 genes
(a data-flow space over two 22-layer models with full scaling), where the full CMA-ES and TPE
are left out (a 2,024 x 2,024 covariance learns too slowly to be used there; TPE's sampler
does not scale to thousands of parameters) and Sep-CMA-ES runs instead.

Reported per run: manager milliseconds per evaluation over the first 100 evaluations and over
the last 100, their ratio (target: at most 1.5), the split of the last 100 between optimizer
(ask + tell), store commit and checkpoint, the store's size on disk, and how long
`evomerge status` takes on the finished run.

    python benchmarks/soak.py [--evals 5000] [--out results/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evomerge.cli import main as cli  # noqa: E402
from evomerge.config import RunConfig  # noqa: E402
from evomerge.search.loop import SearchLoop  # noqa: E402
from evomerge.search.run import create_run  # noqa: E402
from evomerge.workers.evaluator import Outcome  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from instant_pool import InstantPool  # noqa: E402

WINDOW = 100
SMALL = {  # 16 genes
    "kind": "parameter",
    "method": "ties",
    "layer_groups": 4,
    "parameters": {
        "weight": {"low": 0.0, "high": 1.0, "init": 0.5},
        "density": {"low": 0.1, "high": 1.0, "init": 0.5},
    },
}
MAP_SPACE = {  # MAP fits quadratics in the merge coefficients: 8 (at most 12) genes
    "kind": "parameter",
    "method": "task_arithmetic",
    "layer_groups": 4,
    "parameters": {"weight": {"low": 0.0, "high": 1.0, "init": 0.5}},
}
LARGE = {"kind": "dataflow", "models": ["a", "b"], "scaling": "full"}  # 2 x 22 layers: 2,024
OPTIMIZERS = {
    "small": {
        "random": {},
        "cma": {},
        "sep_cma": {},
        "nsga2": {"population_size": 16},
        "tpe": {},
        "m2n2": {},
        "map": {},
    },
    "large": {
        "random": {},
        "sep_cma": {},
        "m2n2": {},
        "nsga2": {"population_size": 16},
    },
}
# Optuna copies a trial's parameter dict for every parameter it sets, so one NSGA-II ask over
# 2,024 genes costs O(genes^2): that run is shorter (its per-evaluation cost is still compared
# between its first and last 100)
# MAP refits its surrogates on every evaluation so far and runs a surrogate NSGA-II each round
# of 8 proposals: a method for budgets of hundreds, soaked over 1,000
SHORT = {("large", "nsga2"): 600, ("small", "map"): 1000}


def distance(genome: np.ndarray) -> Outcome:
    """The genome's distance to a point: a fitness that costs nothing."""
    value = float(np.mean((genome - 0.3) ** 2))
    return Outcome(metrics={"loss": value}, per_example=[1.0 - value, -value])


class Timers:
    """Seconds spent in named calls, with when each call ended."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def wrap(self, owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.calls[label].append((end, end - start))

        setattr(owner, name, timed)

    def since(self, label: str, moment: float) -> float:
        return sum(spent for end, spent in self.calls[label] if end > moment)


def run_config(models: dict, space: dict, optimizer: str, options: dict, evals: int) -> dict:
    return {
        "models": {"base": str(models["base"]), "a": str(models["ft0"]), "b": str(models["ft1"])},
        "base_model": "base",
        "search_space": space,
        "objectives": [{"name": "loss", "metric": "loss", "direction": "minimize"}],
        "optimizer": {"name": optimizer, "options": options},
        "budget": evals,
        "seed": 0,
        "fitness": {"function": "tests.fitness_fns:score"},
        "device": "cpu",
        "pool": "local",
        "score_sources": False,
    }


def soak(config: dict, folder: Path) -> dict:
    run = create_run(RunConfig.from_dict(config), folder)
    pool = InstantPool(distance)
    loop = SearchLoop(run, pool, progress=False)
    timers = Timers()
    timers.wrap(loop, "commit", "evaluation")  # every committed evaluation, reused ones too
    timers.wrap(loop.optimizer, "ask", "ask")
    timers.wrap(loop.optimizer, "tell", "tell")
    timers.wrap(loop.store, "commit", "commit")
    timers.wrap(loop.store, "save_checkpoint", "checkpoint")
    start = time.perf_counter()
    loop.run_to_budget()
    wall = time.perf_counter() - start
    stamps = np.array([start, *(end for end, _ in timers.calls["evaluation"])])
    per_eval = np.diff(stamps)
    first, last = per_eval[:WINDOW].mean(), per_eval[-WINDOW:].mean()
    window_start = stamps[-WINDOW - 1]

    def last_ms(*labels: str) -> float:  # per evaluation, over the last window
        return 1000 * sum(timers.since(label, window_start) for label in labels) / WINDOW

    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    status_start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(["status", str(folder)]) == 0
    status_s = time.perf_counter() - status_start
    return {
        "evaluations": len(per_eval),
        "scored": len(pool.returned),  # the rest were identical recipes, told from the store
        "wall_s": round(wall, 1),
        "first_ms": round(1000 * first, 2),
        "last_ms": round(1000 * last, 2),
        "ratio": round(last / first, 2),
        "optimizer_ms": round(last_ms("ask", "tell"), 2),
        "commit_ms": round(last_ms("commit"), 2),
        "checkpoint_ms": round(last_ms("checkpoint"), 2),
        "store_mb": round(size / 2**20, 1),
        "status_s": round(status_s, 2),
    }


def table(rows: list[dict]) -> str:
    lines = [
        f"| space | optimizer | evaluations | ms/eval, first {WINDOW} | ms/eval, last {WINDOW} "
        "| ratio | last: optimizer / commit / checkpoint (ms) | store (MB) | `status` (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['space']} | {r['optimizer']} | {r['evaluations']:,} | {r['first_ms']:.1f} | "
            f"{r['last_ms']:.1f} | "
            f"{r['ratio']:.2f}x | {r['optimizer_ms']:.1f} / {r['commit_ms']:.1f} / "
            f"{r['checkpoint_ms']:.1f} | {r['store_mb']:.1f} | {r['status_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=5000)
    parser.add_argument("--only", nargs="*", help="optimizer names to run (default: all)")
    parser.add_argument(
        "--spaces", nargs="*", default=["small", "large"], choices=["small", "large"]
    )
    parser.add_argument(
        "--append", action="store_true", help="keep the other rows of an earlier soak.json"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    from tests.family import make_family

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        small = make_family(
            tmp / "small", "llama", n_finetunes=2, seed=0, hidden=16, heads=2, kv_heads=1
        )
        large = make_family(
            tmp / "large", "llama", n_finetunes=2, seed=0, hidden=16, heads=2, kv_heads=1, layers=22
        )
        spaces = {"small": ("16 genes", small, SMALL), "large": ("2,024 genes", large, LARGE)}
        for key in args.spaces:
            space_name, models, space = spaces[key]
            for name, options in OPTIMIZERS[key].items():
                if args.only and name not in args.only:
                    continue
                folder = tmp / f"{key}-{name}"
                evals = min(args.evals, SHORT.get((key, name), args.evals))
                label, searched = ("8 genes", MAP_SPACE) if name == "map" else (space_name, space)
                row = {"space": label, "optimizer": name}
                row.update(soak(run_config(models, searched, name, options, evals), folder))
                rows.append(row)
                print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.append and (args.out / "soak.json").exists():
        mine = {(r["space"], r["optimizer"]) for r in rows}
        earlier = json.loads((args.out / "soak.json").read_text())
        rows = [r for r in earlier if (r["space"], r["optimizer"]) not in mine] + rows
    (args.out / "soak.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "soak.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
