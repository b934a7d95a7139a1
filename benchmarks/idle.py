"""Worker idle time under generational optimizers: does a generation keep every worker busy?

Four Ray workers (on this 2-core machine each reserves half a CPU: the fitness sleeps, it does
not compute), a fitness that sleeps 0.5 s, CMA-ES, Optuna's NSGA-II and pymoo's NSGA-II
(generations overlapping) with a population of 8, 32 evaluations (four generations). Idle
fraction = 1 - (seconds the workers spent on candidates, merges included) / (workers x wall
time of the search); the workers are started and loaded before the clock starts, and shutting
them down after the last result is not counted. Runs are not seeded with their sources, so
every generation is the optimizer's own (seeding adds one short round of its own: the sources).
`--repeats N` runs each optimizer N times, interleaved.

The second table is what one ask and its tell cost the driver over a 2,024-gene genome (the size
of a per-tensor space over a 135M model), 200 evaluations in one process with an instant fitness:
Optuna's bookkeeping grows with the genome, pymoo's operators are vector arithmetic.

The third is search quality, so that less idle time is not bought with a worse front: two
quadratic bowls (minimise |x - 0.5|^2 and |x + 0.5|^2 in [-1, 1]^genes), 160 evaluations with
four always in flight (a result comes back, a free worker asks), the hypervolume of the front
found, over many seeds.

    python benchmarks/idle.py [--out results/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def ask_cost(optimizer: str, genes: int = 2024, evaluations: int = 200) -> dict:
    """Seconds per ask and per tell of `optimizer` in one process, instant losses."""
    import numpy as np

    from evomerge.optim.registry import Evaluation, make_optimizer

    lower, upper = np.zeros(genes), np.ones(genes)
    opt = make_optimizer(
        optimizer, {"population_size": POPULATION}, lower, upper, lower + 0.5, 2, seed=0
    )
    asking = telling = 0.0
    for _ in range(evaluations // POPULATION):
        start = time.perf_counter()
        batch = opt.ask(POPULATION)
        asking += time.perf_counter() - start
        start = time.perf_counter()
        for c in batch:
            x = c.genome
            opt.tell(Evaluation(c.index, x, np.array([np.mean(x**2), np.mean((x - 1) ** 2)])))
        telling += time.perf_counter() - start
    return {
        "optimizer": optimizer,
        "genes": genes,
        "evaluations": evaluations,
        "ask_ms": round(1000 * asking / evaluations, 3),
        "tell_ms": round(1000 * telling / evaluations, 3),
    }


def front_quality(optimizer: str, genes: int, seeds: int, reference: float) -> dict:
    """Hypervolume of the front `optimizer` finds on two bowls, four candidates in flight."""
    import numpy as np

    from evomerge.optim.registry import Evaluation, make_optimizer
    from evomerge.results.pareto import hypervolume, non_dominated

    lower, upper = -np.ones(genes), np.ones(genes)
    volumes = []
    for seed in range(seeds):
        opt = make_optimizer(
            optimizer, {"population_size": POPULATION}, lower, upper, np.full(genes, 0.9), 2, seed
        )
        flight, points = list(opt.ask(4)), []
        while len(points) < 160:
            if flight:
                c = flight.pop(0)
                f = np.array([np.sum((c.genome - 0.5) ** 2), np.sum((c.genome + 0.5) ** 2)])
                points.append(f)
                opt.tell(Evaluation(c.index, c.genome, f))
            flight += opt.ask(4 - len(flight))
        losses = np.array(points)
        volumes.append(float(hypervolume(losses[non_dominated(losses)], np.full(2, reference))))
    return {
        "optimizer": optimizer,
        "genes": genes,
        "seeds": seeds,
        "hypervolume_mean": round(float(np.mean(volumes)), 2),
        "hypervolume_range": [round(min(volumes), 1), round(max(volumes), 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tests.family import make_family

    names = ("cma", "nsga2", "pymoo_nsga2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = make_family(tmp / "models", "llama", n_finetunes=2, seed=0)
        for repeat in range(args.repeats):  # interleaved: the machine's speed drifts
            for name in names:
                row = measure(models, tmp / f"r{repeat}", name)
                rows.append({**row, "repeat": repeat})
                print(json.dumps(rows[-1]), flush=True)
    summary = {
        name: {
            "idle_median": statistics.median(
                r["idle_fraction"] for r in rows if r["optimizer"] == name
            ),
            "idle_range": [
                min(r["idle_fraction"] for r in rows if r["optimizer"] == name),
                max(r["idle_fraction"] for r in rows if r["optimizer"] == name),
            ],
        }
        for name in names
    }
    costs = [ask_cost(name) for name in ("nsga2", "pymoo_nsga2")]
    quality = [
        front_quality(name, genes, seeds, reference)
        for genes, seeds, reference in ((6, 30, 12.0), (16, 15, 30.0))
        for name in ("nsga2", "pymoo_nsga2")
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"idle": rows, "idle_summary": summary, "ask_cost": costs, "quality": quality}
    (args.out / "idle.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary))
    for row in costs + quality:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
