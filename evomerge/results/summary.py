"""A run's standing, kept up to date as evaluations are committed.

`evomerge status` on a long run should cost the same at a hundred evaluations and at a hundred
thousand: it reads this summary (counts, the best of each objective, the Pareto set, the worst
value seen, the last failures) instead of every evaluation. The store updates it after each
commit and writes it beside the store as `summary.json`; it names how many evaluations it
covers, so a summary that lags the store (a kill between the two writes, a run made before
summaries) is seen as such and rebuilt from the evaluations.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

FILE = "summary.json"
FORMAT = 1
LAST_FAILURES = 5


class Committed(Protocol):
    """What the summary reads of an evaluation (store.Record has it)."""

    number: int
    index: int
    values: Optional[dict[str, float]]
    error: Optional[str]
    origin: str
    worker: str
    stages: Optional[list[dict[str, Any]]]
    final: bool


def out_of_memory(error: object) -> bool:
    """A failure the device's memory caused (torch's OutOfMemoryError, CUDA's message)."""
    text = str(error or "")
    return text.startswith("OutOfMemoryError") or "out of memory" in text.lower()


@dataclass
class Member:
    """One evaluation of the Pareto set (or the best of one objective)."""

    number: int  # position in the store
    index: int  # the optimizer's ask index
    values: dict[str, float]
    origin: str
    worker: str


@dataclass
class RunSummary:
    objectives: list[str]
    directions: list[str]  # "maximize" / "minimize", one per objective
    evaluations: int = 0
    failed: int = 0
    out_of_memory: int = 0
    ended_at_stage: dict[int, int] = field(default_factory=dict)  # racing: stage -> count
    best: dict[str, Member] = field(default_factory=dict)  # objective -> best final evaluation
    pareto: list[Member] = field(default_factory=list)  # non-dominated final ones, ties kept
    worst: Optional[list[float]] = None  # per objective, as a loss: the largest seen
    failures: list[dict[str, Any]] = field(default_factory=list)  # the last few: index, error
    # each Pareto member's loss, computed once (every commit compares with the whole set)
    _losses: dict[int, list[float]] = field(default_factory=dict, repr=False, compare=False)

    def add(self, record: Committed) -> None:
        self.evaluations += 1
        if record.stages is not None:
            stage = len(record.stages) - 1
            self.ended_at_stage[stage] = self.ended_at_stage.get(stage, 0) + 1
        if record.values is None:
            self.failed += 1
            self.out_of_memory += out_of_memory(record.error)
            self.failures = [*self.failures, {"index": record.index, "error": record.error}]
            self.failures = self.failures[-LAST_FAILURES:]
            return
        if not record.final:  # an early stop's value is a told estimate, not a score
            return
        member = Member(
            record.number, record.index, dict(record.values), record.origin, record.worker
        )
        loss = self.loss(member.values)
        self.worst = loss if self.worst is None else [max(a, b) for a, b in zip(self.worst, loss)]
        for k, (name, value) in enumerate(zip(self.objectives, loss)):
            best = self.best.get(name)
            if not math.isnan(value) and (best is None or value < self.loss(best.values)[k]):
                self.best[name] = member
        front = [(m, self._front_loss(m)) for m in self.pareto]
        if any(_dominates(other, loss) for _, other in front):
            return
        self.pareto = [m for m, other in front if not _dominates(loss, other)]
        self.pareto.append(member)
        self.pareto.sort(key=lambda m: m.number)

    def _front_loss(self, member: Member) -> list[float]:
        if member.number not in self._losses:
            self._losses[member.number] = self.loss(member.values)
        return self._losses[member.number]

    def loss(self, values: dict[str, float]) -> list[float]:
        return [
            -values[name] if direction == "maximize" else values[name]
            for name, direction in zip(self.objectives, self.directions)
        ]

    # ----- persistence ---------------------------------------------------------------------
    @classmethod
    def of(
        cls, records: Iterable[Committed], objectives: Sequence[str], directions: Sequence[str]
    ) -> RunSummary:
        summary = cls(list(objectives), list(directions))
        for record in records:
            summary.add(record)
        return summary

    def to_json(self) -> dict[str, Any]:
        # by hand, not dataclasses.asdict: its deep copies cost 10x on a large Pareto set, and
        # this runs after every commit
        return {
            "format": FORMAT,
            "objectives": self.objectives,
            "directions": self.directions,
            "evaluations": self.evaluations,
            "failed": self.failed,
            "out_of_memory": self.out_of_memory,
            "ended_at_stage": {str(k): v for k, v in self.ended_at_stage.items()},
            "best": {k: m.__dict__ for k, m in self.best.items()},
            "pareto": [m.__dict__ for m in self.pareto],
            "worst": self.worst,
            "failures": self.failures,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        if data.get("format") != FORMAT:
            raise ValueError(f"summary format {data.get('format')!r}")
        return cls(
            objectives=list(data["objectives"]),
            directions=list(data["directions"]),
            evaluations=int(data["evaluations"]),
            failed=int(data["failed"]),
            out_of_memory=int(data["out_of_memory"]),
            ended_at_stage={int(k): int(v) for k, v in data["ended_at_stage"].items()},
            best={k: Member(**v) for k, v in data["best"].items()},
            pareto=[Member(**m) for m in data["pareto"]],
            worst=data["worst"],
            failures=list(data["failures"]),
        )

    def write(self, folder: Path) -> None:
        """Atomically (a reader sees the old summary or the new one, never half of one)."""
        path = Path(folder) / FILE
        tmp = path.with_name(f".{FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")))
        os.replace(tmp, path)

    @classmethod
    def read(cls, folder: Path) -> Optional[RunSummary]:
        """The stored summary, or None where there is none or it cannot be read."""
        try:
            return cls.from_json(json.loads((Path(folder) / FILE).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """`a` is no worse than `b` everywhere and better somewhere (both losses)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))
