"""The run's kept summary: `evomerge status` reads it instead of every evaluation, so it must say
exactly what a full read would (counts, best, Pareto set with ties and racing), notice when it
lags the store, and the store's compact genomes must come back bit for bit."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from evomerge.config import Objective
from evomerge.results.pareto import pareto_records
from evomerge.results.status import status_data, summary
from evomerge.results.store import RunStore, decode_genome, encode_genome
from evomerge.results.summary import FILE, RunSummary

from .test_run import pareto_config, write

OBJECTIVES = [
    Objective(name="a", metric="a", direction="minimize"),
    Objective(name="b", metric="b", direction="maximize"),
]


def fake_records(count: int, seed: int = 0) -> list[SimpleNamespace]:
    """Evaluations with values on a coarse grid (so ties happen), failures and early stops."""
    g = np.random.default_rng(seed)
    out = []
    for n in range(count):
        kind = g.choice(["ok", "ok", "ok", "failed", "early"])
        values = (
            None
            if kind == "failed"
            else {"a": float(g.integers(0, 6)), "b": float(g.integers(0, 6))}
        )
        out.append(
            SimpleNamespace(
                number=n,
                index=n + 100,
                values=values,
                error="OutOfMemoryError: CUDA out of memory"
                if kind == "failed" and n % 2
                else ("boom" if kind == "failed" else None),
                origin="optimizer",
                worker="w0",
                stages=[{}] * (1 if kind == "early" else 2),
                final=kind != "early",
            )
        )
    return out


@pytest.mark.parametrize("seed", range(5))
def test_kept_summary_matches_a_full_read(seed):
    records = fake_records(300, seed)
    kept = RunSummary.of(records, ["a", "b"], ["minimize", "maximize"])
    expected = pareto_records(records, OBJECTIVES)
    assert [m.number for m in kept.pareto] == [r.number for r in expected]
    good = [r for r in records if r.values is not None and r.final]
    best_a = min(good, key=lambda r: r.values["a"])  # the first of the best, as pandas picks
    best_b = max(good, key=lambda r: r.values["b"])
    assert kept.best["a"].number == best_a.number and kept.best["b"].number == best_b.number
    assert kept.failed == sum(r.values is None for r in records)
    assert kept.out_of_memory == sum(bool(r.error and "memory" in r.error) for r in records)
    assert kept.ended_at_stage == {
        0: sum(not r.final for r in records),
        1: sum(r.final for r in records),
    }
    assert kept.worst == [max(r.values["a"] for r in good), max(-r.values["b"] for r in good)]
    failed = [r for r in records if r.values is None]
    assert [f["index"] for f in kept.failures] == [r.index for r in failed[-5:]]
    assert RunSummary.from_json(json.loads(json.dumps(kept.to_json()))) == kept


def test_genomes_are_stored_compactly_and_exactly():
    genome = np.random.default_rng(1).random(2024)
    stored = encode_genome(genome)
    assert np.array_equal(decode_genome(stored), genome)
    assert len(stored) < 0.6 * len(json.dumps([float(v) for v in genome]))
    discrete = np.repeat([0.0, 1.0], 1012)
    assert len(encode_genome(discrete)) < 200  # repeated genes deflate
    assert np.array_equal(decode_genome([0.5, 0.25]), [0.5, 0.25])  # runs written as lists


@pytest.fixture()
def finished_run(llama, tmp_path):
    from evomerge.cli import main

    config = write(tmp_path, pareto_config(llama, budget=12))
    folder = tmp_path / "run"
    assert main(["run", str(config), "--out", str(folder), "--quiet"]) == 0
    return folder


def test_status_reads_the_summary_not_every_evaluation(finished_run, monkeypatch):
    full = summary(finished_run)
    data = status_data(finished_run)
    assert data["evaluations"] == 12

    def every_evaluation(self):
        raise AssertionError("status read every evaluation")

    monkeypatch.setattr(RunStore, "records", every_evaluation)
    assert summary(finished_run) == full and status_data(finished_run) == data


def test_a_summary_that_lags_the_store_is_rebuilt(finished_run, monkeypatch):
    full = summary(finished_run)
    kept_file = finished_run / FILE
    kept = RunSummary.read(finished_run)
    behind = RunSummary.of(
        RunStore.open(finished_run).records()[:-1], kept.objectives, kept.directions
    )
    behind.write(finished_run)  # as if killed between a commit and the summary's write
    assert summary(finished_run) == full
    kept_file.write_text("{torn")
    assert summary(finished_run) == full
    kept_file.unlink()  # a run made before summaries
    assert summary(finished_run) == full
    store = RunStore.open(finished_run)
    assert store.summary() == kept and len(store.records()) == 12


def test_references_and_reuse_are_typed_and_older_runs_still_read(tmp_path):
    """Source and baseline scores round-trip as ReferenceResult; a reused evaluation names its
    twin in `reused_from`, and a run written before either (plain dicts, "cache of #N" in the
    worker) reads the same."""
    from evomerge.results.store import Record, ReferenceResult

    store = RunStore.create(tmp_path / "run", None, [("a", "minimize")], ["g"])
    scored = ReferenceResult(values={"a": 0.5}, metrics={"a": 0.5}, per_example=[1.0, 0.0])
    store.set_baseline("avg", ReferenceResult(values=None, error="boom", recipe="merge: x"))
    store.set_source("m", scored)
    store.study.set_user_attr(  # as runs before the type wrote them
        "source:old", {"values": {"a": 0.25}, "metrics": {}, "per_example": None, "error": None}
    )
    sources, baselines = store.sources(), store.baselines()
    assert sources["m"] == scored and not scored.failed
    assert sources["old"] == ReferenceResult(values={"a": 0.25}) and baselines["avg"].failed
    assert baselines["avg"].recipe == "merge: x"
    genome = np.array([0.5])
    twin = Record(index=0, genome=genome, recipe="r", values={"a": 1.0}, worker="w0")
    store.commit(twin)
    store.commit(Record(index=1, genome=genome, recipe="r", values={"a": 1.0}, reused_from=0))
    store.commit(
        Record(index=2, genome=genome, recipe="r", values={"a": 1.0}, worker="cache of #0")
    )
    assert [r.reused_from for r in store.records()] == [None, 0, 0]
