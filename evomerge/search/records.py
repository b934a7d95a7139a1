"""A scored candidate as the store keeps it: the objectives' values from a fitness's metrics
(or why there are none), and a merge's identity, by which a repeated recipe is reused."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from typing import Optional

from evomerge.merge.methods import get_method
from evomerge.optim.registry import Candidate
from evomerge.recipe import Recipe
from evomerge.results.store import Record
from evomerge.workers.evaluator import Outcome

MISSING_METRIC = "the fitness gives no metric"


@functools.lru_cache(maxsize=4096)
def recipe_key(recipe_yaml: str) -> str:
    """Identity of a merge: the recipe without seeds when no method in it draws randomness."""
    recipe = Recipe.from_yaml_text(recipe_yaml)
    data = recipe.model_dump(mode="json", exclude_none=True)
    if not _stochastic(recipe):
        data = _without_seeds(data)
    return hashlib.blake2b(json.dumps(data, sort_keys=True).encode(), digest_size=16).hexdigest()


def _stochastic(recipe: Recipe) -> bool:
    if recipe.merge_method != "dataflow" and get_method(recipe.merge_method).stochastic:
        return True
    models = recipe.models.values() if isinstance(recipe.models, dict) else []
    return any(isinstance(m, Recipe) and _stochastic(m) for m in models)


def _without_seeds(data):
    if isinstance(data, dict):
        return {k: _without_seeds(v) for k, v in data.items() if k != "seed"}
    if isinstance(data, list):
        return [_without_seeds(v) for v in data]
    return data


def objective_values(
    objectives: list, metrics: dict[str, float]
) -> tuple[Optional[dict[str, float]], Optional[str]]:
    """The objectives' values from a fitness's metrics, or None and why not."""
    values = {}
    for o in objectives:
        value = o.value(metrics)
        if value is None:
            missing = next(m for m in o.metrics() if m not in metrics)
            return None, (
                f"{MISSING_METRIC} {missing!r} for objective {o.name!r}; it gave "
                f"{', '.join(sorted(metrics)) or 'nothing'}; fix the metric name"
            )
        if not math.isfinite(value):
            return None, f"objective {o.name!r} is {value}"
        values[o.name] = value
    return values, None


def to_record(objectives: list, candidate: Candidate, recipe: str, outcome: Outcome) -> Record:
    """A finished evaluation as a record: failed (with why) when no objective value comes out."""
    values, error = None, outcome.error
    if error is None:
        values, error = objective_values(objectives, outcome.metrics)
    return Record(
        index=candidate.index,
        genome=candidate.genome,
        recipe=recipe,
        values=values,
        metrics=outcome.metrics,
        per_example=outcome.per_example,
        seconds=outcome.seconds,
        worker=outcome.worker,
        error=error,
        per_document=outcome.per_document,
    )
