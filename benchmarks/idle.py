"""Worker idle time under generational optimizers: does a generation keep every worker busy?

Four Ray workers (on this 2-core machine each reserves half a CPU: the fitness sleeps, it does
not compute), a fitness that sleeps 0.5 s, CMA-ES and NSGA-II with a population of 8, 32
evaluations (four generations). Idle fraction = 1 - (seconds the workers spent on candidates,
merges included) / (workers x wall time of the search); the workers are started and loaded
before the clock starts, and shutting them down after the last result is not counted. Runs are
not seeded with their sources, so every generation is the optimizer's own (seeding adds one
short round of its own: the sources).

    python benchmarks/idle.py [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the workers import the sleeping fitness from tests/

from evomerge.config import RunConfig  # noqa: E402
from evomerge.results.store import RunStore  # noqa: E402
from evomerge.search.loop import drive  # noqa: E402
from evomerge.search.run import create_run  # noqa: E402
from evomerge.workers.pool import make_pool  # noqa: E402

WORKERS, POPULATION, EVALS, SLEEP = 4, 8, 32, 0.5


def measure(models: dict, tmp: Path, optimizer: str) -> dict:
    config = RunConfig.from_dict(
        {
            "models": {
                "base": str(models["base"]),
                "a": str(models["ft0"]),
                "b": str(models["ft1"]),
            },
            "base_model": "base",
            "search_space": "search_spaces/ps_ties.yaml",
            "objectives": [{"name": "nll", "metric": "nll", "direction": "minimize"}],
            "optimizer": {"name": optimizer, "options": {"population_size": POPULATION}},
            "budget": EVALS,
            "fitness": {"function": "tests.fitness_fns:sleepy", "options": {"seconds": SLEEP}},
            "device": "cpu",
            "workers": WORKERS,
            "score_sources": False,
            "seed_with_sources": False,
        }
    )
    run = create_run(config, tmp / optimizer)
    pool = make_pool(run.config)  # started and loaded before the clock starts
    stopped: list[float] = []
    close = pool.close

    def close_after_noting_the_time() -> None:  # shutting Ray down is not the search's time
        stopped.append(time.perf_counter())
        close()

    pool.close = close_after_noting_the_time
    start = time.perf_counter()
    drive(run, pool, progress=False)
    wall = stopped[0] - start
    records = RunStore.open(run.folder).records()
    busy = sum(r.seconds for r in records)
    scored = sum(1 for r in records if r.reused_from is None)
    return {
        "optimizer": optimizer,
        "workers": WORKERS,
        "population": POPULATION,
        "evaluations": EVALS,
        "scored": scored,  # the rest repeat a recipe already scored: told from the store
        "wall_s": round(wall, 2),
        "busy_s": round(busy, 2),
        "ideal_wall_s": round(busy / WORKERS, 2),
        "idle_fraction": round(1 - busy / (WORKERS * wall), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args()
    from tests.family import make_family

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = make_family(tmp / "models", "llama", n_finetunes=2, seed=0)
        rows = [measure(models, tmp, name) for name in ("cma", "nsga2")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "idle.json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
