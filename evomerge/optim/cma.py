"""CMA-ES and Sep-CMA-ES from the cmaes package, with state saved without pickle.

cmaes objects expose their state through __getstate__ (everything but the RNG); we store that
dict as JSON values and arrays and the RNG state beside it, so a restored optimizer asks the
same points as one that never stopped. Above ~100 dimensions a full covariance learns slowly
and costs O(n^2) memory: use Sep-CMA-ES there (`sep_cma`), or CMA with n_max_resampling=1.

The strategy's arrays change only when a generation is asked or told, so they are checkpointed
as a frozen part once per change, not on every tell (a 2,000-gene covariance is 32 MB).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from cmaes import CMA, SepCMA

from evomerge.errors import EvomergeError
from evomerge.optim.base import Evaluation, Optimizer, rng_state, set_rng_state
from evomerge.optim.state import Frozen


class CMAES(Optimizer):
    name = "cma"
    generational = True
    strategy = CMA
    takes_steps = True

    def __init__(
        self,
        lower,
        upper,
        x0,
        n_objectives: int,
        seed: int,
        steps: Optional[np.ndarray] = None,
        *,
        sigma: Optional[float] = None,
        population_size: Optional[int] = None,
        n_max_resampling: Optional[int] = None,
        random_start: bool = False,
    ) -> None:
        if random_start:  # mergekit-evolve's random_init: a start drawn in the box, by the seed
            rng = np.random.default_rng(seed)
            x0 = rng.uniform(np.asarray(lower, dtype=float), np.asarray(upper, dtype=float))
        super().__init__(lower, upper, x0, n_objectives, seed)
        width = float(np.min(self.upper - self.lower))
        self.cov: Optional[np.ndarray] = None
        if sigma is None and steps is not None:
            # the space's own first steps per gene: sigma times the root of a diagonal covariance
            steps = np.asarray(steps, dtype=float)
            if steps.shape != self.lower.shape or not np.all(steps > 0):
                raise EvomergeError("search space: step sizes must be one positive value per gene")
            if self.strategy is CMA:
                sigma = float(np.max(steps))
                self.cov = np.diag((steps / sigma) ** 2)
            else:
                sigma = float(np.min(steps))
        sigma = sigma if sigma is not None else width / 4
        if not sigma > 0:
            raise EvomergeError("optimizer.options.sigma: must be > 0")
        if population_size is not None and population_size < 2:
            raise EvomergeError("optimizer.options.population_size: must be >= 2")
        if n_max_resampling is None:
            n_max_resampling = 1 if self.dim > 100 else 100
        self.settings = {
            "sigma": sigma,
            "seed": seed,
            "population_size": population_size,
            "n_max_resampling": n_max_resampling,
        }
        self.es = self._strategy_at(self.x0)
        self.frozen_es: Optional[Frozen] = None  # the strategy as last saved; None once changed
        self.generation_asked = 0
        self.results: list[tuple[np.ndarray, float]] = []
        self.seed_results: list[tuple[np.ndarray, float]] = []

    def _strategy_at(self, mean: np.ndarray) -> Any:
        bounds = np.stack([self.lower, self.upper], axis=1)
        extra = {"cov": self.cov} if self.cov is not None else {}
        return self.strategy(
            mean=np.array(mean, dtype=float), bounds=bounds, **self.settings, **extra
        )

    # ----- seeds: scored first, the mean starts at the best of them ------------------------------
    def seed_with(self, genomes: list[np.ndarray]) -> None:
        """The configured start is scored beside the seeds, so the search starts at whichever of
        them is best."""
        genomes = list(genomes)
        if genomes and not any(np.allclose(g, self.x0) for g in genomes):
            genomes.append(self.x0)
        super().seed_with(genomes)

    def _learn_seed(self, evaluation: Evaluation) -> None:
        loss = float(self.losses_of(evaluation)[0])
        self.seed_results.append((np.asarray(evaluation.genome, dtype=float), loss))
        if len(self.seed_results) == len(self.seeds):
            best = min(self.seed_results, key=lambda pair: pair[1])[0]
            self.es = self._strategy_at(np.clip(best, self.lower, self.upper))
            self.frozen_es = None

    @property
    def population_size(self) -> int:
        return self.es.population_size

    def _propose(self, n: int) -> list[np.ndarray]:
        if len(self.seed_results) < len(self.seeds):
            return []  # the first generation is sampled around the best seed: wait for them
        room = max(0, min(n, self.population_size - self.generation_asked))
        self.generation_asked += room
        if room:
            self.frozen_es = None  # asking caches the eigen decomposition inside the strategy
        return [self.es.ask() for _ in range(room)]

    def _learn(self, evaluation: Evaluation) -> None:
        loss = float(self.losses_of(evaluation)[0])
        self.results.append((np.asarray(evaluation.genome, dtype=float), loss))
        if len(self.results) == self.population_size:
            self.es.tell(self.results)
            self.frozen_es = None
            self.results = []
            self.generation_asked = 0

    def _state(self) -> dict[str, Any]:
        if self.frozen_es is None:
            es = self.es.__getstate__()
            if "_c_1d" in es:  # keep C whole: a symmetrised copy would drift from the original
                es["_c_1d"] = np.zeros(0)
                es["_C_full"] = self.es._C
            self.frozen_es = Frozen(es)
        return {
            "es": self.frozen_es,
            "rng": rng_state(self.es._rng),
            "generation_asked": self.generation_asked,
            "results": [[x, f] for x, f in self.results],
            "seed_results": [[x, f] for x, f in self.seed_results],
        }

    def _load(self, state: dict[str, Any]) -> None:
        saved = dict(state["es"])
        full_c = saved.pop("_C_full", None)
        es = self.strategy.__new__(self.strategy)
        if full_c is not None:
            saved["_c_1d"] = np.zeros(full_c.shape[0] * (full_c.shape[0] + 1) // 2)
        es.__setstate__(saved)
        if full_c is not None:
            es._C = np.array(full_c)
        set_rng_state(es._rng, state["rng"])
        self.es = es
        self.frozen_es = None
        self.generation_asked = int(state["generation_asked"])
        self.results = [(np.asarray(x), float(f)) for x, f in state["results"]]
        self.seed_results = [(np.asarray(x), float(f)) for x, f in state.get("seed_results", [])]


class SepCMAES(CMAES):
    """Diagonal covariance: linear cost in the dimension, for large genomes."""

    name = "sep_cma"
    strategy = SepCMA
