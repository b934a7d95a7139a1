"""The run report: one self-contained HTML page (plotly inlined; opens without a network) and
PNGs of the same plots, written under the run folder.

Plots: the Pareto front (a scatter for two objectives, parallel coordinates for more) with the
source models marked; each objective over evaluations with its running best; hypervolume over
evaluations. A table lists the Pareto set with links to exported folders found beside it.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Optional

import pandas as pd

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.merge.learned import learned_summary
from evomerge.results.pareto import (
    hypervolume,
    hypervolume_curve,
    losses_of,
    non_dominated,
    reference_point,
)
from evomerge.results.status import frame_of
from evomerge.results.store import ReferenceResult, RunStore, read_run_meta

STAGE_COLOURS = ("#ced4da", "#74c0fc", "#1971c2", "#d6336c")  # racing stages, first to last
MARKS = {  # how each kind of reference model is drawn: (label, plotly symbol, colour)
    "source": ("source models", "star", "#1c7ed6"),
    "baseline": ("baseline merges", "diamond", "#f08c00"),
}


def _scored(references: dict[str, dict[str, ReferenceResult]]) -> dict[str, dict[str, dict]]:
    """kind -> name -> objective values, of the references that were scored."""
    return {
        kind: {k: v.values for k, v in stored.items() if v.values}
        for kind, stored in references.items()
    }


def _figures(frame: pd.DataFrame, config: RunConfig, references: dict) -> dict:
    import plotly.graph_objects as go

    names = [o.name for o in config.objectives]
    ok = frame[~frame["failed"]].sort_values("number")
    figures = {}
    marks = _scored(references)
    src = marks["source"]
    if len(names) == 2:
        x, y = names
        fig = go.Figure()
        rest = ok[~ok["pareto"]]
        front = ok[ok["pareto"]].sort_values(x)
        fig.add_scatter(
            x=rest[x],
            y=rest[y],
            mode="markers",
            name="evaluations",
            marker={"color": "#9aa5b1"},
            text=rest["index"],
        )
        fig.add_scatter(
            x=front[x],
            y=front[y],
            mode="markers+lines",
            name="Pareto set",
            marker={"color": "#d6336c", "size": 10},
            text=front["index"],
        )
        for kind, scored in marks.items():
            if not scored:
                continue
            label, symbol, colour = MARKS[kind]
            fig.add_scatter(
                x=[v[x] for v in scored.values()],
                y=[v[y] for v in scored.values()],
                mode="markers+text",
                name=label,
                text=list(scored),
                textposition="top center",
                marker={"symbol": symbol, "size": 14, "color": colour},
            )
        fig.update_layout(
            title="Pareto front",
            xaxis_title=f"{x} ({_dir(config, x)})",
            yaxis_title=f"{y} ({_dir(config, y)})",
        )
        figures["pareto"] = fig
    elif len(names) > 2:
        # the reference models are extra lines, coloured by kind
        rows = [list(ok[n]) for n in names]
        colour = list(ok["pareto"].astype(int))
        for code, kind in ((2, "source"), (3, "baseline")):
            for values in marks[kind].values():
                for column, n in zip(rows, names):
                    column.append(values[n])
                colour.append(code)
        fig = go.Figure(
            go.Parcoords(
                line={
                    "color": colour,
                    "cmin": 0,
                    "cmax": 3,
                    "colorscale": [
                        [0, "#ced4da"],
                        [0.33, "#ced4da"],
                        [0.34, "#d6336c"],
                        [0.66, "#d6336c"],
                        [0.67, MARKS["source"][2]],
                        [0.99, MARKS["source"][2]],
                        [1.0, MARKS["baseline"][2]],
                    ],
                },
                dimensions=[{"label": n, "values": col} for n, col in zip(names, rows)],
            )
        )
        fig.update_layout(
            title="Evaluations over all objectives (Pareto set red, sources blue, baselines orange)"
        )
        figures["pareto"] = fig
    for n in names:
        fig = go.Figure()
        fig.add_scatter(
            x=ok["number"], y=ok[n], mode="markers", name=n, marker={"color": "#9aa5b1"}
        )
        best = _best_so_far(ok, n, config)
        fig.add_scatter(
            x=ok["number"], y=best, mode="lines", name="best so far", line={"color": "#d6336c"}
        )
        for kind, scored in marks.items():
            dash = "dot" if kind == "source" else "dash"
            if scored:  # a legend entry for the kind; a line per model
                line = {"dash": dash, "color": MARKS[kind][2]}
                fig.add_scatter(x=[None], y=[None], mode="lines", name=MARKS[kind][0], line=line)
            for name, values in scored.items():
                fig.add_hline(
                    y=values[n], line_dash=dash, line_color=MARKS[kind][2], annotation_text=name
                )
        fig.update_layout(title=f"{n} over evaluations", xaxis_title="evaluation", yaxis_title=n)
        figures[f"objective_{n}"] = fig
    if "stage" in ok:  # racing: each candidate's score at every stage it reached
        n = names[0]
        fig = go.Figure()
        for k, size in enumerate(config.fitness.fidelity.stages):
            column = f"stage{k}:{n}"
            if column in ok:
                reached = ok[ok[column].notna()]
                fig.add_scatter(
                    x=reached["number"], y=reached[column], mode="markers",
                    name=f"stage {k} ({size} documents)", marker={"color": STAGE_COLOURS[k % 4]},
                )  # fmt: skip
        fig.update_layout(
            title=f"Racing: {n} at each stage reached (told values in the plot above)",
            xaxis_title="evaluation",
            yaxis_title=n,
        )
        figures["racing"] = fig
    if len(names) > 1 and len(ok):
        losses = losses_of(ok[names].to_dict("records"), config.objectives)
        source_losses = losses_of(list(src.values()), config.objectives) if src else None
        ref, origin = reference_point(losses, config.objectives, config.reference, source_losses)
        curve = hypervolume_curve(losses, ref)
        fig = go.Figure(
            go.Scatter(
                x=ok["number"], y=curve, mode="lines", name="search", line={"color": "#0ca678"}
            )
        )
        for kind, value in _reference_hypervolumes(marks, config, ref).items():
            fig.add_hline(
                y=value,
                line_dash="dot",
                line_color=MARKS[kind][2],
                annotation_text=f"{MARKS[kind][0]} alone",
            )
        fig.update_layout(
            title=f"Hypervolume over evaluations (reference: {origin})",
            xaxis_title="evaluation",
            yaxis_title="hypervolume",
        )
        figures["hypervolume"] = fig
    return figures


def _reference_hypervolumes(marks: dict, config: RunConfig, ref) -> dict[str, float]:
    """kind -> hypervolume of those reference models alone (what the search must exceed)."""
    out = {}
    for kind, scored in marks.items():
        if scored:
            losses = losses_of(list(scored.values()), config.objectives)
            out[kind] = hypervolume(losses[non_dominated(losses)], ref)
    return out


def _best_so_far(ok: pd.DataFrame, n: str, config: RunConfig) -> pd.Series:
    """The best value so far among full-fidelity evaluations (racing's early stops are told
    estimates, not measurements on every document)."""
    values = ok[n].where(ok["final"].fillna(True).astype(bool)) if "final" in ok else ok[n]
    best = values.cummax() if _dir(config, n) == "maximize" else values.cummin()
    return best.ffill()


def _held_text(held: Optional[dict]) -> str:
    return ", ".join(
        f"{k}: {v:.4g}" for k, v in (held or {}).items() if isinstance(v, (int, float))
    )


def _dir(config: RunConfig, name: str) -> str:
    return next(o.direction for o in config.objectives if o.name == name)


def _png(name: str, frame: pd.DataFrame, config: RunConfig, references: dict, folder: Path) -> None:
    """The same plots as PNGs (matplotlib: no browser needed to write them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [o.name for o in config.objectives]
    ok = frame[~frame["failed"]].sort_values("number")
    marks = _scored(references)
    symbols = {"source": "*", "baseline": "D"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    if name == "pareto" and len(names) == 2:
        x, y = names
        front = ok[ok["pareto"]].sort_values(x)
        ax.scatter(ok[x], ok[y], c="#9aa5b1", s=14, label="evaluations")
        ax.plot(front[x], front[y], "o-", c="#d6336c", label="Pareto set")
        for kind, scored in marks.items():
            label, _, colour = MARKS[kind]
            for i, (model, values) in enumerate(scored.items()):
                ax.scatter(
                    values[x],
                    values[y],
                    marker=symbols[kind],
                    s=160 if kind == "source" else 70,
                    c=colour,
                    label=label if i == 0 else None,
                )
                ax.annotate(
                    model, (values[x], values[y]), textcoords="offset points", xytext=(4, 4)
                )
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title("Pareto front")
    elif name == "pareto" and len(names) > 2:
        for _, row in ok.iterrows():
            color, width = ("#d6336c", 1.6) if row["pareto"] else ("#ced4da", 0.6)
            ax.plot(range(len(names)), [row[n] for n in names], c=color, lw=width)
        for kind, scored in marks.items():
            for model, values in scored.items():
                style = "--" if kind == "source" else ":"
                ax.plot(range(len(names)), [values[n] for n in names], style, c=MARKS[kind][2])
                ax.annotate(model, (len(names) - 1, values[names[-1]]), fontsize=7)
        ax.set_xticks(range(len(names)), names)
        ax.set_title("All objectives (Pareto set red, sources blue, baselines orange)")
    elif name.startswith("objective_"):
        n = name.removeprefix("objective_")
        best = _best_so_far(ok, n, config)
        ax.scatter(ok["number"], ok[n], c="#9aa5b1", s=14, label=n)
        ax.plot(ok["number"], best, c="#d6336c", label="best so far")
        for kind, scored in marks.items():
            for i, (model, values) in enumerate(scored.items()):
                style = ":" if kind == "source" else "--"
                label = MARKS[kind][0] if i == 0 else None
                ax.axhline(values[n], ls=style, c=MARKS[kind][2], label=label)
                ax.annotate(model, (0, values[n]), textcoords="offset points", xytext=(2, 3))
        ax.set_xlabel("evaluation")
        ax.set_ylabel(n)
        ax.set_title(f"{n} over evaluations")
    elif name == "racing":
        n = names[0]
        for k, size in enumerate(config.fitness.fidelity.stages):
            column = f"stage{k}:{n}"
            if column in ok:
                reached = ok[ok[column].notna()]
                ax.scatter(reached["number"], reached[column], s=14, c=STAGE_COLOURS[k % 4],
                           label=f"stage {k} ({size} documents)")  # fmt: skip
        ax.set_xlabel("evaluation")
        ax.set_ylabel(n)
        ax.set_title(f"Racing: {n} at each stage reached")
    elif name == "hypervolume":
        losses = losses_of(ok[names].to_dict("records"), config.objectives)
        src = marks["source"]
        source_losses = losses_of(list(src.values()), config.objectives) if src else None
        ref, _ = reference_point(losses, config.objectives, config.reference, source_losses)
        ax.plot(ok["number"], hypervolume_curve(losses, ref), c="#0ca678", label="search")
        for kind, value in _reference_hypervolumes(marks, config, ref).items():
            ax.axhline(value, ls=":", c=MARKS[kind][2], label=f"{MARKS[kind][0]} alone")
        ax.set_xlabel("evaluation")
        ax.set_ylabel("hypervolume")
        ax.set_title("Hypervolume over evaluations")
    else:
        plt.close(fig)
        return
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / f"{name}.png")
    plt.close(fig)


def write_report(run_folder: Path, exports: Optional[Path] = None) -> Path:
    run_folder = Path(run_folder)
    read_run_meta(run_folder)  # a folder that is not a run is named as such
    config = RunConfig.load(run_folder / "run.yaml")
    store = RunStore.open(run_folder)
    frame = frame_of(store, config)
    sources = store.sources()
    references = {"source": sources, "baseline": store.baselines()}
    out = run_folder / "report"
    out.mkdir(exist_ok=True)
    if frame.empty:
        raise EvomergeError(f"{run_folder}: no evaluations yet; nothing to report")
    figures = _figures(frame, config, references)
    parts = []
    for i, (name, fig) in enumerate(figures.items()):
        parts.append(
            fig.to_html(
                full_html=False,
                include_plotlyjs=(i == 0),
                default_width="100%",
                default_height="420px",
            )
        )
        _png(name, frame, config, references, out)
    names = [o.name for o in config.objectives]
    front = frame[frame["pareto"]].sort_values(names[0])
    exports = Path(exports) if exports else run_folder / "exports"
    rows = []
    for _, r in front.iterrows():
        folder = exports / f"eval-{int(r['index']):05d}"
        link = (
            f'<a href="{html.escape(os.path.relpath(folder, out))}">{folder.name}</a>'
            if folder.exists()
            else "not exported"
        )
        held = ", ".join(
            f"{k.removeprefix('held_out:')}: {r[k]:.4g}"
            for k in frame.columns
            if k.startswith("held_out:") and pd.notna(r[k])
        )
        cells = "".join(f"<td>{r[n]:.6g}</td>" for n in names)
        rows.append(
            f"<tr><td>{int(r['index'])}</td>{cells}<td>{html.escape(held)}</td><td>{link}</td></tr>"
        )

    def kind_of(kind: str, result: ReferenceResult) -> str:
        learned = learned_summary(result.recipe)
        if not learned:
            return kind
        return f"learned {learned['method']} ({learned.get('steps')} steps)"

    src_rows = "".join(
        f"<tr><td>{html.escape(kind_of(kind, v))}</td><td>{html.escape(k)}</td>"
        + "".join(f"<td>{v.values[n]:.6g}</td>" if v.values else "<td>failed</td>" for n in names)
        + f"<td>{html.escape(_held_text(v.held_out))}</td></tr>"
        for kind, stored in references.items()
        for k, v in stored.items()
    )
    failed = int(frame["failed"].sum())
    notice = (
        "<p><b>Note:</b> this run loaded models with trust_remote_code enabled.</p>"
        if config.trust_remote_code
        else ""
    )
    header = "".join(f"<th>{html.escape(n)} ({_dir(config, n)})</th>" for n in names)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>evomerge run {html.escape(run_folder.name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
</style></head><body>
<h1>evomerge run {html.escape(run_folder.name)}</h1>
<p>{len(frame)} of {config.budget} evaluations ({failed} failed); optimizer
{html.escape(config.optimizer.name)}; seed {config.seed}.</p>{notice}
<h2>Pareto set ({len(front)})</h2>
<table><tr><th>index</th>{header}<th>held-out</th><th>export</th></tr>{"".join(rows)}</table>
<h2>Source models and baselines</h2>
<table><tr><th>kind</th><th>model</th>{header}<th>held-out</th></tr>{src_rows}</table>
{"".join(f"<div>{p}</div>" for p in parts)}
</body></html>
"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


__all__ = ["write_report"]
