"""Multi-fidelity racing: stages score only new documents, promotions follow the ranking, what
the optimizer is told keeps the racing decisions, a crash between stages loses nothing, and the
item-response estimator recovers full-task scores from subsets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.cli import main
from evomerge.config import Fidelity, RunConfig
from evomerge.results.store import RunStore
from evomerge.search import irt
from evomerge.search.loop import SearchLoop
from evomerge.search.racing import DocumentPlan, aggregate
from evomerge.search.references import score_references
from evomerge.search.run import create_run, open_run
from evomerge.workers.pool import LocalPool, make_pool
from evomerge.workers.scoring import LmEvalFitness
from tests.test_baselines import lm_eval_config
from tests.test_run import expect_error, write
from tests.test_workers import make_tasks

STAGES = [4, 8, "full"]


def racing_config(llama, tasks, **fidelity):
    config = lm_eval_config(llama, tasks, seed_with_sources=False)
    config["budget"] = 10
    config["optimizer"] = {"name": "cma", "options": {"population_size": 5}}
    config["fitness"]["fidelity"] = {"stages": STAGES, "promote": 0.5, "window": 4, **fidelity}
    return config


def test_document_plan_nests_stages_and_never_repeats_a_document():
    universe = {"a": list(range(20)), "b": list(range(100, 110))}
    plan = DocumentPlan(Fidelity(stages=[4, 8, "full"]), universe, seed=1)
    again = DocumentPlan(Fidelity(stages=[4, 8, "full"]), universe, seed=1)
    assert plan.order == again.order and plan.order["a"] != list(range(20))  # fixed, shuffled
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for k in range(plan.n_stages):
        for task, docs in plan.new_docs(k).items():
            assert not set(docs) & set(seen[task])  # a promotion adds, never repeats
            seen[task] += docs
        assert {t: sorted(d) for t, d in plan.stage_docs(k).items()} == {
            t: sorted(d) for t, d in seen.items()
        }
    assert [len(plan.stage_docs(k)["a"]) for k in range(3)] == [4, 8, 20]
    assert [len(plan.stage_docs(k)["b"]) for k in range(3)] == [4, 8, 10]  # same count per task
    documents = {"a": {str(i): {"acc,none": float(i % 2)} for i in range(20)}}
    assert aggregate(documents, {"a": [1, 3, 4, 6]}) == {"a: acc,none": 0.5}


def test_bad_fidelity_is_one_line(llama, tmp_path, capsys):
    tasks = make_tasks(tmp_path / "tasks")
    cases = [
        ({"stages": [8, 4]}, "fitness.fidelity.stages", "must increase"),
        ({"stages": ["full", 8]}, "fitness.fidelity.stages", "last stage"),
        ({"stages": [4, 8], "promote": 0}, "fitness.fidelity.promote", "greater than 0"),
        ({"stages": [4, 8], "promote": 1.5}, "fitness.fidelity.promote", "less than or equal"),
        ({"stages": [4, 50]}, "fitness.fidelity.stages", "stage 50 is larger than task"),
    ]
    for n, (fidelity, *needles) in enumerate(cases):
        config = racing_config(llama, tasks)
        config["fitness"]["fidelity"] = fidelity
        out = tmp_path / f"run{n}"
        expect_error(["run", str(write(tmp_path, config)), "--out", str(out)], capsys, *needles)
        assert not out.exists()  # nothing half-written


def spy_on_documents(monkeypatch) -> list[dict]:
    """Every document subset lm-eval is asked to score, in order."""
    calls: list[dict] = []
    original = LmEvalFitness.__call__

    def spy(self, model, tokenizer, samples=None):
        calls.append(samples)
        return original(self, model, tokenizer, samples)

    monkeypatch.setattr(LmEvalFitness, "__call__", spy)
    return calls


def test_racing_scores_new_documents_only_and_keeps_its_decisions(
    llama, tmp_path, monkeypatch, capsys
):
    tasks = make_tasks(tmp_path / "tasks")
    calls = spy_on_documents(monkeypatch)
    out = tmp_path / "run"
    config = write(tmp_path, racing_config(llama, tasks))
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert len(records) == 10
    reached = [len(r.stages) for r in records]
    assert reached.count(1) >= 2 and max(reached) == 3  # some stopped early, some went on
    # the search scored fewer documents than 10 full evaluations, none of them twice
    search_calls = [c for c in calls if c is not None]
    assert sum(len(c["parity_fit"]) for c in search_calls) < 10 * 12
    for r in records:
        assert len(r.per_document["parity_fit"]) == [4, 8, 12][len(r.stages) - 1]
        assert r.final == (len(r.stages) == 3)
    # an early stop is told no better than any candidate promoted out of its window
    by_seq = sorted(
        ((s["seq"], k, r) for r in records for k, s in enumerate(r.stages)), key=lambda t: t[0]
    )
    for r in records:
        k = len(r.stages) - 1
        if k == 2:
            continue
        mine = r.stages[k]["seq"]
        window = [x for seq, kk, x in by_seq if kk == k and seq < mine][-3:]
        promoted = [x for x in window if x.stages[k]["promoted"]]
        for p in promoted:
            assert r.values["parity"] <= p.stages[-1]["values"]["parity"] + 1e-12
    # the Pareto set, the held-out scores and status speak of full-fidelity candidates only
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    pareto = json.loads(capsys.readouterr().out)["pareto"]
    final = {r.index for r in records if r.final}
    assert pareto and {p["index"] for p in pareto} <= final
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "racing:" in text and "stage" in text
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "racing.png").is_file()  # each candidate's score at every stage


class Crash(Exception):
    pass


def test_a_crash_between_stages_loses_nothing(llama, tmp_path):
    tasks = make_tasks(tmp_path / "tasks")
    config = write(tmp_path, racing_config(llama, tasks, estimator="irt"))
    chaos = tmp_path / "chaos"
    create_run(RunConfig.load(config), chaos)
    saved: dict[int, list[dict]] = {}  # each candidate's stages when a crash first saw it
    crashes = 0
    for stop_after in (3, 5, 4, 100):
        run = open_run(chaos)
        pool = make_pool(run.config)
        assert isinstance(pool, LocalPool)
        results = {"n": 0}

        def crashing_wait(wait=pool.wait, stop_after=stop_after, results=results):
            results["n"] += 1
            if results["n"] > stop_after:
                raise Crash  # the manager dies with a promotion queued or in flight
            return wait()

        pool.wait = crashing_wait
        try:
            score_references(run, pool, progress=False)
            SearchLoop(run, pool, progress=False).run_to_budget()
        except Crash:
            crashes += 1
            store = RunStore.open(chaos)
            for index, race in store.races().items():
                saved.setdefault(index, race["stages"])  # the earliest snapshot
            for r in store.records():
                saved.setdefault(r.index, r.stages)
            continue
        break
    assert crashes == 3
    records = RunStore.open(chaos).records()
    assert sorted(r.index for r in records) == list(range(10))  # each committed once
    assert any(
        len(stages) < len(by.stages)
        for by in records
        for i, stages in saved.items()
        if i == by.index
    )  # a race was cut short by a crash and went on after it
    for r in records:
        kept = saved.get(r.index, [])
        assert r.stages[: len(kept)] == kept  # what was saved before a crash is what it ended with
        assert len(r.per_document["parity_fit"]) == [4, 8, 12][len(r.stages) - 1]


def simulated_results(n_cand: int, n_docs: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, 1, n_cand)
    a = np.exp(rng.normal(0, 0.5, n_docs))
    b = rng.normal(0, 1.2, n_docs)
    p = 1 / (1 + np.exp(-a[None, :] * (theta[:, None] - b[None, :])))
    return (rng.random((n_cand, n_docs)) < p).astype(float)


def test_irt_estimates_full_scores_from_a_subset():
    results = simulated_results(120, 60)
    train, test = results[:80], results[80:]
    subset = np.zeros(60, dtype=bool)
    subset[:15] = True
    masked = np.where(subset, test, np.nan)
    items = irt.fit_items(np.vstack([train, masked]))
    truth = test.mean(1)
    estimated = np.array([irt.estimate_mean(row, items) for row in masked])
    plain = test[:, subset].mean(1)
    # on the whole-task scale: closer to the truth than the subset mean
    assert np.abs(estimated - truth).mean() < np.abs(plain - truth).mean()
    assert irt.estimate_mean(test[0], items) == pytest.approx(truth[0])  # all seen: exact
    assert irt.is_binary(masked) and not irt.is_binary(np.array([0.5, 1.0]))
