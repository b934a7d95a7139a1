"""What the search is measured against: the source models and baseline merges, scored once
before the search (or borrowed from a `references_from` run that scored them alike), and the
held-out scores of the Pareto set and the references after it."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from evomerge.baselines import baseline_recipes
from evomerge.learn.in_run import is_learned, learns_alike, same_merge
from evomerge.optim.registry import Candidate
from evomerge.recipe import Recipe
from evomerge.results.pareto import pareto_records
from evomerge.results.store import ReferenceResult, RunStore
from evomerge.search.prepare import references_config
from evomerge.search.records import to_record
from evomerge.search.run import Run
from evomerge.workers.evaluator import Outcome
from evomerge.workers.pool import Pool


def source_recipe(ref: str) -> str:
    """A source model as a recipe: itself, unchanged (linear, weight 1)."""
    return Recipe.from_dict(
        {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
    ).to_yaml()


def reference_recipes(run: Run) -> dict[tuple[str, str], str]:
    """(kind, name) -> recipe of what the search is measured against: the source models (unless
    score_sources is off) and the baseline merges."""
    out = {}
    if run.config.score_sources:
        for name, ref in run.config.models.items():
            out[("source", name)] = source_recipe(ref)
    baselines = baseline_recipes(
        run.config.baselines, run.config.models, run.config.base_model, run.config.seed
    )
    out.update({("baseline", name): recipe for name, recipe in baselines.items()})
    return out


def stored_references(run: Run) -> dict[tuple[str, str], ReferenceResult]:
    """(kind, name) -> what the store holds for each source and baseline scored so far."""
    stored = {("source", k): v for k, v in run.store.sources().items()}
    stored.update({("baseline", k): v for k, v in run.store.baselines().items()})
    return stored


def store_reference(run: Run, key: tuple[str, str], result: ReferenceResult) -> None:
    kind, name = key
    (run.store.set_source if kind == "source" else run.store.set_baseline)(name, result)


def borrowed_references(run: Run) -> dict[tuple[str, str], ReferenceResult]:
    """Scores of this run's sources and baselines held by the `references_from` run, when
    they were scored the same way (fitness, objectives, score_dtype) on the same recipe (its
    failures are not scores: this run scores those itself)."""
    if not run.config.references_from:
        return {}
    folder = Path(run.config.references_from)
    other = references_config(run.config)
    theirs = Run(folder, other, run.space, RunStore.open(folder))
    their_recipes = reference_recipes(theirs)
    mine = reference_recipes(run)
    alike = learns_alike(run.config, other)
    return {
        key: result
        for key, result in stored_references(theirs).items()
        if key in mine
        and (alike or not is_learned(mine[key]))
        and same_merge(their_recipes.get(key), mine[key], folder, run.folder)
        and not result.failed
    }


def score_references(run: Run, pool: Pool, progress: bool = True) -> None:
    """Score every source model and baseline merge once on the fitness tasks (not counted in
    the budget, not told to the optimizer): status and the report set the search against them,
    and the hypervolume reference defaults to the sources' worst values. One that failed
    (out of memory, a fitness bug since fixed) is scored again when the run resumes."""
    done = {key: result for key, result in stored_references(run).items() if not result.failed}
    recipes = reference_recipes(run)
    for key, result in borrowed_references(run).items():
        if key in recipes and key not in done:
            store_reference(run, key, result)
            done[key] = result
    todo = [(key, recipe) for key, recipe in recipes.items() if key not in done]
    if not todo:
        return
    jobs = [(Candidate(-1 - k, np.zeros(0)), recipe, False) for k, (_, recipe) in enumerate(todo)]
    bar = tqdm(total=len(todo), desc="sources and baselines", unit="model", disable=not progress)
    for candidate, recipe, outcome in score_all(pool, jobs):
        key = todo[-1 - candidate.index][0]
        record = to_record(run.config.objectives, candidate, recipe, outcome)
        result = ReferenceResult(
            values=record.values,
            metrics=outcome.metrics,
            per_example=outcome.per_example,
            error=record.error,
            per_document=outcome.per_document,
            recipe=None if key[0] == "source" else recipe,
        )
        store_reference(run, key, result)
        bar.update(1)
    bar.close()


def score_held_out(run: Run, pool: Pool, progress: bool = True) -> None:
    """Score the Pareto set, the source models and the baselines on the held-out tasks (once
    each, stored with them)."""
    front = pareto_records(run.store.records(), run.config.objectives)
    jobs = [(Candidate(r.number, r.genome), r.recipe, True) for r in front if r.held_out is None]
    stored = stored_references(run)
    recipes = reference_recipes(run)
    references = [k for k in recipes if k in stored and stored[k].held_out is None]
    jobs += [
        (Candidate(-1 - k, np.zeros(0)), recipes[key], True) for k, key in enumerate(references)
    ]
    bar = tqdm(total=len(jobs), desc="held-out", unit="model", disable=not progress)
    for candidate, _, outcome in score_all(pool, jobs):
        metrics = outcome.metrics if outcome.error is None else {"error": outcome.error}
        if candidate.index >= 0:  # the index here is the store number
            run.store.set_held_out(candidate.index, metrics)
        else:
            key = references[-1 - candidate.index]
            store_reference(run, key, replace(stored[key], held_out=metrics))
        bar.update(1)
    bar.close()


def score_all(
    pool: Pool, jobs: list[tuple[Candidate, str, bool]]
) -> Iterator[tuple[Candidate, str, Outcome]]:
    """Score (candidate, recipe, held_out) jobs outside the search loop, keeping every worker
    busy; results come back as they finish."""
    queue = deque(jobs)
    while queue or pool.in_flight():
        while queue and pool.free() > 0:
            pool.submit(*queue.popleft())
        yield from pool.wait()
