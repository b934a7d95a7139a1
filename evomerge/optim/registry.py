"""The optimizer registry: each optimizer by name, with the options it accepts."""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Optional

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optim.base import Candidate, Evaluation, Optimizer
from evomerge.optim.cma import CMAES, SepCMAES
from evomerge.optim.m2n2 import M2N2
from evomerge.optim.map import MAP, NestedMAP
from evomerge.optim.optuna_samplers import NSGA2, TPE
from evomerge.optim.pymoo_nsga2 import PymooNSGA2
from evomerge.optim.random import RandomSearch

OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls
    for cls in (CMAES, SepCMAES, M2N2, NSGA2, PymooNSGA2, TPE, RandomSearch, MAP, NestedMAP)
}
OPTUNA_OPTIONS = {
    "nsga2": {"population_size", "mutation_prob", "crossover_prob"},
    "tpe": {"n_startup_trials", "multivariate", "constant_liar"},
}

__all__ = ["OPTIMIZERS", "Candidate", "Evaluation", "Optimizer", "make_optimizer", "options_of"]


def options_of(name: str) -> set[str]:
    """The options an optimizer accepts (its keyword-only arguments)."""
    if name in OPTUNA_OPTIONS:
        return OPTUNA_OPTIONS[name]
    signature = inspect.signature(OPTIMIZERS[name].__init__)
    return {p.name for p in signature.parameters.values() if p.kind == p.KEYWORD_ONLY}


def make_optimizer(
    name: str,
    options: dict[str, Any],
    lower: np.ndarray,
    upper: np.ndarray,
    x0: np.ndarray,
    n_objectives: int,
    seed: int,
    steps: Optional[np.ndarray] = None,
) -> Optimizer:
    """`steps`: the search space's first step per gene, for optimizers that take one (CMA-ES);
    an explicit `sigma` option overrides it."""
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name, OPTIMIZERS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {sorted(OPTIMIZERS)}"
        raise EvomergeError(f"field 'optimizer.name': unknown optimizer {name!r}; {hint}")
    allowed = options_of(name)
    for key in options:
        if key not in allowed:
            raise EvomergeError(
                f"field 'optimizer.options.{key}': {name} has no such option; "
                f"it takes {', '.join(sorted(allowed)) or 'none'}"
            )
    for key, value in options.items():
        if not _plain_number(value):
            raise EvomergeError(
                f"field 'optimizer.options.{key}': expected a number or true/false, got "
                f"{type(value).__name__}"
            )
    try:
        cls = OPTIMIZERS[name]
        if cls.takes_steps:
            return cls(lower, upper, x0, n_objectives, seed, steps, **options)
        return cls(lower, upper, x0, n_objectives, seed, **options)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EvomergeError(f"field 'optimizer.options': {name} cannot use them ({exc})") from None


def _plain_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return True
    return isinstance(value, (int, float)) and math.isfinite(value) and abs(value) < 1e12
