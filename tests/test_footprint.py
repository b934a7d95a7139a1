"""The memory model: a worker's sources and live model are what the formula predicts from the
headers, the first line of a run says it, and a run that cannot fit stops before any worker."""

from __future__ import annotations

import pytest

from evomerge.cli import main
from evomerge.config import RunConfig
from evomerge.recipe import Recipe
from evomerge.search.prepare import prepare
from evomerge.workers.evaluator import Evaluator
from evomerge.workers.footprint import predict

from .test_run import expect_error, run_config, write


@pytest.mark.parametrize("score_dtype", [None, "bfloat16"])
def test_the_prediction_is_what_a_worker_holds(llama, tmp_path, score_dtype):
    config = RunConfig.from_dict(run_config(llama, score_dtype=score_dtype))
    resolved, space = prepare(config)
    footprint = predict(resolved, space)
    refs = list(dict.fromkeys(resolved.models.values()))
    worker = Evaluator(refs, {"function": "tests.fitness_fns:score"}, score_dtype=score_dtype)
    held = sum(t.nbytes for tensors in worker.tensors.values() for t in tensors.values())
    assert footprint.sources == held
    live, _ = worker.materialize(Recipe.from_yaml_text(space.decode(space.initial()).to_yaml()))
    assert footprint.live == sum(t.nbytes for t in live.state_dict().values())
    largest = max(t.numel() for tensors in worker.tensors.values() for t in tensors.values())
    assert footprint.temporaries == (len(refs) + 3) * largest * 4


def test_a_run_prints_its_footprint_and_one_that_cannot_fit_stops(
    llama, tmp_path, capsys, monkeypatch
):
    config = write(tmp_path, run_config(llama, budget=2))
    assert main(["run", str(config), "--out", str(tmp_path / "fits")]) == 0  # INFO lines shown
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("memory per worker: sources ") and first.endswith(" GiB")

    import psutil

    class Scarce:  # a machine with 1 MiB free
        available = 2**20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Scarce())
    line = expect_error(
        ["run", str(config), "--out", str(tmp_path / "scarce")], capsys, "memory per worker"
    )
    assert "has 0.00 GiB free" in line and "fewer workers" in line
    assert not (tmp_path / "scarce").exists()  # nothing half-made


def test_only_the_models_a_run_can_merge_are_loaded_and_scored(llama, tmp_path, capsys):
    """A `models:` entry that no candidate and no baseline merges costs a worker no memory."""
    data = run_config(llama, budget=2)
    data["models"]["unused"] = str(llama["ft2"])
    data["search_space"]["models"] = ["a", "b"]
    resolved, space = prepare(RunConfig.from_dict(data))
    assert sorted(resolved.models) == ["a", "b", "base"]
    shown = predict(RunConfig.from_dict(data), space).sources
    assert predict(resolved, space).sources == shown * 3 // 4  # four equal models, three held

    data["baselines"] = [{"name": "with_unused", "preset": "average"}]  # every model: reached
    assert sorted(prepare(RunConfig.from_dict(data))[0].models) == ["a", "b", "base", "unused"]

    data.pop("baselines")
    config = write(tmp_path, data)
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    assert "not loaded or scored (no candidate or baseline merges them): unused" in (
        capsys.readouterr().err
    )
    from evomerge.results.store import RunStore

    assert sorted(RunStore.open(tmp_path / "run").sources()) == ["a", "b", "base"]
