"""The run store: every evaluation, durably, before any optimizer learns of it.

Evaluations are Optuna trials in an RDB study (SQLite under the run folder by default, so
optuna-dashboard can read a live run; a PostgreSQL URL on a cluster). The genome, the recipe,
per-task metrics, per-example scores, timing, worker and failure reason ride along as one trial
user attribute (`evaluation`): JSON, never pickle. Optimizer checkpoints are separate files
(optim/state.py) written after every tell; the newest readable one wins, and a torn one is
reported and skipped.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from evomerge import __version__
from evomerge.errors import EvomergeError
from evomerge.optim.state import PART_PREFIX, read_state, referenced_parts, write_state
from evomerge.results.summary import RunSummary

FORMAT = 1
STUDY = "evomerge"  # the study of a run with its own SQLite file (and of runs before names)
MAX_PARAM_GENES = 100  # genomes up to this size also appear as Optuna params (dashboard plots)
KEEP_CHECKPOINTS = 2
log = logging.getLogger("evomerge")
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Record:
    """One committed evaluation."""

    index: int  # the optimizer's ask index
    genome: np.ndarray
    recipe: str  # the recipe YAML that was scored
    values: Optional[dict[str, float]]  # objective name -> value; None when it failed
    metrics: dict[str, float] = field(default_factory=dict)
    per_example: Optional[list[float]] = None
    seconds: float = 0.0
    worker: str = ""
    error: Optional[str] = None
    number: int = -1  # position in the store
    held_out: Optional[dict[str, float]] = None  # scores on the held-out tasks (Pareto set)
    # "optimizer"; "source" / "baseline": a source model or baseline merge the search was
    # seeded with (asked by the optimizer, in its budget); "surrogate": proposed by a
    # surrogate-assisted step (outside the budget)
    origin: str = "optimizer"
    # racing (racing.py): each stage's result ({metrics, values, seconds, seq, promoted,
    # worker}) in order, and whether the last stage reached is full fidelity
    stages: Optional[list[dict[str, Any]]] = None
    final: bool = True
    # task -> document id -> "metric,filter" -> value, when the fitness gives them
    per_document: Optional[dict[str, dict[str, dict[str, float]]]] = None
    # the ask index of the identical merge whose score this is (nothing was scored again)
    reused_from: Optional[int] = None

    @property
    def failed(self) -> bool:
        return self.values is None


@dataclass
class ReferenceResult:
    """A source model's or baseline merge's scores, kept beside the evaluations: what the search
    is measured against (status, the report, the hypervolume reference) and what a seed that
    stands for it is told."""

    values: Optional[dict[str, float]]  # objective name -> value; None when it failed
    metrics: dict[str, float] = field(default_factory=dict)
    per_example: Optional[list[float]] = None
    error: Optional[str] = None
    per_document: Optional[dict[str, dict[str, dict[str, float]]]] = None
    recipe: Optional[str] = None  # a baseline's recipe as scored (a source is itself)
    held_out: Optional[dict[str, Any]] = None  # lm-eval key -> value, or {"error": why}

    @property
    def failed(self) -> bool:
        return bool(self.error) or self.values is None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReferenceResult:
        names = {f.name for f in fields(cls)}
        return cls(**{"values": None, **{k: v for k, v in data.items() if k in names}})


WRITE_ERRORS = (OSError, SQLAlchemyError, optuna.exceptions.StorageInternalError)


def root_cause(exc: BaseException) -> str:
    """The innermost reason (sqlite's 'database or disk is full', not Optuna's wrapper)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    exc = getattr(exc, "orig", None) or exc
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def genome_key(genome: np.ndarray) -> str:
    return hashlib.blake2b(
        np.asarray(genome, dtype=np.float64).tobytes(), digest_size=12
    ).hexdigest()


GENOME_CODE = "f8z:"  # little-endian float64, zlib-compressed, base64: exact and compact


def encode_genome(genome: np.ndarray) -> str:
    """A genome as stored: its float64 bytes (exact), deflated (genomes of discrete or repeated
    genes shrink a lot, continuous ones little), in base64 so it rides in the trial's JSON;
    2,024 genes take ~22 KB instead of ~42 KB as JSON numbers."""
    raw = np.asarray(genome, dtype="<f8").tobytes()
    return GENOME_CODE + base64.b64encode(zlib.compress(raw, 1)).decode("ascii")


def decode_genome(stored: Any) -> np.ndarray:
    """A stored genome: the compact string, or the list of numbers that earlier runs wrote."""
    if isinstance(stored, str) and stored.startswith(GENOME_CODE):
        raw = zlib.decompress(base64.b64decode(stored[len(GENOME_CODE) :]))
        return np.frombuffer(raw, dtype="<f8").astype(float)
    return np.asarray(stored, dtype=float)


class RunStore:
    def __init__(self, folder: Path, study: optuna.Study, gene_names: list[str]) -> None:
        self.folder = folder
        self.study = study
        self.gene_names = gene_names
        self.objectives: list[str] = study.user_attrs.get("objectives", [])
        self.directions = [d.name.lower() for d in study.directions]
        self.checkpoints = folder / "checkpoints"
        self._parts: dict[str, list[str]] = {}  # checkpoint file -> the frozen parts it needs
        self._summary: Optional[RunSummary] = None  # the writer's, kept current as it commits

    # ----- opening ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        folder: Path,
        url: Optional[str],
        objectives: list[tuple[str, str]],
        gene_names: list[str],
    ) -> RunStore:
        # a shared database (PostgreSQL on a cluster) holds many runs: each is its own study
        study_name = f"{STUDY}-{folder.name}-{uuid.uuid4().hex[:8]}" if url else STUDY
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "checkpoints").mkdir(exist_ok=True)
            storage = _storage(url or _sqlite_url(folder))
            study = optuna.create_study(
                storage=storage,
                study_name=study_name,
                directions=[direction for _, direction in objectives],
            )
            study.set_user_attr("objectives", [name for name, _ in objectives])
            with warnings.catch_warnings():  # experimental in Optuna 3-5, stable in use
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([name for name, _ in objectives])  # dashboard axes
            study.set_user_attr("gene_names", gene_names)
            _write_json(
                folder / "run.json",
                {
                    "format": FORMAT,
                    "evomerge": __version__,
                    "created": time.time(),
                    "store": url or "sqlite:store.sqlite",
                    "study": study_name,
                },
            )
        except optuna.exceptions.DuplicatedStudyError:
            raise EvomergeError(
                f"store {url or folder}: already holds a run; resume it or use a new --out"
            ) from None
        except WRITE_ERRORS as exc:
            raise EvomergeError(
                f"--out {folder}: cannot create the run store there ({root_cause(exc)})"
            ) from None
        return cls(folder, study, gene_names)

    @classmethod
    def open(cls, folder: Path) -> RunStore:
        meta = read_run_meta(folder)
        url = meta["store"]
        if url == "sqlite:store.sqlite":
            url = _sqlite_url(folder)
        try:
            study = optuna.load_study(study_name=meta.get("study", STUDY), storage=_storage(url))
        except KeyError:
            raise EvomergeError(f"{folder}: its store holds no evomerge study") from None
        return cls(folder, study, study.user_attrs.get("gene_names", []))

    def close(self) -> None:
        """Let go of the database connections (the folder is about to be renamed)."""
        storage = self.study._storage
        engine = getattr(getattr(storage, "_backend", storage), "engine", None)
        if engine is not None:
            engine.dispose()

    # ----- evaluations ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A full disk or a folder turned read-only ends the run with one line saying how to
        go on; what was committed before stays committed."""
        try:
            yield
        except WRITE_ERRORS as exc:
            raise EvomergeError(
                f"{self.folder}: cannot write the run store ({root_cause(exc)}); free space or "
                f"fix permissions, then run: evomerge resume {self.folder}"
            ) from None

    def commit(self, record: Record) -> None:
        """Store one evaluation (its `number` is set to its place in the store) and bring the
        summary up to date."""
        with self._writing():
            summary = self._summary or self.summary()
            self._commit(record)
            record.number = summary.evaluations
            summary.add(record)
            summary.write(self.folder)
            self._summary = summary

    def summary(self) -> RunSummary:
        """The run's standing (summary.py): the kept summary where it covers every committed
        evaluation, else one built from them all."""
        kept = RunSummary.read(self.folder)
        if (
            kept is not None
            and kept.objectives == self.objectives
            and kept.directions == self.directions
            and self._holds_exactly(kept.evaluations)
        ):
            return kept
        return RunSummary.of(self.records(), self.objectives, self.directions)

    def _holds_exactly(self, count: int) -> bool:
        """Whether the store holds `count` evaluations: numbers 0..count-1 and no more (two
        index lookups, whatever the run's size)."""
        storage, study_id = self.study._storage, self.study._study_id

        def exists(number: int) -> bool:
            try:
                storage.get_trial_id_from_study_id_trial_number(study_id, number)
            except KeyError:
                return False
            return True

        return not exists(count) and (count == 0 or exists(count - 1))

    def _commit(self, record: Record) -> None:
        attrs = {
            "index": record.index,
            "genome": encode_genome(record.genome),
            "genome_key": genome_key(record.genome),
            "recipe": record.recipe,
            "metrics": record.metrics,
            "seconds": record.seconds,
            "worker": record.worker,
            "origin": record.origin,
        }
        if record.per_example is not None:
            attrs["per_example"] = [float(v) for v in record.per_example]
        if record.error is not None:
            attrs["error"] = record.error[:2000]
        if record.stages is not None:
            attrs["stages"] = record.stages
            attrs["final"] = record.final
        if record.per_document is not None:
            attrs["per_document"] = record.per_document
        if record.reused_from is not None:
            attrs["reused_from"] = record.reused_from
        params, distributions = {}, {}
        if len(record.genome) <= MAX_PARAM_GENES and len(self.gene_names) == len(record.genome):
            for name, value in zip(self.gene_names, record.genome):
                params[name] = float(value)
                distributions[name] = FloatDistribution(float(value), float(value))
        trial = optuna.trial.create_trial(
            state=TrialState.FAIL if record.failed else TrialState.COMPLETE,
            values=None if record.failed else [record.values[o] for o in self.objectives],
            params=params,
            distributions=distributions,
            user_attrs={"evaluation": attrs},  # one row: each attribute is an insert
        )
        self.study.add_trial(trial)

    def records(self) -> list[Record]:
        out = []
        study_attrs = self.study.user_attrs
        for t in self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)
        ):
            a = t.user_attrs["evaluation"]
            values = None if t.state == TrialState.FAIL else dict(zip(self.objectives, t.values))
            out.append(
                Record(
                    index=int(a["index"]),
                    genome=decode_genome(a["genome"]),
                    recipe=a["recipe"],
                    values=values,
                    metrics=a.get("metrics", {}),
                    per_example=a.get("per_example"),
                    seconds=float(a.get("seconds", 0.0)),
                    worker=a.get("worker", ""),
                    error=a.get("error"),
                    number=t.number,
                    held_out=study_attrs.get(f"held_out:{t.number}"),
                    origin=a.get("origin", "optimizer"),
                    stages=a.get("stages"),
                    final=bool(a.get("final", True)),
                    per_document=a.get("per_document"),
                    reused_from=_reused_from(a),
                )
            )
        return out

    def set_held_out(self, number: int, metrics: dict[str, float]) -> None:
        """Held-out scores of evaluation `number` (a finished trial is immutable in Optuna, so
        they live in the study's attributes)."""
        with self._writing():
            self.study.set_user_attr(f"held_out:{number}", metrics)

    def set_race(self, index: int, race: dict[str, Any]) -> None:
        """A candidate's racing stages so far (racing.py), before its race ends and it is
        committed: a crash between stages loses none of them."""
        with self._writing():
            self.study.set_user_attr(f"race:{index}", race)

    def races(self) -> dict[int, dict[str, Any]]:
        return {int(k): v for k, v in self._named("race:").items()}

    def set_source(self, name: str, result: ReferenceResult) -> None:
        """A source model's scores."""
        with self._writing():
            self.study.set_user_attr(f"source:{name}", result.to_json())

    def sources(self) -> dict[str, ReferenceResult]:
        return {k: ReferenceResult.from_json(v) for k, v in self._named("source:").items()}

    def set_baseline(self, name: str, result: ReferenceResult) -> None:
        """A baseline merge's scores, with the recipe that was scored."""
        with self._writing():
            self.study.set_user_attr(f"baseline:{name}", result.to_json())

    def baselines(self) -> dict[str, ReferenceResult]:
        return {k: ReferenceResult.from_json(v) for k, v in self._named("baseline:").items()}

    def set_note(self, key: str, value: Any) -> None:
        """A small JSON value the run keeps about itself (e.g. its MLflow run id)."""
        with self._writing():
            self.study.set_user_attr(f"note:{key}", value)

    def note(self, key: str) -> Any:
        return self.study.user_attrs.get(f"note:{key}")

    def _named(self, prefix: str) -> dict[str, dict[str, Any]]:
        return {
            key.removeprefix(prefix): value
            for key, value in self.study.user_attrs.items()
            if key.startswith(prefix)
        }

    # ----- optimizer checkpoints ------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any], sequence: int) -> None:
        with self._writing():
            path = self.checkpoints / f"optimizer-{sequence:08d}.npz"
            self._parts[path.name] = write_state(path, state)
            for old in sorted(self.checkpoints.glob("optimizer-*.npz"))[:-KEEP_CHECKPOINTS]:
                old.unlink(missing_ok=True)
                self._parts.pop(old.name, None)
            self._drop_unreferenced_parts()

    def _drop_unreferenced_parts(self) -> None:
        """Frozen parts no kept checkpoint refers to (a finished generation's covariance once
        two newer checkpoints exist)."""
        kept = sorted(self.checkpoints.glob("optimizer-*.npz"))
        needed: set[str] = set()
        for path in kept:
            if path.name not in self._parts:
                self._parts[path.name] = referenced_parts(path)
            needed.update(self._parts[path.name])
        for part in self.checkpoints.glob(f"{PART_PREFIX}*.npz"):
            if part.stem.removeprefix(PART_PREFIX) not in needed:
                part.unlink(missing_ok=True)

    def load_checkpoint(self) -> Optional[tuple[dict[str, Any], int]]:
        """The newest readable checkpoint and its sequence number, or None."""
        for path in sorted(self.checkpoints.glob("optimizer-*.npz"), reverse=True):
            try:
                return read_state(path), int(path.stem.split("-")[1])
            except EvomergeError as exc:
                log.warning("%s; using the previous checkpoint", exc)
        return None


def _reused_from(attrs: dict[str, Any]) -> Optional[int]:
    """The twin a reused evaluation took its score from (runs before the field said so in
    their worker: "cache of #N")."""
    if attrs.get("reused_from") is not None:
        return int(attrs["reused_from"])
    legacy = str(attrs.get("worker", ""))
    return int(legacy.removeprefix("cache of #")) if legacy.startswith("cache of #") else None


def read_run_meta(folder: Path) -> dict[str, Any]:
    meta_file = Path(folder) / "run.json"
    if not meta_file.is_file():
        raise EvomergeError(f"{folder}: not an evomerge run folder (no run.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        raise EvomergeError(f"{meta_file}: unreadable run metadata") from None
    if meta.get("format") != FORMAT:
        raise EvomergeError(
            f"{folder}: store format {meta.get('format')!r} was written by evomerge "
            f"{meta.get('evomerge', '?')}; this evomerge {__version__} reads format {FORMAT}"
        )
    return meta


def _sqlite_url(folder: Path) -> str:
    return f"sqlite:///{(Path(folder) / 'store.sqlite').resolve()}"


def _storage(url: str) -> optuna.storages.RDBStorage:
    # a server's connections are checked before use, so one restarted between two commits is
    # reconnected to rather than failing the run
    kwargs = (
        {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:  # SQLAlchemy raises many kinds for a bad URL or server
        shown = _without_password(url)
        if isinstance(exc, ImportError) or "DB access module" in str(exc):
            raise EvomergeError(
                f"store {shown}: no database driver for it; pip install 'evomerge[postgres]' "
                "(psycopg 3), or name an installed driver in the URL (postgresql+psycopg2://)"
            ) from None
        reason = (str(exc).splitlines() or [""])[0][:300]
        raise EvomergeError(
            f"store {shown}: cannot open ({type(exc).__name__}: {reason})"
        ) from None


def _without_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: nothing to hide in it
        return url


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
