"""Multi-fidelity racing: score every candidate on a few documents, and only the promising ones
on more.

Stages are document counts per task (`fitness.fidelity.stages`, e.g. [16, 32, full]). Each task's
documents are put in one fixed order drawn from the run's seed, the same for every candidate, so
stage k scores the first n_k documents of every task in that order (the same number from each
task), and a promotion scores only the documents the stage adds: per-document results are kept
and aggregated again, nothing is scored twice. A candidate that finishes a stage is ranked
against the latest `window` candidates that finished the same stage (Pareto rank, then mean
rank); if it is among the best `promote` fraction it goes on to the next stage, else its race
ends there.

What the optimizer is told when a race ends below the last stage is corrected so that the
racing decisions hold in the optimizer's eyes: the stage score is shifted by the mean change
from that stage to the last one reached among candidates that went on (a small subset is
optimistic for the ones it promotes), and then capped so that the candidate is dominated by
every candidate promoted out of its window. With `estimator: irt` the stage score is instead
the item-response estimate of the score on all documents (irt.py), capped the same way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from evomerge.config import Fidelity, Objective
from evomerge.results.pareto import losses_of
from evomerge.search import irt

# per-document results: task -> document id (as a string: JSON keys) -> "metric,filter" -> value
Documents = dict[str, dict[str, dict[str, float]]]
REFIT_EVERY = 0.1  # the item model is refit once the candidates it knows grow by this fraction


@dataclass
class Stage:
    """One stage's result for one candidate, as raw aggregates of the documents up to it."""

    metrics: dict[str, float]
    values: dict[str, float]  # objective values on this stage's documents (what ranks it)
    seconds: float
    seq: int  # order in which stage results arrived, over the whole run
    promoted: bool = False
    worker: str = ""


@dataclass
class Race:
    """A candidate on its way through the stages."""

    index: int
    genome_key: str
    recipe: str
    stages: list[Stage] = field(default_factory=list)
    documents: Documents = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Race:
        return cls(
            index=int(data["index"]),
            genome_key=data["genome_key"],
            recipe=data["recipe"],
            stages=[Stage(**s) for s in data.get("stages", [])],
            documents=data.get("documents", {}),
        )


class DocumentPlan:
    """Which documents each stage scores, per task."""

    def __init__(self, fidelity: Fidelity, universe: dict[str, list[int]], seed: int) -> None:
        self.order = {}
        for task, docs in universe.items():
            shuffled = list(docs)
            random.Random(f"{seed}:{task}").shuffle(shuffled)
            self.order[task] = shuffled
        self.sizes = [None if s == "full" else int(s) for s in fidelity.stages]

    @property
    def n_stages(self) -> int:
        return len(self.sizes)

    def _count(self, task: str, stage: int) -> int:
        size = self.sizes[stage]
        return len(self.order[task]) if size is None else min(size, len(self.order[task]))

    def stage_docs(self, stage: int) -> dict[str, list[int]]:
        """Every document stage `stage` is scored on (those of the stages before included)."""
        return {task: order[: self._count(task, stage)] for task, order in self.order.items()}

    def new_docs(self, stage: int) -> dict[str, list[int]]:
        """The documents stage `stage` adds to the one before."""
        return {
            task: order[(self._count(task, stage - 1) if stage else 0) : self._count(task, stage)]
            for task, order in self.order.items()
        }


def check_stages(fidelity: Fidelity, universe: dict[str, list[int]]) -> Optional[str]:
    """Why the stages do not fit the tasks (a stage with more documents than a task), or None."""
    for size in fidelity.stages:
        if size == "full":
            continue
        for task, docs in universe.items():
            if size > len(docs):
                return (
                    f"stage {size} is larger than task {task!r} ({len(docs)} documents); "
                    "use smaller stages or end with full"
                )
    return None


def aggregate(documents: Documents, docs: dict[str, list[int]]) -> dict[str, float]:
    """Each task's metrics as the mean over `docs` (lm-eval's aggregation for acc, exact_match
    and the other per-document means)."""
    out: dict[str, float] = {}
    for task, ids in docs.items():
        scored = documents.get(task, {})
        rows = [scored[str(i)] for i in ids if str(i) in scored]
        if len(rows) < len(ids):
            missing = next(i for i in ids if str(i) not in scored)
            raise KeyError(f"task {task!r}: document {missing} was not scored")
        for key in rows[0] if rows else []:
            out[f"{task}: {key}"] = float(np.mean([row[key] for row in rows]))
    return out


def merge_documents(into: Documents, new: Documents) -> None:
    for task, docs in new.items():
        into.setdefault(task, {}).update(docs)


def promotion_position(losses: np.ndarray, row: int) -> int:
    """Where row `row` of a window's losses ranks: by Pareto front, then by mean rank."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    n = len(losses)
    front = np.zeros(n, dtype=int)
    for level, members in enumerate(NonDominatedSorting().do(losses)):
        front[members] = level
    mean_rank = np.argsort(np.argsort(losses, axis=0, kind="stable"), axis=0).mean(axis=1)
    order = sorted(range(n), key=lambda i: (front[i], mean_rank[i], i != row))
    return order.index(row)


class Racer:
    """The racing decisions and the corrected scores, rebuilt from the store on resume."""

    def __init__(
        self,
        fidelity: Fidelity,
        plan: DocumentPlan,
        objectives: Sequence[Objective],
    ) -> None:
        self.fidelity = fidelity
        self.plan = plan
        self.objectives = list(objectives)
        self.window = fidelity.window
        self.races: dict[int, Race] = {}  # every race known, by ask index
        self.references: list[Documents] = []  # sources and baselines: full documents
        self.seq = 0
        self._items: dict[tuple[str, str], irt.Items] = {}
        self._fitted_on = 0

    # ----- what the run knows ---------------------------------------------------------------
    def know(self, race: Race) -> None:
        self.races[race.index] = race
        if race.stages:
            self.seq = max(self.seq, max(s.seq for s in race.stages) + 1)

    def know_reference(self, documents: Optional[Documents]) -> None:
        if documents:
            self.references.append(documents)

    @property
    def last(self) -> int:
        return self.plan.n_stages - 1

    def per_example(self, documents: Documents) -> Optional[list[float]]:
        """The per-example scores the optimizer sees (M2N2): the first stage's documents, which
        every candidate has, in plan order, each task's first metric."""
        out: list[float] = []
        for task, ids in self.plan.stage_docs(0).items():
            scored = documents.get(task, {})
            if not ids or str(ids[0]) not in scored:
                return None
            key = next(iter(scored[str(ids[0])]))
            out += [float(scored[str(i)][key]) for i in ids]
        return out

    # ----- one stage's result ---------------------------------------------------------------
    def add_stage(
        self, race: Race, documents: Documents, values_of, seconds: float, worker: str
    ) -> Stage:
        """Fold a stage's documents into `race`, score the stage, decide on promotion."""
        merge_documents(race.documents, documents)
        k = len(race.stages)
        metrics = aggregate(race.documents, self.plan.stage_docs(k))
        values = values_of(metrics)
        stage = Stage(metrics, values, seconds, self.seq, worker=worker)
        self.seq += 1
        race.stages.append(stage)
        self.races[race.index] = race
        if values is not None and k < self.last:
            window = self._window(k, race)
            scores = [self.score(r, k, values_of) for r in window]
            position = promotion_position(losses_of(scores, self.objectives), len(window) - 1)
            stage.promoted = position < math.ceil(self.fidelity.promote * len(window))
        return stage

    def _window(self, k: int, race: Race) -> list[Race]:
        """The latest `window` races that finished stage k up to `race` (itself last)."""
        mine = race.stages[k].seq
        earlier = [
            r
            for r in self.races.values()
            if r.index != race.index
            and len(r.stages) > k
            and r.stages[k].seq < mine
            and r.stages[k].values is not None
        ]
        earlier.sort(key=lambda r: r.stages[k].seq)
        return earlier[-(self.window - 1) :] + [race] if self.window > 1 else [race]

    # ----- what the optimizer is told -------------------------------------------------------
    def score(self, race: Race, k: int, values_of) -> dict[str, float]:
        """The values stage k stands for: raw, or estimated on all documents (irt)."""
        if self.fidelity.estimator == "mean" or k == self.last:
            return race.stages[k].values
        estimated = self.estimate_metrics(race.documents, k)
        values = values_of(estimated)
        return values if values is not None else race.stages[k].values

    def told(self, race: Race, values_of) -> dict[str, float]:
        """What the optimizer and the store get for a race that ends at its last stage."""
        k = len(race.stages) - 1
        values = dict(self.score(race, k, values_of))
        if k == self.last:
            return values
        if self.fidelity.estimator == "mean":
            for name, shift in self._offsets(k).items():
                values[name] += shift
        promoted = [r for r in self._window(k, race)[:-1] if r.stages[k].promoted]
        for o in self.objectives:  # dominated by every candidate promoted out of its window
            latest = [r.stages[-1].values[o.name] for r in promoted if r.stages[-1].values]
            if latest:
                pick = min if o.direction == "maximize" else max
                bound = pick(latest)
                values[o.name] = pick(values[o.name], bound)
        return values

    def _offsets(self, k: int) -> dict[str, float]:
        """Mean change of each objective from stage k to the last stage reached, over races
        that went past k."""
        diffs: dict[str, list[float]] = {o.name: [] for o in self.objectives}
        for r in self.races.values():
            if len(r.stages) > k + 1 and r.stages[k].values and r.stages[-1].values:
                for o in self.objectives:
                    diffs[o.name].append(r.stages[-1].values[o.name] - r.stages[k].values[o.name])
        return {name: float(np.mean(d)) for name, d in diffs.items() if d}

    # ----- the item-response estimator ------------------------------------------------------
    def estimate_metrics(self, documents: Documents, k: int) -> dict[str, float]:
        """Every task metric's estimated mean over all its documents, from those scored by
        stage k; non-binary metrics keep their plain mean."""
        self._refit()
        seen = self.plan.stage_docs(k)
        out = aggregate(documents, seen)
        for (task, key), items in self._items.items():
            order = self.plan.order[task]
            row = np.full(len(order), np.nan)
            for j, doc in enumerate(order):
                value = documents.get(task, {}).get(str(doc), {}).get(key)
                if value is not None:
                    row[j] = value
            out[f"{task}: {key}"] = irt.estimate_mean(row, items)
        return out

    def _refit(self) -> None:
        known = [r.documents for r in self.races.values() if r.documents] + self.references
        if self._items and len(known) < self._fitted_on * (1 + REFIT_EVERY) + 1:
            return
        self._items = {}
        for task, order in self.plan.order.items():
            keys = {key for docs in known for row in docs.get(task, {}).values() for key in row}
            for key in sorted(keys):
                matrix = np.full((len(known), len(order)), np.nan)
                for i, docs in enumerate(known):
                    scored = docs.get(task, {})
                    for j, doc in enumerate(order):
                        value = scored.get(str(doc), {}).get(key)
                        if value is not None:
                            matrix[i, j] = value
                if irt.is_binary(matrix):
                    self._items[(task, key)] = irt.fit_items(matrix)
        self._fitted_on = len(known)
