"""The manager loop's dispatch: whole generations in flight, identical merges scored once, and
how many workers a cluster gets by default."""

from __future__ import annotations

from collections import Counter, deque

import pytest

from evomerge.cli import main
from evomerge.config import RunConfig
from evomerge.results.store import RunStore
from evomerge.search.loop import SearchLoop
from evomerge.search.records import recipe_key
from evomerge.search.run import create_run
from evomerge.workers.evaluator import Outcome
from evomerge.workers.ray_pool import default_workers

from .test_run import run_config, write


class FourWorkers:
    """A pool of four evaluators that scores instantly and remembers how much it held at once."""

    def __init__(self, workers: int = 4) -> None:
        self.workers = workers
        self.queue: deque = deque()
        self.most_in_flight = 0

    def free(self) -> int:
        return max(0, self.workers - len(self.queue))

    def submit(self, candidate, recipe_yaml, held_out=False) -> None:
        self.queue.append((candidate, recipe_yaml))
        self.most_in_flight = max(self.most_in_flight, len(self.queue))

    def in_flight(self) -> int:
        return len(self.queue)

    def wait(self):
        candidate, recipe = self.queue.popleft()
        return [(candidate, recipe, Outcome(metrics={"nll": float(candidate.genome.sum())}))]

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "optimizer, most",
    [
        ({"name": "cma", "options": {"population_size": 8}}, 8),
        ({"name": "nsga2", "options": {"population_size": 8}}, 8),
        ({"name": "random"}, 4),  # steady state: one new candidate per free worker
    ],
)
def test_generation_is_dispatched_whole(llama, tmp_path, optimizer, most):
    """4 workers, population 8: all 8 go out at once, so no worker idles while the generation
    still has candidates; a steady-state optimizer asks only for free workers."""
    config = RunConfig.from_dict(run_config(llama, optimizer=optimizer, budget=24))
    run = create_run(config, tmp_path / "run")
    pool = FourWorkers()
    SearchLoop(run, pool, progress=False).run_to_budget()
    assert pool.most_in_flight == most
    assert len(RunStore.open(tmp_path / "run").records()) == 24


def test_nsga2_generations_are_whole(llama, tmp_path):
    """Asked ahead, Optuna's NSGA-II would put every trial in generation 0; the barrier keeps
    each generation at population_size."""
    config = RunConfig.from_dict(
        run_config(llama, optimizer={"name": "nsga2", "options": {"population_size": 4}}, budget=12)
    )
    run = create_run(config, tmp_path / "run")
    loop = SearchLoop(run, FourWorkers(workers=16), progress=False)
    loop.run_to_budget()
    study = loop.optimizer.study
    key = next(k for k in study.trials[0].system_attrs if k.endswith(":generation"))
    assert Counter(t.system_attrs[key] for t in study.trials) == {0: 4, 1: 4, 2: 4}


def test_identical_merges_are_scored_once(llama, tmp_path):
    """A data-flow space over one 4-layer model without scales has 16 paths; 30 evaluations
    must repeat some. Each repeat is committed with its twin's values and never re-scored."""
    space = {"kind": "dataflow", "models": ["a"], "repetitions": 1, "scaling": "none"}
    fitness = {"function": "tests.fitness_fns:counted", "options": {"folder": str(tmp_path)}}
    config = run_config(
        llama, search_space=space, optimizer={"name": "random"}, budget=30, fitness=fitness
    )
    config["score_sources"] = False
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert len(records) == 30
    distinct = {recipe_key(r.recipe) for r in records}
    calls = len((tmp_path / "calls").read_text().splitlines())
    assert calls == len(distinct) < 30
    by_index = {r.index: r for r in records}
    reused = [r for r in records if r.reused_from is not None]
    assert len(reused) == 30 - calls
    for r in reused:
        twin = by_index[r.reused_from]
        assert recipe_key(twin.recipe) == recipe_key(r.recipe) and twin.values == r.values
        assert twin.reused_from is None and r.seconds == 0.0
        assert r.worker == "" and r.origin == "optimizer"  # no worker scored it


def test_default_workers_one_per_gpu_else_per_threads():
    gpu_nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 8, "GPU": 1}]
    assert default_workers(gpu_nodes, use_gpu=True, threads=2) == 3
    cpu_nodes = [{"CPU": 5}, {"CPU": 2}, {"CPU": 1}]
    assert default_workers(cpu_nodes, use_gpu=False, threads=2) == 3  # 2 + 1 + 0
    assert default_workers([{"CPU": 1}], use_gpu=False, threads=2) == 1


def test_a_run_whose_evaluations_keep_failing_stops_early_and_resumes(llama, tmp_path, capsys):
    """A broken fitness stops the run after max_consecutive_failures evaluations (not the whole
    budget) with one line naming the error; after the fix, resume finishes with them kept."""
    flag = tmp_path / "broken"
    flag.touch()
    fitness = {"function": "tests.fitness_fns:fails_while", "options": {"flag": str(flag)}}
    config = run_config(llama, optimizer={"name": "random"}, budget=30, fitness=fitness)
    config.update(score_sources=False, max_consecutive_failures=6)
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("evomerge: error: 6 evaluations in a row failed")
    assert "the task file is missing" in err and "evomerge resume" in err
    failed = RunStore.open(out).records()
    assert len(failed) == 6 and all(r.failed for r in failed)
    flag.unlink()
    assert main(["resume", str(out), "--quiet"]) == 0
    records = RunStore.open(out).records()
    assert len(records) == 30 and sum(r.failed for r in records) == 6


def test_out_of_memory_failures_are_recorded_and_counted(llama, tmp_path, capsys):
    fitness = {"function": "tests.fitness_fns:out_of_memory"}
    config = run_config(llama, optimizer={"name": "random"}, budget=3, fitness=fitness)
    config["score_sources"] = False
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out), "--quiet"]) == 0
    errors = [r.error for r in RunStore.open(out).records()]
    assert errors == ["OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"] * 3
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "3 / 3 (3 failed, 3 of them out of memory)" in capsys.readouterr().out


def test_tuning_on_a_benchmark_test_split_needs_held_out_or_a_yes(llama, tmp_path, capsys):
    from evomerge.search.prepare import is_benchmark, prepare

    assert is_benchmark("gsm8k") and is_benchmark("arc_challenge") and is_benchmark("mmlu_law")
    assert not is_benchmark("zoo_add_fit") and not is_benchmark("math_words_fit")
    fitness = {"kind": "lm_eval", "tasks": ["gsm8k"]}
    config = run_config(llama, fitness=fitness, objectives=[{"name": "acc", "metric": "x"}])
    out = tmp_path / "run"
    assert main(["run", str(write(tmp_path, config)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'gsm8k' is a public benchmark" in err, err
    assert "allow_benchmark_fitness" in err and not out.exists()
    prepare(RunConfig.from_dict({**config, "allow_benchmark_fitness": True}))  # accepted
    held = {**fitness, "held_out": {"tasks": ["gsm8k"]}}
    prepare(RunConfig.from_dict({**config, "fitness": held}))  # held-out tasks are reported
