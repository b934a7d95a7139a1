"""The optimizer contract: ask for candidates, tell evaluations, save and restore state.

Optimizers minimise losses (the run turns each objective into a loss by its direction) and
know nothing of Ray, files or models. Every candidate carries its ask index; the base class
remembers which asked candidates have not been told yet, so a run restored from a checkpoint
can re-dispatch exactly those (or tell them from the store when they were already scored).
State is JSON values and numpy arrays, never pickle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from evomerge.errors import EvomergeError

FAILED_PENALTY = 1.0  # a failed candidate is told as worse than the worst loss seen, by this much


@dataclass
class Candidate:
    index: int  # ask sequence number: the key that ties a store entry to an optimizer's ask
    genome: np.ndarray


@dataclass
class Evaluation:
    index: int
    genome: np.ndarray
    losses: Optional[np.ndarray]  # one per objective, lower is better; None when it failed
    per_example: Optional[np.ndarray] = None  # per-example scores, higher is better (M2N2)

    @property
    def failed(self) -> bool:
        return self.losses is None


class Optimizer(ABC):
    """Ask/tell over genomes in the box [lower, upper]."""

    name: str = "optimizer"
    multi_objective: bool = False
    generational: bool = False  # True: a whole generation is asked before any is learnt from
    takes_steps: bool = False  # True: the constructor takes the space's first step per gene

    def __init__(
        self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray, n_objectives: int, seed: int
    ) -> None:
        if n_objectives > 1 and not self.multi_objective:
            raise EvomergeError(
                f"optimizer.name: {self.name} optimises one objective, the config has "
                f"{n_objectives}; use nsga2, tpe or random, or combine them with a weighted sum"
            )
        self.lower = np.asarray(lower, dtype=float)
        self.upper = np.asarray(upper, dtype=float)
        self.x0 = np.clip(np.asarray(x0, dtype=float), self.lower, self.upper)
        self.n_objectives = n_objectives
        self.seed = seed
        self.asked = 0
        self.told = 0
        self.outstanding: dict[int, np.ndarray] = {}
        self.worst = np.full(n_objectives, -np.inf)
        self.seeds: list[np.ndarray] = []

    def seed_with(self, genomes: list[np.ndarray]) -> None:
        """Genomes to ask before any of the algorithm's own (the run's source models): they are
        the first asks, told like any other, and each algorithm learns from them its own way
        (`_ask_seed`, `_learn_seed`). Call before the first ask."""
        if self.asked:
            raise EvomergeError("seeds must be given before the first ask")
        self.seeds = [np.clip(np.asarray(g, dtype=float), self.lower, self.upper) for g in genomes]

    def is_seed(self, index: int) -> bool:
        return index < len(self.seeds)

    @property
    def dim(self) -> int:
        return self.lower.size

    # ----- the contract -------------------------------------------------------------------------
    def ask(self, n: int) -> list[Candidate]:
        """Up to `n` new candidates (fewer, or none, while a generation waits for its results):
        the seeds first, then the algorithm's own."""
        out: list[Candidate] = []
        while len(out) < n and self.is_seed(self.asked):
            out.append(self._asked(self._ask_seed(self.seeds[self.asked])))
        if len(out) < n:
            out += [self._asked(genome) for genome in self._propose(n - len(out))]
        return out

    def _asked(self, genome: np.ndarray) -> Candidate:
        candidate = Candidate(self.asked, np.asarray(genome, dtype=float))
        self.outstanding[self.asked] = candidate.genome
        self.asked += 1
        return candidate

    def tell(self, evaluation: Evaluation) -> None:
        if evaluation.index not in self.outstanding:
            raise EvomergeError(f"candidate {evaluation.index} was not asked or was told already")
        del self.outstanding[evaluation.index]
        if evaluation.losses is not None:
            losses = np.asarray(evaluation.losses, dtype=float)
            self.worst = np.maximum(self.worst, losses)
        self.told += 1
        if self.is_seed(evaluation.index):
            self._learn_seed(evaluation)
        else:
            self._learn(evaluation)

    def pending(self) -> list[Candidate]:
        """Asked and not yet told, in ask order: what a resumed run must dispatch again."""
        return [Candidate(i, g) for i, g in sorted(self.outstanding.items())]

    def losses_of(self, evaluation: Evaluation) -> np.ndarray:
        """The losses to learn from; a failure counts as worse than anything seen so far."""
        if evaluation.losses is not None:
            return np.asarray(evaluation.losses, dtype=float)
        seen = np.where(np.isfinite(self.worst), self.worst, 0.0)
        return seen + FAILED_PENALTY * np.maximum(1.0, np.abs(seen))

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "asked": self.asked,
            "told": self.told,
            "outstanding": {str(i): g for i, g in self.outstanding.items()},
            "worst": self.worst,
            "seeds": list(self.seeds),
            "algorithm": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise EvomergeError(
                f"checkpoint is for optimizer {state.get('name')!r}, the run uses {self.name!r}"
            )
        self.asked = int(state["asked"])
        self.told = int(state["told"])
        self.outstanding = {int(i): np.asarray(g) for i, g in state["outstanding"].items()}
        self.worst = np.asarray(state["worst"], dtype=float)
        self.seeds = [np.asarray(g, dtype=float) for g in state.get("seeds", [])]
        self._load(state["algorithm"])

    # ----- what each algorithm supplies -------------------------------------------------------
    def _ask_seed(self, genome: np.ndarray) -> np.ndarray:
        """A seed is being asked (as ask index `self.asked`); by default it is asked as it is."""
        return genome

    def _learn_seed(self, evaluation: Evaluation) -> None:
        """A seed's result; by default learnt like any other."""
        self._learn(evaluation)

    @abstractmethod
    def _propose(self, n: int) -> list[np.ndarray]: ...

    @abstractmethod
    def _learn(self, evaluation: Evaluation) -> None: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load(self, state: dict[str, Any]) -> None: ...


def rng_state(rng: np.random.RandomState) -> dict[str, Any]:
    """A legacy numpy RandomState as JSON values and arrays."""
    kind, keys, pos, has_gauss, cached = rng.get_state()
    return {
        "kind": kind,
        "keys": keys,
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def set_rng_state(rng: np.random.RandomState, state: dict[str, Any]) -> None:
    rng.set_state(
        (
            state["kind"],
            np.asarray(state["keys"], dtype=np.uint32),
            state["pos"],
            state["has_gauss"],
            state["cached"],
        )
    )


def generator_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def set_generator_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state
