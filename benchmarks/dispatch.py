"""Dispatcher scaling and manager overhead, measured in the same run.

1. Scaling: a fitness that sleeps a fixed time, through Ray workers (local cluster), with 1 and
   2 workers: evaluations per second, the speed-up, and worker idle time per candidate
   (workers x wall - time spent scoring, over candidates).
2. Overhead: the manager loop alone (decode, store commit, optimizer ask/tell, checkpoint after
   each) with a pool that scores instantly, per optimizer: evaluations per second.

    python benchmarks/dispatch.py [--sleep 0.5] [--evals 24] [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the workers import the sleeping fitness from tests/

from evomerge.config import RunConfig  # noqa: E402
from evomerge.results.store import RunStore  # noqa: E402
from evomerge.search.loop import drive  # noqa: E402
from evomerge.search.run import create_run  # noqa: E402
from evomerge.workers.evaluator import Outcome  # noqa: E402
from evomerge.workers.pool import make_pool  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from instant_pool import InstantPool  # noqa: E402


def config(models: dict, **changes) -> RunConfig:
    data = {
        "models": {"base": str(models["base"]), "a": str(models["ft0"]), "b": str(models["ft1"])},
        "base_model": "base",
        "search_space": "search_spaces/ps_ties.yaml",
        "objectives": [{"name": "nll", "metric": "nll", "direction": "minimize"}],
        "optimizer": {"name": "random"},
        "budget": 24,
        "fitness": {"function": "tests.fitness_fns:sleepy"},
        "device": "cpu",
        "threads_per_worker": 1,
        "score_sources": False,  # time the search loop only
    }
    data.update(changes)
    return RunConfig.from_dict(data)


def distance(genome: np.ndarray) -> Outcome:
    """Scores at once from the genome: only the manager's own work is timed."""
    value = float(np.sum((genome - 0.3) ** 2))
    return Outcome(metrics={"nll": value}, per_example=[1.0 - value])


def scaling(models, tmp: Path, sleep: float, evals: int) -> list[dict]:
    rows = []
    for workers in (1, 2):
        cfg = config(
            models,
            workers=workers,
            budget=evals,
            optimizer={"name": "random"},
            fitness={"function": "tests.fitness_fns:sleepy", "options": {"seconds": sleep}},
        )
        run = create_run(cfg, tmp / f"scaling{workers}")
        pool = make_pool(run.config)  # workers started and loaded before the clock starts
        start = time.perf_counter()
        drive(run, pool, progress=False)
        wall = time.perf_counter() - start
        scored = sum(r.seconds for r in RunStore.open(run.folder).records())
        rows.append(
            {
                "workers": workers,
                "evals": evals,
                "wall_s": wall,
                "evals_per_s": evals / wall,
                "idle_per_candidate_s": (workers * wall - scored) / evals,
            }
        )
    rows[1]["speedup"] = rows[1]["evals_per_s"] / rows[0]["evals_per_s"]
    return rows


def overhead(models, tmp: Path, evals: int) -> list[dict]:
    rows = []
    for name, options in (
        ("random", {}),
        ("cma", {}),
        ("sep_cma", {}),
        ("m2n2", {}),
        ("nsga2", {"population_size": 8}),
        ("tpe", {}),
    ):
        cfg = config(models, budget=evals, optimizer={"name": name, "options": options})
        run = create_run(cfg, tmp / f"overhead-{name}")
        start = time.perf_counter()
        drive(run, InstantPool(distance), progress=False)
        wall = time.perf_counter() - start
        rows.append(
            {
                "optimizer": name,
                "evals": evals,
                "evals_per_s": evals / wall,
                "ms_per_eval": 1000 * wall / evals,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sleep", type=float, default=0.5)
    parser.add_argument("--evals", type=int, default=24)
    parser.add_argument("--overhead-evals", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    from tests.family import make_family

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = make_family(tmp / "models", "llama", n_finetunes=2, seed=0)
        scale = scaling(models, tmp, args.sleep, args.evals)
        over = overhead(models, tmp, args.overhead_evals)
    lines = [
        f"Dispatcher scaling: fitness sleeps {args.sleep} s, {args.evals} evaluations, local Ray",
        "",
        "| workers | evaluations/s | speed-up | worker idle per candidate (s) |",
        "|---|---|---|---|",
    ]
    for row in scale:
        lines.append(
            f"| {row['workers']} | {row['evals_per_s']:.2f} | "
            f"{row.get('speedup', 1.0):.2f}x | {row['idle_per_candidate_s']:.3f} |"
        )
    lines += [
        "",
        f"Manager overhead: instant fitness, {args.overhead_evals} evaluations "
        "(decode, commit, ask/tell, checkpoint after each)",
        "",
        "| optimizer | evaluations/s | ms per evaluation |",
        "|---|---|---|",
    ]
    for row in over:
        lines.append(
            f"| {row['optimizer']} | {row['evals_per_s']:.1f} | {row['ms_per_eval']:.1f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dispatch.md").write_text("\n".join(lines) + "\n")
    (args.out / "dispatch.json").write_text(
        json.dumps({"scaling": scale, "overhead": over}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
