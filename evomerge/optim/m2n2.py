"""M2N2: model merging with natural niches (Abrantes, Lange, Tang 2025).

An archive of genomes, each with its per-example scores. Competition for resources: example j
holds a resource shared among the members that solve it, so a member's fitness is
sum_j s_kj / z_j**alpha with z_j = sum_k s_kj; a child replaces the member with the lowest
shared fitness (or is dropped when it is the lowest itself). Attraction: the second parent is
drawn in proportion to g_k = sum_j max(0, F_kj - F_p1,j), i.e. how well it covers what the first
parent misses. The child is a split-point crossover: mixing ratio w before a random split point
and 1 - w after it (linear, or slerp for raw parameter vectors), then optional Gaussian mutation.

Two modes, the same object: recipe genomes inside their bounds (per-example scores come from the
fitness; without them the objectives serve as the examples) and raw parameter vectors with
infinite bounds (small models; the archive holds them whole).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optim.base import Evaluation, Optimizer, generator_state, set_generator_state


class M2N2(Optimizer):
    name = "m2n2"
    multi_objective = True  # niches form over examples; several objectives are several examples

    def __init__(
        self,
        lower,
        upper,
        x0,
        n_objectives: int,
        seed: int,
        *,
        archive_size: int = 20,
        alpha: float = 1.0,
        attraction: bool = True,
        crossover: bool = True,
        split_point: bool = True,
        slerp: bool = False,
        mutation_sigma: float = 0.0,
        initial: int = 2,
    ) -> None:
        super().__init__(lower, upper, x0, n_objectives, seed)
        if archive_size < 2:
            raise EvomergeError("optimizer.options.archive_size: must be >= 2")
        if alpha < 0 or mutation_sigma < 0:
            raise EvomergeError("optimizer.options: alpha and mutation_sigma must be >= 0")
        if not 1 <= initial <= archive_size:
            raise EvomergeError("optimizer.options.initial: must be in [1, archive_size]")
        self.archive_size = archive_size
        self.alpha = alpha
        self.attraction = attraction
        self.crossover = crossover
        self.split_point = split_point
        self.slerp = slerp
        self.mutation_sigma = mutation_sigma
        self.initial = initial
        self.rng = np.random.default_rng(seed)
        self.members = np.empty((0, self.dim))
        self.scores: np.ndarray | None = None  # (members, examples)

    # ----- selection ------------------------------------------------------------------------
    def shared_fitness_matrix(self, scores: np.ndarray) -> np.ndarray:
        """F_kj = s_kj / z_j**alpha, z_j = sum_k s_kj (an unsolved example shares nothing)."""
        z = scores.sum(axis=0)
        z = np.where(z > 0, z, 1.0) ** self.alpha
        return scores / z[None, :]

    def _pick(self, weights: np.ndarray, exclude: int = -1) -> int:
        weights = np.where(np.arange(weights.size) == exclude, 0.0, np.maximum(weights, 0.0))
        total = weights.sum()
        if not total > 0:  # degenerate: nobody scores (or attracts); choose uniformly
            choices = [k for k in range(weights.size) if k != exclude] or [0]
            return int(choices[self.rng.integers(len(choices))])
        return int(self.rng.choice(weights.size, p=weights / total))

    def parents(self) -> tuple[int, int]:
        shared = self.shared_fitness_matrix(self.scores)
        first = self._pick(shared.sum(axis=1))
        if self.attraction:
            gain = np.maximum(0.0, shared - shared[first][None, :]).sum(axis=1)
            second = self._pick(gain, exclude=first)
        else:
            second = self._pick(shared.sum(axis=1), exclude=first)
        return first, second

    # ----- variation --------------------------------------------------------------------------
    def child(self) -> np.ndarray:
        first, second = self.parents()
        a, b = self.members[first], self.members[second]
        if self.crossover:
            w = self.rng.uniform()
            mix = np.full(self.dim, w)
            if self.split_point:
                split = self.rng.integers(self.dim)
                mix[split:] = 1.0 - w
            x = _slerp(mix, a, b) if self.slerp else (1.0 - mix) * a + mix * b
        else:
            x = a.copy()
        if self.mutation_sigma > 0:
            x = x + self.rng.normal(0.0, self.mutation_sigma, self.dim)
        return np.clip(x, self.lower, self.upper)

    def _propose(self, n: int) -> list[np.ndarray]:
        out = []
        for _ in range(n):
            started = self.asked - len(self.seeds) + len(out)  # own asks; seeds came first
            if started == 0:
                out.append(self.x0.copy())
            elif started < self.initial or len(self.members) < 2:
                out.append(self._random_member())
            else:
                out.append(self.child())
        return out

    def _random_member(self) -> np.ndarray:
        lo = np.where(np.isfinite(self.lower), self.lower, self.x0 - 1.0)
        hi = np.where(np.isfinite(self.upper), self.upper, self.x0 + 1.0)
        if np.isfinite(self.lower).all():
            return self.rng.uniform(lo, hi)
        return self.x0 + self.rng.normal(0.0, 0.01, self.dim)  # raw weights: a small perturbation

    # ----- archive --------------------------------------------------------------------------
    def _learn(self, evaluation: Evaluation) -> None:
        if evaluation.per_example is not None:
            score = np.asarray(evaluation.per_example, dtype=float)
        elif evaluation.losses is not None:
            score = np.maximum(0.0, -np.asarray(evaluation.losses, dtype=float))
        else:
            score = None
        if score is None:
            if self.scores is None:
                return
            score = np.zeros(self.scores.shape[1])
        if self.scores is not None and score.size != self.scores.shape[1]:
            raise EvomergeError(
                f"m2n2: candidate {evaluation.index} has {score.size} per-example scores, the "
                f"archive holds {self.scores.shape[1]}; every evaluation must score the same set"
            )
        self.add(np.asarray(evaluation.genome, dtype=float), score)

    def add(self, genome: np.ndarray, score: np.ndarray) -> None:
        """Admit a scored genome, replacing the lowest shared-fitness member when full."""
        if self.scores is None:
            self.scores = np.empty((0, score.size))
        if len(self.members) < self.archive_size:
            self.members = np.vstack([self.members, genome[None, :]])
            self.scores = np.vstack([self.scores, score[None, :]])
            return
        extended = np.vstack([self.scores, score[None, :]])
        fitness = self.shared_fitness_matrix(extended).sum(axis=1)
        worst = int(np.argmin(fitness))
        if worst < len(self.members):
            self.members[worst] = genome
            self.scores[worst] = score

    def best(self) -> int:
        """Archive member with the highest mean per-example score."""
        return int(np.argmax(self.scores.mean(axis=1)))

    # ----- state ------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"rng": generator_state(self.rng), "members": self.members, "scores": self.scores}

    def _load(self, state: dict[str, Any]) -> None:
        set_generator_state(self.rng, state["rng"])
        self.members = np.asarray(state["members"], dtype=float).reshape(-1, self.dim)
        self.scores = None if state["scores"] is None else np.asarray(state["scores"], float)


def _slerp(mix: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spherical interpolation with a per-coordinate ratio (linear when the vectors align)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return (1.0 - mix) * a + mix * b
    omega = np.arccos(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return (1.0 - mix) * a + mix * b
    return (np.sin((1.0 - mix) * omega) * a + np.sin(mix * omega) * b) / np.sin(omega)
