"""What a run has done so far, as a pandas table and a printed summary (live runs included)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from evomerge.config import RunConfig
from evomerge.results.pareto import front_positions, hypervolume, losses_of, reference_point
from evomerge.results.store import ReferenceResult, RunStore, read_run_meta
from evomerge.results.summary import RunSummary
from evomerge.results.tracking import RUN_ID_NOTE

MAX_GENE_COLUMNS = 100


def records_frame(folder: Path) -> pd.DataFrame:
    """One row per committed evaluation: objectives, metrics, timing, failure, genes."""
    return frame_of(RunStore.open(folder), RunConfig.load(folder / "run.yaml"))


def frame_of(store: RunStore, config: RunConfig) -> pd.DataFrame:
    records = store.records()
    front = set(
        front_positions([r.values if r.final else None for r in records], config.objectives)
    )
    rows = []
    for position, r in enumerate(records):
        row = {
            "number": r.number,
            "index": r.index,
            "failed": r.failed,
            "error": r.error,
            "seconds": r.seconds,
            "worker": r.worker,
            "origin": r.origin,
            "reused_from": r.reused_from,
        }
        if r.stages is not None:  # racing: the last stage reached, and each stage's values
            row["stage"] = len(r.stages) - 1
            row["final"] = r.final
            for k, stage in enumerate(r.stages):
                for name, value in (stage.get("values") or {}).items():
                    row[f"stage{k}:{name}"] = value
        for o in config.objectives:
            row[o.name] = np.nan if r.values is None else r.values[o.name]
        for key, value in r.metrics.items():
            row[f"metric:{key}"] = value
        if len(r.genome) <= MAX_GENE_COLUMNS and len(store.gene_names) == len(r.genome):
            row.update({f"gene:{n}": float(v) for n, v in zip(store.gene_names, r.genome)})
        for key, value in (r.held_out or {}).items():
            row[f"held_out:{key}"] = value
        row["recipe"] = r.recipe
        row["pareto"] = position in front
        rows.append(row)
    return pd.DataFrame(rows)


def _learned(recipe: Optional[str]) -> Optional[dict]:
    """A learned merge's method and training (merge.learned.learned_summary); only a recipe
    that names a coefficient file can be one, and only then is the merge package imported (it
    loads torch, which status otherwise never needs: a second or more of start-up)."""
    if not recipe or "coefficients:" not in recipe:
        return None
    from evomerge.merge.learned import learned_summary

    return learned_summary(recipe)


def reference_frame(store: RunStore, config: RunConfig) -> pd.DataFrame:
    """One row per source model and baseline merge: objectives and held-out scores."""
    rows = []
    for kind, stored in (("source", store.sources()), ("baseline", store.baselines())):
        for name, result in stored.items():
            learned = _learned(result.recipe)
            row = {"kind": f"learned ({learned['method']})" if learned else kind, "name": name}
            for o in config.objectives:
                row[o.name] = (result.values or {}).get(o.name, np.nan)
            for key, value in (result.held_out or {}).items():
                if isinstance(value, (int, float)):
                    row[f"held_out:{key}"] = value
            rows.append(row)
    return pd.DataFrame(rows)


def status_data(folder: Path) -> dict:
    """The run measured against what it started from, for scripts (`status --json`): the
    source models and baselines as name -> {values, held_out}, and the Pareto set as a list of
    {index, values, held_out, origin} (a seeded source or baseline also names itself in
    seeded_from); held-out keys are lm-eval's "task: metric,filter". Read from the run's kept
    summary, so it costs the same however long the run."""
    read_run_meta(folder)
    config = RunConfig.load(folder / "run.yaml")
    store = RunStore.open(folder)
    kept = store.summary()
    attrs = store.study.user_attrs

    def reference(result: ReferenceResult) -> dict:
        out = {"values": result.values, "held_out": result.held_out}
        learned = _learned(result.recipe)
        if learned:  # how it was trained: method, steps, seconds, tokens, losses
            out["learned"] = learned
        return {**out, "error": result.error} if result.error else out

    return {
        "run": str(folder),
        "evaluations": kept.evaluations,
        "budget": config.budget,
        "objectives": {o.name: o.direction for o in config.objectives},
        "sources": {k: reference(v) for k, v in store.sources().items()},
        "baselines": {k: reference(v) for k, v in store.baselines().items()},
        "pareto": [
            {
                "index": m.index,
                "values": m.values,
                "held_out": attrs.get(f"held_out:{m.number}"),
                "origin": m.origin,
            }
            | ({"seeded_from": m.worker.split(" ", 1)[-1]} if m.origin != "optimizer" else {})
            for m in kept.pareto
        ],
    }


WIDTH = 120  # a terminal's columns: wider tables are shown long (one row per model per task)
SPLITS = ("_heldout", "_held_out", "_held", "_fit", "_test", "_validation", "_val", "_dev")
METRICS = {"exact_match": "em", "acc_norm": "acc_n"}


def short_metric(key: str) -> str:
    """'held_out:sm2_add_heldout: acc,none' -> 'sm2_add acc': the task without its split
    suffix, the metric without lm-eval's default filter."""
    task, _, metric = key.removeprefix("held_out:").partition(": ")
    for suffix in SPLITS:
        if task.endswith(suffix):
            task = task[: -len(suffix)]
            break
    name, _, flt = metric.partition(",")
    name = METRICS.get(name, name)
    return f"{task} {name}" + ("" if flt in ("", "none") else f",{flt}")


def readable(frame: pd.DataFrame, keys: list[str], wide: bool) -> list[str]:
    """`frame` as lines for a terminal: held-out columns named short and kept only where
    something was scored; where it would pass WIDTH, the key columns as one table and the
    held-out scores as another, one row per model per task (`wide`: one table as it is)."""
    held = [c for c in frame.columns if c.startswith("held_out:") and frame[c].notna().any()]
    shown = frame[[c for c in frame.columns if not c.startswith("held_out:")] + held]
    if wide:
        return shown.to_string(index=False).splitlines()
    named = shown.rename(columns={c: short_metric(c) for c in held})
    text = named.to_string(index=False)
    if max(map(len, text.splitlines()), default=0) <= WIDTH or not held:
        return text.splitlines()
    lines = shown.drop(columns=held).to_string(index=False).splitlines()
    long = shown.melt(id_vars=keys, value_vars=held, var_name="held-out task", value_name="score")
    long = long.dropna(subset=["score"])
    long["held-out task"] = long["held-out task"].map(short_metric)
    table = long[[*keys, "held-out task", "score"]].to_string(index=False)
    return [*lines, "", *table.splitlines()]


def summary(folder: Path, wide: bool = False) -> str:
    """The printed status: read from the run's kept summary (summary.py), not from every
    evaluation, so it costs the same at a hundred evaluations and at a hundred thousand."""
    meta = read_run_meta(folder)
    config = RunConfig.load(folder / "run.yaml")
    store = RunStore.open(folder)
    kept = store.summary()
    lines = [f"run {folder} (evomerge {meta.get('evomerge')}, store {meta.get('store')})"]
    if config.tracking is not None:
        run_id = store.note(RUN_ID_NOTE) or "none yet"
        lines.append(
            f"tracking: MLflow {config.tracking.mlflow}, experiment "
            f"{config.tracking.experiment}, run {run_id}"
        )
    checkpoint = store.load_checkpoint()
    opt = config.optimizer.name
    if checkpoint is not None:
        state = checkpoint[0]
        lines.append(
            f"optimizer: {opt}, asked {state['asked']}, told {state['told']}, "
            f"in flight {len(state['outstanding'])}"
        )
    else:
        lines.append(f"optimizer: {opt}, not started")
    oom = kept.out_of_memory
    lines.append(
        f"evaluations: {kept.evaluations} / {config.budget} ({kept.failed} failed"
        + (f", {oom} of them out of memory)" if oom else ")")
    )
    if kept.ended_at_stage:
        lines.append(_racing_line(kept, config))
    if kept.pareto:
        best = pd.DataFrame(
            [
                {
                    "objective": o.name,
                    "direction": o.direction,
                    "best": kept.best[o.name].values[o.name],
                    "index": kept.best[o.name].index,
                }
                for o in config.objectives
            ]
        )
        lines += ["", "best per objective:", best.to_string(index=False)]
        references = reference_frame(store, config)
        if not references.empty:
            lines += ["", "sources and baselines:", *readable(references, ["name"], wide)]
        attrs = store.study.user_attrs
        front = pd.DataFrame(
            [
                {"index": m.index, **{o.name: m.values[o.name] for o in config.objectives}}
                | {f"held_out:{k}": v for k, v in (attrs.get(f"held_out:{m.number}") or {}).items()}
                for m in kept.pareto
            ]
        )
        lines += ["", f"Pareto set ({len(front)}):", *readable(front, ["index"], wide)]
        if len(config.objectives) > 1:
            lines.append(_hypervolume_line(kept, config, store))
    if kept.failures:
        fails = pd.DataFrame(kept.failures)[["index", "error"]]
        lines += ["", f"failures (last {len(fails)}):", fails.to_string(index=False)]
    return "\n".join(lines)


def _racing_line(kept: RunSummary, config: RunConfig) -> str:
    fidelity = config.fitness.fidelity
    counts = ", ".join(
        f"{kept.ended_at_stage.get(k, 0)} ended at stage {k} ({size})"
        for k, size in enumerate(fidelity.stages)
    )
    return f"racing: stages {fidelity.stages}, promote {fidelity.promote:g}: {counts}"


def _hypervolume_line(kept: RunSummary, config: RunConfig, store: RunStore) -> str:
    losses = np.array([kept.loss(m.values) for m in kept.pareto], dtype=float)
    worst = np.array([kept.worst], dtype=float)  # the run's own worst, as a reference
    sources = [v.values for v in store.sources().values() if v.values]
    source_losses = losses_of(sources, config.objectives) if sources else None
    ref, origin = reference_point(worst, config.objectives, config.reference, source_losses)
    value = hypervolume(losses, ref)
    return f"hypervolume: {value:.6g} (reference {origin}: {np.round(ref, 6).tolist()} as losses)"
