"""The run report: one self-contained HTML page (plotly inlined; opens without a network) and
PNGs of the same plots, written under the run folder. Each plot is described once
(figures.py) and drawn by both renderers here. Tables list the Pareto set, with links to
exported folders found beside it, and the source models and baselines.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Optional

import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure as MplFigure

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.merge.learned import learned_summary
from evomerge.results.figures import LIGHT, Figure, describe, direction
from evomerge.results.status import frame_of
from evomerge.results.store import ReferenceResult, RunStore, read_run_meta


def plotly_figure(figure: Figure) -> go.Figure:
    """The figure for the HTML page (interactive: hover shows each evaluation's index)."""
    if figure.profiles is not None:
        return _plotly_profiles(figure)
    fig = go.Figure()
    for t in figure.traces:
        mode = "+".join(
            m for m, on in (("markers", t.points), ("lines", t.line), ("text", t.names)) if on
        )
        fig.add_scatter(
            x=t.x,
            y=t.y,
            mode=mode,
            name=t.label,
            showlegend=t.label is not None,
            text=t.names if t.names else t.hover,
            textposition="top center",
            marker={"color": t.colour, "size": t.size, "symbol": t.symbol},
            line={"color": t.colour},
        )
    for level in figure.levels:
        if level.legend:  # a legend entry for the kind; a line per model
            line = {"dash": level.dash, "color": level.colour}
            fig.add_scatter(x=[None], y=[None], mode="lines", name=level.legend, line=line)
        fig.add_hline(
            y=level.y, line_dash=level.dash, line_color=level.colour, annotation_text=level.note
        )
    fig.update_layout(title=figure.title, xaxis_title=figure.x_title, yaxis_title=figure.y_title)
    return fig


def _plotly_profiles(figure: Figure) -> go.Figure:
    profiles = figure.profiles
    palette = list(dict.fromkeys(profiles.colours)) or [LIGHT]  # a code per distinct colour
    top = max(len(palette) - 1, 1)
    scale = []
    for code, colour in enumerate(palette):
        scale += [[code / (top + 1), colour], [(code + 1) / (top + 1), colour]]
    columns = list(zip(*profiles.lines)) if profiles.lines else [[] for _ in profiles.axes]
    fig = go.Figure(
        go.Parcoords(
            line={
                "color": [palette.index(c) for c in profiles.colours],
                "cmin": 0,
                "cmax": len(palette) - 1 if len(palette) > 1 else 1,
                "colorscale": scale,
            },
            dimensions=[
                {"label": n, "values": list(col)} for n, col in zip(profiles.axes, columns)
            ],
        )
    )
    fig.update_layout(title=figure.title)
    return fig


MPL_SYMBOLS = {"circle": "o", "star": "*", "diamond": "D"}
MPL_DASHES = {"dot": ":", "dash": "--"}


def write_png(figure: Figure, path: Path) -> None:
    """The same figure as a PNG (matplotlib's own canvas: no browser or display needed)."""
    fig = MplFigure(figsize=(6.4, 4.4), dpi=110)
    ax = fig.subplots()
    if figure.profiles is not None:
        p = figure.profiles
        for values, colour, width, name in zip(p.lines, p.colours, p.widths, p.names):
            ax.plot(range(len(p.axes)), values, c=colour, lw=width)
            if name:
                ax.annotate(name, (len(p.axes) - 1, values[-1]), fontsize=7)
        ax.set_xticks(range(len(p.axes)), p.axes)
    for t in figure.traces:
        if t.line:
            ax.plot(t.x, t.y, "o-" if t.points else "-", c=t.colour, label=t.label, ms=t.size / 2)
        elif t.points:
            area = t.size**2 * (0.8 if t.symbol != "circle" else 0.4)
            ax.scatter(t.x, t.y, c=t.colour, s=area, marker=MPL_SYMBOLS[t.symbol], label=t.label)
        for name, x, y in zip(t.names or [], t.x, t.y):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4))
    for level in figure.levels:
        ax.axhline(level.y, ls=MPL_DASHES[level.dash], c=level.colour, label=level.legend)
        ax.annotate(level.note, (0, level.y), textcoords="offset points", xytext=(2, 3))
    ax.set_xlabel(figure.x_title)
    ax.set_ylabel(figure.y_title)
    ax.set_title(figure.title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _held_text(held: Optional[dict]) -> str:
    return ", ".join(
        f"{k}: {v:.4g}" for k, v in (held or {}).items() if isinstance(v, (int, float))
    )


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
    parts = []
    for i, (name, figure) in enumerate(describe(frame, config, references).items()):
        parts.append(
            plotly_figure(figure).to_html(
                full_html=False,
                include_plotlyjs=(i == 0),
                default_width="100%",
                default_height="420px",
            )
        )
        write_png(figure, out / f"{name}.png")
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
    header = "".join(f"<th>{html.escape(n)} ({direction(config, n)})</th>" for n in names)
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
