"""A surrogate-assisted step for any run: fit MAP's quadratic surrogates on the run's
evaluations, search their Pareto set, score a spread of the proposals for real, and record them
in the store as `origin: surrogate` (outside the optimizer's budget and history)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optim.base import Candidate
from evomerge.optim.map import MAP
from evomerge.search.records import to_record
from evomerge.search.references import score_all
from evomerge.search.run import open_run
from evomerge.workers.pool import make_pool


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
    genomes = fitter.verification_points()
    start = -1 - sum(1 for r in run.store.records() if r.origin == "surrogate")
    jobs = []
    for k, genome in enumerate(genomes):
        candidate = Candidate(start - k, genome)
        seed = run.candidate_seed(abs(candidate.index) + 10**6)
        jobs.append((candidate, run.space.decode(genome, seed).to_yaml(), False))
    pool = make_pool(run.config)
    try:
        for candidate, recipe, outcome in score_all(pool, jobs):
            record = to_record(run.config.objectives, candidate, recipe, outcome)
            record.origin = "surrogate"
            run.store.commit(record)
    finally:
        pool.close()
    return len(genomes)
