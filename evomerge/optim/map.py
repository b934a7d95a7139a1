"""MAP: Pareto fronts of model merges from quadratic surrogates (Li et al., ICLR 2025).

For merges theta = theta_base + sum_n c_n tau_n, each metric is close to a quadratic in the
coefficients c. MAP evaluates a design of coefficient vectors (one-hots, the centre, a grid
and points summing to one: (N+1)(N+2) by default, twice the number of quadratic terms), fits
one quadratic 1/2 c^T A c + b^T c + e per objective through a link (sigmoid for accuracies,
softplus for positive losses, identity otherwise), searches the surrogates' Pareto set with
pymoo's NSGA-II (NSGA-III above two objectives), and asks for real evaluations of a spread of
the proposed points; every round refits on all data and proposes again.

Bayesian MAP (`bayesian: true`) starts from a smaller design and spends part of the budget on
adaptive samples where a bootstrap ensemble of surrogates disagrees most, before proposing.
The genome is the coefficient vector, so use it with a task-arithmetic space of one layer group.
"""

from __future__ import annotations

from itertools import product
from typing import Any, Optional

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.optim.base import Evaluation, Optimizer, generator_state, set_generator_state

EPS = 1e-4


def quadratic_features(x: np.ndarray) -> np.ndarray:
    """[1, x_i, x_i x_j (i <= j)] per row: (N+1)(N+2)/2 columns."""
    x = np.atleast_2d(x)
    n = x.shape[1]
    pairs = [x[:, i] * x[:, j] for i in range(n) for j in range(i, n)]
    return np.column_stack([np.ones(len(x)), x, *pairs])


class Surrogate:
    """One objective's quadratic, fitted through a link."""

    def __init__(self, x: np.ndarray, losses: np.ndarray, link: str, ridge: float = 1e-6):
        self.link = link
        y = self._to_linear(losses)
        phi = quadratic_features(x)
        gram = phi.T @ phi + ridge * np.eye(phi.shape[1])
        self.weights = np.linalg.solve(gram, phi.T @ y)

    def _to_linear(self, losses: np.ndarray) -> np.ndarray:
        if self.link == "sigmoid":  # losses are -accuracy
            p = np.clip(-losses, EPS, 1 - EPS)
            return np.log(p / (1 - p))
        if self.link == "softplus":  # positive losses
            v = np.clip(losses, EPS, None)
            return v + np.log(-np.expm1(-v))
        return losses

    def __call__(self, x: np.ndarray) -> np.ndarray:
        q = quadratic_features(x) @ self.weights
        if self.link == "sigmoid":
            return -1.0 / (1.0 + np.exp(-q))
        if self.link == "softplus":
            return np.logaddexp(0.0, q)
        return q


def choose_link(losses: np.ndarray) -> str:
    if np.all((losses >= -1) & (losses <= 0)):
        return "sigmoid"
    if np.all(losses > 0):
        return "softplus"
    return "identity"


class MAP(Optimizer):
    name = "map"
    multi_objective = True

    def __init__(
        self,
        lower,
        upper,
        x0,
        n_objectives: int,
        seed: int,
        *,
        design: Optional[int] = None,
        bayesian: bool = False,
        adaptive: Optional[int] = None,
        ensemble: int = 16,
        verify: int = 8,
        population: int = 100,
        generations: int = 100,
    ) -> None:
        super().__init__(lower, upper, x0, n_objectives, seed)
        if not np.all(np.isfinite(self.lower) & np.isfinite(self.upper)):
            raise EvomergeError("optimizer map: every gene needs finite bounds")
        terms = (self.dim + 1) * (self.dim + 2) // 2
        if self.dim > 12:
            raise EvomergeError(
                f"optimizer map: {self.dim} genes give {terms} quadratic terms per objective; "
                "MAP is for merge coefficients (one per model): use a task_arithmetic space "
                "with one layer group, or another optimizer"
            )
        full = design if design is not None else 2 * terms
        if full < terms:
            raise EvomergeError(f"optimizer.options.design: needs at least {terms} points")
        if verify < 1:
            raise EvomergeError("optimizer.options.verify: must be >= 1")
        self.bayesian = bayesian
        self.n_design = terms + max(2, terms // 2) if bayesian else full
        self.n_adaptive = (
            (adaptive if adaptive is not None else full - self.n_design) if bayesian else 0
        )
        self.ensemble, self.verify = ensemble, verify
        self.population, self.generations = population, generations
        self.rng = np.random.default_rng(seed)
        self.design_points = self._design(self.n_design)
        self.x = np.empty((0, self.dim))
        self.y = np.empty((0, n_objectives))
        self.queue: list[np.ndarray] = []  # verification points waiting to be asked
        self.proposed = 0
        self.rounds = 0

    # ----- design ------------------------------------------------------------------------------
    def _design(self, count: int) -> list[np.ndarray]:
        lo, hi, n = self.lower, self.upper, self.dim
        unit: list[np.ndarray] = [np.eye(n)[i] for i in range(n)]  # one-hots
        unit.append(np.full(n, 0.5))  # centre
        unit.append(np.full(n, 1.0 / n))  # the plain average
        steps = max(2, int(round((count / 2) ** (1 / n))) + 1)
        grid = [np.array(p) for p in product(np.linspace(0, 1, steps), repeat=n)]
        self.rng.shuffle(grid)
        unit += grid[: max(0, count // 2 - len(unit))]
        while len(unit) < count:  # points summing to one (convex combinations)
            unit.append(self.rng.dirichlet(np.ones(n)))
        unique: list[np.ndarray] = []
        for u in unit:
            if not any(np.allclose(u, v) for v in unique):
                unique.append(u)
        while len(unique) < count:
            unique.append(self.rng.uniform(0, 1, n))
        return [lo + u * (hi - lo) for u in unique[:count]]

    # ----- surrogates ------------------------------------------------------------------------
    def surrogates(self, x: Optional[np.ndarray] = None, y: Optional[np.ndarray] = None):
        x = self.x if x is None else x
        y = self.y if y is None else y
        return [Surrogate(x, y[:, k], choose_link(self.y[:, k])) for k in range(y.shape[1])]

    def _uncertain_point(self) -> np.ndarray:
        """The random candidate where a bootstrap ensemble of surrogates disagrees most."""
        candidates = self.rng.uniform(self.lower, self.upper, (2000, self.dim))
        predictions = []
        for _ in range(self.ensemble):
            pick = self.rng.integers(0, len(self.x), len(self.x))
            models = self.surrogates(self.x[pick], self.y[pick])
            predictions.append(np.column_stack([m(candidates) for m in models]))
        spread = np.stack(predictions).std(axis=0)
        scale = np.maximum(self.y.std(axis=0), 1e-12)
        return candidates[int(np.argmax((spread / scale).sum(axis=1)))]

    def surrogate_front(self) -> tuple[np.ndarray, np.ndarray]:
        """Genomes and predicted losses of the surrogates' Pareto set."""
        from pymoo.core.problem import Problem
        from pymoo.optimize import minimize

        models = self.surrogates()

        class Surrogates(Problem):
            def _evaluate(self, x, out, *args, **kwargs):
                out["F"] = np.column_stack([m(x) for m in models])

        problem = Surrogates(n_var=self.dim, n_obj=self.n_objectives, xl=self.lower, xu=self.upper)
        algorithm = _algorithm(self.n_objectives, self.population)
        result = minimize(
            problem,
            algorithm,
            ("n_gen", self.generations),
            seed=int(self.rng.integers(2**31)),
            verbose=False,
        )
        x = np.atleast_2d(result.X)
        return x, np.column_stack([m(x) for m in models])

    def verification_points(self) -> list[np.ndarray]:
        x, f = self.surrogate_front()
        chosen = _spread(f, min(self.verify, len(x)), self.rng)
        fresh = [x[i] for i in chosen if not np.any(np.all(np.isclose(self.x, x[i]), axis=1))]
        return fresh or [self.rng.uniform(self.lower, self.upper)]

    # ----- ask/tell ----------------------------------------------------------------------------
    def _propose(self, n: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        while len(out) < n:
            if self.proposed < self.n_design:
                out.append(self.design_points[self.proposed])
            elif len(self.x) < self.n_design + len(self.seeds):
                break  # the surrogates need the whole design (and the seeds) first
            elif self.proposed < self.n_design + self.n_adaptive:
                if len(self.x) < self.proposed or out:
                    break  # adaptive samples are one at a time: each uses the last result
                out.append(self._uncertain_point())
            else:
                if not self.queue:
                    if len(self.x) < self.proposed or out:
                        break  # propose from all results of the previous round
                    self.queue = self.verification_points()
                    self.rounds += 1
                out.append(self.queue.pop(0))
            self.proposed += 1
        return out

    def _learn(self, evaluation: Evaluation) -> None:
        self.x = np.vstack([self.x, np.asarray(evaluation.genome, dtype=float)[None, :]])
        self.y = np.vstack([self.y, self.losses_of(evaluation)[None, :]])

    def _state(self) -> dict[str, Any]:
        return {
            "rng": generator_state(self.rng),
            "x": self.x,
            "y": self.y,
            "queue": list(self.queue),
            "proposed": self.proposed,
            "rounds": self.rounds,
            "design": list(self.design_points),
        }

    def _load(self, state: dict[str, Any]) -> None:
        set_generator_state(self.rng, state["rng"])
        self.x = np.asarray(state["x"], dtype=float).reshape(-1, self.dim)
        self.y = np.asarray(state["y"], dtype=float).reshape(-1, self.n_objectives)
        self.queue = [np.asarray(q, dtype=float) for q in state["queue"]]
        self.proposed, self.rounds = int(state["proposed"]), int(state["rounds"])
        self.design_points = [np.asarray(d, dtype=float) for d in state["design"]]


def _algorithm(n_objectives: int, population: int):
    if n_objectives <= 2:
        from pymoo.algorithms.moo.nsga2 import NSGA2

        return NSGA2(pop_size=population)
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.util.ref_dirs import get_reference_directions

    refs = get_reference_directions("energy", n_objectives, population, seed=1)
    return NSGA3(ref_dirs=refs, pop_size=population)


def _spread(f: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k rows of `f` far apart from each other (greedy farthest-point, from the first
    objective's best)."""
    scale = np.maximum(np.ptp(f, axis=0), 1e-12)
    g = (f - f.min(axis=0)) / scale
    chosen = [int(np.argmin(f[:, 0]))]
    while len(chosen) < k:
        distance = np.min(np.linalg.norm(g[:, None, :] - g[chosen][None], axis=2), axis=1)
        distance[chosen] = -1
        chosen.append(int(np.argmax(distance)))
    return chosen


class NestedMAP(Optimizer):
    """Nested MAP for many tasks: merge two at a time. Stage k runs MAP over (alpha, beta) with
    genome = alpha * anchor + beta * e_k (the anchor starts as e_0), spends `stage_budget`
    evaluations, then fixes the anchor at the stage's preferred point (the best
    `preference`-weighted sum of surrogate predictions) and moves to the next model. The last
    stage keeps proposing from its surrogate front."""

    name = "nested_map"
    multi_objective = True

    def __init__(
        self,
        lower,
        upper,
        x0,
        n_objectives: int,
        seed: int,
        *,
        stage_budget: int = 24,
        preference: Optional[list[float]] = None,
        verify: int = 6,
        generations: int = 60,
    ) -> None:
        super().__init__(lower, upper, x0, n_objectives, seed)
        if self.dim < 2 or not np.all(np.isfinite(self.lower) & np.isfinite(self.upper)):
            raise EvomergeError("optimizer nested_map: needs >= 2 genes, all bounded")
        if stage_budget < 12:
            raise EvomergeError("optimizer.options.stage_budget: needs at least 12")
        weights = preference if preference is not None else [1.0] * n_objectives
        if len(weights) != n_objectives:
            raise EvomergeError("optimizer.options.preference: one weight per objective")
        self.preference = np.asarray(weights, dtype=float)
        self.stage_budget, self.verify, self.generations = stage_budget, verify, generations
        self.stage = 1
        self.anchor = np.eye(self.dim)[0] * self.upper[0]
        self.stage_told = 0
        self.routes: dict[int, int] = {}  # our ask index -> the stage optimizer's
        self.sub = self._stage_optimizer()

    def _stage_optimizer(self) -> MAP:
        hi = float(np.max(self.upper))
        return MAP(
            np.zeros(2),
            np.full(2, hi),
            np.full(2, hi / 2),
            self.n_objectives,
            self.seed + self.stage,
            verify=self.verify,
            generations=self.generations,
        )

    def genome(self, ab: np.ndarray) -> np.ndarray:
        full = ab[0] * self.anchor + ab[1] * np.eye(self.dim)[self.stage]
        return np.clip(full, self.lower, self.upper)

    def _propose(self, n: int) -> list[np.ndarray]:
        if self.stage < self.dim - 1 and self.sub.asked >= self.stage_budget:
            if self.stage_told < self.stage_budget:
                return []  # finish the stage before choosing its point
            self._next_stage()
        room = n if self.stage == self.dim - 1 else min(n, self.stage_budget - self.sub.asked)
        out = []
        for k, c in enumerate(self.sub.ask(room)):
            self.routes[self.asked + k] = c.index
            out.append(self.genome(c.genome))
        return out

    def _next_stage(self) -> None:
        grid = np.array(
            [
                [a, b]
                for a in np.linspace(0, self.sub.upper[0], 41)
                for b in np.linspace(0, self.sub.upper[1], 41)
            ]
        )
        predicted = np.column_stack([m(grid) for m in self.sub.surrogates()])
        best = grid[int(np.argmin(predicted @ self.preference))]
        self.anchor = self.genome(best)
        self.stage += 1
        self.stage_told = 0
        self.routes = {}
        self.sub = self._stage_optimizer()

    def _learn(self, evaluation: Evaluation) -> None:
        index = self.routes.pop(evaluation.index, None)
        if index is None:
            return  # from a finished stage: the surrogates have moved on
        genome = self.sub.outstanding[index]
        self.sub.tell(Evaluation(index, genome, self.losses_of(evaluation)))
        self.stage_told += 1

    def _state(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "anchor": self.anchor,
            "stage_told": self.stage_told,
            "routes": {str(k): v for k, v in self.routes.items()},
            "sub": self.sub.state_dict(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.stage, self.stage_told = int(state["stage"]), int(state["stage_told"])
        self.anchor = np.asarray(state["anchor"], dtype=float)
        self.routes = {int(k): int(v) for k, v in state["routes"].items()}
        self.sub = self._stage_optimizer()
        self.sub.load_state_dict(state["sub"])
