"""Per-evaluation logging to MLflow, where many users already watch their experiments.

The run store stays the truth; MLflow gets a copy. One MLflow run per evomerge run: its id is
kept in the store, so a resumed run logs into the same MLflow run and first catches up on the
evaluations committed while nothing was logging (a kill between a commit and its log loses no
point of the curve). Each evaluation is one step (its position in the store): every objective's
value, its running best (`best/<objective>`), the scoring seconds and whether it failed; the
source models and baselines are logged once as `source/<name>/<objective>`. Tracking is a view:
a tracking server that stops answering mid-run is warned about once and left alone, never a
reason to stop a search.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol

from evomerge import __version__
from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.results.store import Record, RunStore

if TYPE_CHECKING:  # the spaces import the merge engine (torch), which tracking never runs
    from evomerge.spaces.base import SearchSpace


class Run(Protocol):
    """What the tracker reads of a run (the loop's Run has it): the tracker sits below the
    loop, which owns one."""

    folder: Path
    config: RunConfig
    space: SearchSpace
    store: RunStore


log = logging.getLogger("evomerge")
RUN_ID_NOTE = "mlflow_run_id"
BATCH = 500  # MLflow accepts at most 1,000 metrics per batch


def metric_key(name: str) -> str:
    """MLflow accepts letters, digits and _ - . space : / in metric names."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def check_tracking(spec) -> None:
    """Refuse a tracking config MLflow cannot serve before the run folder is made."""
    if spec is None:
        return
    try:
        import mlflow.entities  # noqa: F401
        import mlflow.tracking  # noqa: F401
    except ImportError:
        raise EvomergeError(
            "field 'tracking.mlflow': MLflow is not installed; pip install 'evomerge[mlflow]'"
        ) from None


class MlflowTracker:
    def __init__(self, run: Run) -> None:
        spec = run.config.tracking  # prepare() has checked that MLflow imports
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric, self.Param = Metric, Param
        uri = spec.mlflow
        if "://" not in uri:  # a folder: MLflow's file store, which MLflow 3 asks to opt into
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.run = run
        self.best: dict[str, float] = {}
        self.step = 0  # the next evaluation's position in the store
        self.broken = False
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = self._open(spec.experiment)
        except EvomergeError:
            raise
        except Exception as exc:  # MLflow raises its own and requests' kinds
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise EvomergeError(
                f"field 'tracking.mlflow': cannot log to {uri} ({reason})"
            ) from None

    @classmethod
    def for_run(cls, run: Run) -> Optional[MlflowTracker]:
        return cls(run) if run.config.tracking is not None else None

    def _open(self, experiment: str) -> str:
        """The MLflow run this evomerge run logs into: the one it made before, or a new one."""
        run_id = self.run.store.note(RUN_ID_NOTE)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        config = self.run.config
        created = self.client.create_run(
            experiment_id,
            run_name=config.name or self.run.folder.name,
            tags={"evomerge.version": __version__, "evomerge.folder": str(self.run.folder)},
        )
        run_id = created.info.run_id
        params = {
            "optimizer": config.optimizer.name,
            "search_space": self.run.space.kind,
            "genes": self.run.space.size,
            "budget": config.budget,
            "seed": config.seed,
            "objectives": ", ".join(f"{o.name} ({o.direction})" for o in config.objectives),
            **{f"model.{name}": ref for name, ref in config.models.items()},
        }
        self.client.log_batch(run_id, params=[self.Param(k, str(v)) for k, v in params.items()])
        self.run.store.set_note(RUN_ID_NOTE, run_id)
        return run_id

    # ----- logging --------------------------------------------------------------------------
    def start(self, records: list[Record]) -> None:
        """Log the sources and baselines, then every committed evaluation not logged yet."""
        now = _millis()
        metrics = []
        for kind, named in (
            ("source", self.run.store.sources()),
            ("baseline", self.run.store.baselines()),
        ):
            for name, result in named.items():
                for objective, value in (result.values or {}).items():
                    key = metric_key(f"{kind}/{name}/{objective}")
                    metrics.append(self.Metric(key, float(value), now, 0))
        logged = {m.step for m in self.client.get_metric_history(self.run_id, "evaluation")}
        for record in sorted(records, key=lambda r: r.number):
            rows = self._rows(record, now)  # every record: the running bests need them all
            if record.number not in logged:
                metrics.extend(rows)
        self._send(metrics)

    def log(self, record: Record) -> None:
        """A record just committed (the next position in the store)."""
        self._send(self._rows(record, _millis()))

    def _rows(self, record: Record, now: int) -> list:
        """A record's metrics at its step (updating the running bests)."""
        step = self.step
        self.step += 1
        rows = [
            self.Metric("evaluation", float(record.index), now, step),
            self.Metric("failed", float(record.failed), now, step),
            self.Metric("seconds", float(record.seconds), now, step),
        ]
        if record.failed or not record.final:
            return rows
        for objective in self.run.config.objectives:
            value = float(record.values[objective.name])
            better = max if objective.direction == "maximize" else min
            self.best[objective.name] = better(self.best.get(objective.name, value), value)
            key = metric_key(objective.name)
            rows.append(self.Metric(key, value, now, step))
            rows.append(self.Metric(f"best/{key}", self.best[objective.name], now, step))
        return rows

    def _send(self, metrics: list) -> None:
        if self.broken:
            return
        try:
            for start in range(0, len(metrics), BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[start : start + BATCH])
        except Exception as exc:  # the search goes on; resume catches MLflow up
            self.broken = True
            log.warning(
                "MLflow stopped answering (%s); the run goes on without tracking, and "
                "`evomerge resume` logs what was missed",
                (str(exc).splitlines() or [type(exc).__name__])[0][:200],
            )

    def finish(self, status: str = "FINISHED") -> None:
        if self.broken:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            log.warning("MLflow: could not mark the run %s (%s)", status, exc)


def _millis() -> int:
    return int(time.time() * 1000)
