"""A surrogate-assisted step for any run: fit MAP's quadratic surrogates on the run's
evaluations, search their Pareto set, score a spread of the proposals for real, and record them
in the store as `origin: surrogate` (outside the optimizer's budget and history)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optim import Candidate
from evomerge.optim.map import MAP
from evomerge.run import make_pool, open_run, to_record


def propose(run_folder: Path, points: int = 8, progress: bool = True) -> int:
    run = open_run(Path(run_folder))
    records = [r for r in run.store.records() if not r.failed]
    lower, upper = run.space.bounds()
    if len(records) < (len(lower) + 1) * (len(lower) + 2) // 2:
        raise EvomergeError(
            f"{run_folder}: {len(records)} successful evaluations cannot fit a quadratic in "
            f"{len(lower)} genes; run longer first"
        )
    fitter = MAP(
        lower,
        upper,
        run.space.initial(),
        len(run.config.objectives),
        run.config.seed,
        verify=points,
    )
    fitter.x = np.stack([r.genome for r in records])
    fitter.y = np.stack([run.losses(r) for r in records])
    genomes = fitter._verification_points()
    pool = make_pool(run)
    start = -1 - sum(1 for r in run.store.records() if r.origin == "surrogate")
    try:
        queue = [Candidate(start - k, g) for k, g in enumerate(genomes)]
        while queue or pool.in_flight():
            while queue and pool.free() > 0:
                c = queue.pop(0)
                seed = run.candidate_seed(abs(c.index) + 10**6)
                pool.submit(c, run.space.decode(c.genome, seed).to_yaml())
            for candidate, recipe, outcome in pool.wait():
                record = to_record(run, candidate, recipe, outcome)
                record.origin = "surrogate"
                run.store.commit(record)
    finally:
        pool.close()
    return len(genomes)
