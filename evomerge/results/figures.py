"""The report's plots, described once (what is drawn, in which colour, with which labels) for
both renderers: plotly for the HTML page, matplotlib for the PNGs (report.py). Nothing here
imports a plotting library.

Plots: the Pareto front (a scatter for two objectives, parallel coordinates for more) with the
source models and baselines marked; each objective over evaluations with its running best and
the references as levels; each racing stage's scores; hypervolume over evaluations against the
references' own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from evomerge.config import RunConfig
from evomerge.results.pareto import (
    hypervolume,
    hypervolume_curve,
    losses_of,
    non_dominated,
    reference_point,
)
from evomerge.results.store import ReferenceResult

GREY, LIGHT, RED, GREEN = "#9aa5b1", "#ced4da", "#d6336c", "#0ca678"
STAGE_COLOURS = (LIGHT, "#74c0fc", "#1971c2", RED)  # racing stages, first to last
# how each kind of reference model is drawn: (label, symbol, marker size, colour, level dash)
MARKS = {
    "source": ("source models", "star", 14, "#1c7ed6", "dot"),
    "baseline": ("baseline merges", "diamond", 11, "#f08c00", "dash"),
}


@dataclass
class Trace:
    """Points and/or a line through them."""

    x: list
    y: list
    label: Optional[str]  # the legend entry; None for none
    colour: str
    points: bool = True
    line: bool = False
    size: float = 6  # marker diameter, in points
    symbol: str = "circle"  # circle | star | diamond
    names: Optional[list[str]] = None  # a label written beside each point
    hover: Optional[list] = None  # what hovering a point shows (the evaluation's index)


@dataclass
class Level:
    """A horizontal line: what a reference model scored."""

    y: float
    colour: str
    dash: str  # dot | dash
    note: str  # written at the line
    legend: Optional[str] = None  # a legend entry (once per kind of reference)


@dataclass
class Profiles:
    """Parallel coordinates: one line per model across the axes."""

    axes: list[str]
    lines: list[list[float]]
    colours: list[str]
    widths: list[float]
    names: list[Optional[str]]  # a label at the end of a reference model's line


@dataclass
class Figure:
    title: str
    x_title: str = ""
    y_title: str = ""
    traces: list[Trace] = field(default_factory=list)
    levels: list[Level] = field(default_factory=list)
    profiles: Optional[Profiles] = None


def scored_references(
    references: dict[str, dict[str, ReferenceResult]],
) -> dict[str, dict[str, dict[str, float]]]:
    """kind -> name -> objective values, of the references that were scored."""
    return {
        kind: {k: v.values for k, v in stored.items() if v.values}
        for kind, stored in references.items()
    }


def describe(
    frame: pd.DataFrame, config: RunConfig, references: dict[str, dict[str, ReferenceResult]]
) -> dict[str, Figure]:
    """name -> figure, for a run's evaluations (status.frame_of) and its references."""
    names = [o.name for o in config.objectives]
    ok = frame[~frame["failed"]].sort_values("number")
    marks = scored_references(references)
    figures = {}
    if len(names) == 2:
        figures["pareto"] = _front(ok, config, marks)
    elif len(names) > 2:
        figures["pareto"] = _profiles(ok, names, marks)
    for n in names:
        figures[f"objective_{n}"] = _objective(ok, n, config, marks)
    if "stage" in ok:
        figures["racing"] = _racing(ok, names[0], config)
    if len(names) > 1 and len(ok):
        figures["hypervolume"] = _hypervolume(ok, names, config, marks)
    return figures


def direction(config: RunConfig, name: str) -> str:
    return next(o.direction for o in config.objectives if o.name == name)


def _front(ok: pd.DataFrame, config: RunConfig, marks: dict) -> Figure:
    x, y = (o.name for o in config.objectives)
    rest, front = ok[~ok["pareto"]], ok[ok["pareto"]].sort_values(x)
    traces = [
        Trace(list(rest[x]), list(rest[y]), "evaluations", GREY, hover=list(rest["index"])),
        Trace(
            list(front[x]), list(front[y]), "Pareto set", RED, line=True, size=9,
            hover=list(front["index"]),
        ),
    ]  # fmt: skip
    for kind, scored in marks.items():
        if scored:
            label, symbol, size, colour, _ = MARKS[kind]
            traces.append(
                Trace(
                    [v[x] for v in scored.values()], [v[y] for v in scored.values()], label,
                    colour, size=size, symbol=symbol, names=list(scored),
                )
            )  # fmt: skip
    return Figure(
        "Pareto front",
        f"{x} ({direction(config, x)})",
        f"{y} ({direction(config, y)})",
        traces,
    )


def _profiles(ok: pd.DataFrame, names: list[str], marks: dict) -> Figure:
    lines = [[float(row[n]) for n in names] for _, row in ok.iterrows()]
    colours = [RED if p else LIGHT for p in ok["pareto"]]
    widths = [1.6 if p else 0.6 for p in ok["pareto"]]
    labels: list[Optional[str]] = [None] * len(lines)
    for kind, scored in marks.items():
        for model, values in scored.items():
            lines.append([values[n] for n in names])
            colours.append(MARKS[kind][3])
            widths.append(1.2)
            labels.append(model)
    return Figure(
        "Evaluations over all objectives (Pareto set red, sources blue, baselines orange)",
        profiles=Profiles(names, lines, colours, widths, labels),
    )


def _objective(ok: pd.DataFrame, n: str, config: RunConfig, marks: dict) -> Figure:
    best = _best_so_far(ok, n, config)
    traces = [
        Trace(list(ok["number"]), list(ok[n]), n, GREY, hover=list(ok["index"])),
        Trace(list(ok["number"]), list(best), "best so far", RED, points=False, line=True),
    ]
    levels = []
    for kind, scored in marks.items():
        label, _, _, colour, dash = MARKS[kind]
        for i, (model, values) in enumerate(scored.items()):
            levels.append(Level(values[n], colour, dash, model, label if i == 0 else None))
    return Figure(f"{n} over evaluations", "evaluation", n, traces, levels)


def _best_so_far(ok: pd.DataFrame, n: str, config: RunConfig) -> pd.Series:
    """The best value so far among full-fidelity evaluations (racing's early stops are told
    estimates, not measurements on every document)."""
    values = ok[n].where(ok["final"].fillna(True).astype(bool)) if "final" in ok else ok[n]
    best = values.cummax() if direction(config, n) == "maximize" else values.cummin()
    return best.ffill()


def _racing(ok: pd.DataFrame, n: str, config: RunConfig) -> Figure:
    """Each candidate's score at every stage it reached."""
    traces = []
    for k, size in enumerate(config.fitness.fidelity.stages):
        column = f"stage{k}:{n}"
        if column in ok:
            reached = ok[ok[column].notna()]
            traces.append(
                Trace(
                    list(reached["number"]), list(reached[column]),
                    f"stage {k} ({size} documents)", STAGE_COLOURS[k % 4],
                    hover=list(reached["index"]),
                )
            )  # fmt: skip
    return Figure(
        f"Racing: {n} at each stage reached (told values in the plot above)",
        "evaluation",
        n,
        traces,
    )


def _hypervolume(ok: pd.DataFrame, names: list[str], config: RunConfig, marks: dict) -> Figure:
    losses = losses_of(ok[names].to_dict("records"), config.objectives)
    sources = marks["source"]
    source_losses = losses_of(list(sources.values()), config.objectives) if sources else None
    ref, origin = reference_point(losses, config.objectives, config.reference, source_losses)
    curve = hypervolume_curve(losses, ref)
    search = Trace(list(ok["number"]), list(curve), "search", GREEN, points=False, line=True)
    levels = [
        Level(value, MARKS[kind][3], "dot", f"{MARKS[kind][0]} alone", f"{MARKS[kind][0]} alone")
        for kind, value in _reference_hypervolumes(marks, config, ref).items()
    ]
    return Figure(
        f"Hypervolume over evaluations (reference: {origin})",
        "evaluation",
        "hypervolume",
        [search],
        levels,
    )


def _reference_hypervolumes(marks: dict, config: RunConfig, ref) -> dict[str, float]:
    """kind -> hypervolume of those reference models alone (what the search must exceed)."""
    out = {}
    for kind, scored in marks.items():
        if scored:
            losses = losses_of(list(scored.values()), config.objectives)
            out[kind] = hypervolume(losses[non_dominated(losses)], ref)
    return out
