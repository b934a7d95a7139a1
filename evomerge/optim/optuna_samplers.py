"""NSGA-II and TPE through Optuna's ask/tell, as plain evomerge optimizers.

The sampler works on an in-memory study that mirrors what it was told. Its state (every trial
with its parameters, values and the sampler's bookkeeping attributes, the study's attributes,
and each random state inside the sampler) is saved as JSON values, and a restored sampler sees
the same study and draws the same numbers. Told trials and the samplers' cached study attributes
never change again, so they are saved in frozen chunks: a checkpoint writes the open trials and
the newest chunk, not the whole history.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.trial import FrozenTrial, TrialState

from evomerge.errors import EvomergeError
from evomerge.optim.base import Evaluation, Optimizer, rng_state, set_rng_state
from evomerge.optim.state import Frozen

optuna.logging.set_verbosity(optuna.logging.WARNING)
CHUNK = 256  # most trials (or study attributes) per frozen part
CHUNK_VALUES = 65_536  # most parameter values per frozen part (512 KB): big genomes, fewer trials
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


class OptunaOptimizer(Optimizer):
    multi_objective = True

    def __init__(self, lower, upper, x0, n_objectives: int, seed: int, **options: Any) -> None:
        super().__init__(lower, upper, x0, n_objectives, seed)
        self.options = options
        self.sampler = self._make_sampler(seed, options)
        self.study = optuna.create_study(
            directions=["minimize"] * n_objectives, sampler=self.sampler
        )
        self.distributions = {
            f"x{i}": FloatDistribution(float(lo), float(hi))
            for i, (lo, hi) in enumerate(zip(self.lower, self.upper))
        }
        self.running: dict[int, optuna.Trial] = {}
        self.enqueued_x0 = False
        self.frozen_trials: list[Frozen] = []  # chunk k: trials k*CHUNK .. (k+1)*CHUNK-1
        self.frozen_attrs: list[Frozen] = []  # chunk k: study attributes in insertion order

    def _make_sampler(self, seed: int, options: dict[str, Any]) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def _propose(self, n: int) -> list[np.ndarray]:
        out = []
        for k in range(n):
            if not self.enqueued_x0:  # the search space's start point is the first candidate
                self.study.enqueue_trial(
                    {name: float(v) for name, v in zip(self.distributions, self.x0)}
                )
                self.enqueued_x0 = True
            trial = self.study.ask(self.distributions)
            self.running[self.asked + k] = trial
            out.append(self._genome(trial))
        return out

    def _ask_seed(self, genome: np.ndarray) -> np.ndarray:
        """Seeds are enqueued trials: the sampler sees them as its own first trials."""
        self.study.enqueue_trial({name: float(v) for name, v in zip(self.distributions, genome)})
        trial = self.study.ask(self.distributions)
        self.running[self.asked] = trial
        return self._genome(trial)

    def _genome(self, trial: optuna.Trial) -> np.ndarray:
        params = trial.params  # a fresh deep copy on every access: take it once
        return np.array([params[name] for name in self.distributions])

    def _learn(self, evaluation: Evaluation) -> None:
        trial = self.running.pop(evaluation.index)
        self.study.tell(trial, [float(v) for v in self.losses_of(evaluation)])

    # ----- state ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        storage, sid = self.study._storage, self.study._study_id
        trials = storage.get_all_trials(sid, deepcopy=False)
        index_of = {r.number: i for i, r in self.running.items()}
        chunk = max(1, min(CHUNK, CHUNK_VALUES // self.dim))
        start = len(self.frozen_trials) * chunk  # rows only for the trials not frozen yet
        rows = [self._trial_row(t, index_of.get(t.number)) for t in trials[start:]]
        attrs = list(storage.get_study_system_attrs(sid).items())
        return {
            "trials": self._freeze(rows, self.frozen_trials, start, chunk, _told),
            # the samplers' study attributes are caches written once (NSGA-II's parents)
            "study_system_attrs": self._freeze(
                attrs, self.frozen_attrs, 0, CHUNK, lambda item: True
            ),
            "rngs": {path: rng_state(r.rng) for path, r in _random_states(self.sampler)},
            "enqueued_x0": self.enqueued_x0,
        }

    def _trial_row(self, trial: FrozenTrial, index: Optional[int]) -> dict[str, Any]:
        params = trial.params
        return {
            "number": trial.number,
            "state": trial.state.name,
            # an array (binary in the checkpoint), not a JSON list: genomes can be long
            "params": np.array([params[name] for name in self.distributions]) if params else None,
            "values": trial.values,
            "system_attrs": trial.system_attrs,
            "index": index,
        }

    @staticmethod
    def _freeze(items: list, frozen: list[Frozen], start: int, chunk: int, settled) -> list:
        """`items` (everything from item `start` on) as the frozen chunks so far, then full
        chunks of settled items frozen now (kept for later checkpoints), then the rest as they
        are. Settled items (told trials, cached attributes) never change again."""
        items = items[len(frozen) * chunk - start :]
        while len(items) >= chunk and all(settled(item) for item in items[:chunk]):
            frozen.append(Frozen(items[:chunk]))
            items = items[chunk:]
        return [*frozen, *items]

    def _load(self, state: dict[str, Any]) -> None:
        self.sampler = self._make_sampler(self.seed, self.options)
        self.study = optuna.create_study(
            directions=["minimize"] * self.n_objectives, sampler=self.sampler
        )
        storage, sid = self.study._storage, self.study._study_id
        attrs = state["study_system_attrs"]
        for key, value in _unchunked(attrs.items() if isinstance(attrs, dict) else attrs):
            storage.set_study_system_attr(sid, key, value)
        self.running = {}
        self.frozen_trials, self.frozen_attrs = [], []
        for t in _unchunked(state["trials"]):
            params = (
                {name: float(v) for name, v in zip(self.distributions, t["params"])}
                if t["params"] is not None
                else {}
            )
            kind = TrialState[t["state"]]
            frozen = FrozenTrial(
                number=t["number"],
                state=kind,
                value=None,
                values=t["values"] if kind == TrialState.COMPLETE else None,
                datetime_start=None,
                datetime_complete=None,
                params=params,
                distributions={k: self.distributions[k] for k in params},
                user_attrs={},
                system_attrs=t["system_attrs"],
                intermediate_values={},
                trial_id=-1,
            )
            trial_id = storage.create_new_trial(sid, template_trial=frozen)
            if t["index"] is not None:
                self.running[int(t["index"])] = optuna.Trial(self.study, trial_id)
        states = dict(_random_states(self.sampler))
        for path, value in state["rngs"].items():
            set_rng_state(states[path].rng, value)
        self.enqueued_x0 = bool(state["enqueued_x0"])


def _told(row: dict[str, Any]) -> bool:
    return row["state"] in {state.name for state in FINISHED}


def _unchunked(items) -> list:
    """Saved items with frozen chunks (read back as lists) spliced in."""
    out: list = []
    for item in items:
        if isinstance(item, list) and item and isinstance(item[0], (dict, list)):
            out.extend(item)  # a chunk of trials (dicts) or of attribute pairs (lists)
        else:
            out.append(item)
    return out


def _random_states(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Every LazyRandomState reachable from the sampler through its attributes, by path."""
    found: list[tuple[str, Any]] = []
    for name, value in sorted(vars(obj).items()):
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, LazyRandomState):
            found.append((path, value))
        elif (
            depth < 2 and hasattr(value, "__dict__") and type(value).__module__.startswith("optuna")
        ):
            found.extend(_random_states(value, path, depth + 1))
    return found


class NSGA2(OptunaOptimizer):
    """Optuna puts a new trial in the current generation until `population_size` of that
    generation have completed, so asking ahead of the results would grow generation 0 into a
    random search. The barrier here keeps generations whole: a generation is asked in full, and
    the next only once all of it was told."""

    name = "nsga2"
    generational = True

    def __init__(self, lower, upper, x0, n_objectives: int, seed: int, **options: Any) -> None:
        super().__init__(lower, upper, x0, n_objectives, seed, **options)
        self.population_size = int(self.sampler.population_size)
        self.generation_asked = 0

    def _propose(self, n: int) -> list[np.ndarray]:
        if not self.running and self.generation_asked >= self.population_size:
            self.generation_asked = 0  # the previous generation is complete
        room = max(0, min(n, self.population_size - self.generation_asked))
        self.generation_asked += room
        genomes = super()._propose(room)
        for k in range(room):  # the enqueued start point gets none itself: it belongs to gen 0
            self._join_generation(self.running[self.asked + k])
        return genomes

    def _ask_seed(self, genome: np.ndarray) -> np.ndarray:
        """Seeds are members of generation 0 (or the next, when they outnumber it)."""
        genome = super()._ask_seed(genome)
        self.generation_asked += 1
        self._join_generation(self.running[self.asked])
        return genome

    def _join_generation(self, trial: optuna.Trial) -> None:
        frozen = self.study._storage.get_trial(trial._trial_id)
        self.sampler.get_trial_generation(self.study, frozen)

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "generation_asked": self.generation_asked}

    def _load(self, state: dict[str, Any]) -> None:
        super()._load(state)
        self.generation_asked = int(state.get("generation_asked", 0))

    def _make_sampler(self, seed: int, options: dict[str, Any]) -> optuna.samplers.BaseSampler:
        size: Optional[int] = options.get("population_size", 16)
        if size is None or size < 2:
            raise EvomergeError("optimizer.options.population_size: must be >= 2")
        return optuna.samplers.NSGAIISampler(
            seed=seed,
            population_size=size,
            mutation_prob=options.get("mutation_prob"),
            crossover_prob=options.get("crossover_prob", 0.9),
        )


class TPE(OptunaOptimizer):
    name = "tpe"

    def _make_sampler(self, seed: int, options: dict[str, Any]) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=options.get("n_startup_trials", 10),
            multivariate=options.get("multivariate", True),
            constant_liar=options.get("constant_liar", True),
        )
