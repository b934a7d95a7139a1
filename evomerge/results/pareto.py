"""The trade-offs a run found: its non-dominated evaluations and their hypervolume.

Objectives are turned into losses (maximised ones negated) for pymoo. The hypervolume reference
point is the config's `reference` when given, else the worst value of each objective among the
source models' scores (scored at the start of the run), else the worst value seen in the run;
either way it is recorded with the figure, since hypervolumes are comparable only under one
reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Protocol, TypeVar

import numpy as np

from evomerge.config import Objective


def losses_of(values: Sequence[dict[str, float]], objectives: Sequence[Objective]) -> np.ndarray:
    return np.array(
        [
            [(-1.0 if o.direction == "maximize" else 1.0) * v[o.name] for o in objectives]
            for v in values
        ],
        dtype=float,
    ).reshape(len(values), len(objectives))


def non_dominated(losses: np.ndarray) -> np.ndarray:
    """Indices of the rows no other row dominates (ties kept)."""
    if len(losses) == 0:
        return np.zeros(0, dtype=int)
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    return np.sort(NonDominatedSorting().do(losses, only_non_dominated_front=True))


def front_positions(
    values: Sequence[Optional[dict[str, float]]], objectives: Sequence[Objective]
) -> list[int]:
    """Positions of the non-dominated entries of `values` (None: a failed evaluation)."""
    ok = [i for i, v in enumerate(values) if v is not None]
    if not ok:
        return []
    losses = losses_of([values[i] for i in ok], objectives)
    return [ok[k] for k in non_dominated(losses)]


class Scored(Protocol):
    values: Optional[dict[str, float]]  # objective values; None for a failed evaluation


S = TypeVar("S", bound=Scored)


def pareto_records(records: Sequence[S], objectives: Sequence[Objective]) -> list[S]:
    """The non-dominated successful evaluations among `records`, in their order; with racing,
    among those scored at full fidelity (an early stop's score is a told estimate)."""
    values = [r.values if getattr(r, "final", True) else None for r in records]
    return [records[i] for i in front_positions(values, objectives)]


def hypervolume(losses: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by `losses` and bounded by `reference` (points beyond it add nothing)."""
    from pymoo.indicators.hv import HV

    inside = losses[np.all(losses < reference, axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(HV(ref_point=np.asarray(reference, dtype=float))(inside))


def hypervolume_curve(losses: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Hypervolume of the first k evaluations, for every k (the run's progress)."""
    out = np.zeros(len(losses))
    front = np.zeros((0, losses.shape[1]))
    for k, row in enumerate(losses):
        front = np.vstack([front, row[None, :]])
        front = front[non_dominated(front)]
        out[k] = hypervolume(front, reference)
    return out


def reference_point(
    run_losses: np.ndarray,
    objectives: Sequence[Objective],
    given: Optional[Sequence[float]] = None,
    source_losses: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, str]:
    """The hypervolume reference (as losses) and where it came from."""
    if given is not None:
        signs = np.array([-1.0 if o.direction == "maximize" else 1.0 for o in objectives])
        return signs * np.asarray(given, dtype=float), "config"
    if source_losses is not None and len(source_losses):
        return source_losses.max(axis=0), "worst source model"
    if len(run_losses):
        return run_losses.max(axis=0), "worst evaluation"
    return np.zeros(len(objectives)), "none"
