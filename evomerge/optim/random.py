"""Uniform random search in the genome box: the baseline every other optimizer must beat."""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.optim.base import Evaluation, Optimizer, generator_state, set_generator_state


class RandomSearch(Optimizer):
    name = "random"
    multi_objective = True

    def __init__(self, lower, upper, x0, n_objectives: int, seed: int) -> None:
        super().__init__(lower, upper, x0, n_objectives, seed)
        self.rng = np.random.default_rng(seed)

    def _propose(self, n: int) -> list[np.ndarray]:
        return [self.rng.uniform(self.lower, self.upper) for _ in range(n)]

    def _learn(self, evaluation: Evaluation) -> None:
        pass

    def _state(self) -> dict[str, Any]:
        return {"rng": generator_state(self.rng)}

    def _load(self, state: dict[str, Any]) -> None:
        set_generator_state(self.rng, state["rng"])
