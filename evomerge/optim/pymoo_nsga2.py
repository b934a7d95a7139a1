"""NSGA-II from pymoo's own operators (binary tournament on rank and crowding, simulated binary
crossover, polynomial mutation, rank-and-crowding survival), driven through evomerge's ask/tell
with generations that overlap so that no worker waits at a generation's end.

Ask index i belongs to generation i // population_size. Generation 0 is the seeds, the space's
start point and uniform samples; every later candidate is bred from the current parents, the
survivors of the newest generation that is complete. A generation survives (its members joined
to the parents, the best population_size kept) once every member is told, in generation order.
A worker that frees up while its generation is still being scored gets a candidate of the next
generation, bred from the parents it has, never one further ahead (an ask then waits for
results): at most one generation's worth of candidates is bred from parents one generation
older, against a worker left idle at every generation's end. Before generation 0 is complete,
its members told so far are the parents.
Children identical to a parent or to a member not yet survived are bred again (pymoo's
duplicate elimination). State is the parents, the members waiting to survive and the generator,
as JSON values and arrays (the parents written once per survival, each member once): a restored
optimizer asks exactly what the original would have. An ask is vector arithmetic over the
genome: a fraction of a millisecond at 2,024 genes (benchmarks/idle.py).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from pymoo.operators.crossover.sbx import cross_sbx
from pymoo.operators.mutation.pm import mut_pm
from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from evomerge.errors import EvomergeError
from evomerge.optim.base import Evaluation, Optimizer, generator_state, set_generator_state
from evomerge.optim.state import Frozen

REBREED = 10  # tries at a child no parent or waiting member already is


class PymooNSGA2(Optimizer):
    name = "pymoo_nsga2"
    multi_objective = True

    def __init__(
        self,
        lower,
        upper,
        x0,
        n_objectives: int,
        seed: int,
        *,
        population_size: int = 50,
        crossover_prob: float = 0.9,
        mutation_prob: Optional[float] = None,
        eta_crossover: float = 15.0,
        eta_mutation: float = 5.0,
    ) -> None:
        super().__init__(lower, upper, x0, n_objectives, seed)
        if int(population_size) != population_size or population_size < 2:
            raise EvomergeError(
                f"field 'optimizer.options.population_size': expected a whole number >= 2, "
                f"got {population_size}"
            )
        for key, value in (("crossover_prob", crossover_prob), ("mutation_prob", mutation_prob)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise EvomergeError(
                    f"field 'optimizer.options.{key}': a probability in [0, 1], got {value}"
                )
        for key, value in (("eta_crossover", eta_crossover), ("eta_mutation", eta_mutation)):
            if not value > 0:
                raise EvomergeError(
                    f"field 'optimizer.options.{key}': a distribution index > 0, got {value}"
                )
        # pymoo's NSGA-II defaults, but for the mutation's index (pymoo: 20): wider steps find
        # more of the front in the few hundred evaluations a merge search affords (measured by
        # benchmarks/idle.py)
        self.eta_crossover, self.eta_mutation = float(eta_crossover), float(eta_mutation)
        self.population = int(population_size)
        self.crossover_prob = float(crossover_prob)
        # per gene, pymoo's default: one gene in dim mutates on average
        self.mutation_prob = (
            min(0.5, 1.0 / max(self.dim, 1)) if mutation_prob is None else float(mutation_prob)
        )
        self.rng = np.random.default_rng(seed)
        self.parents_x = np.zeros((0, self.dim))
        self.parents_f = np.zeros((0, n_objectives))
        # generation -> its told members: (genome, losses, the two frozen for checkpoints, so
        # that each member is written once; optim/state.py)
        self.waiting: dict[int, list[tuple[np.ndarray, np.ndarray, Frozen]]] = {}
        self.survived = -1  # the newest generation joined to the parents
        self.frozen_parents: Optional[Frozen] = None  # written once per survival
        self._rank_crowding()

    # ----- asking ------------------------------------------------------------------------------
    def _propose(self, n: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for _ in range(n):
            index = self.asked + len(out)
            if index // self.population > self.survived + 2:
                break  # a generation still scoring holds the next but one: wait for its results
            if index // self.population == 0 or len(self.parents_x) < 2:
                child = self._sample(index)
            else:
                child = self._breed(out)
            out.append(child)
        return out

    def _sample(self, index: int) -> np.ndarray:
        """Generation 0 after the seeds: the space's start point, then uniform samples (and
        while too few are told to breed from: more of them)."""
        if index == len(self.seeds):
            return self.x0.copy()
        return self.lower + self.rng.random(self.dim) * (self.upper - self.lower)

    def _breed(self, batch: list[np.ndarray]) -> np.ndarray:
        """One child of two tournament winners; bred again (up to REBREED times) while it
        repeats a parent, a member waiting to survive, or a child of this batch."""
        known = [*self.parents_x, *(m[0] for told in self.waiting.values() for m in told), *batch]
        known += list(self.outstanding.values())
        child = self._child()
        for _ in range(REBREED):
            if not any(np.array_equal(child, k) for k in known):
                break
            child = self._child()
        return child

    def _child(self) -> np.ndarray:
        a, b = self._tournament(), self._tournament()
        x = np.stack([self.parents_x[a], self.parents_x[b]])[:, None, :]  # (2 parents, 1, dim)
        if self.rng.random() < self.crossover_prob:
            x = cross_sbx(
                x,
                self.lower,
                self.upper,
                np.full((1, 1), self.eta_crossover),
                np.full((1, 1), 0.5),  # each gene crosses with probability 0.5
                np.full((1, 1), 0.5),  # and the two children swap it with probability 0.5
                random_state=self.rng,
            )
        child = x[self.rng.integers(2), 0][None, :]
        child = mut_pm(
            child,
            self.lower,
            self.upper,
            np.full(1, self.eta_mutation),
            np.full(1, self.mutation_prob),
            at_least_once=False,
            random_state=self.rng,
        )
        return np.clip(child[0], self.lower, self.upper)

    def _tournament(self) -> int:
        """Binary tournament: the lower front wins, then the larger crowding distance."""
        i, j = self.rng.integers(len(self.parents_x), size=2)
        if self.rank[i] != self.rank[j]:
            return int(i if self.rank[i] < self.rank[j] else j)
        if self.crowding[i] != self.crowding[j]:
            return int(i if self.crowding[i] > self.crowding[j] else j)
        return int(i if self.rng.random() < 0.5 else j)

    # ----- learning ----------------------------------------------------------------------------
    def _learn(self, evaluation: Evaluation) -> None:
        generation = evaluation.index // self.population
        x, f = np.asarray(evaluation.genome, dtype=float), self.losses_of(evaluation)
        self.waiting.setdefault(generation, []).append((x, f, Frozen({"x": x, "f": f})))
        if self.survived < 0 and generation == 0:
            self._provisional_parents()
        while len(self.waiting.get(self.survived + 1, ())) == self.population:
            self._survive(self.waiting.pop(self.survived + 1))
            self.survived += 1

    def _provisional_parents(self) -> None:
        """Before generation 0 is complete, its told members breed whoever asks past it."""
        told = self.waiting.get(0, [])
        self.parents_x = np.stack([m[0] for m in told])
        self.parents_f = np.stack([m[1] for m in told])
        self._rank_crowding()

    def _survive(self, members: list[tuple[np.ndarray, np.ndarray, Frozen]]) -> None:
        """Rank-and-crowding survival over the parents and a complete generation."""
        if self.survived < 0:  # generation 0 alone (its provisional parents are its own members)
            x, f = np.zeros((0, self.dim)), np.zeros((0, self.n_objectives))
        else:
            x, f = self.parents_x, self.parents_f
        x = np.concatenate([x, np.stack([m[0] for m in members])])
        f = np.concatenate([f, np.stack([m[1] for m in members])])
        fronts = NonDominatedSorting().do(f, n_stop_if_ranked=self.population)
        kept: list[int] = []
        for front in fronts:
            if len(kept) + len(front) <= self.population:
                kept += list(front)
                continue
            crowding = calc_crowding_distance(f[front])
            order = np.argsort(-crowding, kind="stable")
            kept += list(np.asarray(front)[order[: self.population - len(kept)]])
            break
        self.parents_x, self.parents_f = x[kept], f[kept]
        self._rank_crowding()

    def _rank_crowding(self) -> None:
        """Each parent's front (0 = non-dominated) and crowding distance within it (the parents
        changed: their frozen copy is stale)."""
        self.frozen_parents = None
        n = len(self.parents_f)
        self.rank = np.zeros(n, dtype=int)
        self.crowding = np.zeros(n)
        if n == 0:
            return
        for r, front in enumerate(NonDominatedSorting().do(self.parents_f)):
            self.rank[front] = r
            self.crowding[front] = calc_crowding_distance(self.parents_f[front])

    # ----- state -------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        if self.frozen_parents is None:
            self.frozen_parents = Frozen({"x": self.parents_x, "f": self.parents_f})
        return {
            "rng": generator_state(self.rng),
            "parents": self.frozen_parents,
            "survived": self.survived,
            "waiting": {str(g): [m[2] for m in told] for g, told in self.waiting.items()},
        }

    def _load(self, state: dict[str, Any]) -> None:
        set_generator_state(self.rng, state["rng"])
        parents = state["parents"]
        self.parents_x = np.asarray(parents["x"], dtype=float).reshape(-1, self.dim)
        self.parents_f = np.asarray(parents["f"], dtype=float).reshape(-1, self.n_objectives)
        self.survived = int(state["survived"])
        self.waiting = {int(g): [_member(m) for m in told] for g, told in state["waiting"].items()}
        self._rank_crowding()


def _member(stored: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, Frozen]:
    """A waiting member as a checkpoint holds it."""
    x, f = np.asarray(stored["x"], dtype=float), np.asarray(stored["f"], dtype=float)
    return x, f, Frozen({"x": x, "f": f})
